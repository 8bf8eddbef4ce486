"""Seen and unseen queries (``trainables.subsets``), the document-prior control
(``trainables.doc_prior``) and the dev split of unseen documents (``data.dev_mode``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from trainables.data import DataError, MIN_DEV_QUERIES, load_beir, make_splits
from trainables.subsets import (seen_queries, subset_figures, subset_ids,
                                train_positive_counts)

TRAIN = {"t1": {"d1": 1, "d2": 1}, "t2": {"d2": 1, "d9": 0}, "t3": {"d3": 2}}


def test_a_query_is_seen_when_any_relevant_document_was_a_train_positive():
    test = {
        "seen": {"d1": 1},                 # its one relevant document is a train positive
        "unseen": {"d4": 1},               # never a train positive
        "both": {"d4": 1, "d3": 1},        # one of each: seen
        "judged_zero": {"d9": 1},          # d9 was judged 0 in train: not a positive
        "negative_only": {"d1": 0},        # no relevant document: not scored, left out
    }
    seen = seen_queries(test, TRAIN)
    assert seen == {"seen": True, "unseen": False, "both": True, "judged_zero": False}
    assert subset_ids(seen) == {"seen": ["both", "seen"], "unseen": ["judged_zero", "unseen"]}
    assert train_positive_counts(TRAIN) == {"d1": 1, "d2": 2, "d3": 1}


def test_subset_figures_average_each_subset_and_count_it():
    seen = {"a": True, "b": True, "c": False}
    out = subset_figures("test", {"a": 1.0, "b": 0.5, "c": 0.2}, seen)
    assert out == {"test_n_seen": 2, "test_n_unseen": 1, "test_seen_ndcg_at_10": 0.75,
                   "test_unseen_ndcg_at_10": 0.2}
    # an empty subset has a count of 0 and no mean (never NaN)
    out = subset_figures("dev", {"a": 1.0}, {"a": True})
    assert out == {"dev_n_seen": 1, "dev_n_unseen": 0, "dev_seen_ndcg_at_10": 1.0}
    with pytest.raises(KeyError):
        subset_figures("dev", {"zzz": 1.0}, {"a": True})


# -- the dev split of unseen documents -------------------------------------------------------

def _beir(root: Path, train: dict, test: dict) -> Path:
    docs = sorted({d for qrels in (train, test) for docs in qrels.values() for d in docs}
                  | {"spare"})
    queries = sorted(set(train) | set(test))
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": "", "text": f"text {d}"}) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    for name, qrels in (("train", train), ("test", test)):
        (root / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{q}\t{d}\t{r}\n" for q, docs in qrels.items() for d, r in docs.items()))
    return root


def test_unseen_docs_dev_never_holds_a_train_positive(tmp_path):
    # 60 train queries: each has one own document, every third also a shared one
    train = {f"q{i}": {f"d{i}": 1, **({"shared": 1} if i % 3 == 0 else {})} for i in range(60)}
    data = load_beir(_beir(tmp_path / "d", train, {"x": {"d1": 1}}))
    s = make_splits(data, dev_mode="unseen_docs", dev_doc_fraction=0.4, seed=5)
    train_pos = {d for docs in s["train"].values() for d, r in docs.items() if r > 0}
    dev_pos = {d for docs in s["dev"].values() for d, r in docs.items() if r > 0}
    assert len(s["dev"]) >= MIN_DEV_QUERIES
    assert not dev_pos & train_pos                  # disjoint: dev documents are unseen
    assert not set(s["dev"]) & set(s["train"])      # no dev query trains
    assert all(seen is False for seen in seen_queries(s["dev"], s["train"]).values())
    # every train query whose positives all stayed in train kept every pair
    for q, docs in s["train"].items():
        assert set(docs) <= set(train[q])
    # the pairs that point to held-out documents left train; nothing else did
    held = {d for docs in train.values() for d in docs} - train_pos
    kept_pairs = {(q, d) for q, docs in s["train"].items() for d in docs}
    assert kept_pairs == {(q, d) for q, docs in train.items() for d in docs if d not in held}
    # seeded and reproducible
    assert make_splits(data, dev_mode="unseen_docs", dev_doc_fraction=0.4, seed=5) == s
    assert make_splits(data, dev_mode="unseen_docs", dev_doc_fraction=0.4, seed=6) != s
    # the test split is untouched
    assert s["test"] == {"x": {"d1": 1}}


def test_unseen_docs_dev_refuses_degenerate_splits(tmp_path):
    # every query's positives include the one shared document: no query has all of its
    # positives held out unless the shared one is, so dev is (nearly) empty
    train = {f"q{i}": {f"d{i}": 1, "shared": 1} for i in range(30)}
    data = load_beir(_beir(tmp_path / "d", train, {"x": {"d1": 1}}))
    with pytest.raises(DataError, match=r"dev_doc_fraction.*dev queries \(fewer than"):
        for seed in range(20):  # whichever seed holds out the shared document or not
            make_splits(data, dev_mode="unseen_docs", dev_doc_fraction=0.2, seed=seed)
    # all documents held out: nothing left to train on
    lone = {f"q{i}": {f"d{i}": 1} for i in range(30)}
    data = load_beir(_beir(tmp_path / "e", lone, {"x": {"d1": 1}}))
    with pytest.raises(DataError, match="leaves no train pair; lower data.dev_doc_fraction"):
        make_splits(data, dev_mode="unseen_docs", dev_doc_fraction=0.99)
    with pytest.raises(ValueError, match="dev_mode"):
        make_splits(data, dev_mode="documents")


def test_unseen_docs_on_scifact(scifact):
    s = make_splits(scifact, dev_mode="unseen_docs", dev_doc_fraction=0.3)
    dev_pos = {d for docs in s["dev"].values() for d in docs}
    assert not dev_pos & set(train_positive_counts(s["train"]))
    assert 150 <= len(s["dev"]) <= 300  # the hand try: 225 dev queries at 30 %
    # the test queries that become unseen when 30 % of the positives leave train
    seen = seen_queries(s["test"], s["train"])
    assert sum(not v for v in seen.values()) > 104  # more than against the whole train split


# -- the document-prior control ----------------------------------------------------------------

def test_doc_prior_at_beta_zero_is_zero_shot(scifact, scifact_features):
    from trainables.config import RunConfig
    from trainables.doc_prior import document_prior
    from trainables.loop import zero_shot

    splits = make_splits(scifact)
    zero = document_prior(scifact_features, splits, betas=[0.0])
    assert zero.beta == 0.0
    cfg = RunConfig().with_overrides({"data.path": str(scifact.root)})
    means, per_query = zero_shot(cfg, "test", data=scifact, features=scifact_features,
                                 per_query=True)
    assert zero.per_query["test"] == per_query  # the same ranking, query by query
    assert zero.figures["test_ndcg_at_10"] == pytest.approx(means["ndcg_at_10"], abs=1e-12)
    assert zero.figures["test_ndcg_at_10"] == pytest.approx(0.645, abs=0.001)  # BASELINES.md
    for key in ("seen_ndcg_at_10", "unseen_ndcg_at_10", "n_seen", "n_unseen"):
        assert zero.figures[f"test_{key}"] == pytest.approx(means[key], abs=1e-12)
    assert zero.figures["test_n_seen"] + zero.figures["test_n_unseen"] == 300


def test_doc_prior_chooses_beta_on_dev_and_helps_seen_queries_only(scifact, scifact_features):
    """BASELINES.md: on the carved dev, β = 0.08 wins; all 0.708, seen 0.755, unseen 0.642."""
    from trainables.doc_prior import BETAS, document_prior

    result = document_prior(scifact_features, make_splits(scifact))
    assert set(result.dev_by_beta) == set(BETAS)
    assert result.beta == max(result.dev_by_beta, key=lambda b: (result.dev_by_beta[b], -b))
    assert result.beta == pytest.approx(0.08)
    f = result.figures
    assert f["test_ndcg_at_10"] == pytest.approx(0.708, abs=0.002)
    assert f["test_seen_ndcg_at_10"] == pytest.approx(0.755, abs=0.002)
    assert f["test_unseen_ndcg_at_10"] == pytest.approx(0.642, abs=0.002)
    assert (f["test_n_seen"], f["test_n_unseen"]) == (175, 125)
    assert math.isclose(f["dev_ndcg_at_10"], result.dev_by_beta[result.beta])
