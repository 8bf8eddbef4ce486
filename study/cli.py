"""The ``jepa-study`` command line: every command is a few lines that call one function.

Heavy imports (torch, Ray, MLflow) happen inside the commands, so ``--help``, ``status`` and
config errors come back at once. ``launch``'s flags are built from ``StudyOptions``' fields.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Sequence

from study.study import Study, StudyOptions


def cmd_train(args: argparse.Namespace) -> int:
    from search_spaces.space import load_run_config
    from trainables.loop import train

    cfg = load_run_config(args.config, args.data)
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
    if args.model:
        from trainables.loop import load_best
        from trainables.st_export import export_kept

        test = {k: v for k, v in result.get("test", {}).items() if isinstance(v, (int, float))}
        folder = export_kept(load_best(out), out / "model", {
            "trial": str(out), "data": cfg.data.path, "config": cfg.to_dict(), "test": test})
        print(f"wrote the model {folder} (SentenceTransformer(path).encode_query / "
              "encode_document)")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from search_spaces.space import load_run_config
    from trainables.config import RunConfig
    from trainables.loop import zero_shot

    cfg = (load_run_config(args.config, args.data) if args.config
           else RunConfig().with_overrides(
               {"data.path": str(Path(args.data).resolve()) if args.data else None}))
    if args.model:
        cfg = cfg.with_overrides({"model.base_model": args.model}, "--model")
    metrics = zero_shot(cfg, split=args.split)
    print(json.dumps({"model": cfg.model.base_model, "split": args.split, **metrics}, indent=1))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from study.launcher import launch

    return _print_summary(launch(_options(StudyOptions, args)))


def cmd_resume(args: argparse.Namespace) -> int:
    from study.launcher import resume

    return _print_summary(resume(args.study))


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(Study.open(args.study).status(), indent=1, default=str))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from study.sync import sync

    print(json.dumps(sync(Study.open(args.study)).as_dict(), indent=1))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from study.scoring import score
    from study.sync import sync

    study = Study.open(args.study)
    done = score(study, top=args.top)
    sync(study)
    print(json.dumps(done, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from study.reporting import report

    path = report(Study.open(args.study), out=args.out)
    print(f"wrote {path} (also logged on the study's parent MLflow run)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from analysis.export import SUMMARY_FIGURES
    from study.reporting import export
    from trainables.config import RunConfig

    study = Study.open(args.study)
    for path in export(study, top=args.top, metric=args.metric, mode=args.mode, out=args.out):
        prov = RunConfig.from_yaml(path).provenance
        shown = ", ".join(f"{k.removeprefix('best_')} {prov[k]}" for k in SUMMARY_FIGURES
                          if k in prov)
        print(f"{path}\n  {shown or 'no figures logged'}"
              f"{'' if 'best_test_ndcg_at_10' in prov else ' (test not scored: jepa-study test)'}")
        if args.model:
            from study.reporting import export_model

            made = export_model(study, path, register=not args.no_register)
            print(f"  model: {made['model']}" + (f"\n  registered: {made['registered']}"
                                                 if "registered" in made else ""))
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from study.answer import AnswerOptions, answer

    print(json.dumps(answer(_options(AnswerOptions, args)), indent=1, default=str))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from study.reporting import serve_ui

    return serve_ui(args.study, host=args.host, port=args.port)


def _options(kind: type, args: argparse.Namespace) -> Any:
    """The options dataclass ``kind`` from the parsed arguments of the same names (those not
    given take the dataclass's defaults)."""
    return kind(**{f.name: getattr(args, f.name) for f in fields(kind) if hasattr(args, f.name)})


def _add_options(p: argparse.ArgumentParser, kind: type) -> None:
    """A flag per field of the options dataclass ``kind`` (``verbose`` aside): the field's
    name as ``--name-with-dashes`` (or its ``flag``), help and argparse keywords from its
    metadata, the type from its annotation (a list: one or more
    values; a bool: ``true``/``false``), and no default of its own: the field's applies, so
    each default is written once, in the dataclass."""
    hints = typing.get_type_hints(kind)
    for f in fields(kind):
        if f.name == "verbose":
            continue
        cli = dict(f.metadata)
        flag = cli.pop("flag", "--" + f.name.replace("_", "-"))
        hint = hints[f.name]
        if typing.get_origin(hint) is list:
            cli.setdefault("type", typing.get_args(hint)[0])
            cli.setdefault("nargs", None if cli.get("action") == "append" else "+")
        else:
            hint = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            cli.setdefault("type", _boolean if hint is bool else hint)
        if f.default is MISSING and f.default_factory is MISSING:
            cli["required"] = True
        p.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, **cli)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text}")
    return text.lower() in ("true", "1", "yes")


def _print_summary(summary: dict) -> int:
    print(json.dumps(summary, indent=1, default=str))
    print(f"\nstudy directory: {summary['study_dir']}")
    print(f"compare runs:    mlflow ui --backend-store-uri {summary['mlflow_uri']} "
          "--host 127.0.0.1")
    print(f"status:          jepa-study status {summary['study_dir']}")
    return 0


class _Command(argparse.ArgumentParser):
    """A command's parser; ``options(parser)`` adds its flags when the command is parsed, so
    that building the parser imports no command's options (``--help``, ``status``)."""

    def __init__(self, *args: Any, options: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_flags = options

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._add_flags is not None:
            self._add_flags, add = None, self._add_flags
            add(self)
        return super().parse_known_args(args, namespace)


def _answer_options(p: argparse.ArgumentParser) -> None:
    from study.answer import AnswerOptions

    _add_options(p, AnswerOptions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jepa-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    help_of = {f.name: f.metadata.get("help") for f in fields(StudyOptions)}

    p = sub.add_parser("train", help="run one training from a config file or preset")
    p.add_argument("--config", required=True, help="YAML file, or preset: minimal|hybrid|full")
    p.add_argument("--data", help=help_of["data"])
    p.add_argument("--out", help="output directory (default runs/<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-interval", type=_seconds, default=10.0, metavar="SECONDS",
                   dest="checkpoint_interval_s", help=help_of["checkpoint_interval_s"])
    p.add_argument("--model", action="store_true", help="also write the best epoch's model as "
                   "a sentence-transformers folder (<out>/model)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="run a study (default: the quick space on SciFact)")
    _add_options(p, StudyOptions)
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
    p.add_argument("--model", action="store_true", help="also each trial's model, from its "
                   "kept best-epoch weights: a sentence-transformers folder beside its YAML, "
                   "logged on its MLflow run and registered (a new version per export)")
    p.add_argument("--no-register", action="store_true", help="with --model: the folder only")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("answer", options=_answer_options, help="does the JEPA predictor "
                       "help? arms at equal effort, controls, fresh seeds, tests over queries, "
                       "per dataset")
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("ui", help="MLflow UI on a study's store (127.0.0.1 by default)")
    p.add_argument("study", nargs="?", help="study directory (default: the newest in studies/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    for name, func, about in (
            ("resume", cmd_resume, "continue an interrupted study"),
            ("status", cmd_status, "trials done / running / failed"),
            ("sync", cmd_sync, "bring the study's MLflow runs up to date with its record "
             "(Tune's results, Optuna's storage); safe to repeat")):
        p = sub.add_parser(name, help=about)
        p.add_argument("study", help="study directory")
        p.set_defaults(func=func)

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


#: the errors that mean bad input (exit 2, one line), by the module that defines each
USER_ERRORS = {"trainables.config": "ConfigError", "trainables.data": "DataError",
               "search_spaces.space": "SpaceError", "study.study": "StudyError"}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Every command stops on SIGTERM as on Ctrl-C (exit 130): a study's runs end KILLED
        # and it stays resumable; `ui` takes its MLflow server down with it.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # an error type whose module was never imported cannot have been raised: the check
        # imports nothing (``status`` stays light)
        user = tuple(getattr(sys.modules[m], n) for m, n in USER_ERRORS.items()
                     if m in sys.modules)
        if not isinstance(exc, user):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
