"""`jepa-study answer`: the arms' spaces, the controls, the table, and the whole path on
SciFact plus a small BEIR set cut from NFCorpus (real Ray, Optuna and MLflow; tiny budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis import schema as S
from search_spaces.arms import (arm_space, predictor_space, retrain_config, searched_with,
                                systems)
from search_spaces.space import SpaceSpec, shipped_spaces
from study.answer import AnswerOptions, StudyError, answer, command_line, crossfit_folds
from trainables.config import RunConfig
from trainables.loop import checkpoint_dirs

optuna.logging.set_verbosity(optuna.logging.WARNING)
NFCORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nfcorpus"


def _core() -> dict:
    return yaml.safe_load(shipped_spaces()["jepa_core"].read_text())


def _trials(spec: SpaceSpec, n: int) -> list[RunConfig]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(lambda t: spec.define_by_run(t) or 0.0, n_trials=n)
    return [spec.trial_config(t.params) for t in study.trials]


# -- the arms --------------------------------------------------------------------------------

def test_arms_differ_only_in_the_predictive_term():
    raw = _core()
    jepa = SpaceSpec.from_dict(arm_space(raw, "jepa"), "jepa")
    con = SpaceSpec.from_dict(arm_space(raw, "contrastive"), "contrastive")
    # the same effort and budget rules
    for field in ("num_samples", "searcher_spec", "scheduler", "metric", "collapse_guard"):
        assert getattr(jepa, field) == getattr(con, field), field
    for cfg in (jepa.base_config(), con.base_config()):
        assert (cfg.train.epochs, cfg.train.patience, cfg.eval.score_with) == (60, 8, "auto")
    # the same searched knobs, but for L_pred (and its stop-gradient) and the query head
    shared = set(jepa.parameters) & set(con.parameters)
    assert set(jepa.parameters) - shared == {"loss.lambda_pred", "loss.stopgrad"}
    assert set(con.parameters) - shared == {"model.query_head"}
    assert not getattr(jepa.parameters["loss.lambda_pred"], "zero")  # always on
    assert not getattr(con.parameters["loss.lambda_con"], "zero")
    assert con.parameters["model.predictor.depth"].when == {"model.query_head": True}
    assert jepa.parameters["model.predictor.depth"].when == {}
    assert all(c.loss.lambda_pred > 0 for c in _trials(jepa, 25))
    con_trials = _trials(con, 25)
    assert all(c.loss.lambda_pred == 0 and c.loss.lambda_con > 0 for c in con_trials)
    assert {c.model.query_head for c in con_trials} == {True, False}
    # the start point of the space, for each arm
    assert jepa.points()[0]["loss.lambda_pred"] == 1.0
    assert con.points()[0]["model.query_head"] is False
    with pytest.raises(ValueError, match="unknown arm"):
        arm_space(raw, "both")
    del raw["parameters"]["loss.lambda_pred"]
    with pytest.raises(ValueError, match="does not search loss.lambda_pred"):
        arm_space(raw, "jepa")


def test_controls_change_only_what_they_name():
    jepa = RunConfig.from_dict({"loss": {"lambda_pred": 2.0, "lambda_con": 0.5},
                                "model": {"predictor": {"depth": 3, "hidden_mult": 1.0}},
                                "eval": {"score_with": "predictor"}})
    contrastive = RunConfig.from_dict({"loss": {"lambda_pred": 0.0, "lambda_con": 1.0}})
    out = systems(jepa, contrastive)
    assert set(out) == {"jepa", "contrastive", "capacity", "no_pred"}
    assert out["jepa"] is jepa and out["contrastive"] is contrastive
    flat = {k: RunConfig.to_dict(v) for k, v in out.items()}
    from trainables.config import flatten

    base = flatten(flat["jepa"])
    for name, changed in (("capacity", {"loss.lambda_pred": 0.0, "model.query_head": True,
                                        "eval.score_with": "query"}),
                          ("no_pred", {"loss.lambda_pred": 0.0, "eval.score_with": "query"})):
        diff = {k: v for k, v in flatten(flat[name]).items() if base[k] != v}
        assert diff == changed, name
    # J with L_pred as its only term has no control left to train
    alone = RunConfig.from_dict({"loss": {"lambda_pred": 1.0}})
    assert set(systems(alone, contrastive)) == {"jepa", "contrastive"}
    # a retrained run: fresh seed, the space's patience, the whole schedule, test + transfer
    exported = jepa.with_overrides({"train.epochs": 40, "train.stop_after_epoch": 12})
    again = retrain_config(exported, 3, 6, ["/x/nfcorpus"], "s")
    assert (again.train.seed, again.train.patience, again.train.stop_after_epoch) == (3, 6, None)
    assert again.eval.extra_data == ["/x/nfcorpus"] and again.eval.evaluate_test


def test_searches_differ_in_their_searcher_seed_only():
    raw = arm_space(_core(), "jepa")
    again = searched_with(raw, 7)
    assert again["searcher"]["seed"] == 7 and raw["searcher"]["seed"] == 0
    assert {k: v for k, v in again.items() if k != "searcher"} == \
        {k: v for k, v in raw.items() if k != "searcher"}


def test_cpred_adds_the_predictor_to_the_tuned_contrastive_config():
    raw = _core()
    con = SpaceSpec.from_dict(arm_space(raw, "contrastive"), "contrastive")
    c = con.trial_config(con.points()[0]).with_overrides(
        {"train.stop_after_epoch": 9, "train.patience": None})
    spec = SpaceSpec.from_dict(predictor_space(raw, c, 8, 5), "c_pred")
    assert spec.num_samples == 5
    assert set(spec.parameters) == {"loss.lambda_pred", "model.predictor.depth",
                                    "model.predictor.hidden_mult", "model.predictor.dropout",
                                    "model.predictor.residual"}
    assert spec.parameters["loss.lambda_pred"].low == 0.03  # the JEPA arm's range, always on
    trials = _trials(spec, 10)
    from trainables.config import flatten

    base = flatten(c.to_dict())
    for t in trials:  # everything of C but L_pred, its predictor, the budget and scoring
        diff = {k for k, v in flatten(t.to_dict()).items() if base.get(k) != v}
        assert diff <= {"loss.lambda_pred", "model.predictor.depth", "loss.stopgrad",
                        "model.predictor.hidden_mult", "model.predictor.dropout",
                        "model.predictor.residual", "train.stop_after_epoch",
                        "train.patience", "eval.score_with", "eval.evaluate_test", "name",
                        "provenance"}, diff
        assert t.loss.lambda_pred > 0 and t.train.patience == 8
        assert t.train.stop_after_epoch is None and t.eval.score_with == "auto"
    # a start point with the arm's always-on term off has no counterpart in that arm
    nolabels = yaml.safe_load(shipped_spaces()["no_labels"].read_text())
    from search_spaces.space import raw_space

    assert len(arm_space(raw_space("no_labels"), "contrastive")["points_to_evaluate"]) == 1
    assert len(nolabels["points_to_evaluate"]) == 2


def test_crossfit_folds_cover_every_query_once_and_keep_dev_apart(tmp_path, scifact_dir):
    from trainables.data import load_beir, make_splits

    cfg = RunConfig().with_overrides({"data.path": str(scifact_dir)})
    folds = crossfit_folds(scifact_dir, cfg, 4, tmp_path)
    splits = make_splits(load_beir(scifact_dir))
    pool = set(splits["train"]) | set(splits["test"])
    tests = [set(load_beir(f).qrels["test"]) for f in folds]
    assert set().union(*tests) == pool and sum(map(len, tests)) == len(pool)  # each once
    data = load_beir(scifact_dir)
    for i, fold in enumerate(folds):
        d = load_beir(fold)
        assert set(d.qrels["dev"]) == set(splits["dev"])  # the same dev, never in a fold
        assert set(d.qrels["train"]) == pool - tests[i]
        assert d.fingerprint() == data.fingerprint()  # the same base features
        texts = {" ".join(data.queries[q].lower().split()) for q in tests[i]}
        others = {" ".join(data.queries[q].lower().split()) for q in pool - tests[i]}
        assert not texts & others  # a query text is in one fold
    assert 0.2 < len(tests[0]) / len(pool) < 0.3


def test_identical_trainings_share_one_run(tmp_path):
    """Two searches that ended on one config train it once per seed; each job keeps its
    own system, search and seed, and a different config or seed is never shared."""
    from study.answer import _share_identical

    base = RunConfig()
    other = base.with_overrides({"loss.lambda_pred": 0.5}, "test")
    jobs = []
    for search, cfg in ((0, base), (1, base), (2, other)):
        for seed in (1, 2):
            cfg_s = retrain_config(cfg.with_overrides(
                {"provenance": {"trial_id": f"t{search}"}}, "test"), seed, 4, [],
                name=f"jepa-s{search}-seed{seed}")
            jobs.append(("ds", "jepa", search, seed, cfg_s,
                         tmp_path / f"jepa-s{search}" / f"seed_{seed}"))
    shared = _share_identical(jobs)
    assert [j[:4] for j in shared] == [j[:4] for j in jobs]
    dirs = [j[-1].relative_to(tmp_path).as_posix() for j in shared]
    assert dirs == ["jepa-s0/seed_1", "jepa-s0/seed_2", "jepa-s0/seed_1", "jepa-s0/seed_2",
                    "jepa-s2/seed_1", "jepa-s2/seed_2"]
    assert shared[2][-2] is jobs[0][-2] and shared[4][-2] is jobs[4][-2]


def test_answer_options_refuse_search_seed_and_too_few_seeds():
    with pytest.raises(StudyError, match="search seed"):
        AnswerOptions(data=["x"], seeds=[0, 1])
    with pytest.raises(StudyError, match="two or more"):
        AnswerOptions(data=["x"], seeds=[1, 1])
    with pytest.raises(StudyError, match="--data"):
        AnswerOptions(data=[])
    with pytest.raises(StudyError, match="--searches"):
        AnswerOptions(data=["x"], searches=0)
    with pytest.raises(StudyError, match="--crossfit"):
        AnswerOptions(data=["x"], crossfit=1)


@pytest.mark.parametrize("opts", [
    AnswerOptions(data=["a", "b"]),
    AnswerOptions(data=["a"], space="quick", num_samples=3, seeds=[2, 7], name="x",
                  storage="s", address="auto", mlflow_uri="sqlite:///m.db",
                  max_concurrent_trials=2, searches=2, pred_samples=3, no_labels=False,
                  nolabel_space="quick", nolabel_samples=4, crossfit=5)])
def test_command_line_makes_the_same_options(opts):
    from study.cli import _options, build_parser

    line = command_line(opts)
    assert line.startswith("jepa-study answer --data a")
    assert _options(AnswerOptions, build_parser().parse_args(line.split()[1:])) == opts


# -- the whole path ----------------------------------------------------------------------------

TINY_SPACE = {
    "name": "tiny",
    "base": {"loss": {"lambda_con": 1.0},
             "train": {"epochs": 3, "patience": 2, "max_steps_per_epoch": 2,
                       "sampling": "queries"},
             "eval": {"score_with": "auto"}},
    "metric": "best_dev_ndcg_at_10", "mode": "max", "num_samples": 2,
    "max_concurrent_trials": 2,
    "searcher": {"kind": "tpe", "seed": 0, "n_startup_trials": 2},
    "scheduler": {"kind": "fifo"},
    "parameters": {
        "loss.lambda_pred": {"type": "float", "low": 0.1, "high": 2.0, "log": True,
                             "zero": True},
        "model.predictor.depth": {"type": "int", "low": 1, "high": 2,
                                  "when": {"loss.lambda_pred:on": True}},
        "loss.lambda_con": {"type": "float", "low": 0.5, "high": 2.0, "log": True},
        "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    },
}


TINY_NOLABELS = {**TINY_SPACE, "name": "tiny_nolabels",
                 "base": {**TINY_SPACE["base"], "data": {"pairs": "corpus"},
                          "train": {**TINY_SPACE["base"]["train"], "sampling": "pairs"}}}


@pytest.mark.slow
def test_answer_end_to_end_and_resumable(tmp_path, small_scifact, small_beir):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE, sort_keys=False))
    nolabels = tmp_path / "tiny_nolabels.yaml"
    nolabels.write_text(yaml.safe_dump(TINY_NOLABELS, sort_keys=False))
    opts = AnswerOptions(data=[str(small_scifact), str(small_beir)], space=str(space),
                         seeds=[1, 2], storage=str(tmp_path / "answers"), verbose=0,
                         searches=2, num_samples=2, pred_samples=1, nolabel_samples=1,
                         nolabel_space=str(nolabels), crossfit=2)
    out = answer(opts)
    root = Path(out["answer_dir"])
    result = json.loads(Path(out["json"]).read_text())
    # per dataset: each arm searched twice (searcher seeds 0 and 1), C+pred, no-label arms
    for ds in ("sfsmall", "nfsmall"):
        for label, trials in (("jepa-s0", 2), ("jepa-s1", 2), ("contrastive-s0", 2),
                              ("contrastive-s1", 2), ("c_pred", 1), ("nolabel_jepa", 1),
                              ("nolabel_contrastive", 1)):
            summary = json.loads((root / ds / "studies" / f"{ds}-{label}" / "summary.json")
                                 .read_text())
            assert summary["trials"] == trials and summary["errored"] == 0, (ds, label)
        seeds = [yaml.safe_load((root / ds / "spaces" / f"jepa-s{k}.yaml").read_text())
                 ["searcher"]["seed"] for k in (0, 1)]
        assert seeds == [0, 1]
        nolabel = RunConfig.from_yaml(next((root / ds / "best" / "nolabel_jepa").glob("*.yaml")))
        assert nolabel.data.pairs == "corpus"
    # every search's best retrained over the fresh seeds, per-query figures kept, transfer
    run = root / "sfsmall" / "runs" / "jepa-s1" / "seed_2"
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = RunConfig.from_yaml(run / "config.yaml")
    assert cfg.train.seed == 2 and cfg.train.stop_after_epoch is None
    assert len(metrics["test_per_query"]["query"]) == 40
    assert set(metrics["transfer_per_query"]) == {"nfsmall"}
    assert "test_nfsmall_ndcg_at_10" in metrics["test"]
    assert metrics["test"]["test_n_seen"] + metrics["test"]["test_n_unseen"] == 40
    assert not checkpoint_dirs(run) and (run / "best" / "model.pt").exists()
    # C+pred: C* with the predictor, trained on C*'s seeds (paired)
    c_pred = RunConfig.from_yaml(root / "sfsmall" / "runs" / "c_pred-s0" / "seed_1" /
                                 "config.yaml")
    assert c_pred.loss.lambda_pred > 0
    # the cross-fitted runs: two folds of each of J*, C*, C+pred at every seed, each dataset
    for system in ("jepa", "contrastive", "c_pred"):
        for seed in (1, 2):
            where = root / "sfsmall" / "crossfit" / "runs" / system / f"seed_{seed}"
            folds = [json.loads((where / f"fold_{k}" / "metrics.json").read_text())
                     for k in (0, 1)]
            assert [RunConfig.from_yaml(where / f"fold_{k}" / "config.yaml").train.seed
                    for k in (0, 1)] == [seed, seed]
            scored = [set(f["test_per_query"]["query"]) for f in folds]
            assert not scored[0] & scored[1] and len(scored[0] | scored[1]) > 40
    comps = result["comparisons"]
    assert {"primary", "diagnostic", "subsets", "no_labels", "crossfit_pooled", "crossfit",
            "crossfit_subsets"} <= set(comps)
    pooled_cf = {r["comparison"]: r for r in comps["crossfit_pooled"]}
    assert set(pooled_cf) == {"J* vs C* (cross-fitted)", "C+pred vs C* (cross-fitted)"}
    assert pooled_cf["J* vs C* (cross-fitted)"]["datasets"] == ["sfsmall", "nfsmall"]
    assert pooled_cf["J* vs C* (cross-fitted)"]["n_seeds_a"] == 2
    # the reference rows and seen/unseen split on the cross-fitted queries, per fold
    cf_rows = {(r["dataset"], r["system"]): r["test"] for r in result["crossfit_systems"]}
    zs = cf_rows[("sfsmall", "zero_shot")]
    assert zs["all"]["n"] == cf_rows[("sfsmall", "jepa")]["all"]["n"] == len(
        scored[0] | scored[1])
    assert zs["seen"]["n"] + zs["unseen"]["n"] == zs["all"]["n"]
    assert {r["comparison"] for r in comps["crossfit_subsets"]} >= {
        "J* vs zero-shot (cross-fitted)", "J* vs doc prior (cross-fitted)"}
    primary = {r["comparison"] for r in comps["primary"]}
    assert {"J vs tuned contrastive", "C+pred vs C"} <= primary
    assert any(r["on"] == "transfer" for r in comps["diagnostic"])
    assert {r["subset"] for r in comps["subsets"]} >= {"seen", "unseen"}
    for family in comps.values():
        for r in family:
            assert r["ci_low_points"] <= r["diff_points"] <= r["ci_high_points"]
            assert r["adj_ci_low_points"] <= r["ci_low_points"] + 1e-9
            assert r["verdict"] in ("better", "worse", "equivalent", "undecided")
    refs = {r["system"] for r in result["systems"] if not r.get("seeds")}
    assert {"zero_shot", "bm25", "doc_prior"} <= refs
    # the MLflow record: a parent run with the report, a child per run with its per-query file
    client = MlflowClient(out["mlflow_uri"])
    exp = client.get_experiment_by_name(S.experiment_name("answer"))
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`{S.TAG_ROLE}` = '{S.ROLE_RETRAIN}'", max_results=500)
    # one child per job (jobs of identical training share a run directory, not a child)
    n_runs = sum(r["runs"] for r in result["systems"] if r["kind"] == "trained") + 2 * 3 * 2 * 2
    assert len(list(root.glob("*/runs/*/seed_*"))) + len(list(
        root.glob("*/crossfit/runs/*/seed_*/fold_*"))) <= n_runs
    assert len(children) == n_runs
    assert S.ARTIFACT_PER_QUERY in [a.path for a in client.list_artifacts(
        children[0].info.run_id)]
    parent = client.search_runs([exp.experiment_id],
                                f"tags.`{S.TAG_ROLE}` = '{S.ROLE_ANSWER}'")[0]
    assert {"answer/answer.html", "answer/answer.json", "answer/answer.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "answer")}
    md = Path(out["md"]).read_text()
    assert md.index("## Design") < md.index("## Time") < md.index("## Test figures")
    # again: everything is reused (no study or run repeated), the same table, no new runs
    before = (run / "metrics.json").stat().st_mtime_ns
    again = answer(opts)
    assert (run / "metrics.json").stat().st_mtime_ns == before
    assert json.loads(Path(again["json"]).read_text())["comparisons"] == comps
    assert len(client.search_runs([exp.experiment_id],
                                  f"tags.`{S.TAG_ROLE}` = '{S.ROLE_RETRAIN}'",
                                  max_results=500)) == n_runs
