"""`jepa-study answer`: the arms' spaces, the controls, the table, and the whole path on
SciFact plus a small BEIR set cut from NFCorpus (real Ray, Optuna and MLflow; tiny budgets)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis import schema as S
from analysis.answer import Measured, Run, System, answer_dict, comparisons, markdown
from search_spaces.arms import arm_space, retrain_config, systems
from search_spaces.space import SpaceSpec, shipped_spaces
from study.answer import AnswerOptions, StudyError, answer, command_line
from trainables.config import RunConfig

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


def test_answer_options_refuse_search_seed_and_too_few_seeds():
    with pytest.raises(StudyError, match="search seed"):
        AnswerOptions(data=["x"], seeds=[0, 1])
    with pytest.raises(StudyError, match="two or more"):
        AnswerOptions(data=["x"], seeds=[1, 1])
    with pytest.raises(StudyError, match="--data"):
        AnswerOptions(data=[])


@pytest.mark.parametrize("opts", [
    AnswerOptions(data=["a", "b"]),
    AnswerOptions(data=["a"], space="quick", num_samples=3, seeds=[2, 7], name="x",
                  storage="s", address="auto", mlflow_uri="sqlite:///m.db",
                  max_concurrent_trials=2)])
def test_command_line_makes_the_same_options(opts):
    from study.cli import _options, build_parser

    line = command_line(opts)
    assert line.startswith("jepa-study answer --data a")
    assert _options(AnswerOptions, build_parser().parse_args(line.split()[1:])) == opts


# -- the table -------------------------------------------------------------------------------

def _system(name: str, per_seed: list[dict[str, float]], scoring: str = "query") -> System:
    return System(name, scoring, [Run(i + 1, 0.5, 3, {"query": q, "predictor": q})
                                  for i, q in enumerate(per_seed)])


def test_comparisons_have_known_answers():
    rng = random.Random(0)
    qids = [f"q{i}" for i in range(60)]
    one = {q: rng.random() for q in qids}
    base = [one, dict(one), dict(one)]  # three seeds that trained alike
    shifted = [{q: v + 0.05 for q, v in seed.items()} for seed in base]
    measured = Measured("toy", {"jepa": _system("jepa", shifted),
                                "contrastive": _system("contrastive", base),
                                "capacity": _system("capacity", shifted),
                                "no_pred": _system("no_pred", base)},
                        {"bm25": base[0]})
    rows = {r["comparison"]: r for r in comparisons([measured], n_boot=2000,
                                                    n_resamples=2000)["in_domain"]}
    # a constant shift of 0.05 on every query and seed: +5 points, the interval [5, 5]
    shift = rows["jepa vs tuned contrastive"]
    assert shift["diff_points"] == pytest.approx(5.0)
    assert shift["ci_low_points"] == pytest.approx(5.0) == shift["ci_high_points"]
    assert shift["p_permutation"] < 0.01
    # identical systems: no difference, p = 1
    for same in (rows["jepa vs capacity-matched"],  # the same per-query figures
                 rows["predictor vs query scoring of J"]):  # the same dicts both ways
        assert same["diff_points"] == 0 and same["p_t"] == 1.0
        assert same["ci_low_points"] == 0 == same["ci_high_points"]
    # Holm across the family never lowers a p-value
    for r in rows.values():
        assert r["p_permutation_holm"] >= r["p_permutation"]
    result = answer_dict([measured], n_boot=500, n_resamples=500)
    assert any("better: +5.00 nDCG points" in v and "the tests reject" in v
               for v in result["verdicts"])
    assert any("no difference the interval can tell: +0.00" in v and "do not reject" in v
               for v in result["verdicts"])
    text = markdown(result)
    assert text.index("## Dev figures") < text.index("## Test figures")  # test: last
    assert "| toy | bm25 |" in text


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


@pytest.mark.slow
def test_answer_end_to_end_and_resumable(tmp_path, scifact_dir, scifact_features, small_beir):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(TINY_SPACE, sort_keys=False))
    opts = AnswerOptions(data=[str(scifact_dir), str(small_beir)], space=str(space),
                         seeds=[1, 2], storage=str(tmp_path / "answers"), verbose=0)
    out = answer(opts)
    root = Path(out["answer_dir"])
    result = json.loads(Path(out["json"]).read_text())
    # per dataset: both arms' studies at equal effort, each choosing on dev
    for ds in ("scifact", "nfsmall"):
        for arm in ("jepa", "contrastive"):
            summary = json.loads((root / ds / "studies" / f"{ds}-{arm}" / "summary.json")
                                 .read_text())
            assert summary["trials"] == 2 and summary["errored"] == 0
        assert result["design"][ds]["trials per arm"] == 2
    # every system retrained over the fresh seeds, per-query figures kept, transfer scored
    systems_ = {(r["dataset"], r["system"]) for r in result["systems"]}
    assert {("scifact", "jepa"), ("scifact", "contrastive"), ("nfsmall", "zero_shot"),
            ("nfsmall", "bm25")} <= systems_
    run = root / "scifact" / "runs" / "jepa" / "seed_2"
    metrics = json.loads((run / "metrics.json").read_text())
    cfg = RunConfig.from_yaml(run / "config.yaml")
    assert cfg.train.seed == 2 and cfg.train.stop_after_epoch is None
    assert len(metrics["test_per_query"]["query"]) == 300
    assert set(metrics["transfer_per_query"]) == {"nfsmall"}
    assert "test_nfsmall_ndcg_at_10" in metrics["test"]
    comps = result["comparisons"]
    assert {r["comparison"] for r in comps["in_domain"]} >= {"jepa vs tuned contrastive",
                                                            "predictor vs query scoring of J"}
    assert {r["target"] for r in comps["transfer"]} == {"scifact", "nfsmall"}
    for r in comps["in_domain"]:
        assert r["n_seeds_a"] == 2 and r["ci_low_points"] <= r["diff_points"] <= \
            r["ci_high_points"]
    # the MLflow record: a parent run with the report, a child per run with its per-query file
    client = MlflowClient(out["mlflow_uri"])
    exp = client.get_experiment_by_name(S.experiment_name("answer"))
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`{S.TAG_ROLE}` = '{S.ROLE_RETRAIN}'", max_results=100)
    n_runs = sum(len(r["seeds"]) for r in result["systems"])
    assert len(children) == n_runs
    assert S.ARTIFACT_PER_QUERY in [a.path for a in client.list_artifacts(
        children[0].info.run_id)]
    parent = client.search_runs([exp.experiment_id],
                                f"tags.`{S.TAG_ROLE}` = '{S.ROLE_ANSWER}'")[0]
    assert {"answer/answer.html", "answer/answer.json", "answer/answer.md"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "answer")}
    md = Path(out["md"]).read_text()
    assert md.index("## Design") < md.index("## Test figures") and "## Time" in md
    # again: everything is reused (no study or run repeated), the same table, no new runs
    before = (run / "metrics.json").stat().st_mtime_ns
    again = answer(opts)
    assert (run / "metrics.json").stat().st_mtime_ns == before
    assert json.loads(Path(again["json"]).read_text())["comparisons"] == comps
    assert len(client.search_runs([exp.experiment_id],
                                  f"tags.`{S.TAG_ROLE}` = '{S.ROLE_RETRAIN}'",
                                  max_results=100)) == n_runs
