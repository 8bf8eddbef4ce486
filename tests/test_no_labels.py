"""Training on pairs made from the corpus alone (``data.pairs``), selected on labelled dev or
on held-out corpus pairs (``data.dev_mode: corpus_pairs``), on a small NFCorpus cut."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from trainables.config import ConfigError, RunConfig
from trainables.data import load_beir
from trainables.loop import prepare, train
from trainables.pairs import CorpusPairSettings, make_corpus_pairs


def _cfg(data: Path, **overrides) -> RunConfig:
    base = {"data.path": str(data), "data.pairs": "corpus", "model.freeze_base": True,
            "loss.lambda_pred": 1.0, "loss.lambda_con": 0.0, "loss.stopgrad": True,
            "train.epochs": 2, "train.batch_size": 32, "train.max_steps_per_epoch": 5,
            "eval.score_with": "auto"}
    return RunConfig().with_overrides({**base, **overrides})


def test_corpus_pairs_are_the_only_training_pairs(small_beir):
    """With ``data.pairs: corpus`` the run trains on exactly the corpus pairs: no query of any
    qrels split, no judged pair."""
    cfg = _cfg(small_beir)
    data, splits, features = prepare(cfg, progress=False)
    want = make_corpus_pairs(load_beir(small_beir).corpus, CorpusPairSettings())
    assert splits["fit"] == want.qrels
    judged = {q for split in ("train", "dev", "test") for q in load_beir(small_beir).qrels[split]}
    assert not set(splits["fit"]) & judged
    # the pseudo-queries' texts and base features are there for the loop to read
    some = sorted(splits["fit"])[:3]
    assert [data.queries[q] for q in some] == [want.queries[q] for q in some]
    assert features.queries(some).shape == (3, features.dim)
    # dev stays the labelled one (selection on labels: "trained without labels, selected on
    # N labelled dev queries"); the seen/unseen split still refers to the labelled train split
    assert splits["dev"] == {q: d for q, d in load_beir(small_beir).qrels["dev"].items()
                             if any(r > 0 for r in d.values())}
    both = prepare(_cfg(small_beir, **{"data.pairs": "both"}), progress=False)[1]["fit"]
    assert set(both) == set(want.qrels) | set(splits["train"])


def test_a_corpus_run_never_reads_the_train_qrels(small_beir, tmp_path):
    """Selected on held-out corpus pairs, a corpus-mode run trains the same model whatever the
    train qrels say: they are read for nothing but the seen/unseen split of test."""
    other = tmp_path / "other"
    shutil.copytree(small_beir, other)
    lines = (other / "qrels" / "train.tsv").read_text().splitlines()
    docs = [json.loads(ln)["_id"] for ln in (other / "corpus.jsonl").read_text().splitlines()]
    shuffled = [lines[0]] + [f"{ln.split(chr(9))[0]}\t{docs[i % len(docs)]}\t1"
                             for i, ln in enumerate(lines[1:])]
    (other / "qrels" / "train.tsv").write_text("\n".join(shuffled) + "\n")
    runs = []
    for root in (small_beir, other):
        cfg = _cfg(root, **{"data.dev_mode": "corpus_pairs", "data.dev_doc_fraction": 0.2})
        runs.append(train(cfg, out_dir=tmp_path / root.name, progress=False))
    first, second = runs
    assert [m["train_loss"] for m in first["history"]] == [m["train_loss"]
                                                           for m in second["history"]]
    assert first["best_dev_ndcg_at_10"] == second["best_dev_ndcg_at_10"]
    assert first["test_per_query"] == second["test_per_query"]  # the same model
    # ...but the seen/unseen split follows each one's labels
    assert first["test"]["test_n_seen"] != second["test"]["test_n_seen"]
    # selection without labels: dev is the held-out documents' titles and first spans
    _, splits, _ = prepare(_cfg(small_beir, **{"data.dev_mode": "corpus_pairs",
                                               "data.dev_doc_fraction": 0.2}), progress=False)
    dev_docs = {d for docs in splits["dev"].values() for d in docs}
    fit_docs = {d for docs in splits["fit"].values() for d in docs}
    assert dev_docs and not dev_docs & fit_docs
    assert all(q.startswith(("title::", "span::")) for q in splits["dev"])
    assert len(dev_docs) == round(0.2 * len(docs))


def test_every_loss_trains_on_corpus_pairs(small_beir, tmp_path):
    """L_pred with stop-gradient alone (no negatives), InfoNCE with in-batch negatives,
    isotropy, their mix, and hard negatives mined from the corpus pairs."""
    cases = {
        "pred_only": {"loss.lambda_pred": 1.0},
        "contrastive": {"loss.lambda_pred": 0.0, "loss.lambda_con": 1.0,
                        "eval.score_with": "query"},
        "mix_sigreg": {"loss.lambda_con": 0.5, "loss.lambda_iso": 0.01,
                       "loss.isotropy": "sigreg"},
        "hard_negatives": {"loss.lambda_con": 1.0, "train.hard_negatives": 2},
    }
    for name, overrides in cases.items():
        result = train(_cfg(small_beir, **overrides), out_dir=tmp_path / name,
                       progress=False)
        last = result["history"][-1]
        assert math.isfinite(last["train_loss"]) and math.isfinite(last["dev_ndcg_at_10"]), name
        assert 0 < result["test"]["test_ndcg_at_10"] <= 1, name


def test_corpus_pair_settings_are_checked():
    with pytest.raises(ConfigError, match="span_min_words"):
        RunConfig().with_overrides({"data.corpus_pairs.span_min_words": 40,
                                    "data.corpus_pairs.span_max_words": 10})
    with pytest.raises(ConfigError, match="dev_mode corpus_pairs selects on pairs"):
        RunConfig().with_overrides({"data.dev_mode": "corpus_pairs"})
    with pytest.raises(ConfigError, match="kinds"):
        RunConfig().with_overrides({"data.corpus_pairs.kinds": ["query"]})


def test_a_no_label_study_end_to_end(tmp_path, small_beir):
    """A study of corpus-pair trials (real Ray, Optuna, MLflow) on a small collection: the
    driver encodes the pseudo-queries once, every trial trains on corpus pairs only, and the
    study scores its best trials on test, seen and unseen, from their kept weights."""
    import ray
    from study_helpers import tiny_space

    from study import StudyOptions, launch
    from trainables.config import RunConfig

    space = tiny_space(tmp_path, "nolabels", num_samples=2, epochs=2,
                       extra_base={"data": {"pairs": "corpus"},
                                   "train": {"max_steps_per_epoch": 3}})
    summary = launch(StudyOptions(space=str(space), storage=str(tmp_path / "studies"),
                                  data=str(small_beir), verbose=0))
    if ray.is_initialized():
        ray.shutdown()
    assert summary["trials"] == 2 and summary["errored"] == 0
    study_dir = Path(summary["study_dir"])
    for trial in (study_dir / "trials").iterdir():
        assert RunConfig.from_yaml(trial / "best" / "config.yaml").data.pairs == "corpus"
    test = summary["best"]["test (reported only)"]
    assert test["test_n_seen"] + test["test_n_unseen"] == 30


def test_the_exact_linear_predictor_is_least_squares_pulled_to_the_identity():
    """Figure 13b's solver: on pairs made by a known map it recovers the map when the pull is
    weak, gives the identity when it is strong, and minimises its own objective."""
    import numpy as np

    from benchmarks.bench_no_labels import ridge_to_identity

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    m = rng.normal(size=(8, 8))
    assert np.allclose(ridge_to_identity(x, x @ m, 1e-9), m, atol=1e-6)
    assert np.allclose(ridge_to_identity(x, x @ m, 1e12), np.eye(8), atol=1e-6)
    y = x @ m + rng.normal(size=(400, 8))
    w = ridge_to_identity(x, y, 5.0)

    def objective(v):
        return ((x @ v - y) ** 2).sum() + 5.0 * ((v - np.eye(8)) ** 2).sum()

    for _ in range(5):  # any step away from the solution costs more
        assert objective(w) < objective(w + 1e-3 * rng.normal(size=(8, 8)))


def test_the_exact_linear_predictor_is_chosen_on_dev(small_beir):
    """Figure 13b picks its α and blend by dev alone and scores every test query once."""
    from benchmarks.bench_no_labels import BLENDS, RIDGE_ALPHAS, closed_form
    from trainables.data import load_beir

    out = closed_form(_cfg(small_beir))
    assert len(out["grid"]) == len(RIDGE_ALPHAS) * len(BLENDS)
    assert out["chosen"]["dev"] == max(g["dev"] for g in out["grid"])
    judged = {q for q, docs in load_beir(small_beir).qrels["test"].items()
              if any(rel > 0 for rel in docs.values())}
    assert set(out["chosen"]["test_per_query"]) == judged
    assert out["pairs"] == len(make_corpus_pairs(load_beir(small_beir).corpus,
                                                 CorpusPairSettings()))
