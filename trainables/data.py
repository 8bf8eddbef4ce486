"""BEIR-format datasets: reading, dev-split carving and finding the data on disk.

A BEIR dataset is a directory holding ``corpus.jsonl``, ``queries.jsonl`` and
``qrels/<split>.tsv``. Everything is validated on load, because a typo'd id in a qrels file
otherwise surfaces hours later as a silently wrong metric; every error names the file and
the 1-based line. Datasets without a dev split get one carved from the train queries with a
seeded, order-independent shuffle, so every trial of a study sees the same dev queries.
``resolve_data_dir`` finds the data without configuration in the usual setups and downloads
SciFact into a cache as a last resort, never leaving a half-written copy behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SCIFACT_URL", "BeirData", "DataError", "download_beir", "load_beir", "make_splits",
           "resolve_data_dir", "split_for"]

log = logging.getLogger(__name__)

#: BEIR's public copy of SciFact (about 2.7 MB).
SCIFACT_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"
#: Environment variable naming a dataset directory.
DATA_ENV = "JEPA_STUDY_DATA"
#: Environment variable naming the cache root (shared with ``trainables.cache``).
CACHE_ENV = "JEPA_STUDY_CACHE"
#: The checkout's root: the SciFact copy is looked for in ``../shared/data/scifact`` beside it.
_REPO_ROOT = Path(__file__).resolve().parents[1]
_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20
_HINT = f"pass --data DIR or set {DATA_ENV}"


class DataError(ValueError):
    """Bad or missing data; the message names the file and, for a bad line, its 1-based line."""


@dataclass(frozen=True)
class BeirData:
    """One BEIR dataset held in memory.

    Attributes:
        root: The dataset directory (resolved).
        corpus: Document id -> (title, text), in file order.
        queries: Query id -> text, in file order.
        qrels: Split name -> {query id: {document id: relevance}}.
    """

    root: Path
    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def doc_text(self, doc_id: str) -> str:
        """The text a document is encoded as: ``title + " " + text``, stripped (as BEIR does)."""
        title, text = self.corpus[doc_id]
        return f"{title} {text}".strip()

    @property
    def doc_ids(self) -> list[str]:
        """Document ids in corpus (file) order; computed once. Do not mutate."""
        if "doc_ids" not in self._cache:
            self._cache["doc_ids"] = list(self.corpus)
        return self._cache["doc_ids"]

    def fingerprint(self) -> str:
        """First 16 hex digits of a SHA-256 over the bytes of corpus.jsonl and queries.jsonl.

        It depends on content only (not paths or mtimes), so copies of the same data share
        caches; qrels are left out because they do not change what gets encoded.
        """
        if "fingerprint" not in self._cache:
            h = hashlib.sha256()
            for name in ("corpus.jsonl", "queries.jsonl"):
                path = self.root / name
                h.update(f"{name}:{path.stat().st_size}\n".encode())
                with path.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            self._cache["fingerprint"] = h.hexdigest()[:16]
        return self._cache["fingerprint"]

    def split(self, name: str) -> dict[str, dict[str, int]]:
        """The qrels of split ``name``; DataError naming the split and what is present."""
        try:
            return self.qrels[name]
        except KeyError:
            raise DataError(f"split {name!r} not found in {self.root / 'qrels'}: loaded "
                            f"{sorted(self.qrels) or 'none'}; files present "
                            f"{_qrels_files(self.root) or 'none'}") from None


# -- loading -------------------------------------------------------------------------------

def load_beir(path: str | Path, splits: Iterable[str] | None = None) -> BeirData:
    """Reads and validates a BEIR directory.

    Args:
        path: Directory holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/*.tsv``.
        splits: Qrels splits to load (each must exist); None loads every ``qrels/*.tsv``.

    Raises:
        DataError: Missing directory or file, a malformed line, a duplicate id, an empty
            corpus, or a qrels line naming an unknown query or document.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist ({_HINT})")
    root = root.resolve()
    corpus: dict[str, tuple[str, str]] = {}
    for file, n, obj in _json_lines(root / "corpus.jsonl"):
        doc_id, text = _id_and_text(obj, file, n)
        title = obj.get("title")
        if title is None:
            title = ""
        elif not isinstance(title, str):
            raise DataError(f"{file}: line {n}: 'title' must be a string")
        if doc_id in corpus:
            raise DataError(f"{file}: line {n}: duplicate _id {doc_id!r}")
        corpus[doc_id] = (title, text)
    if not corpus:
        raise DataError(f"{root / 'corpus.jsonl'}: empty corpus (no documents)")
    queries: dict[str, str] = {}
    for file, n, obj in _json_lines(root / "queries.jsonl"):
        qid, text = _id_and_text(obj, file, n)
        if qid in queries:
            raise DataError(f"{file}: line {n}: duplicate _id {qid!r}")
        queries[qid] = text
    if not queries:
        raise DataError(f"{root / 'queries.jsonl'}: no queries")
    present = _qrels_files(root)
    if splits is None:
        names = [Path(f).stem for f in present]
    else:
        names = list(dict.fromkeys(splits))
        for name in names:
            if f"{name}.tsv" not in present:
                raise DataError(f"split {name!r}: {root / 'qrels' / (name + '.tsv')} does not "
                                f"exist; files present: {present or 'none'}")
    qrels = {name: _read_qrels(root / "qrels" / f"{name}.tsv", corpus, queries)
             for name in names}
    return BeirData(root=root, corpus=corpus, queries=queries, qrels=qrels)


def _qrels_files(root: Path) -> list[str]:
    qdir = root / "qrels"
    return sorted(p.name for p in qdir.glob("*.tsv") if p.is_file()) if qdir.is_dir() else []


def _json_lines(file: Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Yields (file, 1-based line number, object) for each non-blank line."""
    if not file.is_file():
        raise DataError(f"{file} does not exist")
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}: line {n}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{file}: line {n}: expected a JSON object, "
                                f"got {type(obj).__name__}")
            yield file, n, obj


def _id_and_text(obj: dict[str, Any], file: Path, n: int) -> tuple[str, str]:
    raw = obj.get("_id")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DataError(f"{file}: line {n}: missing or invalid '_id'")
    text = obj.get("text")
    if not isinstance(text, str):
        raise DataError(f"{file}: line {n}: missing or invalid 'text' (must be a string)")
    return str(raw), text


def _read_qrels(file: Path, corpus: dict[str, tuple[str, str]],
                queries: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if n == 1 and cols[0].strip().lower() == "query-id":
                continue
            if len(cols) != 3:
                raise DataError(f"{file}: line {n}: expected 3 tab-separated columns "
                                f"(query-id, corpus-id, score), got {len(cols)}")
            qid, doc_id, raw = (c.strip() for c in cols)
            try:
                score = int(raw)
            except ValueError:
                raise DataError(f"{file}: line {n}: score {raw!r} is not an integer") from None
            if qid not in queries:
                raise DataError(f"{file}: line {n}: unknown query id {qid!r}")
            if doc_id not in corpus:
                raise DataError(f"{file}: line {n}: unknown document id {doc_id!r}")
            judged = out.setdefault(qid, {})
            if judged.get(doc_id, score) != score:
                raise DataError(f"{file}: line {n}: conflicting score for "
                                f"({qid!r}, {doc_id!r})")
            judged[doc_id] = score
    return out


# -- splits --------------------------------------------------------------------------------

#: fewest dev queries a carved dev split may hold: fewer cannot tell configs apart
MIN_DEV_QUERIES = 10
DEV_MODES = ("queries", "unseen_docs")


def make_splits(data: BeirData, *, train: str = "train", dev: str = "dev", test: str = "test",
                dev_fraction: float = 0.2, seed: int = 0, dev_mode: str = "queries",
                dev_doc_fraction: float = 0.3) -> dict[str, dict[str, dict[str, int]]]:
    """The train, dev and test qrels of a run, keyed ``"train"``, ``"dev"``, ``"test"``.

    Only queries with at least one relevant (> 0) document are kept. The test split is never
    touched. What dev is depends on ``dev_mode``:

    * ``queries``: the dataset's own dev split when it has one; otherwise ``dev_fraction`` of
      the train queries become dev (ids sorted, then shuffled with ``random.Random(seed)``,
      so the choice does not depend on file or dict order).
    * ``unseen_docs``: ``dev_doc_fraction`` of the train-positive documents are held out
      (sorted, shuffled with ``random.Random(seed)``); dev is the train queries whose
      positives all lie in the held-out share, and every train pair that points to a
      held-out document leaves train (a query left without positives leaves too). No dev
      positive is then a train positive: dev measures retrieval of documents training never
      saw as positives. The dataset's own dev split is not used in this mode.

    Raises:
        DataError: Train or test missing, a used split with no relevant pairs, a carve that
            leaves train empty or dev with fewer than :data:`MIN_DEV_QUERIES` queries (the
            message names the field to change).
        ValueError: A fraction outside (0, 1) or an unknown ``dev_mode``.
    """
    if dev_mode not in DEV_MODES:
        raise ValueError(f"data.dev_mode must be one of {DEV_MODES}, got {dev_mode!r}")
    available = sorted(data.qrels)
    for role, name in (("train", train), ("test", test)):
        if name not in data.qrels:
            raise DataError(f"{role} split {name!r} not found in {data.root / 'qrels'}; "
                            f"available splits: {available or 'none'}")
    out = {"train": _positive(data, train), "test": _positive(data, test)}
    train_file = data.root / "qrels" / (train + ".tsv")
    if dev_mode == "unseen_docs":
        out["train"], out["dev"] = _unseen_docs_dev(out["train"], dev_doc_fraction, seed,
                                                    train_file)
        return {k: out[k] for k in ("train", "dev", "test")}
    if dev in data.qrels:
        out["dev"] = _positive(data, dev)
        return {k: out[k] for k in ("train", "dev", "test")}
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    ids = sorted(out["train"])
    random.Random(seed).shuffle(ids)
    n_dev = round(len(ids) * dev_fraction)
    if n_dev < 1 or n_dev >= len(ids):
        raise DataError(f"carving dev_fraction={dev_fraction} of the {len(ids)} train queries "
                        f"of {train_file} would leave {'dev' if n_dev < 1 else 'train'} empty")
    dev_ids = set(ids[:n_dev])
    whole = out["train"]
    out["train"] = {q: docs for q, docs in whole.items() if q not in dev_ids}
    out["dev"] = {q: docs for q, docs in whole.items() if q in dev_ids}
    return {k: out[k] for k in ("train", "dev", "test")}


def split_for(data: BeirData, cfg: Any) -> dict[str, dict[str, dict[str, int]]]:
    """:func:`make_splits` with every setting from a run config's ``data`` section.

    With ``dev_mode: corpus_pairs`` dev is made from the corpus where training is
    (``trainables.loop.prepare``: here it is empty), and the labelled splits are optional:
    a collection with no judgements has neither train nor test qrels (then they are empty,
    every query counts as unseen and test is not scored).
    """
    if cfg.dev_mode == "corpus_pairs":
        def labelled(name: str) -> dict[str, dict[str, int]]:
            return _positive(data, name) if name in data.qrels else {}

        return {"train": labelled(cfg.train_split), "dev": {},
                "test": labelled(cfg.test_split)}
    return make_splits(data, train=cfg.train_split, dev=cfg.dev_split, test=cfg.test_split,
                       dev_fraction=cfg.dev_fraction, seed=cfg.split_seed,
                       dev_mode=cfg.dev_mode, dev_doc_fraction=cfg.dev_doc_fraction)


def _unseen_docs_dev(whole: dict[str, dict[str, int]], fraction: float, seed: int,
                     train_file: Path) -> tuple[dict[str, dict[str, int]],
                                                dict[str, dict[str, int]]]:
    """(train, dev) of ``dev_mode: unseen_docs`` from the positive train qrels ``whole``."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.dev_doc_fraction must be in (0, 1), got {fraction}")
    positives = sorted({d for docs in whole.values() for d, rel in docs.items() if rel > 0})
    random.Random(seed).shuffle(positives)
    held = set(positives[:round(len(positives) * fraction)])
    dev, train = {}, {}
    for q, docs in whole.items():
        pos = {d for d, rel in docs.items() if rel > 0}
        if pos <= held:
            dev[q] = dict(docs)
            continue
        kept = {d: rel for d, rel in docs.items() if d not in held}
        if any(rel > 0 for rel in kept.values()):
            train[q] = kept
    where = (f"holding out data.dev_doc_fraction={fraction} of the {len(positives)} "
             f"train-positive documents of {train_file} (split seed {seed})")
    if len(dev) < MIN_DEV_QUERIES:
        raise DataError(f"{where} leaves {len(dev)} dev queries (fewer than "
                        f"{MIN_DEV_QUERIES}): too few train queries have all their positives "
                        "in the held-out share; raise data.dev_doc_fraction or use "
                        "data.dev_mode: queries")
    if not train:
        raise DataError(f"{where} leaves no train pair; lower data.dev_doc_fraction")
    return train, dev


def _positive(data: BeirData, name: str) -> dict[str, dict[str, int]]:
    """Copy of split ``name`` keeping queries with a relevant document; DataError if none."""
    kept = {q: dict(docs) for q, docs in data.qrels[name].items()
            if any(rel > 0 for rel in docs.values())}
    if not kept:
        raise DataError(f"{data.root / 'qrels' / (name + '.tsv')}: split {name!r} has no "
                        "judged pairs with relevance > 0")
    return kept


# -- finding and downloading ---------------------------------------------------------------

def resolve_data_dir(explicit: str | Path | None = None, *, download: bool = True) -> Path:
    """Where the dataset is, in order of precedence.

    1. ``explicit`` (must exist); 2. ``$JEPA_STUDY_DATA`` (must exist); 3. the SciFact copy
    in ``../shared/data/scifact`` beside the checkout or the working directory; 4. a complete
    copy in ``$JEPA_STUDY_CACHE`` (or ``~/.cache/jepa-study``) ``/datasets/scifact``;
    5. with ``download``, SciFact fetched from BEIR into that cache directory.

    Raises:
        DataError: A named directory is missing, or nothing was found (and the download, if
            allowed, failed); the message says to pass ``--data DIR`` or set the variable.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} (given explicitly) does not exist")
        return path.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"data directory {path} (from ${DATA_ENV}) does not exist")
        return path.resolve()
    for candidate in _shared_candidates():
        if _is_complete(candidate):
            return candidate
    cached = _cache_dir()
    if _is_complete(cached):
        return cached.resolve()
    looked = [str(p) for p in _shared_candidates()] + [str(cached)]
    if not download:
        raise DataError(f"no dataset found (looked in {', '.join(looked)}); {_HINT}")
    log.info("downloading SciFact from %s into %s", SCIFACT_URL, cached)
    return download_beir(SCIFACT_URL, cached)


def _shared_candidates() -> list[Path]:
    paths = [(_REPO_ROOT / ".." / "shared" / "data" / "scifact").resolve(),
             (Path.cwd() / ".." / "shared" / "data" / "scifact").resolve()]
    return list(dict.fromkeys(paths))


def _cache_dir() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jepa-study")
    return root.expanduser() / "datasets" / "scifact"


def _is_complete(path: Path) -> bool:
    """Whether ``path`` looks like a whole BEIR dataset (files present; not parsed)."""
    return ((path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file()
            and bool(_qrels_files(path)))


def download_beir(url: str, dest: Path) -> Path:
    """Downloads a BEIR zip, validates it and renames it into ``dest`` in one step.

    The archive goes to a temporary file beside ``dest`` and is unpacked into a temporary
    directory there; the directory holding ``corpus.jsonl`` is checked with ``load_beir``
    and renamed to ``dest``. If another process put a complete copy there first, that copy
    is kept. On any failure every temporary file is removed and ``dest`` is left absent.

    Raises:
        DataError: Naming ``url``, for an HTTP or network error, a truncated or corrupt
            archive, or an archive that is not a valid BEIR dataset.
    """
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}-", suffix=".zip.part",
                                    dir=dest.parent)
    tmp_zip = Path(tmp_name)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".unpack", dir=dest.parent))
    try:
        with os.fdopen(fd, "wb") as out:
            _fetch(url, out)
        with zipfile.ZipFile(tmp_zip) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise DataError(f"corrupt member {bad!r} in the archive")
            archive.extractall(tmp_dir)
        found = sorted((p.parent for p in tmp_dir.rglob("corpus.jsonl")),
                       key=lambda p: len(p.parts))
        if not found:
            raise DataError("the archive holds no corpus.jsonl")
        load_beir(found[0])
        try:
            found[0].rename(dest)
        except OSError:
            if not _is_complete(dest):
                raise
            log.info("%s appeared while downloading; keeping it", dest)
        return dest.resolve()
    except Exception as exc:
        raise DataError(f"could not download a BEIR dataset from {url} into {dest}: {exc}; "
                        f"{_HINT}") from exc
    finally:
        tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fetch(url: str, out: Any) -> None:
    """Streams ``url`` into the open file ``out``; raises if fewer bytes arrive than promised."""
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
        expected = resp.headers.get("Content-Length")
        received = 0
        while chunk := resp.read(_CHUNK):
            out.write(chunk)
            received += len(chunk)
    if expected is not None and expected.isdigit() and received != int(expected):
        raise DataError(f"truncated download: {received} of {expected} bytes")
