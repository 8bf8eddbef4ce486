"""Statistics of a paired comparison of two retrieval systems over queries.

The question "does arm A retrieve better than arm B?" has two sources of noise: the queries
(a test split is a sample of the queries one cares about) and the training seed (each arm
is a distribution of trained models, and a handful of seeds samples it). Every function
here takes the per-query metric (nDCG@10) of each arm as an array of shape
``[seeds, queries]``: rows are separate trainings, columns are test queries, and the
columns of ``a`` and ``b`` must be the same query ids in the same order (the queries are
*paired*: both arms answer each one). The arms may have different numbers of seeds; seed
``i`` of A and seed ``i`` of B are not paired, because they are separate trainings.

* :func:`paired_t` and :func:`permutation_test` test over queries, on each query's mean
  over seeds: the query is the unit, as in IR significance testing (Smucker et al., 2007).
* :func:`bootstrap_ci` is a two-level bootstrap of the mean difference that resamples
  seeds (independently per arm) and queries (jointly, keeping the pairing), so its interval
  reflects both sources of noise.
* :func:`holm` adjusts p-values when several comparisons are made at once.
* :func:`compare` and :func:`compare_all` put it together as :class:`Comparison` rows.

What each answers. The two tests treat the trained models as fixed and ask whether *these*
models of A beat *these* models of B over the population of queries. They ignore seed
noise, so when each training shifts an arm's whole score a little they reject too often
for the question "is recipe A better than recipe B": simulated with a seed-level standard
deviation of 1 nDCG point, 5 seeds and 100 queries, a true null was rejected 37 % of the
time at alpha = 0.05. The bootstrap interval resamples the seeds too and is the figure to
read for that question. It is conservative without a seed effect (resampling both levels
counts the seed-by-query noise twice) and, with only 5 seeds, a little liberal when the
seed effect dominates (a bootstrap over n values under-states their variance by (n-1)/n).

Only numpy and scipy are used; distributions come from scipy, not from tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import stats as _st

__all__ = ["Comparison", "HypothesisResult", "bootstrap_ci", "compare", "compare_all", "holm",
           "paired_t", "per_query_matrix", "permutation_test"]

#: Replicates per chunk of the vectorised bootstrap: two [chunk x queries] float64 blocks
#: (about 5 MB each at 300 queries) instead of [n_boot x queries].
_BOOT_CHUNK = 2000


class HypothesisResult(NamedTuple):
    """A test's statistic and two-sided p-value (unpacks as ``stat, p = ...``)."""

    statistic: float
    pvalue: float


# -- input -----------------------------------------------------------------------------------

def per_query_matrix(per_seed: Sequence[Mapping[str, float]],
                     query_ids: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Stacks one arm's per-query values (one mapping per seed) into a [seeds, queries] array.

    Use it on ``per_query_metrics(run, qrels)["ndcg_at_10"]`` of each seed, and pass the
    same ``query_ids`` for both arms so that their columns line up.

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


def _check(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
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
    return a_, b_


def _query_diffs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-query difference of the means over seeds, [queries]."""
    return a.mean(axis=0) - b.mean(axis=0)


# -- tests -----------------------------------------------------------------------------------

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
    d = _query_diffs(a, b)
    if np.all(d == 0):
        return HypothesisResult(0.0, 1.0)
    res = _st.permutation_test((d,), _mean_last, permutation_type="samples",
                               n_resamples=n_resamples, alternative="two-sided",
                               vectorized=True, rng=np.random.default_rng(seed))
    return HypothesisResult(float(res.statistic), float(min(1.0, res.pvalue)))


def _mean_last(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def bootstrap_ci(a: Any, b: Any, n_boot: int = 10000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Two-level percentile bootstrap interval of ``mean(a) - mean(b)``.

    Each replicate resamples the seeds of each arm with replacement, independently (the
    arms' seeds are separate trainings), then the queries with replacement, the same
    query sample for both arms (queries are paired). The replicate's statistic is the mean
    over the resampled seeds and queries of A minus that of B.

    Vectorised with resampling counts: with seed counts ``w`` (per arm) and query counts
    ``c`` the replicate is ``(w_a·a/n_a − w_b·b/n_b)·c/n_q``, computed ``_BOOT_CHUNK``
    replicates at a time; 10,000 replicates at 5 seeds x 300 queries take well under a
    second.

    Args:
        a: Arm A, [seeds_a, queries].
        b: Arm B, [seeds_b, queries], same query columns.
        n_boot: Number of replicates.
        confidence: Coverage of the interval, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        (low, high) in the metric's own units (not points). With one seed per arm the seed
        level has nothing to resample and only queries vary.

    Raises:
        ValueError: Bad shapes, ``n_boot < 1`` or ``confidence`` outside (0, 1).
    """
    a, b = _check(a, b)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    (na, nq), nb = a.shape, b.shape[0]
    # Centre both arms on one per-query reference (A's first seed). It cancels exactly in
    # the difference (both arms share the query sample, and seed counts sum to the number
    # of seeds), reduces rounding, and keeps identical arms at exactly 0 in every replicate.
    ref = a[0].copy()
    a, b = a - ref, b - ref
    reps = np.empty(n_boot)
    for start in range(0, n_boot, _BOOT_CHUNK):
        r = min(_BOOT_CHUNK, n_boot - start)
        wa = _counts(rng, r, na)
        wb = _counts(rng, r, nb)
        cq = _counts(rng, r, nq)
        per_query = (wa @ a) / na - (wb @ b) / nb  # [r, queries]: resampled-seed means
        reps[start:start + r] = np.einsum("rq,rq->r", per_query, cq) / nq
    alpha = (1 - confidence) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return float(low), float(high)


def _counts(rng: np.random.Generator, reps: int, n: int) -> np.ndarray:
    """How often each of ``n`` items is drawn in each of ``reps`` samples of size ``n``
    with replacement, as a float array [reps, n] (a row of a multinomial(n, 1/n))."""
    draws = rng.integers(0, n, size=(reps, n)) + (np.arange(reps) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=reps * n).reshape(reps, n).astype(float)


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


# -- the comparison ---------------------------------------------------------------------------

@dataclass
class Comparison:
    """One A-versus-B comparison; differences and intervals are in nDCG points (x100).

    Attributes:
        name: What is compared (e.g. ``"jepa vs contrastive"``).
        n_seeds_a: Seeds (trainings) of arm A.
        n_seeds_b: Seeds of arm B.
        n_queries: Test queries (paired).
        mean_a: Mean of A over seeds and queries (metric units).
        mean_b: Mean of B.
        seed_std_a: Standard deviation (ddof=1) of A's per-seed means: how much a single
            training varies; NaN with one seed.
        seed_std_b: The same for B.
        diff_points: ``100 * (mean_a - mean_b)``.
        ci_low_points: Lower end of the bootstrap interval of the difference, in points.
        ci_high_points: Upper end.
        confidence: Coverage of the interval.
        t_statistic: Paired t statistic over queries.
        p_t: Its two-sided p.
        p_permutation: Two-sided p of the sign-flip test over queries.
        p_permutation_holm: ``p_permutation`` Holm-adjusted across the comparisons of one
            :func:`compare_all` call (None from :func:`compare`).
        p_t_holm: ``p_t`` adjusted likewise.
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

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON- and pandas-ready)."""
        return asdict(self)


def compare(a: Any, b: Any, name: str = "a vs b", *, n_boot: int = 10000,
            n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Every statistic of one paired comparison of arm A against arm B.

    Args:
        a: Arm A's per-query metric, [seeds_a, queries].
        b: Arm B's, [seeds_b, queries], columns aligned to the same query ids.
        name: Label of the comparison.
        n_boot: Bootstrap replicates (:func:`bootstrap_ci`).
        n_resamples: Sign patterns of the permutation test (:func:`permutation_test`).
        confidence: Coverage of the bootstrap interval.
        seed: Seed of the bootstrap and of the permutation draws.

    Returns:
        A :class:`Comparison` without Holm-adjusted p-values (see :func:`compare_all`).
    """
    a, b = _check(a, b)
    low, high = bootstrap_ci(a, b, n_boot=n_boot, confidence=confidence, seed=seed)
    t = paired_t(a, b)
    perm = permutation_test(a, b, n_resamples=n_resamples, seed=seed)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return Comparison(
        name=name, n_seeds_a=a.shape[0], n_seeds_b=b.shape[0], n_queries=a.shape[1],
        mean_a=mean_a, mean_b=mean_b,
        seed_std_a=_seed_std(a), seed_std_b=_seed_std(b),
        diff_points=100 * (mean_a - mean_b),
        ci_low_points=100 * low, ci_high_points=100 * high, confidence=confidence,
        t_statistic=t.statistic, p_t=t.pvalue, p_permutation=perm.pvalue)


def _seed_std(x: np.ndarray) -> float:
    return float(np.std(x.mean(axis=1), ddof=1)) if x.shape[0] > 1 else math.nan


def compare_all(pairs: Mapping[str, tuple[Any, Any]], **kwargs: Any) -> list[Comparison]:
    """:func:`compare` for each named (a, b) pair, with Holm-adjusted p-values across them.

    Args:
        pairs: Name -> (a, b), each as :func:`compare` takes them.
        **kwargs: Passed to :func:`compare` (``n_boot``, ``n_resamples``, ``confidence``,
            ``seed``).

    Returns:
        The comparisons in the order of ``pairs``, with ``p_permutation_holm`` and
        ``p_t_holm`` filled in.
    """
    rows = [compare(a, b, name=name, **kwargs) for name, (a, b) in pairs.items()]
    if rows:
        for row, p_perm, p_t in zip(rows, holm([r.p_permutation for r in rows]),
                                    holm([r.p_t for r in rows])):
            row.p_permutation_holm = float(p_perm)
            row.p_t_holm = float(p_t)
    return rows
