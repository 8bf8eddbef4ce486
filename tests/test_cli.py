"""The ``jepa-study`` command line, run as ``python -m study.cli`` in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search_spaces.space import load_run_config
from trainables.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                       os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "study.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY = {"name": "tiny", "loss": {"lambda_pred": 1.0, "lambda_con": 0.5},
        "train": {"epochs": 1, "max_steps_per_epoch": 2},
        "eval": {"evaluate_test": True}}


def test_train_writes_metrics_and_resolved_config(tmp_path, scifact_dir, scifact_features):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    # a relative --data must end up absolute in the resolved config
    rel_data = os.path.relpath(scifact_dir, REPO)
    proc = _cli("train", "--config", str(config), "--data", rel_data, "--out", str(out),
                "--quiet", "--model")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1 [joint]" in proc.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1
    assert metrics["history"][0]["epoch"] == 1
    test_ndcg = metrics["test"]["test_ndcg_at_10"]
    assert math.isfinite(test_ndcg) and 0.5 < test_ndcg <= 1.0
    assert metrics["final"]["dev_ndcg_at_10"] == metrics["history"][0]["dev_ndcg_at_10"]

    written = RunConfig.from_yaml(out / "config.yaml")
    assert Path(written.data.path).is_absolute()
    assert Path(written.data.path) == scifact_dir
    expected = RunConfig.from_yaml(config).with_overrides({"data.path": str(scifact_dir)})
    assert written == expected
    assert (out / "checkpoints" / "epoch_0001" / "state.pt").is_file()
    # --model: the best epoch's model as a sentence-transformers folder with its card
    from sentence_transformers import SentenceTransformer

    assert f"wrote the model {out / 'model'}" in proc.stdout
    model = SentenceTransformer(str(out / "model"))
    assert model.encode_query(["a query"]).shape == (1, written.model.output_dim)
    card = (out / "model" / "README.md").read_text()
    assert "test (reported only)" in card and f"{test_ndcg:.4f}" in card


@pytest.mark.parametrize("preset, lambdas", [
    ("minimal", (1.0, 0.0, 0.0, 0.0)),
    ("hybrid", (0.5, 0.1, 1.0, 0.0)),
    ("full", (1.0, 0.0, 1.0, 0.0)),
])
def test_presets_resolve(preset, lambdas, scifact_dir):
    cfg = load_run_config(preset, None)
    loss = cfg.loss
    assert (loss.lambda_pred, loss.lambda_con, loss.lambda_iso, loss.lambda_reg) == lambdas
    assert cfg.name == preset and cfg.model.freeze_base and cfg.data.path is None
    with_data = load_run_config(preset, str(scifact_dir))
    assert with_data.data.path == str(scifact_dir)
    assert with_data.loss == loss


def test_unknown_preset_or_missing_file():
    with pytest.raises(ConfigError, match="no such config file or preset"):
        load_run_config("maximal", None)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config("does/not/exist.yaml", None)


def test_bad_config_exits_2_naming_field_and_file(tmp_path, scifact_dir):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({**TINY, "model": {"predictor": {"depth": 9}}}))
    out = tmp_path / "out"
    proc = _cli("train", "--config", str(config), "--data", str(scifact_dir), "--out",
                str(out), "--quiet", timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "model.predictor.depth" in proc.stderr and str(config) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_preset_exits_2(tmp_path):
    proc = _cli("train", "--config", "maximal", "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "maximal" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_dir_exits_2_naming_path(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    missing = tmp_path / "no_such_data"
    out = tmp_path / "out"
    proc = _cli("train", "--config", str(config), "--data", str(missing), "--out", str(out),
                "--quiet")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.rglob("*"))


def test_baseline_prints_zero_shot_json(scifact_dir, scifact_features):
    proc = _cli("baseline", "--split", "test", "--data", str(scifact_dir))
    assert proc.returncode == 0, proc.stderr
    start = proc.stdout.index("{")
    result = json.loads(proc.stdout[start:])
    assert result["split"] == "test" and result["model"] == "all-MiniLM-L6-v2"
    assert result["ndcg_at_10"] == pytest.approx(0.645, abs=0.002)


@pytest.mark.parametrize("command", ["train", "launch"])
def test_negative_checkpoint_interval_exits_2(command, tmp_path):
    args = ["--config", "hybrid"] if command == "train" else ["--storage", str(tmp_path)]
    proc = _cli(command, *args, "--checkpoint-interval", "-1")
    assert proc.returncode == 2
    assert "--checkpoint-interval" in proc.stderr and "must be >= 0" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_launch_flags_are_the_options_fields():
    """`launch`'s flags are built from StudyOptions: one per option, each default written
    once (the dataclass's: a flag not given leaves the field's default), types and checks
    from the field."""
    from dataclasses import fields

    from study.cli import _options, build_parser
    from study.study import StudyError, StudyOptions

    parser = build_parser()
    launch = parser._subparsers._group_actions[0].choices["launch"]
    flags = {a.dest: a for a in launch._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in fields(StudyOptions) if f.name != "verbose"}
    assert _options(StudyOptions, parser.parse_args(["launch"])) == StudyOptions()
    args = parser.parse_args(["launch", "--num-workers", "2", "--gpus-per-worker", "0.5",
                              "--warm-start", "a", "--warm-start", "b", "--max-failures", "4",
                              "--checkpoint-interval", "3", "--execution", "train"])
    assert _options(StudyOptions, args) == StudyOptions(
        num_workers=2, gpus_per_worker=0.5, warm_start=["a", "b"], max_failures=4,
        checkpoint_interval_s=3.0, execution="train")
    with pytest.raises(SystemExit):  # argparse refuses what is not one of the choices
        parser.parse_args(["launch", "--execution", "spark"])
    with pytest.raises(StudyError, match="--num-workers must be 1"):
        _options(StudyOptions, parser.parse_args(["launch", "--execution", "direct",
                                                  "--num-workers", "2"]))
