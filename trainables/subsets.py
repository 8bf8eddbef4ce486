"""Which queries a figure is about: *seen* and *unseen* queries of an evaluated split.

A query of a dev or test split is **seen** when any of its relevant documents is a positive
of a query the run trained on, else **unseen**. A model trained on (query, positive) pairs
can gain on seen queries by learning which documents tend to be relevant, without matching
queries to documents any better; only the unseen queries measure retrieval of documents
training never pointed at, which is what a collection that grows every day needs. Every
evaluation reports its nDCG@10 on both subsets beside the whole split, with the subsets'
query counts, under the names :func:`subset_key` and :func:`count_key` give
(``test_seen_ndcg_at_10``, ``test_n_unseen``). Another collection scored zero-shot
(``eval.extra_data``, transfer) has no train positives of the run: all of its queries are
unseen by definition, so it is reported whole.

This module is the one place where the split is computed (``seen_queries``); the loop, the
study's test scoring, the report and the answer all read it by these names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

__all__ = ["SUBSETS", "count_key", "seen_queries", "subset_figures", "subset_key",
           "subset_ids", "train_positive_counts"]

Qrels = Mapping[str, Mapping[str, int]]
SUBSETS = ("seen", "unseen")


def train_positive_counts(train_qrels: Qrels) -> Counter[str]:
    """How many train queries each document is a positive (relevance > 0) of."""
    return Counter(d for docs in train_qrels.values() for d, rel in docs.items() if rel > 0)


def seen_queries(qrels: Qrels, train_qrels: Qrels) -> dict[str, bool]:
    """``{query id: seen}`` for every query of ``qrels`` with a relevant document.

    Args:
        qrels: The evaluated split (dev or test).
        train_qrels: The pairs the run trained on (after any dev carving).

    Returns:
        True for a query with a relevant document that is a positive of some train query,
        False for one whose relevant documents never are. Queries without a relevant
        document are left out (no evaluation scores them).
    """
    positives = set(train_positive_counts(train_qrels))
    out = {}
    for q, docs in qrels.items():
        relevant = [d for d, rel in docs.items() if rel > 0]
        if relevant:
            out[q] = any(d in positives for d in relevant)
    return out


def subset_ids(seen: Mapping[str, bool]) -> dict[str, list[str]]:
    """``{"seen": [ids], "unseen": [ids]}``, each sorted."""
    return {"seen": sorted(q for q, s in seen.items() if s),
            "unseen": sorted(q for q, s in seen.items() if not s)}


def subset_key(split: str, subset: str, metric: str = "ndcg_at_10") -> str:
    """The name of a split's metric on a subset: ``test_seen_ndcg_at_10``."""
    return f"{split}_{subset}_{metric}"


def count_key(split: str, subset: str) -> str:
    """The name of a split's subset size: ``test_n_seen``."""
    return f"{split}_n_{subset}"


def subset_figures(split: str, per_query: Mapping[str, float], seen: Mapping[str, bool],
                   metric: str = "ndcg_at_10") -> dict[str, float]:
    """A split's per-query metric averaged on its seen and unseen queries, with the counts.

    Args:
        split: The prefix of the names (``dev``, ``test``).
        per_query: ``{query id: value}`` of the split's queries.
        seen: :func:`seen_queries` of the split (every query of ``per_query`` must be in it).

    Returns:
        ``{<split>_n_seen, <split>_n_unseen}`` and, for each non-empty subset, its mean
        (an empty subset has no mean: its key is absent, never NaN).

    Raises:
        KeyError: A query of ``per_query`` that ``seen`` does not classify.
    """
    groups: dict[str, list[float]] = {s: [] for s in SUBSETS}
    for q, value in per_query.items():
        groups["seen" if seen[q] else "unseen"].append(value)
    out: dict[str, float] = {}
    for subset, values in groups.items():
        out[count_key(split, subset)] = len(values)
        if values:
            out[subset_key(split, subset, metric)] = sum(values) / len(values)
    return out
