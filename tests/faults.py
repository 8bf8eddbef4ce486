"""Fault injection for the reliability tests: ``trainables.loop.train`` with a planned failure.

Build the trial spec with ``loop="faults:train_failing_once"``
(``StudyOptions(...).trial_spec(study_dir, loop=...)``), pass it to
``study.trial.make_trainable`` and put the fault in the run config's ``provenance["fault"]``
(informational, never read by training):

``none``
    the real loop, untouched (the reference run).
``raise@K``
    epoch K is trained and its checkpoint written, then the loop raises ``InjectedFault``
    (a ``RuntimeError``) *before* that epoch is reported (once: a marker file remembers it),
    as in Ray's own ``test_tuner_restore.py``. The retry must resume from epoch K-1's
    reported checkpoint.
``exit@K``
    as ``raise@K`` but the trial's process dies (``os._exit``): a killed worker.
``corrupt@K`` / ``delete@K``
    as ``raise@K``, but first the newest *reported* checkpoint (epoch K-1), both Tune's copy
    and the loop's own, is overwritten with garbage / deleted: the retry must resume from
    the newest valid one (epoch K-2), never from scratch; with K = 2 there is none and the
    retry must fail.
``always@K``
    raises at epoch K on every attempt: a trial that crashes for good.

The markers and a log of every attempt live in ``<study_dir>/faults/`` (the trial's loop
writes to ``<study_dir>/trials/<trial_id>/``): ``<trial_id>.starts`` gets one line per
attempt that reached its first epoch, the epoch it trained first (``1`` = from scratch).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

# TrainingDiverged and load_checkpoint are looked up in the loop's module by study.trial
# (divergence, and which checkpoint is valid to resume from): re-exported here.
from trainables.loop import TrainingDiverged, load_checkpoint, train  # noqa: F401

GARBAGE = b"not a checkpoint: overwritten by tests/faults.py"


class InjectedFault(RuntimeError):
    """The failure this module injected on purpose."""


def parse(fault: str) -> tuple[str, int]:
    action, _, epoch = fault.partition("@")
    if action == "none":
        return action, 0
    if action not in ("raise", "exit", "corrupt", "delete", "always") or not epoch.isdigit():
        raise ValueError(f"unknown fault {fault!r}")
    return action, int(epoch)


def fault_dir(out_dir: Path) -> Path:
    """``<study_dir>/faults`` for a trial whose loop writes to ``<study_dir>/trials/<id>``."""
    return Path(out_dir).resolve().parents[1] / "faults"


def attempts(study_dir: Path, trial_id: str) -> list[int]:
    """The first epoch trained by each attempt of a trial (1 means it started afresh)."""
    log = Path(study_dir) / "faults" / f"{trial_id}.starts"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def train_failing_once(cfg, *, out_dir: Path, callback: Callable | None = None,
                       resume_from: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """``trainables.loop.train`` with the fault named in ``cfg.provenance["fault"]``."""
    action, at = parse(cfg.provenance.get("fault", "none"))
    out_dir = Path(out_dir)
    faults = fault_dir(out_dir)
    faults.mkdir(parents=True, exist_ok=True)
    trial_id = out_dir.name
    marker = faults / f"{trial_id}.{action}"
    first: list[int] = []

    def wrapped(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        epoch = int(metrics["epoch"])
        if not first:
            first.append(epoch)
            with open(faults / f"{trial_id}.starts", "a") as f:
                f.write(f"{epoch}\n")
        if epoch == at and (action == "always" or not marker.exists()):
            marker.touch()
            if action in ("corrupt", "delete"):
                _break_latest_reported(out_dir, epoch - 1, action)
            if action == "exit":
                os._exit(17)  # noqa: SLF001 - a worker that dies without a word
            raise InjectedFault(f"injected {action} at epoch {epoch}")
        if callback is not None:
            callback(metrics, checkpoint_dir)

    return train(cfg, out_dir=out_dir, callback=wrapped, resume_from=resume_from, **kwargs)


def _break_latest_reported(out_dir: Path, epoch: int, action: str) -> None:
    """Corrupts or deletes epoch ``epoch``'s checkpoint: Tune's copy, the only one once
    reported (the loop's own was deleted)."""
    import ray.tune

    assert not (out_dir / "checkpoints" / f"epoch_{epoch:04d}").exists()
    # Tune's copies live in the trial's storage directory (not its local trial dir)
    storage = Path(ray.tune.get_context().get_storage().trial_fs_path)
    tune_copies = sorted(storage.glob("checkpoint_*"))
    assert tune_copies, "no reported checkpoint to break"
    victim = tune_copies[-1]
    if action == "delete":
        shutil.rmtree(victim, ignore_errors=True)
    else:
        (victim / "state.pt").write_bytes(GARBAGE)
    (Path(fault_dir(out_dir)) / f"{out_dir.name}.broken").write_text(f"{victim.name}\n")
