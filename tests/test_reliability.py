"""Reliability of a study under faults: real Ray Tune, Optuna (RDB storage) and MLflow.

Nothing here mocks Ray, Optuna or MLflow. Failures are injected the way they happen: a trial
raises or its process dies (``tests/faults.py``), the driver gets SIGKILL or SIGINT, the
MLflow server goes away and comes back, checkpoints are corrupted on disk, inputs are wrong.
Trials train only the small heads over cached SciFact features, so each costs seconds; most
of the time is Ray's start-up, which is why each test runs one study that covers several
scenarios. ``docs/reliability.md`` maps every guarantee to the test that proves it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port, mlflow_server  # noqa: F401
from study_helpers import child_runs, optuna_states, tiny_space, wait_for, write_parent

import faults
from analysis import schema as S

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
METRIC = "dev_ndcg_at_10"


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _history(uri: str, run_id: str, key: str = METRIC) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _tune_results(experiment_dir: Path) -> dict[str, list[dict]]:
    """Every result Tune recorded, per trial id, from the trials' ``result.json`` files."""
    out: dict[str, list[dict]] = {}
    for path in experiment_dir.glob("*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out.setdefault(row["trial_id"], []).append(row)
    return out


# -- 1, 9, 10 (exception -> FAILED), a crash never stops the study: one Tuner, 7 trials -----

FAULTS = ["none", "raise@2", "exit@2", "corrupt@3", "delete@3", "corrupt@2", "always@1"]
EPOCHS = 3


def test_trial_faults_resume_from_last_valid_checkpoint(tmp_path, scifact_dir, scifact,
                                                        scifact_features):
    """Seven trials of one config (same seed) under the faults of ``tests/faults.py``, with
    the real loop, Tune retrying a failed trial once (``tune.FailureConfig``) and the study's
    MLflow callback on a sqlite store.

    * ``raise@2`` / ``exit@2``: epoch 2 was trained and checkpointed but not reported when
      the trial raised / its process died; the retry resumes from epoch 1's checkpoint.
    * ``corrupt@3`` / ``delete@3``: epoch 2's reported checkpoint is garbage / gone when
      epoch 3 fails; the retry resumes from epoch 1, the newest valid one, and the
      checkpoints written after it continue the numbering.
    * ``corrupt@2``: the only reported checkpoint is garbage: the retry fails, it does not
      quietly start from scratch.
    * ``always@1``: fails on every attempt.
    The four that recover end with the uninterrupted (``none``) run's metric, and each
    trial's MLflow child run holds every epoch once, with the uninterrupted run's values.
    Failed trials end FAILED with the error as stop reason; the other trials still finish.
    """
    from ray import tune

    from search_spaces.space import load_preset
    from study.sync import TrialWriter
    from study.tracking import StudyTracker
    from study.study import StudyOptions
    from study.trial import CheckpointGuard, make_trainable
    from study.tuner import MLflowTrialCallback
    from trainables.config import RunConfig

    path = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path.rstrip(os.pathsep)}})
    base = load_preset("hybrid")
    base["train"].update(epochs=EPOCHS, max_steps_per_epoch=3, seed=11)
    base["data"] = {"path": str(scifact_dir)}
    base["eval"] = {"evaluate_test": False}

    def build(params: dict) -> RunConfig:
        return RunConfig.from_dict({**base, "provenance": {"fault": params["fault"]}})

    study_dir = tmp_path / "study"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = StudyTracker(uri, "faults")
    write_parent(tracker, {"kind": "fault injection"})
    spec = StudyOptions(checkpoint_interval_s=0).trial_spec(  # a checkpoint every epoch
        study_dir, loop="faults:train_failing_once", objective_keys=(METRIC,))
    trainable = make_trainable(spec, build, {"data": ray.put(scifact),
                                             "features": ray.put(scifact_features)})
    tuner = tune.Tuner(
        tune.with_resources(trainable, spec.resources()),
        param_space={"fault": tune.grid_search(FAULTS)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", max_concurrent_trials=2),
        run_config=tune.RunConfig(name="faults", storage_path=str(tmp_path / "ray"),
                                  callbacks=[CheckpointGuard(study_dir), MLflowTrialCallback(
                                      TrialWriter(tracker, str(study_dir), EPOCHS))],
                                  verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    grid = tuner.fit()
    tracker.end(tracker.run(), S.STATUS_FINISHED, None)

    by_fault = {r.config["fault"]: r for r in grid}
    assert set(by_fault) == set(FAULTS)
    reference = by_fault["none"]
    assert reference.error is None
    ref_history = None
    runs = {c.data.tags[S.TAG_TRIAL_ID]: c for c in child_runs(uri, "faults")}
    assert len(runs) == len(FAULTS)  # one child run per trial, whatever the retries
    for fault in FAULTS:
        result = by_fault[fault]
        trial_id = result.metrics["trial_id"]
        run = runs[trial_id]
        starts = faults.attempts(study_dir, trial_id)
        if fault == "always@1":  # a crash on every attempt: FAILED, with the error
            assert result.error is not None and "injected always at epoch 1" in str(result.error)
            assert starts == [1, 1]  # two attempts: the first and one retry
            assert run.info.status == S.STATUS_FAILED
            assert "InjectedFault: injected always at epoch 1" in run.data.tags[S.TAG_STOP_REASON]
            continue
        if fault == "corrupt@2":  # the only reported checkpoint is broken: fail, no rerun
            assert starts == [1], starts  # the retry did not start again from epoch 1
            assert "cannot resume" in str(result.error)
            assert run.info.status == S.STATUS_FAILED
            assert "cannot resume" in run.data.tags[S.TAG_STOP_REASON]
            assert [s for s, _ in _history(uri, run.info.run_id)] == [1]
            continue
        assert result.error is None, (fault, result.error)
        assert (study_dir / "faults" / f"{trial_id}.{fault.split('@')[0]}").exists() or \
            fault == "none", f"{fault} was not injected"
        assert result.metrics[METRIC] == pytest.approx(reference.metrics[METRIC], rel=1e-9), fault
        assert result.metrics["epoch"] == EPOCHS
        expected_starts = {"none": [1], "raise@2": [1, 2], "exit@2": [1, 2],
                           "corrupt@3": [1, 2], "delete@3": [1, 2]}[fault]
        assert starts == expected_starts, (fault, starts)
        assert run.info.status == S.STATUS_FINISHED, fault
        # the loop's own copies are deleted once reported: one copy of each on disk
        assert not list((study_dir / "trials" / trial_id).glob("checkpoints/epoch_*")), fault
        history = _history(uri, run.info.run_id)
        assert [s for s, _ in history] == list(range(1, EPOCHS + 1)), (fault, history)
        if ref_history is None:
            ref_history = history
        # (step, value) pairs: the steps exactly, the values to float tolerance (approx does
        # not take nested sequences)
        assert [s for s, _ in history] == [s for s, _ in ref_history], fault
        assert [v for _, v in history] == pytest.approx([v for _, v in ref_history]), fault
        if fault in ("corrupt@3", "delete@3"):
            assert (study_dir / "faults" / f"{trial_id}.broken").exists()
            # Numbering goes on after the resume: Tune's checkpoint indices only grow (the
            # broken one is left as it is), the loop's epochs follow the resumed one.
            tune_epochs = {p.name: _epoch_of(p) for p in Path(result.path).glob("checkpoint_*")}
            assert tune_epochs == {"checkpoint_000000": 1, "checkpoint_000001": None,
                                   "checkpoint_000002": 2, "checkpoint_000003": 3}, tune_epochs
            assert Path(result.checkpoint.path).name == "checkpoint_000003"


def _epoch_of(checkpoint_dir: Path) -> int | None:
    from trainables.loop import load_checkpoint

    state = load_checkpoint(checkpoint_dir) if (checkpoint_dir / "state.pt").exists() else None
    return None if state is None else state["epoch"]


# -- launcher-level helpers --------------------------------------------------------------------

def _opts(space: Path, storage: Path, scifact_dir: Path, **kw):
    from study.launcher import StudyOptions

    return StudyOptions(space=str(space), storage=str(storage), data=str(scifact_dir),
                        verbose=0, **kw)


def _cli(*args: str, log: Path, env: dict[str, str] | None = None):
    """``python -m study.cli ARGS`` in its own process group (the driver and the Ray it
    starts), output appended to ``log``; ``env`` adds to the environment."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "study.cli", *args], env=env,
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _launch_cli(space: Path, storage: Path, scifact_dir: Path, *extra: str, log: Path,
                env: dict[str, str] | None = None):
    storage.mkdir(parents=True, exist_ok=True)
    return _cli("launch", "--space", str(space), "--storage", str(storage), "--data",
                str(scifact_dir), *extra, log=log, env=env)


def _server_up(server) -> str:
    """The module's tracking server, started again if an earlier test left it stopped."""
    if server.proc is None:
        server.start()
    return server.wait().uri


def _tuning(study_dir: Path, name: str) -> bool:
    """Whether the driver got as far as Tune (its stores exist: reading them before that
    would race the driver creating them)."""
    return (study_dir / "ray" / name).is_dir()


def _optuna_trials(study_dir: Path, name: str) -> list:
    import optuna

    if not _tuning(study_dir, name):
        return []
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}"
                             ).get_trials(deepcopy=False)


def _rest(uri: str, path: str, body: dict | None = None) -> dict:
    """The MLflow REST API, as any other client sees it."""
    import urllib.request

    if body is None:
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}")
    else:
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _rest_runs(uri: str, study: str) -> tuple[dict, list[dict]]:
    """(parent run, child runs) of a study over the REST API."""
    import urllib.parse

    exp = _rest(uri, "experiments/get-by-name?experiment_name=" +
                urllib.parse.quote(S.experiment_name(study), safe=""))["experiment"]
    runs, token = [], None
    while True:
        body = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000,
                "filter": f"tags.`{S.TAG_STUDY}` = '{study}'"}
        if token:
            body["page_token"] = token
        page = _rest(uri, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            break
    tags = lambda r: {t["key"]: t["value"] for t in r["data"].get("tags", [])}  # noqa: E731
    parents = [r for r in runs if tags(r).get(S.TAG_ROLE) == S.ROLE_STUDY]
    children = [r for r in runs if tags(r).get(S.TAG_ROLE) == S.ROLE_TRIAL]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    for r in [*parents, *children]:
        r["tags"] = tags(r)
    return parents[0], children


def _rest_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import urllib.parse

    page = _rest(uri, f"metrics/get-history?run_id={run_id}&metric_key="
                 f"{urllib.parse.quote(key)}&max_results=10000")
    return [(int(m["step"]), m["value"]) for m in page.get("metrics", [])]


def _missing_from_view(uri: str, study_dir: Path, name: str) -> list[tuple[str, int]]:
    """(trial id, epoch) of every finite dev nDCG@10 in Tune's record that the trial's MLflow
    run does not hold."""
    client = MlflowClient(uri)
    runs = {r.data.tags[S.TAG_TRIAL_ID]: r.info.run_id for r in child_runs(uri, name)}
    missing = []
    for trial_id, rows in _tune_results(study_dir / "ray" / name).items():
        logged = {m.step for m in client.get_metric_history(runs[trial_id], METRIC)} \
            if trial_id in runs else set()
        missing += [(trial_id, row["epoch"]) for row in rows
                    if math.isfinite(row.get(METRIC, math.nan)) and row["epoch"] not in logged]
    return sorted(set(missing))


def _epoch_one_counts(study_dir: Path, name: str) -> dict[str, int]:
    """How many times each trial reported epoch 1, across Tune's result files."""
    return {trial_id: sum(1 for row in rows if row.get("epoch") == 1)
            for trial_id, rows in _tune_results(study_dir / "ray" / name).items()}


# -- 2, 3, 5 (outage repaired by sync), 10 (orphans, no duplicate steps), 11: SIGKILL --------

CONTINUOUS = {  # no categorical, no switch: two trials with equal params would be a replay
    "loss.lambda_pred": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
    "loss.lambda_con": {"type": "float", "low": 0.05, "high": 1.0, "log": True},
}


def test_driver_killed_study_resumes(tmp_path, scifact_dir, scifact_features, mlflow_server,
                                     caplog):
    """SIGKILL the ``launch`` process group while trials run, just after the searcher made a
    new suggestion, with MLflow unreachable at that moment (the driver's writes to it fail, and
    the study goes on); then ``resume`` with the server back, whose sync fills in the view."""
    import optuna

    from study.launcher import resume

    server = mlflow_server
    uri = _server_up(server)
    name, samples = "killed", 6
    # trials of 8-16 epochs (several seconds: with reuse_actors a short trial ends in about a
    # second, and the study before the kill) and of different lengths, so that two trials
    # that run side by side do not end together
    parameters = {**CONTINUOUS, "train.epochs": {"type": "int", "low": 8, "high": 16}}
    space = tiny_space(tmp_path, name, num_samples=samples, epochs=16, steps=12,
                       parameters=parameters,
                       searcher={"kind": "tpe", "seed": 0, "n_startup_trials": 10})
    storage = tmp_path / "studies"
    study_dir = storage / name
    log = tmp_path / "launch.log"
    # MLflow's retries off: the driver's first write to the stopped server fails at once (its
    # live writes run beside the study, and the outage must show before the trials end)
    proc = _launch_cli(space, storage, scifact_dir, "--mlflow-uri", uri,
                       "--max-concurrent-trials", "2", log=log,
                       env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    # the view as the server's own store holds it, read directly while the server is down
    store = f"sqlite:///{server.root / 'mlflow.db'}"

    def open_in_flight(min_left: int = 1) -> set[str]:
        """Trials that trained an epoch, have ``min_left`` epochs or more to go, and whose
        run the view holds RUNNING: the runs a driver killed now leaves open."""
        results = _tune_results(study_dir / "ray" / name)
        left = {t: rows[-1]["config"]["train.epochs"] - rows[-1]["epoch"]
                for t, rows in results.items() if rows}
        running = {r.data.tags[S.TAG_TRIAL_ID] for r in child_runs(store, name)
                   if r.info.status == S.STATUS_RUNNING}
        return {t for t, n in left.items() if n >= min_left} & running

    try:
        wait_for(lambda: sum(t.state.name == "COMPLETE"
                             for t in _optuna_trials(study_dir, name)) >= 1,
                 240, proc, "a first trial to complete", log)
        # the outage begins while a trial with epochs to go runs with its run open
        wait_for(lambda: open_in_flight(min_left=6), 120, proc,
                 "a trial with epochs to go and an open run", log)
        server.stop()
        at_outage = len(_optuna_trials(study_dir, name))
        wait_for(lambda: "a write for trial" in log.read_text(errors="replace")
                 and _missing_from_view(store, study_dir, name), 60, proc,
                 "the driver to miss MLflow and record results all the same", log)
        # kill after a suggestion made during the outage (just after one, before Tune saves
        # it, with luck) while a trial whose run is open is in flight; a trial that started
        # before the outage is about to end with no suggestion since: kill now
        wait_for(lambda: open_in_flight() and (len(_optuna_trials(study_dir, name)) > at_outage
                                               or not open_in_flight(min_left=3)),
                 120, proc, "a new suggestion beside a running trial", log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    before = {t.number: t for t in _optuna_trials(study_dir, name)}
    done_before = {n: (t.params, t.value) for n, t in before.items() if t.state.name == "COMPLETE"}
    assert 1 <= len(done_before) < samples
    _server_up(server)
    assert _missing_from_view(uri, study_dir, name), "the outage left the view complete"

    caplog.set_level(logging.WARNING, logger="study.launcher")
    summary = resume(study_dir)

    # Tune: every requested trial ran to completion, none twice from scratch
    assert summary["trials"] == samples and summary["errored"] == 0, summary
    epoch_ones = _epoch_one_counts(study_dir, name)
    assert len(epoch_ones) == samples
    assert all(n <= 1 for n in epoch_ones.values()), epoch_ones
    # the runs of the trials in flight at the kill (RUNNING in Tune's record of a driver that
    # is gone) were marked KILLED by the sync before the study went on
    # getMessage(): a record's msg may be any object (an exception, from another logger)
    marked = [r.args[0] for r in caplog.records if r.name == "study.launcher"
              and "left RUNNING by a driver" in r.getMessage()]
    assert marked and marked[0], "no run was marked orphaned"

    # Optuna: the finished trials are kept; requested = completed; a suggestion the kill
    # lost is FAIL (not RUNNING for ever) and never drawn again: all configurations distinct
    trials = _optuna_trials(study_dir, name)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == samples and "RUNNING" not in states, states
    assert set(states) <= {"COMPLETE", "FAIL"}
    for number, (params, value) in done_before.items():
        assert (trials[number].params, trials[number].value) == (params, value)
    configs = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(configs)) == len(configs), [(t.number, t.state.name, t.params)
                                               for t in trials]
    assert optuna.get_all_study_names(f"sqlite:///{study_dir / 'optuna.db'}") == [name]

    # MLflow, over the server's REST API: one child run per trial across the kill, what the
    # outage left out filled in from Tune's record, each epoch once
    parent, children = _rest_runs(uri, name)
    assert parent["info"]["status"] == S.STATUS_FINISHED
    trial_ids = [c["tags"][S.TAG_TRIAL_ID] for c in children]
    assert len(trial_ids) == len(set(trial_ids)), trial_ids
    finished = [c for c in children if c["info"]["status"] == S.STATUS_FINISHED]
    assert {c["tags"][S.TAG_TRIAL_ID] for c in finished} == set(epoch_ones)
    # each run marked KILLED at the resume was either reopened and finished by its resumed
    # trial, or belongs to a trial Tune had not saved yet when the driver died (its Optuna
    # trial was marked FAIL, and its run stays KILLED as orphaned: checked below)
    lost = set(marked[0]) - set(epoch_ones)
    assert states.count("FAIL") >= len(lost), (lost, states)
    for child in children:
        assert child["tags"][S.TAG_PARENT_RUN_ID] == parent["info"]["run_id"]
        if child["info"]["status"] != S.STATUS_FINISHED:  # a trial Tune lost in the kill
            assert child["info"]["status"] == S.STATUS_KILLED
            assert child["tags"][S.TAG_STOP_REASON] == S.STOP_REASON_ORPHANED
            continue
        epochs = int({p["key"]: p["value"] for p in child["data"]["params"]}["train.epochs"])
        for key in (METRIC, "train_loss", "effective_rank"):
            steps = [s for s, _ in _rest_history(uri, child["info"]["run_id"], key)]
            assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
    assert not _missing_from_view(uri, study_dir, name)


def test_commands_put_back_tune_state_the_killed_driver_cut_short(tmp_path, scifact_dir,
                                                                 scifact_features, caplog,
                                                                 monkeypatch):
    """Tune copies its state into the study file by file, not atomically: a driver killed
    mid-copy left ``experiment_state-*.json`` and ``search_gen_state-*.json`` empty (seen in
    ``test_driver_killed_study_resumes``), and every command failed reading them. ``sync``
    (and the other commands that read the record, with no Ray started) and ``resume`` put
    back the whole staging copies the killed session left in Ray's temp directory; with none
    left, the error names the file, and once it is deleted the trials are read from their own
    result files."""
    from study.launcher import launch, resume
    from study.study import Study, StudyError
    from study.sync import read_trials, sync

    name = "cut"
    space = tiny_space(tmp_path, name, num_samples=2, epochs=1, steps=2)
    study_dir = tmp_path / "studies" / name
    launch(_opts(space, tmp_path / "studies", scifact_dir))
    experiment = study_dir / "ray" / name
    (state,) = experiment.glob("experiment_state-*.json")
    (generator,) = experiment.glob("search_gen_state-*.json")
    whole = generator.read_bytes()

    def cut() -> None:
        state.write_bytes(b"")
        generator.write_bytes(whole[:40])

    caplog.set_level(logging.WARNING)
    cut()
    assert not ray.is_initialized()
    assert sync(Study.open(study_dir)).trials == 2  # no Ray started: Ray's default temp dir
    assert len(json.loads(state.read_text())["trial_data"]) == 2
    assert generator.read_bytes() == whole

    cut()
    caplog.clear()
    summary = resume(study_dir)
    assert summary["trials"] == 2 and summary["errored"] == 0, summary
    assert len(json.loads(state.read_text())["trial_data"]) == 2
    assert any(state.name in r.getMessage() and generator.name in r.getMessage()
               for r in caplog.records if r.name == "study.sync")

    # another machine, or Ray's temp directory cleaned: no staging copy to put back
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "elsewhere"))
    state = max(experiment.glob("experiment_state-*.json"))  # resume saved new ones
    generator = max(experiment.glob("search_gen_state-*.json"))
    cut()
    with pytest.raises(StudyError, match=f"{state.name} is cut short.*no whole copy"):
        sync(Study.open(study_dir))
    for saved in experiment.glob("experiment_state-*.json"):
        saved.unlink()
    trials = read_trials(experiment)
    assert sorted(len(t.results) for t in trials) == [1, 1]
    assert sync(Study.open(study_dir)).trials == 2


def test_seeded_searcher_never_repeats_a_lost_suggestion(tmp_path):
    """Scenario 11 without the timing luck: what Tune does to the searcher around a driver
    killed after a suggestion and before its next state save, with a real Optuna storage."""
    import pickle

    import optuna

    from search_spaces.searcher import build_searcher
    from search_spaces.space import load_space

    spec = load_space(tiny_space(tmp_path, "lost", parameters=CONTINUOUS,
                                 searcher={"kind": "tpe", "seed": 0, "n_startup_trials": 10}))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = build_searcher(spec, storage_url=url, study_name="lost")
    at_launch = pickle.dumps(searcher)  # Tune's tuner.pkl
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {spec.metric: 0.5})  # the space's objective
    searcher.save(str(tmp_path / "searcher-state.pkl"))  # Tune's last save before the kill
    lost = searcher.suggest("b")  # suggested, never saved: the driver dies here

    restored = pickle.loads(at_launch)  # Tuner.restore ...
    restored.restore(str(tmp_path / "searcher-state.pkl"))  # ... and the searcher's state
    again = restored.suggest("c")
    assert again != lost  # a seeded sampler restored as it was at the save would redraw it
    restored.on_trial_complete("c", {spec.metric: 0.6})
    study = optuna.load_study(study_name="lost", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    # a new Tune experiment over the same storage (its Tune state lost) is reseeded too
    fresh = build_searcher(spec, storage_url=url, study_name="lost").suggest("d")
    assert fresh not in (first, lost, again)


# -- 10: SIGINT (Ctrl-C) and SIGTERM end the runs KILLED and leave a resumable study -------

def _stop_cli(proc, sig: int, log: Path) -> None:
    """Sends ``sig`` to the driver alone (as a terminal or a job scheduler does)."""
    try:
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_interrupted(uri: str, name: str, study_dir: Path) -> set[str]:
    """Parent and open child runs KILLED (finished ones untouched), nothing RUNNING, the
    study not finished. Returns the trial ids whose runs were ended KILLED."""
    from study import Study

    (parent,) = [r for r in _all_runs(uri, name) if r.data.tags[S.TAG_ROLE] == S.ROLE_STUDY]
    assert parent.info.status == S.STATUS_KILLED
    assert parent.data.tags[S.TAG_STOP_REASON].startswith("interrupted: continue with")
    runs = child_runs(uri, name)
    statuses = {r.data.tags[S.TAG_TRIAL_ID]: r.info.status for r in runs}
    assert S.STATUS_RUNNING not in statuses.values(), statuses
    killed = {t for t, st in statuses.items() if st == S.STATUS_KILLED}
    assert killed and S.STATUS_FINISHED in statuses.values(), statuses
    for run in runs:
        if run.info.status == S.STATUS_KILLED:
            assert run.data.tags[S.TAG_STOP_REASON].startswith("interrupted")
    assert not Study.open(study_dir).status()["finished"]
    assert not (study_dir / "summary.json").exists()
    return killed


def test_interrupted_study_ends_runs_killed_and_resumes(tmp_path, scifact_dir,
                                                       scifact_features):
    """Ctrl-C (SIGINT) to ``launch`` while a trial is in flight, then SIGTERM to the
    ``resume`` that continues it, then a last ``resume``: each stop exits 130 with the parent
    and the running child runs KILLED (finished ones stay FINISHED) and no summary; the last
    ``resume`` finishes every trial, each (metric, step) logged once. After Ctrl-C (Tune
    saves its state on the way out) no trial that had reported an epoch starts again from
    scratch."""
    from study.launcher import resume

    name, samples, epochs = "interrupted", 6, 4
    space = tiny_space(tmp_path, name, num_samples=samples, epochs=epochs, steps=3,
                       parameters=CONTINUOUS)
    storage = tmp_path / "studies"
    study_dir = storage / name
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    proc = _launch_cli(space, storage, scifact_dir, "--max-concurrent-trials", "2", log=log)
    try:
        wait_for(lambda: _tuning(study_dir, name) and _finished_and_in_flight(uri, name, epochs),
                 240, proc, "a finished trial and one in flight", log)
    finally:
        _stop_cli(proc, signal.SIGINT, log)
    assert "interrupted" in log.read_text()
    killed = _assert_interrupted(uri, name, study_dir)
    reported = {r.data.tags[S.TAG_TRIAL_ID] for r in child_runs(uri, name)
                if METRIC in r.data.metrics}  # Tune's saved state knows their checkpoints

    finished = sum(r.info.status == S.STATUS_FINISHED for r in child_runs(uri, name))
    proc = _cli("resume", str(study_dir), log=log)
    try:
        wait_for(lambda: sum(r.info.status == S.STATUS_FINISHED
                             for r in child_runs(uri, name)) > finished
                 and _finished_and_in_flight(uri, name, epochs), 240, proc,
                 "progress after the resume, and a trial in flight", log)
    finally:
        _stop_cli(proc, signal.SIGTERM, log)
    killed |= _assert_interrupted(uri, name, study_dir)

    summary = resume(study_dir)
    assert summary["trials"] == samples and summary["errored"] == 0, summary
    assert optuna_states(study_dir) == {"COMPLETE": samples}
    epoch_ones = _epoch_one_counts(study_dir, name)
    assert len(epoch_ones) == samples
    assert all(epoch_ones[t] == 1 for t in reported), epoch_ones  # resumed, not rerun
    client = MlflowClient(uri)
    runs = child_runs(uri, name)
    assert sorted(r.data.tags[S.TAG_TRIAL_ID] for r in runs) == sorted(epoch_ones)
    assert {r.data.tags[S.TAG_TRIAL_ID] for r in runs} >= killed
    for run in runs:
        assert run.info.status == S.STATUS_FINISHED
        for key in run.data.metrics:  # no (key, step) twice, in any metric
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)
        assert [s for s, _ in _history(uri, run.info.run_id)] == list(range(1, epochs + 1))
    (parent,) = [r for r in _all_runs(uri, name) if r.data.tags[S.TAG_ROLE] == S.ROLE_STUDY]
    assert parent.info.status == S.STATUS_FINISHED


def test_driver_exception_ends_runs_truthfully(tmp_path, scifact_dir, scifact_features):
    """Any exception in the driver (here: its Optuna study deleted from the storage while
    trials run, so that the next suggestion raises) ends the parent run FAILED with the
    error and the runs of the trials then in flight KILLED; finished runs stay FINISHED."""
    import threading

    import optuna

    from study.launcher import launch

    name = "broken"
    space = tiny_space(tmp_path, name, num_samples=4, epochs=3, steps=3,
                       parameters=CONTINUOUS)
    study_dir = tmp_path / "studies" / name
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    seen: dict = {}

    def break_storage() -> None:
        try:
            wait_for(lambda: _tuning(study_dir, name) and _finished_and_in_flight(uri, name, 3),
                     300, what="a finished trial and one in flight")
            optuna.delete_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            seen["error"] = repr(exc)

    watcher = threading.Thread(target=break_storage, daemon=True)
    watcher.start()
    with pytest.raises(Exception) as info:
        launch(_opts(space, tmp_path / "studies", scifact_dir, max_concurrent_trials=2))
    watcher.join(timeout=60)
    assert "error" not in seen, seen["error"]
    (parent,) = [r for r in _all_runs(uri, name) if r.data.tags[S.TAG_ROLE] == S.ROLE_STUDY]
    assert parent.info.status == S.STATUS_FAILED
    reason = parent.data.tags[S.TAG_STOP_REASON]
    assert reason.startswith("driver failed: ") and type(info.value).__name__ in reason
    statuses = {r.data.tags[S.TAG_TRIAL_ID]: r for r in child_runs(uri, name)}
    assert S.STATUS_RUNNING not in {r.info.status for r in statuses.values()}
    assert S.STATUS_FINISHED in {r.info.status for r in statuses.values()}
    killed = [r for r in statuses.values() if r.info.status == S.STATUS_KILLED]
    assert killed, "no trial was in flight when the driver failed"
    for run in killed:
        assert run.data.tags[S.TAG_STOP_REASON] == reason


def _finished_and_in_flight(uri: str, study: str, epochs: int) -> bool:
    """A finished trial run, and a running one that has reported an epoch but not its last.

    Not "its first epoch only": the MLflow view is written off the trials' path, so under
    load a poll can see a trial's epochs land two at a time, and the last trials of a resume
    then pass through the one-epoch state unseen (seen once in CI-like runs under xdist)."""
    runs = child_runs(uri, study)
    return any(r.info.status == S.STATUS_FINISHED for r in runs) and any(
        r.info.status == S.STATUS_RUNNING and METRIC in r.data.metrics
        and 1 <= len(MlflowClient(uri).get_metric_history(r.info.run_id, METRIC)) < epochs
        for r in runs)


def _all_runs(uri: str, study: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(S.experiment_name(study))
    return client.search_runs([exp.experiment_id], max_results=1000)


# -- 4, 5 (server down mid-study), 8 (security), 10 (FAILED): one in-process study ----------

SECRET = "planted-secret-value"


def test_divergence_outage_and_secrets(tmp_path, scifact_dir, scifact_features, mlflow_server,
                                       monkeypatch):
    """A study whose first start point diverges (lr 1e6, no clipping), run in-process against
    a tracking server that goes away after the first epoch and comes back while trials run;
    a secret is planted in the environment and in the space file's text."""
    import threading
    import time

    import optuna

    from study.launcher import launch

    server = mlflow_server
    uri = _server_up(server)
    monkeypatch.setenv("JEPA_TEST_API_TOKEN", SECRET)
    auth_mode_before = os.environ.get("RAY_AUTH_MODE")
    name, samples, epochs = "diverging", 3, 2
    space = tiny_space(
        tmp_path, name, num_samples=samples, epochs=epochs, steps=3,
        extra_base={"train": {"grad_clip": 0.0, "warmup_ratio": 0.0},
                    "loss": {"lambda_reg": 1.0}},
        parameters={"train.lr": {"type": "categorical", "choices": [0.001, 1000000.0]},
                    "loss.lambda_con": CONTINUOUS["loss.lambda_con"]},
        points_to_evaluate=[{"train.lr": 1000000.0}, {"train.lr": 0.001}],
        description=f"pasted from a notebook: MY_TOKEN={SECRET}")
    study_dir = tmp_path / "studies" / name
    seen: dict = {}
    missed: list[str] = []  # the live MLflow writer's warnings

    class Missed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            missed.append(record.getMessage())

    handler = Missed(logging.WARNING)
    logging.getLogger("study.tuner").addHandler(handler)

    def watch() -> None:  # Ray's security settings while it runs, then the outage
        try:
            wait_for(ray.is_initialized, 300, what="Ray to start")
            from ray._private.authentication.authentication_utils import is_token_auth_enabled

            node = ray._private.worker._global_node
            seen["webui_url"] = node.address_info.get("webui_url")
            seen["token_auth"] = is_token_auth_enabled()
            wait_for(lambda: any(c["data"].get("metrics") for c in _rest_runs(uri, name)[1]),
                     300, what="a first epoch in MLflow")
            server.stop()
            seen["stopped"] = time.time()
            wait_for(lambda: any("a write for trial" in m for m in missed), 60,
                     what="the driver to miss MLflow")
            seen["missed"] = True
            server.start()
            seen["restarted"] = time.time()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            seen["error"] = repr(exc)
            if server.proc is None:
                server.start()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = launch(_opts(space, tmp_path / "studies", scifact_dir, mlflow_uri=uri))
    finally:
        logging.getLogger("study.tuner").removeHandler(handler)
    ended = time.time()
    watcher.join(timeout=120)
    assert "error" not in seen, seen["error"]

    # 8: no dashboard, token authentication left on
    assert not seen["webui_url"], seen
    if auth_mode_before in (None, "token"):  # we never turn it off
        assert seen["token_auth"] and os.environ.get("RAY_AUTH_MODE") != "disabled"

    # 5: the server was away and came back while trials ran; nothing was lost
    assert seen["missed"] and seen["stopped"] < seen["restarted"] < ended
    assert not _missing_from_view(uri, study_dir, name)  # the study's end synced the view

    # 4: the diverging trials failed with a reason, the searcher was told, the others finished
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}"
                               ).trials
    diverging = [t for t in trials if t.params["train.lr"] == 1000000.0]
    healthy = [t for t in trials if t.params["train.lr"] == 0.001]
    assert diverging and healthy and len(trials) == samples
    assert all(t.state.name == "FAIL" and t.value is None for t in diverging)
    assert all(t.state.name == "COMPLETE" and t.value > 0.5 for t in healthy)
    assert summary["trials"] == samples and summary["errored"] == len(diverging)

    parent, children = _rest_runs(uri, name)
    assert parent["info"]["status"] == S.STATUS_FINISHED and len(children) == samples
    by_lr = {}
    for child in children:
        params = {p["key"]: p["value"] for p in child["data"].get("params", [])}
        by_lr.setdefault(float(params["train.lr"]), []).append(child)
        run_id = child["info"]["run_id"]
        if float(params["train.lr"]) > 1:
            assert child["info"]["status"] == S.STATUS_FAILED
            reason = child["tags"][S.TAG_STOP_REASON]
            assert "diverged" in reason and "non-finite" in reason, reason
            assert METRIC in child["tags"].get(S.TAG_NONFINITE, "")  # NaN noted, not a 0
            assert all(math.isfinite(v) and v != 0 for _, v in _rest_history(uri, run_id, METRIC))
        else:
            assert child["info"]["status"] == S.STATUS_FINISHED
            for key in (METRIC, "train_loss", "effective_rank"):
                steps = sorted(s for s, _ in _rest_history(uri, run_id, key))
                assert steps == list(range(1, epochs + 1)), (key, steps)
    assert len(by_lr[1000000.0]) == len(diverging) and len(by_lr[0.001]) == len(healthy)

    # 8: the planted secret is in no param, tag or artifact of the parent and child runs
    client = MlflowClient(uri)
    scrubbed = False
    for run in [parent, *children]:
        run_id = run["info"]["run_id"]
        texts = [f"{p['key']}={p['value']}" for p in run["data"].get("params", [])]
        texts += [f"{k}={v}" for k, v in run["tags"].items()]
        for artifact in client.list_artifacts(run_id):
            if not artifact.is_dir:
                local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "dl"))
                text = Path(local).read_text(errors="replace")
                texts.append(text)
                scrubbed |= artifact.path == S.ARTIFACT_SPACE and "MY_TOKEN=***" in text
        leaks = [t for t in texts if SECRET in t]
        assert not leaks, leaks
    assert scrubbed, "the space file's text reached MLflow without passing the scrubber"


# -- 5 (unreachable at launch), 6 (bad space), 7 (bad data): refused before anything starts ---

def _space_variant(tmp_path: Path, name: str, edit) -> Path:
    """The tiny space with one mistake in it."""
    import yaml

    path = tiny_space(tmp_path, name)
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _param(path: str, **spec):
    return lambda raw: raw["parameters"].update({path: spec})


BAD_SPACES = {  # mistake -> (edit, what the message must name besides the file)
    "unknown_key": (lambda r: r.update(paramters={}), "paramters: unknown field"),
    "unknown_field": (_param("loss.lambda_foo", type="float", low=0.1, high=1.0),
                      "parameters.loss.lambda_foo: unknown config field"),
    "negative_lambda": (_param("loss.lambda_con", type="float", low=-1.0, high=1.0),
                        "parameters.loss.lambda_con.low"),
    "depth_zero": (_param("model.predictor.depth", type="int", low=0, high=3),
                   "parameters.model.predictor.depth.low"),
    "wrong_type": (lambda r: r.update(num_samples="many"), "num_samples"),
    "empty_space": (lambda r: r.update(parameters={}), "parameters: empty"),
    "contradictory_switches": (  # λ_pred's switch off leaves every λ at 0
        lambda r: r["base"].update(loss={"lambda_con": 0.0, "lambda_iso": 0.0,
                                         "lambda_reg": 0.0}),
        "parameters: contradictory settings"),
}


def _bad_data(root: Path, mistake: str) -> tuple[Path, str]:
    """A BEIR directory with one mistake, and what the message must name."""
    from test_data import HEADER, write_beir

    if mistake == "missing_dir":
        return root / "nowhere", f"{root / 'nowhere'} (given explicitly) does not exist"
    good = {"train": HEADER + "".join(f"q{i}\td{i % 6}\t1\n" for i in range(8)),
            "test": HEADER + "q8\td1\t1\nq9\td2\t2\n"}
    if mistake == "missing_file":
        write_beir(root, qrels=good)
        (root / "queries.jsonl").unlink()
        return root, f"{root / 'queries.jsonl'} does not exist"
    if mistake == "malformed_jsonl":
        queries = "".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                          for i in range(10))
        write_beir(root, queries=queries.replace('"q3"', 'q3'), qrels=good)
        return root, f"{root / 'queries.jsonl'}: line 4: malformed JSON"
    if mistake == "unknown_query":
        write_beir(root, qrels={**good, "train": good["train"] + "q77\td1\t1\n"})
        return root, f"{root / 'qrels' / 'train.tsv'}: line 10: unknown query id 'q77'"
    if mistake == "unknown_doc":
        write_beir(root, qrels={**good, "test": good["test"] + "q9\td99\t1\n"})
        return root, f"{root / 'qrels' / 'test.tsv'}: line 4: unknown document id 'd99'"
    if mistake == "empty_split":
        write_beir(root, qrels={**good, "test": HEADER})
        return root, f"{root / 'qrels' / 'test.tsv'}: split 'test' has no"
    raise ValueError(mistake)


BAD_DATA = ["missing_dir", "missing_file", "malformed_jsonl", "unknown_query", "unknown_doc",
            "empty_split"]


@pytest.mark.parametrize("mistake", list(BAD_SPACES) + [f"data:{m}" for m in BAD_DATA])
def test_bad_input_is_refused_before_anything_starts(tmp_path, scifact_dir, capsys, mistake):
    """``jepa-study launch`` (in-process ``main``) returns 2 with a message naming the file
    and the field or line; no study directory, no Ray."""
    from study.cli import main

    data = scifact_dir
    if mistake.startswith("data:"):
        data, named = _bad_data(tmp_path / "beir", mistake[5:])
        space = tiny_space(tmp_path, "fine")
        named = [named]
    else:
        edit, field = BAD_SPACES[mistake]
        space = _space_variant(tmp_path, mistake, edit)
        named = [str(space), field]
    storage = tmp_path / "studies"
    code = main(["launch", "--space", str(space), "--storage", str(storage), "--data",
                 str(data)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in named:
        assert text in err, (text, err)
    assert not ray.is_initialized()
    assert not storage.exists() or not any(storage.iterdir())


def test_cli_refuses_bad_input_without_starting_ray(tmp_path, scifact_dir, scifact_features):
    """As a command: exit status 2 within seconds, a one-line error, no study directory and
    no Ray session (Ray's temp dir is pointed at an empty directory). Also an unreachable
    tracking server (scenario 5 at launch)."""
    import subprocess
    import sys
    import tempfile
    import time

    bad_space = _space_variant(tmp_path, "bad", _param("model.predictor.depth", type="int",
                                                       low=0, high=3))
    bad_data, named = _bad_data(tmp_path / "beir", "malformed_jsonl")
    good_space = tiny_space(tmp_path, "good")
    dead = f"http://127.0.0.1:{free_port()}"
    cases = {
        "space": (["--space", str(bad_space), "--data", str(scifact_dir)],
                  [str(bad_space), "parameters.model.predictor.depth"]),
        "data": (["--space", str(good_space), "--data", str(bad_data)], [named]),
        "tracking": (["--space", str(good_space), "--data", str(scifact_dir),
                      "--mlflow-uri", dead], [dead, "does not answer"]),
    }
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "RAY_TMPDIR": str(ray_tmp)}
    started, procs = time.time(), {}
    for case, (args, _) in cases.items():  # side by side: each pays Python's imports
        procs[case] = subprocess.Popen(
            [sys.executable, "-m", "study.cli", "launch", "--storage",
             str(tmp_path / case), *args], env=env, cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for case, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (case, out, err)
            assert "Traceback" not in err and err.startswith("error: "), (case, err)
            for text in cases[case][1]:
                assert text in err, (case, text, err)
            assert not (tmp_path / case).exists() or not any((tmp_path / case).iterdir()), \
                case
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert time.time() - started < 90  # seconds, not a Ray start-up and a study
    assert not list(ray_tmp.rglob("session_*")), "a Ray session was started"
    os.rmdir(ray_tmp)
