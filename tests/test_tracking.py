"""StudyTracker and the live Tune callback against a sqlite store and a real tracking server,
including an outage of the server (what the outage leaves out is ``sync``'s: test_sync.py)."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port, mlflow_server, tracking_uri  # noqa: F401
from study_helpers import write_parent

from analysis import schema as S
from study.sync import TrialRecord, TrialWriter
from study.tracking import StudyTracker, TrackingError, redact
from study.tuner import MLflowTrialCallback


def _study() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _trial_runs(client: MlflowClient, tracker: StudyTracker, trial_id: str) -> list:
    exp = client.get_experiment_by_name(tracker.experiment_name)
    return client.search_runs([exp.experiment_id],
                              f"tags.`{S.TAG_TRIAL_ID}` = '{trial_id}'")


def _writer(tracker: StudyTracker, study_dir: Path, max_epochs: int = 10) -> TrialWriter:
    return TrialWriter(tracker, str(study_dir), max_epochs)


def _record(trial_id: str, config: dict | None = None, results: list | None = None,
            status: str = "RUNNING", error: str | None = None) -> TrialRecord:
    """A trial as Tune has it (``TrialRecord``: what the callback and sync hand the writer)."""
    return TrialRecord(trial_id, f"jepa_trial_{trial_id}", status, config or {}, results or [],
                       error)


def test_parent_and_children(tracking_uri, tmp_path):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    tracker.check_reachable()
    parent = write_parent(tracker, {"space": {"lr": [1e-4, 1e-2]}}, {S.TAG_GIT_COMMIT: "abc123"},
                     "lr: [0.0001, 0.01]\n")
    writer = _writer(tracker, tmp_path)
    kids = [writer.write(_record(t, {"lr": 0.01, "model": {"depth": 2}})).run_id
            for t in ("t_00000", "t_00001")]
    run = client.get_run(parent)
    assert run.data.tags[S.TAG_ROLE] == S.ROLE_STUDY
    assert run.data.tags[S.TAG_GIT_COMMIT] == "abc123"
    assert run.data.params["space.lr"] == "[0.0001, 0.01]"
    assert [a.path for a in client.list_artifacts(parent)] == [S.ARTIFACT_SPACE]
    for trial_id, kid in zip(("t_00000", "t_00001"), kids):
        child = client.get_run(kid)
        assert child.data.tags[S.TAG_PARENT_RUN_ID] == parent
        assert child.data.tags[S.TAG_TRIAL_ID] == trial_id
        assert child.data.tags[S.TAG_ROLE] == S.ROLE_TRIAL
        assert child.data.params["model.depth"] == "2"
        assert child.info.run_name == f"jepa_trial_{trial_id}"
        assert [a.path for a in client.list_artifacts(kid)] == [S.ARTIFACT_CONFIG]
        config = client.download_artifacts(kid, S.ARTIFACT_CONFIG, str(tmp_path / kid))
        assert "depth: 2" in Path(config).read_text()
    tracker.end(tracker.run(), S.STATUS_KILLED, None)
    assert client.get_run(parent).info.status == S.STATUS_KILLED
    again = StudyTracker(tracking_uri, tracker.study_name)  # resume: same parent, RUNNING
    assert write_parent(again) == parent
    assert client.get_run(parent).info.status == S.STATUS_RUNNING
    location = client.get_experiment_by_name(tracker.experiment_name).artifact_location
    if tracking_uri.startswith("sqlite"):  # beside the store, never in the working directory
        assert location.startswith(Path(tracking_uri[len("sqlite:///"):]).parent.as_uri())


def test_experiment_kind_and_description(tracking_uri):
    """The study's experiment is MLflow model development with the tracker's description:
    set when it is created, added to an existing experiment that lacks them (a resumed
    study), and a description the experiment has is kept."""

    client = MlflowClient(tracking_uri)
    about = "Study s searches the space quick: a few trials. Report: /studies/s/report.html"
    tracker = StudyTracker(tracking_uri, _study(), description=about)
    copy = pickle.loads(pickle.dumps(tracker))  # as Tune restores the callback's tracker
    write_parent(copy)  # creates the experiment
    tags = client.get_experiment_by_name(tracker.experiment_name).tags
    assert tags[S.TAG_EXPERIMENT_KIND] == S.EXPERIMENT_KIND == "custom_model_development"
    assert tags[S.TAG_EXPERIMENT_NOTE] == about

    bare = _study()  # an experiment made without the tags: they are added on resume
    exp_id = client.create_experiment(S.experiment_name(bare))
    write_parent(StudyTracker(tracking_uri, bare, description=about))
    tags = client.get_experiment(exp_id).tags
    assert (tags[S.TAG_EXPERIMENT_KIND], tags[S.TAG_EXPERIMENT_NOTE]) == (S.EXPERIMENT_KIND, about)

    client.set_experiment_tag(exp_id, S.TAG_EXPERIMENT_NOTE, "edited in the UI")
    write_parent(StudyTracker(tracking_uri, bare, description="new text"))
    assert client.get_experiment(exp_id).tags[S.TAG_EXPERIMENT_NOTE] == "edited in the UI"
    write_parent(StudyTracker(tracking_uri, bare))  # no description: nothing removed
    assert client.get_experiment(exp_id).tags[S.TAG_EXPERIMENT_NOTE] == "edited in the UI"


def test_one_run_per_trial_id(tracking_uri, tmp_path):
    """A trial's run is found again, by this writer and a fresh one (a resumed driver); the
    params a run has are kept, the ones it lacks on first write are added."""
    study, client = _study(), MlflowClient(tracking_uri)
    first = _writer(StudyTracker(tracking_uri, study), tmp_path)
    a = first.write(_record("t1", {"lr": 1, "wd": 0.1})).run_id
    assert first.write(_record("t1", {"lr": 2})).run_id == a
    fresh = _writer(StudyTracker(tracking_uri, study), tmp_path)
    assert fresh.write(_record("t1", {"lr": 3})).run_id == a  # changed value: kept, no error
    runs = _trial_runs(client, fresh.tracker, "t1")
    assert [r.info.run_id for r in runs] == [a]
    assert runs[0].data.params == {"lr": "1", "wd": "0.1"}
    assert _writer(StudyTracker(tracking_uri, study), tmp_path).write(
        _record("t2", status="PENDING"), live=True) is None  # never started: no run


def test_resumed_trial_logs_each_step_once(tracking_uri, tmp_path):
    study, client = _study(), MlflowClient(tracking_uri)
    first = _writer(StudyTracker(tracking_uri, study), tmp_path)
    run_id = first.write(_record("t1", results=[
        _result(e, loss=float(e), **{"ndcg@10": 0.1 * e}) for e in (1, 2, 3)])).run_id
    first.tracker.end(first.tracker.run("t1"), S.STATUS_KILLED, "driver stopped")
    second = _writer(StudyTracker(tracking_uri, study), tmp_path)  # a resumed driver
    assert second.write(_record("t1")).run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == S.STATUS_RUNNING
    assert S.TAG_STOP_REASON not in run.data.tags
    for epoch in (2, 3, 4, 5):
        second.write(_record("t1", results=[_result(epoch, loss=10.0 + epoch,
                                                    **{"ndcg@10": 0.2})]))
    second.write(_record("t1", results=[_result(5, loss=99.0)]))  # same (key, step)
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0),
                                               (5, 15.0)]
    assert [s for s, _ in _history(client, run_id, "ndcg_at_10")] == [1, 2, 3, 4, 5]


def test_end_statuses_and_reopen(tracking_uri, tmp_path):
    """Tune's end of a trial as the run's status and stop reason (the trial's error; the
    collapse guard's marker; the loop's end reason; a scheduler's stop before the budget;
    completed); left RUNNING by a driver that is gone: KILLED; a retried trial reopens."""
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    writer = _writer(tracker, tmp_path, max_epochs=3)
    (tmp_path / "stops").mkdir()
    (tmp_path / "stops" / "guarded.txt").write_text("collapse: effective_rank 2 < 4")
    cases = {"bad": (_record("bad", results=[_result(1)], status="ERROR",
                             error="ValueError: boom"), S.STATUS_FAILED, "ValueError: boom"),
             "guarded": (_record("guarded", results=[_result(2)], status="TERMINATED"),
                         S.STATUS_FINISHED, "collapse: effective_rank 2 < 4"),
             "patience": (_record("patience", results=[_result(2, end_reason="patience")],
                                  status="TERMINATED"), S.STATUS_FINISHED, "patience"),
             "asha": (_record("asha", results=[_result(1)], status="TERMINATED"),
                      S.STATUS_FINISHED,
                      "early_stopped: scheduler stopped the trial after epoch 1"),
             "ok": (_record("ok", results=[_result(3)], status="TERMINATED"), S.STATUS_FINISHED,
                    "completed"),
             "gone": (_record("gone", results=[_result(1)]), S.STATUS_KILLED, "driver failed")}
    ids = {t: writer.write(rec, live=t != "gone", leftover=(S.STATUS_KILLED, "driver failed")
                           ).run_id for t, (rec, _, _) in cases.items()}
    for trial_id, (_, status, reason) in cases.items():
        run = client.get_run(ids[trial_id])
        assert run.info.status == status, trial_id
        assert run.data.tags[S.TAG_STATUS] == status
        assert run.data.tags.get(S.TAG_STOP_REASON) == reason
    assert writer.write(_record("bad")).run_id == ids["bad"]  # retried trial
    run = client.get_run(ids["bad"])
    assert (run.info.status, run.data.tags[S.TAG_STATUS]) == (S.STATUS_RUNNING, S.STATUS_RUNNING)
    assert S.TAG_STOP_REASON not in run.data.tags
    with pytest.raises(ValueError):
        tracker.end(tracker.run("ok"), "DONE", None)


def test_children_visible_over_rest(tracking_uri, tmp_path):
    if not tracking_uri.startswith("http"):
        pytest.skip("REST API only on the server backend")
    tracker = StudyTracker(tracking_uri, _study())
    parent = write_parent(tracker)
    kids = {_writer(tracker, tmp_path).write(_record(t)).run_id for t in ("a", "b")}
    body = json.dumps({"experiment_ids": [tracker.experiment_id()],
                       "filter": f"tags.mlflow.parentRunId = '{parent}'"}).encode()
    req = urllib.request.Request(f"{tracking_uri}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        runs = json.load(resp)["runs"]
    assert {r["info"]["run_id"] for r in runs} == kids


def test_sanitised_keys_and_nonfinite(tracking_uri, tmp_path):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    writer = _writer(tracker, tmp_path)
    run_id = writer.write(_record("t1", {"eval.k@": 10}, [
        _result(1, **{"ndcg@10": 0.5, "loss": math.nan, "note": "text"})])).run_id
    writer.write(_record("t1", results=[_result(2, **{"ndcg@10": 0.6, "loss": math.inf})]))
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"ndcg_at_10"}
    assert run.data.params == {"eval.k_at_": "10"}
    assert S.parse_nonfinite(run.data.tags[S.TAG_NONFINITE]) == [("loss", 1), ("loss", 2)]
    assert client.get_metric_history(run_id, "loss") == []


def test_secrets_never_logged(tracking_uri, monkeypatch, tmp_path):
    secret = "s3cr3t-value"
    monkeypatch.setenv("JEPA_TEST_SECRET_TOKEN", secret)
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    params = {"lr": 0.1, "hub": {"token": "abc", "repo": f"user:{secret}@hub"}, "note": secret,
              "API_KEY": "k", "auth": "basic"}
    clean = redact(params)
    assert clean == {"lr": 0.1, "hub": {}}
    parent = write_parent(tracker, params, {"who": secret})

    def config(tune_config: dict) -> SimpleNamespace:  # a run config whose YAML leaks
        return SimpleNamespace(to_dict=lambda: tune_config,
                               to_yaml=lambda: f"token: {secret}\nlr: 0.1\n")

    writer = TrialWriter(tracker, str(tmp_path), 10, config)
    run_id = writer.write(_record("t1", clean, [_result(1)], "ERROR",
                                  f"error with {secret} inside")).run_id
    for rid in (run_id, parent):
        run = client.get_run(rid)
        logged = {**run.data.params, **run.data.tags}
        assert not [k for k, v in logged.items() if secret in v or secret in k]
    assert {k: v for k, v in client.get_run(run_id).data.params.items()
            if not k.startswith(S.SEARCH_PREFIX)} == {"lr": "0.1"}
    text = Path(client.download_artifacts(run_id, S.ARTIFACT_CONFIG, str(tmp_path))).read_text()
    assert secret not in text and text.startswith("token:")


class _Trial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, {}
        self.error_file = "/nonexistent/error.txt"

    def get_error(self) -> str:
        return "Failure # 1\n  File x.py\nRuntimeError: boom\n"

    def __str__(self) -> str:
        return f"jepa_trial_{self.trial_id}"


def _result(epoch: int, **metrics) -> dict:
    return {"epoch": epoch, "training_iteration": epoch + 10, "time_total_s": 3.0,
            "done": False, "hostname": "h", "trial_id": "x", "node_id": "n", "diverged": False,
            **metrics}


def test_callback_drives_tracker(tracking_uri, tmp_path):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    write_parent(tracker)
    callback = MLflowTrialCallback(_writer(tracker, tmp_path))
    copy = pickle.loads(pickle.dumps(callback))  # Tune pickles callbacks into its state
    assert (copy.tracker.study_name, copy.tracker.tracking_uri) == (tracker.study_name,
                                                                    tracking_uri)
    trial = _Trial("abc_00000", {"lr": 0.1, "model": {"depth": 2}})
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    for epoch in (1, 2):
        trial.last_result = _result(epoch, dev_ndcg_at_10=0.1 * epoch, end_reason="patience")
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=trial.last_result)
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    trial.last_result = _result(2, end_reason="changed after the callback: not the reason")
    callback.flush()  # the writes run on the callback's own thread
    run = client.get_run(tracker.run("abc_00000").run_id)
    assert set(run.data.metrics) == {"dev_ndcg_at_10"}
    assert [s for s, _ in _history(client, run.info.run_id, "dev_ndcg_at_10")] == [1, 2]
    assert (run.info.status, run.data.tags[S.TAG_STOP_REASON]) == (S.STATUS_FINISHED,
                                                                   "patience")
    assert run.data.params == {"lr": "0.1", "model.depth": "2"}
    assert run.data.tags[S.TAG_RUN_NAME] == "jepa_trial_abc_00000"
    callback.on_trial_error(iteration=3, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])  # waits for the writes
    run = client.get_run(run.info.run_id)
    assert (run.info.status, run.data.tags[S.TAG_STOP_REASON]) == (S.STATUS_FAILED,
                                                                   "RuntimeError: boom")


def test_check_reachable_fails_fast_on_dead_port():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri):
        StudyTracker(uri, "dead").check_reachable()
    assert time.monotonic() - start < 10


def test_mlflow_key():
    assert S.mlflow_key("ndcg@10") == "ndcg_at_10"
    for name in ("a/../b", "/x//y/", "..z", "é:ü", "", "x" * 300):
        key = S.mlflow_key(name)
        assert key == S.mlflow_key(key) and not key.startswith(("/", ".."))
        assert len(key) <= 250 and all(c.isascii() for c in key)


def test_server_down_mid_study(mlflow_server, caplog, tmp_path):
    """The live callback under an outage: Tune's side never waits for MLflow (the writes run
    on the callback's thread); MLflow's own retries (bounded, not off) stall the first write
    that fails for seconds at most, later ones are skipped at once while the server is away,
    a single warning says so, and writing resumes once it answers again. The epochs it missed
    are ``sync``'s (test_sync.py)."""
    server = mlflow_server  # stopped and restarted: same port, same store
    if server.proc is None:
        server.start()
    server.wait()
    caplog.set_level(logging.WARNING, logger="study.tuner")
    try:
        tracker = StudyTracker(server.uri, _study())
        assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) > 0
        write_parent(tracker)
        callback = MLflowTrialCallback(_writer(tracker, tmp_path))
        callback.RETRY_S = 1.0
        trial = _Trial("t1", {"lr": 0.1})
        callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(1, loss=1.0))
        callback.flush()
        run_id = tracker.run("t1").run_id
        server.stop()
        start = time.monotonic()
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(2, loss=2.0))
        assert time.monotonic() - start < 0.5  # queued: Tune's side does not wait
        callback.flush()
        assert time.monotonic() - start < 30  # MLflow's retries, then the callback gives up
        start = time.monotonic()
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(3, loss=3.0))
        callback.flush()
        assert time.monotonic() - start < 3  # skipped while the server is away
        warned = [r.getMessage() for r in caplog.records if r.name == "study.tuner"]
        assert len(warned) == 1 and "failed" in warned[0] and "sync" in warned[0], warned
        server.start()
        time.sleep(callback.RETRY_S)
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(4, loss=4.0))
        callback.on_trial_complete(iteration=1, trials=[trial], trial=trial)
        callback.flush()
        client = MlflowClient(server.uri)
        assert _history(client, run_id, "loss") == [(1, 1.0), (4, 4.0)]  # 2, 3: sync's
        assert client.get_run(run_id).info.status == S.STATUS_FINISHED
        assert "answers again" in caplog.records[-1].getMessage()
    finally:
        if server.proc is None:
            server.start()
