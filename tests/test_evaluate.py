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


@pytest.mark.parametrize("shape", [(300, 48), (20, 48)])  # N > D and N < D
def test_collapse_diagnostics_follow_their_definitions(shape):
    """The diagnostics follow their definitions (recomputed here in float64)."""
    torch.manual_seed(1)
    emb = torch.randn(*shape) @ torch.randn(shape[1], shape[1])  # anisotropic
    x = emb - emb.mean(0)
    sv = torch.linalg.svdvals(x.double())
    p = sv / sv.sum()
    eig = sv.pow(2) / (shape[0] - 1)
    got = collapse_diagnostics(emb)
    assert got["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())),
                                                  rel=1e-5)
    assert got["isotropy"] == pytest.approx(
        float(eig.sum() ** 2 / (shape[1] * eig.pow(2).sum())), rel=1e-5)


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=g)
    return centres[torch.randint(0, 16, (n,), generator=g)] + 0.5 * torch.randn(n, dim,
                                                                                generator=g)


@pytest.mark.parametrize("similarity", ["cosine", "euclidean"])
def test_faiss_flat_search_past_the_threshold_equals_torch(similarity):
    pytest.importorskip("faiss", reason="faiss-cpu is a dependency; install the project")
    docs, queries = _clustered(3000, 32, 0), _clustered(50, 32, 1)
    exact_s, exact_i = search(queries, docs, similarity, k=20)
    below_s, below_i = search(queries, docs, similarity, k=20, faiss_min_docs=3001)
    assert torch.equal(below_i, exact_i)  # under the threshold: torch itself
    flat_s, flat_i = search(queries, docs, similarity, k=20, faiss_min_docs=3000)
    assert flat_s.dtype == exact_s.dtype and flat_s.shape == exact_s.shape
    assert torch.allclose(flat_s, exact_s, atol=1e-3)  # same scores, same sign convention
    assert (flat_i == exact_i).float().mean() > 0.99  # ties may swap
    hnsw_s, hnsw_i = search(queries, docs, similarity, k=20, faiss_min_docs=1,
                            faiss_index="hnsw")
    recall = sum(len(set(a.tolist()) & set(b.tolist()))
                 for a, b in zip(hnsw_i, exact_i)) / exact_i.numel()
    assert recall > 0.9


def test_evaluate_model_searches_both_query_sets_and_skips_diagnostics_on_request():
    from types import SimpleNamespace

    torch.manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    doc_ids = [f"d{i}" for i in range(40)]
    # queries sit on their positive document; the predictor maps each onto the next one
    model = SimpleNamespace(training=False, eval=lambda: None, train=lambda mode: None,
                            encode_queries=lambda x: x,
                            predict=lambda q: torch.roll(q, shifts=-1, dims=0))
    qids = [f"q{i}" for i in range(10)]
    qrels = {q: {f"d{i}": 1} for i, q in enumerate(qids)}
    from trainables.evaluate import evaluate_model

    out = evaluate_model(model, query_ids=qids, query_inputs=docs[:10], doc_ids=doc_ids,
                         doc_emb=docs, qrels=qrels, similarity="cosine")
    assert out["query_ndcg_at_10"] == pytest.approx(1.0)
    assert out["predictor_mrr_at_10"] < 0.5  # the shifted predictions point elsewhere
    assert "effective_rank" in out and "pred_error" in out
    lean = evaluate_model(model, query_ids=qids, query_inputs=docs[:10], doc_ids=doc_ids,
                          doc_emb=docs, qrels=qrels, similarity="cosine", diagnostics=False)
    assert "effective_rank" not in lean
    assert lean["query_ndcg_at_10"] == out["query_ndcg_at_10"]


def test_mrr_at_10_cuts_at_rank_ten():
    from trainables.evaluate import per_query_metrics

    ranked = {f"d{i:02d}": 1.0 - i / 100 for i in range(1, 31)}  # d01 ranks first
    qrels = {"at10": {"d10": 1}, "at11": {"d11": 1}, "at1": {"d01": 2}}
    out = per_query_metrics({q: ranked for q in qrels}, qrels)["mrr_at_10"]
    assert out == pytest.approx({"at10": 0.1, "at11": 0.0, "at1": 1.0})
