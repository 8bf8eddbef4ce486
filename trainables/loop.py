"""One training run, top to bottom: data, model, phases, epochs, checkpoints, evaluation.

The loop knows nothing of Ray or MLflow. After every epoch it calls ``callback(metrics,
checkpoint_dir)``, after writing a checkpoint on the first and last epoch and otherwise at
most every ``checkpoint_interval_s`` seconds (0, the default: every epoch; ``checkpoint_dir``
is None for an epoch without one); ``jepa-study train`` passes a callback that prints, a
Ray trial passes one that reports to Tune. When ``torch.distributed`` is initialised (Ray
Train sets it up) the model is wrapped in DDP and each rank takes its share of every batch
order; rank 0 writes checkpoints.

Reproducibility: the batch order of epoch ``e`` comes from its own generator seeded with
(seed, e), and the checkpoint holds the global RNG states, so a run resumed from epoch k ends
with the same metrics as an uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from trainables.cache import FeatureTables, load_or_compute
from trainables.config import LossConfig, PhaseConfig, RunConfig
from trainables.data import BeirData, load_beir, make_splits, resolve_data_dir
from trainables.evaluate import embed_corpus, evaluate_model, retrieval_metrics
from trainables.losses import JEPALoss
from trainables.model import JEPAModel, load_base

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any], "Path | None"], None]
KEEP_CHECKPOINTS = 3


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; ``reason`` says where."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- small pure helpers --------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def phase_loss(cfg: RunConfig, phase: PhaseConfig) -> LossConfig:
    return LossConfig.model_validate({**cfg.loss.model_dump(), **phase.loss})


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        try:
            import ray.train.torch  # noqa: F401  (only to find Ray's chosen device)
            return ray.train.torch.get_device()
        except Exception:
            return torch.device("cuda")
    return torch.device("cpu")


# -- data ----------------------------------------------------------------------------------

def training_pairs(qrels: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """(query, positive document) pairs, in a fixed order."""
    return sorted((q, d) for q, docs in qrels.items() for d, rel in docs.items() if rel > 0)


def mine_hard_negatives(features: FeatureTables, qrels: dict[str, dict[str, int]], k: int,
                        similarity: str, **search_kw) -> dict[str, list[str]]:
    """Top-``k`` documents by the base encoder that are not judged relevant, per query."""
    from trainables.evaluate import search

    qids = sorted(qrels)
    _, idx = search(features.queries(qids), features.doc_features, similarity, k=k + 20,
                    **search_kw)
    out = {}
    for row, q in enumerate(qids):
        ranked = [features.doc_ids[i] for i in idx[row].tolist()]
        out[q] = [d for d in ranked if d not in qrels[q]][:k]
    return out


class _Batches:
    """Turns (query, doc[, negative]) id triples into model inputs: features or texts."""

    def __init__(self, data: BeirData, features: FeatureTables | None, device: torch.device):
        self.data, self.features, self.device = data, features, device

    def queries(self, ids: list[str]):
        if self.features is not None:
            return self.features.queries(ids).to(self.device)
        return [self.data.queries[i] for i in ids]

    def docs(self, ids: list[str]):
        if self.features is not None:
            return self.features.docs(ids).to(self.device)
        return [self.data.doc_text(i) for i in ids]


# -- checkpoints ---------------------------------------------------------------------------

def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Checkpoint directories under ``out_dir``, newest first."""
    return sorted((out_dir / "checkpoints").glob("epoch_*"), reverse=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state, or None (with a warning) when it is missing or corrupt."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated file, bad pickle, missing file
        log.warning("checkpoint %s is unreadable (%s); trying an older one", path, exc)
        return None


def latest_valid_checkpoint(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    for path in checkpoint_dirs(out_dir):
        state = load_checkpoint(path)
        if state is not None:
            return path, state
    return None


def save_checkpoint(out_dir: Path, epoch: int, state: dict[str, Any], cfg: RunConfig) -> Path:
    final = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    cfg.to_yaml(tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(out_dir)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- the run -------------------------------------------------------------------------------

def search_options(cfg: RunConfig) -> dict[str, Any]:
    """The config's choice of search backend, as keyword arguments of ``evaluate.search``."""
    return {"faiss_min_docs": cfg.eval.faiss_min_docs, "faiss_index": cfg.eval.faiss_index}


def prepare(cfg: RunConfig, data: BeirData | None = None,
            features: FeatureTables | None = None, progress: bool = True,
            device: torch.device | None = None):
    """Loads the data, its splits and (frozen base, or hard negatives) the cached features;
    a cold feature cache is filled by encoding on ``device`` (the GPU when there is one)."""
    device = device or _device()
    if data is None:
        data = load_beir(resolve_data_dir(cfg.data.path))
    splits = make_splits(data, train=cfg.data.train_split, dev=cfg.data.dev_split,
                         test=cfg.data.test_split, dev_fraction=cfg.data.dev_fraction,
                         seed=cfg.data.split_seed)
    if features is None and (cfg.model.freeze_base or cfg.train.hard_negatives):
        features = load_or_compute(data, cfg.model.base_model, cfg.model.max_seq_length,
                                   progress=progress, device=str(device))
    if features is not None:  # torch tensors on the run's device (a study ships numpy)
        features = features.to(device)
    return data, splits, features


def train(cfg: RunConfig, *, out_dir: Path, callback: EpochCallback | None = None,
          resume_from: Path | None = None, data: BeirData | None = None,
          features: FeatureTables | None = None, progress: bool = True,
          checkpoint_interval_s: float = 0.0) -> dict[str, Any]:
    """Trains one model and returns ``{"history": [...], "final": {...}, "test": {...}}``.

    Args:
        cfg: the validated run config.
        out_dir: where checkpoints, ``metrics.json`` and ``config.yaml`` go.
        callback: called after each epoch with its metrics and its checkpoint directory.
        resume_from: a checkpoint directory to continue from; when None, the newest valid
            checkpoint under ``out_dir`` is used if there is one.
        data, features: already loaded dataset / base features (the study shares them).
        checkpoint_interval_s: least seconds between two checkpoints besides the first and
            last epoch's (a checkpoint of a frozen-base run is ~15 MB; a resumed run redoes
            at most this much training, with the same results).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    device = _device()
    seed_everything(cfg.train.seed)

    # -- DATA
    # features land on the device once (a few MB), not as a host copy per batch
    data, splits, features = prepare(cfg, data, features, progress and rank == 0, device)
    pairs = training_pairs(splits["train"])
    negatives = (mine_hard_negatives(features, splits["train"], cfg.train.hard_negatives,
                                     cfg.model.similarity, **search_options(cfg))
                 if cfg.train.hard_negatives else None)
    cached = cfg.model.freeze_base
    batches = _Batches(data, features if cached else None, device)

    # -- MODEL
    base = None if cached else load_base(cfg.model.base_model, cfg.model.max_seq_length,
                                         device)
    model = JEPAModel(cfg.model, base, base_dim=features.dim if cached else None).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    amp = autocast_device(cfg, device)

    # -- RESUME
    found = ((resume_from, load_checkpoint(Path(resume_from))) if resume_from
             else latest_valid_checkpoint(out_dir))
    state = found[1] if found else None
    if found and state is None:
        raise RuntimeError(f"cannot resume: checkpoint {found[0]} is unreadable")
    history: list[dict[str, Any]] = state["history"] if state else []
    if state:
        model.load_state_dict(state["model"])
        log.info("resuming from %s (epoch %d)", found[0], state["epoch"])

    # -- PHASES
    epoch = 0
    step = state["step"] if state else 0
    saved_at = -math.inf  # monotonic time of the last checkpoint
    phases = cfg.train.resolved_phases()
    for phase_index, phase in enumerate(phases):
        if state and phase_index < state["phase_index"]:
            epoch += phase.epochs
            continue
        loss_cfg = phase_loss(cfg, phase)
        criterion = JEPALoss(loss_cfg, cfg.model.similarity)
        optimizer = _optimizer(model, cfg, phase)
        steps_per_epoch = _steps_per_epoch(len(pairs), cfg, world)
        total = steps_per_epoch * phase.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, int(cfg.train.warmup_ratio * total)))
        first = 0
        if state and phase_index == state["phase_index"]:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            first = state["epoch_in_phase"]
            _set_rng_state(state["rng"])
            state = None  # consumed
        epoch += first
        for epoch_in_phase in range(first, phase.epochs):
            epoch += 1
            t0 = time.perf_counter()
            train_parts, step = _train_epoch(
                net, model, criterion, optimizer, scheduler, batches, pairs, negatives,
                cfg, epoch, step, rank, world, amp, progress and rank == 0)
            metrics = {"epoch": epoch, "phase_index": phase_index, "phase": phase.name,
                       "world_size": world,
                       **{f"train_{k}": v for k, v in train_parts.items()},
                       "lr": scheduler.get_last_lr()[-1]}
            metrics.update(_evaluate(model, batches, data, features, splits["dev"], cfg, "dev"))
            metrics["epoch_time_s"] = time.perf_counter() - t0
            last_epoch = phase_index == len(phases) - 1 and epoch_in_phase == phase.epochs - 1
            if last_epoch and cfg.eval.evaluate_test:
                # The final report's test figures travel with the last epoch (to Tune and
                # MLflow); the search only ever reads dev metrics.
                metrics.update(_evaluate(model, batches, data, features, splits["test"], cfg,
                                         "test"))
            history.append(metrics)
            ckpt = None
            if (epoch == cfg.train.total_epochs
                    or time.monotonic() - saved_at >= checkpoint_interval_s):
                saved_at = time.monotonic()
                ckpt = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
                if rank == 0:
                    ckpt = save_checkpoint(out_dir, epoch, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                        "phase_index": phase_index, "epoch_in_phase": epoch_in_phase + 1,
                        "rng": _rng_state(), "history": history, "config": cfg.to_dict()}, cfg)
            if callback is not None:
                callback(dict(metrics), ckpt)

    # -- FINAL REPORT
    result: dict[str, Any] = {"history": history, "final": history[-1] if history else {}}
    if history:
        best = max(history, key=lambda m: m["dev_ndcg_at_10"])
        result["best_dev_ndcg_at_10"] = best["dev_ndcg_at_10"]
        result["best_epoch"] = best["epoch"]
    if cfg.eval.evaluate_test:
        result["test"] = {k: v for k, v in result["final"].items() if k.startswith("test_")} \
            or _evaluate(model, batches, data, features, splits["test"], cfg, "test")
    if rank == 0:
        cfg.to_yaml(out_dir / "config.yaml")
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def _optimizer(model: JEPAModel, cfg: RunConfig, phase: PhaseConfig) -> torch.optim.Optimizer:
    """AdamW over what this phase trains; everything else gets ``requires_grad=False``."""
    lr = phase.lr or cfg.train.lr
    trains = {"predictor_only": ("predictor",), "isotropy_finetune": ("encoder", "base"),
              "joint": ("predictor", "encoder", "base")}[phase.name]
    groups = {"base": (model.base_parameters(), cfg.train.lr_base),
              "encoder": (model.encoder_parameters(), lr),
              "predictor": (model.predictor_parameters(), lr)}
    param_groups = []
    for name, (params, group_lr) in groups.items():
        on = name in trains and not (name == "base" and cfg.model.freeze_base)
        for p in params:
            p.requires_grad_(on)
        if on and params:
            param_groups.append({"params": params, "lr": group_lr, "name": name})
    return torch.optim.AdamW(param_groups, weight_decay=cfg.train.weight_decay)


def _steps_per_epoch(n_pairs: int, cfg: RunConfig, world: int) -> int:
    steps = max(1, n_pairs // (cfg.train.batch_size * world))
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return steps


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume emulated (slower) bf16
        return False


def autocast_device(cfg: RunConfig, device: torch.device) -> str | None:
    """The device type whose bf16 autocast wraps the training forward, or None for fp32.

    With ``train.amp``: always on CUDA. On a CPU only when the base encoder runs in the step
    (an unfrozen base: its matmuls are the step's cost, ~1.5x faster in bf16 on an
    AVX512-BF16 core, `benchmarks/RESULTS.md` figure 5) and the CPU has native bf16;
    elsewhere CPU bf16 is emulated and slower, and the cached-feature path trains small heads
    where it gains nothing. Weights, optimiser state, the loss and evaluation stay fp32.
    """
    if not cfg.train.amp:
        return None
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu" and not cfg.model.freeze_base and cpu_has_native_bf16():
        return "cpu"
    return None


def _train_epoch(net, model, criterion, optimizer, scheduler, batches, pairs, negatives,
                 cfg, epoch, step, rank, world, amp, progress):
    """One pass over this rank's share of the pairs; returns mean loss parts and the step.

    ``amp`` is the device type whose bf16 autocast wraps the forward (None: fp32); the loss
    is computed outside it, in fp32, from the outputs cast back.
    """
    order = epoch_order(len(pairs), cfg.train.seed, epoch)[rank::world]
    bs = cfg.train.batch_size
    n_steps = _steps_per_epoch(len(pairs), cfg, world)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    rng = random.Random(cfg.train.seed * 7919 + epoch)
    net.train()
    iterator = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"epoch {epoch}", leave=False)
    for i in iterator:
        chunk = [pairs[j] for j in order[i * bs:(i + 1) * bs]]
        qids, dids = [c[0] for c in chunk], [c[1] for c in chunk]
        neg_inputs = neg_ids = None
        if negatives is not None:
            neg_ids = [rng.choice(negatives[q]) if negatives[q] else d for q, d in chunk]
            neg_inputs = batches.docs(neg_ids)
        # Step 1. Forward
        with torch.autocast(amp or "cpu", dtype=torch.bfloat16, enabled=amp is not None):
            out = net(batches.queries(qids), batches.docs(dids), neg_inputs)
        total, parts = criterion(out["q"].float(), out["d"].float(), out["pred_d"].float(),
                                 pred_q=out["pred_q"].float() if "pred_q" in out else None,
                                 hard_neg=out["neg"].float() if "neg" in out else None,
                                 doc_ids=dids, hard_neg_ids=neg_ids, step=step)
        # One device-to-host copy per step (on CUDA, the step's only sync): the divergence
        # flag, summed over ranks so that every rank stops together (or the others hang at
        # the next collective), and this rank's loss parts.
        bad = (~torch.isfinite(total.detach())).float().reshape(1)
        if world > 1:
            dist.all_reduce(bad)
        host = torch.cat([bad, torch.stack([v.float() for v in parts.values()])]).tolist()
        values = dict(zip(parts, host[1:]))
        if host[0] > 0:
            detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise TrainingDiverged(f"non-finite loss at epoch {epoch}, step {step}: {detail}")
        # Step 2. Backward & step
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    return {("loss" if k == "total" else k): v / n_steps for k, v in sums.items()}, step


def _evaluate(model, batches, data, features, qrels, cfg, split: str) -> dict[str, float]:
    """Scores one split; the headline ``<split>_<metric>`` follows ``eval.score_with``."""
    doc_ids = features.doc_ids if features is not None else data.doc_ids
    was = model.training
    model.eval()
    doc_emb = embed_corpus(model, batches.docs(doc_ids), cfg.eval.batch_size)
    model.train(was)
    qids = sorted(qrels)
    dev = split == "dev"  # diagnostics are per-epoch dev figures; test rows stay lean
    raw = evaluate_model(model, query_ids=qids, query_inputs=batches.queries(qids),
                         doc_ids=doc_ids, doc_emb=doc_emb, qrels=qrels,
                         similarity=cfg.model.similarity, batch_size=cfg.eval.batch_size,
                         diagnostics=dev, **search_options(cfg))
    out = {f"{split}_{k}" if k.startswith(("query_", "predictor_")) else k: v
           for k, v in raw.items()}
    for name in ("ndcg_at_10", "recall_at_100", "mrr_at_10"):
        out[f"{split}_{name}"] = raw[f"{cfg.eval.score_with}_{name}"]
    return out if dev else {k: v for k, v in out.items() if k.startswith(split)}


def zero_shot(cfg: RunConfig, split: str = "test", data: BeirData | None = None,
              features: FeatureTables | None = None) -> dict[str, float]:
    """The base encoder alone (cosine on its pooled output): every result's reference row."""
    data, splits, features = prepare(cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"freeze_base": True})}), data, features)
    qrels = splits[split]
    qids = sorted(qrels)
    return retrieval_metrics(qids, features.queries(qids), features.doc_ids,
                             features.doc_features, qrels, "cosine", **search_options(cfg))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
