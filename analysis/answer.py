"""The answer's table: does the JEPA predictor help retrieval? Statistics and renderings.

Input is what ``jepa-study answer`` measured (:class:`Measured`): per dataset, the retrained
runs of each system (config x seed), each with its per-query test nDCG@10 under both scorings
and, for transfer, on the other collections; plus the reference rows (zero-shot base, BM25).
Output is one table a reader can trust: per dataset and system the mean and spread over
seeds, and per comparison the difference in nDCG points, a 95 % two-level bootstrap interval
(seeds, then queries), a paired t test and a sign-flip permutation test over queries, each
Holm-corrected across the comparisons of its family (in-domain; transfer).

The comparisons, each against the best JEPA config J scored as dev chose:

* ``vs tuned contrastive``: the best config of the contrastive arm (λ_pred = 0, its own
  knobs searched at the same effort);
* ``vs capacity-matched``: J with λ_pred = 0 and a query-side head of the predictor's exact
  shape, trained contrastively: the predictor's extra capacity without the predictive term;
* ``vs no L_pred``: J with λ_pred = 0 and nothing else changed;
* ``predictor vs query scoring``: J's own runs scored with the predictor's output and with
  the query embedding.

Test figures enter here only: every choice before (configs, epochs, scoring) was made on dev.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from analysis.stats import Comparison, compare_all, per_query_matrix

#: the systems retrained over seeds, in table order, and what each is
SYSTEMS = {
    "jepa": "best JEPA config J (L_pred on), scored as dev chose",
    "contrastive": "best contrastive config (λ_pred = 0, tuned at equal effort)",
    "capacity": "J with λ_pred = 0 and a query head of the predictor's shape",
    "no_pred": "J with λ_pred = 0, nothing else changed",
}
REFERENCES = {"zero_shot": "zero-shot base encoder (cosine)", "bm25": "BM25 (bm25s)"}
#: (name, system A, scoring of A or None for its own, system B, scoring of B or None)
COMPARISONS = [
    ("jepa vs tuned contrastive", "jepa", None, "contrastive", None),
    ("jepa vs capacity-matched", "jepa", None, "capacity", None),
    ("jepa vs no L_pred", "jepa", None, "no_pred", None),
    ("predictor vs query scoring of J", "jepa", "predictor", "jepa", "query"),
]


@dataclass
class Run:
    """One retrained run: its seed, dev figure, and per-query test nDCG@10 by scoring."""

    seed: int
    dev: float
    best_epoch: int
    per_query: dict[str, dict[str, float]]  #: scoring -> {qid: nDCG@10}
    transfer: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: other collection -> scoring -> {qid: nDCG@10}


@dataclass
class System:
    """A config retrained over seeds; ``scoring`` is the one dev chose for it."""

    name: str
    scoring: str
    runs: list[Run]


@dataclass
class Measured:
    """Everything the answer measured on one dataset."""

    dataset: str
    systems: dict[str, System]
    references: dict[str, dict[str, float]]  #: name -> {qid: nDCG@10}
    design: dict[str, Any] = field(default_factory=dict)


def _matrix(system: System, scoring: str | None, target: str | None = None):
    """``[seeds, queries]`` per-query nDCG@10 of a system (on ``target``: a transfer set)."""
    scoring = scoring or system.scoring
    rows = [r.per_query[scoring] if target is None else r.transfer[target][scoring]
            for r in system.runs]
    return per_query_matrix(rows)


def comparisons(measured: list[Measured], **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """Every comparison of every dataset, in-domain and transfer, each family Holm-corrected.

    Returns:
        ``{"in_domain": [...], "transfer": [...]}``; each row is a :class:`Comparison` dict
        plus ``dataset`` (and ``target`` for transfer rows).
    """
    families: dict[str, dict[str, tuple[Any, Any]]] = {"in_domain": {}, "transfer": {}}
    labels: dict[str, dict[str, dict[str, str]]] = {"in_domain": {}, "transfer": {}}
    for m in measured:
        targets = sorted({t for s in m.systems.values() for r in s.runs for t in r.transfer})
        for name, sa, ka, sb, kb in COMPARISONS:
            if sa not in m.systems or sb not in m.systems:
                continue  # a control that could not be built (said in the design)
            a, b = m.systems[sa], m.systems[sb]
            key = f"{m.dataset}: {name}"
            families["in_domain"][key] = (_matrix(a, ka)[0], _matrix(b, kb)[0])
            labels["in_domain"][key] = {"dataset": m.dataset, "comparison": name}
            for target in targets:
                tkey = f"{m.dataset} -> {target}: {name}"
                families["transfer"][tkey] = (_matrix(a, ka, target)[0],
                                              _matrix(b, kb, target)[0])
                labels["transfer"][tkey] = {"dataset": m.dataset, "target": target,
                                            "comparison": name}
    out: dict[str, list[dict[str, Any]]] = {}
    for family, pairs in families.items():
        rows: list[Comparison] = compare_all(pairs, **kwargs) if pairs else []
        out[family] = [{**labels[family][r.name], **r.to_dict()} for r in rows]
    return out


def system_rows(measured: list[Measured]) -> list[dict[str, Any]]:
    """Per dataset and system: the mean and seed spread of test nDCG@10 (its own scoring and
    both), mean dev, and the reference rows; transfer means beside."""
    rows = []
    for m in measured:
        for name, s in m.systems.items():
            by_seed = {k: [_mean(r.per_query[k]) for r in s.runs] for k in ("query", "predictor")}
            own = by_seed[s.scoring]
            row = {"dataset": m.dataset, "system": name, "what": SYSTEMS.get(name, name),
                   "scoring": s.scoring, "seeds": [r.seed for r in s.runs],
                   "test_mean": _avg(own), "test_seed_std": _std(own),
                   "test_query_mean": _avg(by_seed["query"]),
                   "test_predictor_mean": _avg(by_seed["predictor"]),
                   "dev_mean": _avg([r.dev for r in s.runs]),
                   "best_epochs": [r.best_epoch for r in s.runs]}
            for target in sorted({t for r in s.runs for t in r.transfer}):
                row[f"transfer_{target}_mean"] = _avg(
                    [_mean(r.transfer[target][s.scoring]) for r in s.runs])
            rows.append(row)
        for name, per_query in m.references.items():
            rows.append({"dataset": m.dataset, "system": name, "what": REFERENCES.get(name, name),
                         "scoring": "-", "seeds": [], "test_mean": _mean(per_query),
                         "test_seed_std": math.nan})
    return rows


def _mean(per_query: Mapping[str, float]) -> float:
    return sum(per_query.values()) / len(per_query)


def _avg(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    mean = _avg(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdicts(rows: list[dict[str, Any]], alpha: float = 0.05) -> list[str]:
    """One sentence per comparison, whatever the sign. The word (better / worse / no
    difference) follows the two-level bootstrap interval, which counts both the seeds and
    the queries as samples (the question "is this recipe better"); the tests over queries,
    which hold the trained models fixed, follow with their Holm-corrected p-values."""
    out = []
    for r in rows:
        low, high = r["ci_low_points"], r["ci_high_points"]
        where = r["dataset"] + (f" -> {r['target']}" if "target" in r else "")
        if low > 0:
            word = "better"
        elif high < 0:
            word = "worse"
        else:
            word = "no difference the interval can tell"
        tests = "reject" if r["p_permutation_holm"] < alpha else "do not reject"
        out.append(f"{where}: {r['comparison']}: {word}: {r['diff_points']:+.2f} nDCG points, "
                   f"95 % interval over seeds and queries [{low:+.2f}, {high:+.2f}]; over "
                   f"queries (these trained models), permutation p {r['p_permutation']:.3g} "
                   f"(Holm {r['p_permutation_holm']:.3g}) and paired t p {r['p_t']:.3g} "
                   f"(Holm {r['p_t_holm']:.3g}): the tests {tests} at {alpha} after Holm")
    return out


def answer_dict(measured: list[Measured], **kwargs: Any) -> dict[str, Any]:
    """Everything of the answer as JSON-ready data: design, systems, comparisons, verdicts."""
    comps = comparisons(measured, **kwargs)
    return {"design": {m.dataset: m.design for m in measured},
            "systems": system_rows(measured), "comparisons": comps,
            "verdicts": verdicts(comps["in_domain"]),
            "transfer_verdicts": verdicts(comps["transfer"])}


# -- renderings ----------------------------------------------------------------------------

def describe_budget(cfg: Any, patience: int | None) -> str:
    """The budget rules of a study's trials, in words."""
    return (f"up to {cfg.train.total_epochs} epochs ({cfg.train.sampling} an epoch), "
            f"patience {patience}, best dev epoch kept")


def describe_config(cfg: Any) -> str:
    """A config's searched choices in one line: the design section of the answer."""
    m, l, t = cfg.model, cfg.loss, cfg.train
    shape = (f"depth {m.predictor.depth} x{m.predictor.hidden_mult:g} "
             f"{'residual' if m.predictor.residual else 'plain'}")
    heads = ([f"predictor {shape}, stopgrad {l.stopgrad}"] if cfg.trains_predictor else []) \
        + ([f"query head {shape}"] if m.query_head else [])
    contrastive = (f" ({l.contrastive}, " + (f"temperature {l.temperature:.3g})"
                                             if l.contrastive == "infonce"
                                             else f"margin {l.margin:.3g})")
                   if l.lambda_con > 0 else "")
    return (f"λ_pred {l.lambda_pred:.3g}, λ_con {l.lambda_con:.3g}{contrastive}, "
            f"λ_iso {l.lambda_iso:.3g} ({l.isotropy}), λ_reg {l.lambda_reg:.3g}; "
            f"{'; '.join(heads) or 'no predictor'}; {m.variant}, {m.projection} projection, "
            f"{m.output_dim}-d, {m.similarity}; lr {t.lr:.3g}, weight decay "
            f"{t.weight_decay:.3g}, batch {t.batch_size}, hard negatives {t.hard_negatives}; "
            f"scored with the {cfg.eval.score_with}")


def _f(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown(result: Mapping[str, Any]) -> str:
    """The answer as Markdown: design, dev sanity figures, then test tables and verdicts."""
    lines = ["## Design", ""]
    for ds, d in result["design"].items():
        lines += [f"### {ds}", ""] + [f"- {k}: {v}" for k, v in d.items()] + [""]
    lines += ["## Dev figures of the retrained systems (what selection saw)", "",
              "| dataset | system | scoring | dev nDCG@10 (mean over seeds) | best epochs |",
              "|---|---|---|---|---|"]
    for r in result["systems"]:
        if r.get("seeds"):
            lines.append(f"| {r['dataset']} | {r['system']} | {r['scoring']} | "
                         f"{_f(r['dev_mean'])} | {r['best_epochs']} |")
    lines += ["", "## Test figures (reported, never used to choose)", "",
              "| dataset | system | scoring | test nDCG@10 | seed std | query-scored | "
              "predictor-scored | transfer |", "|---|---|---|---|---|---|---|---|"]
    for r in result["systems"]:
        transfer = ", ".join(f"{k[9:-5]} {_f(v)}" for k, v in r.items()
                             if k.startswith("transfer_") and k.endswith("_mean"))
        lines.append(f"| {r['dataset']} | {r['system']} | {r['scoring']} | "
                     f"{_f(r['test_mean'])} | {_f(r['test_seed_std'])} | "
                     f"{_f(r.get('test_query_mean', math.nan))} | "
                     f"{_f(r.get('test_predictor_mean', math.nan))} | {transfer or '-'} |")
    for family, title in (("in_domain", "Comparisons (in-domain test)"),
                          ("transfer", "Comparisons (transfer: trained on one, tested on "
                                       "the other)")):
        rows = result["comparisons"][family]
        if not rows:
            continue
        lines += ["", f"### {title}", "",
                  "| dataset | comparison | A | B | diff (points) | 95 % CI | p perm (Holm) | "
                  "p t (Holm) | seeds | queries |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            where = r["dataset"] + (f" -> {r['target']}" if "target" in r else "")
            lines.append(
                f"| {where} | {r['comparison']} | {_f(r['mean_a'])} | {_f(r['mean_b'])} | "
                f"{r['diff_points']:+.2f} | [{r['ci_low_points']:+.2f}, "
                f"{r['ci_high_points']:+.2f}] | {r['p_permutation']:.3g} "
                f"({r['p_permutation_holm']:.3g}) | {r['p_t']:.3g} ({r['p_t_holm']:.3g}) | "
                f"{r['n_seeds_a']}/{r['n_seeds_b']} | {r['n_queries']} |")
    lines += ["", "### Verdicts", ""] + [f"- {v}" for v in result["verdicts"]]
    if result.get("transfer_verdicts"):
        lines += ["", "Transfer:", ""] + [f"- {v}" for v in result["transfer_verdicts"]]
    return "\n".join(lines) + "\n"


def html_report(result: Mapping[str, Any], title: str = "The answer") -> str:
    """A self-contained HTML page of :func:`markdown`'s content (tables as HTML)."""
    body = []
    for block in markdown(result).split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        if lines[0].startswith("|"):
            head = [c.strip() for c in lines[0].strip("|").split("|")]
            rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
            body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                        + "</tr>" + "".join("<tr>" + "".join(
                            f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        elif lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            body.append(f"<h{level}>{html.escape(lines[0].lstrip('# '))}</h{level}>")
            if lines[1:]:
                body.append(_list(lines[1:]))
        else:
            body.append(_list(lines))
    css = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px}"
           "table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ddd;"
           "padding:.25em .5em}th{background:#f4f4f4}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
            f"{html.escape(title)}</title><style>{css}</style></head><body><h1>"
            f"{html.escape(title)}</h1>" + "\n".join(body) + "</body></html>\n")


def _list(lines: list[str]) -> str:
    items = [ln[2:] for ln in lines if ln.startswith("- ")]
    if items:
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"
    return "<p>" + html.escape(" ".join(lines)) + "</p>"


def dumps(result: Mapping[str, Any]) -> str:
    """JSON text of :func:`answer_dict`'s result (NaN written as null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(dict(result)), indent=1)
