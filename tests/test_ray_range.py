"""What the code relies on in Ray beyond its documented API, checked in seconds without
starting Ray, so that a Ray upgrade fails here, naming what moved, instead of deep inside a
study. pyproject.toml pins Ray to the release these were checked on and lists them; the
end-to-end tests named with each check the behaviour itself.
"""

from __future__ import annotations

import signal
import threading
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pytest brings tomli there)
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_installed_ray_is_the_pinned_one():
    """pip enforces the pin at install time; this catches a Ray installed over it by hand
    (``pip install -U ray`` only warns)."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (ray,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    assert ray.specifier.contains(version("ray")), (
        f"Ray {version('ray')} is installed, the project is tested on {ray}: check what the "
        "comment by the pin in pyproject.toml lists, then move the pin")


def test_tune_gives_sigint_back_only_when_its_handler_fires():
    """``study.tuner._InterruptWatch`` tells a Ctrl-C from a normal end by this: Tune's SIGINT
    handler puts back the handler it found when it fires, and only then (end to end:
    tests/test_study.py::test_interrupt_watch_tells_tunes_sigint_from_a_normal_end)."""
    from ray.tune.tune import _setup_signal_catching

    assert threading.current_thread() is threading.main_thread()

    def sentinel(signum, frame):
        raise AssertionError("not Tune's")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, sentinel)
        interrupted = _setup_signal_catching()
        tunes = signal.getsignal(signal.SIGINT)
        assert tunes is not sentinel and not interrupted.is_set()
        tunes(signal.SIGINT, None)
        assert interrupted.is_set() and signal.getsignal(signal.SIGINT) is sentinel
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_tune_reads_the_switches_the_study_sets(monkeypatch):
    """``study.launcher`` sets TUNE_GLOBAL_CHECKPOINT_S=1 (the record at most a second old);
    ``study.tuner.fit`` sets TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 (no TensorBoard logger:
    it imports tensorboardX) and RAY_AIR_NEW_OUTPUT=0 (the classic CLIReporter table)."""
    from ray.air.constants import AIR_ENV_VARS
    from ray.tune.constants import TUNE_ENV_VARS
    from ray.tune.experimental.output import get_air_verbosity
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks

    assert {"TUNE_GLOBAL_CHECKPOINT_S", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"} <= TUNE_ENV_VARS
    assert "RAY_AIR_NEW_OUTPUT" in AIR_ENV_VARS
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    assert get_air_verbosity(1) is None
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    assert get_air_verbosity(1) is not None

    def loggers() -> list[str]:
        return sorted(type(c).__name__ for c in _create_default_callbacks([])
                      if type(c).__name__.endswith("LoggerCallback"))

    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    assert loggers() == []
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    assert {CSVLoggerCallback.__name__, JsonLoggerCallback.__name__} <= set(loggers())


def test_the_trial_the_callbacks_and_sync_read():
    """The study's Tune callbacks and ``study.sync`` read a ``Trial``'s attributes, name a
    trial's MLflow run ``str(trial)`` (``<trainable>_<trial id>``) and find it again from its
    directory's name, which starts with that name; Tune's saved state is
    ``experiment_state-*.json``; a result's bookkeeping keys are ``AUTO_RESULT_KEYS``."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial
    from ray.tune.result import AUTO_RESULT_KEYS

    trial = Trial("jepa_trial_direct", config={"x": 1}, trial_id="7f3a2_00001", stub=True)
    assert str(trial) == "jepa_trial_direct_7f3a2_00001"
    trial.experiment_tag = "1_x=1"
    assert trial._generate_dirname().startswith(f"{trial}_")
    for name in ("trial_id", "config", "status", "last_result", "checkpoint", "path",
                 "error_file", "get_error"):
        assert hasattr(Trial, name) or name in vars(trial), f"Trial has no {name!r}"
    assert TuneController.CKPT_FILE_TMPL.format("x") == "experiment_state-x.json"
    assert {"training_iteration", "time_total_s", "timestamp"} <= set(AUTO_RESULT_KEYS)


def test_optuna_search_private_state():
    """``search_spaces.searcher.ResumableOptunaSearch`` uses OptunaSearch's ``_ot_study``,
    ``_ot_trials`` and ``_sampler`` (no public API lists a searcher's trials or reseeds it;
    end to end: tests/test_reliability.py)."""
    from search_spaces.searcher import build_searcher
    from search_spaces.space import load_space

    searcher = build_searcher(load_space("quick"))
    assert hasattr(searcher._ot_study, "get_trials") and hasattr(searcher._ot_study, "tell")
    assert isinstance(searcher._ot_trials, dict)
    assert callable(searcher._sampler.reseed_rng)


def test_train_v2_with_its_tune_bridge_and_placement_groups():
    """``study.trial``: Ray Train V2 (a TorchTrainer is no Tune trainable, so a trial drives
    one from a function trainable and reports through ``TuneReportCallback``), and the
    placement-group calls ``ReleaseTrainGroups`` makes (end to end:
    tests/test_study.py::test_train_mode_trials_tune_stops_free_their_workers)."""
    import ray
    import ray.util
    from ray.train.v2._internal.constants import is_v2_enabled
    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: F401
    from ray.util.placement_group import PlacementGroup

    assert is_v2_enabled()
    assert callable(ray.PlacementGroupID.from_hex) and callable(PlacementGroup)
    for name in ("get_current_placement_group", "placement_group_table",
                 "remove_placement_group"):
        assert callable(getattr(ray.util, name)), f"ray.util.{name}"


def test_private_names_the_tests_use():
    """tests/test_reliability.py reads Ray's security settings from ``ray._private``;
    tests/test_study.py renders the console table with Tune's private functions; the
    launcher puts back the SIGTERM handler ``ray.init`` replaces through ``ray._private``
    (end to end: tests/test_signals.py)."""
    import ray._private.utils
    import ray._private.worker
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray.tune import CLIReporter
    from ray.tune.progress_reporter import _best_trial_str, _trial_progress_table  # noqa: F401

    assert callable(is_token_auth_enabled)
    assert hasattr(ray._private.worker, "_global_node")
    assert callable(ray._private.utils.set_sigterm_handler)
    assert hasattr(CLIReporter(parameter_columns={"x": "x"}), "_parameter_columns")


def test_local_node_names_stop_ray_uses():
    """``study.launcher.stop_ray`` kills the autoscaler monitor of a Ray this process started
    before ``ray.shutdown()`` (which would wait a second for it on SIGTERM) through the node's
    table of processes by type (end to end: tests/test_study.py::test_stop_ray_stops_every_
    process_ray_started)."""
    import inspect

    from ray._private import node, ray_constants, worker

    assert ray_constants.PROCESS_TYPE_MONITOR == "monitor"
    assert hasattr(worker, "_global_node")
    init = inspect.getsource(node.Node.__init__)
    assert "self.head = head" in init and "self.all_processes" in init
    # a process already gone (the monitor) is skipped, not waited for
    assert "process.poll() is not None" in inspect.getsource(node.Node._kill_process_impl)


def test_where_tune_stages_its_state(monkeypatch):
    """``study.sync.repair_tune_state`` finds the whole staging copy of a state file a killed
    driver cut short at ``<Ray temp>/session_*/artifacts/<timestamp>/<experiment>/
    driver_artifacts/<file>``, Ray's temp directory being the running node's or, with no Ray
    started, Ray's default (``$RAY_TMPDIR/ray``) (end to end: tests/test_reliability.py::
    test_commands_put_back_tune_state_the_killed_driver_cut_short)."""
    import inspect

    from ray._common.utils import get_default_ray_temp_dir
    from ray._private import node
    from ray.train import constants
    from ray.train._internal.storage import StorageContext

    monkeypatch.setenv("RAY_TMPDIR", "/somewhere")
    assert get_default_ray_temp_dir() == "/somewhere/ray"
    assert callable(node.Node.get_session_dir_path)
    assert '"artifacts"' in inspect.getsource(constants._get_ray_train_session_dir)
    session = inspect.getsource(StorageContext._get_session_path)
    assert "_get_ray_train_session_dir(), self._timestamp, self.experiment_dir_name" in session
    staging = inspect.getsource(StorageContext.experiment_driver_staging_path.fget)
    assert '"driver_artifacts"' in staging
