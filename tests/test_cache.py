"""The base-feature cache: torch-free reads for the study driver, the same values either way."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.cache import FeatureTables, load_or_compute, texts_key

ROOT = Path(__file__).resolve().parents[1]


def test_numpy_tables_become_the_same_torch_tables(scifact, scifact_features):
    arrays = load_or_compute(scifact, "all-MiniLM-L6-v2", 256, progress=False, as_numpy=True)
    assert isinstance(arrays.doc_features, np.ndarray)
    assert isinstance(scifact_features.doc_features, torch.Tensor)
    arrays.doc_features.setflags(write=False)  # as Ray's object store hands them out
    tensors = arrays.to("cpu")
    assert isinstance(tensors.doc_features, torch.Tensor)
    assert torch.equal(tensors.doc_features, scifact_features.doc_features)
    assert torch.equal(tensors.query_features, scifact_features.query_features)
    ids = scifact_features.doc_ids[:5]
    assert torch.equal(tensors.docs(ids), scifact_features.docs(ids))
    assert tensors.to("cpu") is tensors  # already torch on that device: no copy


def test_driver_reads_the_cache_without_importing_torch(scifact_dir, scifact_features):
    """A study's driver loads and ships the features before starting trials; importing
    torch there would add ~2 s to every study's start-up."""
    code = (
        "import sys\n"
        "from trainables.cache import load_or_compute\n"
        "from trainables.data import load_beir\n"
        f"t = load_or_compute(load_beir({str(scifact_dir)!r}), 'all-MiniLM-L6-v2', 256, "
        "as_numpy=True, progress=False)\n"
        "assert t.doc_features.shape[0] == len(t.doc_ids) > 0\n"
        "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_to_keeps_ids_and_row_maps():
    tables = FeatureTables(["a", "b"], np.eye(2, dtype=np.float32), ["q"],
                           np.ones((1, 2), dtype=np.float32))
    moved = tables.to("cpu")
    assert moved.doc_ids == ["a", "b"] and moved.doc_row == {"a": 0, "b": 1}
    assert moved.queries(["q"]).tolist() == [[1.0, 1.0]]


def test_with_queries_adds_rows_and_keeps_the_original():
    tables = FeatureTables(["a"], np.ones((1, 2), dtype=np.float32), ["q"],
                           np.zeros((1, 2), dtype=np.float32))
    more = tables.with_queries(["p1", "p2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert isinstance(more.query_features, np.ndarray)  # the table's type, not the rows'
    assert more.query_ids == ["q", "p1", "p2"] and more.doc_ids == ["a"]
    assert more.queries(["p2", "q"]).tolist() == [[3.0, 4.0], [0.0, 0.0]]
    assert tables.query_ids == ["q"] and len(tables.query_features) == 1
    on_torch = tables.to("cpu").with_queries(["p1"], np.full((1, 2), 5, dtype=np.float32))
    assert isinstance(on_torch.query_features, torch.Tensor)
    assert on_torch.queries(["p1"]).tolist() == [[5.0, 5.0]]


@pytest.mark.parametrize("ids, rows, match", [
    (["q"], np.ones((1, 2)), "already are query rows"),
    (["p", "p"], np.ones((2, 2)), "given twice"),
    (["p"], np.ones((1, 3)), "dimension 2"),
    (["p", "r"], np.ones((1, 2)), "for 2 ids"),
])
def test_with_queries_rejects_clashes_and_bad_rows(ids, rows, match):
    tables = FeatureTables(["a"], np.ones((1, 2), dtype=np.float32), ["q"],
                           np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=match):
        tables.with_queries(ids, rows.astype(np.float32))


def test_texts_key_follows_the_texts_and_how_they_were_made():
    key = partial(texts_key, "x", model_name="all-MiniLM-L6-v2", max_seq_length=64)
    texts = {"a": "one", "b": "two"}
    base = key(texts, key_extra="s1")
    assert key(dict(reversed(list(texts.items()))), key_extra="s1") == base  # order-free
    assert key(texts, key_extra="s2") != base  # other pair settings or data
    assert key({"a": "one", "b": "three"}, key_extra="s1") != base
    assert texts_key("x", texts, "all-MiniLM-L6-v2", 128, "s1") != base
    assert texts_key("y", texts, "all-MiniLM-L6-v2", 64, "s1") != base
