"""End to end on SciFact with the frozen packaged MiniLM (cached base features).

These are the pipeline's acceptance checks: the zero-shot baseline reproduces MTEB's
0.645, a short training beats it on the test split, and checkpoint -> resume ends exactly
where an uninterrupted run ends.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainables.config import RunConfig
from trainables.data import make_splits
from trainables.evaluate import evaluate_model
from trainables.loop import (EpochSampler, TrainingDiverged, checkpoint_dirs,
                             latest_valid_checkpoint, train, training_pairs, zero_shot)
from trainables.model import JEPAModel


def _cfg(scifact_dir, **overrides) -> RunConfig:
    base = {"data.path": str(scifact_dir), "train.epochs": 2, "train.batch_size": 64,
            "loss.lambda_pred": 1.0, "loss.lambda_con": 1.0}
    base.update(overrides)
    return RunConfig().with_overrides(base)


class _Stop(Exception):
    """Raised by :func:`_stop_after`'s callback: a run cut short after an epoch."""


def _stop_after(epoch: int):
    def callback(metrics, checkpoint_dir):
        if metrics["epoch"] == epoch:
            raise _Stop

    return callback


def test_zero_shot_reproduces_mteb(scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir)
    m = zero_shot(cfg, "test", data=scifact, features=scifact_features)
    assert m["ndcg_at_10"] == pytest.approx(0.645, abs=0.002)
    assert m["recall_at_100"] == pytest.approx(0.925, abs=0.005)


def test_short_training_beats_zero_shot_on_test(tmp_path, scifact_dir, scifact,
                                                scifact_features):
    cfg = _cfg(scifact_dir, **{"train.epochs": 3})
    seen = []
    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   callback=lambda m, c: seen.append((m["epoch"], c.name)), progress=False)
    zs = zero_shot(cfg, "test", data=scifact, features=scifact_features)["ndcg_at_10"]
    assert result["test"]["test_ndcg_at_10"] > zs + 0.005
    assert seen == [(1, "epoch_0001"), (2, "epoch_0002"), (3, "epoch_0003")]
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert len(written["history"]) == 3 and "test_predictor_ndcg_at_10" in written["test"]
    assert RunConfig.from_yaml(tmp_path / "config.yaml") == cfg
    for key in ("effective_rank", "isotropy", "embedding_std", "pred_error",
                "dev_query_ndcg_at_10", "dev_predictor_ndcg_at_10", "train_pred", "train_con"):
        assert math.isfinite(written["history"][-1][key]), key


def test_resume_matches_uninterrupted(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"train.epochs": 3, "train.max_steps_per_epoch": 4,
                               "model.predictor.dropout": 0.2, "eval.score_with": "auto",
                               "train.patience": 2})
    full = train(cfg, out_dir=tmp_path / "full", data=scifact, features=scifact_features,
                 progress=False)

    with pytest.raises(_Stop):
        train(cfg, out_dir=tmp_path / "cut", data=scifact, features=scifact_features,
              callback=_stop_after(2), progress=False)
    resumed = train(cfg, out_dir=tmp_path / "cut", data=scifact, features=scifact_features,
                    progress=False)
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    assert resumed["final"]["dev_ndcg_at_10"] == full["final"]["dev_ndcg_at_10"]
    assert resumed["test"] == full["test"]
    assert resumed["final"]["train_loss"] == full["final"]["train_loss"]
    assert (resumed["best_epoch"], resumed["score_with"]) == (full["best_epoch"],
                                                              full["score_with"])
    assert resumed["test_per_query"] == full["test_per_query"]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, scifact_dir, scifact,
                                              scifact_features):
    cfg = _cfg(scifact_dir, **{"train.epochs": 2, "train.max_steps_per_epoch": 2})
    train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features, progress=False)
    newest = checkpoint_dirs(tmp_path)[0]
    (newest / "state.pt").write_bytes(b"garbage")
    path, state = latest_valid_checkpoint(tmp_path)
    assert path.name == "epoch_0001" and state["epoch"] == 1
    more = cfg.with_overrides({"train.epochs": 3})
    result = train(more, out_dir=tmp_path, data=scifact, features=scifact_features,
                   progress=False)
    assert [m["epoch"] for m in result["history"]] == [1, 2, 3]
    assert checkpoint_dirs(tmp_path)[0].name == "epoch_0003"


def test_a_run_whose_checkpoints_were_deleted_writes_no_more(tmp_path, scifact_dir, scifact,
                                                              scifact_features):
    """A Train worker of a trial Tune stopped trains on until its group is removed, after the
    study deleted the trial's checkpoints: it must not make the directory again and leave a
    copy behind (seen: ``epoch_0003.tmp`` after a study's end)."""
    cfg = _cfg(scifact_dir, **{"train.epochs": 3, "train.max_steps_per_epoch": 2})
    gone = tmp_path / "checkpoints"

    def delete_after_first(metrics, checkpoint_dir):
        if metrics["epoch"] == 1:
            import shutil

            shutil.rmtree(gone)

    with pytest.raises(FileNotFoundError, match=r"checkpoints is gone.*epoch 2 is not saved"):
        train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
              callback=delete_after_first, progress=False, checkpoint_interval_s=0)
    assert not gone.exists()


def test_phases_train_what_they_name(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = RunConfig.from_dict({
        "data": {"path": str(scifact_dir)},
        "loss": {"lambda_pred": 1.0, "lambda_con": 0.5},
        "train": {"max_steps_per_epoch": 3, "phases": [
            {"name": "predictor_only", "epochs": 1},
            {"name": "joint", "epochs": 1},
            {"name": "isotropy_finetune", "epochs": 1,
             "loss": {"lambda_iso": 0.02, "isotropy": "sigreg", "lambda_pred": 0.0}},
        ]},
        "eval": {"evaluate_test": False},
    })
    snapshots = []

    def snap(metrics, ckpt):
        state = torch.load(ckpt / "state.pt", weights_only=False)["model"]
        snapshots.append({k: v.clone() for k, v in state.items()})

    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   callback=snap, progress=False)
    assert [m["phase"] for m in result["history"]] == ["predictor_only", "joint",
                                                       "isotropy_finetune"]
    init = JEPAInit(cfg, scifact_features.dim)
    changed = lambda a, b, prefix: any(not torch.equal(a[k], b[k]) for k in a
                                       if k.startswith(prefix))
    # phase 1: predictor moved, projection did not
    assert changed(init, snapshots[0], "predictor.") and not changed(init, snapshots[0],
                                                                    "proj_q.")
    # phase 3: projection moved, predictor did not
    assert changed(snapshots[1], snapshots[2], "proj_q.")
    assert not changed(snapshots[1], snapshots[2], "predictor.")
    assert result["history"][2]["train_iso"] > 0 and result["history"][0]["train_iso"] == 0


def JEPAInit(cfg, dim):
    from trainables.loop import seed_everything
    from trainables.model import JEPAModel

    seed_everything(cfg.train.seed)
    return JEPAModel(cfg.model, base_dim=dim).state_dict()


def test_without_lambda_pred_training_never_runs_the_predictor(
        tmp_path, monkeypatch, scifact_dir, scifact, scifact_features):
    """λ_pred = 0: the steps skip both predictors (their output enters no loss term), and
    the run is the one it was when they ran (no dropout in them: the same random stream);
    with λ_pred > 0 they run at every step."""
    from trainables import model as model_module

    calls: list[int] = []
    real = model_module.Predictor.forward

    def counted(self, x):
        if self.training:
            calls.append(1)
        return real(self, x)

    monkeypatch.setattr(model_module.Predictor, "forward", counted)
    cfg = _cfg(scifact_dir, **{"loss.lambda_pred": 0.0, "model.variant": "bidirectional",
                               "model.predictor.dropout": 0.0, "train.epochs": 2,
                               "train.max_steps_per_epoch": 4})
    kw = {"data": scifact, "features": scifact_features, "progress": False}
    skipped = train(cfg, out_dir=tmp_path / "skipped", **kw)
    assert calls == []
    forward = JEPAModel.forward
    monkeypatch.setattr(JEPAModel, "forward", lambda self, q, d, negatives=None,
                        predict=True: forward(self, q, d, negatives, predict=True))
    ran = train(cfg, out_dir=tmp_path / "ran", **kw)
    assert len(calls) == 2 * 2 * 4  # both predictors, every step of both epochs
    assert [h["train_loss"] for h in skipped["history"]] == [h["train_loss"]
                                                            for h in ran["history"]]
    assert skipped["test"] == ran["test"]
    calls.clear()
    train(cfg.with_overrides({"loss.lambda_pred": 0.5}), out_dir=tmp_path / "pred", **kw)
    assert len(calls) == 2 * 2 * 4


def test_divergence_raises_with_reason(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"train.lr": 1e6, "train.grad_clip": 0.0, "train.epochs": 3,
                               "loss.lambda_reg": 1.0, "loss.lambda_con": 0.0,
                               "train.warmup_ratio": 0.0})
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features, progress=False)
    assert "non-finite loss" in info.value.reason


def test_checkpoint_interval_keeps_first_and_last_and_resumes_exactly(
        tmp_path, scifact_dir, scifact, scifact_features):
    """With an interval longer than the run, only the first and the last epoch write a
    checkpoint (the callback gets None for the others); a run cut after epoch 3 resumes from
    epoch 1 and ends where the uninterrupted run ends."""
    cfg = _cfg(scifact_dir, **{"train.epochs": 4, "train.max_steps_per_epoch": 3,
                               "eval.evaluate_test": False})
    seen = []
    full = train(cfg, out_dir=tmp_path / "full", data=scifact, features=scifact_features,
                 progress=False, checkpoint_interval_s=3600,
                 callback=lambda m, c: seen.append((m["epoch"], c and c.name)))
    assert seen == [(1, "epoch_0001"), (2, None), (3, None), (4, "epoch_0004")]
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["epoch_0004", "epoch_0001"]

    with pytest.raises(_Stop):
        train(cfg, out_dir=tmp_path / "cut", data=scifact, features=scifact_features,
              callback=_stop_after(3), progress=False, checkpoint_interval_s=3600)
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["epoch_0001"]
    resumed = train(cfg, out_dir=tmp_path / "cut", data=scifact, features=scifact_features,
                    progress=False, checkpoint_interval_s=3600)
    assert [m["epoch"] for m in resumed["history"]] == [1, 2, 3, 4]
    for again, first in zip(resumed["history"], full["history"]):  # times aside, the same
        assert {k: v for k, v in again.items() if k.startswith(("dev_", "train_"))} == \
            {k: v for k, v in first.items() if k.startswith(("dev_", "train_"))}


# -- the budget: best dev epoch, patience, stop_after_epoch, scoring chosen on dev ----------


def test_final_figures_are_the_best_dev_epochs(tmp_path, scifact_dir, scifact,
                                               scifact_features):
    """The run reports its best dev epoch (first of equals), keeps that epoch's weights on
    disk as they change, and scores test once, at its end, from them."""
    cfg = _cfg(scifact_dir, **{"train.epochs": 6, "train.max_steps_per_epoch": 3,
                               "train.lr": 0.01, "eval.score_with": "auto"})
    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   progress=False)
    history = result["history"]
    devs = [m["dev_ndcg_at_10"] for m in history]
    best = devs.index(max(devs)) + 1
    assert result["best_epoch"] == best and result["best_dev_ndcg_at_10"] == max(devs)
    assert result["final"] == history[best - 1]
    # the names the study's view and its readers know them by (analysis.schema)
    from analysis import schema as S

    assert {S.SELECTION, S.BEST_EPOCH, S.BEST_SCORED_WITH_PREDICTOR,
            "best_dev_seen_ndcg_at_10", "best_dev_unseen_ndcg_at_10"} <= set(history[-1])
    # no epoch scores test; the running best is reported with its dev subsets
    running = -1.0
    for m in history:
        assert not any(k.startswith("test") or k.startswith("best_test") for k in m), m["epoch"]
        if m["dev_ndcg_at_10"] > running:
            best_seen = m["dev_seen_ndcg_at_10"]
        running = max(running, m["dev_ndcg_at_10"])
        assert m["best_dev_ndcg_at_10"] == running
        assert m["best_dev_seen_ndcg_at_10"] == best_seen
        # dev's seen/unseen split (carved dev: the train queries' positives overlap a lot)
        assert m["dev_n_seen"] + m["dev_n_unseen"] == len(make_splits(scifact)["dev"])
        assert min(m["dev_seen_ndcg_at_10"], m["dev_unseen_ndcg_at_10"]) <= m[
            "dev_ndcg_at_10"] <= max(m["dev_seen_ndcg_at_10"], m["dev_unseen_ndcg_at_10"])
    # test on all, seen and unseen queries (175 / 125 against the carved train split)
    test = result["test"]
    assert (test["test_n_seen"], test["test_n_unseen"]) == (175, 125)
    assert sorted(result["subsets"]["test"]["seen"] + result["subsets"]["test"]["unseen"]) \
        == sorted(scifact.qrels["test"])
    assert test["test_ndcg_at_10"] == pytest.approx(
        (175 * test["test_seen_ndcg_at_10"] + 125 * test["test_unseen_ndcg_at_10"]) / 300)
    # the kept weights are the best epoch's: scored again they give the same test figures
    from trainables.loop import load_best, score_kept

    kept_cfg, info, _ = load_best(tmp_path)
    assert (info["epoch"], info["mode"], info["value"]) == (best, result["score_with"],
                                                            max(devs))
    assert kept_cfg == cfg
    again = score_kept(tmp_path, data=scifact, features=scifact_features)
    assert again["test"] == test and again["test_per_query"] == result["test_per_query"]
    # scoring chosen on dev: each epoch's headline is the better scoring, and the run's is
    # its best epoch's; the test headline follows that choice, whatever test says
    for m in history:
        q, p = m["dev_query_ndcg_at_10"], m["dev_predictor_ndcg_at_10"]
        assert m["dev_ndcg_at_10"] == max(q, p)
        assert m["dev_scored_with"] == ("predictor" if p > q else "query")
    mode = history[best - 1]["dev_scored_with"]
    assert result["score_with"] == mode
    assert result["test"]["test_ndcg_at_10"] == result["test"][f"test_{mode}_ndcg_at_10"]
    # per-query test figures of the best epoch, both scorings
    per_query = json.loads((tmp_path / "metrics.json").read_text())["test_per_query"]
    assert len(per_query["query"]) == len(scifact.qrels["test"]) == 300
    for scoring in ("query", "predictor"):
        mean = sum(per_query[scoring].values()) / len(per_query[scoring])
        assert mean == pytest.approx(result["test"][f"test_{scoring}_ndcg_at_10"], abs=1e-12)
    # and beside the outputs, with the means (a study's view logs it)
    beside = json.loads((tmp_path / "per_query.json").read_text())
    assert (beside["best_epoch"], beside["score_with"]) == (best, mode)
    assert beside["test"] == per_query and beside["metrics"] == result["test"]
    # the best epoch's weights travel with the last checkpoint: evaluated, they give its dev
    state = torch.load(checkpoint_dirs(tmp_path)[0] / "state.pt", weights_only=False)
    model = JEPAModel(cfg.model, base_dim=scifact_features.dim)
    model.load_state_dict(state["selection"]["model"])
    dev = make_splits(scifact)["dev"]
    qids = sorted(dev)
    raw = evaluate_model(model, query_ids=qids, query_inputs=scifact_features.queries(qids),
                         doc_ids=scifact_features.doc_ids,
                         doc_emb=model.encode_docs(scifact_features.doc_features).detach(),
                         qrels=dev, similarity="cosine", diagnostics=False)
    assert raw[f"{mode}_ndcg_at_10"] == pytest.approx(result["best_dev_ndcg_at_10"], abs=1e-9)


def test_patience_ends_a_run_that_stopped_improving(tmp_path, scifact_dir, scifact,
                                                    scifact_features):
    # a learning rate of 1e-12 leaves the zero-shot weights as they are: dev never improves
    cfg = _cfg(scifact_dir, **{"train.epochs": 20, "train.max_steps_per_epoch": 2,
                               "train.lr": 1e-12, "train.patience": 3,
                               "eval.evaluate_test": False})
    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   progress=False)
    assert [m["epoch"] for m in result["history"]] == [1, 2, 3, 4]
    assert result["best_epoch"] == 1
    assert result["end_reason"].startswith("patience: no dev improvement in 3 epochs")
    assert [m["end_reason"] for m in result["history"]][:-1] == ["", "", ""]
    # a resumed run that had ended stays ended
    again = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                  progress=False)
    assert len(again["history"]) == 4 and again["best_epoch"] == 1


def test_stop_after_epoch_keeps_the_schedule(tmp_path, scifact_dir, scifact, scifact_features):
    """An exported trial reruns to its best epoch: the first epochs of the whole run,
    exactly, under the whole run's learning-rate schedule."""
    cfg = _cfg(scifact_dir, **{"train.epochs": 5, "train.max_steps_per_epoch": 3,
                               "eval.evaluate_test": False})
    whole = train(cfg, out_dir=tmp_path / "whole", data=scifact, features=scifact_features,
                  progress=False)
    cut = train(cfg.with_overrides({"train.stop_after_epoch": 2}), out_dir=tmp_path / "cut",
                data=scifact, features=scifact_features, progress=False)
    assert len(cut["history"]) == 2 and cut["end_reason"] == "stop_after_epoch: 2"
    for a, b in zip(cut["history"], whole["history"][:2]):
        assert {k: v for k, v in a.items() if k.startswith(("dev_", "train_", "lr"))} == \
            {k: v for k, v in b.items() if k.startswith(("dev_", "train_", "lr"))}
    assert cut["history"][-1]["lr"] > whole["history"][-1]["lr"]  # mid-schedule, not decayed


def test_auto_scoring_without_a_trained_predictor_scores_with_the_query(
        tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"train.epochs": 2, "train.max_steps_per_epoch": 2,
                               "loss.lambda_pred": 0.0, "eval.score_with": "auto",
                               "eval.evaluate_test": False, "model.predictor.residual": False})
    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   progress=False)
    assert result["score_with"] == "query"
    assert all(m["dev_scored_with"] == "query" for m in result["history"])


def test_an_epoch_of_queries_draws_one_positive_per_query(scifact):
    train_qrels = make_splits(scifact)["train"]
    pairs = training_pairs(train_qrels)
    by_pair, by_query = EpochSampler(pairs, "pairs", 0), EpochSampler(pairs, "queries", 0)
    assert by_pair.items(1) != by_pair.items(2) and sorted(by_pair.items(1)) == pairs
    assert len(by_pair) == len(pairs) and len(by_query) == len(train_qrels) < len(pairs)
    items = by_query.items(1)
    assert sorted(q for q, _ in items) == sorted(train_qrels)  # every query once
    assert all(train_qrels[q][d] > 0 for q, d in items)
    assert items == EpochSampler(pairs, "queries", 0).items(1)  # seeded
    several = [q for q in train_qrels if len(train_qrels[q]) > 1]
    drawn = {q: {dict(by_query.items(e))[q] for e in range(1, 30)} for q in several[:5]}
    assert any(len(docs) > 1 for docs in drawn.values())  # other positives over epochs
    with pytest.raises(ValueError, match="sampling"):
        EpochSampler(pairs, "docs", 0)
