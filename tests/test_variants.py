"""Model and loss variants end to end, with tiny budgets.

Frozen-base variants run on SciFact's cached base features (2 steps of one epoch each); the
unfrozen-base test runs the real MiniLM on a hand-built 30-document BEIR set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainables.config import RunConfig
from trainables.loop import checkpoint_dirs, mine_hard_negatives, seed_everything, train
from trainables.model import JEPAModel

TINY = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "eval.evaluate_test": False,
        "loss.lambda_pred": 1.0, "loss.lambda_con": 0.5}


def _cfg(scifact_dir, **overrides) -> RunConfig:
    return RunConfig().with_overrides({"data.path": str(scifact_dir), **TINY, **overrides})


def _run(tmp_path, scifact, features, cfg: RunConfig):
    """Trains; returns (result, initial state dict, final state dict)."""
    seed_everything(cfg.train.seed)
    init = JEPAModel(cfg.model, base_dim=features.dim).state_dict()  # same init as train()
    result = train(cfg, out_dir=tmp_path, data=scifact, features=features, progress=False)
    final = torch.load(checkpoint_dirs(tmp_path)[0] / "state.pt", weights_only=False)["model"]
    return result, init, final


def _finite_dev(result) -> dict:
    (last,) = result["history"]
    for key in ("dev_ndcg_at_10", "dev_query_ndcg_at_10", "dev_predictor_ndcg_at_10",
                "dev_recall_at_100", "effective_rank", "pred_error", "train_loss"):
        assert math.isfinite(last[key]), (key, last[key])
    assert 0.3 < last["dev_ndcg_at_10"] <= 1.0
    assert "test" not in result
    return last


def _changed(a, b, prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, f"no parameter under {prefix!r}"
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_asymmetric_trains_separate_projections(tmp_path, scifact_dir, scifact,
                                                scifact_features):
    cfg = _cfg(scifact_dir, **{"model.variant": "asymmetric"})
    result, init, final = _run(tmp_path, scifact, scifact_features, cfg)
    _finite_dev(result)
    # both towers start equal and are trained apart
    assert all(torch.equal(init[f"proj_q.{k}"], init[f"proj_d.{k}"]) for k in
               ("linear.weight", "linear.bias"))
    assert _changed(init, final, "proj_q.") and _changed(init, final, "proj_d.")
    assert not torch.equal(final["proj_q.linear.weight"], final["proj_d.linear.weight"])


def test_bidirectional_trains_both_predictors(tmp_path, scifact_dir, scifact,
                                              scifact_features):
    cfg = _cfg(scifact_dir, **{"model.variant": "bidirectional"})
    result, init, final = _run(tmp_path, scifact, scifact_features, cfg)
    last = _finite_dev(result)
    assert last["train_pred"] > 0
    # with stopgrad, only the d->q half of L_pred reaches predictor_dq: it moving shows that
    # train_pred uses both directions
    assert _changed(init, final, "predictor_dq.")
    assert _changed(init, final, "predictor.")


def test_mlp_projection_trains_its_branch(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"model.projection": "mlp"})
    result, init, final = _run(tmp_path, scifact, scifact_features, cfg)
    _finite_dev(result)
    last_layer = [k for k in init if k.startswith("proj_q.mlp.") and k.endswith("weight")][-1]
    assert not init[last_layer].any()  # zero-initialised residual branch
    assert final[last_layer].any()


def test_euclidean_similarity(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"model.similarity": "euclidean"})
    result, _, final = _run(tmp_path, scifact, scifact_features, cfg)
    last = _finite_dev(result)
    assert last["train_con"] > 0
    assert all(torch.isfinite(v).all() for v in final.values())


def test_mine_hard_negatives_returns_non_relevant_top_docs(scifact, scifact_features):
    from trainables.data import make_splits
    from trainables.evaluate import search

    qrels = make_splits(scifact)["train"]
    k = 3
    negs = mine_hard_negatives(scifact_features, qrels, k, "cosine")
    assert set(negs) == set(qrels)
    doc_ids = set(scifact.corpus)
    for q, docs in negs.items():
        assert len(docs) == k and len(set(docs)) == k
        assert not set(docs) & set(qrels[q])
        assert set(docs) <= doc_ids
    # they are the top-ranked non-relevant documents, in rank order
    q = sorted(qrels)[0]
    _, idx = search(scifact_features.queries([q]), scifact_features.doc_features, k=50)
    ranked = [scifact_features.doc_ids[i] for i in idx[0].tolist()]
    assert negs[q] == [d for d in ranked if d not in qrels[q]][:k]


def test_margin_with_hard_negatives(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"loss.contrastive": "margin", "loss.margin": 0.2,
                               "train.hard_negatives": 3})
    result, init, final = _run(tmp_path, scifact, scifact_features, cfg)
    last = _finite_dev(result)
    assert last["train_con"] > 0
    assert _changed(init, final, "proj_q.")


def test_infonce_hard_negatives_pass_their_ids(tmp_path, scifact_dir, scifact,
                                               scifact_features, monkeypatch):
    """InfoNCE must get the hard negatives' ids, to mask one that is a positive in the batch."""
    import trainables.loop as loop
    from trainables.data import split_for

    calls = []

    class Spy(loop.JEPALoss):
        def forward(self, q, d, pred_d, **kw):
            calls.append(kw)
            return super().forward(q, d, pred_d, **kw)

    monkeypatch.setattr(loop, "JEPALoss", Spy)
    cfg = _cfg(scifact_dir, **{"train.hard_negatives": 2})
    result = train(cfg, out_dir=tmp_path, data=scifact, features=scifact_features,
                   progress=False)
    _finite_dev(result)
    assert len(calls) == 2
    splits = split_for(scifact, cfg.data)
    negatives = mine_hard_negatives(scifact_features, splits["train"], 2, "cosine")
    all_negs = {d for ds in negatives.values() for d in ds}
    for kw in calls:
        ids = kw.get("hard_neg_ids")
        assert ids is not None and len(ids) == len(kw["doc_ids"]) == kw["hard_neg"].shape[0]
        assert set(ids) <= all_negs


def test_sigreg_isotropy(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"loss.isotropy": "sigreg", "loss.lambda_iso": 0.02,
                               "loss.sigreg_slices": 64})
    result, _, _ = _run(tmp_path, scifact, scifact_features, cfg)
    last = _finite_dev(result)
    assert last["train_iso"] > 0 and math.isfinite(last["train_iso"])


def test_std_reg(tmp_path, scifact_dir, scifact, scifact_features):
    cfg = _cfg(scifact_dir, **{"loss.reg": "std", "loss.lambda_reg": 0.1})
    result, _, _ = _run(tmp_path, scifact, scifact_features, cfg)
    last = _finite_dev(result)
    assert last["train_reg"] > 0 and math.isfinite(last["train_reg"])


# -- unfrozen base on a tiny hand-built dataset ---------------------------------------------

TOPICS = ["protein folding", "solar energy", "river ecology", "jazz history", "tax policy",
          "volcano eruptions", "sleep research", "chess openings", "bee colonies",
          "ocean tides"]


def _tiny_beir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "qrels").mkdir()
    with (root / "corpus.jsonl").open("w") as f:
        for i in range(30):
            topic = TOPICS[i % 10]
            f.write(json.dumps({"_id": f"d{i}", "title": topic.title(),
                                "text": f"A short note {i // 10} about {topic}."}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for i in range(12):
            f.write(json.dumps({"_id": f"q{i}", "text": f"what is known about "
                                                        f"{TOPICS[i % 10]}?"}) + "\n")
    header = "query-id\tcorpus-id\tscore\n"
    # queries 0-7 train (two relevant documents each), 8-11 test
    train = "".join(f"q{i}\td{i % 10 + 10 * j}\t1\n" for i in range(8) for j in range(2))
    test = "".join(f"q{i}\td{i % 10}\t1\n" for i in range(8, 12))
    (root / "qrels" / "train.tsv").write_text(header + train)
    (root / "qrels" / "test.tsv").write_text(header + test)
    return root


def test_unfrozen_base_trains(tmp_path, monkeypatch):
    from trainables.data import load_beir
    from trainables.model import load_base

    monkeypatch.setenv("JEPA_STUDY_CACHE", str(tmp_path / "cache"))
    data = load_beir(_tiny_beir(tmp_path / "beir"))
    cfg = RunConfig().with_overrides({
        "model.freeze_base": False, "model.max_seq_length": 32, "model.output_dim": 64,
        "train.batch_size": 4, "train.epochs": 1, "train.warmup_ratio": 0.0,
        "data.dev_fraction": 0.25, "loss.lambda_pred": 1.0, "loss.lambda_con": 1.0,
        "eval.evaluate_test": True, "eval.batch_size": 16,
    })
    before = {f"base_q.{k}": v.clone()
              for k, v in load_base(cfg.model.base_model, 32).state_dict().items()}
    out = tmp_path / "run"
    result = train(cfg, out_dir=out, data=data, progress=False)

    (last,) = result["history"]
    assert last["train_loss"] > 0
    for key in ("dev_ndcg_at_10", "dev_predictor_ndcg_at_10", "effective_rank", "pred_error"):
        assert math.isfinite(last[key]), key
    assert math.isfinite(result["test"]["test_ndcg_at_10"])
    assert 0 <= result["test"]["test_ndcg_at_10"] <= 1

    after = torch.load(checkpoint_dirs(out)[0] / "state.pt", weights_only=False)["model"]
    layer = [k for k in before if "encoder.layer.0." in k and k.endswith("query.weight")]
    assert layer, sorted(before)[:5]
    assert all(k in after for k in layer)
    assert not torch.equal(before[layer[0]], after[layer[0]])
    # no frozen-base feature cache was built for the tiny data
    assert not (tmp_path / "cache").exists()


def test_autocast_policy():
    """bf16 on CUDA; on a CPU only for a trained base on a core with native bf16."""
    from trainables import loop

    unfrozen = RunConfig().with_overrides({"model.freeze_base": False})
    frozen = RunConfig()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.autocast_device(frozen, cuda) == "cuda"
    assert loop.autocast_device(unfrozen.with_overrides({"train.amp": False}), cuda) is None
    assert loop.autocast_device(frozen, cpu) is None
    native = loop.cpu_has_native_bf16()
    assert loop.autocast_device(unfrozen, cpu) == ("cpu" if native else None)
    assert loop.autocast_device(unfrozen.with_overrides({"train.amp": False}), cpu) is None


@pytest.mark.parametrize("amp", [True, False])
def test_unfrozen_base_forward_precision_follows_amp(tmp_path, monkeypatch, amp):
    """With ``train.amp`` the base's matmuls run in bf16 on a bf16 CPU; the loss stays fp32."""
    from trainables import loop
    from trainables.data import load_beir

    monkeypatch.setenv("JEPA_STUDY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)  # the policy's CPU probe
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}  # grad on: training
    real_load_base = loop.load_base

    def load_base_watched(*args, **kwargs):
        base = real_load_base(*args, **kwargs)
        first = next(m for m in base.modules() if isinstance(m, torch.nn.Linear))
        first.register_forward_hook(
            lambda m, i, o: seen[torch.is_grad_enabled()].add(o.dtype))
        return base

    monkeypatch.setattr(loop, "load_base", load_base_watched)
    data = load_beir(_tiny_beir(tmp_path / "beir"))
    cfg = RunConfig().with_overrides({
        "model.freeze_base": False, "model.max_seq_length": 32, "model.output_dim": 64,
        "train.batch_size": 4, "train.epochs": 1, "train.amp": amp,
        "data.dev_fraction": 0.25, "loss.lambda_pred": 1.0, "loss.lambda_con": 1.0,
        "loss.lambda_iso": 0.1, "loss.isotropy": "sigreg"})
    result = train(cfg, out_dir=tmp_path / "run", data=data, progress=False)
    (last,) = result["history"]
    assert seen[True] == ({torch.bfloat16} if amp else {torch.float32})
    assert seen[False] == {torch.float32}  # evaluation encodes in fp32 either way
    assert math.isfinite(last["train_loss"]) and last["train_loss"] > 0
    assert math.isfinite(last["dev_ndcg_at_10"])
