"""Small study spaces and readers shared by the study, reliability and analysis tests."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import psutil
import yaml
from mlflow.tracking import MlflowClient

from analysis import schema as S


def tiny_space(tmp_path: Path, name: str = "tiny", *, num_samples: int = 4, epochs: int = 2,
               steps: int = 3, scheduler: str = "fifo", extra_base: dict | None = None,
               parameters: dict | None = None, **top: Any) -> Path:
    """A quick-like space that costs a few seconds a trial on cached SciFact features."""
    base = {"train": {"epochs": epochs, "max_steps_per_epoch": steps}}
    for section, values in (extra_base or {}).items():
        base.setdefault(section, {}).update(values)
    space = {
        "name": name, "base_preset": "hybrid", "base": base,
        "metric": "best_dev_ndcg_at_10", "mode": "max", "num_samples": num_samples,
        "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"kind": scheduler},
        "parameters": parameters or {
            "loss.lambda_pred": {"type": "float", "low": 0.1, "high": 2.0, "log": True,
                                 "zero": True},
            "model.predictor.depth": {"type": "int", "low": 1, "high": 3},
            "loss.stopgrad": {"type": "categorical", "choices": [True, False]},
        },
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def write_parent(tracker: Any, params: dict | None = None, tags: dict | None = None,
                 space_yaml: str | None = None) -> str:
    """A study's parent run as ``study.sync.open_study`` writes it (RUNNING), from the
    tracker's blocks, for tests without a study directory."""
    run = tracker.run()
    tracker.fill(run, params, tags or {}, {S.ARTIFACT_SPACE: space_yaml})
    tracker.reopen(run)
    return run.run_id


def ended_trial(trial_id: str, config: dict, epochs: list[dict], status: str,
                reason: str) -> Any:
    """Tune's record of a trial that ended with the MLflow ``status`` (FINISHED or FAILED) and
    stop ``reason``, after one result per epoch (``epochs``: each epoch's metrics)."""
    from study.sync import TrialRecord

    results = [{"epoch": i, **m} for i, m in enumerate(epochs, start=1)]
    if status == S.STATUS_FAILED:
        return TrialRecord(trial_id, trial_id, "ERROR", config, results, reason)
    assert status == S.STATUS_FINISHED, status
    results[-1] = {**results[-1], "end_reason": reason}  # the loop's word for why it ended
    return TrialRecord(trial_id, trial_id, "TERMINATED", config, results)


def child_runs(uri: str, study: str) -> list:
    """Every child (trial) run of a study, any status."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(S.experiment_name(study))
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{S.TAG_ROLE}` = '{S.ROLE_TRIAL}'",
                              max_results=1000)


def parent_runs(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(S.experiment_name(study))
    return client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{S.TAG_ROLE}` = '{S.ROLE_STUDY}'")


def optuna_states(study_dir: Path) -> dict[str, int]:
    """Optuna trial states by count, read straight from the RDB storage."""
    with sqlite3.connect(study_dir / "optuna.db") as db:
        rows = db.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    return {state: n for state, n in rows}


def metric_steps(uri: str, run_id: str, key: str = "dev_ndcg_at_10") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _live(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; its parent has not reaped it yet)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_descendants(pid: int, recursive: bool = True) -> list[psutil.Process]:
    """Live processes below ``pid``: its children, and theirs and so on when ``recursive``."""
    try:
        found = psutil.Process(pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    return [p for p in found if _live(p)]


def still_alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that still live (a reused pid is another process: not counted)."""
    return [p for p in procs if _live(p)]


def live_in_group(pgid: int) -> list[psutil.Process]:
    """Live processes of the process group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _live(proc):
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def wait_for(condition, timeout: float, proc=None, what: str = "condition",
             log: Path | None = None) -> None:
    """Polls ``condition`` (exceptions count as False: files and databases still being
    created) until it holds; fails on timeout, or when the process ``proc`` exits first,
    with the tail of ``log``."""
    import time

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}:\n"
                                 f"{tail()}")
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail()}")
