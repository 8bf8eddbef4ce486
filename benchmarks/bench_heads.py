"""Figure 5b: a frozen-base training step whose λ_pred is 0, the predictors skipped or run.

A contrastive config (λ_pred = 0) still has predictors in its model: the asymmetric and
bidirectional variants' heads, of depth 2 and twice the width by default. Their output enters
no loss term, so the loop does not run them (``JEPAModel.forward(predict=False)``). Side by
side, in alternating repetitions over the same batches and weights' starting point:

* ``skipped``: ``trainables.loop._train_epoch`` as it is;
* ``run``: the same, through a wrapper that makes the model run its predictors every step
  (what the loop did before).

The config is the answer's NFCorpus C* (the costliest retrained runs of
``jepa-study answer``: a 1,024-d bidirectional head, batch 128, InfoNCE, one hard negative a
query from the 8 mined), on cached base features. Target: run / skipped >= 1.3 (a third of
the step saved), and the same loss (the predictors have no dropout left to draw: the random
stream is the same).

    python -m benchmarks.bench_heads [--quick] [--data ../shared/data/nfcorpus]
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.bench_step import Ours
from benchmarks.common import spread, summary

import torch  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nfcorpus"


class _AlwaysPredict(torch.nn.Module):
    """The model, its predictors run whatever the loop asks (the loop before the skip)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, queries, docs, negatives=None, predict: bool = True):
        return self.model(queries, docs, negatives, predict=True)


def build_cfg(data_root, steps: int):
    from trainables.config import RunConfig

    return RunConfig().with_overrides({
        "data.path": str(data_root), "model.freeze_base": True,
        "model.max_seq_length": common.CACHE_MAX_LEN, "model.output_dim": 1024,
        "model.variant": "bidirectional", "model.projection": "linear",
        "model.similarity": "euclidean", "model.predictor.dropout": 0.0,
        "loss.lambda_pred": 0.0, "loss.lambda_con": 0.039, "loss.contrastive": "infonce",
        "loss.temperature": 0.151, "loss.lambda_iso": 0.0, "loss.lambda_reg": 0.0,
        "train.batch_size": 128, "train.sampling": "queries", "train.epochs": 1,
        "train.max_steps_per_epoch": steps, "train.lr": 1.46e-4})


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps a repetition (default 20)")
    args = p.parse_args(argv)
    device = common.resolve_device(args.device)
    steps = args.steps or (5 if args.quick else 20)
    reps = args.reps or (2 if args.quick else 6)
    info = common.machine(device)
    print(f"machine: {info}")
    if device.type == "cpu":
        torch.set_num_threads(info["affinity"] or torch.get_num_threads())
    data = common.load_data(args.data or (str(DEFAULT_DATA) if DEFAULT_DATA.exists() else None))
    from trainables.cache import load_or_compute
    features = load_or_compute(data, common.BASE_MODEL, common.CACHE_MAX_LEN,
                               device=str(device), progress=False)
    cfg = build_cfg(data.root, steps)
    sides = {"skipped": Ours(data, cfg, device, features),
             "run": Ours(data, cfg, device, features)}
    sides["run"].model.load_state_dict(sides["skipped"].model.state_dict())
    forced = _AlwaysPredict(sides["run"].model)
    losses: dict[str, list[float]] = {k: [] for k in sides}

    def one(name: str, epoch: int) -> None:
        parts = sides[name].run(epoch, steps, net=forced if name == "run" else None)
        losses[name].append(parts["loss"])

    for name in sides:  # warm-up: one repetition each, on epoch 0
        common.timed(lambda: one(name, 0), device)
    epochs = {k: 0 for k in sides}  # repetition r of either side steps through epoch r

    def next_epoch(name: str) -> None:
        epochs[name] += 1
        one(name, epochs[name])

    times = common.alternate({k: (lambda k=k: next_epoch(k)) for k in sides}, reps, device)
    result = {
        "figure": "5b", "name": "heads", "quick": args.quick, "machine": info,
        "config": {"data": str(data.root), "steps": steps, "reps": reps,
                   "batch_size": cfg.train.batch_size, "output_dim": cfg.model.output_dim,
                   "variant": cfg.model.variant, "device": str(device)},
        "seconds": {k: summary(v) for k, v in times.items()},
        "ratio_run_vs_skipped": common.ratio(times["run"], times["skipped"]),
        "same_losses": losses["run"] == losses["skipped"],
        "target": "run / skipped >= 1.3, the same losses",
    }
    rows = [[f"{k}: seconds for {steps} steps", spread(v)] for k, v in result["seconds"].items()]
    rows.append(["run / skipped", spread(result["ratio_run_vs_skipped"])])
    rows.append(["the same losses", str(result["same_losses"])])
    print(common.table(["figure 5b: a λ_pred = 0 step", "median [min, max]"], rows))
    common.write_json("bench_heads", result, args)
    return result


if __name__ == "__main__":
    main()
