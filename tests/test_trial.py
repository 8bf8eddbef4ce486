"""The study trial under real Ray (2 CPUs): both execution modes, failures, divergence.

A small stand-in loop (:func:`fake_train`, same signature as ``trainables.loop.train``) keeps
the runs to a fraction of a second of training, so what is measured here is Ray's own work:
results reaching Tune, checkpoints, resumption after a failure and start-up overhead.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from ray import tune  # noqa: E402

from study.trial import (  # noqa: E402
    DIVERGED_MARKER, DRIVER_MEMORY, STOP_REASON, CheckpointGuard, TrialSpec, _resume_dir,
    make_trainable)

LOOP = f"{__name__}:fake_train"
EPOCHS = 3
METRIC = "dev_ndcg_at_10"


# -- the stand-in loop ---------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """Same shape as ``trainables.loop.TrainingDiverged``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def fake_train(cfg, *, out_dir: Path, callback: Callable | None = None,
               resume_from: Path | None = None, data=None, features=None,
               progress: bool = True) -> dict:
    """A tiny deterministic regression with the real loop's checkpoint/resume contract.

    ``cfg.name`` may be ``"<action>:<path>"``: ``fail`` (``fail1``) raises once at epoch 2
    (1) after writing that epoch's checkpoint (``<path>`` marks that it already failed),
    ``diverge`` raises :class:`TrainingDiverged` at epoch 2. Every call appends a line to
    ``<path>.calls``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    action, _, marker = cfg.name.partition(":")
    torch.manual_seed(cfg.train.seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(64, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen) + 0.1 * torch.randn(64, 1, generator=gen)
    if resume_from is None:  # like the real loop: newest checkpoint under out_dir, if any
        found = sorted((out_dir / "checkpoints").glob("epoch_*"))
        resume_from = found[-1] if found else None
    start, history = 0, []
    if resume_from is not None:
        state = torch.load(Path(resume_from) / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
    if marker:
        with open(marker + ".calls", "a") as f:
            f.write(f"start={start}\n")
    for epoch in range(start + 1, cfg.train.epochs + 1):
        order = torch.randperm(64, generator=torch.Generator().manual_seed(
            cfg.train.seed * 1000 + epoch))
        for i in range(0, 64, 16):
            idx = order[i:i + 16]
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if action == "diverge" and epoch == 2:
            raise TrainingDiverged(f"non-finite loss at epoch {epoch}")
        with torch.no_grad():
            full = torch.nn.functional.mse_loss(model(x), y).item()
        metrics = {"epoch": epoch, "train_loss": full, METRIC: 1.0 / (1.0 + full),
                   "effective_rank": 1.0, "phase": "joint",
                   "data_tag": data["tag"] if data else ""}
        history.append(metrics)
        ckpt = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch, "history": history}, ckpt / "state.pt")
        cfg.to_yaml(ckpt / "config.yaml")
        fail_at = {"fail": 2, "fail1": 1}.get(action)
        if epoch == fail_at and not Path(marker).exists():
            Path(marker).touch()
            raise RuntimeError(f"injected worker failure at epoch {epoch}")
        metrics["loop_time_s"] = time.perf_counter() - t0
        if callback is not None:
            callback(dict(metrics), ckpt)
    return {"history": history, "final": history[-1] if history else {}}


def build(params: dict):
    """Tune params -> the trial's run config (what ``SpaceSpec.trial_config`` does)."""
    from trainables.config import RunConfig

    return RunConfig.from_dict({"name": params.get("name", "run"), "train": {
        "lr": params["lr"], "seed": params["seed"], "epochs": EPOCHS}})


# -- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path.rstrip(os.pathsep)}})
    yield
    ray.shutdown()


def _spec(study_dir: Path, execution: str, **options) -> TrialSpec:
    """A trial spec of the stand-in loop, from launch options (a checkpoint every epoch)."""
    from study.study import StudyOptions

    return StudyOptions(execution=execution, checkpoint_interval_s=0, **options).trial_spec(
        study_dir, loop=LOOP)


def run_study(tmp: Path, execution: str, param_space: dict, *, num_samples: int = 1,
              tune_failures: int = 0, train_failures: int = 2, search_alg=None,
              name: str = "exp", shared: dict | None = None, stop: dict | None = None,
              callbacks: list | None = None) -> tuple[tune.ResultGrid, float]:
    spec = _spec(tmp / "study", execution, max_failures=train_failures)
    tuner = tune.Tuner(
        tune.with_resources(make_trainable(spec, build, shared), spec.resources()),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=num_samples, metric=METRIC, mode="max",
                                    search_alg=search_alg,
                                    max_concurrent_trials=spec.max_concurrent(2)),
        run_config=tune.RunConfig(storage_path=str(tmp / "tune"), name=name,
                                  failure_config=tune.FailureConfig(max_failures=tune_failures),
                                  stop=stop, callbacks=callbacks, verbose=0),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    return grid, time.perf_counter() - t0


@pytest.fixture(scope="module", params=["direct", "train"])
def baseline(request, tmp_path_factory, ray_cluster):
    """Two uninterrupted trials per mode; also prints the per-trial start-up overhead."""
    tmp = tmp_path_factory.mktemp(f"base-{request.param}")
    shared = {"data": ray.put({"tag": "from-object-store"}), "features": None}
    grid, wall = run_study(tmp, request.param, {"lr": 0.05, "seed": tune.randint(0, 1000)},
                           num_samples=2, shared=shared)
    loop = max(r.metrics["loop_time_s"] for r in grid)
    startup = max(r.metrics["trial_startup_s"] for r in grid)
    in_trial = max(r.metrics["time_total_s"] - r.metrics["loop_time_s"] for r in grid)
    print(f"\n[overhead] {request.param}: Tuner.fit of 2 concurrent trials {wall:.1f}s, "
          f"loop {loop:.2f}s -> {wall - loop:.1f}s beyond the loop; inside the trial: "
          f"{startup:.2f}s before the loop starts, {in_trial:.2f}s of time_total_s not in it")
    return request.param, tmp, grid


# -- tests ---------------------------------------------------------------------------------

def test_options_resolve_and_trial_spec_is_built_from_them(tmp_path):
    """The execution mode is resolved and checked once, on the options (the command line's
    definition); the study builds every trial's spec from them by keyword."""
    import json

    from study.study import Study, StudyError, StudyOptions

    assert StudyOptions().resolved_execution == "direct"
    assert StudyOptions(gpus_per_worker=1).resolved_execution == "train"
    assert StudyOptions(num_workers=2).resolved_execution == "train"
    assert StudyOptions(execution="train").resolved_execution == "train"
    with pytest.raises(StudyError, match="--num-workers must be 1"):
        StudyOptions(execution="direct", num_workers=2)
    with pytest.raises(StudyError, match="--execution must be one of auto, direct, train"):
        StudyOptions(execution="spark")
    for wrong, named in (({"num_samples": 0}, "--num-samples"), ({"max_failures": -1},
                         "--max-failures"), ({"cpus_per_worker": 0}, "--cpus-per-worker")):
        with pytest.raises(StudyError, match=named):
            StudyOptions(**wrong)
    opts = StudyOptions(num_workers=2, cpus_per_worker=1.5, gpus_per_worker=0.5,
                        max_failures=4, checkpoint_interval_s=3.0)
    space = tmp_path / "space.yaml"
    space.write_text("metric: [dev_ndcg_at_10, dev_recall_at_100]\nmode: [max, max]\n"
                     "parameters: {train.lr: {type: float, low: 0.001, high: 0.01}}\n")
    (tmp_path / "study.json").write_text(json.dumps({
        "name": "s", "options": {**opts.__dict__}, "space_file": str(space),
        "mlflow_uri": "sqlite:///x.db"}))
    assert Study.open(tmp_path).trial_spec() == TrialSpec(
        study_dir=str(tmp_path), execution="train", num_workers=2, cpus_per_worker=1.5,
        gpus_per_worker=0.5, max_failures=4, checkpoint_interval_s=3.0,
        objective_keys=("dev_ndcg_at_10", "dev_recall_at_100"))


def test_resources(tmp_path):
    def spec(execution="direct", **kw):
        return _spec(tmp_path / "s", execution, **kw)

    assert spec(cpus_per_worker=2).resources() == {"cpu": 2.0, "gpu": 0.0}
    assert spec("train", num_workers=2).resources() == {"cpu": 0.0, "gpu": 0.0,
                                                       "memory": DRIVER_MEMORY}
    assert spec("direct", gpus_per_worker=0.5).resources()["gpu"] == 0.5
    # 2 CPUs: two direct trials, or two 1-worker Train runs (their drivers take no CPU)
    assert spec("direct").max_concurrent(2) == 2
    assert spec("train").max_concurrent(2) == 2
    assert spec("train", cpus_per_worker=2).max_concurrent(3) == 1
    assert spec("train", num_workers=4, gpus_per_worker=1).max_concurrent(64, 8) == 2  # GPUs
    with pytest.raises(ValueError):
        spec("train", num_workers=2, cpus_per_worker=2).max_concurrent(2)


def test_epochs_reach_tune_with_checkpoints(baseline):
    mode, tmp, grid = baseline
    assert not grid.errors, grid.errors
    assert len(grid) == 2
    for result in grid:
        df = result.metrics_dataframe
        assert df["epoch"].tolist() == [1, 2, 3], (mode, df["epoch"].tolist())
        assert df["training_iteration"].tolist() == [1, 2, 3]
        assert result.metrics["epoch"] == EPOCHS and 0 < result.metrics[METRIC] < 1
        assert result.metrics["data_tag"] == "from-object-store"  # shared= reached the loop
        trial_id = result.metrics["trial_id"]
        out = tmp / "study" / "trials" / trial_id
        assert not list(out.glob("checkpoints/epoch_*"))  # reported: only Tune's/Train's copy
        if mode == "direct":
            assert result.checkpoint is not None
            assert (Path(result.checkpoint.path) / "state.pt").exists()
        else:  # TuneReportCallback forwards the Train checkpoint's path, not a Tune checkpoint
            assert result.checkpoint is None
            ckpt = Path(result.metrics["checkpoint_path"])
            assert (ckpt / "state.pt").exists()
            assert ckpt.is_relative_to(tmp / "study" / "train" / f"study-{trial_id}")
    # deterministic: the trial's final metric is a function of its config alone
    for result in grid:
        cfg = result.config
        again = fake_train(build(cfg), out_dir=tmp / "again" / str(cfg["seed"]))
        assert again["final"][METRIC] == pytest.approx(result.metrics[METRIC], rel=1e-6)


def test_failure_resumes_from_last_checkpoint(baseline, tmp_path):
    """A failure at epoch 2 (once) restarts from epoch 1 and ends where an uninterrupted run
    does; each epoch reaches Tune exactly once. ``direct``: Tune retries the trial and restores
    its checkpoint. ``train``: Ray Train restarts the worker group from its checkpoint."""
    mode, _, reference = baseline
    ref = reference[0]
    marker = tmp_path / "failed-once"
    params = {"lr": 0.05, "seed": ref.config["seed"], "name": f"fail:{marker}"}
    grid, _ = run_study(tmp_path, mode, params, tune_failures=1 if mode == "direct" else 0)
    assert marker.exists(), "the failure was not injected"
    assert not grid.errors, grid.errors
    result = grid[0]
    assert result.metrics[METRIC] == pytest.approx(ref.metrics[METRIC], rel=1e-6)
    assert result.metrics_dataframe["epoch"].tolist() == [1, 2, 3]
    calls = Path(str(marker) + ".calls").read_text().split()
    assert calls == ["start=0", "start=1"]  # the retry resumed from epoch 1's checkpoint


def test_failure_before_first_report_starts_afresh(tmp_path):
    """Epoch 1's checkpoint was written but never reported: the retry must not resume from it
    (the loop would, from its ``out_dir``), or epoch 1 would never reach Tune."""
    marker = tmp_path / "failed-once"
    params = {"lr": 0.05, "seed": 7, "name": f"fail1:{marker}"}
    grid, _ = run_study(tmp_path, "direct", params, tune_failures=1)
    assert marker.exists() and not grid.errors, grid.errors
    result = grid[0]
    assert result.metrics_dataframe["epoch"].tolist() == [1, 2, 3]
    assert Path(str(marker) + ".calls").read_text().split() == ["start=0", "start=0"]
    expected = fake_train(build({**params, "name": "run"}), out_dir=tmp_path / "ref")
    assert result.metrics[METRIC] == pytest.approx(expected["final"][METRIC], rel=1e-6)


def test_divergence_fails_trial_and_tells_optuna(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    marker = tmp_path / "diverge"
    search = OptunaSearch(metric=METRIC, mode="max", seed=0)
    space = {"lr": tune.uniform(0.01, 0.05), "seed": 0, "name": f"diverge:{marker}"}
    grid, _ = run_study(tmp_path, "direct", space, tune_failures=2, search_alg=search)
    assert len(grid.errors) == 1
    result = grid[0]
    assert "non-finite loss at epoch 2" in str(result.error)
    assert result.metrics[STOP_REASON].startswith("diverged: non-finite loss")
    assert math.isnan(result.metrics[METRIC]) and result.metrics["epoch"] == 2
    df = result.metrics_dataframe
    assert df["epoch"].tolist() == [1, 2]
    assert df[STOP_REASON].fillna("").tolist() == ["", "diverged: non-finite loss at epoch 2"]
    assert df["diverged"].tolist() == [False, True]
    trial_id = result.metrics["trial_id"]
    assert (tmp_path / "study" / "trials" / trial_id / DIVERGED_MARKER).exists()
    # Tune retried twice, but the retries stopped at the marker instead of training again
    assert Path(str(marker) + ".calls").read_text().split() == ["start=0"]
    import optuna

    states = [t.state for t in search._ot_study.trials]
    assert states == [optuna.trial.TrialState.FAIL], states


def test_divergence_in_train_mode(tmp_path):
    marker = tmp_path / "diverge"
    grid, _ = run_study(tmp_path, "train", {"lr": 0.05, "seed": 0, "name": f"diverge:{marker}"})
    result = grid[0]
    assert result.error is not None and "non-finite loss" in str(result.error)
    assert result.metrics[STOP_REASON].startswith("diverged:")
    assert math.isnan(result.metrics[METRIC])
    # the worker caught it: Ray Train did not restart the worker group for it
    assert Path(str(marker) + ".calls").read_text().split() == ["start=0"]


def test_resume_dir_leaves_one_copy_of_each_checkpoint(tmp_path):
    """Resuming from a reported checkpoint clears the loop's own copies (a stop between a
    report and its deletion leaves one); without one, unreported work is cleared too."""
    out_dir = tmp_path / "trials" / "t1"
    stale = out_dir / "checkpoints" / "epoch_0001"
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"x")
    (out_dir / DIVERGED_MARKER).write_text("{}")
    reported = tmp_path / "ray" / "t1" / "checkpoint_000000"
    reported.mkdir(parents=True)
    (reported / "state.pt").write_bytes(b"x")
    with _resume_dir(tune.Checkpoint.from_directory(str(reported)), out_dir) as path:
        assert path == reported
        assert not (out_dir / "checkpoints").exists()
    assert (reported / "state.pt").exists()
    stale.mkdir(parents=True)
    with _resume_dir(None, out_dir) as path:
        assert path is None
        assert [p.name for p in out_dir.iterdir()] == [DIVERGED_MARKER]


@pytest.mark.parametrize("guard", [False, True])
def test_a_trial_tune_stops_keeps_no_loop_copy(tmp_path, guard):
    """Tune ends a trial it stops (``stop``, as ASHA does) inside its report, so the trial's
    own deletion of the reported loop copy never runs; :class:`CheckpointGuard` deletes it
    when the trial ends. Without the guard the copy is there: the test sees the case."""
    callbacks = [CheckpointGuard(tmp_path / "study")] if guard else None
    grid, _ = run_study(tmp_path, "direct", {"lr": 0.05, "seed": 3}, stop={"epoch": 1},
                        callbacks=callbacks)
    (result,) = grid
    assert not grid.errors and result.metrics["epoch"] == 1  # stopped after epoch 1 of 3
    assert (Path(result.checkpoint.path) / "state.pt").exists()  # Tune's copy stays
    left = list((tmp_path / "study" / "trials").glob("*/checkpoints/epoch_*"))
    assert (left == []) if guard else (len(left) == 1)
