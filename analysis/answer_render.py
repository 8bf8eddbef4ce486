"""The answer in words and pages (:func:`analysis.answer.answer_dict`): the verdict sentences
and findings, Markdown, HTML, JSON, and the one-line descriptions of a config and its budget
that the design section shows. Everything here reads the JSON-ready rows, not the arrays.

The order is the answer's rule: the design, the search spread and the dev figures (what
selection saw) first, then ONE final section, "Test figures (reported, never used to
choose)", that holds every test table: systems and references on all, seen and unseen
queries, the search spread on test, the comparisons by family, the verdicts and the
findings. The HTML page is the Markdown's content, self-contained (inline style, no links).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TEST_HEADING", "WORDS", "describe_budget", "describe_config", "dumps", "findings",
           "html_report", "markdown", "prior_clauses", "units_text", "verdicts", "where",
           "word"]

TEST_HEADING = "## Test figures (reported, never used to choose)"

#: family -> the title of its table
FAMILY_TITLES = {
    "primary": "Primary endpoints, pooled over datasets",
    "primary_per_dataset": "Primary comparisons per dataset",
    "diagnostic": "Diagnostic comparisons",
    "subsets": "Seen and unseen test queries",
    "no_labels": "Without labels (trained on the corpus alone)",
    "crossfit_pooled": "Cross-fitted primary endpoints, pooled over datasets (not BEIR test "
                       "figures)",
    "crossfit": "Cross-fitted queries (train ∪ test, each scored by a model trained without "
                "it; not BEIR test figures)",
    "crossfit_subsets": "Seen and unseen cross-fitted queries (against each fold's training "
                        "queries)",
}


# -- configs -----------------------------------------------------------------------------------

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


# -- helpers -----------------------------------------------------------------------------------

def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pts(value: Any) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.2f}"


def _p(value: Any) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3g}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows] + [""])


def _value(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {x}" for k, x in v.items())
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
        return "; ".join(v)
    return str(v)


def units_text(row: Mapping[str, Any]) -> str:
    """``3 searches / 1 reference``: how many units of A and of B a comparison row has."""
    def one(n: int, unit: str) -> str:
        return f"{n} {unit[:-1] if n == 1 and unit.endswith('s') else unit}"

    return f"{one(row['n_seeds_a'], row['units_a'])} / {one(row['n_seeds_b'], row['units_b'])}"


# -- verdicts and findings ---------------------------------------------------------------------

#: How each verdict word reads in a sentence.
WORDS = {"better": "better", "worse": "worse",
         "equivalent": "equivalent within ±{m:g} point",
         "undecided": "undecided (neither a difference nor equivalence within ±{m:g} point "
                      "shown)"}


def where(row: Mapping[str, Any], cell: bool = False) -> str:
    """Where a row was measured: dataset (or the pooled datasets), target, subset; ``cell``
    gives the short form of a table cell."""
    datasets = ", ".join(row.get("datasets") or [])
    text = row["dataset"] if row["dataset"] != "pooled" else (
        f"pooled ({datasets})" if cell else f"pooled over {datasets}")
    if row.get("target"):
        text += f" -> {row['target']}"
    if row.get("subset", "all") != "all":
        text += f" [{row['subset']}]" if cell else f" ({row['subset']} queries)"
    return text


def word(row: Mapping[str, Any]) -> str:
    """The verdict word of a row, in words."""
    return WORDS[row["verdict"]].format(m=row["margin_points"])


def _short(row: Mapping[str, Any]) -> str:
    return (f"{row['diff_points']:+.2f} points, adjusted interval "
            f"[{row['adj_ci_low_points']:+.2f}, {row['adj_ci_high_points']:+.2f}]: {word(row)}")


def verdicts(rows: Sequence[Mapping[str, Any]],
             extra: Mapping[str, str] | None = None) -> list[str]:
    """One sentence per row. The word follows the family-adjusted interval ("better" /
    "worse" when it excludes 0) and the TOST at the family's level ("equivalent" when the
    difference is shown within the margin), else "undecided" (:func:`compare_all`).

    Args:
        rows: Rows of :func:`comparisons`.
        extra: Row name -> a clause appended to its sentence.
    """
    out = []
    for r in rows:
        units = (f"{units_text(r)}, " + (f"paired by {'run' if r['units_a'] == 'runs' else 'seed'}"
                                          if r["paired"] else "independent"))
        out.append(
            f"{where(r)}: {r['comparison']}: {word(r)}: {r['diff_points']:+.2f} nDCG points; "
            f"95 % interval [{r['ci_low_points']:+.2f}, {r['ci_high_points']:+.2f}], "
            f"family-adjusted ({100 * r['adj_confidence']:.2f} %, {r['family_size']} in "
            f"'{r['family']}') [{r['adj_ci_low_points']:+.2f}, "
            f"{r['adj_ci_high_points']:+.2f}]; TOST at ±{r['margin_points']:g} p "
            f"{r['p_tost']:.3g}; bootstrap p {r['p_boot']:.3g} (Holm {r['p_boot_holm']:.3g}); "
            f"{units}; {r['n_queries']} queries; power to detect {r['margin_points']:g} point "
            f"{100 * r['power']:.0f} %" + (f"; {extra[r['name']]}" if extra and
                                           r["name"] in extra else ""))
    return out


def _index(comps: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[tuple, Mapping[str, Any]]:
    return {(r["dataset"], r["comparison"], r["subset"], r["target"]): r
            for rows in comps.values() for r in rows}


def prior_clauses(comps: Mapping[str, Sequence[Mapping[str, Any]]],
                  refs: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, str]:
    """The "prior" finding per dataset, as clauses for the rows that decide it:
    {row name: clause} for J* vs doc prior (seen) and J* vs zero-shot (unseen)."""
    idx = _index(comps)
    out = {}
    for ds in sorted({r["dataset"] for rows in comps.values() for r in rows} - {"pooled"}):
        vs_prior = idx.get((ds, "J* vs doc prior", "seen", None))
        seen = idx.get((ds, "J* vs zero-shot", "seen", None))
        unseen = idx.get((ds, "J* vs zero-shot", "unseen", None))
        if vs_prior and seen:
            out[vs_prior["name"]] = _prior_text(ds, seen, vs_prior, refs)
        if unseen:
            out[unseen["name"]] = _unseen_text(unseen)
    return out


def _prior_gain(refs: Mapping[tuple[str, str], Mapping[str, Any]], ds: str) -> float:
    """The doc prior's gain over zero-shot on the seen queries of ``ds``, in points."""
    def seen(name: str) -> float:
        return refs.get((ds, name), {}).get("seen", {}).get("mean", math.nan)

    return 100 * (seen("doc_prior") - seen("zero_shot"))


def _prior_text(ds: str, seen: Mapping[str, Any], vs_prior: Mapping[str, Any],
                refs: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    matched = {"better": "is NOT matched by the doc prior (J* stays above it)",
               "worse": "is matched by the doc prior (which is above J*)",
               "equivalent": "is matched by the doc prior (equivalent within the margin)",
               "undecided": "cannot be told matched or not by the doc prior (undecided)",
               }[vs_prior["verdict"]]
    return (f"the prior finding: J*'s gain over zero-shot on seen queries "
            f"({seen['diff_points']:+.2f} points, {seen['verdict']}) {matched}; the doc "
            f"prior reaches {_prior_gain(refs, ds):+.2f} over zero-shot there")


def _unseen_text(unseen: Mapping[str, Any]) -> str:
    return {"better": "a gain over zero-shot on unseen queries",
            "worse": "a loss against zero-shot on unseen queries",
            "equivalent": "no gain over zero-shot on unseen queries (equivalent within the "
                          "margin)",
            "undecided": "no gain over zero-shot on unseen queries that the data can show "
                         "(undecided)"}[unseen["verdict"]]


def findings(comps: Mapping[str, Sequence[Mapping[str, Any]]],
             systems: Sequence[Mapping[str, Any]]) -> list[str]:
    """The answer in a few plain sentences: the pooled primary endpoints, per dataset where
    J*'s gain sits (seen/unseen, against the doc prior), the no-label rows against
    zero-shot, and the cross-fitted rows (pooled, per dataset with their seen/unseen
    split)."""
    idx = _index(comps)
    refs = {(r["dataset"], r["system"]): r["test"] for r in systems if r["kind"] == "reference"}
    out = [f"Primary, {where(r)}: {r['comparison']}: {_short(r)}."
           for r in comps.get("primary", [])]
    datasets = list(dict.fromkeys(r["dataset"] for r in systems))
    for ds in datasets:
        seen = idx.get((ds, "J* vs zero-shot", "seen", None))
        unseen = idx.get((ds, "J* vs zero-shot", "unseen", None))
        vs_prior = idx.get((ds, "J* vs doc prior", "seen", None))
        if seen and unseen and vs_prior:
            sits = ("sits on seen queries" if seen["verdict"] == "better"
                    and unseen["verdict"] != "better" else
                    "is on seen and unseen queries" if seen["verdict"] == "better" else
                    "is not shown on seen queries")
            out.append(
                f"On {ds}, J*'s gain over zero-shot {sits}: {seen['diff_points']:+.2f} points "
                f"on the {seen['n_queries']} seen queries ({word(seen)}), "
                f"{unseen['diff_points']:+.2f} on the {unseen['n_queries']} unseen ones "
                f"({word(unseen)}); the doc prior reaches {_prior_gain(refs, ds):+.2f} over "
                f"zero-shot on seen, and J* vs the doc prior there is {_short(vs_prior)}.")
    for r in comps.get("no_labels", []):
        if r["subset"] == "all" and r["b"] == "zero-shot":
            unseen = idx.get((r["dataset"], r["comparison"], "unseen", None))
            out.append(f"{r['comparison']} on {r['dataset']}: {_short(r)}"
                       + (f" (unseen queries: {_short(unseen)})" if unseen else "") + ".")
    out += [f"Cross-fitted, {where(r)}: {r['comparison']}: {_short(r)}."
            for r in comps.get("crossfit_pooled", [])]
    for r in comps.get("crossfit", []):
        split = [idx.get((r["dataset"], r["comparison"], s, None)) for s in ("seen", "unseen")]
        out.append(f"Cross-fitted ({r['dataset']}, {r['n_queries']} train ∪ test queries): "
                   f"{r['comparison']}: {_short(r)}" + "".join(
                       f"; on its {x['n_queries']} {x['subset']} queries {_short(x)}"
                       for x in split if x) + ".")
    return out


# -- sections ----------------------------------------------------------------------------------

def _design(result: Mapping[str, Any]) -> list[str]:
    lines = ["## Design", ""]
    for ds, d in result["design"].items():
        lines += [f"### {ds}", ""] + [f"- {k}: {_value(v)}" for k, v in d.items()] + [""]
    lines += ["### Pre-registered comparisons", ""]
    lines += _table(["comparison", "family", "A", "B", "units of A", "units of B",
                     "scoring A / B", "pairing", "on", "queries", "pooled over datasets"],
                    [[p["comparison"], p["family"], p["a"], p["b"], p["a_units"],
                      p["b_units"], p["scoring"], "paired" if p["paired"] else "independent",
                      p["on"], ", ".join(p["subsets"]), p["pooled"] or "no"]
                     for p in result.get("plan", [])])
    settings = result.get("settings", {})
    lines += [f"Families (Holm within each; a comparison on seen/unseen queries is in "
              f"'subsets', or 'crossfit_subsets' on cross-fitted queries; verdicts follow "
              f"the Bonferroni-adjusted interval and the TOST at "
              f"±{settings.get('margin_points', 1.0):g} point):", ""]
    lines += [f"- {k}: {v}" for k, v in result.get("families", {}).items()] + [""]
    return lines


def _search_dev(result: Mapping[str, Any]) -> list[str]:
    groups = result.get("searches") or []
    if not groups:
        return []
    lines = ["## Search spread (dev)", ""]
    rows = [[g["dataset"], g["arm"], s["index"], s["searcher_seed"], s["trials"],
             s["best_trial"], _f(s["best_dev"]), s["best_epoch"], s["scoring"],
             "yes" if s["is_best"] else "", s["config"]]
            for g in groups for s in g["searches"]]
    lines += _table(["dataset", "arm", "search", "searcher seed", "trials", "best trial",
                     "best dev", "best epoch", "scoring", "best", "config"], rows)
    lines += _table(["dataset", "arm", "searches", "best dev min", "max", "spread",
                     "best search"],
                    [[g["dataset"], g["arm"], len(g["searches"]), _f(g["best_dev"]["min"]),
                      _f(g["best_dev"]["max"]), _f(g["best_dev"]["spread"]), g["best"]]
                     for g in groups])
    return lines


def _dev_figures(result: Mapping[str, Any]) -> list[str]:
    rows = [[r["dataset"], r["system"], r["scoring"], r["runs"], _f(r["dev_mean"]),
             ", ".join(f"{k}: {_f(v)}" for k, v in r["dev_by_search"].items()),
             r["best_epochs"]]
            for r in result["systems"] if r["kind"] == "trained"]
    return (["## Dev figures of the retrained systems (what selection saw)", ""]
            + _table(["dataset", "system", "scoring", "runs", "dev nDCG@10 (mean)",
                      "dev by search", "best epochs"], rows))


def _subset(t: Mapping[str, Any], subset: str) -> str:
    x = t.get(subset)
    return f"{_f(x['mean'])} ({x['n']})" if x else "n/a"


def _systems_test(result: Mapping[str, Any]) -> list[str]:
    rows = []
    for r in result["systems"]:
        t = r["test"]
        trained = r["kind"] == "trained"
        rows.append([
            r["dataset"], r["system"], r["scoring"], r["runs"] if trained else "-",
            _subset(t, "all"), _f(t["all"].get("seed_std")) if trained else "-",
            _f(t["all"].get("search_std")) if trained else "-",
            (f"{_f(t['all']['search_min'])}-{_f(t['all']['search_max'])}"
             if trained and len(r["searches"]) > 1 else "-"),
            _subset(t, "seen"), _subset(t, "unseen"),
            _f(r["query_mean"]) if trained else "-",
            _f(r["predictor_mean"]) if trained else "-",
            ", ".join(f"{k} {_f(v)}" for k, v in r.get("transfer", {}).items()) or "-"])
    return (["### Systems and references (test nDCG@10)", "",
             "Mean over searches of each search's mean over seeds; seed sd within searches, "
             "search sd and range across them; (n) queries.", ""]
            + _table(["dataset", "system", "scoring", "runs", "all (n)", "seed sd",
                      "search sd", "search range", "seen (n)", "unseen (n)", "query-scored",
                      "predictor-scored", "transfer"], rows))


def _crossfit_test(result: Mapping[str, Any]) -> list[str]:
    rows = [[r["dataset"], r["system"], len(r["seeds"]) or "-", _subset(r["test"], "all"),
             _f(r["test"]["all"]["seed_std"]) if r["seeds"] else "-",
             _subset(r["test"], "seen"), _subset(r["test"], "unseen")]
            for r in result.get("crossfit_systems") or []]
    if not rows:
        return []
    return (["### Systems and references on cross-fitted queries (nDCG@10)", "",
             "Every train ∪ test query (dev apart) scored by the fold model that did not train "
             "on it; mean over seeds, their sd; seen/unseen against the fold's training "
             "queries; the reference rows on the same queries (the doc prior from each fold's "
             "training positives). Not BEIR test figures.", ""]
            + _table(["dataset", "system", "seeds", "all (n)", "seed sd", "seen (n)",
                      "unseen (n)"], rows))


def _search_test(result: Mapping[str, Any]) -> list[str]:
    groups = result.get("searches") or []
    if not groups:
        return []
    rows = [[g["dataset"], g["arm"], s["index"], _f(s["best_dev"]), _f(s["test_mean"]),
             s["test_runs"], "yes" if s["is_best"] else ""]
            for g in groups for s in g["searches"]]
    return (["### Search spread on test", ""]
            + _table(["dataset", "arm", "search", "best dev", "test (mean of its runs)",
                      "runs", "best by dev"], rows)
            + _table(["dataset", "arm", "test min", "max", "spread"],
                     [[g["dataset"], g["arm"], _f(g["test_mean"]["min"]),
                       _f(g["test_mean"]["max"]), _f(g["test_mean"]["spread"])]
                      for g in groups]))


def _comparison_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        out.append([
            where(r, cell=True), r["comparison"], r["a"], r["b"], _f(r["mean_a"]),
            _f(r["mean_b"]),
            _pts(r["diff_points"]),
            f"[{_pts(r['ci_low_points'])}, {_pts(r['ci_high_points'])}]",
            f"[{_pts(r['adj_ci_low_points'])}, {_pts(r['adj_ci_high_points'])}]",
            _p(r["p_tost"]), f"{_p(r['p_boot'])} ({_p(r['p_boot_holm'])})",
            f"{_p(r['p_permutation'])} ({_p(r['p_permutation_holm'])})", r["verdict"],
            "paired" if r["paired"] else "independent", units_text(r),
            r["n_queries"], f"{100 * r['power']:.0f} %"])
    return _table(["where", "comparison", "A", "B", "mean A", "mean B", "diff (points)",
                   "95 % CI", "adjusted CI", "TOST ±1 p", "p boot (Holm)", "p perm (Holm)",
                   "verdict", "pairing", "units A / B", "queries", "power (1 point)"], out)


def _comparisons(result: Mapping[str, Any]) -> list[str]:
    lines = []
    for family, rows in result["comparisons"].items():
        if not rows:
            continue
        m = rows[0]["family_size"]
        lines += [f"### {FAMILY_TITLES.get(family, family)}", "",
                  f"Family '{family}': {m} comparisons; adjusted intervals at "
                  f"{100 * rows[0]['adj_confidence']:.2f} % (Bonferroni), p's Holm-adjusted "
                  f"within the family.", ""] + _comparison_table(rows)
    return lines


def _verdicts_and_findings(result: Mapping[str, Any]) -> list[str]:
    lines = ["### Verdicts", ""]
    for family, sentences in result.get("verdicts", {}).items():
        lines += [f"#### {FAMILY_TITLES.get(family, family)}", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    lines += ["### Findings", ""] + [f"- {s}" for s in result.get("findings", [])] + [""]
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """The answer as Markdown: design, search spread and dev figures, then the test section."""
    lines = (_design(result) + _search_dev(result) + _dev_figures(result) + [TEST_HEADING, ""]
             + _systems_test(result) + _search_test(result) + _crossfit_test(result)
             + _comparisons(result)
             + _verdicts_and_findings(result))
    return "\n".join(lines).rstrip("\n") + "\n"


# -- HTML and JSON -----------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em}"
        "table{border-collapse:collapse;font-size:.8em;margin:.5em 0 1em}"
        "th,td{border:1px solid #ddd;padding:.2em .45em;vertical-align:top}"
        "th{background:#f4f4f4;text-align:left}h2{border-bottom:1px solid #ccc}"
        "li{margin:.2em 0}")


def html_report(result: Mapping[str, Any], title: str = "The answer") -> str:
    """A self-contained HTML page of :func:`markdown`'s content (tables as HTML)."""
    body = []
    for block in markdown(result).split("\n\n"):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        while lines and lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            body.append(f"<h{level}>{_inline(lines[0].lstrip('# '))}</h{level}>")
            lines = lines[1:]
        if not lines:
            continue
        if lines[0].startswith("|"):
            body.append(_html_table(lines))
        elif lines[0].startswith("- "):
            body.append("<ul>" + "".join(f"<li>{_inline(ln[2:])}</li>" for ln in lines)
                        + "</ul>")
        else:
            body.append(f"<p>{_inline(' '.join(lines))}</p>")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
            f"{html.escape(title)}</title><style>{_CSS}</style></head><body><h1>"
            f"{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _html_table(lines: list[str]) -> str:
    def cells(ln: str) -> list[str]:
        return [c.strip() for c in ln.strip().strip("|").split("|")]

    head = "".join(f"<th>{_inline(c)}</th>" for c in cells(lines[0]))
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells(ln)) + "</tr>"
                   for ln in lines[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def dumps(result: Mapping[str, Any]) -> str:
    """JSON text of :func:`analysis.answer.answer_dict`'s result (NaN and ±inf as null)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(dict(result)), indent=1, allow_nan=False)
