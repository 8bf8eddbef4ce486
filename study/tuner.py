"""The Ray Tune side of a study: the Tuner built from a study (trainable, searcher, scheduler,
stopper, callbacks, console table) or restored, and :func:`fit`, which tells whether Ctrl-C
stopped it. Tune's JSON result files, written by a callback here, are the study's record of
every result."""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import ray
from ray import tune
from ray.tune import Callback, Stopper
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from analysis import schema as S
from search_spaces.searcher import build_searcher
from study.study import Study
from study.sync import TrialRecord, TrialWriter, stop_file, trial_error
from study.trial import CheckpointGuard, ReleaseTrainGroups, make_trainable

log = logging.getLogger(__name__)

#: Checkpoints each trial keeps in Tune's storage (Tune keeps every one by default); the
#: newest two, so that a trial falls back to the older one when the newest is damaged
KEEP_TUNE_CHECKPOINTS = 2


def make_tuner(study: Study, shared: dict[str, Any], resume: bool) -> tune.Tuner:
    """The study's Tuner: Tune's saved experiment when resuming one, else a new one.

    ``shared``: the loop's inputs every trial shares (``data``, ``features``: object refs)."""
    trial, space, o = study.trial_spec(), study.space, study.options
    trainable = tune.with_resources(make_trainable(trial, study.trial_config, shared),
                                    trial.resources())
    if resume and tune.Tuner.can_restore(str(study.experiment_dir)):
        # the callbacks come back from Tune's saved state: the MLflow writer pickles its
        # settings only and opens its own client
        return tune.Tuner.restore(str(study.experiment_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    total = ray.cluster_resources()
    single = len(study.objectives) == 1
    scheduler = FIFOScheduler() if space.scheduler.kind != "asha" else ASHAScheduler(
        time_attr="epoch", max_t=space.scheduler.max_t or study.max_epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor)
    guard = space.collapse_guard
    return tune.Tuner(
        trainable,
        # reuse_actors: a new trial takes over a finished trial's process, with torch and the
        # trainables already imported; every trial seeds its own RNGs and sets its thread
        # count, so nothing else carries over. Direct trials only: the actor of a Train trial
        # Tune stopped is still inside TorchTrainer.fit, and Tune fails the trial given it.
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(space, study.optuna_url, study.name), scheduler=scheduler,
            metric=space.metric if single else None, mode=space.mode if single else None,
            num_samples=study.num_samples, reuse_actors=trial.execution == "direct",
            max_concurrent_trials=o.max_concurrent_trials or space.max_concurrent_trials
            or trial.max_concurrent(total.get("CPU", 1), total.get("GPU", 0))),
        run_config=tune.RunConfig(
            name=study.name, storage_path=str(study.dir / "ray"), verbose=o.verbose,
            stop=guard and CollapseStopper(str(study.dir), guard.metric,
                                           guard.min_effective_rank),
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback(), ReleaseTrainGroups(),
                       CheckpointGuard(study.dir), MLflowTrialCallback(TrialWriter.of(study))],
            failure_config=tune.FailureConfig(max_failures=o.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_TUNE_CHECKPOINTS),
            progress_reporter=progress_reporter(space)))


def fit(tuner: tune.Tuner) -> bool:
    """Runs the Tuner to the end; True when a SIGINT (Ctrl-C, or the command line's SIGTERM)
    stopped it instead: Tune then saved its state, stopped the trials and returned."""
    # Tune's JSON and CSV result files are passed as callbacks, not its TensorBoard logger
    # (MLflow is the study's tracker, and that logger imports tensorboardX); the classic
    # console table takes chosen columns. Tune reads both switches inside ``fit``; they are
    # put back afterwards (other Tune users in this process see what they saw before).
    switches = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}
    before = {key: os.environ.get(key) for key in switches}
    os.environ.update(switches)
    try:
        with _InterruptWatch() as watch:
            tuner.fit()
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return watch.interrupted


class MLflowTrialCallback(Callback):
    """Keeps each trial's MLflow child run live: hands what each Tune event brings (the trial's
    config, a result, its end) to ``study.sync``'s :class:`TrialWriter`, the writer sync uses.

    The writes run on a thread of their own, in order: a function trainable's report waits
    until the driver has handled it, so a write made here would hold every trial up each
    epoch. :meth:`flush` waits for them; the end of the experiment does. MLflow is a view:
    when a write fails (after MLflow's own retries) the callback warns once, skips writes
    until the server answers again (asked at most every :attr:`RETRY_S` seconds), and the
    study goes on; ``study.sync`` fills in what was missed.
    """

    RETRY_S = 5.0

    def __init__(self, writer: TrialWriter) -> None:
        self.writer, self.tracker = writer, writer.tracker
        self._retry_at: float | None = None  # while MLflow is unreachable
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:
        return {"writer": self.writer}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put(trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._put(trial, "RUNNING", result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put(trial, "TERMINATED", trial.last_result)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._put(trial, "ERROR", trial.last_result, trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()

    def flush(self) -> None:
        """Waits until every write asked for so far is done (or skipped)."""
        self._queue.join()

    def _put(self, trial: Any, status: str, result: dict | None = None,
             error: str | None = None) -> None:
        """Queues the trial as Tune has it now (Tune's trial changes), with ``result``."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="jepa-study-mlflow",
                                            daemon=True)
            self._thread.start()
        self._queue.put(TrialRecord(trial.trial_id, str(trial), status, dict(trial.config or {}),
                                    [dict(result)] if result else [], error))

    def _work(self) -> None:
        while True:
            record = self._queue.get()
            try:
                self._write(record)
            finally:
                self._queue.task_done()

    def _write(self, trial: TrialRecord) -> None:
        if self._retry_at is not None:
            now = time.monotonic()
            if now < self._retry_at:
                return
            if not self.tracker.reachable():
                self._retry_at = now + self.RETRY_S
                return
            log.warning("MLflow %s answers again", self.tracker.tracking_uri)
            self._retry_at = None
        try:
            self.writer.write(trial)
        except Exception as err:  # noqa: BLE001 - a view's outage must not stop the study
            self.tracker.forget()  # what it knew of the runs may be stale now
            if self._retry_at is None:
                log.warning("MLflow %s: a write for trial %s failed (%s); the study goes on, "
                            "and `jepa-study sync` fills in what was missed when it ends",
                            self.tracker.tracking_uri, trial.trial_id,
                            (str(err).splitlines() or [type(err).__name__])[0][:200])
            self._retry_at = time.monotonic() + self.RETRY_S


class CollapseStopper(Stopper):
    """Ends a trial whose effective rank falls below a threshold, writing why to
    ``stops/<trial_id>.txt`` (``study.sync.stop_file``, read by ``stop_reason``)."""

    def __init__(self, study_dir: str, metric: str, minimum: float):
        self.study_dir, self.metric, self.minimum = study_dir, metric, minimum

    def __call__(self, trial_id: str, result: dict) -> bool:
        value = result.get(self.metric)
        if value is None or value >= self.minimum:
            return False
        marker = stop_file(self.study_dir, trial_id)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"collapse: {self.metric} {value:.3g} < {self.minimum:g} at epoch "
                          f"{result.get('epoch')}")
        return True

    def stop_all(self) -> bool:
        return False


def progress_reporter(space: Any) -> tune.CLIReporter:
    """Tune's console table of a study: epoch, dev figures, and the always-set parameters
    (a switch shown as ``<name> on``)."""
    from search_spaces.space import SWITCH

    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", "dev_ndcg_at_10": "dev nDCG@10",
                        S.SELECTION: "best dev", S.BEST_EPOCH: "best ep",
                        "effective_rank": "eff. rank"},
        parameter_columns={name: name.removesuffix(SWITCH).split(".")[-1]
                           + (" on" if name.endswith(SWITCH) else "")
                           for name in space.always_suggested()},
        sort_by_metric=isinstance(space.metric, str),
        max_report_frequency=15, print_intermediate_tables=True)


class _InterruptWatch:
    """Tells, once ``Tuner.fit`` has returned, whether Tune caught a SIGINT and stopped early:
    ``with _InterruptWatch() as watch: fit()``, then ``watch.interrupted``.

    On SIGINT Tune saves its state, stops the running trials (marking them TERMINATED, like
    finished ones) and returns instead of raising, so the result grid cannot tell. What does
    tell: Tune's handler, installed by ``fit``, puts back the handler it found when it fires,
    and only then. A sentinel handler installed here is therefore back in place when ``fit``
    returns exactly when Tune was interrupted. Off the main thread Tune catches no signal,
    and nothing is installed.
    """

    interrupted = False

    def __enter__(self) -> "_InterruptWatch":
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._sentinel)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            self.interrupted = signal.getsignal(signal.SIGINT) == self._sentinel
            signal.signal(signal.SIGINT, self._previous)

    @staticmethod
    def _sentinel(signum: int, frame: Any) -> None:  # Ctrl-C outside ``fit``: Python's default
        raise KeyboardInterrupt
