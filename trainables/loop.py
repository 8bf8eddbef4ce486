"""One training run, top to bottom: data, model, phases, epochs, checkpoints, evaluation.

Budget and selection: a run trains up to its schedule's last epoch, evaluates dev after
every epoch, keeps the weights of its best dev epoch (the headline dev nDCG@10; with
``eval.score_with: auto`` the better of query and predictor scoring, a choice made on dev)
and reports that epoch's dev figures as final. ``train.patience`` ends it once dev has
stopped improving. The best epoch's weights are kept on disk as they change (``best/``:
the heads only with a frozen base), so that whatever ends the run, test is scored from them
where it is reported: once at the end of the run (``eval.evaluate_test``; a study's trials
turn it off, and the study scores its best trials' kept weights with :func:`score_kept`).
Every dev and test figure comes with its seen/unseen split (``trainables.subsets``).

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

import itertools
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from trainables.cache import FeatureTables, load_or_compute
from trainables.config import PhaseConfig, RunConfig
from trainables.data import BeirData, load_beir, resolve_data_dir, split_for
from trainables.evaluate import (METRIC_NAMES, embed_corpus, evaluate_model_per_query,
                                 retrieval_per_query, mean_metrics)
from trainables.losses import JEPALoss
from trainables.model import JEPAModel, load_base
from trainables.subsets import seen_queries, subset_figures, subset_ids

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any], "Path | None"], None]
KEEP_CHECKPOINTS = 3
#: the best epoch's test figures: means, seen/unseen subsets, and every query's nDCG@10 under
#: both scorings (and on each transfer set), written beside the run's outputs when test is scored
PER_QUERY_FILE = "per_query.json"
#: the best dev epoch's weights (``model.pt``), its figures (``best.json``) and the config
BEST_DIR = "best"


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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU (a caller that placed the run, e.g. a Ray
    Train worker, passes its own device instead)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- data ----------------------------------------------------------------------------------

def training_pairs(qrels: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """(query, positive document) pairs, in a fixed order."""
    return sorted((q, d) for q, docs in qrels.items() for d, rel in docs.items() if rel > 0)


class EpochSampler:
    """The (query, positive) pairs of each epoch, in training order.

    ``pairs``: every pair once an epoch. ``queries``: every query once, with one of its
    positives drawn by a generator seeded with (seed, epoch): an epoch costs as many steps per
    query whatever the number of positives per query, and over epochs every positive is seen.
    The grouping is done once, so an epoch costs a shuffle (NFCorpus: 110k pairs, 2.6k
    queries).
    """

    def __init__(self, pairs: list[tuple[str, str]], sampling: str, seed: int):
        if sampling not in ("pairs", "queries"):
            raise ValueError(f"unknown train.sampling {sampling!r} (pairs, queries)")
        self.pairs, self.sampling, self.seed = pairs, sampling, seed
        self.groups = [(q, [d for _, d in grp]) for q, grp in
                       itertools.groupby(sorted(pairs), key=lambda p: p[0])]

    def __len__(self) -> int:
        return len(self.groups) if self.sampling == "queries" else len(self.pairs)

    def items(self, epoch: int) -> list[tuple[str, str]]:
        if self.sampling == "queries":
            rng = random.Random(self.seed * 1_000_033 + epoch)
            items = [(q, rng.choice(docs)) for q, docs in self.groups]
        else:
            items = self.pairs
        return [items[i] for i in epoch_order(len(items), self.seed, epoch)]


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
    """Writes epoch ``epoch``'s checkpoint into the run's ``checkpoints`` directory, which
    :func:`train` made before its first epoch and is never made again: once it is gone, the run was
    ended from outside and its checkpoints deleted (a Ray Train worker of a trial Tune
    stopped trains on until its group is removed), and a copy written now would be left
    behind. Raises ``FileNotFoundError`` instead."""
    final = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except FileNotFoundError:
        raise FileNotFoundError(f"{final.parent} is gone: this run was ended and its "
                                f"checkpoints deleted; epoch {epoch} is not saved") from None
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
    device = device or default_device()
    if data is None:
        data = load_beir(resolve_data_dir(cfg.data.path))
    splits = split_for(data, cfg.data)
    if features is None and (cfg.model.freeze_base or cfg.train.hard_negatives):
        features = load_or_compute(data, cfg.model.base_model, cfg.model.max_seq_length,
                                   progress=progress, device=str(device))
    if cfg.data.pairs != "qrels":
        data, splits, features = with_corpus_pairs(cfg, data, splits, features, device,
                                                   progress)
    if features is not None:  # torch tensors on the run's device (a study ships numpy)
        features = features.to(device)
    return data, splits, features


#: spans per document whose features are encoded at least, so that runs asking for fewer
#: (a study searching ``spans_per_doc``) share one cached encoding
COVER_SPANS = 2


def with_corpus_pairs(cfg: RunConfig, data: BeirData, splits: dict[str, Any],
                      features: FeatureTables | None, device: torch.device | str = "cpu",
                      progress: bool = False):
    """Training pairs made from the corpus alone (``data.pairs`` corpus or both).

    ``splits["fit"]`` becomes the pairs the run trains on: the corpus pairs of
    ``data.corpus_pairs`` (with ``both``, plus the labelled train pairs); with ``dev_mode:
    corpus_pairs`` a held-out share of the documents (``dev_doc_fraction``, ``split_seed``)
    gives no training pair and its titles and first spans are dev. The labelled train split
    stays ``splits["train"]``: it defines the seen and unseen test queries, so that figures
    compare across training modes. ``data`` gains the pseudo-queries' texts (a trained
    base encodes them), ``features`` their cached base features (a frozen base reads them).
    No qrels are read here.
    """
    import dataclasses

    from trainables.cache import load_or_compute_texts
    from trainables.pairs import KINDS, CorpusPairSettings, make_corpus_pairs, split_documents

    c = cfg.data.corpus_pairs
    settings = CorpusPairSettings(kinds=tuple(c.kinds), spans_per_doc=c.spans_per_doc,
                                  span_min_words=c.span_min_words,
                                  span_max_words=c.span_max_words, seed=c.seed)
    kept, held = list(data.doc_ids), []
    if cfg.data.dev_mode == "corpus_pairs":
        kept, held = split_documents(data.doc_ids, cfg.data.dev_doc_fraction,
                                     cfg.data.split_seed)
    fit = make_corpus_pairs(data.corpus, settings, kept)
    splits = dict(splits)
    splits["fit"] = dict(fit.qrels)
    if cfg.data.pairs == "both":
        splits["fit"].update(splits["train"])
    texts = dict(fit.queries)
    if held:  # a fixed dev, whatever kinds and spans a run trains on
        dev = make_corpus_pairs(data.corpus, dataclasses.replace(
            settings, kinds=KINDS, spans_per_doc=1), held)
        splits["dev"] = dev.qrels
        texts.update(dev.queries)
    if not splits["fit"]:
        raise ValueError(f"data.corpus_pairs {settings.key()} makes no training pair from "
                         f"{data.root}: no titles or texts to cut spans from")
    if features is not None:
        cover = dataclasses.replace(settings, kinds=KINDS,
                                    spans_per_doc=max(settings.spans_per_doc, COVER_SPANS))
        every = make_corpus_pairs(data.corpus, cover)
        ids, feats = load_or_compute_texts(
            f"{data.root.name}/corpus-pairs", every.queries, cfg.model.base_model,
            cfg.model.max_seq_length, key_extra=f"data={data.fingerprint()};{cover.key()}",
            device=str(device), progress=progress, as_numpy=isinstance(
                features.query_features, np.ndarray))
        features = features.with_queries(ids, feats)
    data = dataclasses.replace(data, queries={**data.queries, **texts})
    return data, splits, features


def train(cfg: RunConfig, *, out_dir: Path, callback: EpochCallback | None = None,
          resume_from: Path | None = None, data: BeirData | None = None,
          features: FeatureTables | None = None, progress: bool = True,
          checkpoint_interval_s: float = 0.0,
          device: torch.device | str | None = None) -> dict[str, Any]:
    """Trains one model; returns its history and the figures of its best dev epoch.

    Returns:
        ``{"history": [per-epoch metrics], "best_epoch", "best_dev_ndcg_at_10",
        "score_with" (the best epoch's scoring: query or predictor), "end_reason",
        "final": the best epoch's metrics (dev, with its seen/unseen subsets)}``, and with
        ``eval.evaluate_test`` the best epoch's weights scored on test once, at the end:
        ``"test"`` (means, ``test_seen_*``/``test_unseen_*`` and counts, transfer sets'
        ``test_<name>_*``), ``"test_per_query": {"query"|"predictor": {qid: nDCG@10}}``,
        ``"transfer_per_query"`` and ``"subsets": {"test": {"seen": [qids], "unseen":
        [qids]}}`` (see :func:`score_best`).

    Args:
        cfg: the validated run config.
        out_dir: where checkpoints, ``metrics.json`` and ``config.yaml`` go.
        callback: called after each epoch with its metrics and its checkpoint directory.
        resume_from: a checkpoint directory to continue from; when None, the newest valid
            checkpoint under ``out_dir`` is used if there is one.
        data, features: already loaded dataset / base features (the study shares them).
        checkpoint_interval_s: least seconds between two checkpoints besides the first and
            last epoch's (a checkpoint of a frozen-base run is ~30 MB with its best
            weights; a resumed run redoes at most this much training, with the same results).
        device: where to train (default: :func:`default_device`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    device = torch.device(device) if device is not None else default_device()
    seed_everything(cfg.train.seed)

    # -- DATA
    # features land on the device once (a few MB), not as a host copy per batch
    data, splits, features = prepare(cfg, data, features, progress and rank == 0, device)
    fit = splits.get("fit", splits["train"])  # corpus pairs (data.pairs), else train qrels
    pairs = training_pairs(fit)
    relevant = {q: {d for d, rel in docs.items() if rel > 0} for q, docs in fit.items()}
    negatives = (mine_hard_negatives(features, fit, cfg.train.hard_negatives,
                                     cfg.model.similarity, **search_options(cfg))
                 if cfg.train.hard_negatives else None)
    cached = cfg.model.freeze_base
    batches = _Batches(data, features if cached else None, device)
    sampler = EpochSampler(pairs, cfg.train.sampling, cfg.train.seed)
    seen_dev = seen_queries(splits["dev"], splits["train"])

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
    select = _Selection(cfg)

    # -- RESUME
    found = ((resume_from, load_checkpoint(Path(resume_from))) if resume_from
             else latest_valid_checkpoint(out_dir))
    state = found[1] if found else None
    if found and state is None:
        raise RuntimeError(f"cannot resume: checkpoint {found[0]} is unreadable")
    if state is None and rank == 0:  # a fresh run: nothing kept from another one
        shutil.rmtree(out_dir / BEST_DIR, ignore_errors=True)
    history: list[dict[str, Any]] = state["history"] if state else []
    if state:
        model.load_state_dict(state["model"])
        select.load_state_dict(state.get("selection"))
        log.info("resuming from %s (epoch %d)", found[0], state["epoch"])
        kept = load_best(out_dir) if rank == 0 and select.best else None
        if select.best and rank == 0 and (kept is None or kept[1]["epoch"] != select.best["epoch"]):
            save_best(out_dir, select.best, cfg)  # the kept weights follow the checkpoint
    ended = bool(state and state.get("ended"))
    if rank == 0:  # the only one that writes checkpoints: made here, never again
        (out_dir / "checkpoints").mkdir(exist_ok=True)

    # -- PHASES
    epoch = 0
    step = state["step"] if state else 0
    saved_at = -math.inf  # monotonic time of the last checkpoint
    phases = cfg.train.resolved_phases()
    for phase_index, phase in enumerate(phases):
        if ended:
            break
        if state and phase_index < state["phase_index"]:
            epoch += phase.epochs
            continue
        criterion = JEPALoss(cfg.phase_loss(phase), cfg.model.similarity)
        optimizer = _optimizer(model, cfg, phase)
        steps_per_epoch = _steps_per_epoch(len(sampler), cfg, world)
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
                net, model, criterion, optimizer, scheduler, batches, sampler.items(epoch),
                relevant,
                negatives, cfg, epoch, step, rank, world, amp, progress and rank == 0)
            metrics = {"epoch": epoch, "phase_index": phase_index, "phase": phase.name,
                       "world_size": world,
                       **{f"train_{k}": v for k, v in train_parts.items()},
                       "lr": scheduler.get_last_lr()[-1]}
            # -- EVALUATE: dev every epoch (test never: it is scored once, at the end)
            doc_emb = _embed_docs(model, batches, data, features, cfg)
            metrics.update(_evaluate(model, batches, doc_emb, data, features, splits["dev"],
                                     cfg, "dev", select.mode_of, seen=seen_dev))
            improved = select.update(epoch, metrics, model)
            if improved and rank == 0:  # on disk at once: a run stopped from outside keeps it
                save_best(out_dir, select.best, cfg)
            metrics.update(select.summary())
            metrics["epoch_time_s"] = time.perf_counter() - t0
            reason = select.end_reason(epoch, cfg)
            ended = reason is not None
            metrics["end_reason"] = reason or ""
            if improved:
                select.best["metrics"] = dict(metrics)
            history.append(metrics)
            ckpt = None
            if ended or time.monotonic() - saved_at >= checkpoint_interval_s:
                saved_at = time.monotonic()
                ckpt = out_dir / "checkpoints" / f"epoch_{epoch:04d}"
                if rank == 0:
                    ckpt = save_checkpoint(out_dir, epoch, {
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                        "phase_index": phase_index, "epoch_in_phase": epoch_in_phase + 1,
                        "rng": _rng_state(), "history": history, "ended": ended,
                        "selection": select.state_dict(), "config": cfg.to_dict()}, cfg)
            if callback is not None:
                callback(dict(metrics), ckpt)
            if ended:
                break

    # -- FINAL REPORT: the best dev epoch's figures; test scored once, from its weights
    best = select.best
    result: dict[str, Any] = {"history": history}
    if best is not None:
        result.update(best_epoch=best["epoch"], best_dev_ndcg_at_10=best["value"],
                      score_with=best["mode"], end_reason=history[-1].get("end_reason", ""),
                      final=best["metrics"])
        if cfg.eval.evaluate_test:
            model.load_state_dict(best["model"])
            result.update(score_best(model, cfg, best, data=data, splits=splits,
                                     features=features, batches=batches, device=device,
                                     progress=progress and rank == 0,
                                     out_dir=out_dir if rank == 0 else None))
    if rank == 0:
        cfg.to_yaml(out_dir / "config.yaml")
        _write_json(out_dir / "metrics.json", result)
    return result


# -- the best epoch: kept on disk, scored on test where it is reported ---------------------

def save_best(out_dir: Path, best: dict[str, Any], cfg: RunConfig) -> Path:
    """Keeps the best epoch in ``<out_dir>/best``: ``model.pt`` (its weights and figures, one
    file replaced whole: a stop at any moment leaves the old best or the new one, never a
    mix), ``best.json`` (the figures, to read) and the run's ``config.yaml`` (written once).
    With a frozen base the weights are the heads only (the model holds no base)."""
    folder = Path(out_dir) / BEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    info = {k: v for k, v in best.items() if k not in ("model", "metrics")}
    tmp = folder / "model.pt.tmp"
    torch.save({"info": info, "model": best["model"]}, tmp)
    tmp.replace(folder / "model.pt")
    _write_json(folder / "best.json", info)
    if not (folder / "config.yaml").exists():
        cfg.to_yaml(folder / "config.yaml.tmp")
        (folder / "config.yaml.tmp").replace(folder / "config.yaml")
    return folder


def load_best(out_dir: Path) -> tuple[RunConfig, dict[str, Any], dict[str, Any]] | None:
    """``(config, the best epoch's figures, weights)`` kept by :func:`save_best` under
    ``out_dir``, or None when the run kept none (it never finished an epoch, or predates
    kept weights)."""
    path = Path(out_dir) / BEST_DIR
    if not (path / "model.pt").exists() or not (path / "config.yaml").exists():
        return None
    kept = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    return RunConfig.from_yaml(path / "config.yaml"), kept["info"], kept["model"]


def score_best(model: JEPAModel, cfg: RunConfig, best: dict[str, Any], *, data: BeirData,
               splits: dict[str, Any], features: FeatureTables | None,
               batches: "_Batches | None" = None, device: torch.device | None = None,
               progress: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
    """Scores ``model`` (holding the best epoch's weights) on test with the scoring dev
    chose, and each ``eval.extra_data`` collection's test split zero-shot (transfer).

    Returns ``{"test": {test_*, test_seen_*, test_unseen_*, test_n_*, test_<x>_*},
    "test_per_query", "transfer_per_query", "subsets"}``; with ``out_dir`` also writes them
    as :data:`PER_QUERY_FILE` there (with the best epoch and its scoring).
    """
    device = device or next(iter(model.parameters())).device
    batches = batches or _Batches(data, features if cfg.model.freeze_base else None, device)
    chosen = lambda _: best["mode"]  # noqa: E731 - dev's choice of scoring, never test's
    seen = seen_queries(splits["test"], splits["train"])
    doc_emb = _embed_docs(model, batches, data, features if cfg.model.freeze_base else None, cfg)
    test, per_query = _evaluate(model, batches, doc_emb, data,
                                features if cfg.model.freeze_base else None, splits["test"],
                                cfg, "test", chosen, per_query=True, seen=seen)
    transfer = {}
    for path in cfg.eval.extra_data:  # other collections: no train positives, all unseen
        x = _transfer_set(path, cfg, device, progress)
        x_emb = _embed_docs(model, x.batches, x.data, x.features, cfg)
        x_test, transfer[x.name] = _evaluate(model, x.batches, x_emb, x.data, x.features,
                                             x.qrels, cfg, f"test_{x.name}", chosen,
                                             per_query=True)
        test.update(x_test)
    out = {"test": test, "test_per_query": per_query, "subsets": {"test": subset_ids(seen)}}
    if transfer:
        out["transfer_per_query"] = transfer
    if out_dir is not None:
        _write_json(Path(out_dir) / PER_QUERY_FILE, {
            "best_epoch": best["epoch"], "score_with": best["mode"], "metrics": test,
            "test": per_query, "transfer": transfer, "subsets": out["subsets"]})
    return out


def score_kept(out_dir: Path, *, data: BeirData | None = None,
               features: FeatureTables | None = None,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Scores a run's kept best-epoch weights (:func:`save_best`) on test, as a finished
    ``train`` does at its end, and writes :data:`PER_QUERY_FILE` beside them: a study's
    trials never score test, and the study scores the ones it reports this way.

    Raises:
        FileNotFoundError: The run kept no best-epoch weights (naming what to do).
    """
    out_dir = Path(out_dir)
    kept = load_best(out_dir)
    if kept is None:
        raise FileNotFoundError(f"{out_dir} holds no kept best-epoch weights ({BEST_DIR}/"
                                "model.pt): the run never finished an epoch, or predates "
                                "kept weights; retrain it with `jepa-study train --config`")
    cfg, info, weights = kept
    device = torch.device(device) if device is not None else default_device()
    data, splits, features = prepare(cfg, data, features, progress=False, device=device)
    base = None if cfg.model.freeze_base else load_base(cfg.model.base_model,
                                                         cfg.model.max_seq_length, device)
    model = JEPAModel(cfg.model, base,
                      base_dim=features.dim if cfg.model.freeze_base else None).to(device)
    model.load_state_dict(weights)
    return score_best(model, cfg, info, data=data, splits=splits, features=features,
                      device=device, out_dir=out_dir)


def _write_json(path: Path, payload: Any) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(path)


@dataclass
class _TransferSet:
    """Another collection's test split, scored zero-shot at each best epoch."""

    name: str
    data: BeirData
    qrels: dict[str, dict[str, int]]
    features: FeatureTables | None
    batches: _Batches


def _transfer_set(path: str, cfg: RunConfig, device: torch.device,
                  progress: bool) -> _TransferSet:
    """Loads ``path``'s test split (and, for a frozen base, its cached features)."""
    data = load_beir(resolve_data_dir(path), splits=[cfg.data.test_split])
    qrels = {q: docs for q, docs in data.split(cfg.data.test_split).items()
             if any(rel > 0 for rel in docs.values())}
    features = None
    if cfg.model.freeze_base:
        features = load_or_compute(data, cfg.model.base_model, cfg.model.max_seq_length,
                                   progress=progress, device=str(device)).to(device)
    name = re.sub(r"[^A-Za-z0-9]+", "_", data.root.name).strip("_").lower() or "extra"
    return _TransferSet(name, data, qrels, features, _Batches(data, features, device))


class _Selection:
    """The run's best dev epoch: its value, scoring mode, weights and figures; patience.

    The headline dev nDCG@10 of an epoch follows ``eval.score_with``; with ``auto`` it is the
    better of the query and the predictor scoring (ties go to the query), and the run's
    scoring is its best epoch's. A later epoch replaces the best only when strictly better.
    """

    def __init__(self, cfg: RunConfig):
        self.score_with = cfg.eval.score_with
        if self.score_with == "auto" and not cfg.trains_predictor:
            self.score_with = "query"  # an untrained predictor is no choice
        self.best: dict[str, Any] | None = None

    def mode_of(self, raw: dict[str, float]) -> str:
        """The scoring an epoch's headline uses, given its ``query_*``/``predictor_*``."""
        if self.score_with != "auto":
            return self.score_with
        return ("predictor" if raw["predictor_ndcg_at_10"] > raw["query_ndcg_at_10"]
                else "query")

    def update(self, epoch: int, metrics: dict[str, Any], model: torch.nn.Module) -> bool:
        """Takes ``epoch`` as the best when its dev headline beats the best so far."""
        value = metrics["dev_ndcg_at_10"]
        if self.best is not None and not value > self.best["value"]:
            return False
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        subsets = {k: v for k, v in metrics.items()
                   if k.startswith(("dev_seen_", "dev_unseen_", "dev_n_"))}
        self.best = {"epoch": epoch, "value": value, "mode": metrics["dev_scored_with"],
                     "dev": subsets, "model": weights}
        return True

    def summary(self) -> dict[str, Any]:
        """The per-epoch ``best_*`` metrics: the best epoch so far, its dev headline (the
        objective a study ranks by), its scoring and its dev figures on the seen and unseen
        queries (``best_dev_seen_ndcg_at_10``), so that a run's last report, whenever it
        ends, holds its final dev figures."""
        b = self.best
        return {"best_dev_ndcg_at_10": b["value"], "best_epoch": b["epoch"],
                "best_scored_with_predictor": float(b["mode"] == "predictor"),
                **{f"best_{k}": v for k, v in b.get("dev", {}).items()}}

    def end_reason(self, epoch: int, cfg: RunConfig) -> str | None:
        """Why the run ends after ``epoch``, or None while it goes on."""
        total, stop_after = cfg.train.total_epochs, cfg.train.stop_after_epoch
        if stop_after is not None and epoch >= stop_after:
            return f"stop_after_epoch: {stop_after}"
        if epoch >= total:
            return "completed"
        patience = cfg.train.patience
        if patience is not None and epoch - self.best["epoch"] >= patience:
            return (f"patience: no dev improvement in {patience} epochs since the best, "
                    f"epoch {self.best['epoch']}")
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return self.best

    def load_state_dict(self, best: dict[str, Any] | None) -> None:
        self.best = best


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


def _train_epoch(net, model, criterion, optimizer, scheduler, batches, items, relevant,
                 negatives, cfg, epoch, step, rank, world, amp, progress):
    """One pass over this rank's share of the epoch's items; returns mean loss parts and
    the step.

    ``items`` are the epoch's (query, positive) pairs in order (:class:`EpochSampler`);
    ``relevant`` maps a train query to every positive of it (never a negative in the
    contrastive term). ``amp`` is the device type whose bf16 autocast wraps the forward
    (None: fp32); the loss is computed outside it, in fp32, from the outputs cast back.
    """
    mine = items[rank::world]
    bs = cfg.train.batch_size
    n_steps = _steps_per_epoch(len(items), cfg, world)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    rng = random.Random(cfg.train.seed * 7919 + epoch)
    net.train()
    iterator = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"epoch {epoch}", leave=False)
    for i in iterator:
        chunk = mine[i * bs:(i + 1) * bs]
        qids, dids = [c[0] for c in chunk], [c[1] for c in chunk]
        neg_inputs = neg_ids = None
        if negatives is not None:
            neg_ids = [rng.choice(negatives[q]) if negatives[q] else d for q, d in chunk]
            neg_inputs = batches.docs(neg_ids)
        # Step 1. Forward
        with torch.autocast(amp or "cpu", dtype=torch.bfloat16, enabled=amp is not None):
            out = net(batches.queries(qids), batches.docs(dids), neg_inputs,
                      predict=criterion.cfg.lambda_pred > 0)
        total, parts = criterion(out["q"].float(), out["d"].float(),
                                 out["pred_d"].float() if "pred_d" in out else None,
                                 pred_q=out["pred_q"].float() if "pred_q" in out else None,
                                 hard_neg=out["neg"].float() if "neg" in out else None,
                                 doc_ids=dids, hard_neg_ids=neg_ids,
                                 positives=[relevant[q] for q in qids], step=step)
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


def _embed_docs(model, batches, data, features, cfg) -> torch.Tensor:
    """The whole corpus in the joint space, once per evaluation (dev and test share it)."""
    doc_ids = features.doc_ids if features is not None else data.doc_ids
    was = model.training
    model.eval()
    try:
        return embed_corpus(model, batches.docs(doc_ids), cfg.eval.batch_size)
    finally:
        model.train(was)


def _evaluate(model, batches, doc_emb, data, features, qrels, cfg, split: str, mode_of,
              per_query: bool = False, seen: dict[str, bool] | None = None):
    """Scores one split both ways; the headline ``<split>_<metric>`` is ``mode_of(raw)``'s.

    ``<split>_scored_with`` names the headline's scoring. Dev rows carry the collapse
    diagnostics; test rows only the split's figures. With ``seen`` (``subsets.seen_queries``)
    the headline nDCG@10 on the seen and unseen queries and their counts are added. With
    ``per_query``, returns ``(metrics, {scoring: {qid: nDCG@10}})``.
    """
    doc_ids = features.doc_ids if features is not None else data.doc_ids
    qids = sorted(qrels)
    dev = split == "dev"  # diagnostics are per-epoch dev figures; test rows stay lean
    raw, by_query = evaluate_model_per_query(
        model, query_ids=qids, query_inputs=batches.queries(qids), doc_ids=doc_ids,
        doc_emb=doc_emb, qrels=qrels, similarity=cfg.model.similarity,
        batch_size=cfg.eval.batch_size, diagnostics=dev, **search_options(cfg))
    out = {f"{split}_{k}" if k.startswith(("query_", "predictor_")) else k: v
           for k, v in raw.items()}
    mode = mode_of(raw)
    for name in METRIC_NAMES:
        out[f"{split}_{name}"] = raw[f"{mode}_{name}"]
    out[f"{split}_scored_with"] = mode
    if seen is not None:
        out.update(subset_figures(split, by_query[mode], seen))
    if not dev:
        out = {k: v for k, v in out.items() if k.startswith(split)}
    return (out, by_query) if per_query else out


def zero_shot(cfg: RunConfig, split: str = "test", data: BeirData | None = None,
              features: FeatureTables | None = None, per_query: bool = False):
    """The base encoder alone (cosine on its pooled output): every result's reference row.

    Returns the mean metrics with nDCG@10 on the split's seen and unseen queries
    (``seen_ndcg_at_10``, ``n_seen``, ...: seen against the config's train split, as a
    trained run's would be), or with ``per_query`` ``(means, {qid: nDCG@10})``.
    """
    data, splits, features = prepare(cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"freeze_base": True})}), data, features)
    qrels = splits[split]
    qids = sorted(qrels)
    scored = retrieval_per_query(qids, features.queries(qids), features.doc_ids,
                                 features.doc_features, qrels, "cosine", **search_options(cfg))
    means = mean_metrics(scored)
    seen = seen_queries(qrels, splits["train"])
    means.update({k.removeprefix(f"{split}_"): v for k, v in
                  subset_figures(split, scored["ndcg_at_10"], seen).items()})
    return (means, scored["ndcg_at_10"]) if per_query else means


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
