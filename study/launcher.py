"""Launch, resume and inspect a study: Ray Tune + OptunaSearch + ASHA + MLflow.

A study lives in one directory (``<storage>/<name>``)::

    study.json     the launch options and the resolved space (what ``resume`` rebuilds from)
    space.yaml     the space file as given
    optuna.db      Optuna's RDB storage (sampler history survives the driver)
    mlflow.db      the embedded MLflow store (unless --mlflow-uri), artifacts in mlartifacts/
    ray/<name>/    Tune's experiment state (searcher state, trial checkpoints)
    trials/<id>/   each trial's local output (checkpoints, metrics.json)

Everything that can be wrong with the input (space, data, MLflow server) is checked before
Ray starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXCLUDES = ["runs/", "studies/", "mlruns/", ".git/", "*.db", "benchmarks/out/",
                    "__pycache__/", "*.egg-info/"]


class StudyError(RuntimeError):
    """A study that cannot be launched, resumed or read; the message says what to do."""


@dataclass
class StudyOptions:
    """What ``jepa-study launch`` was asked for; saved in ``study.json`` for ``resume``."""

    space: str = "quick"
    num_samples: int | None = None
    data: str | None = None
    address: str | None = None
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    mlflow_uri: str | None = None
    name: str | None = None
    storage: str = "studies"
    max_concurrent_trials: int | None = None
    execution: str = "auto"
    max_failures: int = 2
    warm_start: list[str] = field(default_factory=list)
    checkpoint_interval_s: float = 10.0
    verbose: int = 1

    def __post_init__(self) -> None:
        if self.num_samples is not None and self.num_samples < 1:
            raise StudyError("--num-samples must be at least 1")
        if self.num_workers < 1:
            raise StudyError("--num-workers must be at least 1")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise StudyError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.execution not in ("auto", "direct", "train"):
            raise StudyError("--execution must be one of auto, direct, train")
        if self.checkpoint_interval_s < 0:
            raise StudyError("--checkpoint-interval must be >= 0 seconds")


#: Checkpoints each trial keeps in Tune's storage (Tune keeps every one by default: 15 MB an
#: epoch for a frozen-base trial).
KEEP_TUNE_CHECKPOINTS = 2


def default_mlflow_uri(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'mlflow.db').resolve()}"


def optuna_url(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'optuna.db').resolve()}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, text=True,
                              capture_output=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- trial configs and stop reasons (picklable: Tune ships them to trials and checkpoints) --

class TrialConfigBuilder:
    """Tune config (Optuna's params) -> the trial's full run-config dict."""

    def __init__(self, space_file: str, data_dir: str):
        self.space_file, self.data_dir = space_file, data_dir
        self._spec = None

    def __getstate__(self) -> dict:
        return {"space_file": self.space_file, "data_dir": self.data_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def spec(self):
        if self._spec is None:
            from search_spaces.space import load_space

            self._spec = load_space(self.space_file)
        return self._spec

    def __call__(self, params: dict) -> dict:
        cfg = self.spec.trial_config(params)
        return cfg.with_overrides({"data.path": self.data_dir}, "study").to_dict()

    def flat(self, params: dict) -> dict:
        from trainables.config import flatten

        return {**flatten(self(params)), **{f"search.{k}": v for k, v in params.items()}}

    def yaml(self, params: dict) -> str:
        import yaml

        return yaml.safe_dump(self(params), sort_keys=False)


class StopReasons:
    """Why a trial that ended without error ended: collapse guard, the loop's own end
    (budget, patience), or the scheduler (ASHA)."""

    def __init__(self, study_dir: str, max_epochs: int):
        self.study_dir, self.max_epochs = study_dir, max_epochs

    def __call__(self, trial) -> str | None:
        marker = Path(self.study_dir) / "stops" / f"{trial.trial_id}.txt"
        if marker.exists():
            return marker.read_text()
        result = trial.last_result or {}
        if result.get("end_reason"):  # the loop ended itself: budget, patience, stop_after
            return str(result["end_reason"])
        epoch = result.get("epoch")
        if epoch is not None and epoch < self.max_epochs:
            return f"early_stopped: scheduler stopped the trial after epoch {epoch}"
        return "completed"


# -- launch / resume ---------------------------------------------------------------------------

def prepare_study(opts: StudyOptions) -> Path:
    """Validates everything (space, data, tracking) and writes the study directory.

    Nothing here starts Ray: a bad space file, a missing dataset or an unreachable MLflow
    server fails in seconds with a message that names the culprit.
    """
    from search_spaces.space import load_space
    from trainables.data import load_beir, make_splits, resolve_data_dir

    spec = load_space(opts.space)
    base = spec.base_config()
    data_dir = resolve_data_dir(opts.data or base.data.path)
    data = load_beir(data_dir)
    make_splits(data, train=base.data.train_split, dev=base.data.dev_split,
                test=base.data.test_split, dev_fraction=base.data.dev_fraction,
                seed=base.data.split_seed)
    name = opts.name or spec.name
    study_dir = Path(opts.storage).expanduser().resolve() / name
    if (study_dir / "study.json").exists():
        raise StudyError(f"study {study_dir} exists: continue it with `jepa-study resume "
                         f"{study_dir}` or pick another --name")
    uri = opts.mlflow_uri or default_mlflow_uri(study_dir)
    created = not study_dir.exists()
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        _check_tracking(uri, name, open_local=False)
    except StudyError:
        if created:  # nothing was started: leave nothing behind
            shutil.rmtree(study_dir, ignore_errors=True)
        raise
    space_file = study_dir / "space.yaml"
    space_file.write_text(Path(spec._source).read_text() if Path(spec._source).exists()
                          else _space_yaml(spec))
    if opts.warm_start:
        _add_warm_start(space_file, spec, opts.warm_start, study_dir)
    meta = {"name": name, "options": asdict(opts), "space_file": str(space_file),
            "data_dir": str(data_dir), "mlflow_uri": uri, "created": time.time(),
            "git_commit": git_commit()}
    (study_dir / "study.json").write_text(json.dumps(meta, indent=1))
    return study_dir


def _add_warm_start(space_file: Path, spec, sources: list[str], study_dir: Path) -> None:
    """Puts earlier best configs first in the study's copy of the space (points_to_evaluate),
    so the searcher evaluates them before anything else; the copy is validated again."""
    import yaml

    from search_spaces.space import load_space
    from study.reporting import warm_start_configs

    configs = warm_start_configs(sources, study_dir / "warm_start")
    raw = yaml.safe_load(space_file.read_text())
    raw["points_to_evaluate"] = [spec.config_point(c) for c in configs] + list(
        raw.get("points_to_evaluate") or [])
    if raw.get("base_preset") is None:
        raw.pop("base_preset", None)
    space_file.write_text(f"# {spec._source} with warm-start points from {sources}\n"
                          + yaml.safe_dump(raw, sort_keys=False))
    load_space(space_file)


def _check_tracking(uri: str, name: str, *, open_local: bool = True) -> None:
    """An unreachable MLflow server or unusable store fails here.

    ``open_local=False`` (before Ray starts): a local SQLite store is only checked for a
    writable directory, since opening it the first time (MLflow creates and migrates the
    schema, ~2 s) is done by :func:`run_study` while Ray starts.
    """
    from analysis.schema import sqlite_path

    db = sqlite_path(uri)
    if not open_local and db is not None:
        folder = Path(db).parent
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise StudyError(f"MLflow store {uri}: {folder} is not a writable directory "
                             "(--mlflow-uri)")
        return
    from study.tracking import StudyTracker, TrackingError  # imports MLflow: ~2-3 s

    try:
        StudyTracker(uri, name).check_reachable()
    except TrackingError as exc:
        raise StudyError(f"{exc} (--mlflow-uri)") from None


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


def _space_yaml(spec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                          sort_keys=False)


def load_meta(study: str | Path) -> dict[str, Any]:
    path = Path(study).expanduser().resolve()
    if not (path / "study.json").exists():
        raise StudyError(f"{path} is not a study directory (no study.json)")
    meta = json.loads((path / "study.json").read_text())
    meta["dir"] = path
    return meta


def launch(opts: StudyOptions) -> dict[str, Any]:
    """Validates, then runs a new study to the end; returns its summary."""
    return run_study(prepare_study(opts), resume=False)


def resume(study: str | Path) -> dict[str, Any]:
    """Continues an interrupted study: Tune's state, the searcher and the Optuna storage."""
    return run_study(load_meta(study)["dir"], resume=True)


def run_study(study_dir: Path, *, resume: bool) -> dict[str, Any]:
    """Runs (or resumes) the study in ``study_dir`` to the end; returns its summary.

    Start-up is ordered for speed: Ray starts first (its processes boot on their own), while
    a thread imports MLflow and opens the store and this thread loads the shared inputs and
    imports Tune; a one-trial study pays ~4 s less than doing these one after the other.
    """
    import ray

    from search_spaces.space import load_space

    meta = load_meta(study_dir)
    opts = StudyOptions(**meta["options"])
    spec = load_space(meta["space_file"])
    base = spec.base_config()
    name = meta["name"]
    started = time.time()
    # Save Tune's experiment state every second (default: every 10 s or more), so that a
    # killed driver loses at most a second of trial bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")

    def open_tracking():
        import ray.tune  # noqa: F401 - imported here, while Ray starts (~2 s)

        from study.tracking import StudyTracker

        _check_tracking(meta["mlflow_uri"], name)
        # the experiment's description above its runs in the MLflow UI (one paragraph: the
        # UI shows the first one folded): what was searched, and where the report is
        space = spec.name or Path(opts.space).stem
        about = " ".join(spec.description.split()).rstrip(".")
        description = (f"Study {name} searches the space {space}"
                       + (f": {about}." if about else ".")
                       + f" Report: {study_dir / 'report.html'} "
                       f"(written by `jepa-study report {study_dir}`).")
        return StudyTracker(meta["mlflow_uri"], name, wal_dir=study_dir / "wal",
                            description=description)

    tracker = _while_ray_starts(opts, open_tracking)
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from study.tracking import MLflowTrialCallback
    from study.trial import (CheckpointGuard, make_trainable, max_concurrent_trials,
                             trial_resources)
    from trainables.cache import load_or_compute
    from trainables.data import load_beir

    try:  # -- shared inputs, computed once per study (the disk cache makes a rerun free)
        data = load_beir(meta["data_dir"])
        features = None
        if base.model.freeze_base or base.train.hard_negatives:
            features = load_or_compute(data, base.model.base_model, base.model.max_seq_length,
                                       as_numpy=True)  # torch-free unless it must encode
    except BaseException:
        ray.shutdown()
        raise
    try:
        builder = TrialConfigBuilder(meta["space_file"], meta["data_dir"])
        shared = {"data": ray.put(data), "features": ray.put(features) if features else None}
        use_gpu = opts.gpus_per_worker > 0
        trainable = make_trainable(
            study_dir=study_dir, num_workers=opts.num_workers, use_gpu=use_gpu,
            gpus_per_worker=opts.gpus_per_worker or 1, cpus_per_worker=opts.cpus_per_worker,
            max_failures=opts.max_failures, execution=opts.execution,
            checkpoint_interval_s=opts.checkpoint_interval_s, config_builder=builder,
            objective_keys=[spec.metric] if isinstance(spec.metric, str) else spec.metric,
            shared=shared)
        resources = trial_resources(opts.num_workers, use_gpu, opts.cpus_per_worker,
                                    opts.gpus_per_worker or 1, opts.execution)
        trainable = tune.with_resources(trainable, resources)
        total = ray.cluster_resources()
        concurrency = opts.max_concurrent_trials or spec.max_concurrent_trials or \
            max_concurrent_trials(total.get("CPU", 1), total.get("GPU", 0),
                                  num_workers=opts.num_workers, use_gpu=use_gpu,
                                  cpus_per_worker=opts.cpus_per_worker,
                                  gpus_per_worker=opts.gpus_per_worker or 1,
                                  execution=opts.execution)
        max_epochs = base.train.total_epochs
        callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), CheckpointGuard(),
                     MLflowTrialCallback(tracker, render_config=builder.yaml,
                                         resolve_params=builder.flat,
                                         stop_reason=StopReasons(str(study_dir), max_epochs))]
        if resume:
            orphans = tracker.mark_orphans_killed()
            if orphans:
                log.warning("runs of trials %s were left RUNNING by a driver that was killed: "
                            "marked KILLED (a trial that resumes reopens its run)", orphans)
        tracker.start_study(
            params={"space": Path(meta["space_file"]).stem, "num_samples": _num_samples(opts, spec),
                    "data": meta["data_dir"], "seed": getattr(spec.searcher_spec, "seed", None),
                    "num_workers": opts.num_workers, "gpus_per_worker": opts.gpus_per_worker,
                    "ray_version": ray.__version__, "optuna_version": _version("optuna"),
                    "mlflow_version": _version("mlflow"), "torch_version": _version("torch"),
                    "python": platform.python_version()},
            tags={"jepa.git_commit": meta["git_commit"], "jepa.study_dir": str(study_dir)},
            space_yaml=Path(meta["space_file"]).read_text())
        ray_dir = study_dir / "ray"
        if resume and tune.Tuner.can_restore(str(ray_dir / name)):
            tuner = tune.Tuner.restore(str(ray_dir / name), trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
            _use_callbacks(tuner, callbacks)
        else:
            tuner = _new_tuner(spec, opts, name, study_dir, trainable, callbacks, concurrency,
                               max_epochs)
        with _TuneInterruptWatch() as watch, _no_tensorboard_logger():
            grid = tuner.fit()
        if watch.interrupted:
            raise KeyboardInterrupt  # Tune caught the SIGINT, stopped and saved its state
        status = "FINISHED"
    except KeyboardInterrupt:
        status, reason = "KILLED", (f"interrupted: continue with `jepa-study resume "
                                    f"{study_dir}`")
        ended = tracker.end_open_trials("KILLED", reason)
        log.warning("study interrupted (runs of trials %s KILLED); continue it with "
                    "`jepa-study resume %s`", ended, study_dir)
        raise
    except BaseException as exc:
        status, reason = "FAILED", f"driver failed: {type(exc).__name__}: {exc}"
        tracker.end_open_trials("KILLED", reason)
        raise
    finally:
        tracker.end_study(locals().get("status", "FAILED"), locals().get("reason"))
        tracker.flush()
        ray.shutdown()
    return summarize(study_dir, grid, spec, time.time() - started)


def _use_callbacks(tuner, callbacks: list) -> None:
    """Makes a restored Tuner report through this driver's callbacks.

    ``Tuner.restore`` brings back the callbacks pickled at launch, each with a tracker of its
    own; this driver's tracker must be the one that writes: one tracker per write-ahead
    file, and the one that knows which trial runs are open when the study is interrupted.
    ``Tuner.restore`` takes no callbacks, hence the private attribute (None with Ray Client).
    """
    internal = getattr(tuner, "_local_tuner", None)
    if internal is not None:
        internal.get_run_config().callbacks = callbacks


@contextlib.contextmanager
def _no_tensorboard_logger():
    """Tune's JSON and CSV trial logs (passed as callbacks), not its TensorBoard one: MLflow
    is the study's tracker, and creating that logger imports tensorboardX (~2 s a study).
    Tune reads the switch inside ``fit``; it is put back after, for other Tune users in
    this process."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class _TuneInterruptWatch:
    """Tells, once ``Tuner.fit`` has returned, whether Tune caught a SIGINT (Ctrl-C, or the
    command line's SIGTERM) and stopped early; ``with _TuneInterruptWatch() as watch: fit()``,
    then ``watch.interrupted``.

    On SIGINT Tune saves its state, stops the running trials (it marks them TERMINATED, like
    finished ones) and returns instead of raising, so the result grid cannot tell. What does
    tell: Tune's handler, installed by ``fit``, puts back the handler it found when it fires,
    and only then (``ray.tune.tune._setup_signal_catching``). A sentinel handler installed
    here is therefore back in place when ``fit`` returns exactly when Tune was interrupted.
    Off the main thread Tune catches no signal, and nothing is installed.
    """

    interrupted = False

    def __enter__(self) -> "_TuneInterruptWatch":
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._sentinel)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            self.interrupted = signal.getsignal(signal.SIGINT) == self._sentinel
            signal.signal(signal.SIGINT, self._previous)

    @staticmethod
    def _sentinel(signum, frame) -> None:  # Ctrl-C outside ``fit``: Python's default
        raise KeyboardInterrupt


def _new_tuner(spec, opts, name, study_dir, trainable, callbacks, concurrency, max_epochs):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    multi = not isinstance(spec.metric, str)
    metric = None if multi else spec.metric
    mode = None if multi else spec.mode
    if spec.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.scheduler.max_t or max_epochs,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    searcher = spec.searcher(storage_url=optuna_url(study_dir), study_name=name)
    stopper = None
    if spec.collapse_guard is not None:
        from study.stoppers import CollapseStopper

        stopper = CollapseStopper(str(study_dir), spec.collapse_guard.metric,
                                  spec.collapse_guard.min_effective_rank)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic table takes chosen columns
    reporter = progress_reporter(spec)
    return tune.Tuner(
        trainable,
        # reuse_actors: a new trial takes over a finished trial's process, with torch and the
        # trainables already imported (~2-3 s per trial on 2 cores); every trial seeds its own
        # RNGs and sets its thread count, so nothing else carries over.
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=metric,
                                    mode=mode, num_samples=_num_samples(opts, spec),
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(study_dir / "ray"), stop=stopper, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            # the newest two: a trial falls back to the older one when the newest is damaged
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_TUNE_CHECKPOINTS),
            verbose=opts.verbose, progress_reporter=reporter),
    )


def progress_reporter(spec):
    """Tune's console table of a study: epoch, dev figures, and the always-set parameters."""
    from ray import tune

    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "dev_ndcg_at_10": "dev nDCG@10",
                        "best_dev_ndcg_at_10": "best dev", "best_epoch": "best ep",
                        "effective_rank": "eff. rank"},
        parameter_columns=always_suggested(spec),
        sort_by_metric=isinstance(spec.metric, str),
        max_report_frequency=15, print_intermediate_tables=True)


def always_suggested(spec) -> dict[str, str]:
    """Table columns: the parameters every trial has (Tune's table fails on an absent key).

    A parameter without ``when`` is suggested in every trial, as is its on/off switch, except
    the switch of the last member of ``at_least_one_on``: it is not suggested (forced on)
    when the other members are off. A ``zero`` parameter's value is absent while it is off.
    """
    from search_spaces.space import SWITCH

    forced = spec.at_least_one_on[-1] if spec.at_least_one_on else None
    columns = {}
    for name, p in spec.parameters.items():
        if p.when:
            continue
        short = name.split(".")[-1]
        if not getattr(p, "zero", False):
            columns[name] = short
        elif name != forced:
            columns[name + SWITCH] = short + " on"
    return columns


def _num_samples(opts: StudyOptions, spec) -> int:
    return opts.num_samples or spec.num_samples


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _init_ray(opts: StudyOptions) -> None:
    """Local Ray by default; ``--address`` joins a cluster and ships this project to it."""
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
    ray.init(address=opts.address, runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=opts.verbose > 1, configure_logging=True,
             logging_level=logging.WARNING)
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)


# -- reading a study ------------------------------------------------------------------------

def summarize(study_dir: Path, grid, spec, wall_s: float) -> dict[str, Any]:
    """Best trial by the study's metric, counts by state, and where to look."""
    meta = load_meta(study_dir)
    metric = spec.metric if isinstance(spec.metric, str) else spec.metric[0]
    mode = spec.mode if isinstance(spec.mode, str) else spec.mode[0]
    rows = []
    for result in grid:
        m = result.metrics or {}
        rows.append({"trial_id": m.get("trial_id"), "error": result.error is not None,
                     metric: m.get(metric), "best_epoch": m.get("best_epoch"),
                     "scored_with": {1.0: "predictor", 0.0: "query"}.get(
                         m.get("best_scored_with_predictor")),
                     "test_ndcg_at_10": m.get("best_test_ndcg_at_10"),
                     "epochs": m.get("epoch"), "end_reason": m.get("end_reason", "")})
    scored = [r for r in rows if isinstance(r[metric], (int, float)) and r[metric] == r[metric]]
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None
    summary = {"study_dir": str(study_dir), "name": meta["name"], "trials": len(rows),
               "errored": sum(r["error"] for r in rows), "wall_s": round(wall_s, 1),
               "metric": metric, "best": best, "mlflow_uri": meta["mlflow_uri"]}
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def load_space_num(meta: dict[str, Any]) -> int:
    from search_spaces.space import load_space

    return load_space(meta["space_file"]).num_samples


def status(study: str | Path) -> dict[str, Any]:
    """Trials done / running / failed, from Tune's state and the Optuna storage."""
    import optuna

    meta = load_meta(study)
    storage = optuna.storages.RDBStorage(optuna_url(meta["dir"]))
    counts: dict[str, int] = {}
    best = None
    try:
        ostudy = optuna.load_study(study_name=meta["name"], storage=storage)
        for t in ostudy.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        complete = [t for t in ostudy.trials if t.state.name == "COMPLETE"]
        if complete and len(ostudy.directions) == 1:
            best = {"value": ostudy.best_value, "params": ostudy.best_params}
    except KeyError:
        pass
    opts = StudyOptions(**meta["options"])
    return {"study_dir": str(meta["dir"]), "name": meta["name"], "optuna_trials": counts,
            "requested": opts.num_samples or load_space_num(meta), "best": best,
            "finished": (meta["dir"] / "summary.json").exists()}
