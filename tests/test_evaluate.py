"""IR metrics on a hand-made run with known values, search, and collapse diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from trainables.evaluate import collapse_diagnostics, ir_metrics, retrieval_metrics, search


def test_metrics_on_hand_made_run():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}}
    run = {
        "q1": {"d2": 0.9, "d1": 0.8},                    # relevant at rank 2
        "q2": {"d2": 0.9, "d4": 0.8, "d3": 0.7},         # ranks 1 and 3
        # q3: relevant at rank 11 -> outside nDCG@10 and MRR@10, inside Recall@100
        "q3": {**{f"x{i}": 1.0 - i / 100 for i in range(10)}, "d9": 0.5},
    }
    ndcg1 = 1 / math.log2(3)
    ndcg2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    m = ir_metrics(run, qrels)
    assert m["ndcg_at_10"] == pytest.approx((ndcg1 + ndcg2 + 0) / 3, abs=1e-6)
    assert m["mrr_at_10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["recall_at_100"] == pytest.approx(1.0)


def test_recall_counts_missing_documents():
    m = ir_metrics({"q": {"a": 1.0, "x": 0.5}}, {"q": {"a": 1, "b": 1}})
    assert m["recall_at_100"] == pytest.approx(0.5)


def test_search_is_exact_and_retrieval_skips_identical_ids():
    docs = torch.eye(4)
    queries = torch.tensor([[0.0, 1.0, 0.1, 0.0]])
    scores, idx = search(queries, docs, "cosine", k=2)
    assert idx[0].tolist() == [1, 2]
    _, idx_e = search(queries, docs, "euclidean", k=1)
    assert idx_e[0].tolist() == [1]
    # the query's own id never counts as a hit (BEIR's convention)
    m = retrieval_metrics(["d1"], queries, ["d0", "d1", "d2", "d3"], docs, {"d1": {"d2": 1}})
    assert m["mrr_at_10"] == pytest.approx(1.0)


def test_collapse_diagnostics_tell_spread_from_collapse():
    torch.manual_seed(0)
    spread = collapse_diagnostics(torch.randn(4000, 64))
    line = collapse_diagnostics(torch.randn(4000, 1) * torch.randn(1, 64))
    assert spread["effective_rank"] > 55 and line["effective_rank"] < 1.5
    assert spread["isotropy"] > 0.9 and line["isotropy"] < 2 / 64
    assert spread["embedding_std"] == pytest.approx(1.0, abs=0.05)
    assert collapse_diagnostics(torch.ones(100, 8))["embedding_std"] == 0.0
