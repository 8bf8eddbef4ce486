"""Statistics of the paired comparison, against cases whose answer is known."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats as st

from analysis.stats import (Comparison, bootstrap_ci, compare, compare_all, holm, paired_t,
                            per_query_matrix, permutation_test)


def _arms(rng: np.random.Generator, n_queries: int = 300, seeds: tuple[int, int] = (5, 5),
          shift: float = 0.0, seed_sd: float = 0.0, noise: float = 0.1):
    """Synthetic per-query nDCG: a shared query difficulty (the pairing), a per-training
    offset (``seed_sd``), per-(seed, query) noise, and ``shift`` added to arm A."""
    difficulty = rng.uniform(0.1, 0.9, n_queries)

    def arm(n: int) -> np.ndarray:
        return (difficulty + rng.normal(0, seed_sd, (n, 1))
                + rng.normal(0, noise, (n, n_queries)))

    return arm(seeds[0]) + shift, arm(seeds[1])


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
