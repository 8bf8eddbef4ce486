"""``jepa-study answer``: does the JEPA predictor help retrieval? Controlled, powered, per query.

Per dataset: (1) two studies over one space at equal effort, the JEPA arm and the contrastive
arm (``search_spaces.arms``), each picking its best config on dev; (2) the controls around the
JEPA arm's best (itself, λ_pred = 0, λ_pred = 0 with a capacity-matched query head, the
contrastive arm's best) retrained over fresh seeds, each scoring the other datasets' test
splits too (transfer), with zero-shot and BM25 as reference rows; (3) the statistics over
queries (``analysis.answer``). ``docs/answer.md`` gives the design and the measured answer.

Everything is resumable: a finished study or run is reused, an interrupted study resumed. The
answer directory holds the arms' studies, every retrained run, ``answer.json``, ``.html`` and
``.md``; one MLflow store holds the studies' experiments and the answer's own.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from analysis import schema as S
from search_spaces.arms import ARMS, arm_space, retrain_config, systems
from search_spaces.space import load_space, raw_space
from study.launcher import StudyError, StudyOptions
from study.tracking import StudyTracker

log = logging.getLogger(__name__)

#: seeds of the retrained runs: fresh, none is a search seed (every trial trains with seed 0)
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
SEARCH_SEED = 0


@dataclass
class AnswerOptions:
    """What ``jepa-study answer`` was asked for; saved in ``answer_options.json``."""

    data: list[str]
    space: str = "jepa_core"
    num_samples: int | None = None  #: trials per arm and dataset (default: the space's)
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    name: str = "answer"
    storage: str = "answers"
    address: str | None = None
    mlflow_uri: str | None = None
    max_concurrent_trials: int | None = None
    verbose: int = 1

    def __post_init__(self) -> None:
        if not self.data:
            raise StudyError("answer: give at least one --data directory")
        if len(set(self.seeds)) < 2:
            raise StudyError(f"answer: need two or more distinct seeds, got {self.seeds}")
        if SEARCH_SEED in self.seeds:
            raise StudyError(f"answer: seed {SEARCH_SEED} is the search seed; the retrained "
                             "runs need fresh ones")
        if self.num_samples is not None and self.num_samples < 1:
            raise StudyError("answer: --num-samples must be at least 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise StudyError(f"answer: --name {self.name!r}: letters, digits, '_', '.', '-'")


def dataset_name(path: str | Path) -> str:
    """A dataset's short name: its directory's name (``.../scifact`` -> ``scifact``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(path).resolve().name).strip("_").lower()


def answer(opts: AnswerOptions) -> dict[str, Any]:
    """Runs (or resumes) the whole answer; returns where its outputs are and the verdicts."""
    from trainables.data import load_beir, resolve_data_dir

    started = time.time()
    root = Path(opts.storage).expanduser().resolve() / opts.name
    root.mkdir(parents=True, exist_ok=True)
    data_dirs = [resolve_data_dir(d) for d in opts.data]
    names = [dataset_name(d) for d in data_dirs]
    if len(set(names)) < len(names):
        raise StudyError(f"answer: two --data directories share a name: {names}")
    load_space(opts.space)  # the space is validated before anything runs
    space = raw_space(opts.space)
    for d in data_dirs:
        load_beir(d)  # a bad dataset fails now, not after an hour of studies
    uri = opts.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"
    (root / "answer_options.json").write_text(json.dumps(asdict(opts), indent=1))
    # seconds each phase worked, summed over the invocations that ran it (a resumed answer
    # adds what it does; what it reuses costs nothing)
    timing_file = root / "timings.json"
    timings: dict[str, float] = (json.loads(timing_file.read_text())
                                 if timing_file.exists() else {})
    chosen: dict[str, dict[str, Any]] = {}
    for data_dir, ds in zip(data_dirs, names):
        for arm in ARMS:
            t0 = time.time()
            chosen.setdefault(ds, {})[arm] = _arm_study(root, ds, arm, data_dir, space,
                                                        opts, uri)
            if chosen[ds][arm]["ran"]:
                key = f"study {ds} {arm}"
                timings[key] = timings.get(key, 0.0) + time.time() - t0
            timing_file.write_text(json.dumps(timings, indent=1))
    jobs = []
    for data_dir, ds in zip(data_dirs, names):
        others = [str(d) for d, n in zip(data_dirs, names) if n != ds]
        for system, cfg in systems(chosen[ds]["jepa"]["config"],
                                   chosen[ds]["contrastive"]["config"]).items():
            for seed in opts.seeds:
                run_cfg = retrain_config(cfg, seed, chosen[ds]["jepa"]["patience"], others,
                                         name=f"{ds}-{system}-seed{seed}")
                jobs.append((ds, system, seed, run_cfg,
                             root / ds / "runs" / system / f"seed_{seed}"))
    t0 = time.time()
    results, trained = _retrain(jobs, opts)
    if trained:
        timings["retrained runs"] = timings.get("retrained runs", 0.0) + time.time() - t0
    t0 = time.time()
    references = {ds: _references(d, chosen[ds]["jepa"]["config"])
                  for d, ds in zip(data_dirs, names)}
    timings["reference rows (zero-shot, BM25)"] = time.time() - t0
    timing_file.write_text(json.dumps(timings, indent=1))
    measured = _measured(names, jobs, results, references, chosen, opts, timings)
    return _write(root, measured, uri, opts, jobs, results, timings, started)


# -- 1. the arms' studies --------------------------------------------------------------------

def _arm_study(root: Path, ds: str, arm: str, data_dir: Path, space: dict[str, Any],
               opts: AnswerOptions, uri: str) -> dict[str, Any]:
    """Runs (or resumes, or reuses) one arm's study; returns its best config as chosen."""
    from analysis.export import export_configs
    from study.launcher import launch, resume
    from trainables.config import RunConfig

    raw = arm_space(space, arm)
    if opts.num_samples is not None:
        raw["num_samples"] = opts.num_samples
    if opts.max_concurrent_trials is not None:
        raw["max_concurrent_trials"] = opts.max_concurrent_trials
    arm_file = root / ds / f"{arm}.yaml"
    arm_file.parent.mkdir(parents=True, exist_ok=True)
    arm_file.write_text(f"# the {arm} arm of {opts.space}, written by jepa-study answer\n"
                        + yaml.safe_dump(raw, sort_keys=False))
    name = f"{ds}-{arm}"
    storage = root / ds / "studies"
    study_dir = storage / name
    ran = not (study_dir / "summary.json").exists()
    if ran:
        if (study_dir / "study.json").exists():
            log.info("answer: resuming the %s arm's study on %s", arm, ds)
            resume(study_dir)
        else:
            log.info("answer: the %s arm's study on %s", arm, ds)
            launch(StudyOptions(space=str(arm_file), data=str(data_dir), name=name,
                                storage=str(storage), address=opts.address, mlflow_uri=uri,
                                max_concurrent_trials=opts.max_concurrent_trials,
                                verbose=opts.verbose))
    best_dir = root / ds / "best"
    shutil.rmtree(best_dir / arm, ignore_errors=True)
    path = export_configs(uri, name, best_dir / arm, top=1)[0]
    cfg = RunConfig.from_yaml(path)
    trials = json.loads((study_dir / "summary.json").read_text())
    return {"config": cfg, "study": name, "study_dir": str(study_dir), "exported": str(path),
            "trials": trials.get("trials"), "errored": trials.get("errored"),
            "best_dev": float(cfg.provenance.get("value", "nan")),
            "best_epoch": cfg.provenance.get("best_epoch"),
            "scoring": cfg.eval.score_with, "trial_id": cfg.provenance.get("trial_id"),
            "patience": _patience(cfg), "wall_s": trials.get("wall_s"), "ran": ran}


def _patience(cfg) -> int | None:
    """The trial's patience, which export replaced by its best epoch (provenance keeps it)."""
    text = cfg.provenance.get("patience", "None")
    return None if text in ("None", "") else int(text)


# -- 2. the systems (search_spaces.arms) and their retrained runs ----------------------------

def _retrain(jobs: list[tuple], opts: AnswerOptions) -> tuple[list[dict[str, Any]], int]:
    """Trains every job (Ray tasks, one CPU each), reusing runs already finished; returns
    every job's summary and how many were trained now."""
    import ray

    from study.launcher import _init_ray

    results: list[dict[str, Any] | None] = [_finished(cfg, out) for *_, cfg, out in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        _init_ray(StudyOptions(address=opts.address, verbose=opts.verbose))
        try:
            task = ray.remote(num_cpus=1, max_retries=2)(_train_one)
            refs = {i: task.remote(jobs[i][3].to_dict(), str(jobs[i][4])) for i in todo}
            for i, ref in refs.items():
                results[i] = ray.get(ref)
        finally:
            ray.shutdown()
    return results, len(todo)  # type: ignore[return-value]


def _train_one(cfg_dict: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One retrained run (a Ray task): train, then its summary with per-query figures."""
    import torch

    from trainables.config import RunConfig
    from trainables.loop import train

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict, "answer run")
    return _summary(train(cfg, out_dir=Path(out_dir), progress=False))


def _finished(cfg, out_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run of exactly ``cfg`` in ``out_dir``, else None."""
    from trainables.config import RunConfig

    if not (out_dir / "metrics.json").exists() or not (out_dir / "config.yaml").exists():
        return None
    if RunConfig.from_yaml(out_dir / "config.yaml") != cfg:
        raise StudyError(f"{out_dir} holds a run of another config: remove it or use "
                         "another --name")
    return _summary(json.loads((out_dir / "metrics.json").read_text()))


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("best_epoch", "best_dev_ndcg_at_10", "score_with",
                                       "end_reason", "test", "test_per_query",
                                       "transfer_per_query")}


def _references(data_dir: Path, cfg) -> dict[str, dict[str, float]]:
    """Zero-shot base and BM25 on the dataset's test split: per-query nDCG@10."""
    from trainables.bm25 import bm25_metrics
    from trainables.data import load_beir, make_splits
    from trainables.loop import zero_shot

    data = load_beir(data_dir)
    cfg = cfg.with_overrides({"data.path": str(data_dir)}, "reference")
    _, zs = zero_shot(cfg, "test", data=data, per_query=True)
    qrels = make_splits(data, train=cfg.data.train_split, dev=cfg.data.dev_split,
                        test=cfg.data.test_split, dev_fraction=cfg.data.dev_fraction,
                        seed=cfg.data.split_seed)["test"]
    _, bm25 = bm25_metrics(data, qrels)
    return {"zero_shot": zs, "bm25": bm25["ndcg_at_10"]}


# -- 3. the table ------------------------------------------------------------------------------

def _measured(names, jobs, results, references, chosen, opts, timings):
    from analysis.answer import Measured, Run, System, describe_budget, describe_config

    measured = []
    for ds in names:
        found: dict[str, System] = {}
        for (d, system, seed, cfg, _), res in zip(jobs, results):
            if d != ds:
                continue
            s = found.setdefault(system, System(system, cfg.eval.score_with, []))
            s.runs.append(Run(seed, res["best_dev_ndcg_at_10"], res["best_epoch"],
                              res["test_per_query"], res.get("transfer_per_query") or {}))
        arms = chosen[ds]
        design = {
            "space": opts.space, "trials per arm": arms["jepa"]["trials"],
            "budget": describe_budget(arms["jepa"]["config"], arms["jepa"]["patience"]),
            "seeds (fresh; the search used seed 0)": list(opts.seeds),
            **{f"{arm} arm": (f"study {a['study']}: {a['trials']} trials "
                              f"({a['errored']} errored); best trial {a['trial_id']}, dev "
                              f"nDCG@10 {a['best_dev']:.4f} at epoch {a['best_epoch']}, "
                              f"scored with the {a['scoring']}") for arm, a in arms.items()},
            "J": describe_config(arms["jepa"]["config"]),
            **{f"no {system} control": "J has no term left without L_pred"
               for system in ("capacity", "no_pred") if system not in found},
            "tuned contrastive": describe_config(arms["contrastive"]["config"]),
        }
        measured.append(Measured(ds, found, references[ds], design))
    return measured


def _write(root: Path, measured, uri: str, opts: AnswerOptions, jobs, results,
           timings: dict[str, float], started: float) -> dict[str, Any]:
    from analysis.answer import answer_dict, dumps, html_report, markdown

    result = answer_dict(measured)
    result["timings_s"] = {**{k: round(v, 1) for k, v in timings.items()},
                           "total (sum of the phases)": round(sum(timings.values()), 1),
                           "this invocation": round(time.time() - started, 1)}
    result["command"] = command_line(opts)
    paths = {"json": root / "answer.json", "html": root / "answer.html",
             "md": root / "answer.md"}
    paths["json"].write_text(dumps(result))
    md = markdown(result) + "\n## Time\n\n" + "\n".join(
        f"- {k}: {v:.0f} s" for k, v in result["timings_s"].items()) + "\n"
    paths["md"].write_text(md)
    paths["html"].write_text(html_report({**result}, f"The answer: {opts.name}"))
    _log_mlflow(uri, opts.name, paths, jobs, results, result)
    return {"answer_dir": str(root), **{k: str(v) for k, v in paths.items()},
            "mlflow_uri": uri, "verdicts": result["verdicts"],
            "timings_s": result["timings_s"]}


def command_line(opts: AnswerOptions) -> str:
    """The ``jepa-study answer`` command that makes these options."""
    parts = ["jepa-study answer"] + [f"--data {d}" for d in opts.data]
    for f in fields(opts):
        value = getattr(opts, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name not in ("data", "verbose") and value != default:
            shown = " ".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"--{f.name.replace('_', '-')} {shown}")
    return " ".join(parts)


class AnswerTracker(StudyTracker):
    """The answer's MLflow runs: a parent (``ROLE_ANSWER``) and a child per retrained run
    (``ROLE_RETRAIN``), named by ``<dataset>/<system>/<seed>``."""

    ROLES, CHILD_KEY = (S.ROLE_ANSWER, S.ROLE_RETRAIN), S.TAG_ANSWER_RUN


def _log_mlflow(uri: str, name: str, paths: dict[str, Path], jobs, results,
                result: dict[str, Any]) -> None:
    """The answer's MLflow record: a parent run (report, table, verdicts) and a child run per
    retrained run (its test figures, and its per-query figures as an artifact). Idempotent:
    runs are found again by their tags; a finished child is left as it is."""
    from mlflow.entities import Metric

    from trainables.config import flatten

    tracker = AnswerTracker(uri, name, description=f"jepa-study answer {name}: does the "
                            f"JEPA predictor help? Report: {paths['html']}")
    parent, now = tracker.run(), int(time.time() * 1000)
    for path in paths.values():
        tracker.client.log_artifact(parent.run_id, str(path), S.ARTIFACT_ANSWER)
    numbers = {}
    for row in result["comparisons"]["in_domain"]:
        key = S.mlflow_key(f"{row['dataset']}.{row['comparison']}")
        numbers.update({f"{key}.diff_points": row["diff_points"],
                        f"{key}.p_permutation_holm": row["p_permutation_holm"]})
    # the latest figures, over the point an earlier invocation logged
    tracker.client.log_batch(parent.run_id, metrics=[Metric(k, float(v), now, 0)
                                                     for k, v in numbers.items()])
    tracker.end(parent, S.STATUS_FINISHED, None)
    for (ds, system, seed, cfg, out_dir), res in zip(jobs, results):
        run = tracker.run(f"{ds}/{system}/{seed}")
        if run.status == S.STATUS_FINISHED:
            continue
        params = {S.PARAM_DATASET: ds, S.PARAM_SYSTEM: system, S.PARAM_SEED: seed,
                  S.PARAM_SCORE_WITH: cfg.eval.score_with,
                  **flatten(cfg.model_dump(mode="json", exclude={"provenance"}))}
        tracker.fill(run, params, {}, {S.ARTIFACT_CONFIG: cfg.to_yaml()})
        numbers = {k: float(v) for k, v in (res.get("test") or {}).items()
                   if isinstance(v, (int, float))}
        numbers.update({S.SELECTION: float(res["best_dev_ndcg_at_10"]),
                        S.BEST_EPOCH: float(res["best_epoch"])})
        tracker.log_metrics(run, [Metric(S.mlflow_key(k), v, now, 0) for k, v in numbers.items()])
        tracker.client.log_artifact(run.run_id, str(out_dir / S.ARTIFACT_PER_QUERY))
        tracker.end(run, S.STATUS_FINISHED, None)
