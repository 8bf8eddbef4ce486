"""Training pairs made from a collection alone: no judgements, no real queries.

To adapt an encoder to a collection that has no qrels, the query side of a pair is cut from
the document itself and the target is the whole document, so the JEPA predictor learns to
predict a document's embedding from a piece of it (Contriever's independent cropping):

- ``title``: the document's title -> the document (documents with an empty title give none);
- ``span``: a contiguous run of words of the document's *text* (not its title, which has its
  own pair), of a length drawn per span uniformly in ``[span_min_words, span_max_words]``
  -> the document, encoded as BEIR does (``BeirData.doc_text``: title + text).

Spans are clipped to the text: a text shorter than the drawn length gives its whole text as
the span, and an empty text gives no span. A document gives at most ``spans_per_doc``
*distinct* spans (a draw that repeats an earlier span of the same document is dropped, so a
text shorter than ``span_min_words`` gives one span, not the same one several times).

Reproducibility: a document's pairs depend on (settings, its id, its title and text) only.
Each document draws from its own ``random.Random`` seeded with a digest of (seed, doc id),
so the pairs do not depend on dict or file order, and adding or removing documents does not
change any other document's pairs. Raising ``spans_per_doc`` keeps the earlier spans (the
draws of span k do not depend on how many follow). Only the corpus is read, never qrels:
the functions take the ``corpus`` mapping (``BeirData.corpus``), not a dataset.

``split_documents`` holds some documents out, so that their pairs become a dev set: model
selection without labels.

Cost, SciFact at the defaults (measured once, MiniLM at max length 256, 2 contended CPU
cores): 10,366 pairs (5,183 titles + 5,183 spans) made in 0.14 s; their texts average 28
tokens against the corpus's 240, and encoding them takes 0.38-0.49 of one corpus encoding.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

__all__ = ["KINDS", "CorpusPairSettings", "CorpusPairs", "make_corpus_pairs",
           "split_documents"]

#: The kinds of pairs, in the order a document's pairs are listed.
KINDS = ("title", "span")
#: Bump when the way pairs are made changes (part of :meth:`CorpusPairSettings.key`).
PAIRS_VERSION = 1


@dataclass(frozen=True)
class CorpusPairSettings:
    """How pairs are made from a corpus (mirrored by the run config's ``data.corpus_pairs``).

    Attributes:
        kinds: Which pairs to make: any of ``"title"``, ``"span"``.
        spans_per_doc: Span draws per document (at most this many distinct spans).
        span_min_words: Fewest words of a span (unless the text is shorter).
        span_max_words: Most words of a span.
        seed: Seed of the span draws.

    Raises:
        ValueError: A setting out of range or of the wrong type; the message names the field.
    """

    kinds: tuple[str, ...] = KINDS
    spans_per_doc: int = 1
    span_min_words: int = 8
    span_max_words: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        kinds = self.kinds
        if isinstance(kinds, str) or not isinstance(kinds, Iterable):
            raise ValueError(f"CorpusPairSettings.kinds must be a sequence of kind names "
                             f"(valid: {', '.join(KINDS)}), got {kinds!r}")
        kinds = tuple(kinds)
        object.__setattr__(self, "kinds", kinds)  # a list (from YAML) becomes a tuple
        if not kinds:
            raise ValueError(f"CorpusPairSettings.kinds is empty; valid kinds: "
                             f"{', '.join(KINDS)}")
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"CorpusPairSettings.kinds: unknown kind {kind!r}; valid "
                                 f"kinds: {', '.join(KINDS)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"CorpusPairSettings.kinds lists a kind twice: {kinds!r}")
        for name in ("spans_per_doc", "span_min_words", "span_max_words", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"CorpusPairSettings.{name} must be an integer, "
                                 f"got {value!r}")
        for name in ("spans_per_doc", "span_min_words", "span_max_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"CorpusPairSettings.{name} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.span_min_words > self.span_max_words:
            raise ValueError(f"CorpusPairSettings.span_min_words ({self.span_min_words}) "
                             f"must be <= span_max_words ({self.span_max_words})")

    def key(self) -> str:
        """A stable string of every setting (and the pair format's version), for cache keys.

        The order of ``kinds`` is left out: it does not change the pairs.
        """
        fields = asdict(self)
        fields["kinds"] = sorted(self.kinds)
        return f"corpus-pairs/v{PAIRS_VERSION}:" + json.dumps(fields, sort_keys=True,
                                                                separators=(",", ":"))


@dataclass(frozen=True)
class CorpusPairs:
    """Pseudo-queries cut from documents, and the document each one comes from.

    Ids are ``"title::<doc id>"`` and ``"span::<doc id>::<k>"`` (k = 0, 1, ... per
    document), listed by sorted document id, a document's title first.

    Attributes:
        queries: Pseudo-query id -> text.
        qrels: Pseudo-query id -> {source document id: 1}; the shape of one split of
            ``BeirData.qrels``, so it goes wherever train or dev qrels go.
    """

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def __len__(self) -> int:
        return len(self.queries)


def make_corpus_pairs(corpus: Mapping[str, tuple[str, str]], settings: CorpusPairSettings,
                      doc_ids: Iterable[str] | None = None) -> CorpusPairs:
    """Makes the title and span pairs of a corpus (or of the documents ``doc_ids``).

    Args:
        corpus: Document id -> (title, text), e.g. ``BeirData.corpus``.
        settings: Which pairs and how spans are drawn.
        doc_ids: The documents to make pairs of (e.g. one side of :func:`split_documents`);
            None: every document. Their order does not matter.

    Returns:
        The pairs, by sorted document id; see :class:`CorpusPairs`.

    Raises:
        KeyError: A document of ``doc_ids`` is not in the corpus (the message names it).
    """
    chosen = sorted(set(corpus if doc_ids is None else doc_ids))
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for doc_id in chosen:
        try:
            title, text = corpus[doc_id]
        except KeyError:
            raise KeyError(f"document {doc_id!r} (from doc_ids) is not in the corpus") from None
        made: list[tuple[str, str]] = []
        if "title" in settings.kinds and title.strip():
            made.append((f"title::{doc_id}", title.strip()))
        if "span" in settings.kinds:
            made += [(f"span::{doc_id}::{k}", span)
                     for k, span in enumerate(_spans(text, doc_id, settings))]
        for qid, query in made:
            queries[qid] = query
            qrels[qid] = {doc_id: 1}
    return CorpusPairs(queries=queries, qrels=qrels)


def _spans(text: str, doc_id: str, settings: CorpusPairSettings) -> list[str]:
    """The distinct spans of one document, drawn from its own seeded generator."""
    words = text.split()
    if not words:
        return []
    rng = random.Random(_doc_seed(settings.seed, doc_id))
    spans: list[str] = []
    for _ in range(settings.spans_per_doc):
        length = min(rng.randint(settings.span_min_words, settings.span_max_words), len(words))
        start = rng.randint(0, len(words) - length)
        span = " ".join(words[start:start + length])
        if span not in spans:
            spans.append(span)
    return spans


def _doc_seed(seed: int, doc_id: str) -> int:
    """A seed that depends on (seed, doc id) only: not on PYTHONHASHSEED, order or platform."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def split_documents(doc_ids: Iterable[str], held_out_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Splits documents into (kept, held out), seeded and independent of the input order.

    Ids are de-duplicated and sorted, shuffled with ``random.Random(seed)``, and the first
    ``round(n * held_out_fraction)`` are held out (as ``data.make_splits`` carves dev
    queries). The pairs of held-out documents make a dev set: selection without labels.

    Returns:
        (kept ids, held-out ids), each sorted; disjoint, and together every id.

    Raises:
        ValueError: ``held_out_fraction`` outside (0, 1), or a split that would leave either
            side empty.
    """
    if isinstance(held_out_fraction, bool) or not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    ids = sorted(set(doc_ids))
    random.Random(seed).shuffle(ids)
    n_held = round(len(ids) * held_out_fraction)
    if n_held < 1 or n_held >= len(ids):
        raise ValueError(f"holding out held_out_fraction={held_out_fraction} of {len(ids)} "
                         f"documents would leave {'no held-out' if n_held < 1 else 'no kept'} "
                         "documents")
    return sorted(ids[n_held:]), sorted(ids[:n_held])
