"""Views of a study: tables, knob comparisons, parameter importance and figures.

The tables and figures are pure functions of the frame :func:`analysis.runs.load_runs`
builds (one row per trial), so they can be checked without MLflow and reused in notebooks.
Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state, no plotly): the
report embeds them as PNG and works offline. :func:`importance` is the one view that reads
the Optuna storage, since the importance evaluators work on Optuna's own trial records.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis import schema as S
from analysis.runs import METRICS, PARAMS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Knob:
    """One of the research card's knobs: the param column and how to group it."""

    column: str
    label: str
    needs_pred: bool = False  #: only meaningful when L_pred is on (λ_pred > 0)
    bucketed: bool = False  #: grouped by :func:`lambda_buckets`, not by value


KNOBS = {
    "stopgrad": Knob(PARAMS + "loss.stopgrad", "stop-gradient on the L_pred target", True),
    "residual": Knob(PARAMS + "model.predictor.residual", "residual predictor", True),
    "depth": Knob(PARAMS + "model.predictor.depth", "predictor depth", True),
    "lambda_pred": Knob(PARAMS + "loss.lambda_pred", "λ_pred bucket", bucketed=True),
}
LAMBDA_BUCKETS = ["0", "(0, 0.1]", "(0.1, 1]", ">1"]
FANOVA_MIN_TRIALS = 5  #: below this many completed trials fANOVA's forest is noise


# -- tables -------------------------------------------------------------------------------------

def metric_column(df: pd.DataFrame, metric: str) -> str:
    """The column of a metric: as given, or ``metrics.<key>`` (``ndcg@10`` works too)."""
    for name in (metric, METRICS + metric, METRICS + S.mlflow_key(metric)):
        if name in df.columns:
            return name
    raise KeyError(f"no column for metric {metric!r} (metric columns: "
                   f"{sorted(c for c in df.columns if c.startswith(METRICS))})")


def finished(df: pd.DataFrame) -> pd.DataFrame:
    """The trials whose run ended FINISHED (completed, early-stopped or collapse-stopped)."""
    return df[df["status"] == S.STATUS_FINISHED]


def top_k(df: pd.DataFrame, k: int = 10, metric: str = S.SELECTION, mode: str = "max",
          finished_only: bool = True) -> pd.DataFrame:
    """The ``k`` best trials by ``metric`` (rows without a value left out), with a ``rank``."""
    col = metric_column(df, metric)
    rows = finished(df) if finished_only else df
    rows = rows[pd.to_numeric(rows[col], errors="coerce").notna()]
    rows = rows.sort_values(col, ascending=mode == "min", kind="stable").head(k).copy()
    rows.insert(0, "rank", range(1, len(rows) + 1))
    return rows.reset_index(drop=True)


def lambda_buckets(df: pd.DataFrame, name: str = "loss.lambda_pred") -> pd.Series:
    """Bucket a λ column: ``0`` / ``(0, 0.1]`` / ``(0.1, 1]`` / ``>1`` (ordered categories).

    Args:
        df: A runs frame.
        name: ``lambda_pred``, ``loss.lambda_pred`` or the column name itself.
    """
    col = next((c for c in (name, PARAMS + name, PARAMS + "loss." + name) if c in df.columns),
               None)
    if col is None:
        raise KeyError(f"no λ column for {name!r}")
    values = pd.to_numeric(df[col], errors="coerce")
    labels = np.select([values == 0, values <= 0.1, values <= 1, values > 1],
                       LAMBDA_BUCKETS, default="")
    out = pd.Series(pd.Categorical(labels, categories=LAMBDA_BUCKETS, ordered=True),
                    index=df.index, name=col)
    return out.where(values.notna())


def compare_by(df: pd.DataFrame, knob: str, metric: str = S.SELECTION,
               finished_only: bool = True) -> pd.DataFrame:
    """Grouped stats (``count``, ``mean``, ``std``, ``max``) of ``metric`` by one knob.

    ``knob`` is a name of :data:`KNOBS` or any column. Predictor knobs (stop-gradient,
    residual, depth) only count trials with λ_pred > 0: with L_pred off they change nothing
    the headline metric sees, and would otherwise pad one group with unrelated trials. λ
    buckets always list all four buckets (count 0 where no trial fell).
    """
    spec = KNOBS.get(knob, Knob(knob if knob in df.columns else PARAMS + knob, knob))
    col = metric_column(df, metric)
    rows = finished(df) if finished_only else df
    if spec.needs_pred:
        rows = rows[pd.to_numeric(rows[KNOBS["lambda_pred"].column], errors="coerce") > 0]
    values = pd.to_numeric(rows[col], errors="coerce")
    keep = values.notna()
    keys = lambda_buckets(rows, spec.column) if spec.bucketed else rows[spec.column]
    stats = values[keep].groupby(keys[keep], observed=False, dropna=True).agg(
        ["count", "mean", "std", "max"])
    stats["count"] = stats["count"].astype(int)
    stats.index.name = knob
    return stats


def optimisation_history(df: pd.DataFrame, metric: str = S.SELECTION,
                         mode: str = "max") -> pd.DataFrame:
    """Trials in start order with their value and the best value so far.

    Columns: ``order`` (1-based), ``trial_id``, ``status``, ``value`` (the final ``metric``
    of a FINISHED trial, as Optuna records it; NaN for failed or killed trials),
    ``last_value`` (the last reported value whatever the status), ``best_so_far`` and
    ``is_best`` (True where the trial improved on every earlier one).
    """
    col = metric_column(df, metric)
    rows = df.sort_values("start_time", kind="stable").reset_index(drop=True)
    last = pd.to_numeric(rows[col], errors="coerce")
    value = last.where(rows["status"] == S.STATUS_FINISHED)
    best = (value.cummax() if mode == "max" else value.cummin()).ffill()  # NaN rows: carry
    before = best.shift(1)
    improved = value.notna() & (before.isna() | (value > before if mode == "max"
                                                 else value < before))
    return pd.DataFrame({"order": range(1, len(rows) + 1), "trial_id": rows["trial_id"],
                         "status": rows["status"], "value": value, "last_value": last,
                         "best_so_far": best, "is_best": improved})


def stop_reasons(df: pd.DataFrame) -> pd.DataFrame:
    """Trials by why they ended: ``completed``, ``early_stopped``, ``collapse``, ``diverged``,
    ``orphaned``, ``error`` (anything else on a failed run) or ``unknown`` (no reason tagged).
    Columns ``reason``, ``status``, ``count`` and ``example`` (one full reason text)."""
    def kind(reason: Any) -> str:
        text = str(reason or "")
        head = text.split(":", 1)[0].strip()
        if not text:
            return "unknown"
        return head if head in ("completed", "early_stopped", "collapse", "diverged",
                                "orphaned") else "error"

    rows = df.assign(reason=df["stop_reason"].map(kind))
    out = rows.groupby(["reason", "status"]).agg(
        count=("run_id", "size"), example=("stop_reason", "first")).reset_index()
    return out.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)


def searched_params(df: pd.DataFrame) -> list[str]:
    """The config columns a study searched (those with a ``params.search.*`` twin)."""
    prefix = PARAMS + S.SEARCH_PREFIX
    return sorted({PARAMS + c[len(prefix):] for c in df.columns if c.startswith(prefix)
                   and PARAMS + c[len(prefix):] in df.columns})


def pareto_front(df: pd.DataFrame, metrics: Sequence[str],
                 modes: Sequence[str]) -> pd.Series:
    """Boolean mask of the rows no other row dominates on ``metrics`` (NaN rows: False)."""
    cols = [metric_column(df, m) for m in metrics]
    signs = np.array([1.0 if m == "max" else -1.0 for m in modes])
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float) * signs
    ok = ~np.isnan(values).any(axis=1)
    front = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        others = values[ok]
        dominated = ((others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)).any()
        front[i] = not dominated
    return pd.Series(front, index=df.index, name="pareto")


# -- parameter importance -----------------------------------------------------------------------

class Importances(dict):
    """Parameter -> importance (the varied ones sum to 1, the others are 0).

    Attributes:
        evaluator: The evaluator that produced the values (``fanova``, ``default`` = Optuna's
            default, PED-ANOVA, or ``none``).
        notes: What a reader should know (fallbacks, imputation, left-out objectives).
        n_trials: Completed trials the values are based on.
    """

    def __init__(self, values: dict[str, float], evaluator: str, notes: list[str],
                 n_trials: int) -> None:
        super().__init__(sorted(values.items(), key=lambda kv: (-kv[1], kv[0])))
        self.evaluator, self.notes, self.n_trials = evaluator, notes, n_trials


def importance(storage_url: str, study_name: str, params: Sequence[str] | None = None,
               evaluator: str = "fanova", target: Callable[[Any], float] | None = None,
               seed: int = 0) -> Importances:
    """Importance of every searched parameter for the objective, from the Optuna storage.

    fANOVA only takes parameters present in every trial, but a study's conditional
    parameters (``when``, ``zero`` switches) are missing where inactive. They are imputed
    for it: a switched-off value becomes 0 (what the run used), any other inactive value a
    sentinel (below a numeric range, an ``n/a`` category). Optuna's default evaluator
    (PED-ANOVA) handles conditional parameters natively.

    Args:
        storage_url: Optuna RDB storage (``sqlite:///<study_dir>/optuna.db``).
        study_name: The Optuna study (the study's name).
        params: Parameters to assess (default: every parameter any trial was given).
        evaluator: ``fanova`` or ``default``. fANOVA falls back to the default with fewer
            than :data:`FANOVA_MIN_TRIALS` completed trials or when it fails; ``notes``
            says so.
        target: Value to explain (default: the objective; the first one if several).
        seed: fANOVA's forest seed.

    Returns:
        :class:`Importances` with a key for every searched parameter; parameters that never
        varied over the completed trials get 0.
    """
    import optuna
    from optuna.trial import TrialState

    if evaluator not in ("fanova", "default"):
        raise ValueError(f"evaluator must be 'fanova' or 'default', got {evaluator!r}")
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    names = list(params) if params is not None else sorted({p for t in trials for p in t.params})
    notes: list[str] = []
    if target is None and len(study.directions) > 1:
        target = lambda t: t.values[0]  # noqa: E731
        notes.append("multi-objective study: importance of the first objective")
    values = [target(t) if target else t.value for t in done]
    rows, dists, conditional = _impute(done, names)
    varied = [n for n in names if len({repr(row.get(n)) for row in rows}) > 1]
    zeros = {n: 0.0 for n in names}
    why = ("fewer than 2 completed trials" if len(done) < 2 else
           "no parameter varied" if not varied else
           "every completed trial has the same value" if len({float(v) for v in values}) < 2
           else None)
    if why:
        notes.append(f"{why}: nothing to attribute, every importance is 0")
        log.warning("importance of %s: %s", study_name, notes[-1])
        return Importances(zeros, "none", notes, len(done))
    used = evaluator
    if evaluator == "fanova" and len(done) < FANOVA_MIN_TRIALS:
        notes.append(f"only {len(done)} completed trials (fANOVA needs {FANOVA_MIN_TRIALS}): "
                     "used Optuna's default evaluator (PED-ANOVA) instead")
        used = "default"
    result: dict[str, float] | None = None
    if used == "fanova":
        try:
            shadow = optuna.create_study(directions=study.directions)
            for row, trial in zip(rows, done):
                shadow.add_trial(optuna.trial.create_trial(
                    params=row, distributions=dists, values=trial.values))
            result = optuna.importance.get_param_importances(
                shadow, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                params=varied, target=target)
            if conditional & set(varied):
                notes.append("fANOVA on imputed conditional parameters: "
                             + ", ".join(sorted(conditional & set(varied))))
        except Exception as err:  # noqa: BLE001 - fANOVA's forest fails on degenerate data
            notes.append(f"fANOVA failed ({err}): used Optuna's default evaluator instead")
            used = "default"
    if result is None:
        present = [n for n in varied if any(n in t.params for t in done)]
        result = optuna.importance.get_param_importances(study, params=present, target=target)
    for note in notes:
        log.warning("importance of %s: %s", study_name, note)
    return Importances({**zeros, **{k: float(v) for k, v in result.items()}}, used, notes,
                       len(done))


def _impute(trials: list, names: Sequence[str]) -> tuple[list[dict], dict, set[str]]:
    """Every trial's params over ``names`` with inactive ones imputed, the (widened)
    distributions, and the names that were missing somewhere (the conditional ones)."""
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    seen = {n: t.distributions[n] for t in trials for n in names if n in t.distributions}
    missing = {n for n in seen if any(n not in t.params for t in trials)}
    dists: dict[str, Any] = {}
    for n, d in seen.items():
        if n not in missing:
            dists[n] = d
        elif isinstance(d, CategoricalDistribution):
            dists[n] = CategoricalDistribution(list(d.choices) + ["n/a"])
        elif isinstance(d, IntDistribution):
            dists[n] = IntDistribution(min(0, d.low - d.step), d.high)
        else:
            dists[n] = FloatDistribution(min(0.0, d.low - 0.1 * (d.high - d.low)), d.high)
    rows = []
    for t in trials:
        row = {}
        for n, d in dists.items():
            if n in t.params:
                row[n] = t.params[n]
            elif isinstance(d, CategoricalDistribution):
                row[n] = "n/a"
            elif t.params.get(n + ":on") is False:
                row[n] = 0 if isinstance(d, IntDistribution) else 0.0
            else:
                row[n] = seen[n].low - (seen[n].step if isinstance(d, IntDistribution) else
                                        0.1 * (seen[n].high - seen[n].low))
        rows.append(row)
    return rows, dists, missing


# -- figures ------------------------------------------------------------------------------------

def history_plot(df: pd.DataFrame, metric: str = S.SELECTION, mode: str = "max") -> Figure:
    """Optimisation history: each trial's value in start order, and the best so far."""
    hist = optimisation_history(df, metric, mode)
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for status, marker in ((S.STATUS_FINISHED, "o"), (S.STATUS_FAILED, "x"),
                           (S.STATUS_KILLED, "s")):
        part = hist[hist["status"] == status]  # failed/killed: their last reported value
        if len(part):
            ax.scatter(part["order"], part["last_value"], marker=marker, label=status.lower())
    ax.step(hist["order"], hist["best_so_far"], where="post", color="k", label="best so far")
    ax.set(xlabel="trial (start order)", ylabel=metric, title="optimisation history")
    ax.legend(loc="best", fontsize="small")
    return fig


def parallel_coordinates_plot(df: pd.DataFrame, params: Sequence[str] | None = None,
                              metric: str = S.SELECTION) -> Figure:
    """Parallel coordinates of the searched parameters, lines coloured by ``metric``.

    Each axis is scaled to [0, 1] (numbers by range, booleans and categories by position);
    the end labels of each axis give the real values.
    """
    col = metric_column(df, metric)
    rows = finished(df)
    rows = rows[pd.to_numeric(rows[col], errors="coerce").notna()]
    cols = [c if c in df.columns else PARAMS + c for c in (params or searched_params(df))]
    fig = Figure(figsize=(max(6.0, 1.6 * (len(cols) + 1)), 4), layout="constrained")
    ax = fig.add_subplot()
    if rows.empty or not cols:
        ax.text(0.5, 0.5, "no finished trials with a value", ha="center", transform=ax.transAxes)
        return fig
    axes = cols + [col]
    scaled, ticks = [], []
    for c in axes:
        y, labels = _scale(rows[c])
        scaled.append(y)
        ticks.append(labels)
    matrix = np.column_stack(scaled)
    value = pd.to_numeric(rows[col]).to_numpy(float)
    norm = (value - value.min()) / (np.ptp(value) or 1.0)
    cmap = _cmap()
    for line, v in zip(matrix, norm):
        ax.plot(range(len(axes)), line, color=cmap(v), alpha=0.8, gid="trial")
    for i, (lo, hi) in enumerate(ticks):
        ax.axvline(i, color="grey", lw=0.8)
        ax.annotate(lo, (i, 0), textcoords="offset points", xytext=(3, -12), fontsize=7)
        ax.annotate(hi, (i, 1), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.set_xticks(range(len(axes)), [c.removeprefix(PARAMS).removeprefix(METRICS)
                                     for c in axes], rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.08, 1.1)
    ax.set_title(f"parallel coordinates (colour: {metric}, yellow = best)")
    return fig


def _scale(col: pd.Series) -> tuple[np.ndarray, tuple[str, str]]:
    numbers = pd.to_numeric(col, errors="coerce")
    if col.map(lambda v: isinstance(v, (bool, np.bool_))).any() or numbers.isna().any():
        cats = sorted({str(v) for v in col})
        pos = col.map(lambda v: cats.index(str(v)) / max(1, len(cats) - 1)).to_numpy(float)
        return pos, (cats[0], cats[-1])
    lo, hi = float(numbers.min()), float(numbers.max())
    return ((numbers - lo) / ((hi - lo) or 1.0)).to_numpy(float), (f"{lo:.3g}", f"{hi:.3g}")


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"]


def pareto_plot(df: pd.DataFrame, metrics: Sequence[str], modes: Sequence[str]) -> Figure:
    """Scatter of the first two objectives with the Pareto front highlighted.

    Raises:
        ValueError: Fewer than two objectives (a single-objective study has no front).
    """
    if len(metrics) < 2:
        raise ValueError("a Pareto plot needs two or more objectives")
    x, y = (metric_column(df, m) for m in metrics[:2])
    rows = finished(df)
    front = pareto_front(rows, metrics[:2], modes[:2])
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(rows[x], rows[y], color="lightgrey", label="trials")
    best = rows[front].sort_values(x)
    ax.plot(best[x], best[y], "o-", color="tab:red", label="Pareto front")
    ax.set(xlabel=f"{metrics[0]} ({modes[0]})", ylabel=f"{metrics[1]} ({modes[1]})",
           title="Pareto front")
    ax.legend(fontsize="small")
    return fig


def finite(value: Any) -> bool:
    """True for a real, finite number (not None, NaN or inf)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
