"""A study's directory, which every command shares: its layout, metadata and summary.

    study.json    the launch options and where everything is (what ``resume`` rebuilds from)
    space.yaml    the space as given (with warm-start points, if any)
    optuna.db     Optuna's storage: the search history          } the record
    ray/<name>/   Tune's experiment: trial states and results   }
    trials/<id>/  each trial's loop output (checkpoints, metrics.json, per_query.json)
    stops/<id>.txt  why the collapse guard stopped a trial
    mlflow.db     the embedded MLflow store (unless --mlflow-uri): a view of the record
    summary.json  written when the study ends normally
    driver.lock   locked by the driver while it runs (the study is live)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from analysis import schema as S

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = "driver.lock"


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


def default_mlflow_uri(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / 'mlflow.db').resolve()}"


def optuna_url(study_dir: Path) -> str:
    return f"sqlite:///{(Path(study_dir) / S.OPTUNA_DB).resolve()}"


def experiment_dir(meta: dict[str, Any]) -> Path:
    """Tune's experiment directory of the study."""
    return meta["dir"] / "ray" / meta["name"]


def trial_output_dir(study_dir: Path, trial_id: str) -> Path:
    """Where a trial's loop writes (checkpoints, ``metrics.json``, ``per_query.json``)."""
    return Path(study_dir) / "trials" / trial_id


def load_meta(study: str | Path) -> dict[str, Any]:
    """``study.json`` with the resolved directory under ``dir``."""
    path = Path(study).expanduser().resolve()
    if not (path / "study.json").exists():
        raise StudyError(f"{path} is not a study directory (no study.json)")
    meta = json.loads((path / "study.json").read_text())
    meta["dir"] = path
    return meta


def git_commit() -> str:
    """The commit of the code that runs the study."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, text=True,
                              capture_output=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(meta: dict[str, Any], spec: Any) -> str:
    """The study's description in the MLflow UI: what was searched and where the report is (one
    paragraph: the UI folds the others away)."""
    about = " ".join(spec.description.split()).rstrip(".")
    return (f"Study {meta['name']} searches the space {spec.name}" + (f": {about}." if about else ".")
            + f" Report: {meta['dir'] / 'report.html'} "
            f"(written by `jepa-study report {meta['dir']}`).")


@contextlib.contextmanager
def driver_lock(study_dir: Path) -> Iterator[None]:
    """Held by the driver while it runs the study (the kernel releases it however the process
    ends); a second driver of the study is refused."""
    with open(Path(study_dir) / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(f"another driver is running the study {study_dir}") from None
        yield


def is_live(study_dir: Path) -> bool:
    """Whether a driver is running the study now."""
    path = Path(study_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def summarize(meta: dict[str, Any], trials: Iterable[Any], spec: Any,
              wall_s: float | None = None) -> dict[str, Any]:
    """Best trial by the study's metric and counts, from Tune's record of each trial (objects
    with ``trial_id``, ``status`` and ``last_result``)."""
    metric = spec.metric if isinstance(spec.metric, str) else spec.metric[0]
    mode = spec.mode if isinstance(spec.mode, str) else spec.mode[0]
    rows = []
    for trial in trials:
        m = trial.last_result or {}
        rows.append({"trial_id": trial.trial_id, "error": trial.status == "ERROR",
                     metric: m.get(metric), S.OBJECTIVE: m.get(S.OBJECTIVE),
                     "best_epoch": m.get(S.BEST_EPOCH),
                     "scored_with": {1.0: "predictor", 0.0: "query"}.get(
                         m.get(S.BEST_SCORED_WITH_PREDICTOR)),
                     **{f"dev_{s}_ndcg_at_10": m.get(f"best_{S.subset_key('dev', s)}")
                        for s in S.SUBSETS},
                     "epochs": m.get("epoch"), "end_reason": m.get("end_reason", "")})
    scored = [r for r in rows if isinstance(r[metric], (int, float)) and math.isfinite(r[metric])]
    best = (max if mode == "max" else min)(scored, key=lambda r: r[metric]) if scored else None
    if best is not None:  # test: scored by the study from the trial's kept weights, if it was
        best["test (reported only)"] = _scored(trial_output_dir(meta["dir"], best["trial_id"])
                                               / S.ARTIFACT_PER_QUERY, "metrics")
    summary = {"study_dir": str(meta["dir"]), "name": meta["name"], "trials": len(rows),
               "errored": sum(r["error"] for r in rows), "metric": metric, "best": best,
               "references (test, reported only)": _scored(
                   Path(meta["dir"]) / S.ARTIFACT_REFERENCES, "rows"),
               "mlflow_uri": meta["mlflow_uri"]}
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 1)
    return summary


def _scored(path: Path, key: str) -> dict[str, Any] | None:
    """The all/seen/unseen test nDCG@10 and counts in a scoring file (``per_query.json``'s
    ``metrics``, ``references.json``'s ``rows``), or None where it was not scored."""
    if not path.exists():
        return None
    found = json.loads(path.read_text())[key]
    keep = [S.subset_key("test", s) for s in S.SUBSETS] + [S.count_key("test", s)
                                                           for s in S.SUBSETS]

    def pick(figures: dict[str, Any]) -> dict[str, Any]:
        return {k: figures[k] for k in ["test_ndcg_at_10", *keep] if k in figures}

    return pick(found) if key == "metrics" else {row: pick(f) for row, f in found.items()}


def write_summary(summary: dict[str, Any]) -> dict[str, Any]:
    (Path(summary["study_dir"]) / "summary.json").write_text(
        json.dumps(summary, indent=1, default=str))
    return summary


def optuna_counts(meta: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Optuna's trials by state (``COMPLETE``, ``FAIL``, ...) and its best (one objective)."""
    import optuna

    try:
        study = optuna.load_study(study_name=meta["name"], storage=optuna_url(meta["dir"]))
    except KeyError:  # the search has not started
        return {}, None
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    best = {"value": study.best_value, "params": study.best_params} \
        if counts.get("COMPLETE") and len(study.directions) == 1 else None
    return counts, best


def status(study: str | Path) -> dict[str, Any]:
    """Trials done / running / failed and the best so far, from the Optuna storage."""
    from search_spaces.space import load_space

    meta = load_meta(study)
    counts, best = optuna_counts(meta)
    return {"study_dir": str(meta["dir"]), "name": meta["name"], "optuna_trials": counts,
            "requested": meta["options"]["num_samples"]
            or load_space(meta["space_file"]).num_samples,
            "best": best, "finished": (meta["dir"] / "summary.json").exists(),
            "live": is_live(meta["dir"])}
