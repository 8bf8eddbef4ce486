"""A study's record, read back into pandas: MLflow runs, metric histories, Optuna trials.

Everything downstream (views, report, export, the paired comparison) works on the frames
built here, so this is the only module that talks to MLflow and Optuna for reading. The run
layout it reads is the contract in :mod:`analysis.schema` (one parent run per study, one
child run per trial); params come back typed (MLflow stores ``str(value)``), per-epoch
metrics come back as their last epoch, plus the epoch count and the best dev value.
"""

from __future__ import annotations

import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from analysis import schema as S
from trainables.config import ConfigError, RunConfig

#: columns every frame of :func:`load_runs` has, before ``params.*`` and ``metrics.*``
RUN_COLUMNS = ["run_id", "trial_id", "run_name", "status", "stop_reason", "nonfinite",
               "start_time", "end_time", "duration_s", "epochs", "best_epoch",
               f"best_{S.OBJECTIVE}"]
PARAMS = "params."
METRICS = "metrics."
_PAGE = 1000


class StudyNotFound(LookupError):
    """No parent run (or no Optuna study) of that name where we looked."""


# -- MLflow ------------------------------------------------------------------------------------

def find_parent(tracking_uri: str, study_name: str, experiment_name: str | None = None,
                client: MlflowClient | None = None) -> Run:
    """Return the parent run of a study (tags ``jepa.role = study``, ``jepa.study = name``).

    Looks in the study's default experiment (``schema.experiment_name``) or the one named;
    when that experiment does not exist, every experiment is searched, so a study launched
    under a custom experiment name is still found by its study name alone.

    Raises:
        StudyNotFound: No parent run of that study name.
    """
    client = client or MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name or S.experiment_name(study_name))
    ids = [exp.experiment_id] if exp is not None else [
        e.experiment_id for e in client.search_experiments()]
    filt = (f"tags.`{S.TAG_STUDY}` = '{_quote(study_name)}' "
            f"AND tags.`{S.TAG_ROLE}` = '{S.ROLE_STUDY}'")
    hits = client.search_runs(ids, filt, max_results=1,
                              order_by=["attributes.start_time ASC"]) if ids else []
    if not hits:
        raise StudyNotFound(f"no parent run of study {study_name!r} in {tracking_uri} "
                            f"(experiment {experiment_name or S.experiment_name(study_name)!r})")
    return hits[0]


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """Every child run of ``parent`` (all pages), oldest first."""
    filt = f"tags.`{S.TAG_PARENT_RUN_ID}` = '{parent.info.run_id}'"
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([parent.info.experiment_id], filt, max_results=_PAGE,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load_runs(tracking_uri: str, study_name: str,
              experiment_name: str | None = None) -> pd.DataFrame:
    """One row per trial of a study, with typed params and final metrics.

    Columns: :data:`RUN_COLUMNS` (``status`` is the ``jepa.status`` tag, MLflow's run status
    when the tag is missing; ``epochs`` is the last step of the objective's history and
    ``best_dev_ndcg_at_10`` its maximum over epochs), then ``params.<dotted path>`` typed back
    with :func:`schema.parse_param`, then ``metrics.<key>`` = the latest value (for per-epoch
    metrics, the last epoch; ``test_*`` only exist for trials that ran to the end).

    ``df.attrs`` holds ``study``, ``parent_run_id``, ``experiment_id`` and ``tracking_uri``
    for the functions that need to go back to MLflow.
    """
    client = MlflowClient(tracking_uri)
    parent = find_parent(tracking_uri, study_name, experiment_name, client)
    rows = [_row(client, run) for run in child_runs(client, parent)]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=RUN_COLUMNS)
    params = sorted(c for c in df.columns if c.startswith(PARAMS))
    metrics = sorted(c for c in df.columns if c.startswith(METRICS))
    df = df[RUN_COLUMNS + params + metrics]
    df = df.sort_values(["start_time", "trial_id"], kind="stable").reset_index(drop=True)
    df.attrs.update(study=study_name, parent_run_id=parent.info.run_id,
                    experiment_id=parent.info.experiment_id, tracking_uri=tracking_uri)
    return df


def _row(client: MlflowClient, run: Run) -> dict[str, Any]:
    info, tags = run.info, run.data.tags
    history = client.get_metric_history(info.run_id, S.OBJECTIVE)
    best = max(history, key=lambda m: (m.value, -m.step), default=None)
    start = _time(info.start_time)
    end = _time(info.end_time)
    row: dict[str, Any] = {
        "run_id": info.run_id,
        "trial_id": tags.get(S.TAG_TRIAL_ID),
        "run_name": info.run_name,
        "status": tags.get(S.TAG_STATUS) or info.status,
        "stop_reason": tags.get(S.TAG_STOP_REASON),
        "nonfinite": tags.get(S.TAG_NONFINITE, ""),
        "start_time": start,
        "end_time": end,
        "duration_s": (end - start).total_seconds() if start is not None and end is not None
        else math.nan,
        "epochs": max((m.step for m in history), default=0),
        "best_epoch": best.step if best is not None else None,
        f"best_{S.OBJECTIVE}": best.value if best is not None else math.nan,
    }
    row.update({PARAMS + k: S.parse_param(v) for k, v in run.data.params.items()})
    row.update({METRICS + k: v for k, v in run.data.metrics.items()})
    return row


def _time(ms: int | None) -> pd.Timestamp | None:
    return None if ms is None else pd.Timestamp(ms, unit="ms", tz="UTC")


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def load_history(tracking_uri: str, run_ids: str | Iterable[str],
                 keys: str | Iterable[str] = (S.OBJECTIVE,)) -> pd.DataFrame:
    """Per-step values of metrics, long format: columns ``run_id, key, step, value``.

    Args:
        tracking_uri: The MLflow tracking URI.
        run_ids: One run id or several.
        keys: Metric keys (sanitised with ``schema.mlflow_key``, so ``ndcg@10`` works).

    Returns:
        Rows sorted by run, key and step; a key a run never logged has no rows.
    """
    client = MlflowClient(tracking_uri)
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    keys = [keys] if isinstance(keys, str) else list(keys)
    rows = [(run_id, m.key, int(m.step), float(m.value))
            for run_id in run_ids for key in keys
            for m in client.get_metric_history(run_id, S.mlflow_key(key))]
    df = pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
    return df.sort_values(["run_id", "key", "step"], kind="stable").reset_index(drop=True)


def logged_space(tracking_uri: str, parent_run_id: str) -> dict[str, Any]:
    """The study's search space as logged on the parent run (``space.yaml``), as a mapping
    (not ``search_spaces.space.load_space``, which loads and validates a space file).

    Read raw (not validated): the report only needs ``metric`` and ``mode``, and a space
    from an older code version should still be readable. Empty when the artifact is missing.
    """
    text = _artifact_text(MlflowClient(tracking_uri), parent_run_id, S.ARTIFACT_SPACE)
    try:
        raw = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        raw = None
    return raw if isinstance(raw, dict) else {}


def objectives(space: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The study's metric(s) and mode(s) from its space mapping (default: the objective)."""
    metric = space.get("metric", S.SELECTION)
    mode = space.get("mode", "max")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] * len(metrics) if isinstance(mode, str) else list(mode)
    return metrics, modes


# -- run configs -------------------------------------------------------------------------------

def run_config(tracking_uri: str, run_id: str) -> RunConfig:
    """The resolved run config of a trial: its ``config.yaml``, else rebuilt from its params.

    Raises:
        ConfigError: Neither the artifact nor the params give a valid ``RunConfig``.
    """
    client = MlflowClient(tracking_uri)
    text = _artifact_text(client, run_id, S.ARTIFACT_CONFIG)
    if text:
        try:
            return RunConfig.from_dict(yaml.safe_load(text), f"run {run_id}: config.yaml")
        except (ConfigError, yaml.YAMLError):
            pass  # e.g. written by an older code version: try the params
    return config_from_params(client.get_run(run_id).data.params, f"run {run_id}: params")


def config_from_params(params: Mapping[str, Any], source: str = "<params>") -> RunConfig:
    """Rebuild a ``RunConfig`` from a trial's flattened params (MLflow text or typed values).

    Keys may carry the ``params.`` column prefix; ``search.*`` keys and missing values
    (NaN, as a DataFrame row has for params another run had) are skipped. Each value is
    typed for its field: a text field keeps the text (a model named ``123`` stays a string),
    other fields get :func:`schema.parse_param`.

    Raises:
        ConfigError: A key is not a config field or a value is invalid (names the field).
    """
    nested: dict[str, Any] = {}
    for key, value in params.items():
        key = key[len(PARAMS):] if key.startswith(PARAMS) else key
        if key.startswith(S.SEARCH_PREFIX) or _missing(value):
            continue
        path = key.split(S.PARAM_SEP)
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key!r} is not a config field")
        node[path[-1]] = _typed(RunConfig, path, value)
    return RunConfig.from_dict(nested, source)


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _typed(model: type[BaseModel], path: list[str], value: Any) -> Any:
    """``value`` typed for the field at ``path`` of ``model`` (unknown fields: parsed)."""
    field = model.model_fields.get(path[0])
    if field is None:
        return S.parse_param(value)
    ann = field.annotation
    if len(path) > 1:
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        return _typed(sub, path[1:], value) if sub is not None else S.parse_param(value)
    parsed = S.parse_param(value)
    if parsed is None or not _wants_text(ann):
        return parsed
    return value if isinstance(value, str) else str(value)


def _wants_text(ann: Any) -> bool:
    """True for ``str``, a literal of strings, and optional forms of those."""
    if ann is str:
        return True
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bool(rest) and all(_wants_text(a) for a in rest)
    return False


def _artifact_text(client: MlflowClient, run_id: str, name: str) -> str | None:
    # one small file per call: MLflow's progress bar would only clutter the terminal
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, name, tmp)
            return Path(path).read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - missing artifact or unreachable store: caller decides
        return None


# -- Optuna ------------------------------------------------------------------------------------

def load_optuna(storage_url: str, study_name: str) -> pd.DataFrame:
    """Optuna's trials of a study, tidied: one row per trial.

    Columns: ``number``, ``state`` (``COMPLETE``, ``FAIL``, ...), ``value`` (or one column
    per objective: the metric names when the study has them, else ``values_<i>``),
    ``datetime_start``, ``datetime_complete``, ``duration_s``, ``params.<Optuna name>``
    (dotted config paths and ``<path>:on`` switches; NaN where a conditional parameter was
    not suggested) and ``user_attrs.<name>``; Optuna's system attributes are left out.
    ``df.attrs["directions"]`` lists the study's directions (``maximize``/``minimize``).

    Raises:
        StudyNotFound: The storage has no study of that name.
    """
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        raise StudyNotFound(f"no Optuna study {study_name!r} in {storage_url}") from None
    df = study.trials_dataframe()
    renames: dict[str, str] = {}
    for col in df.columns:
        if col.startswith("params_"):
            renames[col] = "params." + col[len("params_"):]
        elif col.startswith("user_attrs_"):
            renames[col] = "user_attrs." + col[len("user_attrs_"):]
    df = df.drop(columns=[c for c in df.columns if c.startswith("system_attrs_")])
    df = df.rename(columns=renames)
    if "duration" in df.columns:
        df["duration_s"] = df.pop("duration").dt.total_seconds()
    if "state" in df.columns:
        df["state"] = df["state"].astype(str)
    df.attrs["directions"] = [d.name.lower() for d in study.directions]
    return df.reset_index(drop=True)
