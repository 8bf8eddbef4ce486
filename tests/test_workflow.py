"""From launch to a report, an exported config and a reproduced number (real Ray, Optuna,
MLflow; the study is tiny so that the whole path runs in about a minute)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from study_helpers import child_runs, tiny_space

from search_spaces.space import load_space
from study.cli import main
from study import Study, StudyOptions, launch
from trainables.config import RunConfig


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, scifact_dir, scifact_features) -> Path:
    tmp = tmp_path_factory.mktemp("workflow")
    space = tiny_space(tmp, "flow", num_samples=3, epochs=3,
                       extra_base={"eval": {"score_with": "auto"}, "train": {"patience": 2}})
    summary = launch(StudyOptions(space=str(space), storage=str(tmp / "studies"),
                                  data=str(scifact_dir), verbose=0))
    if ray.is_initialized():
        ray.shutdown()
    return Path(summary["study_dir"])


def test_export_then_train_reproduces_the_dev_metric(small_study, tmp_path, capsys):
    assert main(["export", str(small_study), "--top", "2", "--out", str(tmp_path / "exp")]) == 0
    files = sorted((tmp_path / "exp").glob("*.yaml"))
    assert len(files) == 2 and "rank1" in files[0].name
    exported = RunConfig.from_yaml(files[0])
    uri = Study.open(small_study).mlflow_uri
    run = MlflowClient(uri).get_run(exported.provenance["mlflow_run_id"])
    assert run.data.tags["jepa.trial_id"] == exported.provenance["trial_id"]
    assert Path(exported.data.path).is_absolute() and exported.train.seed == 0

    # the model the study chose: trained to the trial's best dev epoch, scored as dev chose
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "dev_ndcg_at_10")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    best_epoch = logged.index(max(logged)) + 1
    assert exported.train.stop_after_epoch == best_epoch == int(
        exported.provenance["best_epoch"])
    assert exported.train.patience is None and exported.provenance["patience"] == "2"
    assert exported.eval.score_with in ("query", "predictor")
    assert float(exported.provenance["value"]) == max(logged)

    out = tmp_path / "repro"
    assert main(["train", "--config", str(files[0]), "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    reproduced = [h["dev_ndcg_at_10"] for h in metrics["history"]]
    # same seed on CPU: the same numbers, epoch by epoch (tolerance only for float printing),
    # up to the best epoch, whose dev figure is the trial's
    assert reproduced == pytest.approx(logged[:best_epoch], abs=1e-9)
    assert metrics["best_dev_ndcg_at_10"] == pytest.approx(max(logged), abs=1e-9)
    assert metrics["score_with"] == exported.eval.score_with
    assert "test_ndcg_at_10" in metrics["test"]
    # the trial's final test figures (MLflow's last values) are its best epoch's
    # The study scored its best trials on test when it ended, from their kept weights (the
    # trials never scored test): the same figures as the retrained run, on all, seen and
    # unseen queries, logged on the trial's run and reported only.
    final = MlflowClient(uri).get_run(run.info.run_id).data.metrics
    for key in ("test_ndcg_at_10", "test_seen_ndcg_at_10", "test_unseen_ndcg_at_10",
                "test_n_seen", "test_n_unseen"):
        assert final["best_" + key] == pytest.approx(metrics["test"][key], abs=1e-9), key
    assert (final["best_test_n_seen"], final["best_test_n_unseen"]) == (175, 125)
    assert final["best_epoch"] == best_epoch
    assert not any(k.startswith("test_") for k in final)  # no epoch of a trial scored test
    # the export summary shows dev and test on all, seen and unseen queries
    shown = capsys.readouterr().out
    assert "dev_seen_ndcg_at_10" in shown and "test_unseen_ndcg_at_10" in shown
    # the study's summary and its parent run hold the reference rows beside the best trial
    summary = json.loads((small_study / "summary.json").read_text())
    assert summary["best"]["trial_id"] == exported.provenance["trial_id"]
    assert summary["best"]["test (reported only)"]["test_ndcg_at_10"] == pytest.approx(
        metrics["test"]["test_ndcg_at_10"], abs=1e-9)
    refs = summary["references (test, reported only)"]
    assert refs["zero_shot"]["test_ndcg_at_10"] == pytest.approx(0.645, abs=0.001)
    assert refs["doc_prior"]["test_ndcg_at_10"] == pytest.approx(0.708, abs=0.002)
    parent = MlflowClient(uri).get_run(run.data.tags["mlflow.parentRunId"]).data.metrics
    assert parent["reference.bm25.test_ndcg_at_10"] == pytest.approx(0.662, abs=0.001)
    assert parent["reference.doc_prior.test_unseen_ndcg_at_10"] == pytest.approx(
        refs["doc_prior"]["test_unseen_ndcg_at_10"])


def test_report_has_every_section_and_is_logged(small_study):
    assert main(["report", str(small_study)]) == 0
    html = (small_study / "report.html").read_text()
    sections = set(re.findall(r'<section id="([^"]+)"', html))
    assert {"summary", "top-k", "knob-stopgrad", "knob-residual", "knob-depth",
            "knob-lambda_pred", "importance", "history", "parallel",
            "stop-reasons"} <= sections
    assert not re.search(r'(src|href)="https?://', html)  # self-contained
    # the test section: the reference rows above the trials, seen and unseen columns
    test = html[html.index('<section id="test">'):]
    for row in ("zero_shot", "bm25", "doc_prior"):
        assert f"<td>{row}</td>" in test
    assert "best_test_unseen_ndcg_at_10" in test and "best_test_n_seen" in test
    client = MlflowClient(Study.open(small_study).mlflow_uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("jepa-study/flow").experiment_id],
        filter_string="tags.`jepa.role` = 'study'")[0]
    logged = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert any(p.endswith(".html") for p in logged)


def test_warm_start_evaluates_the_given_configs_first(small_study, tmp_path, scifact_dir):
    space = tiny_space(tmp_path, "warm", num_samples=2, epochs=1)
    summary = launch(StudyOptions(space=str(space), storage=str(tmp_path / "studies"),
                                  data=str(scifact_dir), verbose=0,
                                  warm_start=[str(small_study)]))
    if ray.is_initialized():
        ray.shutdown()
    study_dir = Path(summary["study_dir"])
    spec = load_space(study_dir / "space.yaml")
    # the earlier study's best configs come first, as points the searcher enqueues
    best = RunConfig.from_yaml(next((study_dir / "warm_start" / "flow").glob("*rank1*.yaml")))
    assert spec.points_to_evaluate[0] == spec.config_point(best.to_dict())
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    first = sorted(optuna.load_study(study_name="warm", storage=storage).trials,
                   key=lambda t: t.number)[0]
    assert first.params == spec.points()[0]
    assert len(child_runs(Study.open(study_dir).mlflow_uri, "warm")) == 2
    assert yaml.safe_load((study_dir / "space.yaml").read_text())["points_to_evaluate"]


def test_export_model_from_the_kept_weights(small_study, tmp_path, scifact, scifact_features):
    """``export --model``: the trial's kept best-epoch weights as a sentence-transformers
    folder (no retraining), logged on its run and registered; a trial without kept weights
    is refused with a named error that says what to do."""
    import shutil

    import mlflow.sentence_transformers
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from analysis.registry import registered_model_name, use_tracking_uri
    from study.study import Study
    from trainables.loop import load_best
    from trainables.model import JEPAModel

    out = tmp_path / "exp"
    assert main(["export", str(small_study), "--out", str(out), "--model"]) == 0
    exported = next(out.glob("*.yaml"))
    folder = exported.with_name(exported.stem + "-model")
    model = SentenceTransformer(str(folder))
    # the folder is the trial's model: its query route on the trial's kept weights
    trial_id = RunConfig.from_yaml(exported).provenance["trial_id"]
    cfg, info, weights = load_best(small_study / "trials" / trial_id)
    jepa = JEPAModel(cfg.model, base_dim=scifact_features.dim)
    jepa.load_state_dict(weights)
    jepa.eval()
    qids = sorted(scifact.qrels["test"])[:3]
    import torch

    with torch.no_grad():
        want = jepa.encode_queries(scifact_features.queries(qids))
        if info["mode"] == "predictor":
            want = jepa.predict(want)
    got = model.encode_query([scifact.queries[q] for q in qids], convert_to_numpy=True)
    assert np.abs(got - want.numpy()).max() < 1e-4
    assert "## Use" in (folder / "README.md").read_text()
    # registered: version 1 of the study's model, loadable from the registry, tagged
    uri = Study.open(small_study).mlflow_uri
    name = registered_model_name("flow")
    client = MlflowClient(uri)
    version = client.get_model_version(name, "1")
    assert version.tags["trial"] == trial_id and version.tags["scoring"] == info["mode"]
    (tmp_path / "loaded").mkdir()  # MLflow downloads into an unmanaged temp dir otherwise
    with use_tracking_uri(uri):
        loaded = mlflow.sentence_transformers.load_model(f"models:/{name}/1",
                                                         str(tmp_path / "loaded"))
    again = loaded.encode_query([scifact.queries[q] for q in qids], convert_to_numpy=True)
    assert np.abs(again - got).max() <= 1e-5
    # no kept weights: a named error, nothing registered
    shutil.rmtree(small_study / "trials" / trial_id / "best")
    with pytest.raises(Exception, match=r"kept no best-epoch weights.*jepa-study train "
                                        r"--config .* --model"):
        from study.reporting import export_model

        export_model(Study.open(small_study), exported)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
