"""The answer's tables: does the JEPA predictor help retrieval? Statistics, verdicts, findings.

Input is what ``jepa-study answer`` measured, one :class:`Measured` per dataset: each search
of each arm (:class:`Search`, the *search spread*), the retrained runs of each system
(:class:`System` of :class:`Run`, per-query test nDCG@10 under both scorings and on the other
collections), the reference rows (zero-shot, BM25, document prior), the seen/unseen test
queries (``trainables.subsets``) and, optionally, cross-fitted per-query figures with their
own reference rows and seen/unseen queries (seen against each fold's training queries).

The systems (any may be missing; its comparisons are then skipped and noted in the design):

* ``jepa`` (J): every JEPA search's best config, each over the fresh seeds (``Run.search``
  says which search); J* is the best search's by dev.
* ``contrastive`` (C): likewise for the contrastive arm; C* is its best search's.
* ``c_pred`` (C+pred): C* with the predictor added (λ_pred and shape chosen on dev), over
  C*'s seeds.
* ``capacity`` / ``no_pred``: J* with λ_pred = 0, with / without a query head of the
  predictor's shape, over J*'s seeds.
* ``nolabel_jepa`` / ``nolabel_contrastive``: the arms' best configs trained on pairs made
  from the corpus alone (one search each), over seeds.

Which search is the best is read from ``design["best_search"]`` (``{system: search index}``,
e.g. ``{"jepa": 1, "contrastive": 0}``); where a system is not named there, the search of
that arm with the highest ``best_dev`` in ``Measured.searches``, else the runs' only search.

The pre-registered comparisons are :data:`COMPARISONS`; :data:`FAMILIES` says how they are
grouped for multiplicity (Holm p's and Bonferroni-adjusted intervals within a family, the
verdict word following the adjusted interval and the TOST at ±1 point:
:func:`analysis.stats.compare_all`). Units: a *recipe-level* side is the set of its searches,
each row the mean over that search's seeds (a recipe is its search, not one lucky draw;
a system with a single search falls back to its seeds); a *best* side is the best search's
runs, one row a seed; a reference is one row (resampled over queries only). Paired sides
are aligned by seed (by search and seed where a system is compared with itself), and
seeds only one side has are left out, with a note.

Test figures enter here only: every choice before (configs, epochs, scoring, the best
search) was made on dev. The sentences and renderings are in :mod:`analysis.answer_render`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from analysis.answer_render import (describe_budget, describe_config, dumps, findings,
                                    html_report, markdown, prior_clauses, verdicts)
from analysis.stats import compare_all, per_query_matrix

__all__ = ["COMPARISONS", "FAMILIES", "Measured", "Run", "Search", "Side", "Spec", "System",
           "answer_dict", "best_search", "comparisons", "crossfit_rows", "plan_rows",
           "search_rows", "system_rows",
           # re-exported from analysis.answer_render
           "describe_budget", "describe_config", "dumps", "findings", "html_report",
           "markdown", "verdicts"]

#: the trained systems, in table order, and what each is
SYSTEMS = {
    "jepa": "J: every JEPA search's best config (L_pred on), over seeds",
    "contrastive": "C: every contrastive search's best config (λ_pred = 0), over seeds",
    "c_pred": "C+pred: C* with the predictor added (λ_pred and shape by dev)",
    "capacity": "J* with λ_pred = 0 and a query head of the predictor's shape",
    "no_pred": "J* with λ_pred = 0, nothing else changed",
    "nolabel_jepa": "no-label J: the JEPA arm's best, trained on corpus pairs only",
    "nolabel_contrastive": "no-label C: the contrastive arm's best, on corpus pairs only",
}
#: the reference rows, in table order
REFERENCES = {
    "zero_shot": "zero-shot base encoder (cosine), no training",
    "bm25": "BM25 (bm25s), no training",
    "doc_prior": "zero-shot + β·log(1 + times a document was a train positive), β by dev",
}
SUBSETS = ("seen", "unseen")

#: The families, in report order: name -> what the family answers.
FAMILIES = {
    "primary": "primary endpoints: the mean over datasets of the per-dataset differences",
    "primary_per_dataset": "the primary comparisons on each dataset",
    "diagnostic": "why: J's scorings, J* without L_pred or with its capacity, transfer",
    "subsets": "seen and unseen test queries; the trained systems against the doc prior",
    "no_labels": "trained on the corpus alone (no labels)",
    "crossfit_pooled": "cross-fitted primary endpoints: the mean over datasets of the "
                       "per-dataset differences on cross-fitted queries",
    "crossfit": "cross-fitted train ∪ test queries, each scored by a model trained "
                "without it (apart from the BEIR test figures)",
    "crossfit_subsets": "seen and unseen cross-fitted queries (seen: a relevant document was "
                        "a positive of the fold's training queries); against the doc prior "
                        "and zero-shot on the same queries",
}

# How a side's rows are chosen (Side.select).
RECIPE = "recipe"        # every search: a row is a search's mean over its seeds
BEST = "best"            # the best search's runs: a row is a seed
RUNS = "runs"            # every run: a row is a seed (or a search and seed)
REFERENCE = "reference"  # one reference row
CROSSFIT = "crossfit"    # Measured.crossfit[system]: a row is a seed


@dataclass(frozen=True)
class Side:
    """One side of a comparison.

    Attributes:
        source: A system name, or a reference name for ``select == "reference"``.
        select: ``recipe``, ``best``, ``runs``, ``reference`` or ``crossfit`` (above).
        scoring: ``query`` or ``predictor``; None for the one dev chose for each run.
        label: Its short name in the tables (``J``, ``C*``, ``zero-shot``).
    """

    source: str
    select: str = RUNS
    scoring: str | None = None
    label: str = ""


@dataclass(frozen=True)
class Spec:
    """A pre-registered comparison.

    Attributes:
        name: Its name in the tables.
        family: Family of its per-dataset rows on all queries.
        a, b: The sides; the difference is A - B.
        paired: Seeds paired (the same seed's init and batches, or the same run).
        on: ``test``, ``transfer`` (each other collection) or ``crossfit``.
        subsets: Query sets: ``all``, ``seen``, ``unseen``.
        pooled: The family of its row pooled over datasets (a primary endpoint); None: not
            pooled.
        subset_family: The family of its rows on the seen/unseen subsets.
    """

    name: str
    family: str
    a: Side
    b: Side
    paired: bool = False
    on: str = "test"
    subsets: tuple[str, ...] = ("all",)
    pooled: str | None = None
    subset_family: str = "subsets"


_J = Side("jepa", RECIPE, label="J")
_C = Side("contrastive", RECIPE, label="C")
_JS = Side("jepa", BEST, label="J*")
_CS = Side("contrastive", BEST, label="C*")
_CP = Side("c_pred", BEST, label="C+pred")
_ZS = Side("zero_shot", REFERENCE, label="zero-shot")
_DP = Side("doc_prior", REFERENCE, label="doc prior")
_NJ = Side("nolabel_jepa", BEST, label="no-label J")
_NC = Side("nolabel_contrastive", BEST, label="no-label C")
_ALL3 = ("all", "seen", "unseen")
_CROSSFIT = dict(on="crossfit", subset_family="crossfit_subsets")
_JX = Side("jepa", CROSSFIT, label="J*")
_CX = Side("contrastive", CROSSFIT, label="C*")

#: The pre-registered comparisons, in report order.
COMPARISONS: tuple[Spec, ...] = (
    Spec("J vs tuned contrastive", "primary_per_dataset", _J, _C, subsets=_ALL3,
         pooled="primary"),
    Spec("C+pred vs C", "primary_per_dataset", _CP, _CS, paired=True, subsets=_ALL3,
         pooled="primary"),
    Spec("predictor vs query scoring of J", "diagnostic",
         Side("jepa", RUNS, "predictor", "J (predictor)"),
         Side("jepa", RUNS, "query", "J (query)"), paired=True),
    Spec("J* vs no L_pred", "diagnostic", _JS, Side("no_pred", RUNS, label="J* λ_pred=0"),
         paired=True),
    Spec("J* vs capacity-matched", "diagnostic", _JS,
         Side("capacity", RUNS, label="J* λ_pred=0 + head"), paired=True),
    Spec("J vs tuned contrastive (transfer)", "diagnostic", _J, _C, on="transfer"),
    Spec("J* vs doc prior", "subsets", _JS, _DP, subsets=SUBSETS),
    Spec("C* vs doc prior", "subsets", _CS, _DP, subsets=SUBSETS),
    Spec("J* vs zero-shot", "subsets", _JS, _ZS, subsets=SUBSETS),
    Spec("no-label J vs no-label C", "no_labels", _NJ, _NC, subsets=_ALL3),
    Spec("no-label J vs zero-shot", "no_labels", _NJ, _ZS, subsets=_ALL3),
    Spec("no-label C vs zero-shot", "no_labels", _NC, _ZS, subsets=_ALL3),
    Spec("J* vs C* (cross-fitted)", "crossfit", _JX, _CX, subsets=_ALL3,
         pooled="crossfit_pooled", **_CROSSFIT),
    Spec("C+pred vs C* (cross-fitted)", "crossfit", Side("c_pred", CROSSFIT, label="C+pred"),
         _CX, paired=True, subsets=_ALL3, pooled="crossfit_pooled", **_CROSSFIT),
    Spec("J* vs doc prior (cross-fitted)", "crossfit_subsets", _JX, _DP, subsets=SUBSETS,
         **_CROSSFIT),
    Spec("C* vs doc prior (cross-fitted)", "crossfit_subsets", _CX, _DP, subsets=SUBSETS,
         **_CROSSFIT),
    Spec("J* vs zero-shot (cross-fitted)", "crossfit_subsets", _JX, _ZS, subsets=SUBSETS,
         **_CROSSFIT),
)


# -- the data model ----------------------------------------------------------------------------

@dataclass
class Run:
    """One retrained run of a system.

    Attributes:
        seed: Its fresh training seed.
        search: Which search's best config it retrains (0 where a system has one config).
        dev: Its best dev nDCG@10.
        best_epoch: The epoch kept.
        per_query: Scoring (``query``/``predictor``) -> {query id: test nDCG@10}.
        transfer: Other collection -> scoring -> {query id: nDCG@10}.
        scoring: The scoring dev chose for this run's config; None: the system's.
    """

    seed: int
    search: int = 0
    dev: float = math.nan
    best_epoch: int = 0
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)
    transfer: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    scoring: str | None = None


@dataclass
class System:
    """A system's runs; ``scoring`` is the one dev chose (a run's own ``scoring`` wins)."""

    name: str
    scoring: str
    runs: list[Run]


@dataclass
class Search:
    """One search of one arm (``jepa``, ``contrastive``, ``nolabel_jepa``,
    ``nolabel_contrastive``, ``c_pred``): its dev result; ``config`` is
    :func:`describe_config`'s text of its best."""

    arm: str
    index: int
    searcher_seed: int | None
    trials: int | None
    best_trial: str | None
    best_dev: float
    best_epoch: int | None
    scoring: str
    config: str


@dataclass
class Measured:
    """Everything the answer measured on one dataset.

    Attributes:
        dataset: Its name.
        systems: Name -> :class:`System` (names as in :data:`SYSTEMS`).
        references: ``zero_shot``, ``bm25``, ``doc_prior`` -> {query id: test nDCG@10}.
        subsets: ``{"seen": [ids], "unseen": [ids]}`` of the test split; empty: the
            seen/unseen rows are skipped (noted).
        design: Shown in the design section; ``best_search`` ({system: search index})
            names each arm's best search by dev.
        searches: Every search of every arm.
        crossfit: System -> {str(seed): {query id: nDCG@10}} over train ∪ test queries,
            each scored by a model trained without it; None: no cross-fitted table.
        crossfit_references: The reference rows on the same queries, each fold's from its
            own training queries (the doc prior's counts, β by dev).
        crossfit_subsets: ``{"seen": [ids], "unseen": [ids]}`` of the cross-fitted queries,
            seen against the training queries of the query's fold.
    """

    dataset: str
    systems: dict[str, System]
    references: dict[str, dict[str, float]]
    subsets: dict[str, list[str]] = field(default_factory=dict)
    design: dict[str, Any] = field(default_factory=dict)
    searches: list[Search] = field(default_factory=list)
    crossfit: dict[str, dict[str, dict[str, float]]] | None = None
    crossfit_references: dict[str, dict[str, float]] = field(default_factory=dict)
    crossfit_subsets: dict[str, list[str]] = field(default_factory=dict)

    def queries(self, on: str) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
        """The reference rows and seen/unseen ids of the queries a spec is ``on``."""
        if on == "crossfit":
            return self.crossfit_references, self.crossfit_subsets
        return self.references, self.subsets


def _scoring(system: System, run: Run, scoring: str | None = None) -> str:
    return scoring or run.scoring or system.scoring


def _values(system: System, run: Run, scoring: str | None = None,
            target: str | None = None) -> dict[str, float] | None:
    """A run's per-query figures (on ``target``: a transfer collection); None if absent."""
    source = run.per_query if target is None else run.transfer.get(target, {})
    return source.get(_scoring(system, run, scoring))


def best_search(m: Measured, system: str) -> int | None:
    """The index of ``system``'s best search by dev (see the module docstring)."""
    named = (m.design.get("best_search") or {}).get(system)
    if named is not None:
        return int(named)
    searches = [s for s in m.searches if s.arm == system]
    if searches:
        return max(searches, key=lambda s: s.best_dev).index
    found = {r.search for r in m.systems[system].runs} if system in m.systems else set()
    return found.pop() if len(found) == 1 else None


# -- the comparisons ---------------------------------------------------------------------------

Units = dict[Any, dict[str, float]]


def _side_units(m: Measured, side: Side, target: str | None,
                on: str = "test") -> tuple[Units, str] | str:
    """A side's rows as {unit key: {qid: value}} and the unit's word, or why it has none."""
    if side.select == REFERENCE:
        references = m.queries(on)[0]
        if side.source not in references:
            return f"no {side.source} reference row" + (" on them" if on == "crossfit" else "")
        return {"reference": references[side.source]}, "reference"
    if side.select == CROSSFIT:
        per_seed = (m.crossfit or {}).get(side.source)
        if not per_seed:
            return f"no cross-fitted {side.source} runs"
        return {int(s) if str(s).isdigit() else s: v for s, v in per_seed.items()}, "seeds"
    system = m.systems.get(side.source)
    if system is None or not system.runs:
        return f"no {side.source} system"
    runs = system.runs
    if side.select == BEST:
        best = best_search(m, side.source)
        if best is None:
            return (f"no best search known for {side.source}: name it in "
                    f"design['best_search'] or give its searches")
        runs = [r for r in runs if r.search == best]
        if not runs:
            return f"no runs of {side.source}'s best search ({best})"
    values = []
    for r in runs:
        v = _values(system, r, side.scoring, target)
        if v is None:
            return (f"{side.source} seed {r.seed} has no {_scoring(system, r, side.scoring)}"
                    f"-scored figures" + (f" on {target}" if target else ""))
        values.append((r, v))
    searches = sorted({r.search for r, _ in values})
    if side.select == RECIPE and len(searches) > 1:
        return {("search", s): _mean_dict([v for r, v in values if r.search == s])
                for s in searches}, "searches"
    keyed: Units = {}
    for r, v in values:
        key = r.seed if len(searches) == 1 else (r.search, r.seed)
        if key in keyed:
            raise ValueError(f"{m.dataset}: {side.source} has two runs of seed {r.seed} in "
                             f"search {r.search}")
        keyed[key] = v
    return keyed, "seeds" if len(searches) == 1 else "runs"


def _mean_dict(per_run: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The per-query mean over runs, on the queries every run scored."""
    qids = set.intersection(*(set(v) for v in per_run))
    return {q: sum(v[q] for v in per_run) / len(per_run) for q in qids}


@dataclass
class _Built:
    a: list[dict[str, float]]
    b: list[dict[str, float]]
    unit_a: str
    unit_b: str
    qids: list[str]
    notes: list[str]


def _build(m: Measured, spec: Spec, target: str | None) -> _Built | str:
    """The two sides' rows, aligned for a paired spec, on their common queries."""
    sides = []
    for side in (spec.a, spec.b):
        got = _side_units(m, side, target, spec.on)
        if isinstance(got, str):
            return got
        sides.append(got)
    (ua, wa), (ub, wb) = sides
    notes = []
    if spec.paired:
        common = sorted(set(ua) & set(ub), key=str)
        if not common:
            return "no seed in common for the paired comparison"
        dropped = sorted(set(ua) ^ set(ub), key=str)
        if dropped:
            notes.append(f"unpaired seeds left out: {dropped}")
        a, b = [ua[k] for k in common], [ub[k] for k in common]
    else:
        a, b = [ua[k] for k in sorted(ua, key=str)], [ub[k] for k in sorted(ub, key=str)]
    every = a + b
    qids = set.intersection(*(set(v) for v in every))
    left_out = len(set().union(*every)) - len(qids)
    if left_out:
        notes.append(f"{left_out} queries not scored by every row left out")
    return _Built(a, b, wa, wb, sorted(qids), notes)


def _targets(m: Measured, spec: Spec) -> list[str | None]:
    """The transfer collections a transfer spec is measured on; [None] otherwise."""
    if spec.on != "transfer":
        return [None]
    found = {t for side in (spec.a, spec.b) if side.source in m.systems
             for r in m.systems[side.source].runs for t in r.transfer}
    return sorted(found) or [None]


@dataclass
class _Row:
    """One comparison of one dataset, ready for its family."""

    family: str
    key: str
    pair: tuple[Any, Any]
    paired: bool
    label: dict[str, Any]


def _dataset_rows(m: Measured, spec: Spec, notes: list[str]) -> list[_Row]:
    """A spec's comparisons on one dataset (each target, each query subset); what had to
    be skipped goes to ``notes``."""
    if spec.on == "crossfit" and m.crossfit is None:
        return []  # the optional table: nothing to note
    rows = []
    subsets = m.queries(spec.on)[1]
    for target in _targets(m, spec):
        where = spec.name + (f" on {target}" if target else "")
        built = ("no transfer collection scored" if spec.on == "transfer" and target is None
                 else _build(m, spec, target))
        if isinstance(built, str):
            notes.append(f"{where}: skipped ({built})")
            continue
        notes += [f"{where}: {n}" for n in built.notes]
        for subset in spec.subsets:
            if subset != "all" and subset not in subsets:
                notes.append(f"{where} on {subset} queries: skipped (no seen/unseen split)")
                continue
            keep = set(subsets[subset]) if subset != "all" else None
            qids = [q for q in built.qids if keep is None or q in keep]
            if len(qids) < 2:
                notes.append(f"{where} on {subset} queries: skipped ({len(qids)} queries)")
                continue
            label = {"dataset": m.dataset, "subset": subset, "target": target,
                     "comparison": spec.name, "a": spec.a.label, "b": spec.b.label,
                     "units_a": built.unit_a, "units_b": built.unit_b, "on": spec.on}
            rows.append(_Row(
                family=spec.subset_family if subset != "all" else spec.family,
                key=f"{m.dataset}: {where}" + ("" if subset == "all" else f" [{subset}]"),
                pair=(per_query_matrix(built.a, qids)[0], per_query_matrix(built.b, qids)[0]),
                paired=spec.paired, label=label))
    return rows


def _plan(measured: Sequence[Measured]):
    """Every comparison's data, by family; labels; paired flags; notes per dataset."""
    pairs: dict[str, dict[str, Any]] = {f: {} for f in FAMILIES}
    paired: dict[str, dict[str, bool]] = {f: {} for f in FAMILIES}
    labels: dict[str, dict[str, Any]] = {}
    notes: dict[str, list[str]] = {m.dataset: [] for m in measured}
    pooled: dict[tuple[str, str], list[_Row]] = {}
    for m in measured:
        for spec in COMPARISONS:
            for row in _dataset_rows(m, spec, notes[m.dataset]):
                pairs[row.family][row.key] = row.pair
                paired[row.family][row.key] = row.paired
                labels[row.key] = row.label
                if spec.pooled and row.label["subset"] == "all":
                    pooled.setdefault((spec.pooled, spec.name), []).append(row)
    for (family, name), rows in pooled.items():  # the endpoints: {dataset: (a, b)}
        key = f"pooled: {name}"
        pairs[family][key] = {r.label["dataset"]: r.pair for r in rows}
        paired[family][key] = rows[0].paired
        labels[key] = {**rows[0].label, "dataset": "pooled"}
    return pairs, paired, labels, notes


def _comparisons(measured: Sequence[Measured], **kwargs: Any):
    pairs, paired, labels, notes = _plan(measured)
    out: dict[str, list[dict[str, Any]]] = {}
    for family, family_pairs in pairs.items():
        rows = compare_all(family_pairs, family=family, paired=paired[family],
                           **kwargs) if family_pairs else []
        out[family] = [{**labels[r.name], **r.to_dict()} for r in rows]
    return out, notes


def comparisons(measured: Sequence[Measured], **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Every pre-registered comparison (:data:`COMPARISONS`), by family (:data:`FAMILIES`).

    Args:
        measured: One :class:`Measured` per dataset.
        **kwargs: Passed to :func:`analysis.stats.compare_all` (``n_boot``, ``n_resamples``,
            ``margin_points``, ``confidence``, ``seed``).

    Returns:
        ``{family: [row]}``, every family present (empty where nothing was measured); a row
        is a :class:`analysis.stats.Comparison` dict plus ``dataset`` (``pooled`` for a
        pooled endpoint, whose ``datasets`` lists them), ``subset`` (all/seen/unseen),
        ``target`` (transfer collection or None), ``comparison``, ``a``, ``b``, ``units_a``,
        ``units_b`` (searches/seeds/runs/reference) and ``on``.
    """
    return _comparisons(measured, **kwargs)[0]


# -- systems and searches ----------------------------------------------------------------------

def _avg(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = _avg(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean_on(values: Mapping[str, float] | None, ids: set[str] | None) -> float:
    if values is None:
        return math.nan
    kept = [v for q, v in values.items() if ids is None or q in ids]
    return sum(kept) / len(kept) if kept else math.nan


def _spread(per_search: Mapping[int, list[float]]) -> dict[str, float]:
    """Mean over searches of each search's mean over runs, the seed and search spread."""
    means = [_avg(v) for v in per_search.values()]
    seed_stds = [_std(v) for v in per_search.values() if len(v) > 1]
    return {"mean": _avg(means), "seed_std": _avg(seed_stds) if seed_stds else math.nan,
            "search_std": _std(means), "search_min": min(means, default=math.nan),
            "search_max": max(means, default=math.nan)}


def _by_search(runs: Sequence[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (r.search, r.seed)):
        out.setdefault(r.search, []).append(r)
    return out


def _subset_ids(m: Measured, on: str = "test") -> dict[str, set[str] | None]:
    subsets = m.queries(on)[1]
    return {"all": None, **{s: set(subsets[s]) for s in SUBSETS if s in subsets}}


def _system_row(m: Measured, s: System) -> dict[str, Any]:
    groups = _by_search(s.runs)
    test = {}
    for subset, ids in _subset_ids(m).items():
        first = _values(s, s.runs[0]) or {}
        test[subset] = {**_spread({k: [_mean_on(_values(s, r), ids) for r in runs]
                                   for k, runs in groups.items()}),
                        "n": sum(1 for q in first if ids is None or q in ids)}
    scorings = {k: _spread({i: [_mean_on(r.per_query.get(k), None) for r in runs]
                            for i, runs in groups.items()})["mean"]
                for k in ("query", "predictor")}
    targets = sorted({t for r in s.runs for t in r.transfer})
    return {
        "dataset": m.dataset, "kind": "trained", "system": s.name,
        "what": SYSTEMS.get(s.name, s.name),
        "scoring": "/".join(sorted({_scoring(s, r) for r in s.runs})),
        "searches": sorted(groups), "best_search": best_search(m, s.name),
        "seeds": [r.seed for rs in groups.values() for r in rs], "runs": len(s.runs),
        "test": test, "query_mean": scorings["query"], "predictor_mean": scorings["predictor"],
        "dev_mean": _avg([r.dev for r in s.runs]),
        "dev_by_search": {str(k): _avg([r.dev for r in rs]) for k, rs in groups.items()},
        "best_epochs": [r.best_epoch for rs in groups.values() for r in rs],
        "transfer": {t: _spread({k: [_mean_on(_values(s, r, target=t), None) for r in rs]
                                 for k, rs in groups.items()})["mean"] for t in targets},
    }


def system_rows(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """Per dataset, every system and then every reference row.

    A system row: ``dataset``, ``kind`` ("trained"), ``system``, ``what``, ``scoring`` (as
    dev chose; ``a/b`` where its searches chose differently), ``searches``, ``best_search``,
    ``seeds``, ``runs``, ``test`` ({all, seen, unseen: {mean, seed_std, search_std,
    search_min, search_max, n}}: the mean over searches of each search's mean over seeds,
    the mean within-search seed sd, the sd and range of the search means, the query count),
    ``query_mean`` and ``predictor_mean`` (all queries, each scoring), ``dev_mean``,
    ``dev_by_search``, ``best_epochs`` and ``transfer`` ({collection: mean}). A reference
    row: ``kind`` "reference", ``seeds`` [], ``runs`` 0 and ``test`` ({subset: {mean, n}}).
    """
    rows = []
    for m in measured:
        order = [n for n in SYSTEMS if n in m.systems] + sorted(set(m.systems) - set(SYSTEMS))
        rows += [_system_row(m, m.systems[n]) for n in order if m.systems[n].runs]
        refs = [n for n in REFERENCES if n in m.references] + sorted(
            set(m.references) - set(REFERENCES))
        for name in refs:
            test = {subset: {"mean": _mean_on(m.references[name], ids),
                             "n": sum(1 for q in m.references[name]
                                      if ids is None or q in ids)}
                    for subset, ids in _subset_ids(m).items()}
            rows.append({"dataset": m.dataset, "kind": "reference", "system": name,
                         "what": REFERENCES.get(name, name), "scoring": "-", "seeds": [],
                         "runs": 0, "test": test})
    return rows


def crossfit_rows(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """Per dataset with a cross-fitted table, its systems and then its reference rows on the
    cross-fitted queries: ``dataset``, ``kind`` (trained/reference), ``system``, ``seeds``
    and ``test`` ({all, seen, unseen: {mean, seed_std, n}}: the mean over seeds of each
    seed's mean over the subset's queries, their sd, the query count)."""
    rows = []
    for m in measured:
        if not m.crossfit:
            continue
        ids = _subset_ids(m, "crossfit")
        found = [(n, "trained", m.crossfit[n]) for n in SYSTEMS if m.crossfit.get(n)]
        found += [(n, "reference", {"-": m.crossfit_references[n]}) for n in REFERENCES
                  if n in m.crossfit_references]
        for name, kind, per_seed in found:
            first = next(iter(per_seed.values()))
            test = {subset: {"mean": _avg([_mean_on(v, keep) for v in per_seed.values()]),
                             "seed_std": _std([_mean_on(v, keep) for v in per_seed.values()]),
                             "n": sum(1 for q in first if keep is None or q in keep)}
                    for subset, keep in ids.items()}
            rows.append({"dataset": m.dataset, "kind": kind, "system": name,
                         "seeds": sorted(per_seed) if kind == "trained" else [],
                         "test": test})
    return rows


def _range(values: Sequence[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {"min": math.nan, "max": math.nan, "spread": math.nan}
    return {"min": min(values), "max": max(values), "spread": max(values) - min(values)}


def search_rows(measured: Sequence[Measured]) -> list[dict[str, Any]]:
    """The search spread: per dataset and arm, each search's best dev and the mean test
    nDCG@10 of its retrained runs (reported only), with their min, max and spread.

    Returns:
        ``[{dataset, arm, best, searches: [Search fields + is_best, test_mean, test_runs,
        dev_runs_mean], best_dev: {min, max, spread}, test_mean: {min, max, spread}}]``.
    """
    out = []
    for m in measured:
        for arm in dict.fromkeys(s.arm for s in m.searches):
            best = best_search(m, arm)
            system = m.systems.get(arm)
            rows = []
            for s in sorted((s for s in m.searches if s.arm == arm), key=lambda s: s.index):
                runs = [r for r in system.runs if r.search == s.index] if system else []
                rows.append({**asdict(s), "is_best": s.index == best,
                             "test_mean": _avg([_mean_on(_values(system, r), None)
                                                for r in runs]) if runs else math.nan,
                             "test_runs": len(runs),
                             "dev_runs_mean": _avg([r.dev for r in runs])})
            out.append({"dataset": m.dataset, "arm": arm, "best": best, "searches": rows,
                        "best_dev": _range([r["best_dev"] for r in rows]),
                        "test_mean": _range([r["test_mean"] for r in rows])})
    return out


# -- the answer --------------------------------------------------------------------------------

def plan_rows() -> list[dict[str, Any]]:
    """:data:`COMPARISONS` as rows for the design section."""
    unit = {RECIPE: "searches (mean over each one's seeds)", BEST: "the best search's seeds",
            RUNS: "its runs (seeds)", REFERENCE: "one reference row",
            CROSSFIT: "seeds (cross-fitted)"}
    return [{"comparison": s.name, "family": s.pooled or s.family, "a": s.a.label,
             "b": s.b.label,
             "a_units": unit[s.a.select], "b_units": unit[s.b.select],
             "scoring": (f"{s.a.scoring or 'chosen'} / {s.b.scoring or 'chosen'}"),
             "paired": s.paired, "on": s.on, "subsets": list(s.subsets), "pooled": s.pooled}
            for s in COMPARISONS]


def answer_dict(measured: Sequence[Measured], **kwargs: Any) -> dict[str, Any]:
    """Everything of the answer as JSON-ready data (:func:`dumps` writes it).

    Args:
        measured: One :class:`Measured` per dataset.
        **kwargs: Passed to :func:`analysis.stats.compare_all`.

    Returns:
        ``design`` ({dataset: its design, plus ``skipped``: the notes of comparisons left
        out}), ``plan`` (:func:`plan_rows`), ``families`` (:data:`FAMILIES`), ``settings``
        (margin, confidence), ``searches`` (:func:`search_rows`), ``systems``
        (:func:`system_rows`), ``crossfit_systems`` (:func:`crossfit_rows`),
        ``comparisons`` (:func:`comparisons`), ``pooled`` (each pooled row, primary and
        cross-fitted, with its family and its per-dataset rows), ``verdicts`` ({family:
        sentences}) and ``findings`` (:func:`findings`).
    """
    comps, notes = _comparisons(measured, **kwargs)
    systems = system_rows(measured)
    refs = {(r["dataset"], r["system"]): r["test"] for r in systems if r["kind"] == "reference"}
    extra = prior_clauses(comps, refs)
    per_dataset = {s.pooled: s.family for s in COMPARISONS if s.pooled}
    pooled = [{"comparison": r["comparison"], "family": family, "pooled": r,
               "per_dataset": [p for p in comps[per_dataset[family]]
                               if p["comparison"] == r["comparison"]
                               and p["subset"] == "all"]}
              for family in dict.fromkeys(per_dataset) for r in comps[family]]
    design = {}
    for m in measured:
        design[m.dataset] = dict(m.design)
        if notes[m.dataset]:
            design[m.dataset]["skipped"] = notes[m.dataset]
    return {"design": design, "plan": plan_rows(), "families": dict(FAMILIES),
            "settings": {"margin_points": kwargs.get("margin_points", 1.0),
                         "confidence": kwargs.get("confidence", 0.95)},
            "searches": search_rows(measured), "systems": systems,
            "crossfit_systems": crossfit_rows(measured), "comparisons": comps,
            "pooled": pooled,
            "verdicts": {f: verdicts(rows, extra) for f, rows in comps.items() if rows},
            "findings": findings(comps, systems)}
