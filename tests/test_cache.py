"""The base-feature cache: torch-free reads for the study driver, the same values either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from trainables.cache import FeatureTables, load_or_compute

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
