"""Figure 5: training-step throughput of the trainable vs a plain sentence-transformers fit.

Both sides train the same unfrozen all-MiniLM-L6-v2 (``--max-len`` tokens) on the same
(query, positive document) batches of SciFact's train qrels, in the order the loop's
``EpochSampler`` gives, ``--batch-size`` pairs a step, ``--steps`` timed steps after
``--warmup`` untimed ones, alternating sides repetition by repetition (target: ours >= 1.0x).

* ours: ``trainables.loop._train_epoch`` itself (the loop's step: text lookup, tokenisation,
  forward of queries and documents through the base, projection and predictor, ``JEPALoss``
  with λ_pred = 1 and InfoNCE λ_con = 1, the finiteness check, backward, gradient clipping
  at 1.0, AdamW over the base/encoder/predictor groups, LR scheduler), capped at ``--steps``
  by ``train.max_steps_per_epoch``. The loop's bf16 policy
  (``trainables.loop.autocast_device``) autocasts the forward on CUDA and on CPUs with
  native bf16 (AVX512-BF16/AMX); ``ours_fp32`` is the same with ``train.amp`` off, to show
  where the gain comes from.
* st-loop: ``SentenceTransformer`` + ``MultipleNegativesRankingLoss`` (scale 20 = our
  temperature 0.05) in a plain torch loop: ``model.preprocess`` of both columns, loss,
  backward, clipping at 1.0 (the trainer's default), AdamW. bf16 autocast on CUDA (as a
  GPU user would set ``bf16=True``); fp32 on CPU, sentence-transformers' default there.
  On a bf16 CPU ``st_loop_bf16`` autocasts it too: the like-for-like comparison.
* st-trainer: ``SentenceTransformerTrainer`` with ``max_steps``, logging, saving and
  evaluation off, a sequential batch sampler (the same batches), timed from one
  ``on_step_end`` to the next (setup excluded; data loading included). Only when
  ``datasets`` and ``accelerate`` are installed.

The frozen-base path's examples/s (cached features, only the heads train) is reported too.

    python -m benchmarks.bench_step [--quick] [--device cuda|cpu] [--batch-size 32]
"""

from __future__ import annotations

import importlib.util
import time

from benchmarks import common
from benchmarks.common import fmt, spread, summary

import torch  # noqa: E402


def build_cfg(data_root, *, freeze: bool, max_len: int, batch_size: int, steps: int,
              amp: bool):
    from trainables.config import RunConfig

    return RunConfig().with_overrides({
        "data.path": str(data_root), "model.freeze_base": freeze,
        "model.max_seq_length": max_len, "train.batch_size": batch_size,
        "train.max_steps_per_epoch": steps, "train.amp": amp, "train.epochs": 1,
        "loss.lambda_pred": 1.0, "loss.lambda_con": 1.0, "loss.contrastive": "infonce"})


class Ours:
    """The loop's own epoch function over a model built as ``train()`` builds it."""

    def __init__(self, data, cfg, device, features=None, pinned: bool = False):
        from trainables import loop
        from trainables.data import split_for
        from trainables.losses import JEPALoss
        from trainables.model import JEPAModel, load_base

        self.loop, self.cfg, self.device = loop, cfg, device
        splits = split_for(data, cfg.data)
        self.pairs = loop.training_pairs(splits["train"])
        self.sampler = loop.EpochSampler(self.pairs, cfg.train.sampling, cfg.train.seed)
        self.relevant = {q: {d for d, rel in docs.items() if rel > 0}
                         for q, docs in splits["train"].items()}
        cached = cfg.model.freeze_base
        if cached and pinned:
            self.batches = _StagedBatches(data, features, device)
        else:
            self.batches = loop._Batches(data, features if cached else None, device)
        base = None if cached else load_base(cfg.model.base_model, cfg.model.max_seq_length,
                                             device)
        self.model = JEPAModel(cfg.model, base,
                               base_dim=features.dim if cached else None).to(device)
        phase = cfg.train.resolved_phases()[0]
        self.criterion = JEPALoss(cfg.phase_loss(phase), cfg.model.similarity)
        self.optimizer = loop._optimizer(self.model, cfg, phase)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.amp = loop.autocast_device(cfg, device)
        self.step = 0

    def items(self, epoch: int) -> list[tuple[str, str]]:
        """The (query, doc) id pairs of ``epoch`` in training order, as the loop takes them."""
        return self.sampler.items(epoch)

    def batch_ids(self, epoch: int, steps: int) -> list[list[tuple[str, str]]]:
        """The (query, doc) id pairs of the first ``steps`` batches of ``epoch``."""
        items, bs = self.items(epoch), self.cfg.train.batch_size
        return [items[i * bs:(i + 1) * bs] for i in range(steps)]

    def run(self, epoch: int, steps: int, net=None) -> dict[str, float]:
        """``steps`` steps of ``epoch`` through ``net`` (default: the model itself); returns
        the loop's mean loss parts."""
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(
            update={"max_steps_per_epoch": steps})})
        parts, self.step = self.loop._train_epoch(
            net or self.model, self.model, self.criterion, self.optimizer, self.scheduler,
            self.batches, self.items(epoch), self.relevant, None, cfg, epoch, self.step, 0, 1,
            self.amp, False)
        return parts


class _StagedBatches:
    """Cached features gathered into pinned host buffers and copied asynchronously (CUDA)."""

    def __init__(self, data, features, device):
        self.features, self.device = features, device
        self.docs_t = features.doc_features.pin_memory()
        self.queries_t = features.query_features.pin_memory()

    def _gather(self, table, rows):
        idx = torch.tensor(rows)
        buf = torch.empty((len(rows), table.shape[1]), dtype=table.dtype, pin_memory=True)
        torch.index_select(table, 0, idx, out=buf)
        return buf.to(self.device, non_blocking=True)

    def queries(self, ids):
        return self._gather(self.queries_t, [self.features.query_row[i] for i in ids])

    def docs(self, ids):
        return self._gather(self.docs_t, [self.features.doc_row[i] for i in ids])


class STLoop:
    """A plain sentence-transformers fit: MNRL in a hand-written torch loop."""

    def __init__(self, data, max_len: int, device, lr: float = 2e-5, bf16: bool = False):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss)
        from trainables.model import resolve_base_model

        self.data, self.device, self.bf16 = data, device, bf16
        self.model = SentenceTransformer(resolve_base_model(common.BASE_MODEL),
                                         device=str(device))
        self.model.max_seq_length = max_len
        self.loss = MultipleNegativesRankingLoss(self.model)  # scale 20 = 1 / 0.05
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.01)
        self.model.train()

    def _features(self, texts):
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in self.model.preprocess(texts).items()}

    def run(self, batches: list[list[tuple[str, str]]]) -> None:
        for chunk in batches:
            q = self._features([self.data.queries[a] for a, _ in chunk])
            d = self._features([self.data.doc_text(b) for _, b in chunk])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.loss([q, d], None)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()


def st_trainer_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("datasets", "accelerate"))


class STTrainer:
    """``SentenceTransformerTrainer`` with max_steps; step times from its callbacks."""

    def __init__(self, data, max_len: int, batch_size: int, device, workdir):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss)
        from trainables.model import resolve_base_model

        self.data, self.device, self.workdir = data, device, workdir
        self.batch_size = batch_size
        self.model = SentenceTransformer(resolve_base_model(common.BASE_MODEL),
                                         device=str(device))
        self.model.max_seq_length = max_len
        self.loss = MultipleNegativesRankingLoss(self.model)

    def run(self, batches: list[list[tuple[str, str]]]) -> list[float]:
        """Trains on ``batches`` (in order); returns the steady-state step intervals."""
        from datasets import Dataset
        from sentence_transformers import (SentenceTransformerTrainer,
                                           SentenceTransformerTrainingArguments)
        from transformers import TrainerCallback

        pairs = [p for chunk in batches for p in chunk]
        ds = Dataset.from_dict({"anchor": [self.data.queries[q] for q, _ in pairs],
                                "positive": [self.data.doc_text(d) for _, d in pairs]})
        stamps: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                common.sync(self_device)
                stamps.append(time.perf_counter())

        self_device = self.device

        def sequential(dataset, batch_size, drop_last, **_):
            return torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset),
                                                 batch_size, drop_last)

        args = SentenceTransformerTrainingArguments(
            output_dir=str(self.workdir), per_device_train_batch_size=self.batch_size,
            max_steps=len(batches), learning_rate=2e-5, weight_decay=0.01,
            warmup_steps=0, logging_strategy="no", save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_drop_last=True,
            bf16=self.device.type == "cuda", use_cpu=self.device.type == "cpu",
            batch_sampler=sequential, seed=0)
        trainer = SentenceTransformerTrainer(model=self.model, args=args, train_dataset=ds,
                                             loss=self.loss, callbacks=[Clock()])
        trainer.train()
        return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (quick: 16)")
    p.add_argument("--max-len", type=int, default=None, help="default 128 (quick: 64)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per repetition (default 10; quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (quick: 1)")
    p.add_argument("--no-trainer", action="store_true", help="skip the ST trainer side")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    steps = args.steps or (2 if args.quick else 10)
    reps = args.reps or (2 if args.quick else 4)
    bs = args.batch_size or (16 if args.quick else 32)
    args.max_len = args.max_len or (64 if args.quick else 128)
    args.warmup = args.warmup or (1 if args.quick else 2)
    info = common.machine(device)
    print(f"machine: {info}")
    if device.type == "cpu":
        torch.set_num_threads(info["affinity"] or torch.get_num_threads())

    data = common.load_data(args.data)
    cfg = build_cfg(data.root, freeze=False, max_len=args.max_len, batch_size=bs,
                    steps=steps, amp=True)
    ours = Ours(data, cfg, device)
    ours_fp32 = (Ours(data, cfg.with_overrides({"train.amp": False}), device)
                 if ours.amp else None)
    st_loop = STLoop(data, args.max_len, device, bf16=device.type == "cuda")
    st_loop_bf16 = (STLoop(data, args.max_len, device, bf16=True)
                    if ours.amp == "cpu" else None)
    use_trainer = not args.no_trainer and st_trainer_available()
    import tempfile
    workdir = tempfile.mkdtemp(prefix="bench_step-")
    st_trainer = STTrainer(data, args.max_len, bs, device, workdir) if use_trainer else None
    print(f"ours autocasts the forward in bf16: {ours.amp or 'no'}")
    print(f"{len(ours.pairs)} train pairs; batch {bs}, max_len {args.max_len}, "
          f"{args.warmup} warm-up + {steps} timed steps x {reps} reps; "
          f"ST trainer: {'yes' if use_trainer else 'no (datasets/accelerate missing)'}")

    # warm-up on epoch 0's batches (each side its own copy of the weights)
    warm = ours.batch_ids(0, args.warmup)
    common.timed(lambda: ours.run(0, args.warmup), device)
    common.timed(lambda: st_loop.run(warm), device)
    if ours_fp32 is not None:
        common.timed(lambda: ours_fp32.run(0, args.warmup), device)
    if st_loop_bf16 is not None:
        common.timed(lambda: st_loop_bf16.run(warm), device)

    times: dict[str, list[float]] = {"ours": [], "ours_fp32": [], "st_loop": [],
                                     "st_loop_bf16": [], "st_trainer": []}
    for r in range(reps):
        epoch = r + 1
        batches = ours.batch_ids(epoch, steps)
        sides = {"ours": lambda: ours.run(epoch, steps), "st_loop": lambda: st_loop.run(batches)}
        if ours_fp32 is not None:
            sides["ours_fp32"] = lambda: ours_fp32.run(epoch, steps)
        if st_loop_bf16 is not None:
            sides["st_loop_bf16"] = lambda: st_loop_bf16.run(batches)
        if st_trainer is not None:
            sides["st_trainer"] = lambda: st_trainer.run(ours.batch_ids(0, 1) + batches)
        names = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in names:
            seconds, out = common.timed(sides[name], device)
            if name == "st_trainer":  # steady-state intervals only (first step = setup)
                seconds = sum(out) * steps / max(1, len(out))
            times[name].append(seconds)
            print(f"  rep {r + 1}/{reps}  {name:<10s} {seconds:8.3f} s  "
                  f"{steps * bs / seconds:7.2f} ex/s", flush=True)
    times = {k: v for k, v in times.items() if v}
    del ours, ours_fp32, st_loop, st_loop_bf16, st_trainer

    # frozen-base cached path, for reference (heads only; the loop's own _Batches)
    from trainables.cache import load_or_compute
    features = load_or_compute(data, common.BASE_MODEL, common.CACHE_MAX_LEN,
                               device=str(device), progress=False)
    cached_steps = 20 if args.quick else 50
    frozen_cfg = build_cfg(data.root, freeze=True, max_len=common.CACHE_MAX_LEN,
                           batch_size=bs, steps=cached_steps, amp=True)
    cached_sides = {"cached": Ours(data, frozen_cfg, device, features)}
    frozen64 = Ours(data, frozen_cfg.with_overrides({"train.batch_size": 64}), device, features)
    cached_steps = min(cached_steps, len(frozen64.pairs) // 64)  # an epoch caps the steps
    if device.type == "cuda":
        from trainables.cache import FeatureTables
        cached_sides["cached_pinned"] = Ours(data, frozen_cfg, device, features, pinned=True)
        on_device = FeatureTables(features.doc_ids, features.doc_features.to(device),
                                  features.query_ids, features.query_features.to(device))
        cached_sides["cached_tables_on_device"] = Ours(data, frozen_cfg, device, on_device)
    cached_times: dict[str, list[float]] = {k: [] for k in cached_sides}
    cached_times["cached_bs64"] = []
    for side in [*cached_sides.values(), frozen64]:
        side.run(0, 2)
    for r in range(reps):
        for name, side in cached_sides.items():
            cached_times[name].append(common.timed(lambda: side.run(r + 1, cached_steps),
                                                   device)[0])
        cached_times["cached_bs64"].append(
            common.timed(lambda: frozen64.run(r + 1, cached_steps), device)[0])

    def eps(seconds: list[float], n_steps: int, batch: int) -> dict[str, float]:
        return summary([n_steps * batch / s for s in seconds])

    result = {
        "figure": 5, "name": "step", "quick": args.quick, "machine": info,
        "config": {"batch_size": bs, "max_seq_length": args.max_len, "steps": steps,
                   "warmup": args.warmup, "reps": reps, "pairs": len(frozen64.pairs),
                   "device": str(device), "cached_steps": cached_steps},
        "examples_per_s": {k: eps(v, steps, bs) for k, v in times.items()},
        "ratio_ours_vs_st_loop": common.ratio(times["st_loop"], times["ours"]),
        "cached_examples_per_s": {k: eps(v, cached_steps, 64 if k.endswith("64") else bs)
                                  for k, v in cached_times.items()},
        "target": "ours / plain ST >= 1.0",
    }
    if "st_trainer" in times:
        result["ratio_ours_vs_st_trainer"] = common.ratio(times["st_trainer"], times["ours"])
    if "ours_fp32" in times:
        result["ratio_ours_fp32_vs_st_loop"] = common.ratio(times["st_loop"], times["ours_fp32"])
    if "st_loop_bf16" in times:
        result["ratio_ours_vs_st_loop_bf16"] = common.ratio(times["st_loop_bf16"],
                                                            times["ours"])
    rows = [[f"{k} (unfrozen, bs {bs})", spread(v)] for k, v in result["examples_per_s"].items()]
    rows.append(["ratio ours / st_loop (target >= 1)", spread(result["ratio_ours_vs_st_loop"])])
    if "ratio_ours_vs_st_trainer" in result:
        rows.append(["ratio ours / st_trainer (target >= 1)",
                     spread(result["ratio_ours_vs_st_trainer"])])
    if "ratio_ours_fp32_vs_st_loop" in result:
        rows.append(["ratio ours_fp32 / st_loop (both fp32)",
                     spread(result["ratio_ours_fp32_vs_st_loop"])])
    if "ratio_ours_vs_st_loop_bf16" in result:
        rows.append(["ratio ours / st_loop_bf16 (both bf16)",
                     spread(result["ratio_ours_vs_st_loop_bf16"])])
    rows += [[f"frozen base, {k} (heads only)", spread(v)]
             for k, v in result["cached_examples_per_s"].items()]
    ratio = result["ratio_ours_vs_st_loop"]["median"]
    result["target_met"] = ratio >= 1.0
    print(f"\nFigure 5: training throughput (examples/s), {device}")
    print(common.table(["side", "median [min, max]"], rows))
    print(f"target ours >= 1.0x plain ST: {'met' if ratio >= 1.0 else 'NOT met'} "
          f"({fmt(ratio)}x vs the hand-written ST loop)")
    common.write_json("step", result, args)
    return result


if __name__ == "__main__":
    main()
