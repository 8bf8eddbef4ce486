"""The document-prior control: a reference system that trains no encoder.

    score(q, d) = cos(base(q), base(d)) + β · log(1 + n_train_positive(d))

``n_train_positive(d)`` is the number of the run's train queries ``d`` is a positive of, and
β is chosen on dev from a small grid (ties go to the smaller β; β = 0 is the zero-shot base
exactly). It knows nothing about what a query asks, only which documents tend to be
relevant: a trained model that beats zero-shot on *seen* test queries (``subsets``) but not
this row has learnt that prior, not retrieval. It goes beside zero-shot and BM25 wherever
they are reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from trainables.evaluate import _run, mean_metrics, per_query_metrics
from trainables.subsets import seen_queries, subset_figures, train_positive_counts

__all__ = ["BETAS", "DocPriorResult", "document_prior", "prior_search"]

Qrels = Mapping[str, Mapping[str, int]]
#: the dev grid of β (the base's cosines of relevant and top documents differ by ~0.01-0.1)
BETAS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)


@dataclass
class DocPriorResult:
    """The control's choice on dev and its figures.

    Attributes:
        beta: The β dev chose.
        dev_by_beta: Dev nDCG@10 at each β of the grid.
        figures: ``{<split>_<metric>: mean}`` at the chosen β for dev and test, with the
            seen/unseen subsets and counts (``test_seen_ndcg_at_10``, ``test_n_seen``).
        per_query: ``{split: {query id: nDCG@10}}`` at the chosen β.
    """

    beta: float
    dev_by_beta: dict[float, float]
    figures: dict[str, float] = field(default_factory=dict)
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "dev_by_beta": {str(b): v for b, v in
                                                   self.dev_by_beta.items()},
                "figures": self.figures, "per_query": self.per_query}


@torch.no_grad()
def prior_search(query_emb: torch.Tensor, doc_emb: torch.Tensor, prior: torch.Tensor,
                 beta: float, k: int = 100,
                 batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of cosine + ``beta · prior`` over the whole corpus; (scores, indices)."""
    docs = torch.nn.functional.normalize(doc_emb.float(), dim=-1)
    bonus = beta * prior.float().to(docs.device)
    k = min(k, docs.shape[0])
    scores, indices = [], []
    for start in range(0, query_emb.shape[0], batch_size):
        q = torch.nn.functional.normalize(query_emb[start:start + batch_size].float(), dim=-1)
        s, i = (q @ docs.T + bonus).topk(k, dim=1)
        scores.append(s)
        indices.append(i)
    return torch.cat(scores), torch.cat(indices)


def document_prior(features: Any, splits: Mapping[str, Qrels], betas=BETAS,
                   k: int = 100) -> DocPriorResult:
    """Chooses β on ``splits["dev"]`` and scores dev and test at it.

    Args:
        features: The base's features of the dataset (``cache.FeatureTables``, torch).
        splits: The run's ``train``, ``dev`` and ``test`` qrels (``data.make_splits``): the
            counts come from train, the choice from dev.
        betas: The grid (must hold at least one value; 0 makes zero-shot a candidate).
        k: Depth of each ranking (Recall@100 needs 100).
    """
    if not betas:
        raise ValueError("document_prior: empty grid of betas")
    counts = train_positive_counts(splits["train"])
    prior = torch.tensor([math.log1p(counts.get(d, 0)) for d in features.doc_ids])
    docs = features.doc_features
    if not isinstance(docs, torch.Tensor):
        docs = torch.as_tensor(docs)

    def scored(split: str, beta: float) -> dict[str, dict[str, float]]:
        qids = sorted(splits[split])
        q = features.queries(qids)
        q = q if isinstance(q, torch.Tensor) else torch.as_tensor(q)
        s, i = prior_search(q, docs, prior, beta, k + 1)  # +1: BEIR drops a query's own id
        return per_query_metrics(_run(qids, s, i, features.doc_ids, k), splits[split])

    dev_by_beta: dict[float, float] = {}
    best = None
    for beta in sorted(float(b) for b in betas):
        value = mean_metrics(scored("dev", beta))["ndcg_at_10"]
        dev_by_beta[beta] = value
        if best is None or value > dev_by_beta[best]:
            best = beta
    result = DocPriorResult(beta=best, dev_by_beta=dev_by_beta)
    for split in ("dev", "test"):
        per_query = scored(split, best)
        seen = seen_queries(splits[split], splits["train"])
        result.figures.update({f"{split}_{name}": v for name, v in
                               mean_metrics(per_query).items()})
        result.figures.update(subset_figures(split, per_query["ndcg_at_10"], seen))
        result.per_query[split] = per_query["ndcg_at_10"]
    return result
