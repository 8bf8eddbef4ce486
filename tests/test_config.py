"""RunConfig validation: unknown keys and bad values name the dotted field and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainables.config import ConfigError, LossConfig, RunConfig, flatten


def _write(tmp_path: Path, raw, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def _error(tmp_path: Path, raw) -> tuple[Path, str]:
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        RunConfig.from_yaml(path)
    return path, str(info.value)


# -- unknown keys ----------------------------------------------------------------------------

def test_unknown_top_level_key_names_field_and_file(tmp_path):
    path, msg = _error(tmp_path, {"name": "x", "modle": {"freeze_base": True}})
    assert str(path) in msg
    assert "modle: unknown field" in msg


def test_unknown_nested_key_names_dotted_path(tmp_path):
    path, msg = _error(tmp_path, {"model": {"predictor": {"deph": 3}}})
    assert str(path) in msg
    assert "model.predictor.deph: unknown field" in msg


# -- bad values name the dotted field ----------------------------------------------------------

@pytest.mark.parametrize("raw, field, got", [
    ({"loss": {"lambda_pred": -0.5}}, "loss.lambda_pred", "-0.5"),
    ({"loss": {"lambda_con": -1}}, "loss.lambda_con", "-1"),
    ({"model": {"predictor": {"depth": 0}}}, "model.predictor.depth", "0"),
    ({"model": {"predictor": {"depth": 7}}}, "model.predictor.depth", "7"),
    ({"train": {"batch_size": "many"}}, "train.batch_size", "'many'"),
    ({"model": {"variant": "triple"}}, "model.variant", "'triple'"),
    ({"model": {"projection": "conv"}}, "model.projection", "'conv'"),
    ({"model": {"similarity": "dot"}}, "model.similarity", "'dot'"),
    ({"data": {"dev_fraction": 1.0}}, "data.dev_fraction", "1.0"),
])
def test_bad_value_names_dotted_field(tmp_path, raw, field, got):
    path, msg = _error(tmp_path, raw)
    assert str(path) in msg
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(field + ":")), None)
    assert line is not None, msg
    assert f"(got {got})" in line


def test_depth_bounds_are_inclusive(tmp_path):
    for depth in (1, 6):
        cfg = RunConfig.from_yaml(_write(tmp_path, {"model": {"predictor": {"depth": depth}}}))
        assert cfg.model.predictor.depth == depth


def test_all_lambdas_zero_rejected(tmp_path):
    path, msg = _error(tmp_path, {"loss": {"lambda_pred": 0, "lambda_con": 0,
                                           "lambda_iso": 0, "lambda_reg": 0}})
    assert str(path) in msg and "loss" in msg and "nothing to train" in msg
    # one non-zero term is enough
    cfg = RunConfig.from_yaml(_write(tmp_path, {"loss": {"lambda_pred": 0, "lambda_reg": 0.1}}))
    assert cfg.loss.lambda_reg == 0.1


# -- phases ------------------------------------------------------------------------------------

def test_phase_with_unknown_loss_key_rejected(tmp_path):
    path, msg = _error(tmp_path, {"train": {"phases": [
        {"name": "joint", "loss": {"lamda_con": 1.0}}]}})
    assert str(path) in msg
    assert "train.phases.0" in msg and "lamda_con" in msg


def test_unknown_phase_name_rejected(tmp_path):
    _, msg = _error(tmp_path, {"train": {"phases": [{"name": "warmup"}]}})
    assert "train.phases.0.name" in msg


@pytest.mark.parametrize("override, field", [
    ({"lambda_pred": -5}, "train.phases.0.loss.lambda_pred"),
    ({"lambda_con": "lots"}, "train.phases.0.loss.lambda_con"),
    ({"isotropy": "whitening"}, "train.phases.0.loss.isotropy"),
])
def test_phase_loss_values_validated_up_front(tmp_path, override, field):
    """A bad phase override must fail at load time, not when the phase starts training."""
    path, msg = _error(tmp_path, {"loss": {"lambda_pred": 1.0},
                                  "train": {"phases": [{"name": "joint", "loss": override}]}})
    assert str(path) in msg and field in msg


def test_phase_with_all_lambdas_zero_rejected(tmp_path):
    _, msg = _error(tmp_path, {"loss": {"lambda_pred": 1.0}, "train": {"phases": [
        {"name": "predictor_only"}, {"name": "joint", "loss": {"lambda_pred": 0.0}}]}})
    assert "train.phases.1.loss" in msg and "nothing to train" in msg


def test_phase_loss_overrides_merge_with_run_loss():
    cfg = RunConfig.from_dict({"loss": {"lambda_pred": 1.0, "lambda_con": 0.5}, "train": {
        "phases": [{"name": "isotropy_finetune",
                    "loss": {"lambda_pred": 0.0, "lambda_iso": 0.02, "isotropy": "sigreg"}}]}})
    merged = cfg.phase_loss(cfg.train.phases[0])
    assert (merged.lambda_pred, merged.lambda_con, merged.lambda_iso) == (0.0, 0.5, 0.02)
    assert merged.isotropy == "sigreg"


def test_score_with_predictor_needs_lambda_pred_somewhere(tmp_path):
    path, msg = _error(tmp_path, {"eval": {"score_with": "predictor"},
                                  "loss": {"lambda_pred": 0.0, "lambda_con": 1.0}})
    assert str(path) in msg and "score_with" in msg and "lambda_pred" in msg
    # a phase that trains the predictor with lambda_pred > 0 makes it valid
    cfg = RunConfig.from_dict({"eval": {"score_with": "predictor"},
                               "loss": {"lambda_pred": 0.0, "lambda_con": 1.0},
                               "train": {"phases": [{"name": "joint",
                                                     "loss": {"lambda_pred": 1.0}}]}})
    assert cfg.eval.score_with == "predictor"


def test_score_with_predictor_rejected_when_every_phase_zeroes_lambda_pred():
    """The run-level lambda_pred is only a default: phases that all override it to 0 never
    train the predictor either."""
    with pytest.raises(ConfigError, match="score_with"):
        RunConfig.from_dict({"eval": {"score_with": "predictor"},
                             "loss": {"lambda_pred": 1.0, "lambda_con": 1.0},
                             "train": {"phases": [{"name": "joint",
                                                   "loss": {"lambda_pred": 0.0}}]}})


def test_predictor_only_phase_with_zero_lambda_pred_rejected(tmp_path):
    path, msg = _error(tmp_path, {"loss": {"lambda_pred": 0.0, "lambda_con": 1.0},
                                  "train": {"phases": [{"name": "predictor_only"},
                                                       {"name": "joint"}]}})
    assert str(path) in msg and "predictor_only" in msg and "lambda_pred" in msg
    # explicit override in the phase also counts
    with pytest.raises(ConfigError, match="predictor_only"):
        RunConfig.from_dict({"loss": {"lambda_pred": 1.0, "lambda_con": 1.0},
                             "train": {"phases": [{"name": "predictor_only",
                                                   "loss": {"lambda_pred": 0}}]}})


# -- files -------------------------------------------------------------------------------------

def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        RunConfig.from_yaml(missing)
    assert str(missing) in str(info.value) and "not found" in str(info.value)


def test_invalid_yaml_named(tmp_path):
    path = _write(tmp_path, "model: [unclosed\n  loss: {\n")
    with pytest.raises(ConfigError) as info:
        RunConfig.from_yaml(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_non_mapping_top_level_named(tmp_path):
    path, msg = _error(tmp_path, "- a\n- b\n")
    assert str(path) in msg and "mapping" in msg


def test_empty_file_gives_defaults(tmp_path):
    assert RunConfig.from_yaml(_write(tmp_path, "")) == RunConfig()


# -- overrides, round trip, flatten ----------------------------------------------------------------

def test_with_overrides_sets_and_revalidates():
    cfg = RunConfig().with_overrides({"loss.lambda_con": 0.3, "model.predictor.depth": 4})
    assert cfg.loss.lambda_con == 0.3 and cfg.model.predictor.depth == 4
    assert RunConfig().loss.lambda_con == 0.0  # the original is untouched
    with pytest.raises(ConfigError, match=r"model\.predictor\.depth"):
        RunConfig().with_overrides({"model.predictor.depth": 9}, "cli")


@pytest.mark.parametrize("key", ["loss.lamda_pred", "modle.output_dim",
                                 "loss.lambda_pred.x", "model.predictor.deph"])
def test_with_overrides_unknown_key(key):
    with pytest.raises(ConfigError) as info:
        RunConfig().with_overrides({key: 1}, "--set")
    assert "--set" in str(info.value) and repr(key) in str(info.value)


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig.from_dict({
        "name": "rt", "model": {"variant": "bidirectional", "projection": "mlp",
                                "predictor": {"depth": 3, "residual": False}},
        "loss": {"lambda_pred": 0.5, "lambda_con": 0.1, "isotropy": "sigreg"},
        "train": {"max_steps_per_epoch": 7, "phases": [
            {"name": "predictor_only", "epochs": 2, "lr": 0.01},
            {"name": "joint", "loss": {"lambda_iso": 0.02}}]},
        "data": {"path": "/some/where"}, "eval": {"score_with": "predictor"},
    })
    path = tmp_path / "out.yaml"
    text = cfg.to_yaml(path)
    assert path.read_text() == text
    back = RunConfig.from_yaml(path)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert RunConfig.from_yaml(_write(tmp_path, back.to_yaml(), "again.yaml")) == cfg


def test_flatten():
    flat = flatten({"loss": {"lambda_pred": 1, "lambda_con": 0},
                    "model": {"predictor": {"depth": 2}},
                    "train": {"phases": [{"name": "joint"}]}, "empty": {}, "name": "x"})
    assert flat == {"loss.lambda_pred": 1, "loss.lambda_con": 0, "model.predictor.depth": 2,
                    "train.phases": [{"name": "joint"}], "empty": {}, "name": "x"}
    full = flatten(RunConfig().to_dict())
    assert full["model.predictor.depth"] == 2 and full["loss.lambda_pred"] == 1.0
    # every flattened key is a valid override that reproduces the config
    assert RunConfig().with_overrides(full) == RunConfig()
    assert set(LossConfig.model_fields) == {k.split(".", 1)[1] for k in full
                                            if k.startswith("loss.")}


def test_stop_after_epoch_within_the_schedule():
    assert RunConfig.from_dict({"train": {"epochs": 10, "stop_after_epoch": 10}})
    with pytest.raises(ConfigError, match=r"stop_after_epoch \(11\) is past the last epoch of the schedule \(10\)"):
        RunConfig.from_dict({"train": {"epochs": 10, "stop_after_epoch": 11}})
    phased = {"train": {"stop_after_epoch": 3, "phases": [{"name": "joint", "epochs": 2},
                                                          {"name": "joint", "epochs": 2}]}}
    assert RunConfig.from_dict(phased).train.total_epochs == 4
    with pytest.raises(ConfigError, match="patience"):
        RunConfig.from_dict({"train": {"patience": 0}})


def test_auto_scoring_and_trains_predictor():
    cfg = RunConfig.from_dict({"eval": {"score_with": "auto"},
                               "loss": {"lambda_pred": 0.0, "lambda_con": 1.0}})
    assert cfg.eval.score_with == "auto" and not cfg.trains_predictor  # auto: the query
    assert RunConfig().trains_predictor
    phased = RunConfig.from_dict({"loss": {"lambda_pred": 0.0, "lambda_con": 1.0}, "train": {
        "phases": [{"name": "joint", "epochs": 1, "loss": {"lambda_pred": 0.5}}]}})
    assert phased.trains_predictor
