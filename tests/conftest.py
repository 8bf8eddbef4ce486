"""Shared fixtures: the real SciFact copy and its cached base features.

The first session on a machine pays ~2 minutes to encode SciFact with the packaged MiniLM;
the features are cached on disk (``$JEPA_STUDY_CACHE`` or ``~/.cache/jepa-study``) and
every later test and run reads them back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCIFACT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scifact"


@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.fail(f"SciFact not found at {SCIFACT.resolve()}: the project expects "
                    "../shared/data/scifact beside the checkout")
    return SCIFACT.resolve()


@pytest.fixture(scope="session")
def scifact(scifact_dir):
    from trainables.data import load_beir

    return load_beir(scifact_dir)


@pytest.fixture(scope="session")
def scifact_features(scifact):
    """SciFact's base features; under a lock, so that the test processes of one run (pytest-
    xdist's workers) encode a cold cache once, not once each."""
    import fcntl

    from trainables.cache import cache_root, load_or_compute

    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".tests-scifact.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return load_or_compute(scifact, "all-MiniLM-L6-v2", 256, progress=False)


def pytest_collection_modifyitems(items):
    """Browser tests run last: pytest-playwright's Playwright, once started, lives to the end
    of the session with its asyncio loop marked running in the main thread (``asyncio.run``
    would refuse to run there)."""
    items.sort(key=lambda item: "page" in getattr(item, "fixturenames", ()))


NFCORPUS = SCIFACT.parent / "nfcorpus"


def _cut(source: Path, out: Path, per_split: dict[str, int], n_docs: int = 400) -> Path:
    """A small BEIR directory cut from ``source``: the first queries of each split (at most
    6 judgements each), every document they judge, others up to ``n_docs`` documents."""
    (out / "qrels").mkdir(parents=True)
    keep_q: set[str] = set()
    judged: set[str] = set()
    for split, n in per_split.items():
        rows = (source / "qrels" / f"{split}.tsv").read_text().splitlines()
        by_q: dict[str, list[str]] = {}
        for line in rows[1:]:
            q, d, rel = line.split("\t")
            by_q.setdefault(q, []).append(line)
        chosen = sorted(by_q)[:n]
        lines = [rows[0]] + [ln for q in chosen for ln in by_q[q][:6]]
        (out / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        keep_q |= set(chosen)
        judged |= {ln.split("\t")[1] for ln in lines[1:]}
    corpus = [json.loads(ln) for ln in (source / "corpus.jsonl").read_text().splitlines()]
    docs = [d for d in corpus if d["_id"] in judged]
    docs += [d for d in corpus if d["_id"] not in judged][:max(0, n_docs - len(docs))]
    (out / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    queries = [json.loads(ln) for ln in (source / "queries.jsonl").read_text().splitlines()]
    (out / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries
                                                 if q["_id"] in keep_q) + "\n")
    return out


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory) -> Path:
    """A small BEIR directory cut from NFCorpus: 30 queries of each split, every document
    they judge plus others, up to 400 documents (encoded in seconds)."""
    return _cut(NFCORPUS, tmp_path_factory.mktemp("nfsmall") / "nfsmall",
                {"train": 30, "dev": 30, "test": 30})


@pytest.fixture(scope="session")
def small_scifact(tmp_path_factory) -> Path:
    """A small BEIR directory cut from SciFact (no dev split: dev is carved from train): 80
    train and 40 test queries, up to 400 documents."""
    return _cut(SCIFACT, tmp_path_factory.mktemp("sfsmall") / "sfsmall",
                {"train": 80, "test": 40})
