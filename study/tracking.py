"""MLflow tracking of a study: one parent run per study, one child run per Ray Tune trial.

:class:`StudyTracker` talks to MLflow only through ``MlflowClient`` (never the fluent API),
so it is thread-safe and never touches a global active run. Every write goes through an
ordered queue: when the tracking server is unreachable the write is kept in memory and in an
optional write-ahead JSONL file, and retried on the next call, on :meth:`StudyTracker.flush`,
and by a new tracker (a restarted driver) that reads the same file. Writes are idempotent on
replay: runs are found by tags before one is created, params are only logged once, and a
(metric key, step) pair already in a run's history is never logged again.

Only what callers pass is logged, never the environment; :func:`redact` drops secret-looking
params and the tracker applies it to every param and tag it is given.

:class:`MLflowTrialCallback` is the thin Ray Tune adapter around the tracker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from analysis import schema as S

log = logging.getLogger(__name__)

_STUDY = "study"  # queue key of the parent run; trials are "trial:<id>"
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
              "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"}
_UNSAFE_ID = re.compile(r"['\"`\\]")
_SECRET_NAME = re.compile(
    r"(?i)(token|secret|passw|credential|cookie|(^|[_.\-/ ])(api_?|access_?|private_?)?keys?"
    r"($|[_.\-/ ])|(^|[_.\-/ ])auth($|[_.\-/ ]))")
_REDACTED = "***"
#: MLflow's experiment-kind tag; model development (runs, params, metrics), not GenAI (traces)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow's description (note) of an experiment, shown above its runs in the UI
EXPERIMENT_NOTE_TAG = "mlflow.note.content"


class TrackingError(RuntimeError):
    """The tracking backend cannot be used (unreachable server, unusable store)."""


def seed_sqlite_store(uri: str) -> None:
    """Starts a new local SQLite store as a copy of an empty one, made once per MLflow version.

    MLflow creates a store's schema by running every Alembic migration, ~2 s on 2 cores at
    the start of every study; the empty, migrated database is the same each time, so it is
    made once under ``$JEPA_STUDY_CACHE/mlflow`` and copied (milliseconds). Does nothing for
    other URIs or an existing database; on any failure MLflow creates the store itself.
    """
    path = S.sqlite_path(uri)
    if path is None or Path(path).exists():
        return
    import shutil

    import mlflow

    from trainables.cache import cache_root

    db = Path(path)
    template = cache_root() / "mlflow" / f"empty-{mlflow.__version__}.db"
    try:
        if not template.exists():
            template.parent.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f".{template.name}.{os.getpid()}.tmp")
            MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)  # migrates
            os.replace(tmp, template)
        tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, db)
    except OSError as exc:
        log.debug("no template for the MLflow store %s (%s): MLflow creates it", uri, exc)


# --- pure helpers ----------------------------------------------------------------------------
def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to ``a.b.c`` keys with string values (MLflow params are text)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{S.PARAM_SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name))
        else:
            flat[name] = str(value)
    return flat


def _secret_env_values() -> list[str]:
    """Values of environment variables whose names look secret (long enough to be specific)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``params`` without entries that look like secrets.

    An entry is dropped when its name looks secret (``*TOKEN*``, ``*SECRET*``, ``*PASSW*``,
    ``*CREDENTIAL*``, a ``key``/``api_key``/``auth`` name segment, ...) or when its value
    contains the value of an environment variable whose name looks secret. Nested mappings are
    redacted recursively. Dropping is deliberately broad: a lost param is cheap, a leaked token
    in a shared tracking server is not.
    """
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


def _scrub(text: str) -> str:
    """Replace the values of secret-looking environment variables inside free text."""
    for secret in _secret_env_values():
        text = text.replace(secret, _REDACTED)
    return text


def _check_id(kind: str, value: str) -> str:
    if not value or _UNSAFE_ID.search(value):
        raise ValueError(f"{kind} {value!r} must be non-empty without quotes or backslashes")
    return value


def _trial_key(trial_id: str) -> str:
    return f"trial:{_check_id('trial id', str(trial_id))}"


@dataclass
class _Run:
    """What the tracker knows of one MLflow run (refreshed when the run is (re)opened)."""

    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    logged: set[tuple[str, int]] = field(default_factory=set)
    stale: bool = False


class StudyTracker:
    """Get-or-create MLflow runs for a study and its trials; write through a retried queue.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``http://host:port``, ...).
        study_name: Name of the study; runs are found again by it, so it must be stable.
        experiment_name: MLflow experiment; default ``schema.experiment_name(study_name)``.
        wal_dir: Directory of the write-ahead file ``<study>.wal.jsonl``; queued writes are
            appended there and replayed by the next tracker of the same study. One tracker
            per study and ``wal_dir`` at a time (the driver).
        artifact_location: Artifact root for a newly created experiment; default for local
            stores is ``<store dir>/mlartifacts/...`` (never the working directory), for servers
            the server's default.
        request_timeout_s: Bound on one HTTP request to a tracking server (MLflow's default is
            120 s with 7 retries; the tracker retries itself, so MLflow's retries are off unless
            ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is set).
        description: The experiment's description (MLflow's note, shown above its runs), e.g.
            what the study searched and where its report is; secret-looking values scrubbed.

    The experiment is tagged as MLflow model development (:data:`EXPERIMENT_KIND`), so that
    MLflow treats it as runs to compare rather than GenAI traces. An existing experiment (a
    resumed study) gets the kind and the description when it has none; a description it has
    (perhaps edited in the UI) is kept.
    """

    def __init__(self, tracking_uri: str, study_name: str, experiment_name: str | None = None,
                 *, wal_dir: str | os.PathLike | None = None, artifact_location: str | None = None,
                 request_timeout_s: int = 10, description: str | None = None) -> None:
        self._init_args = (tracking_uri, study_name, experiment_name,
                           {"wal_dir": None if wal_dir is None else str(wal_dir),
                            "artifact_location": artifact_location,
                            "request_timeout_s": request_timeout_s,
                            "description": description})
        self.tracking_uri = tracking_uri
        self.study_name = _check_id("study name", study_name)
        self.experiment_name = experiment_name or S.experiment_name(study_name)
        self._http = tracking_uri.startswith(("http://", "https://"))
        if self._http:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._artifact_location = artifact_location or self._local_artifact_location()
        self._experiment_tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        if description:
            self._experiment_tags[EXPERIMENT_NOTE_TAG] = \
                _scrub(description)[:S.MAX_TAG_VALUE_LENGTH]
        seed_sqlite_store(tracking_uri)
        self._client = MlflowClient(tracking_uri)
        self._lock = threading.RLock()
        self._queue: deque[dict] = deque()
        self._runs: dict[str, _Run] = {}
        self._open: set[str] = set()
        self._experiment_id: str | None = None
        self._down = False
        self._seq = 0
        self._wal: Path | None = None
        if wal_dir is not None:
            self._wal = Path(wal_dir) / f"{S.mlflow_key(study_name).replace('/', '_')}.wal.jsonl"
            self._wal.parent.mkdir(parents=True, exist_ok=True)
            self._load_wal()

    def __getstate__(self) -> dict:
        """Pickle the settings only (Ray Tune pickles callbacks into its experiment state)."""
        return {"init_args": self._init_args}

    def __setstate__(self, state: dict) -> None:
        *args, kwargs = state["init_args"]
        self.__init__(*args, **kwargs)  # a fresh client; replays the write-ahead file

    # --- public API --------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Number of writes not yet accepted by MLflow."""
        return len(self._queue)

    def run_id(self, trial_id: str | None = None) -> str | None:
        """Run id of the parent (no argument) or of a trial, once MLflow has created it."""
        run = self._runs.get(_STUDY if trial_id is None else f"trial:{trial_id}")
        return run.run_id if run else None

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Fail fast, before any Ray work, when the tracking backend cannot be used.

        Raises:
            TrackingError: Naming the URI, within about ``timeout_s`` seconds.
        """
        if self._http:
            if not self._probe(timeout_s):
                raise TrackingError(f"MLflow tracking server {self.tracking_uri} does not answer "
                                    f"(GET /health, {timeout_s:.0f} s timeout); start it or fix "
                                    "the tracking URI")
            return
        try:
            self._client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - any store failure means unusable
            raise TrackingError(f"MLflow tracking store {self.tracking_uri} is unusable: {err}") \
                from err

    def start_study(self, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None, space_yaml: str | None = None
                    ) -> str | None:
        """Get or create the study's parent run and set it RUNNING (idempotent, for resume).

        Args:
            params: Study parameters; flattened, redacted, logged once.
            tags: Extra tags (e.g. ``schema.TAG_GIT_COMMIT``); redacted.
            space_yaml: Text of the search space, logged as ``space.yaml``.

        Returns:
            The parent run id, or None while the server is unreachable (writes are queued).
        """
        tags = {**redact(tags or {}), S.TAG_ROLE: S.ROLE_STUDY, S.TAG_STUDY: self.study_name}
        ops = [{"op": "open", "tags": tags}, {"op": "params", "params": self._params(params)}]
        if space_yaml is not None:
            ops.append({"op": "text", "file": S.ARTIFACT_SPACE, "text": _scrub(space_yaml)})
        self._submit(_STUDY, ops)
        return self.run_id()

    def trial_run(self, trial_id: str, params: Mapping[str, Any] | None = None,
                  config_yaml: str | None = None, tags: Mapping[str, Any] | None = None
                  ) -> str | None:
        """Get or create the child run of a trial and set it RUNNING.

        There is never more than one run per trial id, also across trackers: the run is looked
        up by tags first. A finished/failed/killed run of a retried trial is re-opened and its
        metric history read once, so that a resumed trial never logs a (key, step) twice.

        Returns:
            The child run id, or None while the server is unreachable (writes are queued).
        """
        key = _trial_key(trial_id)
        ops = [{"op": "open", "tags": redact(tags or {})},
               {"op": "params", "params": self._params(params)}]
        if config_yaml is not None:
            ops.append({"op": "text", "file": S.ARTIFACT_CONFIG, "text": _scrub(config_yaml)})
        self._open.add(key)
        self._submit(key, ops)
        return self.run_id(trial_id)

    def log_epoch(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Log one epoch's metrics at ``step``; NaN/inf go to the ``jepa.nonfinite`` tag.

        Keys are sanitised with ``schema.mlflow_key``; non-numeric values are ignored; (key,
        step) pairs already in the run are skipped.
        """
        now, finite, nonfinite = int(time.time() * 1000), [], []
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.debug("ignoring non-numeric metric %s=%r", name, value)
                continue
            key = S.mlflow_key(name)
            if math.isfinite(number):
                finite.append([key, number, int(step), now])
            else:
                nonfinite.append([key, int(step)])
        ops = [{"op": "metrics", "metrics": finite}] if finite else []
        if nonfinite:
            ops.append({"op": "nonfinite", "entries": nonfinite})
        self._submit(_trial_key(trial_id), ops)

    def end_trial(self, trial_id: str, status: str, reason: str | None = None) -> None:
        """End a trial's run with FINISHED/FAILED/KILLED, tagging status and stop reason."""
        key = _trial_key(trial_id)
        self._open.discard(key)
        self._submit(key, [self._end_op(status, reason)])

    def end_open_trials(self, status: str = S.STATUS_KILLED, reason: str | None = None
                        ) -> list[str]:
        """End every trial run this tracker opened and has not ended (a stopping driver).

        Returns:
            The trial ids whose runs were ended.
        """
        with self._lock:
            trial_ids = sorted(key.split(":", 1)[1] for key in self._open)
        for trial_id in trial_ids:
            self.end_trial(trial_id, status, reason)
        return trial_ids

    def end_study(self, status: str = S.STATUS_FINISHED, reason: str | None = None) -> None:
        """End the parent run like :meth:`end_trial`."""
        self._submit(_STUDY, [self._end_op(status, reason)])

    def mark_orphans_killed(self) -> list[str]:
        """Mark trial runs left RUNNING by a killed driver as KILLED (for resume).

        Trials opened by this tracker and not ended are left alone. The write-ahead file is
        replayed first, and a run whose end is still queued is no orphan: the killed driver
        may have seen its trial end while the server was unreachable.

        Returns:
            The trial ids that were marked.

        Raises:
            TrackingError: The runs cannot be searched (backend unreachable).
        """
        with self._lock:
            self._drain(time.monotonic() + 30.0)
            try:
                runs = self._client.search_runs(
                    [self._get_experiment_id()], max_results=5000,
                    filter_string=f"{self._study_filter(S.ROLE_TRIAL)} "
                                  f"AND attributes.status = '{S.STATUS_RUNNING}'")
            except Exception as err:  # noqa: BLE001
                raise TrackingError(f"cannot search runs in {self.tracking_uri}: {err}") from err
            ending = {op["run"] for op in self._queue if op["op"] == "end"}
            trial_ids = [r.data.tags[S.TAG_TRIAL_ID] for r in runs
                         if f"trial:{r.data.tags.get(S.TAG_TRIAL_ID)}" not in self._open | ending]
            for trial_id in trial_ids:
                self._queue_ops(f"trial:{trial_id}", [
                    self._end_op(S.STATUS_KILLED, S.STOP_REASON_ORPHANED)])
            self._drain(time.monotonic() + 10.0)
            return trial_ids

    def flush(self, timeout: float = 30.0) -> bool:
        """Try to write everything queued, retrying until ``timeout`` seconds have passed.

        Returns:
            True when nothing is left in the queue.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._down = self._down and not self._probe(1.0)
                if not self._down:
                    self._drain(deadline)
                if not self._queue:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    # --- queue -------------------------------------------------------------------------------
    def _params(self, params: Mapping[str, Any] | None) -> dict[str, str]:
        flat = flatten_params(redact(params or {}))
        return {S.mlflow_key(k): v[:S.MAX_PARAM_VALUE_LENGTH] for k, v in flat.items()}

    @staticmethod
    def _end_op(status: str, reason: str | None) -> dict:
        if status not in S.END_STATUSES:
            raise ValueError(f"end status must be one of {S.END_STATUSES}, got {status!r}")
        return {"op": "end", "status": status, "reason": None if reason is None else _scrub(
            str(reason))[:S.MAX_TAG_VALUE_LENGTH]}

    def _submit(self, key: str, ops: list[dict]) -> None:
        """Queue ops for one run and try to drain once (fast when the server is down)."""
        with self._lock:
            self._queue_ops(key, ops)
            if self._down and not self._probe(1.0):
                return
            self._drain(time.monotonic() + 5.0)

    def _queue_ops(self, key: str, ops: list[dict]) -> None:
        lines = []
        for op in ops:
            self._seq += 1
            op = {**op, "run": key, "seq": self._seq}
            self._queue.append(op)
            lines.append(json.dumps(op))
        if self._wal is not None and lines:
            with open(self._wal, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _drain(self, deadline: float) -> None:
        """Apply queued ops in order until empty, a transient failure, or the deadline."""
        done = 0
        try:
            while self._queue and time.monotonic() < deadline:
                op = self._queue[0]
                try:
                    self._apply(op)
                except MlflowException as err:
                    if err.error_code not in _PERMANENT:
                        raise
                    log.warning("MLflow refused %s for %s, dropped: %s", op["op"], op["run"], err)
                self._queue.popleft()
                done += 1
            if self._down:
                log.warning("MLflow %s reachable again", self.tracking_uri)
            self._down = False
        except Exception as err:  # noqa: BLE001 - transient: keep the op, retry later
            run = self._runs.get(self._queue[0]["run"])
            if run is not None:
                run.stale = True  # the write may have landed: re-read before writing again
            if not self._down:
                log.warning("MLflow %s unreachable (%s); %d writes queued", self.tracking_uri,
                            str(err).splitlines()[0][:200], len(self._queue))
            self._down = True
        if done:
            self._rewrite_wal()

    def _apply(self, op: dict) -> None:
        kind, client = op["op"], self._client
        run = self._resolve(op["run"], refresh=kind == "open")
        if kind == "open":
            if run.status != S.STATUS_RUNNING:
                client.update_run(run.run_id, status=S.STATUS_RUNNING)
                run.status = S.STATUS_RUNNING
            self._set_tags(run, {**op["tags"], S.TAG_STATUS: S.STATUS_RUNNING})
            if S.TAG_STOP_REASON in run.tags:
                client.delete_tag(run.run_id, S.TAG_STOP_REASON)
                del run.tags[S.TAG_STOP_REASON]
        elif kind == "params":
            new = {}
            for k, v in op["params"].items():
                if k not in run.params:
                    new[k] = v
                elif run.params[k] != v:
                    log.warning("param %s of %s already %r, not changed to %r", k, op["run"],
                                run.params[k], v)
            items = list(new.items())
            for i in range(0, len(items), 100):
                client.log_batch(run.run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
                run.params.update(items[i:i + 100])
        elif kind == "metrics":
            todo = [m for m in op["metrics"] if (m[0], m[2]) not in run.logged]
            for i in range(0, len(todo), 1000):
                chunk = todo[i:i + 1000]
                client.log_batch(run.run_id, metrics=[Metric(k, v, t, s) for k, v, s, t in chunk])
                run.logged.update((m[0], m[2]) for m in chunk)
        elif kind == "nonfinite":
            old = S.parse_nonfinite(run.tags.get(S.TAG_NONFINITE))
            self._set_tags(run, {S.TAG_NONFINITE: S.format_nonfinite(
                old + [(k, s) for k, s in op["entries"]])})
        elif kind == "text":
            client.log_text(run.run_id, op["text"], op["file"])
        elif kind == "end":
            tags = {S.TAG_STATUS: op["status"]}
            if op["reason"] is not None:
                tags[S.TAG_STOP_REASON] = op["reason"]
            self._set_tags(run, tags)
            client.set_terminated(run.run_id, status=op["status"])
            run.status = op["status"]

    def _set_tags(self, run: _Run, tags: Mapping[str, Any]) -> None:
        items = [(S.mlflow_key(k), str(v)[:S.MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]
        items = [(k, v) for k, v in items if run.tags.get(k) != v]
        for i in range(0, len(items), 100):
            self._client.log_batch(run.run_id, tags=[RunTag(k, v) for k, v in items[i:i + 100]])
            run.tags.update(items[i:i + 100])

    # --- runs --------------------------------------------------------------------------------
    def _resolve(self, key: str, refresh: bool = False) -> _Run:
        """Return the run of a queue key, finding it by tags or creating it; cached."""
        run = self._runs.get(key)
        if run is not None and not (refresh or run.stale):
            return run
        if run is not None:
            found = self._client.get_run(run.run_id)
        else:
            role = S.ROLE_STUDY if key == _STUDY else S.ROLE_TRIAL
            filt = self._study_filter(role)
            trial_id = None if key == _STUDY else key.split(":", 1)[1]
            if trial_id is not None:
                filt += f" AND tags.`{S.TAG_TRIAL_ID}` = '{trial_id}'"
            hits = self._client.search_runs([self._get_experiment_id()], filt, max_results=1,
                                            order_by=["attributes.start_time ASC"])
            found = hits[0] if hits else None
            if found is None:
                tags = {S.TAG_STUDY: self.study_name, S.TAG_ROLE: role}
                if trial_id is not None:
                    tags.update({S.TAG_TRIAL_ID: trial_id,
                                 S.TAG_PARENT_RUN_ID: self._resolve(_STUDY).run_id})
                created = self._client.create_run(self._get_experiment_id(), tags=tags,
                                                  run_name=trial_id or self.study_name)
                run = _Run(created.info.run_id, created.info.status, tags=dict(created.data.tags))
                self._runs[key] = run
                return run
        run = _Run(found.info.run_id, found.info.status, dict(found.data.params),
                   dict(found.data.tags))
        for metric_key in found.data.metrics:
            run.logged.update((metric_key, m.step) for m in
                              self._client.get_metric_history(run.run_id, metric_key))
        self._runs[key] = run
        return run

    def _study_filter(self, role: str) -> str:
        return f"tags.`{S.TAG_STUDY}` = '{self.study_name}' AND tags.`{S.TAG_ROLE}` = '{role}'"

    def _get_experiment_id(self) -> str:
        """The study's experiment, created with :attr:`_experiment_tags`, or found (restored
        if deleted) and given those of them it lacks."""
        if self._experiment_id is None:
            exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self._client.create_experiment(
                        self.experiment_name, artifact_location=self._artifact_location,
                        tags=self._experiment_tags)
                    return self._experiment_id
                except MlflowException as err:  # created concurrently by another tracker
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    exp = self._client.get_experiment_by_name(self.experiment_name)
            if exp.lifecycle_stage == "deleted":
                self._client.restore_experiment(exp.experiment_id)
            for key, value in self._experiment_tags.items():
                if not exp.tags.get(key):  # set once: a resumed study keeps what it has
                    self._client.set_experiment_tag(exp.experiment_id, key, value)
            self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _local_artifact_location(self) -> str | None:
        """Artifacts of a local sqlite store go beside the database, not into the cwd."""
        return S.local_artifact_location(self.tracking_uri, self.experiment_name)

    def _probe(self, timeout_s: float) -> bool:
        """True when an http(s) server answers ``/health`` (always True for local stores)."""
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

    # --- write-ahead file --------------------------------------------------------------------
    def _load_wal(self) -> None:
        if not self._wal.exists():
            return
        for line in self._wal.read_text(encoding="utf-8").splitlines():
            try:
                op = json.loads(line)
            except json.JSONDecodeError:  # torn last line of a killed driver
                continue
            self._queue.append(op)
            self._seq = max(self._seq, int(op.get("seq", 0)))
        if self._queue:
            log.info("replaying %d queued MLflow writes from %s", len(self._queue), self._wal)

    def _rewrite_wal(self) -> None:
        if self._wal is None:
            return
        if not self._queue:
            self._wal.unlink(missing_ok=True)
            return
        tmp = self._wal.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op) + "\n" for op in self._queue), encoding="utf-8")
        os.replace(tmp, self._wal)


class MLflowTrialCallback(Callback):
    """Ray Tune callback: one child run per trial, per-epoch metrics, end status.

    Args:
        tracker: The study's tracker (its parent run should be started already).
        render_config: Turns a trial's config into the text logged as ``config.yaml``;
            default: YAML of ``trial.config``.
    """

    _SKIP = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "epoch", "experiment_tag",
                                     "should_checkpoint", "stop_reason"}

    def __init__(self, tracker: StudyTracker,
                 render_config: Callable[[dict], str | None] | None = None,
                 resolve_params: Callable[[dict], Mapping[str, Any]] | None = None,
                 stop_reason: Callable[[Any], str | None] | None = None) -> None:
        self.tracker = tracker
        self.render_config = render_config or _yaml_or_none
        self.resolve_params = resolve_params
        self.stop_reason = stop_reason

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = dict(self.resolve_params(trial.config)) if self.resolve_params \
            else dict(trial.config)
        self.tracker.trial_run(trial.trial_id, flatten_params(params),
                               self.render_config(trial.config),
                               tags={S.TAG_RUN_NAME: str(trial)})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        metrics = {k: v for k, v in result.items() if k not in self._SKIP
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = result.get("epoch", result.get("training_iteration", 0))
        self.tracker.log_epoch(trial.trial_id, metrics, int(step))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = (trial.last_result or {}).get("stop_reason") or (
            self.stop_reason(trial) if self.stop_reason else None)
        self.tracker.end_trial(trial.trial_id, S.STATUS_FINISHED,
                               None if reason is None else str(reason))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tracker.end_trial(trial.trial_id, S.STATUS_FAILED, _trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.tracker.flush()


def _trial_error(trial: Any) -> str:
    """The last line of the trial's error (``RuntimeError: boom``), a groupable stop reason.

    Read from the driver-side error file (written before on_trial_error); the full traceback
    stays in Ray's trial directory.
    """
    try:
        path = getattr(trial, "error_file", None)
        error = Path(path).read_text(errors="replace") if path and os.path.exists(path) \
            else trial.get_error()
    except Exception:  # noqa: BLE001 - the error text is best effort
        error = None
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error or "")).splitlines()
             if ln.strip()]
    return lines[-1].strip()[:S.MAX_TAG_VALUE_LENGTH] if lines else "trial errored"


def _yaml_or_none(config: dict) -> str | None:
    try:
        import yaml

        return yaml.safe_dump(dict(config), sort_keys=True)
    except Exception:  # noqa: BLE001 - configs with objects in them are not YAML
        return None
