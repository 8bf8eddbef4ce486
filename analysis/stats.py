"""Statistics of a comparison of two retrieval systems over queries and training seeds.

The question "does arm A retrieve better than arm B?" has two sources of noise: the queries
(a test split is a sample of the queries one cares about) and the training seed (each arm
is a distribution of trained models, and a handful of seeds samples it). Every function
here takes the per-query metric (nDCG@10) of each arm as an array of shape
``[seeds, queries]``: rows are trainings, columns are test queries, and the columns of
``a`` and ``b`` must be the same query ids in the same order (the queries are always
*paired*: both arms answer each one).

Whether the *seeds* are paired is a property of the design, given by ``paired``:

* unpaired (the default): the arms' trainings share nothing (different configs from
  unrelated seeds). Seed counts may differ; each bootstrap replicate resamples each arm's
  seeds independently.
* paired: row ``i`` of A and row ``i`` of B share what moves a training's whole score: the
  same run scored two ways (predictor vs query scoring), or two configs trained from the
  same seed (same init, batches, negatives). Both arms need the same seed count, and each
  replicate draws one seed sample for both, so the shared seed effect cancels in the
  replicates as it does in the estimate. Resampling such arms independently counts the
  shared effect as noise: with five runs, a seed effect of sd 5 points and a true gap of
  -2 points, roughly [-8.7, +5.0] instead of the paired [-2.01, -1.86].

The functions:

* :func:`paired_t` and :func:`permutation_test` test over queries, on each query's mean
  over seeds: the query is the unit, as in IR significance testing (Smucker et al., 2007).
* :func:`bootstrap_ci` is a two-level bootstrap of the mean difference that resamples
  seeds (independently per arm, or jointly when paired) and queries (jointly, keeping the
  pairing), so its interval reflects both sources of noise.
* :func:`equivalence_test` is a TOST (two one-sided tests) on the same replicates: is the
  difference within a margin (1 nDCG point by default)?
* :func:`holm` adjusts p-values; :func:`power_from_interval` backs out, from an interval,
  the power to detect a difference of a given size.
* :func:`compare` and :func:`compare_all` put it together as :class:`Comparison` rows, one
  family of comparisons per :func:`compare_all` call, each with a verdict;
  :func:`pooled_endpoint` is the mean over datasets of the per-dataset differences.

What each answers. The two tests over queries treat the trained models as fixed and ask
whether *these* models of A beat *these* models of B over the population of queries. They
ignore seed noise, so when each training shifts an arm's whole score a little they reject
too often for the question "is recipe A better than recipe B": simulated with a seed-level
standard deviation of 1 nDCG point, 5 seeds and 100 queries, a true null was rejected 37 %
of the time at alpha = 0.05. The bootstrap interval resamples the seeds too and is the
figure to read for that question; the verdicts follow it. It is conservative without a seed
effect (resampling both levels counts the seed-by-query noise twice) and, with only 5
seeds, a little liberal when the seed effect that does not cancel dominates (a bootstrap
over n values under-states their variance by (n-1)/n).

Only numpy and scipy are used; distributions come from scipy, not from tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _st

__all__ = ["VERDICTS", "Comparison", "Equivalence", "HypothesisResult", "PooledEndpoint",
           "bootstrap_ci", "compare", "compare_all", "equivalence_test", "holm", "paired_t",
           "per_query_matrix", "permutation_test", "pooled_endpoint", "power_from_interval"]

#: Replicates per chunk of the vectorised bootstrap: two [chunk x queries] float64 blocks
#: (about 5 MB each at 300 queries) instead of [n_boot x queries].
_BOOT_CHUNK = 2000

#: The words a verdict can take; see :func:`compare_all` for the rule behind each.
VERDICTS = ("better", "worse", "equivalent", "undecided")

#: One comparison's data: an ``(a, b)`` pair, or ``{dataset: (a, b)}`` for a pooled endpoint.
Pair = tuple[Any, Any] | Mapping[str, tuple[Any, Any]]


class HypothesisResult(NamedTuple):
    """A test's statistic and two-sided p-value (unpacks as ``stat, p = ...``)."""

    statistic: float
    pvalue: float


class Equivalence(NamedTuple):
    """A TOST of ``|mean(a) - mean(b)| < margin``; differences in nDCG points (x100).

    Attributes:
        diff_points: The observed difference.
        low_points: Lower end of the ``1 - 2 * alpha`` bootstrap interval.
        high_points: Upper end.
        margin_points: The equivalence margin.
        alpha: Level of each one-sided test.
        p_lower: p of the null "difference <= -margin" (share of replicates at or below).
        p_upper: p of the null "difference >= +margin".
        pvalue: ``max(p_lower, p_upper)``, the TOST's p.
        equivalent: Whether the interval lies inside (-margin, +margin): the decision.
    """

    diff_points: float
    low_points: float
    high_points: float
    margin_points: float
    alpha: float
    p_lower: float
    p_upper: float
    pvalue: float
    equivalent: bool


# -- input -----------------------------------------------------------------------------------

def per_query_matrix(per_seed: Sequence[Mapping[str, float]],
                     query_ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Stacks one arm's per-query values (one mapping per seed) into a [seeds, queries] array.

    Use it on ``per_query_metrics(run, qrels)["ndcg_at_10"]`` of each seed, and pass the
    same ``query_ids`` for both arms so that their columns line up. For a paired design,
    pass the seeds of both arms in the same order.

    Args:
        per_seed: One ``{query id: value}`` mapping per seed.
        query_ids: Column order; None takes the sorted ids of the first seed.

    Returns:
        The array and the query ids of its columns.

    Raises:
        ValueError: No seeds, or a seed that lacks a query of ``query_ids`` (a silently
            dropped query would unpair the arms).
    """
    if not per_seed:
        raise ValueError("per_query_matrix: no seeds given")
    ids = sorted(per_seed[0]) if query_ids is None else list(query_ids)
    rows = []
    for i, values in enumerate(per_seed):
        missing = [q for q in ids if q not in values]
        if missing:
            raise ValueError(f"per_query_matrix: seed {i} has no value for {len(missing)} "
                             f"of the {len(ids)} queries (first: {missing[:3]})")
        rows.append([values[q] for q in ids])
    return np.asarray(rows, dtype=float), ids


def _check(a: Any, b: Any, paired: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both arms as float arrays [seeds, queries], validated; ValueError naming the problem."""
    out = []
    for name, x in (("a", a), ("b", b)):
        arr = np.asarray(x, dtype=float)
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D [seeds, queries], got shape {arr.shape} "
                             "(one seed: pass x[None, :])")
        if arr.shape[0] < 1:
            raise ValueError(f"{name} has no seeds (shape {arr.shape})")
        if arr.shape[1] < 2:
            raise ValueError(f"{name} needs at least 2 queries, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite "
                             "values (NaN or inf)")
        out.append(arr)
    a_, b_ = out
    if a_.shape[1] != b_.shape[1]:
        raise ValueError(f"a and b must cover the same queries (columns aligned by query id): "
                         f"a has {a_.shape[1]} query columns, b has {b_.shape[1]}")
    if paired and a_.shape[0] != b_.shape[0]:
        raise ValueError(f"paired seeds need the same number of seeds in both arms (seed i of "
                         f"a pairs with seed i of b): a has shape {a_.shape}, b has shape "
                         f"{b_.shape}")
    return a_, b_


def _query_diffs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-query difference of the means over seeds, [queries]."""
    return a.mean(axis=0) - b.mean(axis=0)


# -- tests over queries -----------------------------------------------------------------------

def paired_t(a: Any, b: Any) -> HypothesisResult:
    """Paired t test over queries of the per-query means over seeds.

    Averaging over seeds first makes the query the unit of the test; seed noise only
    enters through those means (the bootstrap interval is where it is modelled).

    Args:
        a: Arm A, [seeds_a, queries].
        b: Arm B, [seeds_b, queries], same query columns.

    Returns:
        ``scipy.stats.ttest_rel``'s statistic and two-sided p. Where every difference is
        exactly 0 the test is undefined (0/0); this returns (0.0, 1.0) rather than NaN.
        Where every difference is the same non-zero value, (±inf, 0.0).
    """
    a, b = _check(a, b)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    d = ma - mb
    if np.all(d == 0):
        return HypothesisResult(0.0, 1.0)
    if np.all(d == d[0]):  # zero variance, non-zero mean: scipy would warn and return inf/0
        return HypothesisResult(math.copysign(math.inf, d[0]), 0.0)
    res = _st.ttest_rel(ma, mb)
    return HypothesisResult(float(res.statistic), float(res.pvalue))


def permutation_test(a: Any, b: Any, n_resamples: int = 10000,
                     seed: int = 0) -> HypothesisResult:
    """Paired randomisation (sign-flip) test over queries of the mean difference.

    Under the null hypothesis that the arms are exchangeable on each query, the sign of
    each query's difference (of means over seeds) is a coin flip. The statistic is the mean
    difference; scipy enumerates all 2^queries sign patterns when that is at most
    ``n_resamples`` (an exact test) and otherwise draws ``n_resamples`` of them, counting
    the observed pattern too, so p is never 0.

    Args:
        a: Arm A, [seeds_a, queries].
        b: Arm B, [seeds_b, queries], same query columns.
        n_resamples: Random sign patterns drawn when the exact test is larger.
        seed: Seed of the draws (the p-value is reproducible).

    Returns:
        The observed mean difference and the two-sided p; (0.0, 1.0) when every difference
        is 0.
    """
    a, b = _check(a, b)
    return _sign_flip(_query_diffs(a, b), n_resamples, seed)


def _sign_flip(x: np.ndarray, n_resamples: int, seed: int) -> HypothesisResult:
    if np.all(x == 0):
        return HypothesisResult(0.0, 1.0)
    res = _st.permutation_test((x,), _mean_last, permutation_type="samples",
                               n_resamples=n_resamples, alternative="two-sided",
                               vectorized=True, rng=np.random.default_rng(seed))
    return HypothesisResult(float(res.statistic), float(min(1.0, res.pvalue)))


def _mean_last(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _stratified_tests(diffs: list[np.ndarray], n_resamples: int,
                      seed: int) -> tuple[HypothesisResult, HypothesisResult]:
    """The t and sign-flip tests of the equal-weight mean over strata (datasets) of the
    per-stratum mean query difference; with one stratum, :func:`paired_t` and
    :func:`permutation_test`.

    The t uses the Welch-Satterthwaite degrees of freedom of the weighted mean. The
    sign-flip test flips each query's sign and weighs a query of stratum ``d`` by
    ``1 / (strata * n_d)``, so each stratum counts equally whatever its size.
    """
    k = len(diffs)
    est = sum(float(d.mean()) for d in diffs) / k
    w = [float(d.var(ddof=1)) / d.size for d in diffs]  # variance of each stratum's mean
    if all(np.all(d == 0) for d in diffs):
        t = HypothesisResult(0.0, 1.0)
    elif sum(w) == 0:  # every stratum constant: as in paired_t, (±inf, 0) or (0, 1) for 0/0
        t = HypothesisResult(math.copysign(math.inf, est), 0.0) if est else \
            HypothesisResult(0.0, 1.0)
    else:
        se = math.sqrt(sum(w)) / k
        df = sum(w) ** 2 / sum(wi ** 2 / (d.size - 1) for wi, d in zip(w, diffs) if wi > 0)
        stat = est / se
        t = HypothesisResult(stat, float(min(1.0, 2 * _st.t.sf(abs(stat), df))))
    n = sum(d.size for d in diffs)
    weighted = np.concatenate([d * (n / (k * d.size)) for d in diffs])  # mean = est
    return t, _sign_flip(weighted, n_resamples, seed)


# -- the bootstrap ----------------------------------------------------------------------------

def bootstrap_ci(a: Any, b: Any, n_boot: int = 10000, confidence: float = 0.95,
                 seed: int = 0, *, paired: bool = False) -> tuple[float, float]:
    """Two-level percentile bootstrap interval of ``mean(a) - mean(b)``.

    Each replicate resamples seeds with replacement, then the queries with replacement,
    the same query sample for both arms (queries are paired). Unpaired, each arm's seeds
    are resampled independently (separate trainings); paired, one seed sample serves both
    arms (seed ``i`` of A goes with seed ``i`` of B). The replicate's statistic is the mean
    over the resampled seeds and queries of A minus that of B.

    Vectorised with resampling counts: with seed counts ``w`` (per arm) and query counts
    ``c`` the replicate is ``(w_a·a/n_a − w_b·b/n_b)·c/n_q`` (paired: ``w·(a − b)/n·c/n_q``),
    computed ``_BOOT_CHUNK`` replicates at a time; 10,000 replicates at 5 seeds x 300
    queries take well under a second.

    Args:
        a: Arm A, [seeds_a, queries].
        b: Arm B, [seeds_b, queries], same query columns.
        n_boot: Number of replicates.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling.
        paired: Resample the seeds jointly (the arms share runs or seeds; see the module
            docstring); needs ``seeds_a == seeds_b``.

    Returns:
        (low, high) in the metric's own units (not points). With one seed per arm the seed
        level has nothing to resample and only queries vary; paired identical arms give
        exactly (0.0, 0.0).

    Raises:
        ValueError: Bad shapes (for ``paired``, unequal seed counts), ``n_boot < 1`` or
            ``confidence`` outside (0, 1).
    """
    a, b = _check(a, b, paired)
    _check_level(confidence, "confidence")
    reps = _replicates(a, b, n_boot, np.random.default_rng(seed), paired)
    return _interval(reps, confidence)


def _replicates(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator,
                paired: bool) -> np.ndarray:
    """The ``n_boot`` bootstrap replicates of the mean difference (see :func:`bootstrap_ci`)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    (na, nq), nb = a.shape, b.shape[0]
    reps = np.empty(n_boot)
    if paired:
        d = a - b  # one seed sample for both arms: resample the per-seed differences
        for start in range(0, n_boot, _BOOT_CHUNK):
            r = min(_BOOT_CHUNK, n_boot - start)
            w = _counts(rng, r, na)
            cq = _counts(rng, r, nq)
            reps[start:start + r] = np.einsum("rq,rq->r", w @ d, cq) / (na * nq)
        return reps
    # Centre both arms on one per-query reference (A's first seed). It cancels exactly in
    # the difference (both arms share the query sample, and seed counts sum to the number
    # of seeds), reduces rounding, and keeps identical arms at exactly 0 in every replicate.
    ref = a[0].copy()
    a, b = a - ref, b - ref
    for start in range(0, n_boot, _BOOT_CHUNK):
        r = min(_BOOT_CHUNK, n_boot - start)
        wa = _counts(rng, r, na)
        wb = _counts(rng, r, nb)
        cq = _counts(rng, r, nq)
        per_query = (wa @ a) / na - (wb @ b) / nb  # [r, queries]: resampled-seed means
        reps[start:start + r] = np.einsum("rq,rq->r", per_query, cq) / nq
    return reps


def _counts(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``reps`` samples of size ``n``
    with replacement, as a float array [reps, n] (a row of a multinomial(n, 1/n))."""
    draws = rng.integers(0, n, size=(reps, n)) + (np.arange(reps) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=reps * n).reshape(reps, n).astype(float)


def _check_level(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def _interval(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    """Equal-tailed percentile interval of the replicates."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return float(low), float(high)


def _mc_p(beyond: np.ndarray) -> float:
    """The share of replicates at or beyond a null value (``beyond``, a boolean mask), as a
    Monte Carlo p-value ``(k + 1) / (n + 1)``: never 0, which a finite bootstrap can't show."""
    return float((np.count_nonzero(beyond) + 1) / (beyond.size + 1))


def _p_two_sided(reps: np.ndarray) -> float:
    """Bootstrap p of "no difference": twice the smaller tail at 0, capped at 1."""
    return min(1.0, 2 * min(_mc_p(reps <= 0), _mc_p(reps >= 0)))


def _tost_p(reps: np.ndarray, margin_points: float) -> tuple[float, float]:
    """Bootstrap p of the nulls "difference <= -margin" and "difference >= +margin"."""
    margin = margin_points / 100
    return _mc_p(reps <= -margin), _mc_p(reps >= margin)


def _tost(reps: np.ndarray, diff: float, margin_points: float, alpha: float) -> Equivalence:
    margin = margin_points / 100
    low, high = _interval(reps, 1 - 2 * alpha)
    p_lower, p_upper = _tost_p(reps, margin_points)
    return Equivalence(
        diff_points=100 * diff, low_points=100 * low, high_points=100 * high,
        margin_points=margin_points, alpha=alpha, p_lower=p_lower, p_upper=p_upper,
        pvalue=max(p_lower, p_upper), equivalent=bool(-margin < low and high < margin))


def equivalence_test(a: Any, b: Any, margin_points: float = 1.0, alpha: float = 0.05, *,
                     paired: bool = False, n_boot: int = 10000, seed: int = 0) -> Equivalence:
    """TOST of "A and B differ by less than ``margin_points`` nDCG points", by bootstrap.

    The two one-sided nulls are "difference <= -margin" and "difference >= +margin"; both
    are rejected at ``alpha`` when the ``1 - 2 * alpha`` percentile interval of the
    two-level bootstrap (:func:`bootstrap_ci`) lies inside (-margin, +margin), which is
    the decision. The one-sided p-values are the bootstrap tails beyond each margin; they
    agree with the decision up to the resolution of ``n_boot`` replicates.

    Why the bootstrap and not a t-based TOST over queries: the t over queries holds the
    trained models fixed, so an equivalence of *recipes* read from it would ignore seed
    noise and be as liberal as :func:`paired_t` is for a difference. The bootstrap counts
    seeds and queries, works the same paired, unpaired and pooled over datasets, and uses
    the replicates that the verdict's interval reads. With one seed per arm it reduces to a
    bootstrap of the paired query differences and agrees with the t-based TOST.

    Args:
        a: Arm A, [seeds_a, queries].
        b: Arm B, [seeds_b, queries], same query columns.
        margin_points: Equivalence margin in nDCG points (1.0 is 0.01 of nDCG@10); > 0.
        alpha: Level of each one-sided test, in (0, 0.5).
        paired: Resample seeds jointly (see :func:`bootstrap_ci`).
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling.

    Returns:
        The :class:`Equivalence` result.

    Raises:
        ValueError: Bad shapes, ``margin_points <= 0`` or ``alpha`` outside (0, 0.5).
    """
    a, b = _check(a, b, paired)
    _check_margin(margin_points)
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    reps = _replicates(a, b, n_boot, np.random.default_rng(seed), paired)
    return _tost(reps, float(a.mean() - b.mean()), margin_points, alpha)


def _check_margin(margin_points: float) -> None:
    if not margin_points > 0:
        raise ValueError(f"margin_points must be > 0 (nDCG points), got {margin_points}")


# -- multiplicity and power -------------------------------------------------------------------

def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    The i-th smallest of m p-values is multiplied by (m - i + 1); a running maximum keeps
    the adjusted values monotone in the raw ones, and they are capped at 1. Rejecting where
    the adjusted p is at most alpha controls the family-wise error rate at alpha under any
    dependence between the tests.

    Args:
        pvalues: Raw p-values, each in [0, 1].

    Returns:
        The adjusted p-values, a float array of the same length and order.

    Raises:
        ValueError: A p-value that is NaN or outside [0, 1].
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    if p.size == 0:
        return p
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


def power_from_interval(low_points: float, high_points: float, effect_points: float = 1.0,
                        confidence: float = 0.95, alpha: float = 0.05) -> float:
    """Power of a two-sided test at ``alpha`` to detect a true difference of
    ``effect_points``, given an interval measured at the same design.

    The standard error is backed out of the interval under a normal approximation,
    ``se = (high - low) / (2 z)`` with ``z`` the ``(1 + confidence) / 2`` normal quantile,
    and the power is ``Φ(effect/se − z_α) + Φ(−effect/se − z_α)`` with ``z_α`` the
    ``1 − alpha/2`` quantile. It says what a design of this size can see: an interval of
    ±1.96 points (se 1 point) detects a 1-point difference with about 17 % power. The
    interval's width, not its centre, is used; it is an estimate from one experiment.

    Args:
        low_points: Lower end of the interval (any unit, the same as ``effect_points``).
        high_points: Upper end, ``>= low_points``.
        effect_points: The true difference to detect, ``>= 0``.
        confidence: Coverage of the given interval, in (0, 1).
        alpha: Two-sided level of the test whose power is wanted (e.g. a family's
            adjusted level), in (0, 1).

    Returns:
        The power in [alpha, 1]; 1.0 for a zero-width interval and a non-zero effect.

    Raises:
        ValueError: ``high < low``, a negative effect, or a level outside (0, 1).
    """
    _check_level(confidence, "confidence")
    _check_level(alpha, "alpha")
    if not high_points >= low_points:
        raise ValueError(f"interval must have low <= high, got [{low_points}, {high_points}]")
    if not effect_points >= 0:
        raise ValueError(f"effect_points must be >= 0, got {effect_points}")
    se = (high_points - low_points) / (2 * _st.norm.ppf((1 + confidence) / 2))
    z = _st.norm.ppf(1 - alpha / 2)
    if se == 0:
        return 1.0 if effect_points > 0 else alpha
    shift = effect_points / se
    return float(_st.norm.cdf(shift - z) + _st.norm.cdf(-shift - z))


# -- the comparison ---------------------------------------------------------------------------

@dataclass
class Comparison:
    """One A-versus-B comparison; differences and intervals are in nDCG points (x100).

    The Holm-adjusted p-values and the fields from ``family`` on are filled by
    :func:`compare_all` (None from :func:`compare`), whose docstring says how the adjusted
    interval and the verdict are made.

    Attributes:
        name: What is compared (e.g. ``"jepa vs contrastive"``).
        n_seeds_a: Seeds (trainings) of arm A (pooled: of the dataset with fewest).
        n_seeds_b: Seeds of arm B.
        n_queries: Test queries (paired; pooled: over all datasets).
        mean_a: Mean of A over seeds and queries (metric units; pooled: the equal-weight
            mean over datasets).
        mean_b: Mean of B.
        seed_std_a: Standard deviation (ddof=1) of A's per-seed means: how much a single
            training varies; NaN with one seed (pooled: the mean over datasets).
        seed_std_b: The same for B.
        diff_points: ``100 * (mean_a - mean_b)``.
        ci_low_points: Lower end of the unadjusted bootstrap interval, in points.
        ci_high_points: Upper end.
        confidence: Coverage of that interval; ``1 - confidence`` is the family's alpha.
        t_statistic: Paired t statistic over queries (pooled: stratified by dataset).
        p_t: Its two-sided p.
        p_permutation: Two-sided p of the sign-flip test over queries.
        p_permutation_holm: ``p_permutation`` Holm-adjusted within the family.
        p_t_holm: ``p_t`` adjusted likewise.
        paired: Whether the seeds were resampled paired.
        datasets: The datasets of a pooled endpoint; None for one dataset.
        p_boot: Two-sided bootstrap p of "no difference" (seeds and queries).
        margin_points: The equivalence margin.
        p_tost: Unadjusted bootstrap TOST p at the margin (:func:`equivalence_test`).
        family: The family's name.
        family_size: Comparisons in the family (``m``).
        p_boot_holm: ``p_boot`` Holm-adjusted within the family.
        adj_confidence: ``1 - alpha / m``, the coverage of the adjusted interval.
        adj_ci_low_points: Lower end of the adjusted interval; "better"/"worse" read it.
        adj_ci_high_points: Upper end.
        eq_low_points: Lower end of the ``1 - 2 alpha / m`` interval; "equivalent" reads it.
        eq_high_points: Upper end.
        equivalent: TOST at the family's level: the ``eq`` interval is inside the margin.
        verdict: One of :data:`VERDICTS`.
        power: Power to detect a difference of ``margin_points`` at the family's level,
            from the unadjusted interval's width (:func:`power_from_interval`).
    """

    name: str
    n_seeds_a: int
    n_seeds_b: int
    n_queries: int
    mean_a: float
    mean_b: float
    seed_std_a: float
    seed_std_b: float
    diff_points: float
    ci_low_points: float
    ci_high_points: float
    confidence: float
    t_statistic: float
    p_t: float
    p_permutation: float
    p_permutation_holm: float | None = None
    p_t_holm: float | None = None
    paired: bool = False
    datasets: list[str] | None = None
    p_boot: float = math.nan
    margin_points: float = 1.0
    p_tost: float = math.nan
    family: str | None = None
    family_size: int | None = None
    p_boot_holm: float | None = None
    adj_confidence: float | None = None
    adj_ci_low_points: float | None = None
    adj_ci_high_points: float | None = None
    eq_low_points: float | None = None
    eq_high_points: float | None = None
    equivalent: bool | None = None
    verdict: str | None = None
    power: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON- and pandas-ready)."""
        return asdict(self)


def compare(a: Any, b: Any, name: str = "a vs b", *, paired: bool = False,
            margin_points: float = 1.0, n_boot: int = 10000, n_resamples: int = 10000,
            confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Every statistic of one comparison of arm A against arm B, without a family.

    Args:
        a: Arm A's per-query metric, [seeds_a, queries].
        b: Arm B's, [seeds_b, queries], columns aligned to the same query ids.
        name: Label of the comparison.
        paired: Resample seeds jointly (:func:`bootstrap_ci`).
        margin_points: Equivalence margin of the TOST, in nDCG points.
        n_boot: Bootstrap replicates.
        n_resamples: Sign patterns of the permutation test (:func:`permutation_test`).
        confidence: Coverage of the bootstrap interval.
        seed: Seed of the bootstrap and of the permutation draws.

    Returns:
        A :class:`Comparison` without the family's fields (see :func:`compare_all`, which
        also gives a single comparison its verdict).
    """
    return _compare(name, (a, b), paired=paired, margin_points=margin_points, n_boot=n_boot,
                    n_resamples=n_resamples, confidence=confidence, seed=seed)[0]


def _compare(name: str, pair: Pair, *, paired: bool, margin_points: float, n_boot: int,
             n_resamples: int, confidence: float,
             seed: int) -> tuple[Comparison, np.ndarray]:
    """A :class:`Comparison` (no family fields) and its bootstrap replicates."""
    _check_level(confidence, "confidence")
    _check_margin(margin_points)
    pooled = isinstance(pair, Mapping)
    parts = list(pair.items()) if pooled else [("", pair)]
    if not parts:
        raise ValueError(f"{name}: a pooled endpoint needs at least one dataset")
    arms = []
    for dataset, arm_pair in parts:
        try:
            arms.append(_check(*arm_pair, paired))
        except ValueError as err:
            raise ValueError(f"{name}: {dataset + ': ' if pooled else ''}{err}") from None
    rng = np.random.default_rng(seed)
    # Datasets are independent samples (their own queries and trainings): each is resampled
    # within itself, and a replicate of the endpoint is the mean of the datasets' replicates.
    reps = np.mean([_replicates(a, b, n_boot, rng, paired) for a, b in arms], axis=0)
    if pooled:
        t, perm = _stratified_tests([_query_diffs(a, b) for a, b in arms], n_resamples, seed)
    else:
        t, perm = paired_t(*arms[0]), permutation_test(*arms[0], n_resamples, seed)
    mean_a = float(np.mean([a.mean() for a, _ in arms]))
    mean_b = float(np.mean([b.mean() for _, b in arms]))
    diff = float(np.mean([a.mean() - b.mean() for a, b in arms]))
    low, high = _interval(reps, confidence)
    row = Comparison(
        name=name, n_seeds_a=min(a.shape[0] for a, _ in arms),
        n_seeds_b=min(b.shape[0] for _, b in arms), n_queries=sum(a.shape[1] for a, _ in arms),
        mean_a=mean_a, mean_b=mean_b,
        seed_std_a=float(np.mean([_seed_std(a) for a, _ in arms])),
        seed_std_b=float(np.mean([_seed_std(b) for _, b in arms])),
        diff_points=100 * diff, ci_low_points=100 * low, ci_high_points=100 * high,
        confidence=confidence, t_statistic=t.statistic, p_t=t.pvalue,
        p_permutation=perm.pvalue, paired=paired,
        datasets=[d for d, _ in parts] if pooled else None, p_boot=_p_two_sided(reps),
        margin_points=margin_points,
        p_tost=max(_tost_p(reps, margin_points)))
    return row, reps


def _seed_std(x: np.ndarray) -> float:
    return float(np.std(x.mean(axis=1), ddof=1)) if x.shape[0] > 1 else math.nan


def compare_all(pairs: Mapping[str, Pair], *, family: str = "all",
                paired: bool | Mapping[str, bool] = False, margin_points: float = 1.0,
                n_boot: int = 10000, n_resamples: int = 10000, confidence: float = 0.95,
                seed: int = 0) -> list[Comparison]:
    """The comparisons of one pre-registered family, each with its adjusted interval and
    verdict; multiplicity is handled within the family only.

    Put comparisons that answer one question in one family (e.g. "primary": J vs tuned
    contrastive, C+pred vs C; "diagnostic": J's scoring, transfer) and call this once per
    family. With ``m`` comparisons and ``alpha = 1 - confidence``:

    * ``p_t``, ``p_permutation`` and ``p_boot`` are Holm-adjusted across the family.
    * The adjusted interval is the percentile bootstrap interval at ``1 - alpha / m``
      (Bonferroni). These intervals cover all ``m`` true differences at once with
      probability at least ``1 - alpha`` under any dependence, and they are compatible with
      Holm's first step: an adjusted interval that excludes 0 means ``p_boot <= alpha / m``,
      so Holm rejects too (up to the bootstrap's resolution). Holm can reject more at later
      steps; such a comparison stays "undecided" here, so that the word always matches the
      printed interval. The step-down-compatible bounds of Strassburger & Bretz (2008)
      would follow Holm exactly but give a rejected comparison only the bound 0, no size;
      with the 2 to 4 comparisons of a family the price of Bonferroni over Holm is small.
      With ``m = 1`` the adjusted interval is the unadjusted one.
    * The TOST is at level ``alpha / m``: equivalent when the ``1 - 2 alpha / m`` interval
      lies inside (-margin, +margin). For each comparison at most one of the nulls "no
      difference" and "|difference| >= margin" is true, so testing both at ``alpha / m``
      keeps the chance of any wrong verdict in the family at most ``alpha`` (Bonferroni
      over the ``m`` true nulls).
    * The verdict: "better" if the adjusted interval is above 0, "worse" if below, else
      "equivalent" if the TOST holds, else "undecided". A difference shown to be both
      non-zero and smaller than the margin reads "better"/"worse" with ``equivalent``
      True.

    Args:
        pairs: Name -> ``(a, b)`` as :func:`compare` takes them, or name ->
            ``{dataset: (a, b)}`` for an endpoint pooled over datasets (see
            :func:`pooled_endpoint`).
        family: The family's name, stored in each row.
        paired: Whether seeds are paired (:func:`bootstrap_ci`): one flag for all, or
            name -> flag (names left out are unpaired).
        margin_points: Equivalence margin, in nDCG points (1.0 is 0.01 of nDCG@10).
        n_boot: Bootstrap replicates per comparison.
        n_resamples: Sign patterns of the permutation test.
        confidence: Coverage of the unadjusted interval; the family's alpha is
            ``1 - confidence``, in (0, 0.5).
        seed: Seed of every comparison's resampling.

    Returns:
        The comparisons in the order of ``pairs``, every field filled.

    Raises:
        ValueError: Bad arrays (named by the comparison), a name in ``paired`` that is not
            in ``pairs``, or a bad level or margin.
    """
    if not 0.5 < confidence < 1:
        raise ValueError(f"confidence must be in (0.5, 1) (the TOST interval is at "
                         f"1 - 2 (1 - confidence) / m), got {confidence}")
    if isinstance(paired, Mapping):
        unknown = sorted(set(paired) - set(pairs))
        if unknown:
            raise ValueError(f"paired names comparisons that are not in pairs: {unknown} "
                             f"(the comparisons are {list(pairs)})")
        flags = {name: bool(paired.get(name, False)) for name in pairs}
    else:
        flags = {name: bool(paired) for name in pairs}
    done = [_compare(name, pair, paired=flags[name], margin_points=margin_points,
                     n_boot=n_boot, n_resamples=n_resamples, confidence=confidence,
                     seed=seed) for name, pair in pairs.items()]
    if not done:
        return []
    rows = [row for row, _ in done]
    m, alpha = len(rows), 1 - confidence
    level = alpha / m
    adjusted = zip(holm([r.p_permutation for r in rows]), holm([r.p_t for r in rows]),
                   holm([r.p_boot for r in rows]))
    for (row, reps), (p_perm, p_t, p_boot) in zip(done, adjusted):
        low, high = _interval(reps, 1 - level)
        tost = _tost(reps, row.diff_points / 100, margin_points, level)
        row.p_permutation_holm, row.p_t_holm, row.p_boot_holm = (
            float(p_perm), float(p_t), float(p_boot))
        row.family, row.family_size, row.adj_confidence = family, m, 1 - level
        row.adj_ci_low_points, row.adj_ci_high_points = 100 * low, 100 * high
        row.eq_low_points, row.eq_high_points = tost.low_points, tost.high_points
        row.equivalent = tost.equivalent
        row.verdict = ("better" if low > 0 else "worse" if high < 0
                       else "equivalent" if tost.equivalent else "undecided")
        row.power = power_from_interval(row.ci_low_points, row.ci_high_points,
                                        effect_points=margin_points, confidence=confidence,
                                        alpha=level)
    return rows


@dataclass
class PooledEndpoint:
    """An endpoint pooled over datasets, with the per-dataset rows beside it.

    Attributes:
        pooled: The mean over datasets of the per-dataset differences, as a family of one
            (in a family with other endpoints, pass it to :func:`compare_all` instead).
        per_dataset: Each dataset's comparison, Holm-adjusted as one family of their own.
    """

    pooled: Comparison
    per_dataset: list[Comparison]

    def to_dict(self) -> dict[str, Any]:
        """Both parts as plain dicts (JSON-ready)."""
        return {"pooled": self.pooled.to_dict(),
                "per_dataset": [r.to_dict() for r in self.per_dataset]}


def pooled_endpoint(datasets: Mapping[str, tuple[Any, Any]], name: str = "pooled", *,
                    paired: bool = False, margin_points: float = 1.0, n_boot: int = 10000,
                    n_resamples: int = 10000, confidence: float = 0.95,
                    seed: int = 0) -> PooledEndpoint:
    """The primary endpoint over several datasets: the mean of per-dataset differences.

    Each dataset weighs the same, whatever its number of queries (the question is about
    datasets, not about the pooled query set). Each bootstrap replicate resamples every
    dataset within itself: seeds (paired or not), then that dataset's queries; the
    replicate is the mean of the datasets' replicate differences. Datasets are taken as
    independent: seed ``i`` on one dataset and seed ``i`` on another are different
    trainings on different data. The tests over queries are stratified by dataset with
    the same equal weights (a Welch-type t, a sign flip of each query's difference).

    Args:
        datasets: Dataset -> ``(a, b)``, each as :func:`compare` takes them (its own
            queries and seeds).
        name: Label of the pooled row; per-dataset rows are named by dataset.
        paired: Resample seeds jointly within each dataset.
        margin_points: Equivalence margin, in nDCG points.
        n_boot: Bootstrap replicates.
        n_resamples: Sign patterns of the permutation tests.
        confidence: Coverage of the unadjusted intervals; ``1 - confidence`` is alpha.
        seed: Seed of the resampling.

    Returns:
        The :class:`PooledEndpoint`.

    Raises:
        ValueError: No datasets, or bad arrays (named by dataset).
    """
    if not datasets:
        raise ValueError(f"{name}: a pooled endpoint needs at least one dataset")
    kwargs: dict[str, Any] = dict(paired=paired, margin_points=margin_points, n_boot=n_boot,
                                  n_resamples=n_resamples, confidence=confidence, seed=seed)
    pooled = compare_all({name: datasets}, family=name, **kwargs)[0]
    per_dataset = compare_all(dict(datasets), family=f"{name}: per dataset", **kwargs)
    return PooledEndpoint(pooled=pooled, per_dataset=per_dataset)
