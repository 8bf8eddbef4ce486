"""The MLflow view of a study: one parent run per study, one child run per Ray Tune trial.

The Tune callback writes it live and ``study.sync`` rebuilds it from the study's record, so
every write here is idempotent and a failed one is simply done again later: runs are found by
tags before one is created, params are logged once, and a (metric key, step) a run holds is not
logged again. Only ``MlflowClient`` is used (thread-safe, no global active run), with MLflow's
own HTTP retries. Nothing from the environment is logged: params and tags go through
:func:`redact`, free text (YAML, stop reasons, the description) through :func:`scrub`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from analysis import schema as S
from trainables.config import flatten

log = logging.getLogger(__name__)

_UNSAFE_ID = re.compile(r"['\"`\\]")
_SECRET_NAME = re.compile(
    r"(?i)(token|secret|passw|credential|cookie|(^|[_.\-/ ])(api_?|access_?|private_?)?keys?"
    r"($|[_.\-/ ])|(^|[_.\-/ ])auth($|[_.\-/ ]))")
#: MLflow's HTTP retries, bounded so that a server that is away stalls one write for seconds,
#: not minutes (MLflow's own defaults: 7 retries, backoff factor 2, 120 s timeout); the
#: environment overrides them
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(RuntimeError):
    """The tracking backend cannot be used (unreachable server, unusable store)."""


def seed_sqlite_store(uri: str) -> None:
    """Starts a new local SQLite store as a copy of an empty one, made once per MLflow version
    (under ``$JEPA_STUDY_CACHE/mlflow``) instead of running every Alembic migration of MLflow's
    schema at the start of every study. Does nothing for other URIs or an existing database;
    on any failure MLflow creates the store itself."""
    path = S.sqlite_path(uri)
    if path is None or Path(path).exists():
        return
    import shutil

    import mlflow

    from trainables.cache import cache_root

    template = cache_root() / "mlflow" / f"empty-{mlflow.__version__}.db"
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
            MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # migrates
            os.replace(tmp, template)
        tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("no template for the MLflow store %s (%s): MLflow creates it", uri, exc)


# --- what may be logged -----------------------------------------------------------------------
def _secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (long enough to be specific)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the entries whose name looks secret (``*TOKEN*``, ``*SECRET*``,
    ``*PASSW*``, ``*CREDENTIAL*``, a ``key``/``api_key``/``auth`` name segment, ...) or whose
    value contains the value of an environment variable whose name does; recursively.
    Deliberately broad: a lost param is cheap, a token leaked to a shared server is not."""
    secrets = _secret_env_values()
    out: dict[str, Any] = {}
    for key, value in params.items():
        if _SECRET_NAME.search(str(key)):
            continue
        if isinstance(value, Mapping):
            out[key] = redact(value)
        elif not any(s in str(value) for s in secrets):
            out[key] = value
    return out


def scrub(text: str) -> str:
    """Replace the values of secret-looking environment variables inside free text."""
    for secret in _secret_env_values():
        text = text.replace(secret, "***")
    return text


def _check_id(kind: str, value: str) -> str:
    if not value or _UNSAFE_ID.search(value):
        raise ValueError(f"{kind} {value!r} must be non-empty without quotes or backslashes")
    return value


def metric_entries(metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[str]]:
    """``(finite values by MLflow key, keys of non-finite values)``; non-numbers are left out."""
    finite, nonfinite = {}, []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        key = S.mlflow_key(name)
        if math.isfinite(value):
            finite[key] = float(value)
        else:
            nonfinite.append(key)
    return finite, nonfinite


@dataclass
class TrackedRun:
    """What the tracker knows of one MLflow run: as found (or created), plus its writes."""

    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metric_keys: set[str] = field(default_factory=set)
    logged: set[tuple[str, int]] | None = None  #: (key, step) pairs, once the history is read

    @classmethod
    def of(cls, found: Any) -> "TrackedRun":
        """From an MLflow ``Run``."""
        return cls(found.info.run_id, found.info.status, dict(found.data.params),
                   dict(found.data.tags), set(found.data.metrics))


class StudyTracker:
    """Finds or creates the MLflow runs of a study (the parent: ``None``; a trial: its id) and
    writes to them directly. Methods raise what MLflow raises; after a failure,
    :meth:`forget` what the tracker knew of the runs.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://host:port``, ...).
        study_name: Name of the study; runs are found again by it, so it must be stable.
        description: The experiment's description (MLflow's note, shown above its runs).

    The experiment (``schema.experiment_name``; a local store keeps its artifacts beside
    itself, never in the working directory) is tagged as MLflow model development
    (``schema.EXPERIMENT_KIND``); an existing one (a resumed study) gets the kind and the
    description if it has none, and keeps a description it has (perhaps edited in the UI).
    """

    ROLES = (S.ROLE_STUDY, S.ROLE_TRIAL)  #: ``TAG_ROLE`` of the parent run and of a child run
    CHILD_KEY = S.TAG_TRIAL_ID  #: the tag naming a child run (its trial id)

    def __init__(self, tracking_uri: str, study_name: str, *,
                 description: str | None = None) -> None:
        self._settings = dict(tracking_uri=tracking_uri, study_name=study_name,
                              description=description)
        self.tracking_uri = tracking_uri
        self.study_name = _check_id("study name", study_name)
        self.experiment_name = S.experiment_name(study_name)
        self._http = tracking_uri.startswith(("http://", "https://"))
        if self._http:
            for key, value in {**HTTP_DEFAULTS,
                               "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}.items():
                os.environ.setdefault(key, value)
        self._experiment_tags = {S.TAG_EXPERIMENT_KIND: S.EXPERIMENT_KIND}
        if description:
            self._experiment_tags[S.TAG_EXPERIMENT_NOTE] = \
                scrub(description)[:S.MAX_TAG_VALUE_LENGTH]
        seed_sqlite_store(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None
        self._runs: dict[str | None, TrackedRun] = {}

    def __getstate__(self) -> dict:
        """The settings only: Ray Tune pickles callbacks into its experiment state."""
        return self._settings

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def forget(self) -> None:
        """Drop what the tracker knows of the runs; they are looked up again when next used."""
        self._runs.clear()

    # --- building blocks of study.sync's writers ----------------------------------------------
    def run(self, trial_id: str | None = None) -> TrackedRun:
        """The parent run (``None``) or a trial's: known, else found by tags (the oldest),
        else created RUNNING."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        role = self.ROLES[0] if trial_id is None else self.ROLES[1]
        filt = f"tags.`{S.TAG_STUDY}` = '{self.study_name}' AND tags.`{S.TAG_ROLE}` = '{role}'"
        if trial_id is not None:
            filt += f" AND tags.`{self.CHILD_KEY}` = '{_check_id('trial id', trial_id)}'"
        hits = self.client.search_runs([self.experiment_id()], filt, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        if hits:
            return self.adopt(trial_id, hits[0])
        tags = {S.TAG_STUDY: self.study_name, S.TAG_ROLE: role, S.TAG_STATUS: S.STATUS_RUNNING}
        if trial_id is not None:
            tags.update({self.CHILD_KEY: trial_id, S.TAG_PARENT_RUN_ID: self.run().run_id})
        run = self.adopt(trial_id, self.client.create_run(
            self.experiment_id(), tags=tags, run_name=trial_id or self.study_name))
        run.logged = set()
        return run

    def adopt(self, trial_id: str | None, found: Any) -> TrackedRun:
        """Take ``found`` (an MLflow ``Run``) as the run of ``trial_id`` (None: the parent)."""
        run = self._runs[trial_id] = TrackedRun.of(found)
        return run

    def fill(self, run: TrackedRun, params: Mapping[str, Any] | None,
             tags: Mapping[str, Any], texts: Mapping[str, str | None]) -> None:
        """Tags; with the params, the text artifacts if the run has no params yet; the params
        it lacks (a value it has stays: MLflow params are immutable; an empty section is no
        param). All redacted."""
        self.set_tags(run, redact(tags))
        if not params:
            return
        if not run.params:
            for name, text in texts.items():
                if text is not None:
                    self.client.log_text(run.run_id, scrub(text), name)
        items = [(S.mlflow_key(k), str(v)[:S.MAX_PARAM_VALUE_LENGTH])
                 for k, v in flatten(redact(params)).items() if v != {}]
        items = [(k, v) for k, v in items if k not in run.params]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            run.params.update(items[i:i + 100])

    def reopen(self, run: TrackedRun) -> None:
        """Set a run RUNNING again (a resumed trial or study), without its stop reason."""
        if run.status != S.STATUS_RUNNING:
            self.client.update_run(run.run_id, status=S.STATUS_RUNNING)
            run.status = S.STATUS_RUNNING
        self.set_tags(run, {S.TAG_STATUS: S.STATUS_RUNNING})
        self._drop_reason(run)

    def end(self, run: TrackedRun, status: str, reason: str | None) -> None:
        """End a run with ``status``, tagged with it and the stop reason (or none)."""
        if status not in S.END_STATUSES:
            raise ValueError(f"end status must be one of {S.END_STATUSES}, got {status!r}")
        tags = {S.TAG_STATUS: status}
        if reason is None:
            self._drop_reason(run)
        else:
            tags[S.TAG_STOP_REASON] = scrub(str(reason))
        self.set_tags(run, tags)
        if run.status != status:
            self.client.set_terminated(run.run_id, status=status)
            run.status = status

    def _drop_reason(self, run: TrackedRun) -> None:
        if S.TAG_STOP_REASON in run.tags:
            self.client.delete_tag(run.run_id, S.TAG_STOP_REASON)
            del run.tags[S.TAG_STOP_REASON]

    def set_tags(self, run: TrackedRun, tags: Mapping[str, Any]) -> None:
        items = [(S.mlflow_key(k), str(v)[:S.MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]
        items = [(k, v) for k, v in items if run.tags.get(k) != v]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.run_id, tags=[RunTag(k, v) for k, v in items[i:i + 100]])
            run.tags.update(items[i:i + 100])

    def history(self, run: TrackedRun) -> dict[tuple[str, int], list[Metric]]:
        """Every point the run holds, by (key, step); fills its ``logged`` set."""
        points: dict[tuple[str, int], list[Metric]] = {}
        for key in sorted(run.metric_keys):
            for m in self.client.get_metric_history(run.run_id, key):
                points.setdefault((m.key, m.step), []).append(m)
        run.logged = set(points)
        return points

    def log_metrics(self, run: TrackedRun, metrics: Iterable[Metric]) -> int:
        """Log the points whose (key, step) the run lacks, in batches; returns how many."""
        if run.logged is None:
            self.history(run)
        todo, seen = [], set(run.logged)
        for m in metrics:
            if (m.key, m.step) not in seen:
                seen.add((m.key, m.step))
                todo.append(m)
        for i in range(0, len(todo), 1000):
            chunk = todo[i:i + 1000]
            self.client.log_batch(run.run_id, metrics=chunk)
            run.logged.update((m.key, m.step) for m in chunk)
            run.metric_keys.update(m.key for m in chunk)
        return len(todo)

    def note_nonfinite(self, run: TrackedRun, entries: list[tuple[str, int]]) -> None:
        old = S.parse_nonfinite(run.tags.get(S.TAG_NONFINITE))
        if set(entries) - set(old):
            self.set_tags(run, {S.TAG_NONFINITE: S.format_nonfinite(old + entries)})

    def experiment_id(self) -> str:
        """The study's experiment: created with the experiment tags, or found (restored if
        deleted) and given those of them it lacks."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, tags=self._experiment_tags,
                        artifact_location=S.local_artifact_location(self.tracking_uri,
                                                                    self.experiment_name))
                    return self._experiment_id
                except MlflowException as err:  # created concurrently by another writer
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            for key, value in self._experiment_tags.items():
                if not exp.tags.get(key):
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            self._experiment_id = exp.experiment_id
        return self._experiment_id

    # --- reachability ----------------------------------------------------------------------------
    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, before any Ray work: raises :class:`TrackingError`, naming the URI,
        within about ``timeout_s`` seconds when the backend cannot be used."""
        if self._http:
            if not self.reachable(timeout_s):
                raise TrackingError(f"MLflow tracking server {self.tracking_uri} does not answer "
                                    f"(GET /health, {timeout_s:.0f} s timeout); start it or fix "
                                    "the tracking URI")
            return
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any store failure means unusable
            raise TrackingError(f"MLflow tracking store {self.tracking_uri} is unusable: {err}") \
                from err

    def reachable(self, timeout_s: float = 1.0) -> bool:
        """Whether an http(s) server answers ``/health`` (always True for local stores)."""
        if not self._http:
            return True
        try:
            with urllib.request.urlopen(self.tracking_uri.rstrip("/") + "/health",
                                        timeout=timeout_s) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as err:  # answered: e.g. a proxy without /health
            return err.code < 500
        except (OSError, ValueError):
            return False
