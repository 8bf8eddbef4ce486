"""Search-space files: loading, validation errors, define-by-run, resolve, start points, searcher.

Fast (no Ray cluster, no model): Optuna studies are in memory (or a temporary SQLite file)
and ``OptunaSearch`` is driven through ``suggest`` / ``on_trial_complete`` directly.
"""

from __future__ import annotations

import copy
import pickle
import re

import optuna
import pytest
import yaml

from search_spaces.space import (SWITCH, SpaceError, SpaceSpec, config_path, load_preset,
                                 load_space, preset_path, shipped_presets, shipped_spaces)
from trainables.config import RunConfig, flatten

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

LAMBDAS = ("lambda_pred", "lambda_con", "lambda_iso", "lambda_reg")
PRESET_LAMBDAS = {"minimal": (1.0, 0.0, 0.0, 0.0), "hybrid": (0.5, 0.1, 1.0, 0.0),
                  "full": (1.0, 0.0, 1.0, 0.0)}

VALID = {
    "name": "bad",
    "base_preset": "hybrid",
    "metric": "dev_ndcg_at_10",
    "mode": "max",
    "searcher": {"kind": "tpe", "seed": 0},
    "scheduler": {"kind": "asha"},
    "parameters": {
        "loss.lambda_pred": {"type": "float", "low": 0.01, "high": 10.0, "log": True,
                             "zero": True},
        "model.predictor.depth": {"type": "int", "low": 1, "high": 4,
                                  "when": {"loss.lambda_pred:on": True}},
        "loss.contrastive": {"type": "categorical", "choices": ["infonce", "margin"]},
        "loss.margin": {"type": "float", "low": 0.1, "high": 2.0,
                        "when": {"loss.contrastive": "margin"}},
    },
    "points_to_evaluate": ["minimal", {"loss.lambda_pred": 0.5, "loss.contrastive": "margin",
                                       "loss.margin": 0.5}],
}


def _lambdas(cfg: RunConfig) -> tuple[float, ...]:
    return tuple(getattr(cfg.loss, name) for name in LAMBDAS)


def _write(tmp_path, raw, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _edit(fn):
    raw = copy.deepcopy(VALID)
    fn(raw)
    return raw


def _param(path, **spec):
    return lambda raw: raw["parameters"].__setitem__(path, spec)


# -- shipped files -------------------------------------------------------------------------

def test_shipped_spaces_and_presets_load():
    assert set(shipped_spaces()) >= {"quick", "jepa_core", "seed_phases"}
    assert set(shipped_presets()) == {"minimal", "hybrid", "full"}
    for name, path in shipped_spaces().items():
        by_name, by_path = load_space(name), load_space(path)
        assert by_name.name == name == by_path.name
        assert by_name.base_config().model.freeze_base is True
        assert by_name.num_samples >= 1 and by_name.parameters
    for name, lambdas in PRESET_LAMBDAS.items():
        cfg = RunConfig.from_yaml(preset_path(name))
        assert _lambdas(cfg) == lambdas
        assert (cfg.model.freeze_base, cfg.train.epochs, cfg.train.batch_size) == (True, 5, 64)
        assert load_preset(name)["loss"]["lambda_pred"] == lambdas[0]


def test_shipped_space_settings():
    quick = load_space("quick")
    cfg = quick.base_config()
    assert (cfg.train.epochs, cfg.train.patience, quick.num_samples) == (40, 6, 24)
    assert cfg.eval.score_with == "auto" and quick.metric == "best_dev_ndcg_at_10"
    assert quick.scheduler.kind == "asha" and quick.scheduler.grace_period == 4
    core = load_space("jepa_core")
    core_cfg = core.base_config()
    assert core.num_samples == 64 and core.scheduler.kind == "asha"
    assert (core_cfg.train.epochs, core_cfg.train.patience) == (60, 8)
    assert all(core.parameters[f"loss.{n}"].zero for n in ("lambda_pred", "lambda_con",
                                                            "lambda_reg"))
    assert load_space("seed_phases").points_to_evaluate == ["minimal", "hybrid", "full"]


KNOBS = ("learning rate", "temperature", "hard negatives", "batch size", "predictor width",
         "variant", "projection", "isotropy form")


@pytest.mark.parametrize("name", ["quick", "jepa_core"])
def test_spaces_search_every_knob_the_issue_names(name):
    """Besides the λ's, predictor depth, residual and stop-gradient: lr, temperature, hard
    negatives, batch, predictor width, variant, projection and the isotropy form, each form
    with a weight range of its own (SIGReg's scale is not the covariance penalty's)."""
    spec = load_space(name)
    fields = {config_path(n) for n in spec.parameters}
    assert {"loss.lambda_pred", "loss.lambda_con", "loss.lambda_iso", "model.predictor.depth",
            "model.predictor.residual", "loss.stopgrad", "train.lr", "loss.temperature",
            "train.hard_negatives", "train.batch_size", "model.predictor.hidden_mult",
            "model.variant", "model.projection", "loss.isotropy"} <= fields
    cov, sig = spec.parameters["loss.lambda_iso@covariance"], spec.parameters[
        "loss.lambda_iso@sigreg"]
    assert cov.when == {"loss.isotropy": "covariance"} and sig.when == {
        "loss.isotropy": "sigreg"}
    assert sig.high <= cov.low * 100 and sig.low < cov.low  # SIGReg's weights are smaller


def test_jepa_core_searches_or_fixes_every_knob_with_a_reason():
    """Every field of the run config is searched in jepa_core, or set in its `base` on a line
    that says why (a comment), except the run's name and provenance."""
    path = shipped_spaces()["jepa_core"]
    raw = yaml.safe_load(path.read_text())
    spec = load_space("jepa_core")
    searched = {config_path(n) for n in spec.parameters}
    fixed = flatten(raw["base"])
    leaves = set(flatten(RunConfig().to_dict())) - {"name", "data.path"}
    leaves = {k for k in leaves if not k.startswith("provenance")}
    missing = sorted(leaves - searched - set(fixed))
    assert not missing, f"neither searched nor fixed in jepa_core: {missing}"
    assert not searched & set(fixed), "searched and fixed at once"
    reasons = _base_reasons(path.read_text())
    assert set(reasons) == set(fixed)
    unexplained = [k for k, why in reasons.items() if not why]
    assert not unexplained, f"fixed in jepa_core without a reason: {unexplained}"
    # data.path is the study's input (--data); a run's name and provenance are bookkeeping


def _base_reasons(text: str) -> dict[str, bool]:
    """Each field fixed in a space's ``base`` -> whether a comment with words follows it on
    its own line (after its value) or on the line of a section above it."""
    lines = text.splitlines()

    def says_why(line: int, column: int) -> bool:
        return re.search(r"#\s*\S", lines[line][column:]) is not None

    def walk(node: yaml.MappingNode, prefix: str, above: bool) -> dict[str, bool]:
        found = {}
        for key, value in node.value:
            one_line = value.end_mark.line == key.start_mark.line
            why = above or says_why(key.start_mark.line,
                                    value.end_mark.column if one_line else key.end_mark.column)
            if isinstance(value, yaml.MappingNode) and value.value:
                found |= walk(value, f"{prefix}{key.value}.", why)
            else:
                found[f"{prefix}{key.value}"] = why
        return found

    base = next(v for k, v in yaml.compose(text).value if k.value == "base")
    return walk(base, "", False)


def test_base_reasons_reads_each_field_at_its_own_place():
    text = ("seed: 3  # a top-level field of the same name\n"
            "base:\n  train:\n    seed: 0  # why\n    lr: 0.1 #\n    name: '# not a comment'\n"
            "  data:  # the study's input\n    split: dev\n    seed: 1\n")
    assert _base_reasons(text) == {"train.seed": True, "train.lr": False, "train.name": False,
                                   "data.split": True, "data.seed": True}


def test_unknown_space_and_preset():
    with pytest.raises(SpaceError, match="quick"):
        load_space("no_such_space")
    with pytest.raises(SpaceError, match="minimal"):
        preset_path("no_such_preset")


# -- validation errors ---------------------------------------------------------------------

ERRORS = [
    ("unknown top key", lambda r: r.update(bogus=1), ["bogus: unknown field"]),
    ("unknown param key", lambda r: r["parameters"]["loss.lambda_pred"].update(lo=1),
     ["parameters.loss.lambda_pred.lo: unknown field"]),
    ("unknown searcher key", lambda r: r["searcher"].update(foo=1), ["searcher.foo"]),
    ("unknown config field", _param("loss.lambda_x", type="float", low=0.1, high=1.0),
     ["parameters.loss.lambda_x: unknown config field"]),
    ("section not field", _param("loss", type="float", low=0.1, high=1.0),
     ["parameters.loss: unknown config field"]),
    ("low >= high", _param("loss.lambda_iso", type="float", low=2.0, high=1.0),
     ["parameters.loss.lambda_iso.low", "below high"]),
    ("log low <= 0", _param("loss.lambda_iso", type="float", low=0.0, high=1.0, log=True),
     ["parameters.loss.lambda_iso.low", "log"]),
    ("int bound not int", _param("train.epochs", type="int", low=1.5, high=4),
     ["parameters.train.epochs.low"]),
    ("unknown param type", _param("train.epochs", type="integer", low=1, high=4),
     ["parameters.train.epochs", "'float', 'int', 'categorical'"]),
    ("empty parameters", lambda r: r.update(parameters={}, points_to_evaluate=[]),
     ["parameters: empty"]),
    ("when unknown name", lambda r: r["parameters"]["loss.margin"].update(
        when={"loss.temperature": 1}), ["parameters.loss.margin.when.loss.temperature"]),
    ("when names later param", lambda r: r["parameters"]["model.predictor.depth"].update(
        when={"loss.contrastive": "margin"}),
     ["parameters.model.predictor.depth.when.loss.contrastive", "earlier"]),
    ("when bad value", lambda r: r["parameters"]["loss.margin"].update(
        when={"loss.contrastive": ["margin", "triplet"]}),
     ["parameters.loss.margin.when.loss.contrastive", "triplet"]),
    ("empty choices", _param("loss.reg", type="categorical", choices=[]),
     ["parameters.loss.reg.choices"]),
    ("invalid choice", _param("loss.reg", type="categorical", choices=["l2", "l1"]),
     ["parameters.loss.reg.choices[1]", "loss.reg"]),
    ("negative lambda", _param("loss.lambda_iso", type="float", low=-1.0, high=1.0),
     ["parameters.loss.lambda_iso.low", "greater than or equal to 0"]),
    ("depth too high", lambda r: r["parameters"]["model.predictor.depth"].update(high=7),
     ["parameters.model.predictor.depth.high", "less than or equal to 6"]),
    ("point unknown param", lambda r: r["points_to_evaluate"].append({"loss.bogus": 1}),
     ["points_to_evaluate[2].loss.bogus", "not a searched parameter"]),
    ("point out of range", lambda r: r["points_to_evaluate"].append({"loss.lambda_pred": 20}),
     ["points_to_evaluate[2].loss.lambda_pred", "not in the searched range"]),
    ("point bad choice", lambda r: r["points_to_evaluate"].append({"loss.contrastive": "x"}),
     ["points_to_evaluate[2].loss.contrastive"]),
    ("point inactive param", lambda r: r["points_to_evaluate"].append({"loss.margin": 0.5}),
     ["points_to_evaluate[2].loss.margin", "when"]),
    ("point unknown preset", lambda r: r["points_to_evaluate"].append("maximal"),
     ["points_to_evaluate[2]", "unknown preset 'maximal'", "hybrid"]),
    ("unknown base preset", lambda r: r.update(base_preset="maximal"),
     ["base_preset", "maximal"]),
    ("invalid base", lambda r: r.update(base={"loss": {"lambda_iso": -1}}),
     ["base", "loss.lambda_iso"]),
    ("unknown base field", lambda r: r.update(base={"loss": {"lambda_x": 1}}),
     ["base", "loss.lambda_x: unknown field"]),
    ("metric/mode mismatch", lambda r: r.update(metric=["a", "b"], mode="max"), ["mode"]),
    ("metric/mode lengths", lambda r: r.update(metric=["a", "b"], mode=["max"],
                                               scheduler={"kind": "fifo"}), ["mode"]),
    ("asha multi-objective", lambda r: r.update(metric=["a", "b"], mode=["max", "min"]),
     ["scheduler.kind", "fifo"]),
    ("unknown searcher", lambda r: r.update(searcher={"kind": "cmaes"}),
     ["searcher", "'tpe', 'random', 'nsga2'"]),
    ("unknown scheduler", lambda r: r.update(scheduler={"kind": "hyperband"}),
     ["scheduler", "'asha', 'fifo'"]),
    ("score_with predictor vs lambda_pred off",
     lambda r: r.update(base={"eval": {"score_with": "predictor"}}),
     ["parameters: contradictory", "score_with"]),
    ("all lambdas off", lambda r: r.update(base={"loss": {"lambda_con": 0, "lambda_iso": 0}}),
     ["parameters: contradictory", "nothing to train"]),
    ("at_least_one_on without zero", lambda r: r.update(
        at_least_one_on=["loss.lambda_pred", "loss.margin"]), ["at_least_one_on", "loss.margin"]),
    ("at_least_one_on order", lambda r: (
        r["parameters"].update({"loss.lambda_con": {"type": "float", "low": 0.1, "high": 1.0,
                                                    "zero": True}}),
        r.update(at_least_one_on=["loss.lambda_con", "loss.lambda_pred"])),
     ["at_least_one_on", "must come after"]),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_invalid_spaces_name_file_and_field(tmp_path, mutate, expected):
    path = _write(tmp_path, _edit(mutate))
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "bad.yaml" in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_valid_fixture_loads(tmp_path):
    spec = load_space(_write(tmp_path, VALID))  # the error cases above differ by one edit
    assert spec.name == "bad" and len(spec.points()) == 2


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n")
    with pytest.raises(SpaceError, match="list.yaml: expected a mapping"):
        load_space(path)


# -- define-by-run, resolve, trial configs -------------------------------------------------

def _random_study(spec: SpaceSpec, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(lambda t: spec.define_by_run(t) or 0.0, n_trials=n)
    return [t.params for t in study.trials]


def test_conditional_parameters_follow_their_conditions(tmp_path):
    spec = load_space(_write(tmp_path, VALID))
    trials = _random_study(spec, 40)
    seen_margin = seen_off = False
    for params in trials:
        pred_on = params[f"loss.lambda_pred{SWITCH}"]
        assert ("loss.lambda_pred" in params) == pred_on
        assert ("model.predictor.depth" in params) == pred_on
        assert ("loss.margin" in params) == (params["loss.contrastive"] == "margin")
        seen_margin |= "loss.margin" in params
        seen_off |= not pred_on
        cfg = spec.trial_config(params)
        assert cfg.loss.lambda_pred == params.get("loss.lambda_pred", 0.0)
        assert cfg.loss.contrastive == params["loss.contrastive"]
    assert seen_margin and seen_off  # both branches of each condition were exercised


def test_at_least_one_on_forces_the_last_switch():
    spec = load_space("seed_phases")
    others = ["loss.lambda_pred", "loss.lambda_iso", "loss.lambda_reg"]
    forced = 0
    for params in _random_study(spec, 120):
        if not any(params[m + SWITCH] for m in others):
            forced += 1
            assert f"loss.lambda_con{SWITCH}" not in params and "loss.lambda_con" in params
        else:
            assert f"loss.lambda_con{SWITCH}" in params
        assert sum(_lambdas(spec.trial_config(params))) > 0
    assert forced > 0
    core = load_space("jepa_core")  # L_pred or L_con; the predictor's knobs follow L_pred
    for params in _random_study(core, 60):
        pred_on = params["loss.lambda_pred" + SWITCH]
        assert ("loss.lambda_con" + SWITCH in params) == pred_on
        assert ("loss.stopgrad" in params) == pred_on == ("model.predictor.depth" in params)
        cfg = core.trial_config(params)
        assert cfg.loss.lambda_pred > 0 or cfg.loss.lambda_con > 0



@pytest.mark.parametrize("name", ["quick", "jepa_core", "seed_phases"])
def test_always_suggested_is_in_every_trial(name):
    """What ``always_suggested`` names is in every trial's params, and nothing in every one of
    120 random trials is left out of it, except a ``zero`` parameter's value (absent while
    it is off; its switch stands for it)."""
    spec = load_space(name)
    always = spec.always_suggested()
    trials = _random_study(spec, 120)
    assert always and all(set(always) <= set(params) for params in trials)
    in_every = set.intersection(*(set(params) for params in trials))
    left_out = in_every - set(always)
    assert all(getattr(spec.parameters.get(k), "zero", False) for k in left_out), left_out


def test_resolve_maps_switches_and_alternatives():
    spec = load_space("jepa_core")
    out = spec.resolve({"loss.lambda_pred:on": False, "loss.lambda_con": 1,
                        "model.variant": "shared"})
    assert out == {"loss.lambda_pred": 0.0, "loss.lambda_con": 1.0, "model.variant": "shared"}
    assert isinstance(out["loss.lambda_con"], float)
    # an alternative (`<path>@<label>`) sets its field; its switch off sets it to 0
    assert spec.resolve({"loss.isotropy": "sigreg", "loss.lambda_iso@sigreg:on": True,
                         "loss.lambda_iso@sigreg": 0.01}) == {"loss.isotropy": "sigreg",
                                                               "loss.lambda_iso": 0.01}
    assert spec.resolve({"loss.isotropy": "covariance",
                         "loss.lambda_iso@covariance:on": False}) == {
        "loss.isotropy": "covariance", "loss.lambda_iso": 0.0}
    cfg = spec.trial_config({"loss.lambda_pred:on": False, "loss.lambda_con": 0.5,
                             "loss.isotropy": "sigreg", "loss.lambda_iso@sigreg:on": True,
                             "loss.lambda_iso@sigreg": 0.02})
    assert _lambdas(cfg) == (0.0, 0.5, 0.02, 0.0) and cfg.loss.isotropy == "sigreg"
    with pytest.raises(SpaceError, match="unknown parameter"):
        spec.resolve({"loss.lambda_iso": 0.3})  # searched only through its alternatives
    assert spec.resolve({"data_dir": "/x", "loss.lambda_pred": 2.0}) == {"loss.lambda_pred": 2.0}
    with pytest.raises(SpaceError, match="switch on but no value"):
        spec.resolve({"loss.lambda_con:on": True})


def test_alternatives_of_one_field_never_meet(tmp_path):
    raw = {"name": "alt", "parameters": {
        "loss.isotropy": {"type": "categorical", "choices": ["covariance", "sigreg"]},
        "loss.lambda_iso@a": {"type": "float", "low": 0.1, "high": 1.0,
                              "when": {"loss.isotropy": "covariance"}},
        "loss.lambda_iso@b": {"type": "float", "low": 0.001, "high": 0.01,
                              "when": {"loss.isotropy": ["covariance", "sigreg"]}}}}
    with pytest.raises(SpaceError, match="loss.lambda_iso is searched twice"):
        load_space(_write(tmp_path, raw))
    raw["parameters"]["loss.lambda_iso@b"]["when"] = {"loss.isotropy": "sigreg"}
    spec = load_space(_write(tmp_path, raw))
    assert spec.trial_config({"loss.isotropy": "sigreg", "loss.lambda_iso@b": 0.005}
                             ).loss.lambda_iso == 0.005
    raw["parameters"]["loss.lambda_iso@b-c"] = raw["parameters"].pop("loss.lambda_iso@b")
    with pytest.raises(SpaceError, match="alternative label"):
        load_space(_write(tmp_path, raw))
    raw["parameters"]["loss.nope@x"] = raw["parameters"].pop("loss.lambda_iso@b-c")
    with pytest.raises(SpaceError, match="loss.nope@x: unknown config field"):
        load_space(_write(tmp_path, raw))


@pytest.mark.parametrize("name", ["quick", "jepa_core", "seed_phases"])
def test_searcher_suggests_valid_trials(name):
    from search_spaces.searcher import build_searcher

    spec = load_space(name)
    searcher = build_searcher(spec)
    points = spec.points()
    for i in range(20):  # past n_startup_trials, so TPE itself suggests too
        params = searcher.suggest(f"t{i}")
        if i < len(points):
            assert params == points[i]  # start points come first, in order
        cfg = spec.trial_config(params)
        assert cfg.model.freeze_base is True
        searcher.on_trial_complete(f"t{i}", {spec.metric: sum(_lambdas(cfg)) / (i + 1)})
    assert len(searcher._ot_study.trials) == 20


# -- start points --------------------------------------------------------------------------

def test_preset_points_round_trip():
    spec = load_space("seed_phases")
    points = spec.points()
    assert len(points) == 3
    for name, point in zip(spec.points_to_evaluate, points):
        assert _lambdas(spec.trial_config(point)) == PRESET_LAMBDAS[name]
        for lam in LAMBDAS:  # a switch is on exactly when the preset's λ is non-zero
            key = f"loss.{lam}"
            assert point.get(key + SWITCH, key in point) == (getattr(
                RunConfig.from_yaml(preset_path(name)).loss, lam) != 0)


@pytest.mark.parametrize("name", ["quick", "jepa_core", "seed_phases"])
def test_study_copy_is_the_same_space_with_warm_start_points_first(tmp_path, name):
    spec = load_space(name)
    copy_file = tmp_path / "space.yaml"
    copy_file.write_text(spec.to_yaml())
    again = load_space(copy_file)
    assert again.model_dump() == spec.model_dump()  # the name included
    best = spec.trial_config(spec.points()[0] if spec.points_to_evaluate else {}).to_dict()
    copy_file.write_text(spec.to_yaml([best]))
    warm = load_space(copy_file)
    assert warm.points_to_evaluate == [spec.config_point(best), *spec.points_to_evaluate]


def test_mapping_point_fills_from_base_and_clips(tmp_path):
    raw = _edit(lambda r: r.update(base={"model": {"predictor": {"depth": 6}}},
                                   points_to_evaluate=[{"loss.lambda_pred": 0}, {}]))
    spec = load_space(_write(tmp_path, raw))
    off, filled = spec.points()
    assert off == {"loss.lambda_pred:on": False, "loss.contrastive": "infonce"}
    assert filled["loss.lambda_pred"] == 0.5  # hybrid's λ_pred
    assert filled["model.predictor.depth"] == 4  # base 6 clipped into [1, 4]
    assert spec.trial_config(off).loss.lambda_pred == 0.0


def test_points_are_enqueued_in_the_optuna_study():
    from search_spaces.searcher import build_searcher

    spec = load_space("seed_phases")
    searcher = build_searcher(spec)
    waiting = [t for t in searcher._ot_study.trials
               if t.state == optuna.trial.TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in waiting] == spec.points()


def test_storage_study_is_created_once(tmp_path):
    from search_spaces.searcher import build_searcher

    spec = load_space("seed_phases")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = build_searcher(spec, storage_url=url, study_name="s1")
    assert first.suggest("a") == spec.points()[0]
    build_searcher(spec, storage_url=url, study_name="s1")  # resume: points not enqueued again
    study = optuna.load_study(study_name="s1", storage=url)
    assert len(study.trials) == 3  # one running + two waiting, none duplicated


def test_multi_objective_searcher(tmp_path):
    from search_spaces.searcher import build_searcher

    raw = _edit(lambda r: r.update(metric=["dev_ndcg_at_10", "effective_rank"],
                                   mode=["max", "max"], searcher={"kind": "nsga2"},
                                   scheduler={"kind": "fifo"}))
    searcher = build_searcher(load_space(_write(tmp_path, raw)))
    assert len(searcher._ot_study.directions) == 2
    params = searcher.suggest("a")
    searcher.on_trial_complete("a", {"dev_ndcg_at_10": 0.5, "effective_rank": 10.0})
    assert searcher._ot_study.trials[0].values == [0.5, 10.0] and params


def test_space_and_searcher_pickle(tmp_path):
    from search_spaces.searcher import build_searcher

    spec = load_space("quick")
    clone = pickle.loads(pickle.dumps(spec))
    assert clone == spec and clone.points() == spec.points()
    searcher = build_searcher(spec)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune does at a checkpoint
    restored = build_searcher(load_space("quick"))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("b") == searcher.suggest("b")


def test_a_space_extends_another(tmp_path):
    """``extends`` merges a variant over a space: ``quick_unseen`` is ``quick`` with dev made of
    unseen documents, and nothing else changed."""
    quick, unseen = load_space("quick"), load_space("quick_unseen")
    assert unseen.name == "quick_unseen" and unseen.base_config().data.dev_mode == "unseen_docs"
    assert unseen.parameters == quick.parameters and unseen.num_samples == quick.num_samples
    assert unseen.base_config().with_overrides({"data.dev_mode": "queries"}).to_dict() == \
        quick.base_config().to_dict()
    # a file of one's own: its keys win, mappings merge key by key; the name is its own
    (tmp_path / "mine.yaml").write_text("extends: quick\nnum_samples: 3\n"
                                        "base: {train: {epochs: 5}}\n")
    mine = load_space(tmp_path / "mine.yaml")
    assert (mine.name, mine.num_samples) == ("mine", 3)
    assert mine.base_config().train.epochs == 5 and mine.base_config().train.patience == 6
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(SpaceError, match="a cycle"):
        load_space(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(SpaceError, match=r"c.yaml: extends: .*nowhere: no such space"):
        load_space(tmp_path / "c.yaml")


def test_a_test_figure_is_never_a_study_metric(tmp_path):
    for metric in ("best_test_ndcg_at_10", "test_ndcg_at_10", "test_unseen_ndcg_at_10"):
        (tmp_path / "s.yaml").write_text(f"extends: quick\nmetric: {metric}\n")
        with pytest.raises(SpaceError, match=f"metric: '{metric}' is a test figure"):
            load_space(tmp_path / "s.yaml")
    # and the trials of any space never score test
    assert load_space("quick").trial_config(load_space("quick").points()[0]).eval.evaluate_test \
        is False
