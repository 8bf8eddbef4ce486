"""Launch and resume a study: check every input, then run Tune over the space to the end.

:func:`prepare_study` checks the space, the data and the tracking backend before Ray starts
and writes the study directory; :func:`run_study` starts Ray, runs the Tuner
(``study.tuner``) and syncs the MLflow view with the record (``study.sync``) when the study
resumes and when it ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from analysis import schema as S
from study.studydir import (PROJECT_ROOT, StudyError, StudyOptions, default_mlflow_uri,
                            driver_lock, experiment_dir, git_commit, load_meta, summarize,
                            write_summary)

__all__ = ["StudyError", "StudyOptions", "launch", "prepare_study", "resume", "run_study"]

log = logging.getLogger(__name__)

RUNTIME_EXCLUDES = ["runs/", "studies/", "mlruns/", ".git/", "*.db", "benchmarks/out/",
                    "__pycache__/", "*.egg-info/"]


def launch(opts: StudyOptions) -> dict[str, Any]:
    """Checks everything, then runs a new study to the end; returns its summary."""
    return run_study(prepare_study(opts), resume=False)


def resume(study: str | Path) -> dict[str, Any]:
    """Continues an interrupted study: Tune's state, the searcher and the Optuna storage."""
    return run_study(load_meta(study)["dir"], resume=True)


def prepare_study(opts: StudyOptions) -> Path:
    """Checks the space, the data and the tracking backend, then writes the study directory.

    Nothing here starts Ray: a bad space file, a missing dataset or an unreachable MLflow
    server fails in seconds with a message that names the culprit.
    """
    from search_spaces.space import load_space
    from study.reporting import warm_start_configs
    from trainables.data import load_beir, resolve_data_dir, split_for

    spec = load_space(opts.space)
    base = spec.base_config()
    data_dir = resolve_data_dir(opts.data or base.data.path)
    data = load_beir(data_dir)
    split_for(data, base.data)  # a degenerate split fails now, naming the field
    name = opts.name or spec.name
    study_dir = Path(opts.storage).expanduser().resolve() / name
    if (study_dir / "study.json").exists():
        raise StudyError(f"study {study_dir} exists: continue it with `jepa-study resume "
                         f"{study_dir}` or pick another --name")
    uri = opts.mlflow_uri or default_mlflow_uri(study_dir)
    created = not study_dir.exists()
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        db = S.sqlite_path(uri)  # a local store is created while Ray starts, in run_study
        if db is not None and not os.access(Path(db).parent, os.W_OK):
            raise StudyError(f"MLflow store {uri}: {Path(db).parent} is not a writable "
                             "directory (--mlflow-uri)")
        if db is None:
            from study.tracking import StudyTracker

            _reachable(StudyTracker(uri, name))
    except StudyError:
        if created:  # nothing was started: leave nothing behind
            shutil.rmtree(study_dir, ignore_errors=True)
        raise
    space_file = study_dir / "space.yaml"
    first = warm_start_configs(opts.warm_start, study_dir / "warm_start")
    space_file.write_text(spec.to_yaml(first))
    load_space(space_file)  # the study's copy is valid, warm-start points included
    meta = {"name": name, "options": asdict(opts), "space_file": str(space_file),
            "data_dir": str(data_dir), "mlflow_uri": uri, "created": time.time(),
            "git_commit": git_commit()}
    (study_dir / "study.json").write_text(json.dumps(meta, indent=1))
    return study_dir


def run_study(study_dir: Path, *, resume: bool) -> dict[str, Any]:
    """Runs (or resumes) the study in ``study_dir`` to the end; returns its summary.

    Ray starts first (its processes boot on their own) while a thread imports MLflow and Tune
    and opens the tracking store. A resumed study's MLflow view is synced with the record
    before Tune restores (runs a killed driver left RUNNING end KILLED as orphaned); at the
    end, however the study ends, it is synced again with the study's end status.
    """
    import ray

    from search_spaces.space import load_space

    meta = load_meta(study_dir)
    opts, spec = StudyOptions(**meta["options"]), load_space(meta["space_file"])
    started = time.time()
    # Tune saves its experiment state (the record) every second instead of every 10 s or
    # more, so that a killed driver loses at most a second of it.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    with driver_lock(meta["dir"]):
        tracker = _while_ray_starts(opts, lambda: _open_tracking(meta, spec))
        from study.sync import open_study, sync
        from study.tuner import fit, make_tuner

        ending: tuple[str, str | None] = (S.STATUS_FAILED, "driver failed")
        try:
            if resume:
                orphans = sync(meta["dir"], tracker=tracker, live=False).orphaned
                if orphans:
                    log.warning("runs of trials %s were left RUNNING by a driver that was "
                                "killed: marked KILLED (a trial that resumes reopens its run)",
                                orphans)
            open_study(tracker, meta, spec)
            tuner = make_tuner(meta, spec, opts, _shared_inputs(meta, spec), tracker, resume)
            if fit(tuner):
                raise KeyboardInterrupt  # Tune caught the SIGINT, stopped and saved its state
            ending = (S.STATUS_FINISHED, None)
            _score_at_end(meta)
        except KeyboardInterrupt:
            ending = (S.STATUS_KILLED, f"interrupted: continue with `jepa-study resume "
                                       f"{meta['dir']}`")
            log.warning("study interrupted; continue it with `jepa-study resume %s`",
                        meta["dir"])
            raise
        except BaseException as exc:
            ending = (S.STATUS_FAILED, f"driver failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            try:
                trials = _sync_at_end(meta, tracker, ending)
            finally:
                ray.shutdown()
    if trials is None:  # the record could not be read while syncing: read it for the summary
        from study.sync import read_trials

        trials = read_trials(experiment_dir(meta))
    return write_summary(summarize(meta, trials, spec, time.time() - started))


def _score_at_end(meta: dict[str, Any]) -> None:
    """Scores the study's reported trials on test (``study.scoring``), before the end's sync
    logs them. A failure is left to ``jepa-study test``: the study itself has ended well."""
    from study.scoring import score_study

    try:
        score_study(meta["dir"])
    except Exception as exc:  # noqa: BLE001 - test figures are a view: never fail the study
        log.warning("scoring the best trials of %s on test failed (%s: %s); run `jepa-study "
                    "test %s`", meta["dir"], type(exc).__name__, exc, meta["dir"])


def _sync_at_end(meta: dict[str, Any], tracker: Any, ending: tuple[str, str | None]):
    """Syncs the MLflow view with the record and the study's end; returns Tune's record of the
    trials. Never raises: a view that cannot be written now is left to `jepa-study sync`."""
    from study.sync import read_trials, sync

    trials = None
    try:
        trials = read_trials(experiment_dir(meta))
        sync(meta["dir"], tracker=tracker, trials=trials, live=False, ending=ending)
    except Exception as exc:  # noqa: BLE001 - must not hide the study's own end
        log.warning("the MLflow view of %s is not up to date (%s: %s); run `jepa-study sync %s` "
                    "once %s answers", meta["dir"], type(exc).__name__, exc, meta["dir"],
                    meta["mlflow_uri"])
    return trials


def _shared_inputs(meta: dict[str, Any], spec: Any) -> dict[str, Any]:
    """The data and the frozen base's features, computed once per study (the disk cache makes
    a rerun free) and put in Ray's object store once for every trial."""
    import ray

    from trainables.cache import load_or_compute
    from trainables.data import load_beir

    base = spec.base_config()
    data = load_beir(meta["data_dir"])
    features = None
    if base.model.freeze_base or base.train.hard_negatives:
        features = load_or_compute(data, base.model.base_model, base.model.max_seq_length,
                                   as_numpy=True)  # torch-free unless it must encode
    return {"data": ray.put(data), "features": ray.put(features) if features else None}


def _open_tracking(meta: dict[str, Any], spec: Any):
    import ray.tune  # noqa: F401 - imported here, while Ray starts

    from study.sync import open_tracker

    return _reachable(open_tracker(meta, spec))


def _reachable(tracker: Any) -> Any:
    """``tracker``, or a :class:`StudyError` naming its unusable backend."""
    from study.tracking import TrackingError

    try:
        tracker.check_reachable()
    except TrackingError as exc:
        raise StudyError(f"{exc} (--mlflow-uri)") from None
    return tracker


def _while_ray_starts(opts: StudyOptions, work: Callable[[], Any]) -> Any:
    """Starts Ray here while ``work`` runs in a thread (both mostly wait on other processes
    or disk); returns what ``work`` returned. When ``work`` fails, Ray is shut down again
    and its error raised."""
    import ray

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="jepa-study-open-tracking", daemon=True)
    thread.start()
    try:
        _init_ray(opts)
    finally:
        thread.join()
    if "error" in box:
        ray.shutdown()
        raise box["error"]
    return box["value"]


def _init_ray(opts: StudyOptions) -> None:
    """A new local Ray by default; ``--address`` joins a cluster and ships this project to it.

    Without ``--address`` Ray is started with ``address="local"``: a bare ``ray.init()`` would
    join the cluster named in Ray's ``ray_current_cluster`` file, which a killed ``ray start``
    or test cluster leaves behind pointing at nothing, and then waits on it for minutes.
    ``--address auto`` joins a cluster started on this machine."""
    import ray

    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "TOKENIZERS_PARALLELISM": "false"}
    for key in ("JEPA_STUDY_CACHE", "JEPA_STUDY_DATA"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if opts.address:
        runtime_env.update(working_dir=str(PROJECT_ROOT), excludes=RUNTIME_EXCLUDES)
    else:  # workers import the project from where this driver does, installed or not
        env_vars["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    if ray.is_initialized():
        return
    # ray.init installs a native SIGTERM handler in the driver that dumps a stack trace and
    # aborts it (runs left RUNNING, like SIGKILL); a Python handler set before (the command
    # line's: stop like Ctrl-C) is put back.
    on_term = (signal.getsignal(signal.SIGTERM)
               if threading.current_thread() is threading.main_thread() else None)
    ray.init(address=opts.address or "local", runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=opts.verbose > 1, configure_logging=True,
             logging_level=logging.WARNING)
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)
