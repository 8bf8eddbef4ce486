"""BM25, the lexical reference row of every comparison (``bm25s``).

A dense encoder that does not beat BM25 on the same split is not worth its training, so the
answer reports BM25 beside the arms, scored by the same code (``per_query_metrics``) on the
same queries. The set-up is the one ``shared/data/BASELINES.md`` measured: BEIR's document
text (title + " " + text), bm25s's tokeniser (lower-cased ``\\w\\w+`` tokens) with its
English stopword list, no stemmer, and bm25s's default scoring (Lucene's BM25, k1 = 1.5,
b = 0.75). SciFact test: nDCG@10 0.662, Recall@100 0.876; NFCorpus test: nDCG@10 0.306.
BASELINES.md's "MRR" is the uncut reciprocal rank (0.636, 0.523 here too); the MRR@10
reported here is 0.631 and 0.519. Its NFCorpus Recall@100 (0.239) counted the zero-score
documents bm25s pads a ranking with; without them (see :func:`bm25_run`) it is 0.236.

The index is built in memory on every call (about a second for SciFact on one core) and
never cached on disk: there is nothing to invalidate when the data changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s

from trainables.data import BeirData
from trainables.evaluate import Qrels, mean_metrics, per_query_metrics

__all__ = ["bm25_metrics", "bm25_run"]

#: bm25s's English stopword list (the "english"/"en" setting BASELINES.md used).
STOPWORDS = "en"


def bm25_run(data: BeirData, query_ids: Sequence[str],
             k: int = 100) -> dict[str, dict[str, float]]:
    """BM25 top-``k`` documents of each query, as a pytrec_eval run.

    As in BEIR (and ``trainables.evaluate``), a document whose id equals the query's id is
    never returned for that query. Documents that share no term with the query score 0
    and are left out (BM25 has no evidence for them; their order would only be a
    tie-break), so a query may get fewer than ``k`` hits, or none.

    Args:
        data: The dataset; the whole corpus is indexed.
        query_ids: Queries to search for (ids of ``data.queries``).
        k: Hits per query.

    Returns:
        ``{query id: {document id: BM25 score}}``, hits in descending score order.

    Raises:
        ValueError: ``k < 1`` or a query id that is not in ``data.queries``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query_ids = list(query_ids)
    missing = [q for q in query_ids if q not in data.queries]
    if missing:
        raise ValueError(f"{len(missing)} query ids are not in {data.root / 'queries.jsonl'} "
                         f"(first: {missing[:3]})")
    if not query_ids:
        return {}
    doc_ids = data.doc_ids
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([data.doc_text(d) for d in doc_ids], stopwords=STOPWORDS,
                                   show_progress=False),
                    show_progress=False)
    # Query tokens are matched to the index's vocabulary by string; unknown ones drop out.
    tokens = bm25s.tokenize([data.queries[q] for q in query_ids], stopwords=STOPWORDS,
                            show_progress=False)
    # One extra hit, in case the query's own id is among them.
    indices, scores = retriever.retrieve(tokens, k=min(k + 1, len(doc_ids)),
                                         show_progress=False)
    run: dict[str, dict[str, float]] = {}
    for qid, row_i, row_s in zip(query_ids, indices.tolist(), scores.tolist()):
        hits = {doc_ids[i]: s for i, s in zip(row_i, row_s) if s > 0 and doc_ids[i] != qid}
        run[qid] = dict(list(hits.items())[:k])
    return run


def bm25_metrics(data: BeirData, qrels: Qrels,
                 k: int = 100) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """BM25 scored on ``qrels`` (e.g. ``make_splits(data)["test"]``).

    Args:
        data: The dataset.
        qrels: ``{query id: {document id: relevance}}``; every query in it is searched.
        k: Hits per query (Recall@100 needs ``k >= 100``).

    Returns:
        ``(means, per_query)``: the mean nDCG@10, Recall@100 and MRR@10, and
        ``{metric: {query id: value}}`` from ``per_query_metrics``, the input of a paired
        test against another system on the same queries.
    """
    per_query = per_query_metrics(bm25_run(data, list(qrels), k=k), qrels)
    return mean_metrics(per_query), per_query
