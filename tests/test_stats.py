"""Statistics of the paired comparison, against cases whose answer is known."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats as st

from analysis.stats import (VERDICTS, Comparison, Equivalence, PooledEndpoint, bootstrap_ci,
                            compare, compare_all, equivalence_test, holm, paired_t,
                            per_query_matrix, permutation_test, pooled_endpoint,
                            power_from_interval)


def _arms(rng: np.random.Generator, n_queries: int = 300, seeds: tuple[int, int] = (5, 5),
          shift: float = 0.0, seed_sd: float = 0.0, noise: float = 0.1):
    """Synthetic per-query nDCG: a shared query difficulty (the pairing), a per-training
    offset (``seed_sd``), per-(seed, query) noise, and ``shift`` added to arm A."""
    difficulty = rng.uniform(0.1, 0.9, n_queries)

    def arm(n: int) -> np.ndarray:
        return (difficulty + rng.normal(0, seed_sd, (n, 1))
                + rng.normal(0, noise, (n, n_queries)))

    return arm(seeds[0]) + shift, arm(seeds[1])


def _shared_seed_arms(rng: np.random.Generator, n_seeds: int = 5, n_queries: int = 300,
                      gap: float = -0.02, seed_sd: float = 0.05, noise: float = 0.01):
    """Two arms whose seed ``i`` shares one training: a per-seed shift (sd ``seed_sd``) moves
    every query of both arms alike; A is B plus ``gap`` plus small per-(seed, query) noise."""
    difficulty = rng.uniform(0.2, 0.8, n_queries)
    shift = rng.normal(0, seed_sd, (n_seeds, 1))
    b = difficulty + shift + rng.normal(0, noise, (n_seeds, n_queries))
    a = difficulty + shift + gap + rng.normal(0, noise, (n_seeds, n_queries))
    return a, b


def _exact_diffs(n_queries: int, mean: float, sd: float) -> np.ndarray:
    """Query differences with exactly this mean and sample sd (normal quantiles): the paired
    t statistic is ``mean * sqrt(n) / sd`` to rounding."""
    z = st.norm.ppf((np.arange(n_queries) + 0.5) / n_queries)
    return mean + sd * (z - z.mean()) / z.std(ddof=1)


def _one_seed_pair(n_queries: int, mean: float, sd: float = 0.1):
    b = np.random.default_rng(n_queries).uniform(0.2, 0.8, (1, n_queries))
    return b + _exact_diffs(n_queries, mean, sd), b


# -- known answers ---------------------------------------------------------------------------

def test_identical_arms():
    a, _ = _arms(np.random.default_rng(0))
    c = compare(a, a.copy(), n_boot=2000, n_resamples=2000)
    assert c.diff_points == 0.0
    assert c.ci_low_points <= 0.0 <= c.ci_high_points  # seeds still resampled per arm
    assert c.p_t == 1.0 and c.p_permutation == 1.0
    assert c.t_statistic == 0.0


def test_identical_arms_and_seeds_give_a_zero_interval():
    row = np.random.default_rng(1).uniform(0, 1, 300)
    a = np.tile(row, (5, 1))
    assert bootstrap_ci(a, a.copy(), n_boot=2000) == (0.0, 0.0)
    assert bootstrap_ci(a, a[:3].copy(), n_boot=2000) == (0.0, 0.0)  # 5 seeds vs 3


def test_constant_shift_is_exact():
    c_shift = 0.03
    b = np.tile(np.random.default_rng(2).uniform(0, 0.9, 300), (5, 1))
    res = compare(b + c_shift, b, n_boot=2000, n_resamples=2000)
    assert res.diff_points == pytest.approx(100 * c_shift, abs=1e-9)
    assert res.ci_low_points == pytest.approx(100 * c_shift, abs=1e-9)
    assert res.ci_high_points == pytest.approx(100 * c_shift, abs=1e-9)
    assert res.p_t < 1e-12
    assert res.p_permutation < 1e-3  # the smallest a 2,000-draw test can give is 2/2001


def test_real_shift_with_noise_is_detected():
    a, b = _arms(np.random.default_rng(3), shift=0.03, noise=0.1)
    c = compare(a, b, n_boot=2000, n_resamples=2000)
    assert c.p_t < 1e-6
    assert c.p_permutation < 2e-3
    assert 0 < c.ci_low_points < 3.0 < c.ci_high_points
    assert c.diff_points == pytest.approx(100 * (a.mean() - b.mean()))


def test_paired_t_equals_scipy_on_seed_means():
    a, b = _arms(np.random.default_rng(4), n_queries=50, seeds=(5, 3), shift=0.01)
    ref = st.ttest_rel(a.mean(0), b.mean(0))
    t, p = paired_t(a, b)
    assert t == pytest.approx(ref.statistic, rel=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


def test_permutation_is_exact_for_few_queries():
    # 5 queries: all 2**5 = 32 sign patterns are enumerated.
    all_up = np.ones((1, 5))
    assert permutation_test(all_up, np.zeros((1, 5))).pvalue == pytest.approx(2 / 32)
    # |mean| >= 2 for 6 of the 32 patterns of (1, 2, 3, -1, 5).
    d = np.array([[1.0, 2.0, 3.0, -1.0, 5.0]])
    assert permutation_test(d, np.zeros((1, 5))).pvalue == pytest.approx(6 / 32)


def test_permutation_agrees_with_t_under_the_normal_model():
    a, b = _arms(np.random.default_rng(5), n_queries=200, shift=0.005, noise=0.2)
    p_perm = permutation_test(a, b, n_resamples=4000).pvalue
    assert p_perm == pytest.approx(paired_t(a, b).pvalue, abs=0.03)


def test_holm_known_example():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_is_monotone_and_capped():
    raw = np.array([0.5, 0.001, 0.2, 0.6, 0.04])
    adj = holm(raw)
    order = np.argsort(raw)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= raw) and np.all(adj <= 1.0)
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]
    assert holm([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, float("nan")])


# -- behaviour -------------------------------------------------------------------------------

def test_null_coverage():
    """50 seeded null experiments (5 seeds x 100 queries, a small per-training offset): the
    95 % interval should cover 0 in nearly all (the two-level bootstrap is conservative)."""
    rng = np.random.default_rng(6)
    covered = 0
    for i in range(50):
        a, b = _arms(rng, n_queries=100, seed_sd=0.005, noise=0.1)
        low, high = bootstrap_ci(a, b, n_boot=1000, seed=i)
        covered += low <= 0.0 <= high
    assert covered >= 42  # expected ~49; 42 is far below what chance allows


def test_bootstrap_is_seeded_and_fast():
    a, b = _arms(np.random.default_rng(7), shift=0.01)
    start = time.perf_counter()
    first = bootstrap_ci(a, b, n_boot=10000, seed=3)
    elapsed = time.perf_counter() - start
    assert bootstrap_ci(a, b, n_boot=10000, seed=3) == first
    assert bootstrap_ci(a, b, n_boot=10000, seed=4) != first
    assert elapsed < 5.0  # ~0.3 s on one core; loose for a loaded CI machine


def test_spread_and_counts():
    a, b = _arms(np.random.default_rng(8), n_queries=40, seeds=(5, 3), seed_sd=0.01)
    c = compare(a, b, name="x", n_boot=500, n_resamples=500)
    assert (c.n_seeds_a, c.n_seeds_b, c.n_queries) == (5, 3, 40)
    assert c.seed_std_a == pytest.approx(np.std(a.mean(1), ddof=1))
    assert c.seed_std_b == pytest.approx(np.std(b.mean(1), ddof=1))
    assert c.mean_a == pytest.approx(a.mean()) and c.mean_b == pytest.approx(b.mean())
    assert math.isnan(compare(a[:1], b, n_boot=100, n_resamples=100).seed_std_a)


def test_compare_all_fills_holm():
    rng = np.random.default_rng(9)
    pairs = {"null": _arms(rng, n_queries=100),
             "shift": _arms(rng, n_queries=100, shift=0.05)}
    rows = compare_all(pairs, n_boot=500, n_resamples=500)
    assert [r.name for r in rows] == ["null", "shift"]
    assert all(isinstance(r, Comparison) for r in rows)
    np.testing.assert_allclose([r.p_permutation_holm for r in rows],
                               holm([r.p_permutation for r in rows]))
    np.testing.assert_allclose([r.p_t_holm for r in rows], holm([r.p_t for r in rows]))
    d = rows[1].to_dict()
    assert d["name"] == "shift" and d["p_t_holm"] == rows[1].p_t_holm
    assert compare(*pairs["null"], n_boot=100, n_resamples=100).p_t_holm is None
    assert compare_all({}) == []


def test_per_query_matrix_aligns_columns():
    seeds = [{"q2": 0.5, "q1": 0.25}, {"q1": 1.0, "q2": 0.0}]
    m, ids = per_query_matrix(seeds)
    assert ids == ["q1", "q2"]
    np.testing.assert_array_equal(m, [[0.25, 0.5], [1.0, 0.0]])
    m2, _ = per_query_matrix([{"q1": 0.1, "q2": 0.2, "q3": 0.3}], query_ids=ids)
    np.testing.assert_array_equal(m2, [[0.1, 0.2]])
    with pytest.raises(ValueError, match="seed 1 has no value for 1 of the 2 queries"):
        per_query_matrix([{"q1": 0.0, "q2": 0.0}, {"q1": 0.0}])


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [paired_t, permutation_test, bootstrap_ci, compare])
def test_different_query_counts_are_rejected(fn):
    with pytest.raises(ValueError, match="same queries.*a has 10 query columns, b has 9"):
        fn(np.zeros((3, 10)), np.zeros((3, 9)))


def test_bad_inputs_are_named():
    ok = np.zeros((2, 5))
    with pytest.raises(ValueError, match=r"a must be 2-D \[seeds, queries\], got shape \(5,\)"):
        paired_t(np.zeros(5), ok)
    with pytest.raises(ValueError, match="b holds 2 non-finite"):
        paired_t(ok, np.array([[0, 0, 0, 0, np.nan]] * 2))
    with pytest.raises(ValueError, match="b has no seeds"):
        paired_t(ok, np.zeros((0, 5)))
    with pytest.raises(ValueError, match="at least 2 queries"):
        paired_t(np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(ok, ok, confidence=95)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(ok, ok, n_boot=0)


# -- paired seeds ----------------------------------------------------------------------------

def test_shared_seed_effect_needs_the_paired_resample():
    """The issue's case: five runs, a seed effect of sd 5 points shared by both arms, a true
    gap of -2 points. Independent resampling counts the shared effect as noise."""
    a, b = _shared_seed_arms(np.random.default_rng(11))
    low_i, high_i = (100 * x for x in bootstrap_ci(a, b, n_boot=4000))
    low_p, high_p = (100 * x for x in bootstrap_ci(a, b, n_boot=4000, paired=True))
    assert low_i < 0 < high_i and high_i - low_i > 5.0
    assert low_p < -2.0 < high_p < 0 and high_p - low_p < 0.5
    rows = compare_all({"shared": (a, b)}, paired=True, n_boot=4000, n_resamples=500)
    assert rows[0].paired and rows[0].verdict == "worse"
    unpaired = compare_all({"shared": (a, b)}, n_boot=4000, n_resamples=500)[0]
    assert not unpaired.paired and unpaired.verdict == "undecided"


def test_paired_identical_arms_give_exactly_zero():
    a = np.random.default_rng(12).uniform(0, 1, (5, 300))  # seeds differ from each other
    assert bootstrap_ci(a, a.copy(), n_boot=2000, paired=True) == (0.0, 0.0)
    low, high = bootstrap_ci(a, a.copy(), n_boot=2000)  # unpaired: seeds resampled apart
    assert low < 0 < high


def test_paired_needs_equal_seed_counts():
    a, b = np.zeros((5, 300)), np.zeros((3, 300))
    match = r"same number of seeds.*a has shape \(5, 300\), b has shape \(3, 300\)"
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(a, b, paired=True)
    with pytest.raises(ValueError, match=match):
        equivalence_test(a, b, paired=True)
    with pytest.raises(ValueError, match="scifact: paired seeds"):
        pooled_endpoint({"scifact": (a, b)}, paired=True)
    assert bootstrap_ci(a, b, n_boot=100) == (0.0, 0.0)  # unpaired allows it


def test_paired_coverage():
    """200 simulated experiments (5 shared seeds x 100 queries, a true gap of 1 point that
    varies over queries and a little over seeds): the paired 95 % interval covers it in
    about 95 % of them (0.95 measured)."""
    rng = np.random.default_rng(13)
    covered, n, gap = 0, 200, 0.01
    for i in range(n):
        difficulty = rng.uniform(0.2, 0.8, 100)
        shift = rng.normal(0, 0.05, (5, 1))
        b = difficulty + shift + rng.normal(0, 0.02, (5, 100))
        a = (difficulty + shift + gap + rng.normal(0, 0.05, 100)  # the gap varies by query
             + rng.normal(0, 0.003, (5, 1)) + rng.normal(0, 0.02, (5, 100)))
        low, high = bootstrap_ci(a, b, n_boot=1000, seed=i, paired=True)
        covered += low <= gap <= high
    assert 0.88 <= covered / n <= 0.99


def test_paired_bootstrap_is_seeded_and_fast():
    a, b = _shared_seed_arms(np.random.default_rng(14))
    start = time.perf_counter()
    first = bootstrap_ci(a, b, n_boot=10000, seed=3, paired=True)
    elapsed = time.perf_counter() - start
    assert bootstrap_ci(a, b, n_boot=10000, seed=3, paired=True) == first
    assert elapsed < 5.0  # ~0.25 s on one core; loose for a loaded machine


# -- equivalence -----------------------------------------------------------------------------

def test_tost_small_difference_with_many_queries_is_equivalent():
    a, b = _arms(np.random.default_rng(15), n_queries=2000, shift=0.001, noise=0.05)
    eq = equivalence_test(a, b, n_boot=4000)
    assert isinstance(eq, Equivalence)
    assert eq.equivalent and eq.pvalue < 0.05
    assert -1.0 < eq.low_points < 0.1 < eq.high_points < 1.0
    assert eq.pvalue == max(eq.p_lower, eq.p_upper) and eq.margin_points == 1.0


def test_tost_large_difference_is_not_equivalent():
    a, b = _arms(np.random.default_rng(16), n_queries=2000, shift=0.03, noise=0.05)
    eq = equivalence_test(a, b, n_boot=4000)
    assert not eq.equivalent and eq.p_upper > 0.99
    assert eq.diff_points == pytest.approx(3.0, abs=0.3)
    assert equivalence_test(a, b, margin_points=5.0, n_boot=4000).equivalent  # wider margin


def test_tost_noisy_few_queries_cannot_tell():
    a, b = _arms(np.random.default_rng(17), n_queries=10, noise=0.3)
    eq = equivalence_test(a, b, n_boot=4000)
    assert not eq.equivalent and eq.pvalue > 0.05
    assert eq.high_points - eq.low_points > 2.0  # wider than the whole ±1 point band


def test_tost_agrees_with_t_based_tost_on_one_seed():
    """One seed per arm: the bootstrap is over the paired query differences, and its
    one-sided p-values match the t-based TOST's (df = queries - 1)."""
    n, mean, sd = 200, 0.003, 0.1  # se 0.71 points: p_lower 0.03, p_upper 0.16
    a, b = _one_seed_pair(n, mean, sd)
    eq = equivalence_test(a, b, n_boot=20000)
    se = sd / math.sqrt(n)
    assert eq.p_lower == pytest.approx(st.t.sf((mean + 0.01) / se, n - 1), abs=0.01)
    assert eq.p_upper == pytest.approx(st.t.sf((0.01 - mean) / se, n - 1), abs=0.02)
    assert 0.1 < eq.p_upper and not eq.equivalent


def test_tost_paired_decides_where_unpaired_cannot():
    a, b = _shared_seed_arms(np.random.default_rng(18), gap=0.001)
    assert equivalence_test(a, b, paired=True, n_boot=4000).equivalent
    assert not equivalence_test(a, b, n_boot=4000).equivalent
    rows = compare_all({"same": (a, b)}, paired={"same": True}, n_boot=4000, n_resamples=500)
    assert rows[0].equivalent and rows[0].verdict == "equivalent"
    assert rows[0].eq_low_points > -1.0 and rows[0].eq_high_points < 1.0


def test_equivalence_inputs_are_checked():
    ok = np.zeros((2, 5))
    with pytest.raises(ValueError, match="margin_points must be > 0"):
        equivalence_test(ok, ok, margin_points=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 0.5\)"):
        equivalence_test(ok, ok, alpha=0.5)


# -- families and verdicts -------------------------------------------------------------------

def test_holm_within_families_only():
    """p_t of 'y' is 0.02 by construction. In its family of two (beside p ~ 1e-6) Holm
    leaves it at 0.02; pooled into one family of four it becomes 3 x 0.02 = 0.06."""
    n = 400
    t_y = st.t.isf(0.01, n - 1)
    t_z = st.t.isf(0.0125, n - 1)  # two-sided p 0.025
    pairs = {"x": _one_seed_pair(n, 5 * 0.1 / math.sqrt(n)),
             "y": _one_seed_pair(n, t_y * 0.1 / math.sqrt(n)),
             "z": _one_seed_pair(n, t_z * 0.1 / math.sqrt(n)),
             "w": _one_seed_pair(n, 0.0)}
    kw = dict(n_boot=4000, n_resamples=500)
    first = compare_all({k: pairs[k] for k in ("x", "y")}, family="primary", **kw)
    second = compare_all({k: pairs[k] for k in ("z", "w")}, family="diagnostic", **kw)
    pooled = compare_all(pairs, family="everything", **kw)
    assert first[1].p_t == pytest.approx(0.02, rel=1e-6)
    assert first[1].p_t_holm == pytest.approx(0.02, rel=1e-6)
    assert pooled[1].p_t_holm == pytest.approx(0.06, rel=1e-6)
    assert second[0].p_t_holm == pytest.approx(0.05, rel=1e-6)  # 2 x 0.025 in its family
    assert pooled[2].p_t_holm == pytest.approx(0.06, rel=1e-6)  # running max: 3 x 0.02
    assert [r.family for r in first + second] == ["primary"] * 2 + ["diagnostic"] * 2
    assert [r.family_size for r in first + second + pooled] == [2] * 4 + [4] * 4
    assert first[1].adj_confidence == pytest.approx(0.975)
    assert pooled[1].adj_confidence == pytest.approx(0.9875)
    np.testing.assert_allclose([r.p_boot_holm for r in pooled], holm([r.p_boot for r in pooled]))
    assert pooled[1].verdict == "undecided"  # |t| 2.33 < z(0.99375) 2.50


def test_verdict_follows_the_adjusted_interval():
    """|t| = 2.2: the unadjusted 95 % interval excludes 0 (1.96), the interval adjusted for
    a family of four (2.50) does not, so the verdict is "undecided", not "better"."""
    n = 400
    target = _one_seed_pair(n, 2.2 * 0.1 / math.sqrt(n))
    kw = dict(n_boot=10000, n_resamples=500)
    alone = compare_all({"target": target}, **kw)[0]
    assert alone.verdict == "better"
    assert alone.adj_ci_low_points == alone.ci_low_points  # m = 1: no adjustment
    nulls = {f"null {i}": _one_seed_pair(n + i + 1, 0.0) for i in range(3)}
    row = compare_all({"target": target, **nulls}, **kw)[0]
    assert row.ci_low_points > 0 and row.p_t < 0.05
    assert row.adj_ci_low_points < 0 < row.adj_ci_high_points
    assert row.verdict == "undecided" and not row.equivalent
    assert row.adj_ci_high_points - row.adj_ci_low_points > row.ci_high_points - row.ci_low_points


def test_verdict_words_and_row_fields():
    rng = np.random.default_rng(19)
    b = np.tile(rng.uniform(0.1, 0.9, 300), (5, 1))
    pairs = {"up": (b + 0.03, b), "down": (b - 0.03, b), "same": (b, b.copy()),
             "noisy": _arms(rng, n_queries=10, noise=0.3)}
    rows = compare_all(pairs, family="f", paired={"up": True, "same": True}, n_boot=2000,
                       n_resamples=500)
    assert [r.verdict for r in rows] == ["better", "worse", "equivalent", "undecided"]
    assert [r.paired for r in rows] == [True, False, True, False]
    assert set(VERDICTS) >= {r.verdict for r in rows}
    assert rows[0].power == 1.0  # a zero-width interval sees any difference
    d = json.loads(json.dumps(rows[3].to_dict()))
    for key in ("diff_points", "ci_low_points", "adj_ci_low_points", "adj_ci_high_points",
                "p_boot", "p_boot_holm", "p_tost", "equivalent", "verdict", "paired", "power",
                "family", "family_size", "margin_points"):
        assert key in d
    assert compare(*pairs["up"], n_boot=100, n_resamples=100).verdict is None
    with pytest.raises(ValueError, match=r"not in pairs: \['upp'\]"):
        compare_all(pairs, paired={"upp": True})
    with pytest.raises(ValueError, match=r"confidence must be in \(0.5, 1\)"):
        compare_all(pairs, confidence=0.4)


# -- pooled endpoint -------------------------------------------------------------------------

def test_pooled_resamples_queries_within_each_dataset():
    """Constant gaps of +1 and +3 points on datasets of 10 and 1,000 queries: each dataset
    weighs the same (2 points, not the query-weighted 2.98), and since queries are resampled
    within each dataset every replicate is exactly 2 points."""
    rng = np.random.default_rng(20)
    small, large = np.tile(rng.uniform(0, 0.9, 10), (3, 1)), np.tile(rng.uniform(0, 0.9, 1000), (3, 1))
    datasets = {"small": (small + 0.01, small), "large": (large + 0.03, large)}
    for paired in (False, True):
        res = pooled_endpoint(datasets, paired=paired, n_boot=2000, n_resamples=500)
        assert isinstance(res, PooledEndpoint)
        assert res.pooled.diff_points == pytest.approx(2.0, abs=1e-9)
        assert res.pooled.ci_low_points == pytest.approx(2.0, abs=1e-9)
        assert res.pooled.ci_high_points == pytest.approx(2.0, abs=1e-9)
        assert res.pooled.paired is paired and res.pooled.datasets == ["small", "large"]
        assert res.pooled.n_queries == 1010
        assert [r.name for r in res.per_dataset] == ["small", "large"]
        assert [round(r.diff_points, 9) for r in res.per_dataset] == [1.0, 3.0]


def test_pooled_interval_is_narrower_than_each_dataset():
    rng = np.random.default_rng(21)
    d1 = _arms(rng, n_queries=300, shift=0.01, noise=0.1)
    d2 = _arms(rng, n_queries=300, shift=0.03, noise=0.1)
    res = pooled_endpoint({"d1": d1, "d2": d2}, n_boot=4000, n_resamples=1000)
    p = res.pooled
    assert p.diff_points == pytest.approx(2.0, abs=0.8)
    assert p.ci_low_points < 2.0 < p.ci_high_points
    width = p.ci_high_points - p.ci_low_points
    per = [r.ci_high_points - r.ci_low_points for r in res.per_dataset]
    assert width < min(per) and width < 0.8 * np.mean(per)  # ~1/sqrt(2) of each
    assert p.p_t < 1e-3 and p.verdict == "better"
    assert all(r.family == "pooled: per dataset" and r.family_size == 2 for r in res.per_dataset)
    json.dumps(res.to_dict())


def test_pooled_of_one_dataset_is_the_plain_comparison():
    a, b = _arms(np.random.default_rng(22), n_queries=60, shift=0.01, noise=0.1)
    kw = dict(n_boot=2000, n_resamples=2000, seed=5)
    plain = compare_all({"x": (a, b)}, **kw)[0]
    pooled = compare_all({"x": {"only": (a, b)}}, **kw)[0]
    assert (pooled.ci_low_points, pooled.ci_high_points) == (plain.ci_low_points,
                                                             plain.ci_high_points)
    assert pooled.t_statistic == pytest.approx(plain.t_statistic, rel=1e-9)
    assert pooled.p_t == pytest.approx(plain.p_t, rel=1e-6)
    assert pooled.p_permutation == pytest.approx(plain.p_permutation)


def test_pooled_tests_are_stratified():
    """Datasets of 100 and 400 queries with mean differences 1 and 3 points and sds 10 and
    20 points: the equal-weight t is 2 / (sqrt(1e-4 + 1e-4) / 2 * 100) = 2 sqrt(2), with
    Welch-Satterthwaite df 4 / (1/99 + 1/399)."""
    rng = np.random.default_rng(25)
    datasets = {}
    for name, n, mean, sd in (("d1", 100, 0.01, 0.1), ("d2", 400, 0.03, 0.2)):
        b = rng.uniform(0.2, 0.8, (1, n))
        datasets[name] = (b + _exact_diffs(n, mean, sd), b)
    row = compare_all({"pooled": datasets}, n_boot=1000, n_resamples=4000)[0]
    assert row.t_statistic == pytest.approx(2 * math.sqrt(2), rel=1e-9)
    df = 4 / (1 / 99 + 1 / 399)
    assert row.p_t == pytest.approx(2 * st.t.sf(2 * math.sqrt(2), df), rel=1e-9)
    assert row.p_permutation == pytest.approx(row.p_t, abs=0.01)


def test_pooled_endpoints_form_a_family():
    rng = np.random.default_rng(23)
    pairs = {"J vs C": {"scifact": _arms(rng, n_queries=100, shift=0.02),
                        "nfcorpus": _arms(rng, n_queries=200, shift=0.02)},
             "C+pred vs C": {"scifact": _arms(rng, n_queries=100),
                             "nfcorpus": _arms(rng, n_queries=200)}}
    rows = compare_all(pairs, family="primary", paired=True, n_boot=2000, n_resamples=500)
    assert [r.datasets for r in rows] == [["scifact", "nfcorpus"]] * 2
    assert all(r.family_size == 2 and r.paired for r in rows)
    assert rows[0].verdict == "better"
    with pytest.raises(ValueError, match="needs at least one dataset"):
        pooled_endpoint({})


# -- power -----------------------------------------------------------------------------------

def test_power_from_interval_known_values():
    # se of 1 point (a 95 % interval of ±1.96): a 1-point difference is seen ~17 % of times.
    assert power_from_interval(-1.96, 1.96, 1.0) == pytest.approx(0.170, abs=0.002)
    assert power_from_interval(-1.0, 1.0, 0.0) == pytest.approx(0.05)
    assert power_from_interval(-0.5, 0.5, 1.0) > power_from_interval(-1.96, 1.96, 1.0)
    assert power_from_interval(0.0, 0.0, 1.0) == 1.0
    assert power_from_interval(-1.96, 1.96, 1.0, alpha=0.0125) < 0.17  # a family of four
    with pytest.raises(ValueError, match="low <= high"):
        power_from_interval(1.0, -1.0)


def test_power_matches_simulated_rejection_rate():
    """200 experiments with a true gap of 1 point and se 1 point: the share of bootstrap
    intervals that exclude 0 matches the power backed out of their widths (~0.17)."""
    rng = np.random.default_rng(24)
    rejected, powers = 0, []
    for i in range(200):
        b = rng.uniform(0.2, 0.8, (1, 100))
        a = b + 0.01 + rng.normal(0, 0.1, (1, 100))
        low, high = bootstrap_ci(a, b, n_boot=500, seed=i)
        rejected += low > 0 or high < 0
        powers.append(power_from_interval(100 * low, 100 * high, 1.0))
    assert np.mean(powers) == pytest.approx(0.17, abs=0.03)
    assert rejected / 200 == pytest.approx(np.mean(powers), abs=0.08)
