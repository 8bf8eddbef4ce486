"""Pairs from the corpus alone: seeded, order-free, per-document, inside the text, no qrels;
and their base features, cached like a dataset's."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from trainables import cache
from trainables.data import BeirData
from trainables.pairs import (CorpusPairSettings, CorpusPairs, make_corpus_pairs,
                              split_documents)

ROOT = Path(__file__).resolve().parents[1]


def _words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def _corpus(n_docs: int = 30, seed: int = 7) -> dict[str, tuple[str, str]]:
    """Documents of 0 to 80 words (distinct words, so a span's position is unambiguous);
    every third one has no title."""
    rng = random.Random(seed)
    return {f"doc{i}": ("" if i % 3 == 0 else f"Title of doc {i}",
                        _words(rng.randint(0, 80), f"w{i}_"))
            for i in range(n_docs)}


def _spans_of(pairs: CorpusPairs, doc_id: str) -> list[str]:
    return [text for qid, text in pairs.queries.items() if qid.startswith(f"span::{doc_id}::")]


# -- reproducibility -------------------------------------------------------------------------

def test_same_seed_same_pairs_other_seed_other_spans():
    corpus = _corpus()
    settings = CorpusPairSettings(spans_per_doc=2)
    first = make_corpus_pairs(corpus, settings)
    assert make_corpus_pairs(corpus, settings) == first
    other = make_corpus_pairs(corpus, CorpusPairSettings(spans_per_doc=2, seed=1))
    titles = {q: t for q, t in first.queries.items() if q.startswith("title::")}
    assert titles == {q: t for q, t in other.queries.items() if q.startswith("title::")}
    spans = [t for q, t in first.queries.items() if q.startswith("span::")]
    assert spans != [t for q, t in other.queries.items() if q.startswith("span::")]


def test_pairs_do_not_depend_on_corpus_or_id_order():
    corpus = _corpus()
    settings = CorpusPairSettings(spans_per_doc=3)
    expected = make_corpus_pairs(corpus, settings)
    reversed_corpus = dict(reversed(list(corpus.items())))
    got = make_corpus_pairs(reversed_corpus, settings)
    assert list(got.queries.items()) == list(expected.queries.items())  # order too
    assert got.qrels == expected.qrels
    ids = list(corpus)
    random.Random(3).shuffle(ids)
    assert make_corpus_pairs(corpus, settings, ids) == expected


def test_a_documents_pairs_depend_on_the_seed_and_its_id_only():
    """Adding documents, or making pairs of a subset, leaves every other document's pairs."""
    corpus = _corpus(40)
    settings = CorpusPairSettings(spans_per_doc=2)
    small = {d: corpus[d] for d in list(corpus)[:10]}
    whole = make_corpus_pairs(corpus, settings)
    part = make_corpus_pairs(small, settings)
    assert part.queries == {q: t for q, t in whole.queries.items() if q in part.queries}
    assert part.qrels == {q: whole.qrels[q] for q in part.qrels}
    assert make_corpus_pairs(corpus, settings, list(small)) == part


def test_pairs_are_the_same_in_another_process():
    """The per-document seed is a digest, not ``hash()``: no PYTHONHASHSEED dependence."""
    corpus = _corpus(8)
    code = ("import json, sys\n"
            "from trainables.pairs import CorpusPairSettings, make_corpus_pairs\n"
            "corpus = {k: tuple(v) for k, v in json.loads(sys.stdin.read()).items()}\n"
            "print(json.dumps(make_corpus_pairs(corpus, CorpusPairSettings(seed=5)).queries))\n")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(corpus), cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(out.stdout) == make_corpus_pairs(corpus, CorpusPairSettings(seed=5)).queries


def test_more_spans_per_document_keep_the_earlier_ones():
    corpus = _corpus()
    one = make_corpus_pairs(corpus, CorpusPairSettings(spans_per_doc=1))
    four = make_corpus_pairs(corpus, CorpusPairSettings(spans_per_doc=4))
    assert one.queries.items() <= four.queries.items()


# -- what the pairs are ----------------------------------------------------------------------

def test_spans_are_contiguous_runs_of_the_text_within_the_length_bounds():
    corpus = _corpus(60)
    settings = CorpusPairSettings(kinds=("span",), spans_per_doc=4, span_min_words=5,
                                  span_max_words=12)
    pairs = make_corpus_pairs(corpus, settings)
    assert pairs.queries
    for doc_id, (_, text) in corpus.items():
        words = text.split()
        spans = _spans_of(pairs, doc_id)
        assert [f"span::{doc_id}::{k}" for k in range(len(spans))] == \
            [q for q in pairs.queries if q.startswith(f"span::{doc_id}::")]
        assert len(spans) == len(set(spans)) <= settings.spans_per_doc
        assert bool(spans) == bool(words)
        for span in spans:
            got = span.split()
            starts = [i for i in range(len(words)) if words[i:i + len(got)] == got]
            assert starts, f"{span!r} is not a contiguous run of {doc_id}'s text"
            if len(words) >= settings.span_min_words:
                assert settings.span_min_words <= len(got) <= settings.span_max_words
            else:  # clipped: the whole text
                assert got == words
        for qid in pairs.queries:
            if qid.startswith(f"span::{doc_id}::"):
                assert pairs.qrels[qid] == {doc_id: 1}


def test_short_text_is_one_whole_span_and_empty_text_none():
    corpus = {"short": ("T", "just three  words"), "empty": ("Title", "   "),
              "long": ("", _words(100, "x"))}
    pairs = make_corpus_pairs(corpus, CorpusPairSettings(spans_per_doc=5, span_min_words=8))
    assert _spans_of(pairs, "short") == ["just three words"]
    assert _spans_of(pairs, "empty") == []
    assert pairs.queries["title::empty"] == "Title"
    assert len(_spans_of(pairs, "long")) == 5


def test_title_pairs_only_for_documents_with_a_title():
    corpus = {"a": ("  A title ", "text of a"), "b": ("", "text of b"), "c": ("   ", "c")}
    pairs = make_corpus_pairs(corpus, CorpusPairSettings(kinds=("title",)))
    assert pairs.queries == {"title::a": "A title"}
    assert pairs.qrels == {"title::a": {"a": 1}}
    spans = make_corpus_pairs(corpus, CorpusPairSettings(kinds=("span",)))
    assert spans.queries and all(q.startswith("span::") for q in spans.queries)
    both = make_corpus_pairs(corpus, CorpusPairSettings(kinds=("span", "title")))
    assert list(both.queries)[:2] == ["title::a", "span::a::0"]  # a document's title first


def test_unknown_document_is_named():
    with pytest.raises(KeyError, match="'nope'"):
        make_corpus_pairs({"a": ("", "x")}, CorpusPairSettings(), ["a", "nope"])


class _NoQrels(Mapping):
    """Qrels that fail the test when anything looks at them."""

    def __getitem__(self, key):
        raise AssertionError(f"qrels were read ({key!r})")

    def __iter__(self):
        raise AssertionError("qrels were read (iterated)")

    def __len__(self):
        raise AssertionError("qrels were read (len)")


def _label_free_data(root: Path) -> BeirData:
    """A tiny BEIR dataset on disk whose qrels cannot be read."""
    corpus = {"d1": ("Vitamin D and bone density", "Vitamin D supplements raise bone "
                     "mineral density in older adults over two years of follow-up."),
              "d2": ("", "Statins lower LDL cholesterol and the risk of heart attack."),
              "d3": ("Sleep and memory", "Short sleep impairs the consolidation of memory.")}
    queries = {"q1": "does vitamin d help bones"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in corpus.items()))
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    return BeirData(root=root, corpus=corpus, queries=queries, qrels=_NoQrels())


def test_no_qrels_are_read(tmp_path):
    data = _label_free_data(tmp_path / "data")
    kept, held = split_documents(data.doc_ids, 0.34, seed=0)
    settings = CorpusPairSettings(span_min_words=3, span_max_words=5)
    pairs = make_corpus_pairs(data.corpus, settings, kept)
    dev = make_corpus_pairs(data.corpus, settings, held)
    assert pairs.queries and dev.queries
    assert {d for docs in pairs.qrels.values() for d in docs} <= set(kept)
    assert {d for docs in dev.qrels.values() for d in docs} <= set(held)
    data.fingerprint()  # the cache key's part of the data reads corpus and queries only


# -- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"kinds": ("title", "query")}, "kinds"),
    ({"kinds": ()}, "kinds"),
    ({"kinds": "title"}, "kinds"),
    ({"kinds": ("span", "span")}, "kinds"),
    ({"spans_per_doc": 0}, "spans_per_doc"),
    ({"span_min_words": 0}, "span_min_words"),
    ({"span_min_words": 40}, "span_min_words"),  # > span_max_words (32)
    ({"span_max_words": 2.5}, "span_max_words"),
    ({"seed": True}, "seed"),
])
def test_settings_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"CorpusPairSettings.{field}"):
        CorpusPairSettings(**kwargs)


def test_key_holds_every_setting():
    base = CorpusPairSettings()
    changed = [CorpusPairSettings(kinds=("span",)), CorpusPairSettings(spans_per_doc=2),
               CorpusPairSettings(span_min_words=9), CorpusPairSettings(span_max_words=31),
               CorpusPairSettings(seed=1)]
    keys = {s.key() for s in [base, *changed]}
    assert len(keys) == 1 + len(changed)
    assert CorpusPairSettings(kinds=["span", "title"]).key() == base.key()  # order: same pairs
    assert CorpusPairSettings(kinds=["span", "title"]).kinds == ("span", "title")


# -- held-out documents -----------------------------------------------------------------------

def test_split_documents_is_disjoint_seeded_and_order_free():
    ids = [f"d{i}" for i in range(100)]
    kept, held = split_documents(ids, 0.2, seed=0)
    assert len(held) == 20 and len(kept) == 80
    assert not set(kept) & set(held) and set(kept) | set(held) == set(ids)
    assert split_documents(reversed(ids), 0.2, seed=0) == (kept, held)
    assert split_documents(ids, 0.2, seed=1)[1] != held
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_documents(ids, 1.0, seed=0)
    with pytest.raises(ValueError, match="no held-out"):
        split_documents(ids[:2], 0.1, seed=0)


# -- features of pseudo-queries ---------------------------------------------------------------

def test_pseudo_query_features_are_cached_and_keyed_by_the_settings(tmp_path, monkeypatch):
    data = _label_free_data(tmp_path / "data")
    root = tmp_path / "cache"
    settings = CorpusPairSettings(span_min_words=3, span_max_words=6)
    pairs = make_corpus_pairs(data.corpus, settings)
    calls = []
    real_encode = cache.encode_texts
    monkeypatch.setattr(cache, "encode_texts",
                        lambda *a, **k: calls.append(len(a[1])) or real_encode(*a, **k))

    def tables(s: CorpusPairSettings, p: CorpusPairs):
        return cache.load_or_compute_corpus_pairs(data, p, s, "all-MiniLM-L6-v2", 64,
                                                  root=root, progress=False)

    first = tables(settings, pairs)
    assert calls == [3, 1, len(pairs)]  # documents, queries, pseudo-queries
    assert first.query_ids == ["q1", *sorted(pairs.queries)]
    assert first.doc_ids == data.doc_ids
    title = first.queries(["title::d1"])
    assert title.shape == (1, first.dim) and not torch.equal(title, first.queries(["q1"]))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although the cache holds the features")

    monkeypatch.setattr(cache, "encode_texts", no_encoding)
    again = tables(settings, pairs)
    assert again.query_ids == first.query_ids
    assert torch.equal(again.query_features, first.query_features)
    assert torch.equal(again.doc_features, first.doc_features)

    other = CorpusPairSettings(span_min_words=3, span_max_words=6, seed=1)
    with pytest.raises(AssertionError, match="encoded although"):  # a new entry to compute
        tables(other, make_corpus_pairs(data.corpus, other))
    entries = [p for p in (root / "texts").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # the failed computation left nothing behind
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert settings.key() in meta["key_extra"] and data.fingerprint() in meta["key_extra"]
