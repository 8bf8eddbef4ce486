"""Retrieval evaluation (exact search, IR metrics) and collapse diagnostics.

Metrics come from pytrec_eval (the evaluator BEIR and MTEB use), not from hand-written
code: nDCG@10, Recall@100 and MRR@10 (reciprocal rank over the top 10). Search is exact: one
batched matrix product of queries against the whole corpus, top-k per query.
"""

from __future__ import annotations

import math
from typing import Mapping

import pytrec_eval
import torch

Qrels = Mapping[str, Mapping[str, int]]

METRIC_NAMES = ("ndcg_at_10", "recall_at_100", "mrr_at_10")


def similarity_matrix(q: torch.Tensor, d: torch.Tensor, similarity: str) -> torch.Tensor:
    """[Q, N] scores: cosine, or negative Euclidean distance."""
    if similarity == "cosine":
        return torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
    if similarity == "euclidean":
        return -torch.cdist(q, d)
    raise ValueError(f"unknown similarity {similarity!r} (cosine, euclidean)")


@torch.no_grad()
def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, similarity: str = "cosine",
           k: int = 100, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` search. Returns (scores, doc indices), each [Q, k]."""
    k = min(k, doc_emb.shape[0])
    scores, indices = [], []
    for start in range(0, query_emb.shape[0], batch_size):
        sim = similarity_matrix(query_emb[start:start + batch_size].float(), doc_emb.float(),
                                similarity)
        s, i = sim.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def ir_metrics(run: Mapping[str, Mapping[str, float]], qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the judged queries (pytrec_eval)."""
    judged = {q: dict(docs) for q, docs in qrels.items() if q in run}
    if not judged:
        raise ValueError("no query of the qrels appears in the run")
    evaluator = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate({q: dict(run[q]) for q in judged})
    top10 = {q: dict(sorted(run[q].items(), key=lambda kv: (-kv[1], kv[0]))[:10])
             for q in judged}
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
    n = len(judged)
    return {
        "ndcg_at_10": sum(v["ndcg_cut_10"] for v in per_query.values()) / n,
        "recall_at_100": sum(v["recall_100"] for v in per_query.values()) / n,
        "mrr_at_10": sum(v["recip_rank"] for v in rr.values()) / n,
    }


def retrieval_metrics(query_ids: list[str], query_emb: torch.Tensor, doc_ids: list[str],
                      doc_emb: torch.Tensor, qrels: Qrels, similarity: str = "cosine",
                      k: int = 100) -> dict[str, float]:
    """Searches the corpus for each query and scores the run against ``qrels``.

    As in BEIR, a document whose id equals the query's id is not returned for that query.
    """
    scores, indices = search(query_emb, doc_emb, similarity, k=k + 1)
    run: dict[str, dict[str, float]] = {}
    for row, qid in enumerate(query_ids):
        hits = {}
        for s, i in zip(scores[row].tolist(), indices[row].tolist()):
            did = doc_ids[i]
            if did != qid:
                hits[did] = s
        run[qid] = dict(list(hits.items())[:k])
    return ir_metrics(run, qrels)


@torch.no_grad()
def collapse_diagnostics(emb: torch.Tensor) -> dict[str, float]:
    """How much of the space the embeddings use.

    * ``effective_rank``: exp of the entropy of the normalised singular values of the
      centred embeddings (Roy & Vetterli); 1 for a collapse to a line, D for full use.
    * ``isotropy``: participation ratio of the covariance eigenvalues divided by D,
      (Σλ)² / (D·Σλ²); 1 for an isotropic cloud, 1/D for a single direction.
    * ``embedding_std``: mean per-dimension standard deviation (0 at total collapse).
    """
    x = emb.float() - emb.float().mean(0, keepdim=True)
    sv = torch.linalg.svdvals(x)
    p = sv / sv.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    eig = sv.pow(2) / max(1, x.shape[0] - 1)
    dim = emb.shape[1]
    iso = eig.sum().pow(2) / (dim * eig.pow(2).sum()).clamp_min(1e-12)
    return {
        "effective_rank": float(torch.exp(entropy)) if sv.sum() > 0 else 0.0,
        "isotropy": float(iso),
        "embedding_std": float(x.std(0).mean()),
    }


def prediction_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of predicted against actual positive-document embeddings."""
    value = float(torch.nn.functional.mse_loss(pred.float(), target.float()))
    return value if math.isfinite(value) else float("nan")


@torch.no_grad()
def embed_corpus(model, doc_inputs, batch_size: int) -> torch.Tensor:
    """Joint-space embeddings of every document; ``doc_inputs`` is features or texts."""
    out = [model.encode_docs(doc_inputs[i:i + batch_size]).float()
           for i in range(0, len(doc_inputs), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_model(model, *, query_ids: list[str], query_inputs, doc_ids: list[str],
                   doc_emb: torch.Tensor, qrels: Qrels, similarity: str,
                   batch_size: int = 256) -> dict[str, float]:
    """Scores a split both ways (query embedding, predictor output) plus diagnostics.

    Keys: ``query_<metric>``, ``predictor_<metric>`` for each of ``METRIC_NAMES``, the
    collapse diagnostics of the document embeddings, and ``pred_error`` (MSE between the
    predicted and the actual embedding of each judged positive document).
    """
    was_training = model.training
    model.eval()
    try:
        q = torch.cat([model.encode_queries(query_inputs[i:i + batch_size]).float()
                       for i in range(0, len(query_ids), batch_size)])
        pred = model.predict(q).float()
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for name, vectors in (("query", q), ("predictor", pred)):
        for key, value in retrieval_metrics(query_ids, vectors, doc_ids, doc_emb, qrels,
                                            similarity).items():
            out[f"{name}_{key}"] = value
    out.update(collapse_diagnostics(doc_emb))
    row = {d: i for i, d in enumerate(doc_ids)}
    pairs = [(qi, row[d]) for qi, qid in enumerate(query_ids)
             for d, rel in qrels.get(qid, {}).items() if rel > 0 and d in row]
    if pairs:
        qi, di = zip(*pairs)
        out["pred_error"] = prediction_error(pred[list(qi)], doc_emb[list(di)])
    return out
