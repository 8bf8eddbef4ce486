"""``jepa-study sync``: the MLflow view rebuilt from a study's record, against a sqlite store and
a real tracking server, from an empty store and from one with missing, partial, duplicate and
stale records. Running it again changes nothing.

The record is a real one: a small Tune experiment (a stand-in trainable that reports three
epochs; one trial reports a NaN, one raises) in a study directory with a real space file. A
killed driver's record is made from it by saving one finished trial as RUNNING, as Tune's
state holds a trial that was running when the driver died.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port, mlflow_server, tracking_uri  # noqa: F401
from study_helpers import tiny_space

from analysis import schema as S
from study.cli import main
from study.study import Study, StudyError, StudyOptions
from study.sync import read_trials
from study.sync import sync as sync_study

NAME = "record"
EPOCHS = 3
PARAMETERS = {
    "loss.lambda_pred": {"type": "float", "low": 0.1, "high": 2.0, "log": True},
    "loss.lambda_con": {"type": "float", "low": 0.05, "high": 1.0, "log": True},
}
#: lambda_con -> what the stand-in trial does
FINISHES, NAN_AT_2, RAISES_AT_2, KILLED = 0.1, 0.2, 0.3, 0.4


def _trainable(config: dict) -> None:
    from ray import tune

    con = config["loss.lambda_con"]
    best = 0.0
    for epoch in range(1, EPOCHS + 1):
        if con == RAISES_AT_2 and epoch == 2:
            raise RuntimeError("boom at epoch 2")
        dev = round(0.1 * epoch + con, 6)
        best = max(best, dev)
        tune.report({"epoch": epoch, "dev_ndcg_at_10": dev, "best_dev_ndcg_at_10": best,
                     "best_epoch": epoch, "train_loss": 1.0 / epoch, "end_reason": "",
                     "pred_error": math.nan if con == NAN_AT_2 and epoch == 2 else 0.5})


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Path:
    """A study directory whose Tune experiment holds four trials: two finished (one with a
    NaN at epoch 2), one failed at epoch 2, one RUNNING when its driver was killed."""
    import ray
    from ray import tune

    root = tmp_path_factory.mktemp("record")
    study_dir = root / NAME
    study_dir.mkdir()
    space = tiny_space(root, NAME, epochs=EPOCHS, parameters=PARAMETERS)
    shutil.copy(space, study_dir / "space.yaml")
    here = Path(__file__).resolve().parent  # the trials import _trainable from here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{here}:{here.parent}"}})
    try:
        tune.Tuner(_trainable, param_space={
            "loss.lambda_pred": 1.0,
            "loss.lambda_con": tune.grid_search([FINISHES, NAN_AT_2, RAISES_AT_2, KILLED])},
            run_config=tune.RunConfig(name=NAME, storage_path=str(study_dir / "ray"),
                                      verbose=0)).fit()
    finally:
        ray.shutdown()
    (state,) = (study_dir / "ray" / NAME).glob("experiment_state-*.json")
    saved = json.loads(state.read_text())
    for entry in saved["trial_data"]:
        trial = json.loads(entry[0])
        if trial["config"]["loss.lambda_con"] == KILLED:
            trial["status"] = "RUNNING"
            entry[0] = json.dumps(trial)
    state.write_text(json.dumps(saved))
    assert [t.status for t in read_trials(study_dir / "ray" / NAME)].count("TERMINATED") == 2
    meta = {"name": NAME, "options": {**StudyOptions().__dict__, "space": str(space)},
            "space_file": str(study_dir / "space.yaml"), "data_dir": str(root / "data"),
            "mlflow_uri": "", "git_commit": "abc"}
    (study_dir / "study.json").write_text(json.dumps(meta))
    return study_dir


def sync(study_dir: Path, **kw):
    """``study.sync.sync`` of the study in ``study_dir``, opened afresh (as a command does)."""
    return sync_study(Study.open(study_dir), **kw)


def _study(record: Path, tmp_path: Path, uri: str) -> Path:
    """A copy of the record under a new study name (its own MLflow experiment)."""
    name = f"s-{uuid.uuid4().hex[:8]}"
    study_dir = tmp_path / name
    shutil.copytree(record, study_dir)
    (study_dir / "ray" / NAME).rename(study_dir / "ray" / name)
    meta = json.loads((study_dir / "study.json").read_text())
    meta.update(name=name, space_file=str(study_dir / "space.yaml"), mlflow_uri=uri)
    (study_dir / "study.json").write_text(json.dumps(meta))
    return study_dir


def _trials(study_dir: Path) -> dict[float, str]:
    """lambda_con -> trial id."""
    return {t.config["loss.lambda_con"]: t.trial_id
            for t in read_trials(study_dir / "ray" / study_dir.name)}


def _runs(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(S.experiment_name(name))
    return client.search_runs([exp.experiment_id], max_results=1000)


def _view(uri: str, name: str) -> dict:
    """Everything sync may touch, for comparing two states of the store."""
    client = MlflowClient(uri)
    view = {}
    for run in _runs(uri, name):
        histories = {key: sorted((m.step, m.value) for m in client.get_metric_history(
            run.info.run_id, key)) for key in run.data.metrics}
        view[run.info.run_id] = (run.info.status, dict(run.data.params), dict(run.data.tags),
                                 histories,
                                 sorted(a.path for a in client.list_artifacts(run.info.run_id)))
    return view


def _check(uri: str, study_dir: Path, *, killed: tuple[str, str] = (S.STATUS_KILLED,
                                                                   S.STOP_REASON_ORPHANED),
           extra: dict[str, str] | None = None) -> dict:
    """The view matches the record: one parent, one child per trial (and per run of a trial
    the record does not know, ``extra``: trial id -> status), each (key, step) once with the
    record's values, params and config once, true statuses."""
    name, client = study_dir.name, MlflowClient(uri)
    runs = _runs(uri, name)
    parents = [r for r in runs if r.data.tags[S.TAG_ROLE] == S.ROLE_STUDY]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    children = {}
    for run in runs:
        if run.data.tags[S.TAG_ROLE] == S.ROLE_TRIAL:
            trial_id = run.data.tags[S.TAG_TRIAL_ID]
            assert trial_id not in children, f"two runs of {trial_id}"
            assert run.data.tags[S.TAG_PARENT_RUN_ID] == parents[0].info.run_id
            children[trial_id] = run
    ids = _trials(study_dir)
    assert set(children) == set(ids.values()) | set(extra or {})
    for trial_id, status in (extra or {}).items():
        assert children[trial_id].info.status == status
    want = {FINISHES: (S.STATUS_FINISHED, "completed"), NAN_AT_2: (S.STATUS_FINISHED, "completed"),
            RAISES_AT_2: (S.STATUS_FAILED, "RuntimeError: boom at epoch 2"), KILLED: killed}
    for con, trial_id in ids.items():
        run = children[trial_id]
        status, reason = want[con]
        assert (run.info.status, run.data.tags[S.TAG_STATUS]) == (status, status), con
        assert run.data.tags.get(S.TAG_STOP_REASON) == reason, con
        epochs = [1] if con == RAISES_AT_2 else [1, 2, 3]
        for key in ("dev_ndcg_at_10", "train_loss", "best_dev_ndcg_at_10"):
            history = sorted((m.step, m.value) for m in client.get_metric_history(
                run.info.run_id, key))
            assert [s for s, _ in history] == epochs, (con, key, history)
        dev = [v for _, v in sorted((m.step, m.value) for m in client.get_metric_history(
            run.info.run_id, "dev_ndcg_at_10"))]
        assert dev == pytest.approx([round(0.1 * e + con, 6) for e in epochs])
        pred = sorted(m.step for m in client.get_metric_history(run.info.run_id, "pred_error"))
        assert pred == ([1, 3] if con == NAN_AT_2 else epochs)
        if con == NAN_AT_2:
            assert S.parse_nonfinite(run.data.tags[S.TAG_NONFINITE]) == [("pred_error", 2)]
        assert run.data.params[S.search_key("loss.lambda_con")] == str(con)
        assert run.data.params["loss.lambda_con"] == str(con)  # the resolved config
        assert run.data.params["data.path"].endswith("data")
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [S.ARTIFACT_CONFIG]
    parent = parents[0]
    assert parent.data.params["space"] == NAME and parent.data.tags[S.TAG_STUDY_DIR] == \
        str(study_dir)
    assert parent.data.tags[S.TAG_BEST_TRIAL] == ids[KILLED]  # the highest dev figure
    assert parent.data.tags[S.count_tag("runs", S.STATUS_FINISHED)] == "2"
    return {"parent": parent, **children}


def test_sync_builds_the_view_of_a_record_from_nothing(record, tmp_path, tracking_uri):
    study_dir = _study(record, tmp_path, tracking_uri)
    report = sync(study_dir)
    ids = _trials(study_dir)
    assert sorted(report.created) == sorted(ids.values()) and report.logged > 0
    assert report.orphaned == [ids[KILLED]]  # its driver is gone: KILLED, not RUNNING
    runs = _check(tracking_uri, study_dir)
    assert runs["parent"].info.status == S.STATUS_KILLED  # the study never ended
    before = _view(tracking_uri, study_dir.name)
    again = sync(study_dir)
    assert (again.created, again.logged, again.merged, again.rebuilt, again.ended,
            again.orphaned) == ([], 0, 0, [], [], [])
    assert _view(tracking_uri, study_dir.name) == before


def test_sync_repairs_missing_partial_duplicate_and_stale_records(record, tmp_path,
                                                                  tracking_uri):
    """Two parent runs; a finished trial's run with one epoch of three and left RUNNING; a
    trial with two runs (epochs 1-2 in one, 2-3 in the other); a run with a (key, step) logged
    twice; a run of a trial the record does not know (lost with a killed driver), RUNNING; a
    trial with no run at all."""
    from study.tracking import StudyTracker

    study_dir = _study(record, tmp_path, tracking_uri)
    name, ids = study_dir.name, _trials(study_dir)
    tracker = StudyTracker(tracking_uri, name)
    client = tracker.client
    first_parent = tracker.run().run_id
    exp = tracker.experiment_id()
    study_tags = {S.TAG_STUDY: name}
    client.create_run(exp, tags={**study_tags, S.TAG_ROLE: S.ROLE_STUDY}, run_name=name)

    def child(trial_id: str, epochs: list[int]) -> str:
        run = client.create_run(exp, run_name=trial_id, tags={
            **study_tags, S.TAG_ROLE: S.ROLE_TRIAL, S.TAG_TRIAL_ID: trial_id,
            S.TAG_PARENT_RUN_ID: first_parent})
        client.log_batch(run.info.run_id, metrics=[
            Metric("dev_ndcg_at_10", 0.1 * e + con_of[trial_id], 1000 + e, e) for e in epochs])
        return run.info.run_id

    con_of = {trial_id: con for con, trial_id in ids.items()}
    con_of["lost_00009"] = 0.0
    child(ids[FINISHES], [1])  # partial, RUNNING
    child(ids[NAN_AT_2], [1, 2])
    child(ids[NAN_AT_2], [2, 3])  # a duplicate run
    doubled = child(ids[RAISES_AT_2], [1])
    client.log_metric(doubled, "dev_ndcg_at_10", 0.99, timestamp=5000, step=1)  # twice at 1
    child("lost_00009", [1])
    report = sync(study_dir)
    assert report.merged == 2  # the second parent and the second run of one trial
    assert report.rebuilt == [ids[RAISES_AT_2]] and report.created == [ids[KILLED]]
    assert sorted(report.orphaned) == sorted([ids[KILLED], "lost_00009"])
    runs = _check(tracking_uri, study_dir, extra={"lost_00009": S.STATUS_KILLED})
    assert runs["parent"].info.run_id == first_parent  # the oldest is kept
    assert [m.value for m in client.get_metric_history(
        runs[ids[RAISES_AT_2]].info.run_id, "dev_ndcg_at_10")] == [pytest.approx(0.4)]
    before = _view(tracking_uri, name)
    again = sync(study_dir)
    assert (again.created, again.logged, again.merged, again.rebuilt, again.ended,
            again.orphaned) == ([], 0, 0, [], [], [])
    assert _view(tracking_uri, name) == before


def test_sync_of_a_live_study_and_of_an_ending_one(record, tmp_path, tracking_uri):
    """While a driver holds the study, the run of its unfinished trial stays RUNNING; a driver
    that fails ends the parent FAILED and that run KILLED, both with its reason; a finished
    study's parent is FINISHED, without a stop reason."""
    study_dir = _study(record, tmp_path, tracking_uri)
    ids = _trials(study_dir)
    with Study.open(study_dir).driver_lock():
        assert sync(study_dir).orphaned == []
        with pytest.raises(StudyError, match="another driver"):
            with Study.open(study_dir).driver_lock():
                pass
    runs = _check(tracking_uri, study_dir, killed=(S.STATUS_RUNNING, None))
    assert runs["parent"].info.status == S.STATUS_RUNNING
    reason = "driver failed: RuntimeError: boom"
    report = sync(study_dir, live=False, ending=(S.STATUS_FAILED, reason))
    assert report.orphaned == [ids[KILLED]]
    runs = _check(tracking_uri, study_dir, killed=(S.STATUS_KILLED, reason))  # runs: KILLED
    assert runs["parent"].info.status == S.STATUS_FAILED
    assert runs["parent"].data.tags[S.TAG_STOP_REASON] == reason
    (study_dir / "summary.json").write_text("{}")  # a finished study's parent is FINISHED
    sync(study_dir)
    parent = _check(tracking_uri, study_dir, killed=(S.STATUS_KILLED, reason))["parent"]
    assert parent.info.status == S.STATUS_FINISHED and S.TAG_STOP_REASON not in parent.data.tags


def test_sync_command(record, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_dir = _study(record, tmp_path, uri)
    assert main(["sync", str(study_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trials"] == 4 and len(out["created"]) == 4
    assert main(["sync", str(study_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["logged"] == 0
    assert main(["sync", str(tmp_path / "nowhere")]) == 2
    dead = _study(record, tmp_path, f"http://127.0.0.1:{free_port()}")
    assert main(["sync", str(dead)]) == 2
    assert "does not answer" in capsys.readouterr().err


def test_sync_logs_each_trials_per_query_figures(record, tmp_path):
    """The loop's per_query.json (the best epoch's per-query test nDCG@10) becomes the run's
    artifact; logged again only when a later best epoch replaced it."""
    from trainables.loop import PER_QUERY_FILE

    assert PER_QUERY_FILE == S.ARTIFACT_PER_QUERY  # the loop writes what the view logs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_dir = _study(record, tmp_path, uri)
    trial_id = _trials(study_dir)[FINISHES]
    out = study_dir / "trials" / trial_id
    out.mkdir(parents=True)
    payload = {"best_epoch": 2, "score_with": "query", "transfer": {},
               "test": {"query": {"q1": 0.5, "q2": 1.0}, "predictor": {"q1": 0.0, "q2": 1.0}}}
    (out / PER_QUERY_FILE).write_text(json.dumps(payload))
    sync(study_dir)
    client = MlflowClient(uri)
    run = next(r for r in _runs(uri, study_dir.name)
               if r.data.tags.get(S.TAG_TRIAL_ID) == trial_id)
    assert S.ARTIFACT_PER_QUERY in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.data.tags[S.TAG_PER_QUERY_EPOCH] == "2"
    local = client.download_artifacts(run.info.run_id, S.ARTIFACT_PER_QUERY, str(tmp_path))
    assert json.loads(Path(local).read_text()) == payload
    before = _view(uri, study_dir.name)
    sync(study_dir)
    assert _view(uri, study_dir.name) == before
    (out / PER_QUERY_FILE).write_text(json.dumps({**payload, "best_epoch": 3}))
    sync(study_dir)
    assert client.get_run(run.info.run_id).data.tags[S.TAG_PER_QUERY_EPOCH] == "3"
