"""Tune stoppers of a study. Ray-dependent, so kept out of the light ``launcher`` import."""

from __future__ import annotations

from pathlib import Path

from ray.tune import Stopper


class CollapseStopper(Stopper):
    """Tune stopper: ends a trial whose effective rank falls below a threshold.

    The reason is written to ``<study_dir>/stops/<trial_id>.txt`` so that the MLflow
    callback (and a person) can read it after the trial ends, whichever process asks.
    """

    def __init__(self, study_dir: str, metric: str, minimum: float):
        self.study_dir, self.metric, self.minimum = study_dir, metric, minimum

    def __call__(self, trial_id: str, result: dict) -> bool:
        value = result.get(self.metric)
        if value is None or value >= self.minimum:
            return False
        stops = Path(self.study_dir) / "stops"
        stops.mkdir(parents=True, exist_ok=True)
        (stops / f"{trial_id}.txt").write_text(
            f"collapse: {self.metric} {value:.3g} < {self.minimum:g} at epoch "
            f"{result.get('epoch')}")
        return True

    def stop_all(self) -> bool:
        return False
