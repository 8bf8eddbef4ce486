"""One self-contained HTML report of a study, and logging it onto the study's parent run.

The report is a single file (figures embedded as base64 PNG, tables as HTML, styles inline,
no external links), so it opens offline, survives being mailed around and can be stored as
an MLflow artifact. Every section has a fixed ``id`` (:data:`SECTIONS`) so that readers and
tests can find it. A section that cannot be built (no Optuna storage, no finished trials)
says why in place instead of failing the whole report.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from analysis import schema as S
from analysis import views as V
from analysis.export import public_uri
from analysis.runs import METRICS, PARAMS, find_parent, load_runs, logged_space, objectives

log = logging.getLogger(__name__)

SECTIONS = ("summary", "top-k", "knob-stopgrad", "knob-residual", "knob-depth",
            "knob-lambda_pred", "importance", "history", "parallel", "pareto",
            "stop-reasons", "test")
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f4f4}
.note{color:#555;font-style:italic}.err{color:#a00}img{max-width:100%}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}
"""


@dataclass
class Report:
    """A rendered report: the HTML text, its figures (for :func:`log_report`), the parent."""

    html: str
    figures: dict[str, Figure] = field(default_factory=dict)
    parent_run_id: str = ""
    sections: list[str] = field(default_factory=list)


def render_report(tracking_uri: str, study_name: str, storage_url: str | None = None,
                  top: int = 10, experiment_name: str | None = None,
                  strict: bool = False) -> Report:
    """Build the report of a study (see :func:`write_report`); nothing is written."""
    client = MlflowClient(tracking_uri)
    parent = find_parent(tracking_uri, study_name, experiment_name, client)
    df = load_runs(tracking_uri, study_name, experiment_name)
    metrics, modes = objectives(logged_space(tracking_uri, parent.info.run_id))
    storage_url = storage_url or _study_storage(parent.data.tags)
    multi = len(metrics) > 1 or _n_objectives(storage_url, study_name) > 1
    metric, mode = metrics[0], modes[0]
    figures: dict[str, Figure] = {}
    scored = any(c in df.columns and pd.to_numeric(df[c], errors="coerce").notna().any()
                 for c in (METRICS + metric, metric))

    def needs_metric(build: Callable[[], str]) -> Callable[[], str]:
        return build if scored else lambda: _note(f"no trial has reported {metric} yet")

    parts: list[tuple[str, str, Callable[[], str]]] = [
        ("summary", "Summary", lambda: _summary(df, parent, metric, mode, tracking_uri)),
        ("top-k", f"Top {top} trials by {metric}",
         needs_metric(lambda: _top(df, top, metric, mode))),
    ]
    for knob, spec in V.KNOBS.items():
        parts.append((f"knob-{knob}", f"By {spec.label}",
                      needs_metric(lambda knob=knob: _knob(df, knob, metric))))
    parts += [
        ("importance", "Parameter importance",
         lambda: _importance(storage_url, study_name, figures)),
        ("history", "Optimisation history", needs_metric(
            lambda: _figure(figures, "history", V.history_plot(df, metric, mode))
            + _table(V.optimisation_history(df, metric, mode), index=False))),
        ("parallel", "Parallel coordinates", needs_metric(
            lambda: _figure(figures, "parallel", V.parallel_coordinates_plot(df, metric=metric)))),
    ]
    if multi:
        parts.append(("pareto", "Pareto front", needs_metric(lambda: _figure(
            figures, "pareto", V.pareto_plot(df, metrics, modes)) if len(metrics) > 1 else
            _note("multi-objective Optuna study, but the logged space names one metric"))))
    parts.append(("stop-reasons", "Stop reasons", lambda: _stops(df)))
    parts.append(("test", "Test figures (reported, never used to choose)",
                  needs_metric(lambda: _test(df, top, metric, mode, parent))))
    body = []
    for sid, title, build in parts:
        try:
            content = build()
        except Exception as err:  # noqa: BLE001 - one broken section must not sink the rest
            if strict:
                raise
            log.warning("report section %s failed: %s", sid, err)
            content = f'<p class="err">section failed: {_e(err)}</p>'
        body.append(f'<section id="{sid}"><h2>{_e(title)}</h2>\n{content}\n</section>')
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
           f"<title>{_e(study_name)}: study report</title><style>{_CSS}</style></head>"
           f"<body><h1>Study {_e(study_name)}</h1>\n" + "\n".join(body) + "</body></html>\n")
    return Report(doc, figures, parent.info.run_id, [p[0] for p in parts])


def write_report(tracking_uri: str, study_name: str, out_path: str | Path,
                 storage_url: str | None = None, **kwargs: Any) -> Path:
    """Write the study's report as one self-contained HTML file.

    Sections: summary, top-k, the four knob comparisons (stop-gradient, residual,
    depth, λ_pred buckets), parameter importance, optimisation history, parallel
    coordinates, Pareto front (multi-objective studies), stop reasons and, last, the top
    trials' test figures (reported, never used to choose; the controlled answer to the
    predictor question is ``jepa-study answer``).

    Args:
        tracking_uri: The study's MLflow tracking URI.
        study_name: The study.
        out_path: The HTML file to write (its directory is created).
        storage_url: Optuna storage for the importance section; default: the study
            directory's ``optuna.db`` when the parent run names the directory.
        **kwargs: ``top``, ``experiment_name``, ``strict`` of :func:`render_report`.

    Returns:
        ``out_path``.
    """
    report = render_report(tracking_uri, study_name, storage_url, **kwargs)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(report.html, encoding="utf-8")
    return out_path


def log_report(tracking_uri: str, parent_run_id: str, report_path: str | Path,
               figures: Mapping[str, Figure] | Iterable[str | Path] = ()) -> list[str]:
    """Log the report and its figures (PNG) as artifacts of the parent run, under ``report/``.

    Args:
        figures: Figures by name (saved as ``<name>.png``) or paths of image files.

    Returns:
        The artifact paths logged.
    """
    client = MlflowClient(tracking_uri)
    report_path = Path(report_path)
    client.log_artifact(parent_run_id, str(report_path), S.ARTIFACT_REPORT)
    logged = [f"{S.ARTIFACT_REPORT}/{report_path.name}"]
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(figures, Mapping):
            paths = []
            for name, fig in figures.items():
                paths.append(Path(tmp) / f"{name}.png")
                fig.savefig(paths[-1], format="png", dpi=100)
        else:
            paths = [Path(p) for p in figures]
        if paths:
            client.log_artifacts(parent_run_id, str(_gather(paths, Path(tmp) / "figures")),
                                 f"{S.ARTIFACT_REPORT}/figures")
        logged += [f"{S.ARTIFACT_REPORT}/figures/{p.name}" for p in paths]
    return logged


def _gather(paths: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


# -- sections ----------------------------------------------------------------------------------

def _summary(df: pd.DataFrame, parent: Any, metric: str, mode: str, uri: str) -> str:
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    try:
        best = V.top_k(df, 1, metric, mode)
    except KeyError:  # no trial has reported the metric yet
        best = df.iloc[:0]
    items = [("study", df.attrs.get("study")), ("parent run", parent.info.run_id),
             ("parent status", parent.info.status), ("tracking URI", public_uri(uri)),
             ("objective", f"{metric} ({mode})"), ("trials", len(df)),
             ("by status", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))]
    if len(best):
        row = best.iloc[0]
        mode = {1.0: "predictor", 0.0: "query"}.get(row.get(METRICS + S.BEST_SCORED_WITH_PREDICTOR))
        items += [("best trial", row["trial_id"]),
                  (f"best {metric}", _num(row[V.metric_column(df, metric)])),
                  ("its best dev epoch", row.get(METRICS + S.BEST_EPOCH, row.get("best_epoch"))),
                  ("its scoring (chosen on dev)", mode or "n/a"),
                  ("its λ_pred", row.get(PARAMS + "loss.lambda_pred")),
                  ("its test figures", "in the last section (reported, never used to choose)")]
    flagged = int((df["nonfinite"].fillna("") != "").sum()) if len(df) else 0
    items.append(("trials with NaN/inf metrics", flagged))
    items += [(f"param {k}", v) for k, v in sorted(parent.data.params.items())]
    items.append(("generated", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _top(df: pd.DataFrame, k: int, metric: str, mode: str) -> str:
    rows = V.top_k(df, k, metric, mode)
    if rows.empty:
        return _note("no finished trial with a value yet")
    cols = ["rank", "trial_id", "status", "stop_reason", "epochs", "best_epoch",
            V.metric_column(df, metric)]
    cols += [c for c in (METRICS + S.BEST_SCORED_WITH_PREDICTOR,) if c in rows.columns]
    cols += V.searched_params(df) or [spec.column for spec in V.KNOBS.values()
                                      if spec.column in rows.columns]
    return _table(rows[list(dict.fromkeys(cols))], index=False)


#: test figures of a trial's best dev epoch, for the report's last section only: all queries,
#: the seen and unseen ones (a relevant document was, or never was, a train positive)
TEST_FIGURES = ("ndcg_at_10", "seen_ndcg_at_10", "unseen_ndcg_at_10", "n_seen", "n_unseen",
                "query_ndcg_at_10", "predictor_ndcg_at_10", "recall_at_100")
TEST_COLUMNS = [METRICS + S.BEST_TEST_PREFIX + name for name in TEST_FIGURES]
#: the reference rows (``trainables.references``), read from the parent run
REFERENCE_ROWS = ("zero_shot", "bm25", "doc_prior")


def _test(df: pd.DataFrame, k: int, metric: str, mode: str, parent: Any = None) -> str:
    """The top trials (ranked by dev, as everywhere) with their best epoch's test figures on
    all, seen and unseen queries, below the reference rows."""
    rows = V.top_k(df, k, metric, mode)
    cols = [c for c in TEST_COLUMNS if c in rows.columns]
    if rows.empty or not cols:
        return _note("no finished trial has test figures (they are scored when a study "
                     "ends, or by `jepa-study test STUDY`)")
    note = _note("Test figures of each trial's best dev epoch, scored from its kept weights "
                 "when the study ended. They are reported here and used for nothing: trials, "
                 "epochs and scorings are all chosen on dev. A query is seen when one of its "
                 "relevant documents was a positive of a train query, else unseen; a gain on "
                 "seen queries alone is what the document-prior row gets with no training "
                 "(which documents tend to be relevant), not better query-document matching.")
    table = rows[["rank", "trial_id", V.metric_column(df, metric)] + cols]
    refs = _references(parent)
    if refs is not None:
        table = pd.concat([refs.rename(columns=lambda c: METRICS + S.BEST_TEST_PREFIX + c
                                       if c in TEST_FIGURES else c), table], ignore_index=True)
    return note + _table(table, index=False)


def _references(parent: Any) -> pd.DataFrame | None:
    """The reference rows logged on the parent run (``reference.<row>.test_*``), or None."""
    metrics = getattr(getattr(parent, "data", None), "metrics", None) or {}
    rows = []
    for row in REFERENCE_ROWS:
        values = {name: metrics.get(S.reference_key(row, f"test_{name}"))
                  for name in TEST_FIGURES}
        if values["ndcg_at_10"] is not None:
            rows.append({"rank": "-", "trial_id": row, **values})
    return pd.DataFrame(rows) if rows else None


def _knob(df: pd.DataFrame, knob: str, metric: str) -> str:
    if V.KNOBS[knob].column not in df.columns:
        return _note(f"the runs have no {V.KNOBS[knob].column}")
    stats = V.compare_by(df, knob, metric)
    note = (_note("finished trials with λ_pred > 0 only: with L_pred off this knob "
                  "changes nothing the headline metric sees")
            if V.KNOBS[knob].needs_pred else "")
    return note + _table(stats) if len(stats) else _note("no finished trials to compare")


def _importance(storage_url: str | None, study: str, figures: dict[str, Figure]) -> str:
    if not storage_url:
        return _note("no Optuna storage given (storage_url) and none found in the study "
                     "directory")
    imp = V.importance(storage_url, study)
    table = pd.DataFrame({"parameter": list(imp), "importance": list(imp.values())})
    fig = Figure(figsize=(6, 0.4 * len(imp) + 1), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(table["parameter"][::-1], table["importance"][::-1])
    ax.set(xlabel="importance", title=f"{imp.evaluator} over {imp.n_trials} completed trials")
    notes = "".join(_note(n) for n in imp.notes)
    return notes + _figure(figures, "importance", fig) + _table(table, index=False)


def _stops(df: pd.DataFrame) -> str:
    if df.empty:
        return _note("no trials")
    table = _table(V.stop_reasons(df), index=False)
    bad = df[df["nonfinite"].fillna("") != ""]
    if len(bad):
        table += "<p>NaN/inf metric values (not logged as metrics):</p>" + _table(
            bad[["trial_id", "nonfinite"]], index=False)
    return table


def _n_objectives(storage_url: str | None, study_name: str) -> int:
    """The Optuna study's number of objectives (0 when there is no readable storage)."""
    if not storage_url:
        return 0
    try:
        import optuna

        return len(optuna.load_study(study_name=study_name, storage=storage_url).directions)
    except Exception:  # noqa: BLE001 - the importance section reports storage problems
        return 0


def _study_storage(tags: Mapping[str, str]) -> str | None:
    folder = tags.get(S.TAG_STUDY_DIR)
    db = Path(folder) / S.OPTUNA_DB if folder else None
    return f"sqlite:///{db.resolve()}" if db is not None and db.is_file() else None


def _figure(figures: dict[str, Figure], name: str, fig: Figure) -> str:
    figures[name] = fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(name)}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, index: bool = True) -> str:
    shown = df.rename(columns=lambda c: str(c).removeprefix(PARAMS).removeprefix(METRICS))
    return shown.to_html(index=index, border=0, na_rep="–", escape=True,
                         float_format=lambda v: f"{v:.4f}")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _num(value: Any) -> str:
    return f"{float(value):.4f}" if V.finite(value) else "n/a"


def _e(value: Any) -> str:
    return html.escape(str(value))
