"""BM25 reference row: a corpus where the answer is obvious, and BASELINES.md on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainables.bm25 import bm25_metrics, bm25_run
from trainables.data import load_beir, make_splits

NFCORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nfcorpus"


@pytest.fixture
def tiny(tmp_path: Path):
    """Three documents; query ids "d2" and "q*". "d2" is both a query and a document id."""
    docs = [
        {"_id": "d1", "title": "Cats", "text": "The cat sat on the mat. A cat purrs."},
        {"_id": "d2", "title": "Dogs and cats", "text": "The dog barks at the cat."},
        {"_id": "d3", "title": "Volcanoes", "text": "Lava flows from the volcano."},
    ]
    queries = [
        {"_id": "q_cat", "text": "the purring cat"},
        {"_id": "q_lava", "text": "volcanoes"},  # matches d3's title only
        {"_id": "d2", "text": "dog barks"},  # its own id must not come back
        {"_id": "q_none", "text": "the of and"},  # stopwords only: nothing matches
    ]
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (tmp_path / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq_cat\td1\t1\nq_lava\td3\t1\nq_none\td1\t1\n")
    return load_beir(tmp_path)


def test_obvious_answers(tiny):
    run = bm25_run(tiny, ["q_cat", "q_lava", "d2", "q_none"])
    assert list(run["q_cat"]) == ["d1", "d2"]  # d1 says "cat" twice; d3 has no cat
    assert run["q_cat"]["d1"] > run["q_cat"]["d2"] > 0
    assert list(run["q_lava"]) == ["d3"]  # the title is part of the document text
    assert "d2" not in run["d2"]  # BEIR's rule: a query's own id is dropped
    assert run["d2"] == {}  # ...and d1/d3 share no term with "dog barks"
    assert run["q_none"] == {}  # stopwords only, no evidence for any document


def test_k_limits_hits(tiny):
    assert len(bm25_run(tiny, ["q_cat"], k=1)["q_cat"]) == 1
    with pytest.raises(ValueError, match="k must be"):
        bm25_run(tiny, ["q_cat"], k=0)


def test_unknown_query_id(tiny):
    with pytest.raises(ValueError, match="not in .*queries.jsonl.*'nope'"):
        bm25_run(tiny, ["q_cat", "nope"])


def test_metrics_per_query(tiny):
    qrels = tiny.split("test")
    means, per_query = bm25_metrics(tiny, qrels)
    assert per_query["ndcg_at_10"] == {"q_cat": 1.0, "q_lava": 1.0, "q_none": 0.0}
    assert means["ndcg_at_10"] == pytest.approx(2 / 3)
    assert set(means) == {"ndcg_at_10", "recall_at_100", "mrr_at_10"}


@pytest.mark.slow
def test_scifact_reproduces_baselines(scifact):
    """BASELINES.md: nDCG@10 0.662, Recall@100 0.876 (and uncut MRR 0.636) on 300 queries.

    About 2 s on one core (index + 300 queries + pytrec_eval).
    """
    test = make_splits(scifact)["test"]
    means, per_query = bm25_metrics(scifact, test)
    assert len(per_query["ndcg_at_10"]) == len(test) == 300
    assert means["ndcg_at_10"] == pytest.approx(0.662, abs=0.003)
    assert means["recall_at_100"] == pytest.approx(0.876, abs=0.005)


@pytest.mark.slow
def test_nfcorpus_reproduces_baselines():
    """BASELINES.md: nDCG@10 0.306 on NFCorpus's 323 test queries (no stemmer). ~2 s."""
    if not (NFCORPUS / "corpus.jsonl").exists():
        pytest.fail(f"NFCorpus not found at {NFCORPUS.resolve()}: expected "
                    "../shared/data/nfcorpus beside the checkout")
    data = load_beir(NFCORPUS)
    test = make_splits(data)["test"]
    means, _ = bm25_metrics(data, test)
    assert len(test) == 323
    assert means["ndcg_at_10"] == pytest.approx(0.306, abs=0.003)
