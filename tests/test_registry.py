"""An exported model logged on a trial's run and registered, against both MLflow backends
(a local sqlite store and a real ``mlflow server`` on 127.0.0.1): loading the registered
version gives the folder's model back, each call makes a new version, the version carries its
tags, and the process's MLflow URIs are left as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import mlflow.sentence_transformers
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_fixtures import mlflow_server, tracking_uri  # noqa: F401 - fixtures
from sentence_transformers import SentenceTransformer

from analysis.registry import log_and_register, registered_model_name, use_tracking_uri
from trainables.config import RunConfig
from trainables.model import JEPAModel
from trainables.st_export import export_sentence_transformer

TEXTS = ["What causes scurvy?", "Scurvy is caused by a lack of vitamin C in the diet.",
         "Beta blockers lower blood pressure."]


def _exported(tmp: Path, seed: int, similarity: str) -> Path:
    """A small predictor-scored export whose heads are moved off their initialisation (so
    that two exports, and a dropped predictor, give different vectors)."""
    cfg = RunConfig().with_overrides({"model.output_dim": 64, "model.similarity": similarity})
    torch.manual_seed(seed)
    model = JEPAModel(cfg.model, None, base_dim=384)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return export_sentence_transformer(cfg, model.state_dict(), tmp / f"export-{seed}",
                                       scoring="predictor",
                                       card={"study": "registry test", "trial": str(seed)})


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("exports")
    return _exported(tmp, 1, "cosine"), _exported(tmp, 2, "euclidean")


def _run(uri: str, tmp: Path, name: str) -> str:
    """A run in a new experiment; on sqlite its artifacts go under ``tmp`` (not ./mlruns)."""
    client = MlflowClient(uri)
    location = (tmp / "artifacts").as_uri() if uri.startswith("sqlite") else None
    exp = client.create_experiment(name, artifact_location=location)
    return client.create_run(exp).info.run_id


def _vectors(model: SentenceTransformer) -> tuple[torch.Tensor, torch.Tensor]:
    return (model.encode_query(TEXTS, convert_to_tensor=True),
            model.encode_document(TEXTS, convert_to_tensor=True))


def test_registered_model_name_is_legal():
    assert registered_model_name("quick") == "jepa-quick"
    assert registered_model_name("core/run:1 (v2)") == "jepa-core-run-1-v2"
    assert registered_model_name("a..b") == "jepa-a.b"
    with pytest.raises(ValueError, match="no character"):
        registered_model_name("//")


def test_log_register_and_load_back(tracking_uri, exports, tmp_path, monkeypatch):
    first, second = exports
    run_id = _run(tracking_uri, tmp_path, "registry-round-trip")
    name = registered_model_name("core/run:1")  # characters MLflow refuses, made legal
    tags = {"study": "core", "trial": "t-0001", "scoring": "predictor",
            "dev_ndcg_at_10": "0.7123"}
    # the process's own MLflow settings, which the call must leave as they are
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())

    uri, version = log_and_register(tracking_uri, run_id, first, name, tags=tags)

    assert (uri, version) == (f"models:/{name}/1", "1")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    stored = client.get_model_version(name, "1")
    assert stored.tags == tags
    assert stored.run_id == run_id
    for version_dir in ("v1", "v2"):  # MLflow downloads into an unmanaged temp dir otherwise
        (tmp_path / version_dir).mkdir()
    with use_tracking_uri(tracking_uri):
        loaded = mlflow.sentence_transformers.load_model(uri, str(tmp_path / "v1"))
        info = mlflow.models.get_model_info(uri)
    assert "sentence_transformers" in info.flavors
    want_q, want_d = _vectors(SentenceTransformer(str(first)))
    got_q, got_d = _vectors(loaded)
    assert (got_q - want_q).abs().max() <= 1e-5 and (got_d - want_d).abs().max() <= 1e-5
    assert loaded.similarity_fn_name == "cosine"

    # a second export: version 2 of the same model, with its own tags and vectors
    uri2, version2 = log_and_register(tracking_uri, run_id, second, name,
                                      tags={**tags, "trial": "t-0002"})
    assert (uri2, version2) == (f"models:/{name}/2", "2")
    assert client.get_model_version(name, "2").tags["trial"] == "t-0002"
    assert client.get_model_version(name, "1").tags["trial"] == "t-0001"
    with use_tracking_uri(tracking_uri):
        loaded2 = mlflow.sentence_transformers.load_model(uri2, str(tmp_path / "v2"))
    assert loaded2.similarity_fn_name == "euclidean"
    assert (_vectors(loaded2)[0] - got_q).abs().max() > 1e-2
    # both logged models are outputs of the trial's run, in its experiment, and each
    # version's source is one of them
    run = client.get_run(run_id)
    logged = [client.get_logged_model(o.model_id) for o in run.outputs.model_outputs]
    assert len(logged) == 2
    assert {m.experiment_id for m in logged} == {run.info.experiment_id}
    assert {client.get_model_version(name, v).source for v in ("1", "2")} == \
        {f"models:/{m.model_id}" for m in logged}


def test_unknown_run_fails_before_anything_is_written(tracking_uri, exports):
    name = registered_model_name("never")
    with pytest.raises(MlflowException):
        log_and_register(tracking_uri, "0" * 32, exports[0], name, tags={})
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    assert client.search_registered_models(f"name = '{name}'") == []


def test_bad_requests_are_refused_before_mlflow_is_touched(tmp_path, exports):
    store = tmp_path / "mlflow.db"
    with pytest.raises(FileNotFoundError, match="modules.json"):
        log_and_register(f"sqlite:///{store}", "r", tmp_path, "jepa-x", tags={})
    with pytest.raises(ValueError, match="registered_model_name"):
        log_and_register(f"sqlite:///{store}", "r", exports[0], "core/run:1", tags={})
    assert not store.exists()
