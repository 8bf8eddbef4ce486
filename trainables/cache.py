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

Texts that are not the dataset's own (the pseudo-queries of ``trainables.pairs``) are cached
the same way by :func:`load_or_compute_texts`, keyed by the model, the maximum length, the
caller's description of how the texts were made (``key_extra``: the pair settings and the
data's fingerprint) and a digest of the texts themselves; :meth:`FeatureTables.with_queries`
adds them as query rows, and :func:`load_or_compute_corpus_pairs` does both in one call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from trainables.config import resolve_base_model
from trainables.data import BeirData

if TYPE_CHECKING:
    import torch

    from trainables.pairs import CorpusPairs, CorpusPairSettings

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

    def with_queries(self, ids: list[str],
                     features: "torch.Tensor | np.ndarray") -> "FeatureTables":
        """A new table: the same documents, and query rows ``self``'s followed by ``ids``'.

        The new rows take the type (numpy or torch) and, for torch, the device of this
        table's query features; ``self`` is left unchanged.

        Raises:
            ValueError: An id of ``ids`` that this table already has, or twice in ``ids``
                (the first few are named), or rows that do not match ``ids`` or ``dim``.
        """
        ids = list(ids)
        if features.ndim != 2 or len(features) != len(ids) or features.shape[1] != self.dim:
            raise ValueError(f"with_queries: features of shape {tuple(features.shape)} for "
                             f"{len(ids)} ids of dimension {self.dim}")
        clash = [i for i in ids if i in self.query_row]
        if clash:
            raise ValueError(f"with_queries: {len(clash)} id(s) already are query rows, "
                             f"e.g. {clash[:3]}")
        if len(set(ids)) != len(ids):
            twice = [i for i, n in Counter(ids).items() if n > 1]
            raise ValueError(f"with_queries: ids given twice, e.g. {twice[:3]}")
        if isinstance(self.query_features, np.ndarray):
            if not isinstance(features, np.ndarray):
                features = features.detach().cpu().numpy()
            queries = np.concatenate([self.query_features,
                                      features.astype(self.query_features.dtype, copy=False)])
        else:
            import torch

            if isinstance(features, np.ndarray):
                features = torch.from_numpy(np.array(features))
            queries = torch.cat([self.query_features,
                                 features.to(self.query_features.device,
                                             self.query_features.dtype)])
        return FeatureTables(self.doc_ids, self.doc_features, self.query_ids + ids, queries)


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
    kw = dict(batch_size=batch_size, progress=progress)
    docs = encode_texts(base, [data.doc_text(d) for d in doc_ids], **kw)
    queries = encode_texts(base, [data.queries[q] for q in query_ids], **kw)
    return FeatureTables(doc_ids, docs, query_ids, queries)


def encode_texts(base, texts: list[str], *, batch_size: int = 64,
                 progress: bool = True) -> "torch.Tensor":
    """The base's features of ``texts`` (float32, CPU, not normalised), one row per text."""
    import torch

    with torch.inference_mode():
        out = base.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                          show_progress_bar=progress, normalize_embeddings=False)
    return out.float().cpu().clone()  # clone: a normal tensor, not an inference one


# -- texts that are not the dataset's own --------------------------------------------------

def texts_key(name: str, texts: Mapping[str, str], model_name: str, max_seq_length: int,
              key_extra: str) -> str:
    """The cache key of :func:`load_or_compute_texts`.

    It holds the model's identity, the maximum length, the text format, ``name``,
    ``key_extra`` and a digest of the (id, text) pairs in sorted order, so the same texts
    given in another order share an entry and any changed text makes a new one.
    """
    h = hashlib.sha256()
    for text_id in sorted(texts):
        h.update(json.dumps([text_id, texts[text_id]]).encode())
        h.update(b"\n")
    raw = json.dumps(["texts", model_identity(model_name), max_seq_length, FORMAT_VERSION,
                      name, key_extra, h.hexdigest()])
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def load_or_compute_texts(name: str, texts: Mapping[str, str], model_name: str,
                          max_seq_length: int, *, key_extra: str, root: Path | None = None,
                          device: str = "cpu", batch_size: int = 64, progress: bool = True,
                          as_numpy: bool = False) -> tuple[list[str], "torch.Tensor | np.ndarray"]:
    """The base features of ``texts``, cached on disk like a dataset's.

    Args:
        name: What the texts are (e.g. ``"scifact/corpus-pairs"``): part of the key and of
            the entry's ``meta.json``.
        texts: Id -> text.
        key_extra: How the texts were made (e.g. the data's fingerprint and the pair
            settings' :meth:`~trainables.pairs.CorpusPairSettings.key`); part of the key.
        as_numpy: numpy rows instead of a torch tensor (torch is then imported only when
            the features have to be computed).

    Returns:
        (ids in sorted order, features with one row per id).
    """
    if not texts:
        raise ValueError(f"load_or_compute_texts({name!r}): no texts to encode")
    entry = ((root or cache_root()) / "texts"
             / texts_key(name, texts, model_name, max_seq_length, key_extra))
    found = _read_texts(entry)
    if found is None:
        from trainables.model import load_base

        ids = sorted(texts)
        base = load_base(model_name, max_seq_length, device)
        features = encode_texts(base, [texts[i] for i in ids], batch_size=batch_size,
                                progress=progress)

        def fill(tmp: Path) -> None:
            (tmp / "ids.json").write_text(json.dumps(ids))
            np.save(tmp / "features.npy", features.numpy())
            (tmp / "meta.json").write_text(json.dumps(
                {"name": name, "model": model_name, "max_seq_length": max_seq_length,
                 "format": FORMAT_VERSION, "key_extra": key_extra, "count": len(ids)},
                indent=1))

        _publish(entry, fill)
        found = _read_texts(entry) or (ids, features.numpy())
    ids, features = found
    if as_numpy:
        return ids, features
    import torch

    return ids, torch.from_numpy(np.array(features, dtype=np.float32))


def load_or_compute_corpus_pairs(data: BeirData, pairs: "CorpusPairs",
                                 settings: "CorpusPairSettings", model_name: str,
                                 max_seq_length: int, *, root: Path | None = None,
                                 device: str = "cpu", batch_size: int = 64,
                                 progress: bool = True, as_numpy: bool = False) -> FeatureTables:
    """The dataset's features (:func:`load_or_compute`) plus ``pairs``' pseudo-queries as
    query rows (:meth:`FeatureTables.with_queries`), each read from or written to the cache.

    ``pairs`` must have been made from ``data.corpus`` with ``settings``: the entry is keyed
    by ``settings.key()`` and ``data.fingerprint()`` (and by the texts themselves). Qrels are
    not read.
    """
    kw = dict(root=root, device=device, batch_size=batch_size, progress=progress,
              as_numpy=as_numpy)
    tables = load_or_compute(data, model_name, max_seq_length, **kw)
    if not pairs.queries:
        return tables
    ids, features = load_or_compute_texts(
        f"{data.root.name}/corpus-pairs", pairs.queries, model_name, max_seq_length,
        key_extra=f"data={data.fingerprint()};{settings.key()}", **kw)
    return tables.with_queries(ids, features)


def _read_texts(entry: Path) -> tuple[list[str], np.ndarray] | None:
    try:
        ids = json.loads((entry / "ids.json").read_text())
        features = np.load(entry / "features.npy")
    except (OSError, ValueError):
        return None
    return (ids, features) if len(ids) == len(features) else None


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
    def fill(tmp: Path) -> None:
        (tmp / "doc_ids.json").write_text(json.dumps(tables.doc_ids))
        (tmp / "query_ids.json").write_text(json.dumps(tables.query_ids))
        np.save(tmp / "docs.npy", np.asarray(tables.doc_features.cpu()))
        np.save(tmp / "queries.npy", np.asarray(tables.query_features.cpu()))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    _publish(entry, fill)


def _publish(entry: Path, fill: Callable[[Path], None]) -> None:
    """Fills a temporary directory beside ``entry`` and renames it to ``entry``: readers see
    a whole entry or none."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(entry)
        except OSError:  # another process won the race: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
