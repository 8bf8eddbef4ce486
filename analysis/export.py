"""Export a study's best configurations as run-config YAML, and read them back.

An exported file is a complete ``RunConfig`` (every field resolved, ``data.path`` and
``train.seed`` included) that ``jepa-study train --config`` repeats as it is and
``jepa-study launch --warm-start`` starts a new study from. It is the trial's model as the
study chose it on dev: its best dev epoch (``train.stop_after_epoch``, the schedule kept, no
patience) and, where the trial chose its scoring on dev (``eval.score_with: auto``), the
scoring that won. Its ``provenance`` says where it came from (study, trial, MLflow run,
metric and value, tracking URI, best epoch, the trial's patience and scoring setting);
training never reads it. Flow stays one way: MLflow -> ``analysis`` -> YAML -> ``train``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from mlflow.tracking import MlflowClient

from analysis import schema as S
from analysis.runs import METRICS, find_parent, load_runs, run_config
from analysis.views import metric_column, top_k
from trainables.config import ConfigError, RunConfig, is_test_metric

log = logging.getLogger(__name__)

PROVENANCE_KEYS = ("study", "trial_id", "mlflow_run_id", "metric", "value", "tracking_uri")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def public_uri(uri: str | None) -> str:
    """A tracking URI without credentials (``http://user:pw@host`` -> ``http://host``)."""
    if not uri:
        return ""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def with_provenance(cfg: RunConfig, study: str, row: Mapping[str, Any], metric: str,
                    value: Any, tracking_uri: str | None, **extra: Any) -> RunConfig:
    """``cfg`` with ``provenance`` set from a runs-frame row (see :data:`PROVENANCE_KEYS`)."""
    prov = {"study": str(study), "trial_id": str(row["trial_id"]),
            "mlflow_run_id": str(row["run_id"]), "metric": metric, "value": repr(float(value)),
            "tracking_uri": public_uri(tracking_uri), **{k: str(v) for k, v in extra.items()}}
    return RunConfig.from_dict({**cfg.to_dict(), "provenance": prov}, "provenance")


def as_chosen(cfg: RunConfig, row: Mapping[str, Any]) -> tuple[RunConfig, dict[str, str]]:
    """The trial's config as the study chose its model: trained to its best dev epoch, with
    the scoring that won on dev; and the provenance entries saying what was changed.

    Args:
        cfg: The trial's resolved config.
        row: Its runs-frame row (``best_epoch``, ``metrics.best_epoch``,
            ``metrics.best_scored_with_predictor``).
    """
    best = row.get(METRICS + S.BEST_EPOCH)
    if best is None or best != best:  # NaN: a trial from before the loop reported it
        best = row.get("best_epoch")
    notes: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    if cfg.eval.score_with == "auto":
        won = row.get(METRICS + S.BEST_SCORED_WITH_PREDICTOR)
        mode = "predictor" if won == 1 and cfg.trains_predictor else "query"
        overrides["eval.score_with"] = mode
        notes["score_with"] = f"auto: {mode} won on dev"
    if not cfg.eval.evaluate_test:  # a study's trial: `train` scores test once at its end
        overrides["eval.evaluate_test"] = True
    if best is not None and best == best:
        overrides.update({"train.stop_after_epoch": int(best), "train.patience": None})
        notes.update(best_epoch=str(int(best)), patience=str(cfg.train.patience))
    return (cfg.with_overrides(overrides, "export") if overrides else cfg), notes


def export_configs(tracking_uri: str, study_name: str, out_dir: str | Path, top: int = 1,
                   metric: str = S.SELECTION, mode: str = "max",
                   experiment_name: str | None = None) -> list[Path]:
    """Write the ``top`` finished trials of a study as run-config YAML files.

    Each config is the trial's ``config.yaml`` artifact (rebuilt from its params when the
    artifact is missing), validated as a ``RunConfig``, made the model the study chose
    (:func:`as_chosen`); a missing ``data.path`` is filled with the study's data directory
    (the parent run's ``data`` param) so the file runs anywhere that directory exists.

    Args:
        tracking_uri: MLflow tracking URI of the study.
        study_name: The study.
        out_dir: Created if needed; files are ``<study>-rank<k>-<trial_id>.yaml``.
        top: How many trials.
        metric: Ranking metric (its last logged value; the default, the best dev epoch's
            headline nDCG@10).
        mode: ``max`` or ``min``.
        experiment_name: The study's experiment when it is not the default one.

    Returns:
        The written paths, best first.

    Raises:
        ValueError: No finished trial has a value of ``metric``.
    """
    if is_test_metric(metric):
        raise ValueError(f"metric {metric!r} is a test figure: test is reported, never used to "
                         "choose; rank by a dev figure such as best_dev_ndcg_at_10")
    df = load_runs(tracking_uri, study_name, experiment_name)
    best = top_k(df, top, metric, mode)
    if best.empty:
        raise ValueError(f"study {study_name!r} has no finished trial with a {metric!r} value")
    col = metric_column(df, metric)
    data_dir = None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for _, row in best.iterrows():
        cfg = run_config(tracking_uri, row["run_id"])
        if cfg.data.path is None:
            if data_dir is None:
                client = MlflowClient(tracking_uri)
                data_dir = find_parent(tracking_uri, study_name, experiment_name,
                                       client).data.params.get(S.PARAM_DATA, "")
            if data_dir:
                cfg = cfg.with_overrides({"data.path": data_dir}, "export")
            else:
                log.warning("trial %s: data.path unknown, left unset", row["trial_id"])
        cfg, chosen = as_chosen(cfg, row)
        cfg = with_provenance(cfg, study_name, row, metric, row[col], tracking_uri,
                              rank=row["rank"], **chosen, **figures(row))
        path = out_dir / f"{_safe(study_name)}-rank{row['rank']}-{_safe(row['trial_id'])}.yaml"
        cfg.to_yaml(path)
        paths.append(path)
    return paths


#: the figures an exported config's provenance carries: dev (what chose it) and test
#: (reported only), each on all, seen and unseen queries with the subsets' sizes
SUMMARY_FIGURES = tuple(
    f"best_{split}_{name}" for split in ("dev", "test") for name in
    ("ndcg_at_10", "seen_ndcg_at_10", "unseen_ndcg_at_10", "n_seen", "n_unseen"))


def figures(row: Mapping[str, Any]) -> dict[str, str]:
    """The trial's :data:`SUMMARY_FIGURES` it has (test only where the study scored it)."""
    out = {}
    for key in SUMMARY_FIGURES:
        value = row.get(METRICS + key)
        if isinstance(value, (int, float)) and value == value:
            out[key] = f"{int(value)}" if "_n_" in key else f"{float(value):.4f}"
    return out


def _safe(name: Any) -> str:
    return _UNSAFE_NAME.sub("_", str(name)).strip("._") or "_"


def _natural(path: Path) -> list[Any]:
    """Sort key that puts ``rank2`` before ``rank10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def load_warm_start(path_or_dir: str | Path | Iterable[str | Path]) -> list[RunConfig]:
    """Read exported configs: one YAML file, every ``*.yaml``/``*.yml`` of a directory
    (in natural name order, so ``rank2`` comes before ``rank10``), or a list of either.

    Raises:
        ConfigError: A path that does not exist, a directory without YAML files, or an
            invalid config (the message names the file and the field).
    """
    items = [path_or_dir] if isinstance(path_or_dir, (str, Path)) else list(path_or_dir)
    configs: list[RunConfig] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted((p for p in path.iterdir() if p.suffix in (".yaml", ".yml")
                            and p.is_file()), key=_natural)
            if not files:
                raise ConfigError(f"{path}: no .yaml configs in this directory")
            configs.extend(RunConfig.from_yaml(p) for p in files)
        elif path.is_file():
            configs.append(RunConfig.from_yaml(path))
        else:
            raise ConfigError(f"{path}: no such warm-start file or directory")
    return configs
