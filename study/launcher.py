"""Launch and resume a study: check every input, then run Tune over the space to the end.

:func:`launch` creates the study (``Study.create`` checks the space, the data and the tracking
backend before Ray starts); :func:`run` starts Ray, runs the Tuner (``study.tuner``), scores
the reported trials on test (``study.scoring``) and syncs the MLflow view with the record
(``study.sync``) when the study resumes and when it ends, however it ends.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from analysis import schema as S
from study.study import PROJECT_ROOT, Study, StudyError, StudyOptions

__all__ = ["StudyError", "StudyOptions", "launch", "resume", "run", "stop_ray"]

log = logging.getLogger(__name__)

RUNTIME_EXCLUDES = ["runs/", "studies/", "mlruns/", ".git/", "*.db", "benchmarks/out/",
                    "__pycache__/", "*.egg-info/"]


def launch(opts: StudyOptions) -> dict[str, Any]:
    """Checks everything, then runs a new study to the end; returns its summary."""
    return run(Study.create(opts), resume=False)


def resume(path: str | Path) -> dict[str, Any]:
    """Continues an interrupted study: Tune's state, the searcher and the Optuna storage."""
    return run(Study.open(path), resume=True)


def run(study: Study, *, resume: bool) -> dict[str, Any]:
    """Runs (or resumes) ``study`` to the end; returns its summary.

    Ray starts first (its processes boot on their own) while a thread imports MLflow and Tune
    and opens the tracking store. A resumed study's MLflow view is synced with the record
    before Tune restores (runs a killed driver left RUNNING end KILLED as orphaned); at the
    end, however the study ends, it is synced again with the study's end status. Ray is shut
    down at the end only when this call started it: a caller that runs several studies in
    one Ray session (``jepa-study answer``) starts it once and shuts it down itself.
    """
    import ray

    started = time.time()
    owns_ray = not ray.is_initialized()
    # Tune saves its experiment state (the record) every second instead of every 10 s or
    # more, so that a killed driver loses at most a second of it.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    with study.driver_lock():
        _open_while_ray_starts(study, owns_ray)
        from study.scoring import references, score
        from study.sync import open_study, read_trials, repair_tune_state, sync
        from study.tuner import fit, make_tuner

        ending: tuple[str, str | None] = (S.STATUS_FAILED, "driver failed")
        trials = None
        try:
            if resume:
                repair_tune_state(study.experiment_dir)
                orphans = sync(study, live=False).orphaned
                if orphans:
                    log.warning("runs of trials %s were left RUNNING by a driver that was "
                                "killed: marked KILLED (a trial that resumes reopens its run)",
                                orphans)
            open_study(study)
            shared = {"data": ray.put(study.data), "features": None if study.features is None
                      else ray.put(study.features)}
            with ThreadPoolExecutor(1, thread_name_prefix="jepa-study-references") as pool:
                pool.submit(_quietly, "the reference rows", references, study)  # meanwhile
                interrupted = fit(make_tuner(study, shared, resume))
            if interrupted:
                raise KeyboardInterrupt  # Tune caught the SIGINT, stopped and saved its state
            ending = (S.STATUS_FINISHED, None)
            trials = read_trials(study.experiment_dir)
            _quietly("the best trials", score, study, trials=trials)
        except KeyboardInterrupt:
            ending = (S.STATUS_KILLED, f"interrupted: continue with `jepa-study resume "
                                       f"{study.dir}`")
            log.warning("study interrupted; continue it with `jepa-study resume %s`", study.dir)
            raise
        except BaseException as exc:
            ending = (S.STATUS_FAILED, f"driver failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            try:  # never raises: a view that cannot be written now is left to `sync`
                trials = trials or read_trials(study.experiment_dir)
                sync(study, trials=trials, live=False, ending=ending)
            except Exception as exc:  # noqa: BLE001 - must not hide the study's own end
                log.warning("the MLflow view of %s is not up to date (%s: %s); run `jepa-study "
                            "sync %s` once %s answers", study.dir, type(exc).__name__, exc,
                            study.dir, study.mlflow_uri)
            finally:
                if owns_ray:
                    stop_ray()
    summary = study.summary(trials or read_trials(study.experiment_dir), time.time() - started)
    (study.dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _quietly(what: str, scoring: Callable[..., Any], study: Study, **kwargs: Any) -> None:
    """Scores ``what`` on test (``study.scoring``), before the end's sync logs it. A failure is
    left to ``jepa-study test``: test figures are a view, and the study itself has ended well."""
    try:
        scoring(study, **kwargs)
    except Exception as exc:  # noqa: BLE001 - never fail the study
        log.warning("scoring %s of %s on test failed (%s: %s); run `jepa-study test %s`", what,
                    study.dir, type(exc).__name__, exc, study.dir)


def _open_while_ray_starts(study: Study, owns_ray: bool = True) -> None:
    """Starts Ray (unless it runs already) while a thread imports Tune and MLflow, opens the
    tracker, makes the Optuna storage and loads the space and the base's features, all once
    (both sides mostly wait on other processes or on disk). When the thread fails, a Ray this
    call started is shut down again and the error raised."""
    import ray

    def open_study() -> None:
        import optuna
        import ray.tune  # noqa: F401 - imported here, while Ray starts

        study.tracker(), study.trial_config, study.features  # each built once, here
        optuna.storages.RDBStorage(study.optuna_url)  # its tables made here (~0.7 s)

    with ThreadPoolExecutor(1, thread_name_prefix="jepa-study-open") as pool:
        opened = pool.submit(open_study)
        _init_ray(study.options)
    try:
        opened.result()
    except BaseException:
        if owns_ray:
            stop_ray()
        raise


def stop_ray() -> None:
    """``ray.shutdown()``, a second sooner when this process started the cluster.

    Ray 2.60 stops the processes it started one by one, each given a second to exit on
    SIGTERM. The autoscaler's monitor never exits on SIGTERM within that second, so every
    local launch paid a second waiting for it (measured: raylet 0.07 s, GCS 0.02 s, monitor
    1.02 s). It keeps no state of its own (it reads the GCS, which is going too): it is killed
    first. Joined clusters (``--address``) are only disconnected from, as before."""
    import ray
    from ray._private import ray_constants, worker  # pinned: ray>=2.60,<2.61

    node = worker._global_node
    if node is not None and node.head:
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            if info.process.poll() is None:
                info.process.kill()  # reaped by ray.shutdown(), which skips it once it is gone
    ray.shutdown()


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
