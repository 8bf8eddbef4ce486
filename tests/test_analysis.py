"""analysis/ against a real study record: MLflow runs written by StudyTracker and a real
Optuna storage with a small space's distributions (L_pred and L_con switches, the predictor's
shape).

The record mirrors what a launched study writes (parent run, one child per trial with the
launcher's flattened params and config.yaml, per-epoch metrics with test figures on the
last epoch of completed trials, a failed, an early-stopped and a collapse-stopped trial),
without Ray: building it takes a few seconds.
"""

from __future__ import annotations

import math
import re

import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from study_helpers import ended_trial, write_parent

from analysis import schema as S
from analysis.export import PROVENANCE_KEYS, export_configs, load_warm_start
from analysis.report import SECTIONS, log_report, render_report, write_report
from analysis.runs import (config_from_params, find_parent, load_history, load_optuna,
                           load_runs, run_config)
from analysis.views import (compare_by, history_plot, importance, lambda_buckets,
                            optimisation_history, parallel_coordinates_plot, pareto_front,
                            pareto_plot, stop_reasons, top_k)
from search_spaces.space import load_space
from trainables.config import ConfigError, RunConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
STUDY = "quick"
ON, OFF = "lambda_pred:on", "lambda_con:on"
SPACE = {
    "name": STUDY, "base_preset": "hybrid", "base": {"train": {"epochs": 3}},
    "metric": "best_dev_ndcg_at_10", "mode": "max", "num_samples": 6,
    "parameters": {
        "loss.lambda_pred": {"type": "float", "low": 0.1, "high": 10.0, "log": True,
                             "zero": True},
        "loss.lambda_con": {"type": "float", "low": 0.1, "high": 2.0, "log": True,
                            "zero": True},
        "model.predictor.depth": {"type": "int", "low": 1, "high": 3,
                                  "when": {"loss.lambda_pred:on": True}},
        "model.predictor.residual": {"type": "categorical", "choices": [True, False],
                                     "when": {"loss.lambda_pred:on": True}},
        "loss.stopgrad": {"type": "categorical", "choices": [True, False],
                          "when": {"loss.lambda_pred:on": True}},
    },
}


def _p(pred: float | None, con: float | None, depth: int = 2, residual: bool = True,
       stopgrad: bool = True) -> dict:
    """Optuna params as the quick space's define-by-run gives them."""
    params: dict = {"loss.lambda_pred:on": pred is not None}
    if pred is not None:
        params["loss.lambda_pred"] = pred
    params["loss.lambda_con:on"] = con is not None
    if con is not None:
        params["loss.lambda_con"] = con
    if pred is not None:
        params.update({"model.predictor.depth": depth, "model.predictor.residual": residual,
                       "loss.stopgrad": stopgrad})
    return params


# trial id -> (Optuna params, status, stop reason, dev nDCG@10 per epoch, test nDCG@10)
TRIALS = {
    "t0": (_p(0.5, 0.1, 2, True, True), S.STATUS_FINISHED, "completed", [0.58, 0.61, 0.60],
           0.62),
    "t1": (_p(None, 1.0), S.STATUS_FINISHED, "completed", [0.60, 0.64, 0.66], 0.67),
    "t2": (_p(2.0, 0.5, 1, False, False), S.STATUS_FINISHED, "completed", [0.55, 0.62, 0.64],
           0.63),
    "t3": (_p(0.1, None, 3, False, True), S.STATUS_FINISHED,
           "collapse: effective_rank 2 < 4 at epoch 2", [0.40, 0.30], None),
    "t4": (_p(5.0, None, 2, False, True), S.STATUS_FAILED, "RuntimeError: boom", [0.20], None),
    "t5": (_p(None, 0.3), S.STATUS_FINISHED,
           "early_stopped: scheduler stopped the trial after epoch 1", [0.50], None),
}


@pytest.fixture(scope="module")
def record(tmp_path_factory, scifact_dir):
    """A study directory with mlflow.db and optuna.db holding the TRIALS above."""
    from functools import partial

    from study.sync import TrialWriter
    from study.tracking import StudyTracker

    study_dir = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    storage = f"sqlite:///{study_dir / S.OPTUNA_DB}"
    space_file = study_dir / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    tracker = StudyTracker(uri, STUDY)
    parent = write_parent(
        tracker, {"space": STUDY, "num_samples": len(TRIALS), "data": str(scifact_dir),
                  "optuna_version": optuna.__version__},
        {S.TAG_STUDY_DIR: str(study_dir)}, space_yaml=space_file.read_text())
    ostudy = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")
    spec = load_space(space_file)
    build = partial(spec.trial_config, data_path=str(scifact_dir))
    writer = TrialWriter(tracker, str(study_dir), 3, build)
    configs = {}
    for trial_id, (params, status, reason, dev, test) in TRIALS.items():
        configs[trial_id] = build(params)
        epochs = []
        for epoch, value in enumerate(dev, start=1):
            best = max(dev[:epoch])
            metrics = {"dev_ndcg_at_10": value, "dev_query_ndcg_at_10": value,
                       "dev_predictor_ndcg_at_10": value - 0.1, "effective_rank": 40.0 / epoch,
                       "train_loss": 1.0 / epoch, "pred_error": math.nan if trial_id == "t3"
                       else 0.1, "lr": 1e-3, "best_dev_ndcg_at_10": best,
                       "best_epoch": dev.index(best) + 1, "best_scored_with_predictor": 0.0}
            if epoch == len(dev) and test is not None:
                metrics.update({"test_ndcg_at_10": test, "test_query_ndcg_at_10": test,
                                "test_predictor_ndcg_at_10": test - 0.2,
                                "best_test_ndcg_at_10": test})
            epochs.append(metrics)
        writer.write(ended_trial(trial_id, params, epochs, status, reason))
        fixed = optuna.trial.FixedTrial(params)
        spec.define_by_run(fixed)
        failed = status == S.STATUS_FAILED
        ostudy.add_trial(optuna.trial.create_trial(
            params=fixed.params, distributions=fixed.distributions,
            value=None if failed else dev[-1],
            state=optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.COMPLETE))
    tracker.end(tracker.run(), S.STATUS_FINISHED, None)
    return {"uri": uri, "storage": storage, "dir": study_dir, "parent": parent,
            "configs": configs, "data_dir": str(scifact_dir), "space": space_file}


@pytest.fixture(scope="module")
def runs(record) -> pd.DataFrame:
    return load_runs(record["uri"], STUDY)


def _stripped(cfg: RunConfig) -> RunConfig:
    return cfg.model_copy(update={"provenance": {}})


# -- runs ------------------------------------------------------------------------------------

def test_load_runs_one_typed_row_per_trial(record, runs):
    assert sorted(runs["trial_id"]) == sorted(TRIALS)
    assert runs.attrs["parent_run_id"] == record["parent"]
    assert find_parent(record["uri"], STUDY).info.run_id == record["parent"]
    by = runs.set_index("trial_id")
    for trial_id, (_, status, reason, dev, test) in TRIALS.items():
        row = by.loc[trial_id]
        assert row["status"] == status and row["stop_reason"] == reason
        assert row["metrics.dev_ndcg_at_10"] == pytest.approx(dev[-1])  # last epoch
        assert row["best_dev_ndcg_at_10"] == pytest.approx(max(dev))
        assert row["epochs"] == len(dev)
        if test is None:
            assert math.isnan(row["metrics.test_ndcg_at_10"])
        else:
            assert row["metrics.test_ndcg_at_10"] == pytest.approx(test)
    assert by.loc["t0", "best_epoch"] == 2
    assert by.loc["t3", "nonfinite"] == "pred_error@1,pred_error@2"
    assert runs["params.loss.lambda_pred"].dtype == float
    assert runs["params.model.predictor.depth"].dtype.kind == "i"
    assert runs["params.loss.stopgrad"].dtype == bool
    assert runs["params.data.path"].iloc[0] == record["data_dir"]
    assert by.loc["t1", "params.loss.lambda_pred"] == 0.0
    assert by.loc["t2", "params.search.loss.lambda_pred"] == 2.0
    switch = "params." + S.search_key("loss.lambda_pred:on")  # ":" is not a legal key char
    assert not by.loc["t1", switch]
    assert by.loc["t2", switch]
    assert (runs["end_time"] >= runs["start_time"]).all()


def test_load_history_and_optuna(record, runs):
    t0 = runs.set_index("trial_id").loc["t0", "run_id"]
    hist = load_history(record["uri"], t0, ["dev_ndcg_at_10", "test_ndcg_at_10"])
    dev = hist[hist["key"] == "dev_ndcg_at_10"]
    assert dev["step"].tolist() == [1, 2, 3]
    assert dev["value"].tolist() == pytest.approx(TRIALS["t0"][3])
    assert hist[hist["key"] == "test_ndcg_at_10"]["step"].tolist() == [3]
    trials = load_optuna(record["storage"], STUDY)
    assert len(trials) == len(TRIALS)
    assert trials["state"].value_counts().to_dict() == {"COMPLETE": 5, "FAIL": 1}
    assert trials.attrs["directions"] == ["maximize"]
    assert {"params.loss.lambda_pred:on", "params.model.predictor.depth",
            "duration_s"} <= set(trials.columns)
    assert trials["params.loss.lambda_pred"].isna().sum() == 2  # switched off twice


def test_config_from_params_and_artifact_match_the_trial(record, runs):
    for _, row in runs.iterrows():
        want = record["configs"][row["trial_id"]]
        params = {k: v for k, v in row.items() if k.startswith("params.")}
        assert config_from_params(params) == want
        assert run_config(record["uri"], row["run_id"]) == want
    with pytest.raises(ConfigError, match="nope"):
        config_from_params({"params.loss.nope": 1})


# -- views -----------------------------------------------------------------------------------

def test_top_k_and_knob_comparisons(runs):
    assert top_k(runs, 3)["trial_id"].tolist() == ["t1", "t2", "t0"]
    assert top_k(runs, 2, "best_dev_ndcg_at_10")["trial_id"].tolist() == ["t1", "t2"]
    assert top_k(runs, 1, mode="min")["trial_id"].tolist() == ["t3"]
    assert "t4" not in top_k(runs, 10, finished_only=True)["trial_id"].tolist()

    stop = compare_by(runs, "stopgrad", "dev_ndcg_at_10")  # λ_pred > 0, finished: t0, t2, t3
    assert stop["count"].to_dict() == {False: 1, True: 2}
    assert stop.loc[True, "mean"] == pytest.approx((0.60 + 0.30) / 2)
    assert stop.loc[True, "max"] == pytest.approx(0.60)
    assert compare_by(runs, "residual")["count"].to_dict() == {False: 2, True: 1}
    assert compare_by(runs, "depth")["count"].to_dict() == {1: 1, 2: 1, 3: 1}
    lam = compare_by(runs, "lambda_pred", "dev_ndcg_at_10")
    assert lam["count"].to_dict() == {"0": 2, "(0, 0.1]": 1, "(0.1, 1]": 1, ">1": 1}
    assert lam.loc["0", "mean"] == pytest.approx((0.66 + 0.50) / 2)
    assert lam.loc["0", "std"] == pytest.approx(pd.Series([0.66, 0.50]).std())

    edges = pd.DataFrame({"params.loss.lambda_pred": [0.0, 1e-9, 0.1, 0.1001, 1.0, 1.5]})
    assert lambda_buckets(edges).astype(str).tolist() == [
        "0", "(0, 0.1]", "(0, 0.1]", "(0.1, 1]", "(0.1, 1]", ">1"]


def test_history_stop_reasons_and_figures(runs):
    hist = optimisation_history(runs, "dev_ndcg_at_10")
    assert hist["trial_id"].tolist() == list(TRIALS)  # start order
    assert hist["best_so_far"].tolist() == pytest.approx([0.60, 0.66, 0.66, 0.66, 0.66, 0.66])
    assert hist["is_best"].tolist() == [True, True, False, False, False, False]
    assert math.isnan(hist.loc[4, "value"])  # failed: no objective value, like Optuna's
    assert hist.loc[4, "last_value"] == pytest.approx(0.20)
    reasons = stop_reasons(runs).set_index("reason")["count"].to_dict()
    assert reasons == {"completed": 3, "collapse": 1, "error": 1, "early_stopped": 1}
    # by default the trial's value: its best dev epoch's
    assert optimisation_history(runs)["best_so_far"].tolist() == pytest.approx(
        [0.61, 0.66, 0.66, 0.66, 0.66, 0.66])
    fig = history_plot(runs)
    assert fig.axes[0].get_ylabel() == "best_dev_ndcg_at_10"
    par = parallel_coordinates_plot(runs)
    labels = [t.get_text() for t in par.axes[0].get_xticklabels()]
    assert "model.predictor.depth" in labels and labels[-1] == "best_dev_ndcg_at_10"
    assert sum(ln.get_gid() == "trial" for ln in par.axes[0].lines) == 5  # finished trials
    assert len(labels) == 6  # five searched config params and the metric
    with pytest.raises(ValueError):
        pareto_plot(runs, ["dev_ndcg_at_10"], ["max"])


def test_pareto_front():
    df = pd.DataFrame({"metrics.a": [1.0, 2.0, 3.0, 2.0, math.nan],
                       "metrics.b": [3.0, 2.0, 1.0, 1.0, 9.0],
                       "status": [S.STATUS_FINISHED] * 5, "trial_id": list("vwxyz")})
    assert pareto_front(df, ["a", "b"], ["max", "max"]).tolist() == [True, True, True, False,
                                                                     False]
    assert pareto_front(df, ["a", "b"], ["min", "min"]).tolist() == [True, False, False, True,
                                                                     False]
    assert len(pareto_plot(df, ["a", "b"], ["max", "max"]).axes) == 1


def test_importance_covers_every_searched_parameter(record, tmp_path):
    searched = {"loss.lambda_pred:on", "loss.lambda_pred", "loss.lambda_con:on",
                "loss.lambda_con", "model.predictor.depth", "model.predictor.residual",
                "loss.stopgrad"}
    for evaluator in ("fanova", "default"):
        imp = importance(record["storage"], STUDY, evaluator=evaluator)
        assert set(imp) == searched and imp.evaluator == evaluator and imp.n_trials == 5
        assert all(v >= 0 and math.isfinite(v) for v in imp.values())
        assert sum(imp.values()) == pytest.approx(1.0)
    # few trials: fANOVA falls back and says so; a parameter that never varied gets 0
    storage = f"sqlite:///{tmp_path / 'small.db'}"
    small = optuna.create_study(storage=storage, study_name="small", direction="maximize")
    dists = {"x": optuna.distributions.FloatDistribution(0, 1),
             "k": optuna.distributions.CategoricalDistribution([1, 2])}
    for x, value in ((0.1, 0.2), (0.5, 0.4), (0.9, 0.9)):
        small.add_trial(optuna.trial.create_trial(params={"x": x, "k": 1},
                                                  distributions=dists, value=value))
    imp = importance(storage, "small")
    assert imp.evaluator == "default" and "fANOVA" in " ".join(imp.notes)
    assert imp["k"] == 0.0 and imp["x"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        importance(storage, "small", evaluator="nope")


# -- report ----------------------------------------------------------------------------------

def test_report_is_self_contained_and_logged(record, tmp_path):
    out = write_report(record["uri"], STUDY, tmp_path / "r" / "report.html", strict=True)
    text = out.read_text()
    ids = set(re.findall(r'<section id="([^"]+)"', text))
    assert ids == set(SECTIONS) - {"pareto"}  # single objective: no Pareto section
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text and "<link" not in text
    assert text.count('src="data:image/png;base64,') == 3  # importance, history, parallel
    importance_part = text.split('id="importance"')[1].split("</section>")[0]
    assert "model.predictor.depth" in importance_part  # found optuna.db via the study dir
    # test figures (t1's is 0.67) only in the last section, never beside the choice
    top = text.split('id="top-k"')[1].split("</section>")[0]
    assert "t1" in top and "0.6700" not in top and "test_ndcg" not in top
    assert "0.67" not in text.split('id="summary"')[1].split("</section>")[0]
    last = re.findall(r'<section id="([^"]+)"', text)[-1]
    assert last == "test" and "0.6700" in text.split('id="test"')[1]

    report = render_report(record["uri"], STUDY, strict=True)
    assert set(report.figures) == {"importance", "history", "parallel"}
    logged = log_report(record["uri"], record["parent"], out, report.figures)
    client = MlflowClient(record["uri"])
    names = [a.path for a in client.list_artifacts(record["parent"], S.ARTIFACT_REPORT)]
    assert f"{S.ARTIFACT_REPORT}/report.html" in names
    figs = [a.path for a in client.list_artifacts(record["parent"],
                                                  f"{S.ARTIFACT_REPORT}/figures")]
    assert sorted(figs) == sorted(f"{S.ARTIFACT_REPORT}/figures/{n}.png"
                                  for n in report.figures)
    assert set(logged) == set(names) - {f"{S.ARTIFACT_REPORT}/figures"} | set(figs)


def test_report_pareto_section_and_empty_study(record):
    from study.sync import TrialWriter
    from study.tracking import StudyTracker

    multi = StudyTracker(record["uri"], "multi")
    write_parent(multi, {"space": "multi"}, space_yaml="metric: [dev_ndcg_at_10, "
                 "dev_recall_at_100]\nmode: [max, max]\nparameters: {}\n")
    writer = TrialWriter(multi, str(record["dir"]), 1)
    for i, (ndcg, recall) in enumerate(((0.6, 0.80), (0.65, 0.70), (0.5, 0.75))):
        writer.write(ended_trial(f"m{i}", {"loss": {"lambda_pred": 0.5 * i}},
                                 [{"dev_ndcg_at_10": ndcg, "dev_recall_at_100": recall}],
                                 S.STATUS_FINISHED, "completed"))
    report = render_report(record["uri"], "multi", strict=True)
    assert "pareto" in report.sections and "pareto" in report.figures
    front = pareto_front(load_runs(record["uri"], "multi"), ["dev_ndcg_at_10",
                                                             "dev_recall_at_100"], ["max", "max"])
    assert front.tolist() == [True, True, False]

    write_parent(StudyTracker(record["uri"], "empty"), {"space": "empty"})
    empty = render_report(record["uri"], "empty")  # no trials yet: notes, not a crash
    assert set(empty.sections) == set(SECTIONS) - {"pareto"}
    assert "<dt>trials</dt><dd>0</dd>" in empty.html
    assert "section failed" not in empty.html and "no trial has reported" in empty.html
    with pytest.raises(LookupError, match="nope"):
        render_report(record["uri"], "nope")


# -- export ----------------------------------------------------------------------------------

def test_export_configs_with_provenance(record, runs, tmp_path):
    paths = export_configs(record["uri"], STUDY, tmp_path / "best", top=2)
    assert [p.name for p in paths] == [f"{STUDY}-rank1-t1.yaml", f"{STUDY}-rank2-t2.yaml"]
    by = runs.set_index("trial_id")
    for path, trial_id in zip(paths, ("t1", "t2")):
        cfg = RunConfig.from_yaml(path)
        assert set(PROVENANCE_KEYS) <= set(cfg.provenance)
        assert cfg.provenance["trial_id"] == trial_id
        assert cfg.provenance["mlflow_run_id"] == by.loc[trial_id, "run_id"]
        assert cfg.provenance["study"] == STUDY
        assert cfg.provenance["metric"] == "best_dev_ndcg_at_10"
        dev = TRIALS[trial_id][3]
        assert float(cfg.provenance["value"]) == pytest.approx(max(dev))
        assert cfg.provenance["tracking_uri"] == record["uri"]
        # the model the study chose: its best dev epoch, the schedule kept, no patience
        best = dev.index(max(dev)) + 1
        assert cfg.provenance["best_epoch"] == str(best)
        # (and `train` scores test once at its end, which a study's trial never does)
        assert _stripped(cfg) == record["configs"][trial_id].with_overrides(
            {"train.stop_after_epoch": best, "train.patience": None,
             "eval.evaluate_test": True})
        assert cfg.data.path == record["data_dir"] and cfg.train.seed == 0
    loaded = load_warm_start(tmp_path / "best")
    assert [c.provenance["trial_id"] for c in loaded] == ["t1", "t2"]
    assert load_warm_start(paths[1])[0] == RunConfig.from_yaml(paths[1])
    with pytest.raises(ConfigError, match="no such"):
        load_warm_start(tmp_path / "missing")
    with pytest.raises(KeyError, match="nonexistent"):
        export_configs(record["uri"], STUDY, tmp_path / "x", metric="nonexistent")
    # test figures are reported, never used to choose
    for metric in ("best_test_ndcg_at_10", "test_ndcg_at_10", "best_test_unseen_ndcg_at_10"):
        with pytest.raises(ValueError, match=f"{metric!r} is a test figure"):
            export_configs(record["uri"], STUDY, tmp_path / "x", metric=metric)
