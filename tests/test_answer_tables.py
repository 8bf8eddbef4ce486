"""The answer's tables (``analysis.answer``): hand-built measurements whose answers are known."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from analysis.answer import (COMPARISONS, FAMILIES, Measured, Run, Search, System, answer_dict,
                             comparisons, markdown)
from analysis.answer_render import TEST_HEADING, dumps, html_report
from analysis.stats import bootstrap_ci, holm

KW = {"n_boot": 2000, "n_resamples": 2000}


# -- builders ----------------------------------------------------------------------------------

def _qids(name: str, n: int) -> list[str]:
    return [f"{name}-q{i:03d}" for i in range(n)]


def _run(seed: int, values: dict[str, float], search: int = 0,
         predictor: dict[str, float] | None = None, scoring: str | None = None,
         transfer: dict | None = None, dev: float = 0.5) -> Run:
    return Run(seed=seed, search=search, dev=dev, best_epoch=3,
               per_query={"query": values,
                          "predictor": dict(values) if predictor is None else predictor},
               transfer=transfer or {}, scoring=scoring)


def _add(values: dict[str, float], delta: float, only: set[str] | None = None,
         rng: np.random.Generator | None = None, noise: float = 0.0) -> dict[str, float]:
    return {q: v + (delta if only is None or q in only else 0.0)
            + (float(rng.normal(0, noise)) if rng is not None and noise else 0.0)
            for q, v in values.items()}


def _measured(name: str, systems: dict[str, System], zero: dict[str, float], seen: set[str],
              prior: dict[str, float] | None = None, **kw) -> Measured:
    refs = {"zero_shot": zero, "bm25": _add(zero, -0.01),
            "doc_prior": prior if prior is not None else _add(zero, 0.1, seen)}
    subsets = {"seen": sorted(seen), "unseen": sorted(set(zero) - seen)}
    return Measured(name, systems, refs, subsets, **kw)


def _world(name: str = "toy", n: int = 80, rng_seed: int = 0, drop: tuple[str, ...] = (),
           crossfit: bool = False) -> Measured:
    """Every system, with known gaps (in nDCG@10 units, on top of zero-shot ``zs``):

    J: 3 searches x seeds 1, 2, +0.03 (+ search offsets -0.005/0/+0.005) + 0.1 on seen
    queries, predictor-scored, its query scoring 0.05 lower; C: 2 searches, +0 + 0.1 on seen;
    best searches J 1, C 1; C+pred = C* + 0.01 per seed; no_pred = J* - 0.02, capacity =
    J* - 0.01 per seed; no-label J = zs + 0.02, no-label C = zs; every run 0.002 noise.
    """
    rng = np.random.default_rng(rng_seed)
    qids = _qids(name, n)
    seen = set(qids[: n // 2])
    zs = {q: float(rng.uniform(0.2, 0.7)) for q in qids}
    other = {q: float(rng.uniform(0.2, 0.7)) for q in _qids("other", 30)}

    def noisy(values, delta=0.0):
        return _add(values, delta, rng=rng, noise=0.002)

    def transfer(delta):
        t = noisy(other, delta)
        return {"other": {"query": t, "predictor": t}}

    j = [_run(seed, noisy(_add(zs, 0.1, seen), 0.03 + off), s,
              scoring="predictor", transfer=transfer(0.0)) for s, off in
         enumerate((-0.005, 0.0, 0.005)) for seed in (1, 2)]
    for r in j:  # the query scoring of J is 0.05 below its predictor's
        r.per_query["predictor"] = r.per_query["query"]
        r.per_query["query"] = noisy(r.per_query["predictor"], -0.05)
    c = [_run(seed, noisy(_add(zs, 0.1, seen), off), s, transfer=transfer(0.0))
         for s, off in enumerate((-0.004, 0.004)) for seed in (1, 2)]
    j_star = {r.seed: r.per_query["predictor"] for r in j if r.search == 1}
    c_star = {r.seed: r.per_query["query"] for r in c if r.search == 1}
    systems = {
        "jepa": System("jepa", "predictor", j),
        "contrastive": System("contrastive", "query", c),
        "c_pred": System("c_pred", "query", [_run(s, noisy(v, 0.01))
                                             for s, v in c_star.items()]),
        "no_pred": System("no_pred", "query", [_run(s, noisy(v, -0.02))
                                               for s, v in j_star.items()]),
        "capacity": System("capacity", "query", [_run(s, noisy(v, -0.01))
                                                 for s, v in j_star.items()]),
        "nolabel_jepa": System("nolabel_jepa", "query",
                               [_run(s, noisy(zs, 0.02)) for s in (1, 2, 3)]),
        "nolabel_contrastive": System("nolabel_contrastive", "query",
                                      [_run(s, noisy(zs)) for s in (1, 2, 3)]),
    }
    for system in drop:
        del systems[system]
    searches = ([Search("jepa", i, i, 8, f"j{i}", 0.80 + 0.01 * (i == 1), 5, "predictor",
                        f"config j{i}") for i in range(3)]
                + [Search("contrastive", i, i, 8, f"c{i}", 0.79 + 0.01 * i, 4, "query",
                          f"config c{i}") for i in range(2)]
                + [Search("c_pred", 0, 0, 4, "p0", 0.81, 4, "query", "config p0")])
    cf, cf_kw = None, {}
    if crossfit:  # J* +0.02, and +0.04 more on the seen half; C+pred = C* + 0.01 per seed
        pool = {q: float(rng.uniform(0.2, 0.7)) for q in _qids(f"{name}-cf", 60)}
        cf_seen = set(sorted(pool)[:30])
        c_cf = {s: noisy(pool) for s in ("1", "2")}
        cf = {"jepa": {s: noisy(_add(pool, 0.04, cf_seen), 0.02) for s in ("1", "2")},
              "contrastive": c_cf, "c_pred": {s: noisy(v, 0.01) for s, v in c_cf.items()}}
        cf_kw = {"crossfit_references": {"zero_shot": _add(pool, -0.01),
                                         "bm25": _add(pool, -0.02),
                                         "doc_prior": _add(pool, 0.03, cf_seen)},
                 "crossfit_subsets": {"seen": sorted(cf_seen),
                                      "unseen": sorted(set(pool) - cf_seen)}}
    return _measured(name, systems, zs, seen, searches=searches, crossfit=cf, **cf_kw,
                     design={"space": "toy", "best_search": {"jepa": 1, "contrastive": 1,
                                                             "c_pred": 0}})


def _rows(result_or_comps, family: str) -> dict[str, dict]:
    comps = result_or_comps.get("comparisons", result_or_comps)
    return {r["name"]: r for r in comps[family]}


# -- known answers -----------------------------------------------------------------------------

def test_constant_shift_and_identical_systems():
    """(Moved from tests/test_answer.py.) A constant shift is exact; identical systems give 0."""
    rng = np.random.default_rng(0)
    qids = _qids("toy", 60)
    zs = {q: float(rng.random()) for q in qids}
    shifted = _add(zs, 0.05)
    j = System("jepa", "query", [_run(s, shifted) for s in (1, 2, 3)])
    measured = _measured("toy", {"jepa": j,
                                 "no_pred": System("no_pred", "query",
                                                   [_run(s, dict(zs)) for s in (1, 2, 3)]),
                                 "capacity": System("capacity", "query",
                                                    [_run(s, dict(shifted)) for s in (1, 2, 3)])},
                         zs, set(qids[:30]))
    rows = _rows(comparisons([measured], **KW), "diagnostic")
    shift = rows["toy: J* vs no L_pred"]
    assert shift["diff_points"] == pytest.approx(5.0)
    assert shift["ci_low_points"] == pytest.approx(5.0) == shift["ci_high_points"]
    assert shift["p_permutation"] < 0.01 and shift["verdict"] == "better"
    for same in (rows["toy: J* vs capacity-matched"],  # the same per-query figures
                 rows["toy: predictor vs query scoring of J"]):  # the same dicts both ways
        assert same["diff_points"] == 0 and same["p_t"] == 1.0
        assert same["ci_low_points"] == 0 == same["ci_high_points"]
        assert same["verdict"] == "equivalent" and same["paired"]
    for r in rows.values():  # Holm never lowers a p-value
        assert r["p_permutation_holm"] >= r["p_permutation"]
    result = answer_dict([measured], **KW)
    assert any("J* vs no L_pred: better: +5.00 nDCG points" in v
               for v in result["verdicts"]["diagnostic"])
    text = markdown(result)
    assert text.index("## Dev figures") < text.index(TEST_HEADING)
    assert "| toy | bm25 |" in text


def test_primary_is_recipe_level_over_searches():
    """J and C: 3 searches x 2 seeds; a unit is a search (the mean over its seeds), and the
    arms' searches are resampled independently."""
    rng = np.random.default_rng(1)
    qids = _qids("toy", 50)
    base = {q: float(rng.uniform(0.2, 0.7)) for q in qids}
    wiggle = {q: float(rng.normal(0, 0.01)) for q in qids}
    wiggle = {q: v - float(np.mean(list(wiggle.values()))) for q, v in wiggle.items()}

    def arm(gain, offsets):
        return [_run(seed, {q: v + gain + off + eps + (wiggle[q] if s == 1 else 0.0)
                            for q, v in base.items()}, s)
                for s, off in enumerate(offsets) for seed, eps in ((1, -0.003), (2, 0.003))]

    j = arm(0.05, (-0.01, 0.0, 0.01))
    wiggle = {q: -v for q, v in wiggle.items()}  # C's search 1 wiggles the other way
    c = arm(0.02, (0.004, -0.004, 0.0))
    measured = _measured("toy", {"jepa": System("jepa", "query", j),
                                 "contrastive": System("contrastive", "query", c)},
                         base, set(qids[:25]))
    rows = _rows(comparisons([measured], **KW), "primary_per_dataset")
    row = rows["toy: J vs tuned contrastive"]
    assert row["diff_points"] == pytest.approx(3.0)  # 0.05 - 0.02, offsets cancel
    assert (row["n_seeds_a"], row["n_seeds_b"], row["units_a"]) == (3, 3, "searches")
    assert not row["paired"] and row["n_queries"] == 50

    def search_means(runs):
        return np.array([[np.mean([r.per_query["query"][q] for r in runs if r.search == s])
                          for q in qids] for s in range(3)])

    low, high = bootstrap_ci(search_means(j), search_means(c), KW["n_boot"], seed=0)
    assert (row["ci_low_points"], row["ci_high_points"]) == pytest.approx((100 * low,
                                                                           100 * high))
    # a system with a single search falls back to its seeds as units
    one = _measured("one", {"jepa": System("jepa", "query", [r for r in j if r.search == 0]),
                            "contrastive": System("contrastive", "query", c)},
                    _add(base, 0.0, rng=rng, noise=0.01), set(qids[:25]))
    row = _rows(comparisons([one], **KW), "primary_per_dataset")["one: J vs tuned contrastive"]
    assert (row["n_seeds_a"], row["units_a"], row["units_b"]) == (2, "seeds", "searches")


def test_c_pred_is_paired_by_seed_with_c_star():
    """A shared seed effect (sd ~5 points) moves C* and C+pred alike: the paired interval is
    narrow; C's other search (far off) is not part of the comparison."""
    rng = np.random.default_rng(2)
    qids = _qids("toy", 60)
    base = {q: float(rng.uniform(0.2, 0.7)) for q in qids}
    effect = {1: -0.05, 2: 0.03, 3: 0.06, 4: -0.04}
    c_star = {s: _add(base, e, rng=rng, noise=0.003) for s, e in effect.items()}
    c = ([_run(s, _add(base, 0.2)) for s in effect]  # search 0: not the best by dev
         + [_run(s, v, 1) for s, v in c_star.items()])
    c_pred = [_run(s, _add(c_star[s], 0.01, rng=rng, noise=0.003))
              for s in sorted(effect, reverse=True)]  # another order: aligned by seed
    measured = _measured("toy", {"contrastive": System("contrastive", "query", c),
                                 "c_pred": System("c_pred", "query", c_pred)}, base,
                         set(qids[:30]), design={"best_search": {"contrastive": 1}})
    row = _rows(comparisons([measured], **KW), "primary_per_dataset")["toy: C+pred vs C"]
    assert row["paired"] and (row["n_seeds_a"], row["n_seeds_b"]) == (4, 4)
    assert row["mean_b"] == pytest.approx(np.mean([np.mean(list(v.values()))
                                                   for v in c_star.values()]))
    assert row["diff_points"] == pytest.approx(1.0, abs=0.2)
    assert row["ci_high_points"] - row["ci_low_points"] < 0.5
    assert row["verdict"] == "better"
    a = np.array([[r.per_query["query"][q] for q in qids] for r in sorted(c_pred,
                                                                          key=lambda r: r.seed)])
    b = np.array([[c_star[s][q] for q in qids] for s in sorted(effect)])
    low, high = bootstrap_ci(a, b, KW["n_boot"], seed=0)  # as if unpaired
    assert 100 * (high - low) > 5 * (row["ci_high_points"] - row["ci_low_points"])
    # without a named best search, the contrastive search with the best dev is C*
    del measured.design["best_search"]
    measured.searches = [Search("contrastive", 0, 0, 8, "a", 0.7, 3, "query", "x"),
                         Search("contrastive", 1, 1, 8, "b", 0.8, 3, "query", "y")]
    again = _rows(comparisons([measured], **KW), "primary_per_dataset")["toy: C+pred vs C"]
    assert again["diff_points"] == pytest.approx(row["diff_points"])


def _prior_world(name: str, n: int, noise: float, rng_seed: int) -> Measured:
    """J* gains 0.1 on seen queries only; the doc prior gains exactly 0.1 on seen."""
    rng = np.random.default_rng(rng_seed)
    qids = _qids(name, n)
    seen = set(qids[: n // 2])
    zs = {q: float(rng.uniform(0.2, 0.7)) for q in qids}
    j = [_run(s, _add(_add(zs, 0.1, seen), 0.0, rng=rng, noise=noise)) for s in (1, 2, 3)]
    return _measured(name, {"jepa": System("jepa", "query", j)}, zs, seen)


def test_a_gain_on_seen_queries_only_and_the_doc_prior():
    clean, noisy = _prior_world("clean", 200, 0.002, 3), _prior_world("noisy", 16, 0.25, 4)
    result = answer_dict([clean, noisy], **KW)
    rows = _rows(result, "subsets")
    assert rows["clean: J* vs zero-shot [seen]"]["verdict"] == "better"
    assert rows["clean: J* vs zero-shot [seen]"]["diff_points"] == pytest.approx(10, abs=0.1)
    assert rows["clean: J* vs zero-shot [unseen]"]["verdict"] == "equivalent"
    assert rows["clean: J* vs doc prior [seen]"]["verdict"] == "equivalent"
    assert rows["noisy: J* vs doc prior [seen]"]["verdict"] == "undecided"
    assert rows["clean: J* vs zero-shot [seen]"]["n_queries"] == 100
    assert rows["clean: J* vs doc prior [seen]"]["units_b"] == "reference"
    assert rows["clean: J* vs doc prior [seen]"]["n_seeds_b"] == 1
    verdicts = result["verdicts"]["subsets"]
    assert any(v.startswith("clean (seen queries): J* vs doc prior: equivalent")
               and "is matched by the doc prior" in v for v in verdicts)
    assert any(v.startswith("noisy (seen queries): J* vs doc prior: undecided")
               and "cannot be told matched" in v for v in verdicts)
    assert any(v.startswith("clean (unseen queries): J* vs zero-shot")
               and "no gain over zero-shot on unseen queries" in v for v in verdicts)
    found = " ".join(result["findings"])
    assert "On clean, J*'s gain over zero-shot sits on seen queries: +10.0" in found
    assert "the doc prior reaches +10.00 over zero-shot on seen" in found
    # the systems table: all, seen and unseen with counts, the references beside
    systems = {(r["dataset"], r["system"]): r for r in result["systems"]}
    j = systems[("clean", "jepa")]["test"]
    zs = systems[("clean", "zero_shot")]["test"]
    assert (j["seen"]["n"], j["unseen"]["n"], j["all"]["n"]) == (100, 100, 200)
    assert j["seen"]["mean"] - zs["seen"]["mean"] == pytest.approx(0.1, abs=1e-3)
    assert j["unseen"]["mean"] == pytest.approx(zs["unseen"]["mean"], abs=1e-3)
    assert systems[("clean", "doc_prior")]["test"]["seen"]["mean"] == pytest.approx(
        zs["seen"]["mean"] + 0.1)


def test_pooled_endpoint_is_the_mean_of_per_dataset_differences():
    worlds = [_world("a", rng_seed=5), _world("b", rng_seed=6)]
    # dataset b's J gains 0.02 more than a's
    for r in worlds[1].systems["jepa"].runs:
        r.per_query = {k: _add(v, 0.02) for k, v in r.per_query.items()}
    result = answer_dict(worlds, **KW)
    pooled = {p["comparison"]: p for p in result["pooled"]}
    assert set(pooled) == {"J vs tuned contrastive", "C+pred vs C"}
    jc = pooled["J vs tuned contrastive"]
    per = [r["diff_points"] for r in jc["per_dataset"]]
    assert [r["dataset"] for r in jc["per_dataset"]] == ["a", "b"]
    assert per[1] - per[0] == pytest.approx(2.0, abs=0.05)
    assert jc["pooled"]["diff_points"] == pytest.approx(np.mean(per))
    assert jc["pooled"]["datasets"] == ["a", "b"] and jc["pooled"]["family"] == "primary"
    assert jc["pooled"]["n_queries"] == 160
    assert pooled["C+pred vs C"]["pooled"]["paired"]
    assert pooled["C+pred vs C"]["pooled"]["diff_points"] == pytest.approx(1.0, abs=0.1)
    assert result["findings"][0].startswith("Primary, pooled over a, b: J vs tuned contrastive")


def test_crossfit_endpoints_pooled_in_a_family_of_their_own():
    worlds = [_world("a", rng_seed=5, crossfit=True), _world("b", rng_seed=6, crossfit=True)]
    for per_seed in worlds[1].crossfit["jepa"].values():  # b's J* gains 0.02 more
        per_seed.update(_add(per_seed, 0.02))
    result = answer_dict(worlds, **KW)
    pooled = {(p["family"], p["comparison"]): p for p in result["pooled"]}
    assert set(pooled) == {("primary", "J vs tuned contrastive"), ("primary", "C+pred vs C"),
                           ("crossfit_pooled", "J* vs C* (cross-fitted)"),
                           ("crossfit_pooled", "C+pred vs C* (cross-fitted)")}
    jc = pooled[("crossfit_pooled", "J* vs C* (cross-fitted)")]
    per = [r["diff_points"] for r in jc["per_dataset"]]
    assert [r["dataset"] for r in jc["per_dataset"]] == ["a", "b"]
    assert [r["subset"] for r in jc["per_dataset"]] == ["all", "all"]
    assert per == pytest.approx([4.0, 6.0], abs=0.1)
    assert jc["pooled"]["diff_points"] == pytest.approx(np.mean(per))
    assert jc["pooled"]["n_queries"] == 120 and jc["pooled"]["family_size"] == 2
    # pooling over two datasets narrows the interval below either dataset's
    width = jc["pooled"]["ci_high_points"] - jc["pooled"]["ci_low_points"]
    assert all(width < r["ci_high_points"] - r["ci_low_points"] for r in jc["per_dataset"])
    assert pooled[("crossfit_pooled", "C+pred vs C* (cross-fitted)")]["pooled"]["paired"]
    assert any(f.startswith("Cross-fitted, pooled over a, b: J* vs C* (cross-fitted)")
               for f in result["findings"])
    plan = {p["comparison"]: p for p in result["plan"]}
    assert plan["J* vs C* (cross-fitted)"]["pooled"] == "crossfit_pooled"
    assert plan["J* vs doc prior (cross-fitted)"]["family"] == "crossfit_subsets"


def test_families_and_holm_within_each():
    result = answer_dict([_world(crossfit=True)], **KW)
    comps = result["comparisons"]
    assert list(comps) == list(FAMILIES)
    names = {f: {(r["comparison"], r["subset"], r["target"]) for r in rows}
             for f, rows in comps.items()}
    assert names["primary"] == {("J vs tuned contrastive", "all", None),
                                ("C+pred vs C", "all", None)}
    assert names["primary_per_dataset"] == names["primary"]
    assert names["diagnostic"] == {("predictor vs query scoring of J", "all", None),
                                   ("J* vs no L_pred", "all", None),
                                   ("J* vs capacity-matched", "all", None),
                                   ("J vs tuned contrastive (transfer)", "all", "other")}
    assert len(names["subsets"]) == 16  # 2 primary + 3 vs references + 3 no-label, x2
    assert {s for _, s, _ in names["subsets"]} == {"seen", "unseen"}
    assert len(names["no_labels"]) == 3 and len(names["crossfit"]) == 2
    assert names["crossfit_pooled"] == names["crossfit"]
    assert len(names["crossfit_subsets"]) == 10  # 2 primary + 3 vs references, x2
    for family, rows in comps.items():
        m = len(rows)
        assert all(r["family"] == family and r["family_size"] == m for r in rows)
        for p in ("p_boot", "p_permutation", "p_t"):
            assert [r[f"{p}_holm"] for r in rows] == pytest.approx(
                list(holm([r[p] for r in rows])))
        for r in rows:
            assert r["adj_confidence"] == pytest.approx(1 - 0.05 / m)
            assert r["adj_ci_low_points"] <= r["ci_low_points"] + 1e-9
            assert r["ci_low_points"] <= r["diff_points"] + 1e-9
            assert 0 < r["power"] <= 1 and r["verdict"] in ("better", "worse", "equivalent",
                                                           "undecided")
    diag = _rows(result, "diagnostic")
    scorings = diag["toy: predictor vs query scoring of J"]
    assert scorings["paired"] and scorings["units_a"] == "runs" and scorings["n_seeds_a"] == 6
    assert scorings["diff_points"] == pytest.approx(5.0, abs=0.1)
    assert diag["toy: J* vs no L_pred"]["diff_points"] == pytest.approx(2.0, abs=0.1)
    assert diag["toy: J* vs capacity-matched"]["diff_points"] == pytest.approx(1.0, abs=0.1)
    transfer = diag["toy: J vs tuned contrastive (transfer) on other"]
    assert not transfer["paired"] and transfer["n_queries"] == 30
    assert sum(len(v) for v in result["verdicts"].values()) == sum(map(len, comps.values()))
    assert {p["comparison"] for p in result["plan"]} == {s.name for s in COMPARISONS}


def test_a_missing_system_skips_its_comparisons_with_a_note():
    result = answer_dict([_world(drop=("c_pred", "capacity", "nolabel_contrastive"))], **KW)
    every = [r["comparison"] for rows in result["comparisons"].values() for r in rows]
    assert "C+pred vs C" not in every and "J* vs capacity-matched" not in every
    assert "no-label J vs no-label C" not in every and "no-label J vs zero-shot" in every
    assert [p["comparison"] for p in result["pooled"]] == ["J vs tuned contrastive"]
    notes = result["design"]["toy"]["skipped"]
    assert "C+pred vs C: skipped (no c_pred system)" in notes
    assert "J* vs capacity-matched: skipped (no capacity system)" in notes
    assert "no-label C vs zero-shot: skipped (no nolabel_contrastive system)" in notes
    assert "## Design" in markdown(result) and "no c_pred system" in markdown(result)


def test_no_label_rows():
    result = answer_dict([_world()], **KW)
    rows = _rows(result, "no_labels")
    assert rows["toy: no-label J vs zero-shot"]["verdict"] == "better"
    assert rows["toy: no-label J vs zero-shot"]["diff_points"] == pytest.approx(2.0, abs=0.1)
    assert rows["toy: no-label C vs zero-shot"]["verdict"] == "equivalent"
    assert rows["toy: no-label J vs no-label C"]["verdict"] == "better"
    assert not rows["toy: no-label J vs no-label C"]["paired"]
    assert rows["toy: no-label J vs zero-shot"]["n_seeds_a"] == 3
    subsets = _rows(result, "subsets")
    assert {"toy: no-label J vs zero-shot [seen]", "toy: no-label J vs zero-shot [unseen]",
            "toy: no-label C vs zero-shot [unseen]"} <= set(subsets)
    assert any(f.startswith("no-label J vs zero-shot on toy: +") and "unseen queries" in f
               for f in result["findings"])


def test_crossfit_table_only_when_given():
    result = answer_dict([_world(crossfit=True)], **KW)
    rows = _rows(result, "crossfit")
    jc, pc = rows["toy: J* vs C* (cross-fitted)"], rows["toy: C+pred vs C* (cross-fitted)"]
    assert jc["n_queries"] == 60 and jc["n_seeds_a"] == 2 and not jc["paired"]
    assert jc["diff_points"] == pytest.approx(4.0, abs=0.1)
    assert pc["paired"] and pc["n_seeds_a"] == 2
    assert pc["diff_points"] == pytest.approx(1.0, abs=0.1)
    subsets = _rows(result, "crossfit_subsets")
    assert subsets["toy: J* vs C* (cross-fitted) [seen]"]["diff_points"] == pytest.approx(
        6.0, abs=0.1)
    assert subsets["toy: J* vs C* (cross-fitted) [unseen]"]["diff_points"] == pytest.approx(
        2.0, abs=0.1)
    assert subsets["toy: J* vs C* (cross-fitted) [unseen]"]["n_queries"] == 30
    # the reference rows are the cross-fitted ones, not the BEIR test split's
    assert subsets["toy: J* vs zero-shot (cross-fitted) [unseen]"]["diff_points"] == \
        pytest.approx(3.0, abs=0.1)
    assert subsets["toy: J* vs doc prior (cross-fitted) [seen]"]["diff_points"] == \
        pytest.approx(3.0, abs=0.1)
    assert subsets["toy: J* vs doc prior (cross-fitted) [unseen]"]["n_queries"] == 30
    assert not any("cross-fitted" in k for k in _rows(result, "subsets"))
    table = {r["system"]: r["test"] for r in result["crossfit_systems"]}
    assert set(table) == {"jepa", "contrastive", "c_pred", "zero_shot", "bm25", "doc_prior"}
    assert table["jepa"]["seen"]["mean"] - table["contrastive"]["seen"]["mean"] == \
        pytest.approx(0.06, abs=0.002)
    assert table["jepa"]["all"]["n"] == 60 and table["jepa"]["unseen"]["n"] == 30
    assert table["doc_prior"]["seen"]["mean"] - table["zero_shot"]["seen"]["mean"] == \
        pytest.approx(0.04)
    assert any(f.startswith("Cross-fitted (toy, 60 train ∪ test queries): J* vs C*")
               and "on its 30 seen queries" in f for f in result["findings"])
    assert "### Systems and references on cross-fitted queries" in markdown(result)
    plain = answer_dict([_world()], **KW)
    assert plain["comparisons"]["crossfit"] == plain["comparisons"]["crossfit_pooled"] == []
    assert plain["crossfit_systems"] == []
    assert "### Systems and references on cross-fitted queries" not in markdown(plain)
    assert not any("cross-fitted" in n for n in plain["design"]["toy"].get("skipped", []))


def test_search_spread_and_systems_table():
    result = answer_dict([_world()], **KW)
    spread = {g["arm"]: g for g in result["searches"]}
    jepa = spread["jepa"]
    assert jepa["best"] == 1 and [s["is_best"] for s in jepa["searches"]] == [False, True, False]
    assert jepa["best_dev"]["spread"] == pytest.approx(0.01)
    assert [s["test_runs"] for s in jepa["searches"]] == [2, 2, 2]
    assert jepa["test_mean"]["spread"] == pytest.approx(0.01, abs=0.001)
    systems = {r["system"]: r for r in result["systems"]}
    j = systems["jepa"]
    assert j["scoring"] == "predictor" and j["searches"] == [0, 1, 2] and j["runs"] == 6
    assert j["test"]["all"]["search_std"] == pytest.approx(0.005, abs=0.001)
    assert j["query_mean"] == pytest.approx(j["predictor_mean"] - 0.05, abs=0.001)
    assert set(j["transfer"]) == {"other"}
    assert math.isnan(systems["c_pred"]["test"]["all"]["search_std"])
    assert systems["doc_prior"]["kind"] == "reference"


# -- renderings --------------------------------------------------------------------------------

def test_markdown_puts_every_test_table_after_the_test_heading():
    result = answer_dict([_world(crossfit=True)], **KW)
    text = markdown(result)
    order = ["## Design", "### Pre-registered comparisons", "## Search spread (dev)",
             "## Dev figures", TEST_HEADING, "### Systems and references",
             "### Search spread on test", "### Systems and references on cross-fitted",
             "### Primary endpoints, pooled",
             "### Primary comparisons per dataset", "### Diagnostic comparisons",
             "### Seen and unseen test queries", "### Without labels",
             "### Cross-fitted primary endpoints", "### Cross-fitted queries",
             "### Seen and unseen cross-fitted queries", "### Verdicts", "### Findings"]
    at = [text.index(h) for h in order]
    assert at == sorted(at)
    assert text.count("## Test figures") == 1
    before = text[: text.index(TEST_HEADING)]
    lines = before.splitlines()
    headers = [ln for ln, nxt in zip(lines, lines[1:]) if nxt.startswith("|---")]
    assert len(headers) == 4  # the plan, the searches (2), the dev figures
    assert not any(re.search(r"test|diff|seen \(n\)|verdict", h) for h in headers)
    after = text[text.index(TEST_HEADING):]
    assert after.count("| diff (points) |") == len([f for f, r in result["comparisons"].items()
                                                    if r])
    page = html_report(result, "The answer: toy")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert "Test figures (reported, never used to choose)</h2>" in page
    assert not re.search(r"(src|href)=|https?://", page)


def test_json_round_trips_through_dumps():
    result = answer_dict([_world(crossfit=True)], **KW)
    text = dumps(result)
    back = json.loads(text)
    assert dumps(back) == text
    assert back["systems"][-1]["kind"] == "reference"
    assert back["comparisons"]["primary"][0]["verdict"] in ("better", "worse", "equivalent",
                                                           "undecided")
    c_pred = next(r for r in back["systems"] if r["system"] == "c_pred")
    assert c_pred["test"]["all"]["search_std"] is None  # NaN written as null
    assert set(back) == {"design", "plan", "families", "settings", "searches", "systems",
                         "crossfit_systems", "comparisons", "pooled", "verdicts", "findings"}
