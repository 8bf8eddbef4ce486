"""One study trial as a Ray Tune function trainable, run in-process or as a Ray Train run.

Ray 2.60 runs Ray Train V2, where a ``TorchTrainer`` is not a Tune trainable, so a trial is a
Tune *function* trainable that either runs the training loop in its own actor (``direct``: one
CPU worker, no Train controller to start) or drives a ``TorchTrainer`` run whose workers report
through ``TuneReportCallback`` (``train``: several workers, or GPUs). The Train run is named
after the trial, so that a retried or restored trial finds its checkpoints again.

Either way the trial builds its run config once, from the searcher's suggestion, and hands it
to the loop; it reports one result per epoch and resumes from the checkpoint it last
*reported*; the loop's own copy of a checkpoint is deleted once Tune or Train stored theirs.
A diverged trial reports NaN with its ``stop_reason``, leaves a ``DIVERGED.json`` marker and
errors (Optuna records FAIL; a retry stops at the marker). The two Tune callbacks here free
what a trial Tune ended early still held. ``docs/reliability.md`` gives each guarantee and
its test.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ray.tune import Callback

STOP_REASON = "stop_reason"
TRIAL_GROUP, TRAIN_GROUP = "trial_placement_group", "train_placement_group"
DIVERGED_MARKER = "DIVERGED.json"
log = logging.getLogger(__name__)
# The Train driver only launches and watches the workers, which reserve their own resources
# in their own placement group. A whole CPU for it would deadlock small machines (two drivers
# holding both CPUs of a 2-core node, each waiting for a CPU for its one worker) and even a
# fraction of one costs a whole trial where the workers fill the node exactly (2 x 1.01 > 2).
# Tune refuses an all-zero request, so the driver reserves a token of (logical) memory only.
DRIVER_MEMORY = 256 * 2**20

Report = Callable[[dict[str, Any], "Path | None"], None]


def trial_dir(study_dir: str | Path, trial_id: str) -> Path:
    """Where a trial's loop writes (checkpoints, ``best/``, ``per_query.json``)."""
    return Path(study_dir) / "trials" / trial_id


@dataclass(frozen=True)
class TrialSpec:
    """How every trial of a study runs, besides its run config; plain data that pickles.
    ``StudyOptions.trial_spec`` builds it from the launch options (their defaults apply).

    Attributes:
        study_dir: Trials write under ``trials/<trial_id>``, Train runs under ``train/``
            (absolute: Tune changes a trial's working directory).
        execution: ``direct`` (the loop in the trial's actor) or ``train`` (a TorchTrainer).
        num_workers, cpus_per_worker, gpus_per_worker: The training's scale (GPUs if > 0).
        max_failures: Worker-group restarts per Train run (``train`` only; Tune's retries
            are ``tune.FailureConfig``'s).
        loop: ``"module:function"`` of the training loop (``trainables.loop.train``'s
            signature), imported inside the worker.
        objective_keys: Metrics set to NaN in a diverged trial's last report (so is every
            float of the epoch before), so that Tune's strict metric check accepts it.
        keep_checkpoints: Checkpoints a Train run keeps in storage (None: all).
        checkpoint_interval_s: Least seconds between two reported checkpoints besides the
            first and last epoch's (0: every epoch).
    """

    study_dir: str
    execution: str
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    max_failures: int
    checkpoint_interval_s: float
    loop: str = "trainables.loop:train"
    objective_keys: tuple[str, ...] = ("dev_ndcg_at_10",)
    keep_checkpoints: int | None = 2

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def resources(self) -> dict[str, float]:
        """What the Tune trial itself reserves (``tune.with_resources``): in ``direct`` mode
        the worker's CPUs and GPU; in ``train`` mode :data:`DRIVER_MEMORY` of logical memory
        only, the workers reserving theirs in their own placement group when the run starts."""
        if self.execution == "direct":
            return {"cpu": float(self.cpus_per_worker), "gpu": float(self.gpus_per_worker)}
        return {"cpu": 0.0, "gpu": 0.0, "memory": float(DRIVER_MEMORY)}

    def max_concurrent(self, total_cpus: float, total_gpus: float = 0) -> int:
        """How many trials fit at once, workers included (``max_concurrent_trials``), so that
        Train drivers do not pile up waiting for workers. Raises when not even one fits: its
        Train run would wait for its workers forever."""
        own = self.resources()
        cpus, gpus = own["cpu"], own["gpu"]
        if self.execution == "train":
            cpus += self.num_workers * self.cpus_per_worker
            gpus += self.num_workers * self.gpus_per_worker
        fits = [math.floor(total_cpus / cpus + 1e-9)] if cpus else []
        if gpus:
            fits.append(math.floor(total_gpus / gpus + 1e-9))
        n = min(fits) if fits else 1
        if n < 1:
            raise ValueError(f"one trial needs {cpus:g} CPU and {gpus:g} GPU but the cluster has "
                             f"{total_cpus:g} CPU and {total_gpus:g} GPU: no trial could start")
        return n


class CheckpointGuard(Callback):
    """Tune callback that keeps a study's checkpoints resumable and stored once.

    - Tune refuses to restore a trial (retry or resumed study) from a checkpoint directory
      that no longer exists ("Could not recover from checkpoint as it does not exist on
      storage anymore") and the trial errors for good. Just before Tune restores a trial, this
      recreates such a directory empty, so that the trial's own fallback
      (:func:`_newest_valid`) resumes from the newest valid older checkpoint, or fails saying
      there is none.
    - A trial deletes its loop's copy of a checkpoint once it is reported, but a trial that
      Tune ends inside the report (an ASHA or ``stop`` decision) never gets there. When a
      trial ends, this deletes the loop copies left under ``trials/<trial_id>/checkpoints``
      (``study_dir`` given, and on the driver's filesystem); Tune's and Train's stay. The
      workers of a Train-mode trial Tune ended live on until their group is removed
      (:class:`ReleaseTrainGroups`, listed before this callback) and can write one more copy
      after the trial ended: when the study ends, every ended trial's loop copies are
      deleted again, after the last groups are gone (a trial an interrupted study will
      resume keeps its own).
    """

    def __init__(self, study_dir: str | Path | None = None) -> None:
        self.study_dir = None if study_dir is None else str(Path(study_dir).resolve())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        path = _local_path(trial.checkpoint) if trial.checkpoint is not None else None
        if path is not None and not path.exists():
            log.warning("trial %s: its latest checkpoint %s is gone; it resumes from the newest "
                        "valid older one", trial.trial_id, path)
            path.mkdir(parents=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.study_dir is not None:
            shutil.rmtree(trial_dir(self.study_dir, trial.trial_id) / "checkpoints",
                          ignore_errors=True)

    on_trial_error = on_trial_complete

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self.on_trial_complete(0, trials, trial)


class ReleaseTrainGroups(Callback):
    """Tune callback: removes the worker placement group of a Train-mode trial Tune ended.

    Tune ends a trial by stopping its actor, which takes the Train controller and workers
    down, but the group the controller reserved stays, holding its CPUs and GPUs until the
    driver exits; the next Train runs wait for them forever (see the module docstring). The
    group is removed once the trial's own placement group is gone (Tune removes it with the
    actor): removed while the controller lives, the controller would reserve a new one.
    A run that ended by itself has already removed its group: nothing is left to do.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[str, str]] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get(TRAIN_GROUP):
            self.pending[trial.trial_id] = (result.get(TRIAL_GROUP) or "", result[TRAIN_GROUP])

    on_trial_error = on_trial_complete

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        for trial_id, (trial_group, train_group) in list(self.pending.items()):
            if not trial_group or _group_state(trial_group) in ("REMOVED", None):
                _remove_group(train_group)
                del self.pending[trial_id]

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for _, train_group in self.pending.values():
            _remove_group(train_group)
        self.pending.clear()


def _current_group() -> str:
    """The hex id of the placement group this task or actor runs in, or ``""``."""
    import ray.util

    group = ray.util.get_current_placement_group()
    return group.id.hex() if group is not None else ""


def _group(hex_id: str) -> Any:
    import ray
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(ray.PlacementGroupID.from_hex(hex_id))


def _group_state(hex_id: str) -> str | None:
    import ray.util

    return ray.util.placement_group_table(_group(hex_id)).get("state")


def _remove_group(hex_id: str) -> None:
    import ray.util

    if _group_state(hex_id) not in ("REMOVED", None):
        log.info("removing placement group %s of a Train run Tune ended", hex_id)
        ray.util.remove_placement_group(_group(hex_id))


# -- the trainable -------------------------------------------------------------------------

def make_trainable(spec: TrialSpec, build: Callable[[dict], Any],
                   shared: dict[str, Any] | None = None) -> Callable[[dict], None]:
    """The Tune function trainable ``(config) -> None`` of a study's trials.

    Args:
        spec: How each trial runs.
        build: The Tune config (the searcher's suggestion) -> the trial's ``RunConfig``,
            called once per trial; the config it returns is the one the loop trains with.
        shared: Extra keyword arguments of the loop shared by all trials (``data``,
            ``features``): ``ray.put`` them once and pass the ObjectRefs, which each trial
            (or Train worker) resolves instead of loading its own copy.
    """

    def trainable(config: dict) -> None:
        entered = time.time()
        run = _run_direct if spec.execution == "direct" else _run_train
        run(spec, build(dict(config)), entered, shared or {})

    trainable.__name__ = trainable.__qualname__ = f"jepa_trial_{spec.execution}"
    return trainable


def _run_direct(spec: TrialSpec, cfg: Any, entered: float, shared: dict[str, Any]) -> None:
    """The loop in this process; Tune checkpoints are the loop's own checkpoint dirs."""
    import ray.tune

    out_dir = trial_dir(spec.study_dir, ray.tune.get_context().get_trial_id())
    _stop_if_diverged_before(out_dir)

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        # ray.tune.report only takes ray.tune.Checkpoint, not ray.train.Checkpoint.
        ray.tune.report(metrics, checkpoint=None if checkpoint_dir is None else
                        ray.tune.Checkpoint.from_directory(str(checkpoint_dir)))

    with _resume_dir(ray.tune.get_checkpoint(), out_dir, spec.loop) as resume_from:
        _stop_if_diverged_before(resume_from)
        stopped = _run_loop(spec, cfg, out_dir=out_dir, resume_from=resume_from, report=report,
                            entered=entered, shared=shared)
    if stopped is not None:
        # Reported with a checkpoint holding only the marker: Tune's retry restores a trial's
        # last_result from its latest checkpoint, so without one a retry would put the last
        # good epoch back as the trial's result; with it, the retry also stops at once.
        holder = _marker_checkpoint(out_dir, stopped)
        ray.tune.report(stopped, checkpoint=ray.tune.Checkpoint.from_directory(str(holder)))
        _diverged(stopped[STOP_REASON])


def _run_train(spec: TrialSpec, cfg: Any, entered: float, shared: dict[str, Any]) -> None:
    """Drives a TorchTrainer run named after the trial; raises what the run raised."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    out_dir = trial_dir(spec.study_dir, trial_id)
    _stop_if_diverged_before(out_dir)
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker}
                                                  if spec.use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": asdict(spec), "run_config": cfg, "out_dir": str(out_dir),
                           "entered": entered, "shared": shared,
                           "groups": {TRIAL_GROUP: _current_group()}},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.num_workers,
                                               use_gpu=spec.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=f"{Path(spec.study_dir).name}-{trial_id}",
            storage_path=str(Path(spec.study_dir) / "train"),
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            callbacks=[TuneReportCallback()],  # needs the Tune session: build it here
        ),
    )
    stopped = dict(trainer.fit().metrics or {})
    if stopped.get(STOP_REASON):
        _write_marker(out_dir, stopped)
        _diverged(stopped[STOP_REASON])


def _train_worker(config: dict) -> None:
    """One Ray Train worker: every rank reports each epoch, rank 0 attaches the checkpoint."""
    import ray.train

    spec = TrialSpec(**config["spec"])
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(config["out_dir"])
    if rank:  # ranks > 0 write no checkpoints; a private directory keeps them off rank 0's
        out_dir = out_dir / f"rank{rank}"
    groups = {**config["groups"], TRAIN_GROUP: _current_group()}  # for ReleaseTrainGroups

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) \
            if rank == 0 and checkpoint_dir is not None else None
        ray.train.report({**metrics, **groups}, checkpoint=checkpoint)

    with _resume_dir(ray.train.get_checkpoint(), out_dir, spec.loop) as resume_from:
        if _diverged_in(resume_from) is not None:
            return  # restored a diverged run: its Result already holds the stop result
        device = None
        if spec.use_gpu:  # the GPU Ray Train gave this worker
            import ray.train.torch

            device = ray.train.torch.get_device()
        stopped = _run_loop(spec, config["run_config"], out_dir=out_dir,
                            resume_from=resume_from, report=report, entered=config["entered"],
                            shared=config["shared"], device=device)
    if stopped is not None:
        # Every rank reports (the report is a barrier). Rank 0 attaches the marker checkpoint:
        # the Train Result's metrics are those of the latest *checkpoint*, so a metrics-only
        # report would never reach the driver.
        holder = _marker_checkpoint(out_dir, stopped) if rank == 0 else None
        ray.train.report(stopped, checkpoint=ray.train.Checkpoint.from_directory(str(holder))
                         if holder else None)


# -- shared pieces -------------------------------------------------------------------------

def _run_loop(spec: TrialSpec, cfg: Any, *, out_dir: Path, resume_from: Path | None,
              report: Report, entered: float, shared: dict[str, Any],
              device: Any = None) -> dict[str, Any] | None:
    """Runs the loop on the trial's run config ``cfg``, reporting each epoch; returns the stop
    result if it diverged. ``device``: where the loop trains, when the caller placed it (a Ray
    Train GPU worker); otherwise the loop's default."""
    import ray
    import torch

    loop = _import(spec.loop)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    started = time.time()
    last: dict[str, Any] = {}
    node_id = ray.get_runtime_context().get_node_id()  # where the trial ran (spread checks)

    def callback(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        plain = {k: _plain(v) for k, v in metrics.items()}
        plain.update(trial_startup_s=started - entered, node_id=node_id)
        # The first result fixes progress.csv's columns: name the stop columns from the start.
        plain.setdefault(STOP_REASON, "")
        plain.setdefault("diverged", False)
        last.clear()
        last.update(plain)
        report(plain, None if checkpoint_dir is None else Path(checkpoint_dir))
        if checkpoint_dir is not None:  # reported: Tune's or Train's copy is the one kept
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    extra = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v
             for k, v in shared.items() if v is not None}
    if spec.checkpoint_interval_s:  # a loop that takes no interval checkpoints every epoch
        extra["checkpoint_interval_s"] = spec.checkpoint_interval_s
    if device is not None:
        extra["device"] = device
    try:
        loop(cfg, out_dir=out_dir, callback=callback, resume_from=resume_from, progress=False,
             **extra)
    except Exception as exc:
        # a loop's TrainingDiverged (any loop's: by name)
        if not any(c.__name__ == "TrainingDiverged" for c in type(exc).__mro__):
            raise
        stopped = {k: math.nan for k, v in last.items()
                   if isinstance(v, float) and k != "trial_startup_s"}
        stopped.update({k: math.nan for k in spec.objective_keys})
        stopped.update({"epoch": int(last.get("epoch", 0)) + 1, "diverged": True,
                        STOP_REASON: f"diverged: {getattr(exc, 'reason', exc)}"})
        return stopped
    return None


@contextlib.contextmanager
def _resume_dir(checkpoint: Any, out_dir: Path,
                loop: str | Callable | None = None) -> Iterator[Path | None]:
    """The reported checkpoint as a directory, or None after clearing unreported ones.

    Without a reported checkpoint the run starts afresh; the loop would otherwise resume from
    the newest checkpoint it finds in ``out_dir``, which may be an epoch that was written but
    never reported (the attempt failed between the two), and that epoch would never reach Tune.

    A reported checkpoint on local storage that is missing or unreadable (deleted, truncated
    by a full disk) is replaced by the newest valid older one reported beside it (see
    :func:`_newest_valid`); when there is none the attempt fails instead of silently
    starting from scratch.
    """
    if checkpoint is None:
        if out_dir.exists():
            for child in out_dir.iterdir():
                if child.name != DIVERGED_MARKER and not child.name.startswith("rank"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        yield None
        return
    # the loop's own copies: a reported one is Tune's or Train's to keep (its copy here is
    # left only by a stop between the report and the deletion), an unreported one is not used
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    local = _local_path(checkpoint)
    if local is not None:
        yield _newest_valid(local, loop)
        return
    with checkpoint.as_directory() as path:
        yield Path(path)


def _local_path(checkpoint: Any) -> Path | None:
    """The checkpoint's directory when it lives on the local filesystem, else None."""
    import pyarrow.fs

    if isinstance(getattr(checkpoint, "filesystem", None), pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return None


def _newest_valid(path: Path, loop: str | Callable | None) -> Path:
    """``path`` if the loop can resume from it, else the newest valid older sibling.

    Tune (``checkpoint_000012``) and Ray Train (``checkpoint_<timestamp>``) name the reported
    checkpoints of one trial so that names sort by age, side by side in one directory. A
    checkpoint holding the divergence marker counts as valid (it stops the trial). Validity is
    the loop module's ``load_checkpoint(path) is not None`` when it has one, else existence.
    """
    check = None
    if loop is not None:
        check = getattr(importlib.import_module(_import(loop).__module__), "load_checkpoint", None)
    older = sorted((p for p in path.parent.glob("checkpoint_*") if p.name < path.name),
                   reverse=True) if path.parent.is_dir() else []
    for candidate in [path, *older]:
        if _diverged_in(candidate) is not None or candidate.is_dir() and (
                not callable(check) or check(candidate) is not None):
            if candidate != path:
                log.warning("checkpoint %s is missing or unreadable; resuming from %s, the "
                            "newest valid one", path, candidate)
            return candidate
    raise RuntimeError(f"cannot resume: the reported checkpoint {path} and every older one "
                       "beside it are missing or unreadable (not restarting from scratch)")


# -- divergence ----------------------------------------------------------------------------

def _write_marker(out_dir: Path, stopped: dict[str, Any]) -> Path:
    """Records a divergence beside the trial's outputs (read by later attempts and people)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / DIVERGED_MARKER
    marker.write_text(json.dumps({k: _plain(v) for k, v in stopped.items()}, default=str,
                                 indent=1))
    return marker


def _marker_checkpoint(out_dir: Path, stopped: dict[str, Any]) -> Path:
    """A checkpoint directory holding only the divergence marker."""
    holder = out_dir / "diverged_checkpoint"
    holder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(_write_marker(out_dir, stopped), holder / DIVERGED_MARKER)
    return holder


def _diverged_in(directory: Path | None) -> dict[str, Any] | None:
    marker = directory / DIVERGED_MARKER if directory is not None else None
    return json.loads(marker.read_text()) if marker is not None and marker.exists() else None


def _stop_if_diverged_before(directory: Path | None) -> None:
    """Tune's retries would only diverge again (the run is deterministic): fail at once."""
    found = _diverged_in(directory)
    if found is not None:
        reason = found.get(STOP_REASON, "diverged")
        _diverged(f"{reason} (earlier attempt; delete {directory / DIVERGED_MARKER} to retry)")


def _diverged(reason: str) -> None:
    """Ends the trial as failed, with the loop's exception (imported here: it brings torch)."""
    from trainables.loop import TrainingDiverged

    raise TrainingDiverged(reason)


def _import(path: str | Callable) -> Callable:
    if callable(path):
        return path
    module, _, name = path.partition(":")
    if not name:
        module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars as Python numbers (Tune refuses tensors in metrics)."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "ndim", 1) == 0 else value
