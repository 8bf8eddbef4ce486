"""Retrieval evaluation (exact search, IR metrics) and collapse diagnostics.

Metrics come from pytrec_eval (the evaluator BEIR and MTEB use), not from hand-written
code: nDCG@10, Recall@100 and MRR@10 (reciprocal rank over the top 10). Search is exact: one
batched matrix product of queries against the whole corpus, top-k per query. From
``faiss_min_docs`` documents up (``eval.faiss_min_docs``) it goes through FAISS instead
(``faiss-cpu``): an exact ``IndexFlat`` by default (the same results, without
materialising a [queries x corpus] score block), or HNSW when asked. The corpus is
re-embedded every epoch, so an index is built per evaluation; ``benchmarks/bench_eval.py``
measures where each choice wins (``benchmarks/RESULTS.md``, figure 6).
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import pytrec_eval
import torch

Qrels = Mapping[str, Mapping[str, int]]
FaissIndex = Literal["flat", "hnsw"]

METRIC_NAMES = ("ndcg_at_10", "recall_at_100", "mrr_at_10")


@torch.no_grad()
def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, similarity: str = "cosine",
           k: int = 100, batch_size: int = 1024, *, faiss_min_docs: int | None = None,
           faiss_index: FaissIndex = "flat") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` search. Returns (scores, doc indices), each [Q, k].

    Exact torch search, one [batch_size x N] score block at a time, unless the corpus has at
    least ``faiss_min_docs`` documents; then FAISS's ``faiss_index``
    (``flat``: exact; ``hnsw``: approximate). Scores are cosine similarities or negative
    Euclidean distances either way.
    """
    if similarity not in ("cosine", "euclidean"):
        raise ValueError(f"unknown similarity {similarity!r} (cosine, euclidean)")
    k = min(k, doc_emb.shape[0])
    if faiss_min_docs is not None and doc_emb.shape[0] >= faiss_min_docs:
        return _faiss_search(query_emb, doc_emb, similarity, k, faiss_index)
    docs = doc_emb.float()
    if similarity == "cosine":  # once, not per query block
        docs = torch.nn.functional.normalize(docs, dim=-1)
    scores, indices = [], []
    for start in range(0, query_emb.shape[0], batch_size):
        q = query_emb[start:start + batch_size].float()
        sim = (torch.nn.functional.normalize(q, dim=-1) @ docs.T if similarity == "cosine"
               else -torch.cdist(q, docs))
        s, i = sim.topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


#: HNSW settings measured in benchmarks/bench_eval.py (recall@100 0.96-0.98 up to 50k docs).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 128


def _faiss_search(query_emb: torch.Tensor, doc_emb: torch.Tensor, similarity: str, k: int,
                  kind: FaissIndex) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss
    import numpy as np

    def prep(x: torch.Tensor) -> "np.ndarray":
        x = x.detach().float()
        if similarity == "cosine":
            x = torch.nn.functional.normalize(x, dim=-1)
        return np.ascontiguousarray(x.cpu().numpy())

    docs, queries = prep(doc_emb), prep(query_emb)
    dim = docs.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if similarity == "cosine" else faiss.METRIC_L2
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    elif kind == "flat":
        index = faiss.IndexFlatIP(dim) if similarity == "cosine" else faiss.IndexFlatL2(dim)
    else:
        raise ValueError(f"unknown faiss index {kind!r} (flat, hnsw)")
    index.add(docs)
    scores, indices = index.search(queries, k)
    scores_t = torch.from_numpy(scores)
    if similarity == "euclidean":  # FAISS returns squared L2 distances
        scores_t = -scores_t.clamp_min(0).sqrt()
    return scores_t.to(query_emb.device), torch.from_numpy(indices).to(query_emb.device)


def per_query_metrics(run: Mapping[str, Mapping[str, float]],
                      qrels: Qrels) -> dict[str, dict[str, float]]:
    """nDCG@10, Recall@100 and MRR@10 of every judged query in ``run`` (pytrec_eval).

    Returns ``{metric: {query id: value}}`` over the queries of ``qrels`` that ``run`` holds
    (a query the run left empty scores 0): the unit of a paired test over queries.
    """
    judged = {q: dict(docs) for q, docs in qrels.items() if q in run}
    if not judged:
        raise ValueError("no query of the qrels appears in the run")
    evaluator = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall.100",
                                                        "recip_rank"})
    scored = evaluator.evaluate({q: dict(run[q]) for q in judged})
    zero = {"ndcg_cut_10": 0.0, "recall_100": 0.0, "recip_rank": 0.0}
    rows = {q: scored.get(q, zero) for q in judged}
    # MRR@10: the reciprocal rank of the first relevant document when it ranks in the top 10
    # (1/rank >= 1/10), in trec_eval's own order of the whole run, else 0
    return {
        "ndcg_at_10": {q: r["ndcg_cut_10"] for q, r in rows.items()},
        "recall_at_100": {q: r["recall_100"] for q, r in rows.items()},
        "mrr_at_10": {q: r["recip_rank"] if r["recip_rank"] >= 0.1 - 1e-12 else 0.0
                      for q, r in rows.items()},
    }


def mean_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean over queries of each metric of :func:`per_query_metrics`."""
    return {name: sum(values.values()) / len(values) for name, values in per_query.items()}


def ir_metrics(run: Mapping[str, Mapping[str, float]], qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, Recall@100 and MRR@10 over the judged queries (pytrec_eval)."""
    return mean_metrics(per_query_metrics(run, qrels))


def retrieval_per_query(query_ids: list[str], query_emb: torch.Tensor, doc_ids: list[str],
                        doc_emb: torch.Tensor, qrels: Qrels, similarity: str = "cosine",
                        k: int = 100, **search_kw) -> dict[str, dict[str, float]]:
    """Searches the corpus for each query; :func:`per_query_metrics` of the run.

    As in BEIR, a document whose id equals the query's id is not returned for that query.
    ``search_kw`` goes to :func:`search` (``faiss_min_docs``, ``faiss_index``).
    """
    scores, indices = search(query_emb, doc_emb, similarity, k=k + 1, **search_kw)
    return per_query_metrics(_run(query_ids, scores, indices, doc_ids, k), qrels)


def retrieval_metrics(query_ids: list[str], query_emb: torch.Tensor, doc_ids: list[str],
                      doc_emb: torch.Tensor, qrels: Qrels, similarity: str = "cosine",
                      k: int = 100, **search_kw) -> dict[str, float]:
    """The mean metrics of :func:`retrieval_per_query`."""
    return mean_metrics(retrieval_per_query(query_ids, query_emb, doc_ids, doc_emb, qrels,
                                            similarity, k, **search_kw))


def _run(query_ids: list[str], scores: torch.Tensor, indices: torch.Tensor,
         doc_ids: list[str], k: int) -> dict[str, dict[str, float]]:
    """Search hits as a pytrec_eval run, a query's own id left out (BEIR's rule)."""
    run: dict[str, dict[str, float]] = {}
    for qid, row_s, row_i in zip(query_ids, scores.tolist(), indices.tolist()):
        hits = {}
        for s, i in zip(row_s, row_i):
            did = doc_ids[i]
            if did != qid:
                hits[did] = s
        run[qid] = dict(list(hits.items())[:k])
    return run


@torch.no_grad()
def collapse_diagnostics(emb: torch.Tensor) -> dict[str, float]:
    """How much of the space the embeddings use.

    * ``effective_rank``: exp of the entropy of the normalised singular values of the
      centred embeddings (Roy & Vetterli); 1 for a collapse to a line, D for full use.
    * ``isotropy``: participation ratio of the covariance eigenvalues divided by D,
      (Σλ)² / (D·Σλ²); 1 for an isotropic cloud, 1/D for a single direction.
    * ``embedding_std``: mean per-dimension standard deviation (0 at total collapse).

    One SVD of the centred N x D matrix, the larger part of a dev evaluation's cost on a
    frozen base (``benchmarks/RESULTS.md``); the eigenvalues of the D x D Gram matrix are no
    faster in float64 and lose ~0.5 % on the small singular values in float32.
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
                   batch_size: int = 256, diagnostics: bool = True, k: int = 100,
                   **search_kw) -> dict[str, float]:
    """Scores a split both ways (query embedding, predictor output) plus diagnostics.

    Keys: ``query_<metric>``, ``predictor_<metric>`` for each of ``METRIC_NAMES``,
    ``pred_error`` (MSE between the predicted and the actual embedding of each judged
    positive document) and, with ``diagnostics``, the collapse diagnostics of the document
    embeddings. See :func:`evaluate_model_per_query` for the per-query figures.
    """
    return evaluate_model_per_query(
        model, query_ids=query_ids, query_inputs=query_inputs, doc_ids=doc_ids,
        doc_emb=doc_emb, qrels=qrels, similarity=similarity, batch_size=batch_size,
        diagnostics=diagnostics, k=k, **search_kw)[0]


@torch.no_grad()
def evaluate_model_per_query(model, *, query_ids: list[str], query_inputs, doc_ids: list[str],
                             doc_emb: torch.Tensor, qrels: Qrels, similarity: str,
                             batch_size: int = 256, diagnostics: bool = True, k: int = 100,
                             **search_kw) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """:func:`evaluate_model`'s means, and every query's nDCG@10 under each scoring.

    Returns:
        ``(metrics, per_query)``: ``per_query`` is ``{"query": {qid: nDCG@10},
        "predictor": {qid: nDCG@10}}``. Both query sets go through one search (the corpus
        is prepared once).
    """
    was_training = model.training
    model.eval()
    try:
        q = torch.cat([model.encode_queries(query_inputs[i:i + batch_size]).float()
                       for i in range(0, len(query_ids), batch_size)])
        pred = model.predict(q).float()
    finally:
        model.train(was_training)
    scores, indices = search(torch.cat([q, pred]), doc_emb, similarity, k=k + 1, **search_kw)
    n = len(query_ids)
    out: dict[str, float] = {}
    per_query: dict[str, dict[str, float]] = {}
    for name, rows in (("query", slice(0, n)), ("predictor", slice(n, 2 * n))):
        scored = per_query_metrics(_run(query_ids, scores[rows], indices[rows], doc_ids, k),
                                   qrels)
        per_query[name] = scored["ndcg_at_10"]
        out.update({f"{name}_{key}": v for key, v in mean_metrics(scored).items()})
    if diagnostics:
        out.update(collapse_diagnostics(doc_emb))
    row = {d: i for i, d in enumerate(doc_ids)}
    pairs = [(qi, row[d]) for qi, qid in enumerate(query_ids)
             for d, rel in qrels.get(qid, {}).items() if rel > 0 and d in row]
    if pairs:
        qi, di = zip(*pairs)
        out["pred_error"] = prediction_error(pred[list(qi)], doc_emb[list(di)])
    return out, per_query
