"""The ``jepa-study`` command line: every command is a few lines that call one function.

Heavy imports (torch, Ray, MLflow) happen inside the commands, so ``--help`` and config
errors come back at once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence


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

    def report(metrics: dict, checkpoint: Path | None) -> None:
        keys = ("train_loss", "dev_ndcg_at_10", "dev_predictor_ndcg_at_10", "effective_rank")
        shown = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)
        print(f"epoch {metrics['epoch']} [{metrics['phase']}]  {shown}", flush=True)

    result = train(cfg, out_dir=out, callback=report, progress=not args.quiet,
                   checkpoint_interval_s=args.checkpoint_interval_s)
    print(json.dumps({"final_dev": {k: v for k, v in result["final"].items()
                                    if k.startswith("dev_")},
                      "test (reported only; seen/unseen: a relevant document was or was never "
                      "a train positive)": result.get("test", {})}, indent=1))
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


def cmd_launch(args: argparse.Namespace) -> int:
    from study.launcher import StudyOptions, launch

    _print_summary(launch(_options(StudyOptions, args)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from study.launcher import resume

    _print_summary(resume(args.study))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from study.studydir import status

    print(json.dumps(status(args.study), indent=1, default=str))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from study.sync import sync

    print(json.dumps(sync(args.study).as_dict(), indent=1))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from study.scoring import score_study
    from study.sync import sync

    done = score_study(args.study, top=args.top)
    sync(args.study)
    print(json.dumps(done, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from study.reporting import study_report

    path = study_report(args.study, out=args.out)
    print(f"wrote {path} (also logged on the study's parent MLflow run)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from study.reporting import study_export
    from trainables.config import ConfigError, is_test_metric

    if is_test_metric(args.metric):
        raise ConfigError(f"--metric {args.metric}: a test figure; test is reported, never "
                          "used to choose (rank by a dev figure such as best_dev_ndcg_at_10)")

    from analysis.export import SUMMARY_FIGURES
    from trainables.config import RunConfig

    for path in study_export(args.study, top=args.top, metric=args.metric, mode=args.mode,
                             out=args.out):
        prov = RunConfig.from_yaml(path).provenance
        shown = ", ".join(f"{k.removeprefix('best_')} {prov[k]}" for k in SUMMARY_FIGURES
                          if k in prov)
        print(f"{path}\n  {shown or 'no figures logged'}"
              f"{'' if 'best_test_ndcg_at_10' in prov else ' (test not scored: jepa-study test)'}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from study.answer import AnswerOptions, answer

    print(json.dumps(answer(_options(AnswerOptions, args)), indent=1, default=str))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from study.reporting import serve_ui

    return serve_ui(args.study, host=args.host, port=args.port)


def _options(kind: type, args: argparse.Namespace) -> Any:
    """The options dataclass ``kind`` from the parsed arguments of the same names."""
    return kind(**{f.name: getattr(args, f.name) for f in fields(kind) if hasattr(args, f.name)})


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=1, default=str))
    uri = summary["mlflow_uri"]
    print(f"\nstudy directory: {summary['study_dir']}")
    print(f"compare runs:    mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    print(f"status:          jepa-study status {summary['study_dir']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jepa-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run one training from a config file or preset")
    p.add_argument("--config", required=True, help="YAML file, or preset: minimal|hybrid|full")
    p.add_argument("--data", help="BEIR directory (default: see README, 'Data')")
    p.add_argument("--out", help="output directory (default runs/<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _checkpoint_interval_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="run a study (default: the quick space on SciFact)")
    p.add_argument("--space", default="quick", help="space file or shipped name "
                   "(quick, jepa_core, seed_phases)")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's)")
    p.add_argument("--data", help="BEIR directory")
    p.add_argument("--address", help="Ray cluster: auto or ray://host:10001 (default: local)")
    p.add_argument("--num-workers", type=int, default=1, help="Train workers per trial (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--max-concurrent-trials", type=int)
    p.add_argument("--execution", default="auto", choices=["auto", "direct", "train"],
                   help="direct: loop inside the Tune trial (1 CPU worker); train: TorchTrainer")
    _checkpoint_interval_arg(p)
    p.add_argument("--mlflow-uri", help="tracking URI (default: sqlite store in the study)")
    p.add_argument("--name", help="study name (default: the space's)")
    p.add_argument("--storage", default="studies", help="parent directory of studies")
    p.add_argument("--warm-start", action="append", default=[], metavar="STUDY_OR_CONFIGS",
                   help="evaluate these first: a study directory (its top 3 trials), an "
                   "exported YAML file or a directory of them; repeatable")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("test", help="score a study's best trials on test from their kept "
                       "weights (a study does it for its top 10 when it ends); reported only")
    p.add_argument("study", help="study directory")
    p.add_argument("--top", type=int, default=10, help="how many trials, best by the study's "
                   "metric (default 10: those the report lists)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("report", help="HTML report of a study, logged to its parent run")
    p.add_argument("study", help="study directory")
    p.add_argument("--out", help="HTML file (default <study>/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write the best trials' configs as YAML files")
    p.add_argument("study", help="study directory")
    p.add_argument("--top", type=int, default=1)
    p.add_argument("--metric", default="best_dev_ndcg_at_10",
                   help="ranking metric (default: the best dev epoch's headline nDCG@10)")
    p.add_argument("--mode", default="max", choices=["max", "min"])
    p.add_argument("--out", help="directory (default <study>/exported)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("answer", help="does the JEPA predictor help? arms at equal effort, "
                       "controls, fresh seeds, tests over queries, per dataset")
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a BEIR directory; repeat for each dataset (transfer between them "
                   "is scored too)")
    p.add_argument("--space", default="jepa_core", help="the space both arms search")
    p.add_argument("--num-samples", type=int, help="trials per arm and dataset "
                   "(default: the space's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                   help="fresh seeds of the retrained runs (the search uses seed 0)")
    p.add_argument("--name", default="answer")
    p.add_argument("--storage", default="answers", help="parent directory of answers")
    p.add_argument("--address", help="Ray cluster: auto or ray://host:10001 (default: local)")
    p.add_argument("--mlflow-uri", help="tracking URI (default: sqlite store in the answer)")
    p.add_argument("--max-concurrent-trials", type=int)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("ui", help="MLflow UI on a study's store (127.0.0.1 by default)")
    p.add_argument("study", nargs="?", help="study directory (default: the newest in studies/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("resume", help="continue an interrupted study")
    p.add_argument("study", help="study directory")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="trials done / running / failed")
    p.add_argument("study", help="study directory")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sync", help="bring the study's MLflow runs up to date with its record "
                       "(Tune's results, Optuna's storage); safe to repeat")
    p.add_argument("study", help="study directory")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("baseline", help="zero-shot metrics of the base encoder")
    p.add_argument("--config", help="take model and data from this config")
    p.add_argument("--data")
    p.add_argument("--model", help="sentence-transformers name or path")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_baseline)
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _checkpoint_interval_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-interval", type=_seconds, default=10.0, metavar="SECONDS",
                   dest="checkpoint_interval_s",
                   help="least seconds between two checkpoints besides the first and last "
                   "epoch's (0: every epoch); a run that fails redoes at most that much")


def _terminate(signum, frame) -> None:
    """SIGTERM (a job scheduler, ``kill``) stops the command as Ctrl-C does, always.

    SIGINT's Python handler is called in place: inside ``Tuner.fit`` Tune's graceful stop
    (state saved, runs KILLED, the study resumable), elsewhere ``KeyboardInterrupt``. Where
    SIGINT has no Python handler (ignored, as POSIX shells start background jobs, or the
    system's) this raises ``KeyboardInterrupt``; SIGINT's disposition is left as it was.
    """
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIG_IGN, SIG_DFL, or a handler not installed from Python (None)
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    from search_spaces.space import SpaceError
    from study.studydir import StudyError
    from trainables.config import ConfigError
    from trainables.data import DataError

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Every command stops on SIGTERM as on Ctrl-C (exit 130): a study's runs end KILLED
        # and it stays resumable; `ui` takes its MLflow server down with it.
        signal.signal(signal.SIGTERM, _terminate)
    errors: tuple[type[BaseException], ...] = (ConfigError, DataError, SpaceError, StudyError)
    try:
        return args.func(args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
