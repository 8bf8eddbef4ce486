"""The reference rows every trained figure sits beside: zero-shot base, BM25, document prior.

Each is scored on the run's test split (its train split, dev choice and seen/unseen queries
as a run of the same ``data`` config would have them), on all queries and on the seen and
unseen subsets (``trainables.subsets``), by the same evaluation code as the trained runs:

* ``zero_shot``: the base encoder alone (cosine), what training must beat;
* ``bm25``: the lexical baseline (``trainables.bm25``);
* ``doc_prior``: zero-shot plus β·log(1 + n_train_positive(doc)), β chosen on dev
  (``trainables.doc_prior``): the gain available from knowing which documents tend to be
  relevant, without matching queries to documents any better.
"""

from __future__ import annotations

from typing import Any

from trainables.config import RunConfig
from trainables.data import BeirData, load_beir, resolve_data_dir, split_for
from trainables.evaluate import mean_metrics, retrieval_per_query
from trainables.subsets import seen_queries, subset_figures, subset_ids

__all__ = ["REFERENCES", "reference_rows"]

#: the reference systems, in table order, and what each is
REFERENCES = {
    "zero_shot": "zero-shot base encoder (cosine), no training",
    "bm25": "BM25 (bm25s), no training",
    "doc_prior": "zero-shot + β·log(1 + times a document was a train positive), β by dev",
}


def reference_rows(cfg: RunConfig, data: BeirData | None = None,
                   features: Any = None) -> dict[str, Any]:
    """The three reference rows on ``cfg``'s test split.

    Args:
        cfg: Gives the data, its split settings, the base model and its maximum length.
        data, features: Already loaded data and the base's features (else loaded; the
            features come from the on-disk cache).

    Returns:
        ``{"rows": {name: {test_ndcg_at_10, test_recall_at_100, test_mrr_at_10,
        test_seen_ndcg_at_10, test_unseen_ndcg_at_10, test_n_seen, test_n_unseen}},
        "per_query": {name: {qid: nDCG@10}}, "subsets": {"test": {"seen", "unseen"}},
        "doc_prior_beta": β, "doc_prior_dev_by_beta": {β: dev nDCG@10}}``.
    """
    from trainables.bm25 import bm25_metrics
    from trainables.cache import load_or_compute
    from trainables.doc_prior import document_prior

    if data is None:
        data = load_beir(resolve_data_dir(cfg.data.path))
    if features is None:
        features = load_or_compute(data, cfg.model.base_model, cfg.model.max_seq_length,
                                   progress=False)
    features = features.to("cpu")
    splits = split_for(data, cfg.data)
    test = splits["test"]
    seen = seen_queries(test, splits["train"])
    rows: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, float]] = {}

    def add(name: str, scored: dict[str, dict[str, float]]) -> None:
        rows[name] = {f"test_{k}": v for k, v in mean_metrics(scored).items()}
        rows[name].update(subset_figures("test", scored["ndcg_at_10"], seen))
        per_query[name] = scored["ndcg_at_10"]

    qids = sorted(test)
    add("zero_shot", retrieval_per_query(qids, features.queries(qids), features.doc_ids,
                                         features.doc_features, test, "cosine",
                                         faiss_min_docs=cfg.eval.faiss_min_docs,
                                         faiss_index=cfg.eval.faiss_index))
    add("bm25", bm25_metrics(data, test)[1])
    prior = document_prior(features, splits)
    rows["doc_prior"] = {k: v for k, v in prior.figures.items() if k.startswith("test_")}
    per_query["doc_prior"] = prior.per_query["test"]
    return {"rows": rows, "per_query": per_query, "subsets": {"test": subset_ids(seen)},
            "doc_prior_beta": prior.beta,
            "doc_prior_dev_by_beta": {str(b): v for b, v in prior.dev_by_beta.items()}}
