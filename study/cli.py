"""The ``jepa-study`` command line: every command is a few lines that call one function.

Heavy imports (torch, Ray, MLflow) happen inside the commands, so ``--help`` and config
errors come back at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def _load_run_config(spec: str, data: str | None):
    """A config file, or the name of a shipped preset (minimal, hybrid, full)."""
    from search_spaces.space import preset_path
    from trainables.config import ConfigError, RunConfig

    path = Path(spec)
    if not path.exists() and not spec.endswith((".yaml", ".yml")):
        try:
            path = preset_path(spec)
        except Exception:
            raise ConfigError(f"{spec}: no such config file or preset") from None
    cfg = RunConfig.from_yaml(path)
    if data is not None:
        cfg = cfg.with_overrides({"data.path": str(Path(data).resolve())}, "--data")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from trainables.loop import train

    cfg = _load_run_config(args.config, args.data)
    out = Path(args.out or Path("runs") / cfg.name)

    def report(metrics: dict, checkpoint: Path) -> None:
        keys = ("train_loss", "dev_ndcg_at_10", "dev_predictor_ndcg_at_10", "effective_rank")
        shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
        print(f"epoch {metrics['epoch']} [{metrics['phase']}]  {shown}", flush=True)

    result = train(cfg, out_dir=out, callback=report, progress=not args.quiet)
    print(json.dumps({"final_dev": {k: v for k, v in result["final"].items()
                                    if k.startswith("dev_")},
                      "test": result.get("test", {})}, indent=1))
    print(f"wrote {out / 'metrics.json'} and {out / 'config.yaml'}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from trainables.config import RunConfig
    from trainables.loop import zero_shot

    cfg = (_load_run_config(args.config, args.data) if args.config
           else RunConfig().with_overrides(
               {"data.path": str(Path(args.data).resolve()) if args.data else None}))
    if args.model:
        cfg = cfg.with_overrides({"model.base_model": args.model}, "--model")
    metrics = zero_shot(cfg, split=args.split)
    print(json.dumps({"model": cfg.model.base_model, "split": args.split, **metrics}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jepa-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one training from a config file or preset")
    p.add_argument("--config", required=True, help="YAML file, or preset: minimal|hybrid|full")
    p.add_argument("--data", help="BEIR directory (default: see README, 'Data')")
    p.add_argument("--out", help="output directory (default runs/<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("baseline", help="zero-shot metrics of the base encoder")
    p.add_argument("--config", help="take model and data from this config")
    p.add_argument("--data")
    p.add_argument("--model", help="sentence-transformers name or path")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_baseline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from trainables.config import ConfigError
    from trainables.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
