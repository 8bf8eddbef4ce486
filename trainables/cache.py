"""Base-encoder features of a whole dataset, computed once and kept on disk.

With a frozen base, the base's output for every document and query never changes, so the
expensive part of training and evaluation (minutes for SciFact's corpus on 2 CPU cores,
``benchmarks/RESULTS.md`` figure 2) is done once per (model, max length, data) and read back
in milliseconds. The key holds the
model's identity, the maximum sequence length, the text format and the data's fingerprint;
a change to any of them makes a new entry. Entries are written to a temporary directory
and renamed into place, so concurrent trials or a crash never leave a half-written one.

Reading a warm entry needs numpy only (``load_or_compute(..., as_numpy=True)``): a study's
driver ships the tables to its trials without importing torch (a start-up cost spared);
:meth:`FeatureTables.to` makes torch tensors of them where training runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from trainables.config import resolve_base_model
from trainables.data import BeirData

if TYPE_CHECKING:
    import torch

#: Bump when the way texts are built or encoded changes.
FORMAT_VERSION = "1:title+space+text:no-normalize"


def cache_root() -> Path:
    """``$JEPA_STUDY_CACHE`` or ``~/.cache/jepa-study``."""
    return Path(os.environ.get("JEPA_STUDY_CACHE", Path.home() / ".cache" / "jepa-study"))


@dataclass
class FeatureTables:
    """Base features of every document and query, with id -> row maps.

    The feature matrices are torch tensors, or numpy arrays until :meth:`to` is called.
    """

    doc_ids: list[str]
    doc_features: "torch.Tensor | np.ndarray"
    query_ids: list[str]
    query_features: "torch.Tensor | np.ndarray"
    doc_row: dict[str, int] = field(init=False, repr=False)
    query_row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.doc_row = {d: i for i, d in enumerate(self.doc_ids)}
        self.query_row = {q: i for i, q in enumerate(self.query_ids)}

    @property
    def dim(self) -> int:
        return int(self.doc_features.shape[1])

    def docs(self, ids: list[str]) -> torch.Tensor:
        return self.doc_features[[self.doc_row[i] for i in ids]]

    def queries(self, ids: list[str]) -> torch.Tensor:
        return self.query_features[[self.query_row[i] for i in ids]]

    def to(self, device: "torch.device | str") -> "FeatureTables":
        """The same tables as torch tensors on ``device`` (no copy when they already are)."""
        import torch

        def move(x):
            if isinstance(x, np.ndarray):  # np.array: arrays from Ray's store are read-only
                x = torch.from_numpy(np.array(x, dtype=np.float32))
            return x.to(device)

        docs, queries = move(self.doc_features), move(self.query_features)
        if docs is self.doc_features and queries is self.query_features:
            return self
        return FeatureTables(self.doc_ids, docs, self.query_ids, queries)


def model_identity(name: str) -> str:
    """A string that changes when the model's weights or config change."""
    path = Path(resolve_base_model(name))
    if not path.exists():
        return name
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt"}:
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}".encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return f"{path.name}:{h.hexdigest()[:16]}"


def cache_key(model_name: str, max_seq_length: int, data: BeirData) -> str:
    raw = json.dumps([model_identity(model_name), max_seq_length, FORMAT_VERSION,
                      data.fingerprint()])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_or_compute(data: BeirData, model_name: str, max_seq_length: int, *,
                    root: Path | None = None, device: str = "cpu", batch_size: int = 64,
                    progress: bool = True, as_numpy: bool = False) -> FeatureTables:
    """Returns the cached features, computing and storing them first when absent.

    ``as_numpy``: numpy arrays instead of torch tensors; torch is then imported only when
    the features have to be computed.
    """
    entry = (root or cache_root()) / "embeddings" / cache_key(model_name, max_seq_length, data)
    tables = _read(entry)
    if tables is None:
        from trainables.model import load_base

        base = load_base(model_name, max_seq_length, device)
        tables = encode_dataset(base, data, batch_size=batch_size, progress=progress)
        _write(entry, tables, {"model": model_name, "max_seq_length": max_seq_length,
                               "data": str(data.root), "format": FORMAT_VERSION})
        tables = _read(entry) or tables  # the written arrays (the same values)
    return tables if as_numpy else tables.to("cpu")


def encode_dataset(base, data: BeirData, *, batch_size: int = 64,
                   progress: bool = True) -> FeatureTables:
    """Runs the base over every document and query (sentence-transformers sorts by length)."""
    doc_ids = data.doc_ids
    query_ids = list(data.queries)
    import torch

    kw = dict(batch_size=batch_size, convert_to_tensor=True, show_progress_bar=progress,
              normalize_embeddings=False)
    with torch.inference_mode():
        docs = base.encode([data.doc_text(d) for d in doc_ids], **kw).float().cpu()
        queries = base.encode([data.queries[q] for q in query_ids], **kw).float().cpu()
    return FeatureTables(doc_ids, docs.clone(), query_ids, queries.clone())


def _read(entry: Path) -> FeatureTables | None:
    try:
        doc_ids = json.loads((entry / "doc_ids.json").read_text())
        query_ids = json.loads((entry / "query_ids.json").read_text())
        docs = np.load(entry / "docs.npy")
        queries = np.load(entry / "queries.npy")
    except (OSError, ValueError):
        return None
    if len(doc_ids) != len(docs) or len(query_ids) != len(queries):
        return None
    return FeatureTables(doc_ids, docs, query_ids, queries)


def _write(entry: Path, tables: FeatureTables, meta: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        (tmp / "doc_ids.json").write_text(json.dumps(tables.doc_ids))
        (tmp / "query_ids.json").write_text(json.dumps(tables.query_ids))
        np.save(tmp / "docs.npy", np.asarray(tables.doc_features.cpu()))
        np.save(tmp / "queries.npy", np.asarray(tables.query_features.cpu()))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(entry)
        except OSError:  # another process won the race: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
