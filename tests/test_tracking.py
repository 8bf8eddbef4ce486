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

import pytest
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port, mlflow_server, tracking_uri  # noqa: F401

from analysis import schema as S
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


def test_parent_and_children(tracking_uri):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    tracker.check_reachable()
    parent = tracker.start_study({"space": {"lr": [1e-4, 1e-2]}}, {S.TAG_GIT_COMMIT: "abc123"},
                                 space_yaml="lr: [0.0001, 0.01]\n")
    kids = [tracker.trial_run(t, {"lr": 0.01, "model": {"depth": 2}}, "lr: 0.01\n")
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
        assert child.info.run_name == trial_id
        assert [a.path for a in client.list_artifacts(kid)] == [S.ARTIFACT_CONFIG]
    tracker.end_study(S.STATUS_KILLED)
    assert client.get_run(parent).info.status == S.STATUS_KILLED
    again = StudyTracker(tracking_uri, tracker.study_name)  # resume: same parent, RUNNING
    assert again.start_study({}, {}) == parent
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
    copy.start_study({}, {})  # creates the experiment
    tags = client.get_experiment_by_name(tracker.experiment_name).tags
    assert tags[S.TAG_EXPERIMENT_KIND] == S.EXPERIMENT_KIND == "custom_model_development"
    assert tags[S.TAG_EXPERIMENT_NOTE] == about

    bare = _study()  # an experiment made without the tags: they are added on resume
    exp_id = client.create_experiment(S.experiment_name(bare))
    StudyTracker(tracking_uri, bare, description=about).start_study({}, {})
    tags = client.get_experiment(exp_id).tags
    assert (tags[S.TAG_EXPERIMENT_KIND], tags[S.TAG_EXPERIMENT_NOTE]) == (S.EXPERIMENT_KIND, about)

    client.set_experiment_tag(exp_id, S.TAG_EXPERIMENT_NOTE, "edited in the UI")
    StudyTracker(tracking_uri, bare, description="new text").start_study({}, {})
    assert client.get_experiment(exp_id).tags[S.TAG_EXPERIMENT_NOTE] == "edited in the UI"
    StudyTracker(tracking_uri, bare).start_study({}, {})  # no description: nothing removed
    assert client.get_experiment(exp_id).tags[S.TAG_EXPERIMENT_NOTE] == "edited in the UI"


def test_one_run_per_trial_id(tracking_uri):
    study, client = _study(), MlflowClient(tracking_uri)
    first = StudyTracker(tracking_uri, study)
    first.start_study({}, {})
    a = first.trial_run("t1", {"lr": 1}, None)
    assert first.trial_run("t1", {"lr": 1, "wd": 0.1}, None) == a
    fresh = StudyTracker(tracking_uri, study)
    assert fresh.trial_run("t1", {"lr": 3}, None) == a  # changed value: kept, no error
    runs = _trial_runs(client, fresh, "t1")
    assert [r.info.run_id for r in runs] == [a]
    assert runs[0].data.params == {"lr": "1", "wd": "0.1"}


def test_resumed_trial_logs_each_step_once(tracking_uri):
    study, client = _study(), MlflowClient(tracking_uri)
    first = StudyTracker(tracking_uri, study)
    run_id = first.trial_run("t1", {}, None)
    for epoch in (1, 2, 3):
        first.log_epoch("t1", {"loss": float(epoch), "ndcg@10": 0.1 * epoch}, step=epoch)
    first.end_trial("t1", S.STATUS_KILLED, "driver stopped")
    second = StudyTracker(tracking_uri, study)  # a resumed driver
    assert second.trial_run("t1", {}, None) == run_id
    run = client.get_run(run_id)
    assert run.info.status == S.STATUS_RUNNING
    assert S.TAG_STOP_REASON not in run.data.tags
    for epoch in (2, 3, 4, 5):
        second.log_epoch("t1", {"loss": 10.0 + epoch, "ndcg@10": 0.2}, step=epoch)
    second.log_epoch("t1", {"loss": 99.0}, step=5)  # same process, same (key, step)
    assert _history(client, run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0),
                                               (5, 15.0)]
    assert [s for s, _ in _history(client, run_id, "ndcg_at_10")] == [1, 2, 3, 4, 5]


def test_end_statuses_and_reopen(tracking_uri):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    cases = {"ok": (S.STATUS_FINISHED, None), "bad": (S.STATUS_FAILED, "ValueError: boom"),
             "cut": (S.STATUS_KILLED, "asha")}
    ids = {t: tracker.trial_run(t, {}, None) for t in cases}
    for trial_id, (status, reason) in cases.items():
        tracker.end_trial(trial_id, status, reason)
    for trial_id, (status, reason) in cases.items():
        run = client.get_run(ids[trial_id])
        assert run.info.status == status
        assert run.data.tags[S.TAG_STATUS] == status
        assert run.data.tags.get(S.TAG_STOP_REASON) == reason
    assert tracker.trial_run("bad", {}, None) == ids["bad"]  # retried trial
    run = client.get_run(ids["bad"])
    assert (run.info.status, run.data.tags[S.TAG_STATUS]) == (S.STATUS_RUNNING, S.STATUS_RUNNING)
    with pytest.raises(ValueError):
        tracker.end_trial("ok", "DONE")


def test_children_visible_over_rest(tracking_uri):
    if not tracking_uri.startswith("http"):
        pytest.skip("REST API only on the server backend")
    tracker = StudyTracker(tracking_uri, _study())
    parent = tracker.start_study({}, {})
    kids = {tracker.trial_run(t, {}, None) for t in ("a", "b")}
    body = json.dumps({"experiment_ids": [tracker.experiment_id()],
                       "filter": f"tags.mlflow.parentRunId = '{parent}'"}).encode()
    req = urllib.request.Request(f"{tracking_uri}/api/2.0/mlflow/runs/search", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        runs = json.load(resp)["runs"]
    assert {r["info"]["run_id"] for r in runs} == kids


def test_sanitised_keys_and_nonfinite(tracking_uri):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    run_id = tracker.trial_run("t1", {"eval.k@": 10}, None)
    tracker.log_epoch("t1", {"ndcg@10": 0.5, "loss": math.nan, "note": "text"}, step=1)
    tracker.log_epoch("t1", {"ndcg@10": 0.6, "loss": math.inf}, step=2)
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
    tracker.start_study(params, {"who": secret})
    run_id = tracker.trial_run("t1", clean, f"token: {secret}\n")
    tracker.end_trial("t1", S.STATUS_FAILED, f"error with {secret} inside")
    for rid in (run_id, tracker.run_id()):
        run = client.get_run(rid)
        logged = {**run.data.params, **run.data.tags}
        assert not [k for k, v in logged.items() if secret in v or secret in k]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}
    text = Path(client.download_artifacts(run_id, S.ARTIFACT_CONFIG, str(tmp_path))).read_text()
    assert secret not in text and text.startswith("token:")


class _Trial:
    """What the callback reads of a Tune trial."""

    def __init__(self, trial_id: str, config: dict) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, {}

    def get_error(self) -> str:
        return "Failure # 1\n  File x.py\nRuntimeError: boom\n"

    def __str__(self) -> str:
        return f"jepa_trial_{self.trial_id}"


def _why(trial) -> str:
    return trial.last_result["why"]


def _result(epoch: int, **metrics) -> dict:
    return {"epoch": epoch, "training_iteration": epoch + 10, "time_total_s": 3.0,
            "done": False, "hostname": "h", "trial_id": "x", "node_id": "n", "diverged": False,
            **metrics}


def test_callback_drives_tracker(tracking_uri):
    tracker, client = StudyTracker(tracking_uri, _study()), MlflowClient(tracking_uri)
    tracker.start_study({}, {})
    callback = MLflowTrialCallback(tracker, stop_reason=_why)
    copy = pickle.loads(pickle.dumps(callback))  # Tune pickles callbacks into its state
    assert (copy.tracker.study_name, copy.tracker.tracking_uri) == (tracker.study_name,
                                                                    tracking_uri)
    trial = _Trial("abc_00000", {"lr": 0.1, "model": {"depth": 2}})
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    for epoch in (1, 2):
        trial.last_result = {"why": "asha"}
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(epoch, dev_ndcg_at_10=0.1 * epoch))
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    trial.last_result = {"why": "changed after the callback: not the stop reason"}
    callback.flush()  # the writes run on the callback's own thread
    run = client.get_run(tracker.run_id("abc_00000"))
    assert set(run.data.metrics) == {"dev_ndcg_at_10"}
    assert [s for s, _ in _history(client, run.info.run_id, "dev_ndcg_at_10")] == [1, 2]
    assert (run.info.status, run.data.tags[S.TAG_STOP_REASON]) == (S.STATUS_FINISHED, "asha")
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


def test_server_down_mid_study(mlflow_server, caplog):
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
        tracker.start_study({}, {})
        callback = MLflowTrialCallback(tracker)
        callback.RETRY_S = 1.0
        trial = _Trial("t1", {"lr": 0.1})
        callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial,
                                 result=_result(1, loss=1.0))
        callback.flush()
        run_id = tracker.run_id("t1")
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
