"""One handle for a study: its options, its space, its directory, and what commands build
from them (``Study.open(path)`` / ``Study.create(options)``, as ``optuna.load_study`` or
``Tuner.restore``). Every command takes a :class:`Study`.

    study.json    the options and where everything is (``Study.open`` reads it)
    space.yaml    the space as searched (warm-start points first), loaded once per process
    optuna.db     Optuna's storage: the search history          } the record
    ray/<name>/   Tune's experiment: trial states and results   }
    trials/<id>/  each trial's loop output (checkpoints, best/, per_query.json)
    stops/<id>.txt  why the collapse guard stopped a trial
    mlflow.db     the embedded MLflow store (unless --mlflow-uri): a view of the record
    summary.json  written when the study ends normally
    driver.lock   locked by the driver while it runs (the study is live)

Importing this module is cheap (no Ray, MLflow, Optuna or pydantic): ``status`` reads
``study.json`` and ``summary.json`` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from analysis import schema as S

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = "driver.lock"
EXECUTIONS = ("auto", "direct", "train")
WARM_START_TOP = 3  #: a study given to ``--warm-start`` contributes its best three trials


class StudyError(RuntimeError):
    """A study that cannot be launched, resumed or read; the message says what to do."""


def option(default: Any, help: str, **cli: Any) -> Any:
    """A command's option: its default (written here only; ``MISSING``: required) and how the
    command line shows it (``help``, and argparse keywords such as ``flag``, ``choices``,
    ``action``)."""
    value = {"default_factory": default} if callable(default) else {"default": default}
    return field(**value, metadata={"help": help, **cli})


@dataclass
class StudyOptions:
    """What ``jepa-study launch`` was asked for: the one definition of each option, its default
    and its check (the command line is built from these fields); saved in ``study.json``."""

    space: str = option("quick", "space file or shipped name (quick, jepa_core, seed_phases)")
    num_samples: int | None = option(None, "trials (default: the space's)")
    data: str | None = option(None, "BEIR directory (default: see README, 'Data')")
    address: str | None = option(None, "Ray cluster: auto or ray://host:10001 (default: local)")
    num_workers: int = option(1, "Train workers per trial (DDP)")
    gpus_per_worker: float = option(0.0, "GPUs of each worker")
    cpus_per_worker: float = option(1.0, "CPUs of each worker")
    max_concurrent_trials: int | None = option(None, "trials at once (default: what fits)")
    execution: str = option("auto", "direct: the loop inside the Tune trial (1 CPU worker); "
                             "train: a TorchTrainer run", choices=EXECUTIONS)
    max_failures: int = option(2, "retries of a failed trial, from its last checkpoint")
    checkpoint_interval_s: float = option(
        10.0, "least seconds between two checkpoints besides the first and last epoch's (0: "
        "every epoch); a trial that fails redoes at most that much",
        flag="--checkpoint-interval", metavar="SECONDS")
    mlflow_uri: str | None = option(None, "tracking URI (default: sqlite store in the study)")
    name: str | None = option(None, "study name (default: the space's)")
    storage: str = option("studies", "parent directory of studies")
    warm_start: list[str] = option(
        list, "evaluate these first: a study directory (its top 3 trials), an exported YAML "
        "file or a directory of them; repeatable", action="append", metavar="STUDY_OR_CONFIGS")
    verbose: int = 1

    def __post_init__(self) -> None:
        checks = {"--num-samples must be at least 1":
                      self.num_samples is not None and self.num_samples < 1,
                  "--num-workers must be at least 1": self.num_workers < 1,
                  "--gpus-per-worker must be >= 0 and --cpus-per-worker > 0":
                      self.gpus_per_worker < 0 or self.cpus_per_worker <= 0,
                  f"--execution must be one of {', '.join(EXECUTIONS)}":
                      self.execution not in EXECUTIONS,
                  "--execution direct runs the loop in the trial itself: --num-workers must "
                  "be 1": self.execution == "direct" and self.num_workers != 1,
                  "--max-failures must be >= 0": self.max_failures < 0,
                  "--checkpoint-interval must be >= 0 seconds": not self.checkpoint_interval_s >= 0}
        for message, wrong in checks.items():
            if wrong:
                raise StudyError(message)

    @property
    def resolved_execution(self) -> str:
        """``direct`` for one CPU worker, else ``train``, unless asked for by name."""
        if self.execution != "auto":
            return self.execution
        return "direct" if self.num_workers == 1 and not self.gpus_per_worker else "train"

    def trial_spec(self, study_dir: str | Path, **extra: Any):
        """How each trial of the study in ``study_dir`` runs (``study.trial.TrialSpec``), built
        from these options by keyword; ``extra``: its other fields (``objective_keys``)."""
        from study.trial import TrialSpec

        return TrialSpec(study_dir=str(Path(study_dir).expanduser().resolve()),
                         execution=self.resolved_execution, num_workers=self.num_workers,
                         cpus_per_worker=self.cpus_per_worker,
                         gpus_per_worker=self.gpus_per_worker, max_failures=self.max_failures,
                         checkpoint_interval_s=self.checkpoint_interval_s, **extra)


class Study:
    """A study directory and what every command needs of it, each built once per process.

    Attributes:
        dir: The study directory (resolved). ``name``: the study's (Tune's experiment, the
            Optuna study and the MLflow experiment are named after it).
        options: The launch options. ``mlflow_uri``, ``data_dir``, ``space_file``: where the
            view, the data and the space are. ``git_commit``: the code that launched it.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.dir, self.meta = path, meta
        self.name: str = meta["name"]
        self.options = StudyOptions(**meta.get("options", {}))
        self.mlflow_uri: str = meta["mlflow_uri"]
        self.data_dir = meta.get("data_dir")
        self.space_file = Path(meta.get("space_file") or path / "space.yaml")
        self.git_commit: str = meta.get("git_commit", "unknown")
        self._tracker = None

    @classmethod
    def open(cls, path: str | Path) -> "Study":
        """The study in ``path`` (nothing is loaded until asked for)."""
        path = Path(path).expanduser().resolve()
        if not (path / "study.json").exists():
            raise StudyError(f"{path} is not a study directory (no study.json)")
        return cls(path, json.loads((path / "study.json").read_text()))

    @classmethod
    def create(cls, options: StudyOptions) -> "Study":
        """Checks the space, the data and the tracking backend, then writes the study directory.

        Nothing here starts Ray: a bad space file, a missing dataset or an unreachable MLflow
        server fails in seconds with a message that names the culprit, and leaves nothing
        behind. The space is loaded and validated once, here, and kept by the handle.
        """
        from search_spaces.space import load_space
        from trainables.data import load_beir, resolve_data_dir, split_for

        space = load_space(options.space)
        base = space.base_config()
        data_dir = resolve_data_dir(options.data or base.data.path)
        data = load_beir(data_dir)
        split_for(data, base.data)  # a degenerate split fails now, naming the field
        name = options.name or space.name
        path = Path(options.storage).expanduser().resolve() / name
        if (path / "study.json").exists():
            raise StudyError(f"study {path} exists: continue it with `jepa-study resume "
                             f"{path}` or pick another --name")
        meta = {"name": name, "options": asdict(options), "space_file": str(path / "space.yaml"),
                "data_dir": str(data_dir), "created": time.time(), "git_commit": _git_commit(),
                "mlflow_uri": options.mlflow_uri or f"sqlite:///{path / 'mlflow.db'}",
                "num_samples": options.num_samples or space.num_samples}
        study, created = cls(path, meta), not path.exists()
        study.space, study.data = space, data
        path.mkdir(parents=True, exist_ok=True)
        try:
            db = S.sqlite_path(study.mlflow_uri)  # a local store is made while Ray starts
            if db is not None and not os.access(Path(db).parent, os.W_OK):
                raise StudyError(f"MLflow store {study.mlflow_uri}: {Path(db).parent} is not a "
                                 "writable directory (--mlflow-uri)")
            if db is None:
                study.tracker()
            first = _warm_start(options.warm_start, path / "warm_start")
            study.space = space.with_first(first) if first else space
        except BaseException:
            if created:  # nothing was started: leave nothing behind
                shutil.rmtree(path, ignore_errors=True)
            raise
        study.space_file.write_text(study.space.to_yaml())
        (path / "study.json").write_text(json.dumps(meta, indent=1))
        return study

    # -- where things are ----------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """The trials asked for (kept in ``study.json``: ``status`` loads no space)."""
        return self.meta.get("num_samples") or self.options.num_samples or self.space.num_samples

    @property
    def experiment_dir(self) -> Path:
        """Tune's experiment directory."""
        return self.dir / "ray" / self.name

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.dir / S.OPTUNA_DB}"

    def trial_dir(self, trial_id: str) -> Path:
        """Where a trial's loop writes (checkpoints, ``best/``, ``per_query.json``)."""
        from study.trial import trial_dir

        return trial_dir(self.dir, trial_id)

    # -- built once -------------------------------------------------------------------------------

    @cached_property
    def space(self):
        """The study's space (``space.yaml``), loaded and validated on first use only."""
        from search_spaces.space import load_space

        return load_space(self.space_file)

    @cached_property
    def data(self):
        from trainables.data import load_beir

        return load_beir(self.data_dir)

    @cached_property
    def features(self):
        """The frozen base's features of the data (numpy: the driver needs no torch), from the
        on-disk cache; None when no trial needs them."""
        from trainables.cache import load_or_compute

        base = self.space.base_config()
        if not (base.model.freeze_base or base.train.hard_negatives):
            return None
        tables = load_or_compute(self.data, base.model.base_model, base.model.max_seq_length,
                                 as_numpy=True)
        if base.data.pairs != "qrels":  # the pseudo-queries' features, once, before trials
            from trainables.loop import with_corpus_pairs

            for value in self._pair_settings(base):
                with_corpus_pairs(value, self.data, {"train": {}, "dev": {}}, tables)
        return tables

    def _pair_settings(self, base):
        """The base config with each searched categorical value of ``data.corpus_pairs``
        (each is an encoding of its own in the feature cache)."""
        yield base
        for name, spec in self.space.parameters.items():
            if name.startswith("data.corpus_pairs.") and spec.type == "categorical":
                for choice in spec.choices:
                    yield base.with_overrides({name.split("@")[0]: choice}, "warm-up")

    @property
    def objectives(self) -> list[str]:
        metric = self.space.metric
        return [metric] if isinstance(metric, str) else list(metric)

    @property
    def metric(self) -> str:
        """The metric trials are ranked by (the first objective)."""
        return self.objectives[0]

    @property
    def mode(self) -> str:
        mode = self.space.mode
        return mode if isinstance(mode, str) else mode[0]

    @property
    def max_epochs(self) -> int:
        """The space's epoch budget (a trial that ended before it was stopped early)."""
        return self.space.base_config().train.total_epochs

    @cached_property
    def trial_config(self):
        """Tune config -> the trial's run config, built and validated once per trial (the
        space's ``trial_config`` with the study's data). It pickles with the space, not the
        study: Tune ships it to every trial."""
        return partial(self.space.trial_config, data_path=self.data_dir)

    def trial_spec(self):
        """How each trial runs (``study.trial.TrialSpec``), from the options."""
        return self.options.trial_spec(self.dir, objective_keys=tuple(self.objectives))

    def tracker(self):
        """The study's MLflow tracker (``study.tracking.StudyTracker``), opened and checked once
        (a :class:`StudyError` naming the backend when it cannot be used)."""
        if self._tracker is None:
            from study.tracking import StudyTracker, TrackingError

            tracker = StudyTracker(self.mlflow_uri, self.name, description=self.describe())
            try:
                tracker.check_reachable()
            except TrackingError as exc:
                raise StudyError(f"{exc} (--mlflow-uri)") from None
            self._tracker = tracker
        return self._tracker

    def describe(self) -> str:
        """The study's description in the MLflow UI: what was searched and where the report is
        (one paragraph: the UI folds the others away)."""
        about = " ".join(self.space.description.split()).rstrip(".")
        return (f"Study {self.name} searches the space {self.space.name}"
                + (f": {about}." if about else ".") + f" Report: {self.dir / 'report.html'} "
                f"(written by `jepa-study report {self.dir}`).")

    # -- the driver ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def driver_lock(self) -> Iterator[None]:
        """Held by the driver while it runs the study (the kernel releases it however the
        process ends); a second driver of the study is refused."""
        with open(self.dir / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StudyError(f"another driver is running the study {self.dir}") from None
            yield

    @property
    def live(self) -> bool:
        """Whether a driver is running the study now."""
        if not (self.dir / LOCK_FILE).exists():
            return False
        with contextlib.suppress(StudyError), self.driver_lock():
            return False
        return True

    # -- what the record says ------------------------------------------------------------------

    def ranked(self, trials: Iterable[Any]) -> list[Any]:
        """Trials (``trial_id``, ``last_result``) with a finite value of the study's metric,
        best first."""
        value = lambda t: (t.last_result or {}).get(self.metric)  # noqa: E731
        scored = [t for t in trials if isinstance(value(t), (int, float))
                  and math.isfinite(value(t))]
        return sorted(scored, key=value, reverse=self.mode == "max")

    def optuna_counts(self) -> tuple[dict[str, int], dict[str, Any] | None]:
        """Optuna's trials by state (``COMPLETE``, ``FAIL``, ...) and its best (one objective)."""
        import optuna

        try:
            study = optuna.load_study(study_name=self.name, storage=self.optuna_url)
        except KeyError:  # the search has not started
            return {}, None
        counts: dict[str, int] = {}
        for t in study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        best = {"value": study.best_value, "params": study.best_params} \
            if counts.get("COMPLETE") and len(study.directions) == 1 else None
        return counts, best

    def summary(self, trials: Iterable[Any], wall_s: float | None = None) -> dict[str, Any]:
        """Best trial by the study's metric, counts, and the test figures the study scored
        (reported only), from Tune's record of each trial."""
        trials, best = list(trials), None
        for trial in self.ranked(trials)[:1]:
            m = trial.last_result
            best = {"trial_id": trial.trial_id, "error": trial.status == "ERROR",
                    self.metric: m.get(self.metric),
                    S.OBJECTIVE: m.get(S.OBJECTIVE), "best_epoch": m.get(S.BEST_EPOCH),
                    "scored_with": {1.0: "predictor", 0.0: "query"}.get(
                        m.get(S.BEST_SCORED_WITH_PREDICTOR)),
                    **{f"dev_{s}_ndcg_at_10": m.get(f"best_{S.subset_key('dev', s)}")
                       for s in S.SUBSETS},
                    "epochs": m.get("epoch"), "end_reason": m.get("end_reason", ""),
                    "test (reported only)": _scored(self.trial_dir(trial.trial_id)
                                                    / S.ARTIFACT_PER_QUERY, "metrics")}
        counts, optuna_best = self.optuna_counts()
        summary = {"study_dir": str(self.dir), "name": self.name, "trials": len(trials),
                   "errored": sum(t.status == "ERROR" for t in trials), "metric": self.metric,
                   "best": best, "references (test, reported only)": _scored(
                       self.dir / S.ARTIFACT_REFERENCES, "rows"),
                   "optuna_trials": counts, "optuna_best": optuna_best,
                   "mlflow_uri": self.mlflow_uri}
        if wall_s is not None:
            summary["wall_s"] = round(wall_s, 1)
        return summary

    def status(self) -> dict[str, Any]:
        """Trials done / running / failed and the best so far: from ``summary.json`` once the
        study has ended (Optuna's storage no longer changes), else from Optuna's storage."""
        path = self.dir / "summary.json"
        ended = json.loads(path.read_text()) if path.exists() else {}
        counts, best = ((ended["optuna_trials"], ended["optuna_best"])
                        if "optuna_trials" in ended else self.optuna_counts())
        return {"study_dir": str(self.dir), "name": self.name, "optuna_trials": counts,
                "requested": self.num_samples, "best": best,
                "finished": path.exists(), "live": self.live}


def _scored(path: Path, key: str) -> dict[str, Any] | None:
    """The all/seen/unseen test nDCG@10 and counts in a scoring file (``per_query.json``'s
    ``metrics``, ``references.json``'s ``rows``), or None where it was not scored."""
    if not path.exists():
        return None
    keep = ["test_ndcg_at_10", *(S.subset_key("test", s) for s in S.SUBSETS),
            *(S.count_key("test", s) for s in S.SUBSETS)]
    pick = lambda figures: {k: figures[k] for k in keep if k in figures}  # noqa: E731
    found = json.loads(path.read_text())[key]
    return pick(found) if key == "metrics" else {row: pick(f) for row, f in found.items()}


def _warm_start(sources: list[str], scratch: Path) -> list[dict[str, Any]]:
    """Run-config dicts to evaluate first: the best trials of study directories, or exported
    YAML files / directories of them. ``analysis.export`` (~2 s of MLflow and matplotlib
    before Ray starts) is imported only when there are some."""
    if not sources:
        return []
    from analysis.export import export_configs, load_warm_start

    configs = []
    for source in sources:
        path = Path(source).expanduser()
        if (path / "study.json").exists():
            other = Study.open(path)
            path = export_configs(other.mlflow_uri, other.name, scratch / path.name,
                                  top=WARM_START_TOP)
        elif not path.exists():
            raise StudyError(f"--warm-start {source}: no such study, file or directory")
        configs += load_warm_start(path)
    return [c.to_dict() for c in configs]


def _git_commit() -> str:
    """The commit of the code that runs the study."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, text=True,
                              capture_output=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
