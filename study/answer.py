"""``jepa-study answer``: does the JEPA predictor help retrieval? Controlled, powered, per query.

Per dataset (``docs/answer.md`` gives the design and the measured answer):

1. **Searches.** The JEPA arm and the contrastive arm (``search_spaces.arms``: one space,
   equal effort) are each searched ``--searches`` times with different searcher seeds, each
   search choosing its best config on dev: a recipe is its search, not one lucky draw, and
   the spread between searches is measured.
2. **Nested ablation.** The best contrastive config by dev, C*, gets the predictor: a short
   search of λ_pred and the predictor's shape (``arms.predictor_space``) gives C+pred.
3. **No labels** (``--no-labels``): both arms of the ``no_labels`` space (pairs made from the
   corpus alone), one search each.
4. **Retrained runs** over fresh seeds: every search's best of both arms, C+pred (on the
   seeds of C*'s runs: paired), the best JEPA config J*'s controls (λ_pred = 0, with and
   without a query head of the predictor's shape; paired), the no-label bests; each scores
   the other datasets' test splits zero-shot (transfer). Reference rows: zero-shot, BM25,
   the document prior, all on all/seen/unseen test queries.
5. **Cross-fitted evaluation** (``--crossfit K``): K folds over the train and test queries
   (dev fixed for selection; queries of equal text in one fold); J*, C* and C+pred trained
   on the other folds, at every fresh seed, score each held-out fold, so every query is
   scored by a model that never trained on it; the reference rows and the seen/unseen split
   come from each fold's own training queries: its own tables, apart from the BEIR test
   figures, with its primary comparisons pooled over datasets.
6. The statistics (``analysis.answer``): pre-registered families, paired resampling where
   runs share seeds, Holm within a family, TOST at ±1 point, the pooled primary endpoint.

Everything is resumable: a finished study or run is reused, an interrupted study resumed. The
answer directory holds every study, every retrained run, ``answer.json``, ``.html``, ``.md``
and ``timings.json``; one MLflow store holds the studies' experiments and the answer's own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from analysis import schema as S
from search_spaces.arms import (ARMS, arm_space, predictor_space, retrain_config,
                                searched_with, systems)
from search_spaces.space import load_space, raw_space
from study.launcher import StudyError, StudyOptions
from study.study import option
from study.tracking import StudyTracker

log = logging.getLogger(__name__)

#: seeds of the retrained runs: fresh, none is a search seed (every trial trains with seed 0)
DEFAULT_SEEDS = (1, 2, 3)
SEARCH_SEED = 0
#: the space the no-label arms search
NO_LABELS_SPACE = "no_labels"
#: launch's help of the options an answer shares with it
STUDY_HELP = {f.name: f.metadata.get("help") for f in fields(StudyOptions)}


@dataclass
class AnswerOptions:
    """What ``jepa-study answer`` was asked for; saved in ``answer_options.json``."""

    data: list[str] = option(MISSING, "a BEIR directory; repeat for each dataset (transfer "
                             "between them is scored too)", action="append", metavar="DIR")
    space: str = option("jepa_core", "the space both arms search")
    num_samples: int | None = option(None, "trials per search (default: the space's, divided "
                                     "among the searches)")
    searches: int = option(3, "searches per arm and dataset, with searcher seeds 0, 1, ...: a "
                           "recipe is its search, and their spread is reported")
    pred_samples: int = option(8, "trials of the short search that adds the predictor to the "
                               "best contrastive config (C+pred)")
    no_labels: bool = option(True, "true/false: the no-label arms (pairs from the corpus alone)")
    nolabel_space: str = option(NO_LABELS_SPACE, "the space the no-label arms search")
    nolabel_samples: int = option(12, "trials per no-label arm")
    crossfit: int = option(0, "folds of a cross-fitted evaluation over train and test queries "
                           "(0: none); its own table")
    seeds: list[int] = option(lambda: list(DEFAULT_SEEDS), "fresh seeds of the retrained runs "
                              "(the search uses seed 0)")
    name: str = option("answer", "the answer's name (its directory under --storage)")
    storage: str = option("answers", "parent directory of answers")
    address: str | None = option(None, STUDY_HELP["address"])
    mlflow_uri: str | None = option(None, "tracking URI (default: sqlite store in the answer)")
    max_concurrent_trials: int | None = option(None, STUDY_HELP["max_concurrent_trials"])
    verbose: int = 1

    def __post_init__(self) -> None:
        if not self.data:
            raise StudyError("answer: give at least one --data directory")
        if len(set(self.seeds)) < 2:
            raise StudyError(f"answer: need two or more distinct seeds, got {self.seeds}")
        if SEARCH_SEED in self.seeds:
            raise StudyError(f"answer: seed {SEARCH_SEED} is the search seed; the retrained "
                             "runs need fresh ones")
        for name in ("num_samples", "searches", "pred_samples", "nolabel_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise StudyError(f"answer: --{name.replace('_', '-')} must be at least 1")
        if self.crossfit == 1 or self.crossfit < 0:
            raise StudyError("answer: --crossfit needs at least 2 folds (0: none)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise StudyError(f"answer: --name {self.name!r}: letters, digits, '_', '.', '-'")


def dataset_name(path: str | Path) -> str:
    """A dataset's short name: its directory's name (``.../scifact`` -> ``scifact``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(path).resolve().name).strip("_").lower()


class _Timer:
    """Seconds each phase worked, summed over the invocations that ran it (a resumed answer
    adds what it does; what it reuses costs nothing), kept in ``timings.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.s: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, since: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + time.time() - since
        self.path.write_text(json.dumps(self.s, indent=1))


def answer(opts: AnswerOptions) -> dict[str, Any]:
    """Runs (or resumes) the whole answer; returns where its outputs are and the verdicts.

    Its studies and runs share one Ray session, started at the first study or run that has
    work to do (an answer that reuses everything starts none) and shut down at the end."""
    import ray

    from study.launcher import stop_ray

    owns_ray = not ray.is_initialized()
    try:
        return _answer(opts)
    finally:
        if owns_ray and ray.is_initialized():
            stop_ray()


def _ray_session(opts: AnswerOptions) -> None:
    """Ray for the answer's next study or runs: started once, then reused."""
    from study.launcher import _init_ray

    _init_ray(StudyOptions(address=opts.address, verbose=opts.verbose))


def _answer(opts: AnswerOptions) -> dict[str, Any]:
    from trainables.data import load_beir, resolve_data_dir

    started = time.time()
    root = Path(opts.storage).expanduser().resolve() / opts.name
    root.mkdir(parents=True, exist_ok=True)
    data_dirs = [resolve_data_dir(d) for d in opts.data]
    names = [dataset_name(d) for d in data_dirs]
    if len(set(names)) < len(names):
        raise StudyError(f"answer: two --data directories share a name: {names}")
    load_space(opts.space)  # the spaces are validated before anything runs
    space = raw_space(opts.space)
    nolabel_space = raw_space(opts.nolabel_space) if opts.no_labels else None
    for d in data_dirs:
        load_beir(d)  # a bad dataset fails now, not after an hour of studies
    uri = opts.mlflow_uri or f"sqlite:///{root / 'mlflow.db'}"
    (root / "answer_options.json").write_text(json.dumps(asdict(opts), indent=1))
    timer = _Timer(root / "timings.json")
    per_search = opts.num_samples or max(1, -(-int(space.get("num_samples", 8))
                                             // opts.searches))
    # -- 1-3. the searches, each choosing on dev
    chosen: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for data_dir, ds in zip(data_dirs, names):
        arms = chosen.setdefault(ds, {})
        for arm in ARMS:
            for k in range(opts.searches):
                t0 = time.time()
                raw = searched_with(arm_space(space, arm), _searcher_seed(space, k))
                arms.setdefault(arm, []).append(_study(root, ds, f"{arm}-s{k}", raw, data_dir,
                                                       per_search, opts, uri, k))
                if arms[arm][-1]["ran"]:
                    timer.add(f"search {ds} {arm}", t0)
        best_c = _best(arms["contrastive"])
        t0 = time.time()
        raw = predictor_space(space, best_c["config"], best_c["patience"], opts.pred_samples)
        arms["c_pred"] = [_study(root, ds, "c_pred", raw, data_dir, opts.pred_samples, opts,
                                 uri, 0)]
        if arms["c_pred"][0]["ran"]:
            timer.add(f"search {ds} c_pred", t0)
        if nolabel_space is not None:
            for arm in ARMS:
                t0 = time.time()
                arms[f"nolabel_{arm}"] = [_study(root, ds, f"nolabel_{arm}",
                                                 arm_space(nolabel_space, arm), data_dir,
                                                 opts.nolabel_samples, opts, uri, 0)]
                if arms[f"nolabel_{arm}"][0]["ran"]:
                    timer.add(f"search {ds} nolabel_{arm}", t0)
    # -- 4. the retrained runs, over fresh seeds
    jobs = []
    for data_dir, ds in zip(data_dirs, names):
        others = [str(d) for d, n in zip(data_dirs, names) if n != ds]
        for system, search, cfg, patience in _systems(chosen[ds]):
            for seed in opts.seeds:
                run_cfg = retrain_config(cfg, seed, patience, others,
                                         name=f"{ds}-{system}-s{search}-seed{seed}")
                jobs.append((ds, system, search, seed, run_cfg,
                             root / ds / "runs" / f"{system}-s{search}" / f"seed_{seed}"))
    # -- 5. the cross-fitted evaluation
    folds: dict[str, list[Path]] = {}
    if opts.crossfit:
        for data_dir, ds in zip(data_dirs, names):
            where = root / ds / "crossfit"
            folds[ds] = crossfit_folds(data_dir, _best(chosen[ds]["jepa"])["config"],
                                       opts.crossfit, where)
            jobs += _crossfit_jobs(where, folds[ds], chosen[ds], opts)
    jobs = _share_identical(jobs)
    results = _retrain(jobs, opts, timer)
    t0 = time.time()
    references = {ds: _references(d, _best(chosen[ds]["jepa"])["config"])
                  for d, ds in zip(data_dirs, names)}
    timer.add("reference rows (zero-shot, BM25, doc prior)", t0)
    crossfit_refs = {}
    if folds:
        t0 = time.time()
        crossfit_refs = {ds: _crossfit_references(paths, _best(chosen[ds]["jepa"])["config"])
                         for ds, paths in folds.items()}
        timer.add("cross-fitted reference rows", t0)
    measured = _measured(names, jobs, results, references, crossfit_refs, chosen, opts)
    return _write(root, measured, uri, opts, jobs, results, timer.s, started)


def _searcher_seed(raw: dict[str, Any], k: int) -> int:
    """The searcher seed of an arm's k-th search: the space's seed, then the next ones."""
    return int((raw.get("searcher") or {}).get("seed") or 0) + k


def _best(searches: list[dict[str, Any]]) -> dict[str, Any]:
    """The search whose best trial has the best dev figure (ties: the first search)."""
    return max(searches, key=lambda s: (s["best_dev"], -s["index"]))


def _systems(arms: dict[str, list[dict[str, Any]]]):
    """(system, search index, config, patience) of every config the answer retrains."""
    for arm in ("jepa", "contrastive", "c_pred", "nolabel_jepa", "nolabel_contrastive"):
        for search in arms.get(arm, []):
            yield arm, search["index"], search["config"], search["patience"]
    best_j = _best(arms["jepa"])
    for name, cfg in systems(best_j["config"], best_j["config"]).items():
        if name in ("capacity", "no_pred"):  # J*'s controls, on J*'s seeds
            yield name, best_j["index"], cfg, best_j["patience"]


# -- 1. the studies ----------------------------------------------------------------------------

def _study(root: Path, ds: str, label: str, raw: dict[str, Any], data_dir: Path,
           num_samples: int, opts: AnswerOptions, uri: str, index: int) -> dict[str, Any]:
    """Runs (or resumes, or reuses) one study of the answer; returns its best config, chosen
    on dev and exported (trained to its best epoch, its scoring fixed)."""
    from analysis.export import export_configs
    from study.launcher import launch, resume
    from trainables.config import RunConfig

    raw = dict(raw, num_samples=num_samples)
    if opts.max_concurrent_trials is not None:
        raw["max_concurrent_trials"] = opts.max_concurrent_trials
    space_path = root / ds / "spaces" / f"{label}.yaml"
    space_path.parent.mkdir(parents=True, exist_ok=True)
    space_path.write_text(f"# the {label} study of {opts.space} on {ds}, written by jepa-study "
                          "answer\n" + yaml.safe_dump(raw, sort_keys=False))
    name = f"{ds}-{label}"
    storage = root / ds / "studies"
    study_dir = storage / name
    ran = not (study_dir / "summary.json").exists()
    if ran:
        _ray_session(opts)
        if (study_dir / "study.json").exists():
            log.info("answer: resuming the study %s", name)
            resume(study_dir)
        else:
            log.info("answer: the study %s", name)
            launch(StudyOptions(space=str(space_path), data=str(data_dir), name=name,
                                storage=str(storage), address=opts.address, mlflow_uri=uri,
                                max_concurrent_trials=opts.max_concurrent_trials,
                                verbose=opts.verbose))
    best_dir = root / ds / "best" / label
    shutil.rmtree(best_dir, ignore_errors=True)
    path = export_configs(uri, name, best_dir, top=1)[0]
    cfg = RunConfig.from_yaml(path)
    summary = json.loads((study_dir / "summary.json").read_text())
    return {"config": cfg, "label": label, "index": index, "study": name,
            "study_dir": str(study_dir), "exported": str(path),
            "searcher_seed": (raw.get("searcher") or {}).get("seed"),
            "trials": summary.get("trials"), "errored": summary.get("errored"),
            "best_dev": float(cfg.provenance.get("value", "nan")),
            "best_epoch": cfg.provenance.get("best_epoch"),
            "scoring": cfg.eval.score_with, "trial_id": cfg.provenance.get("trial_id"),
            "patience": _patience(cfg), "wall_s": summary.get("wall_s"), "ran": ran}


def _patience(cfg) -> int | None:
    """The trial's patience, which export replaced by its best epoch (provenance keeps it)."""
    text = cfg.provenance.get("patience", "None")
    return None if text in ("None", "") else int(text)


# -- 5. cross-fitting --------------------------------------------------------------------------

def _crossfit_jobs(where: Path, folds: list[Path], arms: dict[str, list[dict[str, Any]]],
                   opts: AnswerOptions) -> list[tuple]:
    """One run per fold and fresh seed of J*, C* and C+pred, each on a BEIR directory whose
    test split is the fold (``crossfit_folds``): a claim on cross-fitted queries rests on
    seeds as on the BEIR split, and C+pred shares C*'s seeds (paired)."""
    jobs = []
    chosen = {"jepa": _best(arms["jepa"]), "contrastive": _best(arms["contrastive"]),
              "c_pred": arms["c_pred"][0]}
    for system, search in chosen.items():
        for seed in opts.seeds:
            for k, fold_dir in enumerate(folds):
                cfg = retrain_config(search["config"], seed, search["patience"], [],
                                     name=f"crossfit-{system}-seed{seed}-fold{k}"
                                     ).with_overrides({"data.path": str(fold_dir)}, "crossfit")
                jobs.append((where.parent.name, f"crossfit:{system}", k, seed, cfg,
                             where / "runs" / system / f"seed_{seed}" / f"fold_{k}"))
    return jobs


def _crossfit_references(folds: list[Path], cfg) -> dict[str, Any]:
    """The reference rows on the cross-fitted queries: each fold's test queries scored as
    its runs' are (zero-shot, BM25, the doc prior counting that fold's training positives),
    and the queries seen by that fold's training split; the folds' figures joined."""
    per_query: dict[str, dict[str, float]] = {}
    subsets: dict[str, list[str]] = {}
    for fold in folds:
        rows = _references(fold, cfg)
        for name, values in rows["per_query"].items():
            per_query.setdefault(name, {}).update(values)
        for name, ids in rows["subsets"]["test"].items():
            subsets.setdefault(name, []).extend(ids)
    return {"per_query": per_query, "subsets": {"test": subsets}}


def crossfit_folds(data_dir: Path, cfg, k: int, where: Path) -> list[Path]:
    """``k`` BEIR directories over ``data_dir``'s train and test queries, one a fold.

    Dev (the split every choice is made on, as ``cfg.data`` makes it) is left out of the
    folds and is the same ``dev.tsv`` in each; queries of equal text (lower-cased, spaces
    collapsed) go to one fold; the queries are dealt to folds in a seeded order
    (``cfg.data.split_seed``). Fold ``i``'s directory has the other folds as ``train.tsv``
    and fold ``i`` as ``test.tsv``; its corpus and queries are links to the dataset's, so
    its base features are the dataset's (the cache is keyed by content).
    """
    import random

    from trainables.data import load_beir, split_for

    data = load_beir(data_dir)
    splits = split_for(data, cfg.data)
    dev = splits["dev"]
    pool: dict[str, dict[str, int]] = {}
    for name in ("train", "test"):
        for q, docs in splits[name].items():
            if q not in dev:
                pool.setdefault(q, {}).update(docs)
    groups: dict[str, list[str]] = {}
    for q in sorted(pool):
        groups.setdefault(" ".join(data.queries[q].lower().split()), []).append(q)
    order = sorted(groups)
    random.Random(cfg.data.split_seed).shuffle(order)
    fold_of = {q: i % k for i, text in enumerate(order) for q in groups[text]}
    paths = []
    for i in range(k):
        fold = where / "folds" / f"fold_{i}"
        (fold / "qrels").mkdir(parents=True, exist_ok=True)
        for name in ("corpus.jsonl", "queries.jsonl"):
            link = fold / name
            if not link.exists():
                os.symlink(Path(data_dir).resolve() / name, link)
        parts = {"train": {q: d for q, d in pool.items() if fold_of[q] != i},
                 "dev": dev, "test": {q: d for q, d in pool.items() if fold_of[q] == i}}
        for name, qrels in parts.items():
            (fold / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
                f"{q}\t{d}\t{r}\n" for q in sorted(qrels) for d, r in sorted(qrels[q].items())))
        paths.append(fold)
    return paths


# -- 4. the retrained runs ---------------------------------------------------------------------

def _share_identical(jobs: list[tuple]) -> list[tuple]:
    """Jobs whose training is identical (the same config and seed, its name and provenance
    aside: two searches that ended on the same config, say) share the first one's run: its
    config and directory. Each job keeps its own system, search and seed in the tables."""
    first: dict[str, tuple] = {}
    out = []
    for *label, cfg, run_dir in jobs:
        key = json.dumps(cfg.model_dump(mode="json", exclude={"name", "provenance"}),
                         sort_keys=True)
        cfg, run_dir = first.setdefault(key, (cfg, run_dir))
        out.append((*label, cfg, run_dir))
    return out


def _retrain(jobs: list[tuple], opts: AnswerOptions, timer: _Timer) -> list[dict[str, Any]]:
    """Trains every job (Ray tasks, one CPU each), once per run directory (jobs that share
    one, :func:`_share_identical`, train once), reusing runs already finished; returns every
    job's summary. The time spent training is added to ``timer`` also when the invocation is
    interrupted (its finished runs are kept and reused by the next one)."""
    import ray

    unique = {str(out): (cfg, out) for *_, cfg, out in jobs}
    done = {key: _finished(cfg, out) for key, (cfg, out) in unique.items()}
    todo = [key for key, r in done.items() if r is None]
    if todo:
        t0 = time.time()
        _ray_session(opts)
        try:
            task = ray.remote(num_cpus=1, max_retries=2)(_train_one)
            refs = {key: task.remote(unique[key][0].to_dict(), key) for key in todo}
            for key, ref in refs.items():
                done[key] = ray.get(ref)
        finally:
            timer.add("retrained runs", t0)
    return [done[str(out)] for *_, out in jobs]  # type: ignore[misc]


def _train_one(cfg_dict: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """One retrained run (a Ray task): train, then its summary with per-query figures.

    A finished run is its figures, its config and its kept best-epoch weights: its resume
    checkpoints are deleted (three of ~0.4 GB for a 1,024-d bidirectional head; an answer
    with ``--crossfit 5`` has ~150 runs, and kept them all filled the disk)."""
    import torch

    from trainables.config import RunConfig
    from trainables.loop import checkpoint_dirs, train

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict, "answer run")
    result = train(cfg, out_dir=Path(out_dir), progress=False)
    for done in checkpoint_dirs(Path(out_dir)):
        shutil.rmtree(done, ignore_errors=True)
    return _summary(result)


def _finished(cfg, out_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run of exactly ``cfg`` in ``out_dir``, else None."""
    from trainables.config import RunConfig

    if not (out_dir / "metrics.json").exists() or not (out_dir / "config.yaml").exists():
        return None
    if RunConfig.from_yaml(out_dir / "config.yaml").to_dict() != cfg.to_dict():
        raise StudyError(f"{out_dir} holds a run of another config: remove it or use "
                         "another --name")
    return _summary(json.loads((out_dir / "metrics.json").read_text()))


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("best_epoch", "best_dev_ndcg_at_10", "score_with",
                                       "end_reason", "test", "test_per_query",
                                       "transfer_per_query", "subsets")}


def _references(data_dir: Path, cfg) -> dict[str, Any]:
    """The reference rows (zero-shot, BM25, document prior) on the dataset's test split, per
    query, and its seen/unseen test queries (``trainables.references``)."""
    from trainables.references import reference_rows

    return reference_rows(cfg.with_overrides({"data.path": str(data_dir)}, "reference"))


# -- 3. the table ------------------------------------------------------------------------------

def _measured(names, jobs, results, references, crossfit_refs, chosen, opts):
    from analysis.answer import (Measured, Run, Search, System, describe_budget,
                                 describe_config)

    measured = []
    for ds in names:
        found: dict[str, System] = {}
        crossfit: dict[str, dict[str, dict[str, float]]] = {}
        for (d, system, search, seed, cfg, _), res in zip(jobs, results):
            if d != ds:
                continue
            if system.startswith("crossfit:"):  # every fold's queries, one model each
                crossfit.setdefault(system.split(":", 1)[1], {}).setdefault(
                    str(seed), {}).update(res["test_per_query"][res["score_with"]])
                continue
            s = found.setdefault(system, System(system, cfg.eval.score_with, []))
            s.runs.append(Run(seed=seed, search=search, dev=res["best_dev_ndcg_at_10"],
                              best_epoch=res["best_epoch"], per_query=res["test_per_query"],
                              transfer=res.get("transfer_per_query") or {},
                              scoring=cfg.eval.score_with))
        arms = chosen[ds]
        best = {arm: _best(searches) for arm, searches in arms.items()}
        j, c = best["jepa"], best["contrastive"]
        searches = [Search(arm=arm, index=x["index"], searcher_seed=x["searcher_seed"],
                           trials=x["trials"], best_trial=x["trial_id"],
                           best_dev=x["best_dev"], best_epoch=x["best_epoch"],
                           scoring=x["scoring"], config=describe_config(x["config"]))
                    for arm, xs in arms.items() for x in xs]
        design = {
            "space": opts.space,
            "searches per arm": f"{opts.searches} (searcher seeds "
                                f"{sorted({x['searcher_seed'] for x in arms['jepa']})}), "
                                f"{j['trials']} trials each",
            "budget": describe_budget(j["config"], j["patience"]),
            "seeds (fresh; every trial of a search trains with seed 0)": list(opts.seeds),
            "best_search": {arm: x["index"] for arm, x in best.items()},
            "J* (best JEPA search by dev)": describe_config(j["config"]),
            "C* (best contrastive search by dev)": describe_config(c["config"]),
            "C+pred": (f"C* with the predictor, a {arms['c_pred'][0]['trials']}-trial search "
                       f"of λ_pred and its shape: " + describe_config(
                           arms["c_pred"][0]["config"])),
            **{f"no {system} control": "J* has no term left without L_pred"
               for system in ("capacity", "no_pred") if system not in found},
        }
        if "nolabel_jepa" in arms:
            design["no labels"] = (
                f"the {opts.nolabel_space} space's arms, trained on pairs made from the corpus "
                f"alone, {arms['nolabel_jepa'][0]['trials']} trials each, selected on the "
                f"labelled dev split ({_dev_queries(arms['nolabel_jepa'][0])} queries)")
        cross = crossfit_refs.get(ds) or {"per_query": {}, "subsets": {"test": {}}}
        if opts.crossfit:
            n_seen = len(cross["subsets"]["test"].get("seen", []))
            design["cross-fitted"] = (
                f"{opts.crossfit} folds over train and test queries (dev fixed), J*, C* and "
                f"C+pred at seeds {list(opts.seeds)}: "
                f"{len(cross['per_query'].get('zero_shot', {}))} queries, {n_seen} of them "
                f"seen by their fold's training queries")
        shared = sorted({f"{system}-s{search}" for (d, system, search, _, _, out) in jobs
                         if d == ds and not system.startswith("crossfit:")
                         and not out.parent.name == f"{system}-s{search}"})
        if shared:
            design["runs shared"] = (f"{', '.join(shared)}: the same config as an earlier "
                                     "system's (trained once, its runs reused)")
        ref = references[ds]
        measured.append(Measured(dataset=ds, systems=found, references=ref["per_query"],
                                 subsets=ref["subsets"]["test"], design=design,
                                 searches=searches, crossfit=crossfit or None,
                                 crossfit_references=cross["per_query"],
                                 crossfit_subsets=cross["subsets"]["test"]))
    return measured


def _dev_queries(search: dict[str, Any]) -> int | str:
    """How many labelled dev queries chose a study's best (its best trial's dev split)."""
    from trainables.data import load_beir, split_for

    cfg = search["config"]
    try:
        return len(split_for(load_beir(cfg.data.path), cfg.data)["dev"])
    except Exception:  # noqa: BLE001 - a description only
        return "?"


def _write(root: Path, measured, uri: str, opts: AnswerOptions, jobs, results,
           timings: dict[str, float], started: float) -> dict[str, Any]:
    from analysis.answer import answer_dict
    from analysis.answer_render import TEST_HEADING, dumps, html_report, markdown

    result = answer_dict(measured)
    result["timings_s"] = {**{k: round(v, 1) for k, v in timings.items()},
                           "total (sum of the phases)": round(sum(timings.values()), 1),
                           "this invocation": round(time.time() - started, 1)}
    result["command"] = command_line(opts)
    paths = {"json": root / "answer.json", "html": root / "answer.html",
             "md": root / "answer.md"}
    paths["json"].write_text(dumps(result))
    time_section = "## Time\n\n" + "\n".join(
        f"- {k}: {v:.0f} s" for k, v in result["timings_s"].items()) + "\n\n"
    md = markdown(result).replace(TEST_HEADING, time_section + TEST_HEADING, 1)
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
    for family, rows in result["comparisons"].items():
        for row in rows:
            key = S.mlflow_key(f"{family}.{row.get('dataset', 'pooled')}.{row['comparison']}")
            numbers.update({f"{key}.diff_points": row["diff_points"],
                            f"{key}.ci_adjusted_low": row.get("adj_ci_low_points"),
                            f"{key}.ci_adjusted_high": row.get("adj_ci_high_points")})
    numbers = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and v == v}
    # the latest figures, over the point an earlier invocation logged
    tracker.client.log_batch(parent.run_id, metrics=[Metric(k, float(v), now, 0)
                                                     for k, v in numbers.items()])
    tracker.end(parent, S.STATUS_FINISHED, None)
    for (ds, system, search, seed, cfg, out_dir), res in zip(jobs, results):
        run = tracker.run(f"{ds}/{system}/{search}/{seed}")
        if run.status == S.STATUS_FINISHED:
            continue
        params = {S.PARAM_DATASET: ds, S.PARAM_SYSTEM: system, S.PARAM_SEED: seed,
                  "search": search, "run_dir": str(out_dir),
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
