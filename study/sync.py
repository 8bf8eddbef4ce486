"""Make a study's MLflow view whole from its record: ``jepa-study sync STUDY``.

The record is Tune's experiment directory and Optuna's storage; MLflow is a view of it, kept
live by the Tune callback and made whole here at any time: one child run per trial, each
(key, step) once, params and config once, true statuses, the parent's summary. Sync only adds
what is missing and corrects what is wrong, so a second run changes nothing. Tune's state is
read through its public ``ExperimentAnalysis``; each trial's results from its ``result.json``,
row by row (see ``docs/record.md`` for why, and for the whole design).
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric

from analysis import schema as S
from study.study import Study, StudyError
from study.tracking import StudyTracker, TrackedRun, metric_entries
from study.trial import trial_dir

log = logging.getLogger(__name__)
#: Tune's statuses of a trial that has ended, as MLflow run statuses
ENDED = {"TERMINATED": S.STATUS_FINISHED, "ERROR": S.STATUS_FAILED}
#: Tune's experiment-level state files, and how each is written (``search_gen_state-*.json``
#: is a pickle, whatever its name says)
STATE_FILE = "experiment_state-*.json"
TUNE_STATE_FILES = {STATE_FILE: "json", "search_gen_state-*.json": "pickle",
                    "searcher-state-*.pkl": "pickle", "callback-states-*.pkl": "pickle"}
#: Tune's bookkeeping in a result, besides Ray's ``AUTO_RESULT_KEYS``: not metrics
_BOOKKEEPING = {"done", "trial_id", "epoch", "experiment_tag", "should_checkpoint"}


@dataclass
class TrialRecord:
    """One trial as Tune recorded it (``status`` ``UNKNOWN``: reported before Tune saved it)."""

    trial_id: str
    name: str
    status: str
    config: dict[str, Any]
    results: list[dict[str, Any]]
    error: str | None = None

    @property
    def last_result(self) -> dict[str, Any]:
        return self.results[-1] if self.results else {}


@dataclass
class SyncReport:
    """What a sync changed: trial ids whose run it created, rebuilt (a point held twice),
    ended, or found left RUNNING and ended KILLED; points logged; duplicate runs merged."""

    trials: int = 0
    created: list[str] = field(default_factory=list)
    logged: int = 0
    merged: int = 0
    rebuilt: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the record ----------------------------------------------------------------------------------

def read_trials(experiment: Path) -> list[TrialRecord]:
    """Every trial of the Tune experiment in ``experiment``: those in Tune's saved state, then
    those that reported before Tune first saved them, read from their directories alone."""
    trials: dict[str, TrialRecord] = {}
    if any(experiment.glob(STATE_FILE)):
        for t in _analysis(experiment).trials:
            trials[t.trial_id] = TrialRecord(
                t.trial_id, str(t), t.status, dict(t.config or {}), _results(Path(t.path)),
                trial_error(t) if t.status == "ERROR" else None)
    for path in sorted(experiment.glob("*/result.json")):
        results = _results(path.parent)
        trial_id = str(results[0].get("trial_id", "")) if results else ""
        if trial_id and trial_id not in trials:  # Tune's saved state does not know it yet
            name = path.parent.name.split(f"_{trial_id}")[0] + f"_{trial_id}"
            trials[trial_id] = TrialRecord(trial_id, name, "UNKNOWN",
                                           dict(results[0].get("config") or {}), results)
    return list(trials.values())


def _analysis(experiment: Path, attempts: int = 5):
    """Tune's ``ExperimentAnalysis``, tried again while a live driver copies a state file; a
    state file still unreadable after that is put back (:func:`repair_tune_state`) or named."""
    from ray.tune import ExperimentAnalysis

    for attempt in range(attempts):
        try:
            return ExperimentAnalysis(str(experiment))
        except Exception:  # noqa: BLE001 - re-raised on the last attempt
            if attempt < attempts - 1:
                time.sleep(0.5)
                continue
            newest = max(experiment.glob(STATE_FILE), default=None)  # the one Tune reads
            if newest is None or _whole(newest, "json"):
                raise
            repair_tune_state(experiment)
            if not _whole(newest, "json"):
                raise StudyError(
                    f"Tune's state file {newest} is cut short (its driver was killed while "
                    f"Tune copied it) and no whole copy of it is left under {_ray_temp()} "
                    "on this machine; once it is deleted, the study is read from the state "
                    "file Tune saved before it, or from each trial's result.json") from None
    return ExperimentAnalysis(str(experiment))


def repair_tune_state(experiment: Path) -> list[str]:
    """Puts back the Tune state files a killed driver left unreadable; returns their names.

    Tune writes its state into the driver's staging directory, inside Ray's session directory,
    then copies it into the study on a thread, file by file and not atomically: a driver killed
    during the copy leaves ``experiment_state-*.json`` (and the searcher's files) empty or cut
    short, and neither ``sync`` nor ``Tuner.restore`` can read the study any more. The staging
    copy, whole before the copy began, is still in the killed session's directory on this
    machine (Ray's sessions sit side by side): the newest readable one is put back, atomically.
    A damaged file with no readable staging copy is left as it is.
    """
    sessions = _ray_temp()
    repaired = []
    for pattern, kind in TUNE_STATE_FILES.items():
        for path in experiment.glob(pattern):
            if _whole(path, kind):
                continue
            staged = sorted(sessions.glob(f"session_*/artifacts/*/{experiment.name}/"
                                          f"driver_artifacts/{path.name}"),
                            key=lambda p: p.stat().st_mtime)
            good = next((p for p in reversed(staged) if _whole(p, kind)), None)
            if good is not None:
                tmp = path.with_name(f".{path.name}.repair")
                shutil.copyfile(good, tmp)
                tmp.replace(path)
                repaired.append(path.name)
    if repaired:
        log.warning("Tune's state files %s in %s were cut short by a killed driver: put back "
                    "from its staging copies", repaired, experiment)
    return repaired


def _ray_temp() -> Path:
    """Where Ray keeps its sessions on this machine: the running one's, else Ray's default
    (``$RAY_TMPDIR/ray``, ``/tmp/ray``)."""
    from ray._common.utils import get_default_ray_temp_dir  # pinned: ray>=2.60,<2.61
    from ray._private import worker

    node = worker._global_node
    return Path(node.get_session_dir_path()).parent if node is not None \
        else Path(get_default_ray_temp_dir())


def _whole(path: Path, kind: str) -> bool:
    """Whether a Tune state file is whole: JSON that parses, or a pickle whose opcodes run to
    its STOP (read, not executed: unpickling the searcher would open its storage)."""
    import pickletools

    try:
        data = path.read_bytes()
        if kind == "json":
            json.loads(data)
        else:
            *_, (last, _, _) = pickletools.genops(data)
            if last.name != "STOP":
                return False
        return True
    except Exception:  # noqa: BLE001 - cut short, empty, or not there
        return False


def _results(trial_path: Path) -> list[dict[str, Any]]:
    path, rows = trial_path / "result.json", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the torn last line of a killed driver
            continue
    return rows


def stop_file(study_dir: str | Path, trial_id: str) -> Path:
    """Why the collapse guard stopped a trial (written by ``study.tuner.CollapseStopper``)."""
    return Path(study_dir) / "stops" / f"{trial_id}.txt"


def stop_reason(study_dir: str | Path, max_epochs: int, trial: Any) -> str:
    """Why a trial that ended without error ended: the collapse guard (its marker file), the
    loop's own end (budget, patience), or the scheduler (ASHA)."""
    marker, result = stop_file(study_dir, trial.trial_id), trial.last_result or {}
    if marker.exists():
        return marker.read_text()
    if result.get("end_reason"):
        return str(result["end_reason"])
    epoch = result.get("epoch")
    if epoch is not None and epoch < max_epochs:
        return f"early_stopped: scheduler stopped the trial after epoch {epoch}"
    return "completed"


def trial_error(trial: Any) -> str:
    """The last line of a failed trial's error (``RuntimeError: boom``: a stop reason that
    groups), from the driver's copy while it runs, else from the stored one."""
    text = None
    for read in (lambda: Path(trial.error_file).read_text(errors="replace"), trial.get_error):
        try:
            text = text or read()
        except Exception:  # noqa: BLE001 - no such copy: try the next
            continue
    lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(text or "")).splitlines()
             if ln.strip()]
    return lines[-1].strip()[:S.MAX_TAG_VALUE_LENGTH] if lines else "trial errored"


# -- what the view shows of the record -------------------------------------------------------

def open_study(study: Study) -> TrackedRun:
    """The parent run, found or created, with the study's params, tags and space, and RUNNING:
    a driver runs the study (again, on resume)."""
    parent = study.tracker().run()
    _fill_parent(study, parent)
    study.tracker().reopen(parent)
    return parent


def _fill_parent(study: Study, parent: TrackedRun) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    o, space = study.options, study.space
    params = {S.PARAM_SPACE: space.name, S.PARAM_NUM_SAMPLES: study.num_samples,
              S.PARAM_DATA: study.data_dir,
              S.PARAM_SEED: getattr(space.searcher_spec, "seed", None),
              S.PARAM_NUM_WORKERS: o.num_workers, S.PARAM_GPUS_PER_WORKER: o.gpus_per_worker,
              **{S.version_param(p): installed(p) for p in ("ray", "optuna", "mlflow", "torch")},
              S.PARAM_PYTHON: platform.python_version()}
    tags = {S.TAG_GIT_COMMIT: study.git_commit, S.TAG_ROLE: S.ROLE_STUDY,
            S.TAG_STUDY_DIR: str(study.dir), S.TAG_STUDY: study.name}
    study.tracker().fill(parent, params, tags, {S.ARTIFACT_SPACE: study.space_file.read_text()})


@dataclass
class TrialWriter:
    """Writes a trial's child run from Tune's record of the trial: the live Tune callback with
    what each event brings, :func:`sync` with the whole record. One path, so that the live
    view and a rebuilt one are the same.

    Args:
        tracker: The study's tracker.
        study_dir: The study's directory (stop reasons, per-query figures).
        max_epochs: The space's epoch budget (a trial ended before it was stopped early).
        trial_config: Tune config -> the trial's ``RunConfig`` (None: the Tune config).
    """

    tracker: StudyTracker
    study_dir: str
    max_epochs: int
    trial_config: Callable[[dict], Any] | None = None

    @classmethod
    def of(cls, study: Study) -> "TrialWriter":
        return cls(study.tracker(), str(study.dir), study.max_epochs, study.trial_config)

    def write(self, trial: TrialRecord, run: TrackedRun | None = None, *, live: bool = True,
              leftover: tuple[str, str] = (S.STATUS_KILLED, S.STOP_REASON_ORPHANED),
              report: SyncReport | None = None) -> TrackedRun | None:
        """Makes the run of ``trial`` (``run``, else found or created) show it: params and
        config once, its results' points (each (key, step) once), the per-query figures of an
        ended trial, and its status. ``live``: a driver runs the study, so a RUNNING trial's
        run is RUNNING; otherwise a run left RUNNING ends with ``leftover``. Returns the run,
        or None for a trial that never started and has none."""
        tracker, report = self.tracker, report if report is not None else SyncReport()
        if run is None:
            running = live and trial.status == "RUNNING"
            if not (trial.results or trial.status in ENDED or running):
                return None  # never started: nothing to show
            run = tracker.run(trial.trial_id)
            report.created.append(trial.trial_id)
        params, text = self._fields(trial.config) if not run.params else (None, None)
        tracker.fill(run, params, {S.TAG_PARENT_RUN_ID: tracker.run().run_id,
                                   S.TAG_RUN_NAME: trial.name}, {S.ARTIFACT_CONFIG: text})
        report.logged += _log_results(tracker, run, trial.results)
        if trial.status in ENDED or not live:
            _log_per_query(tracker, run, trial_dir(self.study_dir, trial.trial_id))
        if trial.status in ENDED:
            want = ENDED[trial.status]
            if run.status != want or S.TAG_STOP_REASON not in run.tags:
                reason = trial.error if trial.status == "ERROR" else \
                    stop_reason(self.study_dir, self.max_epochs, trial)
                tracker.end(run, want, reason)
                report.ended.append(trial.trial_id)
        elif live and trial.status == "RUNNING":
            tracker.reopen(run)
        elif not live and run.status == S.STATUS_RUNNING:
            tracker.end(run, *leftover)
            report.orphaned.append(trial.trial_id)
        return run

    def _fields(self, config: dict[str, Any]) -> tuple[dict, str]:
        """A trial's params (its run config flattened, and its searched values under
        ``search.``) and its config as YAML: the view's own copy of the run config, built
        from the record (the trial's Tune config) when the run has no params yet."""
        if self.trial_config is None:
            import yaml

            return dict(config), yaml.safe_dump(dict(config), sort_keys=True)
        from trainables.config import flatten

        cfg = self.trial_config(config)
        return ({**flatten(cfg.to_dict()), **{S.search_key(k): v for k, v in config.items()}},
                cfg.to_yaml())


# -- sync ------------------------------------------------------------------------------------------

def sync(study: Study, *, trials: list[TrialRecord] | None = None, live: bool | None = None,
         ending: tuple[str, str | None] | None = None) -> SyncReport:
    """Makes the MLflow view of ``study`` whole from its record.

    Args:
        trials: Tune's record of the trials, if read already (:func:`read_trials`).
        live: Whether a driver runs the study (default: whether one holds its lock): the runs
            of its unfinished trials stay RUNNING.
        ending: ``(status, reason)`` of a driver that stops the study: the parent's; every
            run left RUNNING ends KILLED with that reason. Default: the parent FINISHED once
            the study has its summary; runs left RUNNING by a driver that is gone KILLED as
            orphaned.
    """
    tracker = study.tracker()
    live = study.live if live is None else live
    tracker.forget()
    trials = read_trials(study.experiment_dir) if trials is None else trials
    report = SyncReport(trials=len(trials))
    found = _study_runs(tracker)
    parent = _one_run(tracker, None, found.pop(None, []), report) or tracker.run()
    _fill_parent(study, parent)
    writer = TrialWriter.of(study)
    leftover = (S.STATUS_KILLED, (ending and ending[1]) or S.STOP_REASON_ORPHANED)
    statuses: dict[str, int] = {}
    for trial in trials:
        run = writer.write(trial, _one_run(tracker, trial.trial_id,
                                           found.pop(trial.trial_id, []), report),
                           live=live, leftover=leftover, report=report)
        if run is not None:
            statuses[run.status] = statuses.get(run.status, 0) + 1
    for trial_id, runs in found.items():  # runs of trials Tune lost with a killed driver
        run = _one_run(tracker, trial_id, runs, report)
        tracker.set_tags(run, {S.TAG_PARENT_RUN_ID: parent.run_id})
        if run.status == S.STATUS_RUNNING and not live:
            tracker.end(run, *leftover)
            report.orphaned.append(trial_id)
        statuses[run.status] = statuses.get(run.status, 0) + 1
    _summarize(study, parent, trials, statuses)
    if ending is not None:
        tracker.end(parent, *ending)
    elif not live and (study.dir / "summary.json").exists():
        tracker.end(parent, S.STATUS_FINISHED, None)
    elif not live and parent.status == S.STATUS_RUNNING:
        tracker.end(parent, S.STATUS_KILLED, S.STOP_REASON_ORPHANED)
    return report


def _study_runs(tracker: StudyTracker) -> dict[str | None, list]:
    """The study's active runs, oldest first, by trial id (None: the parent)."""
    client, runs, token = tracker.client, {}, None
    while True:
        page = client.search_runs([tracker.experiment_id()],
                                  f"tags.`{S.TAG_STUDY}` = '{tracker.study_name}'",
                                  max_results=1000, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        for run in page:
            role = run.data.tags.get(S.TAG_ROLE)
            if role == S.ROLE_STUDY:
                runs.setdefault(None, []).append(run)
            elif role == S.ROLE_TRIAL and run.data.tags.get(S.TAG_TRIAL_ID):
                runs.setdefault(run.data.tags[S.TAG_TRIAL_ID], []).append(run)
        token = page.token
        if not token:
            return runs


def _one_run(tracker: StudyTracker, key: str | None, runs: list,
             report: SyncReport) -> TrackedRun | None:
    """The oldest of ``runs`` (those of one trial; ``key`` None: the parent), rebuilt if it
    holds a (key, step) twice, with the others merged into it and deleted; None if none."""
    if not runs:
        return None
    run = tracker.adopt(key, runs[0])
    points = tracker.history(run)
    if any(len(ms) > 1 for ms in points.values()):
        run = _rebuild(tracker, key, run, points)
        report.rebuilt.append(key or "study")
    for other in runs[1:]:
        extra = TrackedRun.of(other)
        tracker.log_metrics(run, [ms[0] for ms in tracker.history(extra).values()])
        tracker.fill(run, extra.params, {}, {})
        tracker.client.delete_run(extra.run_id)
        report.merged += 1
    return run


def _rebuild(tracker: StudyTracker, key: str | None, run: TrackedRun,
             points: dict[tuple[str, int], list[Metric]]) -> TrackedRun:
    """A new run in place of ``run``: its tags, params, artifacts, status and the first point
    of each (key, step); ``run`` is deleted."""
    client = tracker.client
    tags = {k: v for k, v in run.tags.items()
            if not k.startswith("mlflow.") or k in (S.TAG_PARENT_RUN_ID, S.TAG_RUN_NAME)}
    fresh = tracker.adopt(key, client.create_run(tracker.experiment_id(), tags=tags))
    fresh.logged = set()
    tracker.fill(fresh, run.params, {}, {})
    tracker.log_metrics(fresh, [min(ms, key=lambda m: m.timestamp) for ms in points.values()])
    with tempfile.TemporaryDirectory() as tmp:
        if client.list_artifacts(run.run_id):
            client.log_artifacts(fresh.run_id, client.download_artifacts(run.run_id, "", tmp))
    if run.status != S.STATUS_RUNNING:
        tracker.end(fresh, run.status, run.tags.get(S.TAG_STOP_REASON))
    client.delete_run(run.run_id)
    return fresh


def _log_results(tracker: StudyTracker, run: TrackedRun, results: list[dict]) -> int:
    from ray.tune.result import AUTO_RESULT_KEYS

    points, nonfinite = [], []
    for result in results:  # the step: the epoch, else Tune's iteration
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        finite, bad = metric_entries({k: v for k, v in result.items()
                                      if k not in _BOOKKEEPING and k not in AUTO_RESULT_KEYS})
        stamp = int(float(result.get("timestamp") or time.time()) * 1000)
        points += [Metric(k, v, stamp, step) for k, v in finite.items()]
        nonfinite += [(k, step) for k in bad]
    logged = tracker.log_metrics(run, points)
    tracker.note_nonfinite(run, nonfinite)
    return logged


def _log_per_query(tracker: StudyTracker, run: TrackedRun, trial_path: Path) -> None:
    """The test figures the study scored from the trial's kept best epoch
    (``per_query.json``, see ``study.scoring``): its means on all, seen and unseen queries as
    ``best_test_*`` metrics at that epoch's step, and the file as the run's artifact, logged
    again only when a later best epoch replaced it."""
    path = trial_path / S.ARTIFACT_PER_QUERY
    if not path.exists():
        return
    scored = json.loads(path.read_text())
    epoch = str(scored.get("best_epoch"))
    finite, _ = metric_entries({"best_" + k: v for k, v in scored.get("metrics", {}).items()})
    stamp = int(path.stat().st_mtime * 1000)
    tracker.log_metrics(run, [Metric(k, v, stamp, int(scored.get("best_epoch") or 0))
                              for k, v in finite.items()])
    if run.tags.get(S.TAG_PER_QUERY_EPOCH) != epoch:
        tracker.client.log_artifact(run.run_id, str(path))
        tracker.set_tags(run, {S.TAG_PER_QUERY_EPOCH: epoch})


def _summarize(study: Study, parent: TrackedRun, trials: list[TrialRecord],
               statuses: dict[str, int]) -> None:
    """The parent's summary tags (the best trial, the trials by status), and the reference
    rows the study scored (``references.json``) as its ``reference.<row>.<figure>`` metrics
    and its artifact."""
    tracker, summary = study.tracker(), study.summary(trials)
    tags = {S.count_tag("runs", s): statuses.get(s, 0)
            for s in (S.STATUS_RUNNING, *S.END_STATUSES)}
    tags.update({S.count_tag("optuna", s): summary["optuna_trials"].get(s, 0)
                 for s in ("COMPLETE", "FAIL", "PRUNED", "RUNNING", "WAITING")})
    if summary["best"]:
        tags.update({S.TAG_BEST_TRIAL: summary["best"]["trial_id"],
                     S.TAG_BEST_VALUE: summary["best"][summary["metric"]]})
    tracker.set_tags(parent, tags)
    path = study.dir / S.ARTIFACT_REFERENCES
    if not path.exists():
        return
    rows = json.loads(path.read_text())["rows"]
    finite, _ = metric_entries({S.reference_key(row, k): v for row, figures in rows.items()
                                for k, v in figures.items()})
    if not set(finite) <= parent.metric_keys:
        stamp = int(path.stat().st_mtime * 1000)
        tracker.log_metrics(parent, [Metric(k, v, stamp, 0) for k, v in finite.items()])
        tracker.client.log_artifact(parent.run_id, str(path))
