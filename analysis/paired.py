"""The research answer: does the latent predictor (λ_pred > 0) help retrieval, or not?

A study's best trials are single noisy draws picked by the dev metric, so comparing their
numbers says little. Here the best configuration with L_pred on and the best with L_pred off
are re-trained at the same budget over several seeds (``trainables.loop.train``, no Ray),
paired by seed (same seed: same batch order and initialisation stream), and the test
nDCG@10 difference (on − off) is reported with a t confidence interval over the seeds.

The headline metric of each arm follows its own ``eval.score_with`` (a JEPA config may
retrieve with the predictor's output; a λ_pred = 0 config always scores with the query), so
the query-scored difference is reported too: it compares both arms under the same scoring.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from analysis import schema as S
from analysis.export import with_provenance
from analysis.runs import config_from_params, run_config
from analysis.views import finished, metric_column, top_k
from trainables.config import RunConfig

log = logging.getLogger(__name__)

HEADLINE = "test_ndcg_at_10"  #: follows each config's eval.score_with
QUERY = "test_query_ndcg_at_10"  #: query-embedding scoring on both arms
PREDICTOR = "test_predictor_ndcg_at_10"  #: the JEPA way: on arm scores with its predictor
#: two-sided 95 % t critical values by degrees of freedom (used when scipy is missing)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
        16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074,
        23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045,
        30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_critical(dof: int, confidence: float = 0.95) -> float:
    """Two-sided Student t critical value (scipy when installed, else a 95 % table)."""
    if dof < 1:
        return math.nan
    try:
        from scipy import stats

        return float(stats.t.ppf(0.5 + confidence / 2, dof))
    except ImportError:
        pass
    if not math.isclose(confidence, 0.95):
        raise ValueError("without scipy only a 95 % interval is available")
    return next((v for d, v in sorted(_T95.items()) if d >= dof), 1.960)


@dataclass
class PairedStats:
    """Per-seed values of one metric on both arms and the paired difference (on − off)."""

    metric_on: str
    metric_off: str
    seeds: list[int]
    on: list[float]
    off: list[float]
    confidence: float = 0.95
    diffs: list[float] = field(init=False)
    mean: float = field(init=False)
    std: float = field(init=False)
    ci_low: float = field(init=False)
    ci_high: float = field(init=False)

    def __post_init__(self) -> None:
        self.diffs = [a - b for a, b in zip(self.on, self.off)]
        n = len(self.diffs)
        self.mean = statistics.fmean(self.diffs) if n else math.nan
        self.std = statistics.stdev(self.diffs) if n > 1 else math.nan
        half = t_critical(n - 1, self.confidence) * self.std / math.sqrt(n) if n > 1 \
            else math.nan
        self.ci_low, self.ci_high = self.mean - half, self.mean + half

    @property
    def ci(self) -> tuple[float, float]:
        return self.ci_low, self.ci_high

    def per_seed(self) -> pd.DataFrame:
        """One row per seed: ``seed``, ``on``, ``off``, ``diff``."""
        return pd.DataFrame({"seed": self.seeds, "on": self.on, "off": self.off,
                             "diff": self.diffs})

    def to_dict(self) -> dict[str, Any]:
        return {"metric_on": self.metric_on, "metric_off": self.metric_off,
                "seeds": self.seeds, "on": self.on, "off": self.off, "diffs": self.diffs,
                "mean": self.mean, "std": self.std, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "confidence": self.confidence}


@dataclass
class PairedResult:
    """The paired comparison: headline (each arm's own scoring) and query-scored stats."""

    headline: PairedStats
    query: PairedStats
    predictor: PairedStats  #: on arm scored with the predictor, off arm with the query
    score_with_on: str
    score_with_off: str
    budget: dict[str, Any]
    on_config: RunConfig
    off_config: RunConfig
    notes: list[str] = field(default_factory=list)

    # the headline figures, directly
    mean = property(lambda self: self.headline.mean)
    std = property(lambda self: self.headline.std)
    ci = property(lambda self: self.headline.ci)
    per_seed = property(lambda self: self.headline.per_seed())

    @property
    def metric(self) -> str:
        """What the headline compares, e.g. ``test_ndcg_at_10 (on: predictor, off: query)``."""
        return f"{HEADLINE} (on: {self.score_with_on} scoring, off: {self.score_with_off} " \
               "scoring)"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "headline": self.headline.to_dict(),
                "query": self.query.to_dict(), "predictor": self.predictor.to_dict(),
                "score_with_on": self.score_with_on,
                "score_with_off": self.score_with_off, "budget": self.budget,
                "notes": self.notes, "on_config": self.on_config.to_dict(),
                "off_config": self.off_config.to_dict()}


@dataclass
class PickedPair:
    """The best finished trial with λ_pred > 0 and the best with λ_pred = 0."""

    on: RunConfig
    off: RunConfig
    on_row: pd.Series
    off_row: pd.Series


def pick_pair(df: pd.DataFrame, metric: str = S.OBJECTIVE, mode: str = "max",
              tracking_uri: str | None = None) -> PickedPair:
    """Choose the pair to compare from a runs frame (:func:`analysis.runs.load_runs`).

    Args:
        df: The study's runs.
        metric: Dev metric to rank by (final value; ``best_dev_ndcg_at_10`` for the best
            epoch).
        mode: ``max`` or ``min``.
        tracking_uri: When given, each config is the run's ``config.yaml`` artifact (else
            rebuilt from its params, which hold the full resolved config).

    Raises:
        ValueError: No finished trial with a value on one side.
    """
    lam = pd.to_numeric(finished(df)["params.loss.lambda_pred"], errors="coerce")
    picked = []
    for side, mask in (("λ_pred > 0", lam > 0), ("λ_pred = 0", lam == 0)):
        best = top_k(finished(df)[mask], 1, metric, mode)
        if best.empty:
            raise ValueError(f"no finished trial with {side} and a {metric} value")
        row = best.iloc[0]
        cfg = run_config(tracking_uri, row["run_id"]) if tracking_uri else config_from_params(
            {k: v for k, v in row.items() if k.startswith("params.")},
            f"trial {row['trial_id']}")
        picked.append((with_provenance(cfg, df.attrs.get("study", ""), row, metric,
                                       row[metric_column(df, metric)], tracking_uri), row))
    (on, on_row), (off, off_row) = picked
    return PickedPair(on, off, on_row, off_row)


def _pred_weights(cfg: RunConfig) -> list[float]:
    from trainables.loop import phase_loss

    return [phase_loss(cfg, p).lambda_pred for p in cfg.train.resolved_phases()
            if p.name != "isotropy_finetune"]


def align_budget(on: RunConfig, off: RunConfig, budget: Mapping[str, Any] | None = None
                 ) -> tuple[RunConfig, RunConfig, dict[str, Any], list[str]]:
    """Give both arms the same budget: ``budget`` overrides, then off takes on's epochs and
    step cap; test evaluation is switched on for both.

    Raises:
        ValueError: The arms have different phase schedules (not alignable by a number).
    """
    notes: list[str] = []
    if budget:
        on, off = on.with_overrides(dict(budget), "budget"), off.with_overrides(
            dict(budget), "budget")
    if [(p.name, p.epochs) for p in on.train.phases] != [
            (p.name, p.epochs) for p in off.train.phases]:
        raise ValueError("the two configs have different train.phases: give them the same "
                         "phase schedule for an equal budget")
    fixes = {k: v for k, v in (("train.epochs", on.train.epochs),
                               ("train.max_steps_per_epoch", on.train.max_steps_per_epoch))
             if v != _get(off, k)}
    if fixes:
        notes.append(f"budget aligned to the λ_pred > 0 arm: {fixes}")
        off = off.with_overrides(fixes, "budget")
    for name, cfg in (("on", on), ("off", off)):
        if not cfg.eval.evaluate_test:
            notes.append(f"eval.evaluate_test switched on for the {name} arm")
    on, off = (c.with_overrides({"eval.evaluate_test": True}, "paired") for c in (on, off))
    epochs = on.train.total_epochs
    return on, off, {"epochs": epochs, "max_steps_per_epoch": on.train.max_steps_per_epoch,
                     "batch_size_on": on.train.batch_size,
                     "batch_size_off": off.train.batch_size}, notes


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def paired_predictor_comparison(best_on: RunConfig, best_off: RunConfig, seeds: Sequence[int],
                                out_dir: str | Path, data: Any = None, features: Any = None,
                                budget: Mapping[str, Any] | None = None,
                                confidence: float = 0.95,
                                progress: bool = False) -> PairedResult:
    """Re-train both configs over ``seeds`` at equal budget and compare them by seed.

    Args:
        best_on: Config with λ_pred > 0 (e.g. :func:`pick_pair`'s ``on``).
        best_off: Config with λ_pred = 0.
        seeds: ``train.seed`` values; each seed trains both arms (the data split stays).
        out_dir: Runs go to ``<out_dir>/{on,off}/seed_<s>``; a run whose directory already
            holds the same config and its ``metrics.json`` is reused, not trained again.
            ``paired.json`` holds the result.
        data: The loaded BEIR data (default: loaded from ``best_on.data.path``).
        features: Cached base features for both arms (default: loaded or computed once).
        budget: Dotted overrides for both arms (e.g. ``{"train.epochs": 1}``).
        confidence: Level of the t interval.
        progress: Progress bars while training.

    Raises:
        ValueError: Wrong λ_pred on an arm, different data settings, too few seeds, or an
            ``out_dir`` run directory holding a different config.
    """
    from trainables.cache import load_or_compute
    from trainables.data import load_beir, resolve_data_dir
    from trainables.loop import train

    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) < len(seeds):
        raise ValueError(f"need two or more distinct seeds for an interval, got {seeds}")
    if not any(w > 0 for w in _pred_weights(best_on)):
        raise ValueError("best_on has λ_pred = 0 in every phase that trains the predictor")
    if any(w > 0 for w in _pred_weights(best_off)):
        raise ValueError("best_off has λ_pred > 0: it is not the predictor-free arm")
    if best_on.data != best_off.data:
        raise ValueError("the two configs read different data or splits; pairing needs the "
                         f"same: {best_on.data} vs {best_off.data}")
    on, off, spent, notes = align_budget(best_on, best_off, budget)
    out_dir = Path(out_dir)
    if data is None:
        data = load_beir(resolve_data_dir(on.data.path))
    tables: dict[tuple[str, int], Any] = {}

    def feats(cfg: RunConfig) -> Any:
        if features is not None or not (cfg.model.freeze_base or cfg.train.hard_negatives):
            return features
        key = (cfg.model.base_model, cfg.model.max_seq_length)
        if key not in tables:
            tables[key] = load_or_compute(data, *key, progress=progress)
        return tables[key]

    results: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for seed in seeds:
        for arm, cfg in (("on", on), ("off", off)):
            cfg = cfg.with_overrides({"train.seed": seed}, "paired")
            run_dir = out_dir / arm / f"seed_{seed}"
            test = _reuse(run_dir, cfg)
            if test is None:
                log.info("paired comparison: training %s arm, seed %d", arm, seed)
                test = train(cfg, out_dir=run_dir, data=data, features=feats(cfg),
                             progress=progress)["test"]
            results[arm].append(test)
    stats = [PairedStats(m_on, m_off, seeds, [float(r[m_on]) for r in results["on"]],
                         [float(r[m_off]) for r in results["off"]], confidence)
             for m_on, m_off in ((HEADLINE, HEADLINE), (QUERY, QUERY), (PREDICTOR, QUERY))]
    result = PairedResult(stats[0], stats[1], stats[2], on.eval.score_with,
                          off.eval.score_with, spent, on, off, notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "paired.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return result


def _reuse(run_dir: Path, cfg: RunConfig) -> dict[str, float] | None:
    """The test metrics of a finished run of exactly ``cfg`` in ``run_dir``, else None."""
    from trainables.loop import checkpoint_dirs

    saved, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    if not saved.exists():  # an interrupted run resumes from its newest checkpoint
        saved = next((d / "config.yaml" for d in checkpoint_dirs(run_dir)
                      if (d / "config.yaml").exists()), None)
        if saved is None:
            return None
    if RunConfig.from_yaml(saved) != cfg:
        raise ValueError(f"{run_dir} holds a run of a different config: use another out_dir")
    if not metrics.exists():
        return None
    return json.loads(metrics.read_text()).get("test") or None
