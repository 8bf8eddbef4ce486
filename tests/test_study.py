"""The study end to end: real Ray Tune, Ray Train, Optuna and MLflow on SciFact (CPU, small).

Trials train only the heads over cached base features, so a trial costs seconds; the time
goes to Ray's start-up, which is why each test runs one small study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from mlflow_fixtures import free_port, mlflow_server  # noqa: F401
from study_helpers import (child_runs, live_descendants, metric_steps, optuna_states, parent_runs,
                           still_alive, tiny_space)

from analysis import schema as S
from search_spaces.space import SpaceError
from study import Study, StudyError, StudyOptions, launch, resume

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _opts(space: Path, storage: Path, scifact_dir: Path, **kw) -> StudyOptions:
    return StudyOptions(space=str(space), storage=str(storage), data=str(scifact_dir),
                        verbose=0, **kw)


@pytest.fixture
def stale_ray_address(monkeypatch):
    """Ray's file naming the cluster of the last ``ray start``, left behind pointing at nothing
    (a killed ``ray start`` or test cluster leaves it), in a Ray temp dir of this test's own."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    yield
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_quick_study_tracks_every_trial(tmp_path, scifact_dir, scifact_features,
                                        stale_ray_address, monkeypatch):
    # a local study starts a Ray of its own: it does not wait on the stale cluster
    import search_spaces.space as space_module

    space = tiny_space(tmp_path, "e2e", num_samples=4, epochs=2)
    loads, checks = _count(monkeypatch, space_module, "load_space"), \
        _count(monkeypatch, space_module, "_check_meaning")
    summary = launch(_opts(space, tmp_path / "studies", scifact_dir))
    # the space is loaded and validated once per launch (the driver's; trials unpickle it)
    assert (len(loads), len(checks)) == (1, 1), (loads, checks)
    study_dir = Path(summary["study_dir"])
    uri = Study.open(study_dir).mlflow_uri
    assert summary["trials"] == 4 and summary["errored"] == 0
    assert summary["best"]["dev_ndcg_at_10"] > 0.6

    (parent,) = parent_runs(uri, "e2e")
    children = child_runs(uri, "e2e")
    assert len(children) == 4
    assert {c.data.tags[S.TAG_PARENT_RUN_ID] for c in children} == {parent.info.run_id}
    assert len({c.data.tags[S.TAG_TRIAL_ID] for c in children}) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert metric_steps(uri, child.info.run_id) == [1, 2]
        # no epoch of a trial scores test; the study scored its top 10 (all 4) at its end
        assert "test_ndcg_at_10" not in child.data.metrics
        assert child.data.metrics["best_test_ndcg_at_10"] > 0.5
        assert child.data.params["model.freeze_base"] == "True"
        assert "config.yaml" in [a.path for a in MlflowClient(uri).list_artifacts(
            child.info.run_id)]
    assert parent.info.status == "FINISHED" and parent.data.params["ray_version"] == ray.__version__

    # the Optuna storage holds the same trials, with the same objective values
    assert optuna_states(study_dir) == {"COMPLETE": 4}
    import optuna

    ostudy = optuna.load_study(study_name="e2e", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    mlflow_best = max(c.data.metrics[S.SELECTION] for c in children)  # the space's metric
    assert ostudy.best_value == pytest.approx(mlflow_best)
    status = Study.open(study_dir).status()
    assert (status["optuna_trials"], status["requested"], status["finished"], status["live"]) \
        == ({"COMPLETE": 4}, 4, True, False)
    assert status["best"]["value"] == pytest.approx(ostudy.best_value)
    assert status == _status_command(study_dir)  # ... as the command finds it, quickly
    # the parent's summary, from the record
    assert parent_runs(uri, "e2e")[0].data.tags[S.TAG_BEST_TRIAL] == summary["best"]["trial_id"]
    assert parent_runs(uri, "e2e")[0].data.tags[S.count_tag("runs", "FINISHED")] == "4"


def _count(monkeypatch, module, name: str) -> list:
    """Records each call of ``module.name`` (called through the module, as the code does)."""
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[:1])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _in_fresh_interpreter(code: str, timeout: float = 60) -> tuple[str, set[str]]:
    """Runs ``code`` in a new Python process; returns what it printed and every module it
    imported."""
    code += "; import json, sys; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    printed, _, modules = out.stdout.rstrip("\n").rpartition("\n")
    return printed, set(json.loads(modules))


def _status_command(study_dir: Path) -> dict:
    """``jepa-study status`` in a fresh interpreter: on a finished study it reads the study's
    files only: neither the space nor Optuna nor any other heavy package is imported (its
    time is benchmark figure 12's, ``benchmarks/bench_study.py --figures 12``)."""
    printed, modules = _in_fresh_interpreter(
        f"from study.cli import main; main(['status', {str(study_dir)!r}])")
    heavy = {"optuna", "search_spaces.space", "pydantic", "ray", "mlflow", "torch"}
    assert not heavy & modules, heavy & modules
    return json.loads(printed)


def test_invalid_space_fails_before_ray(tmp_path, scifact_dir):
    space = tiny_space(tmp_path, "bad", parameters={
        "model.predictor.depth": {"type": "int", "low": 0, "high": 3}})
    with pytest.raises(SpaceError, match=r"bad\.yaml.*model\.predictor\.depth"):
        launch(_opts(space, tmp_path / "studies", scifact_dir))
    assert not ray.is_initialized()
    assert not (tmp_path / "studies").exists()


def test_checks_before_ray_import_no_view(tmp_path, scifact_dir):
    """``Study.create`` (every check made before Ray starts) of a study with a local store and
    no warm start imports neither MLflow nor the report's matplotlib nor Ray: ~2 s on the
    launch's path (benchmark figure 1); the store is opened while Ray starts."""
    space = tiny_space(tmp_path, "light")
    _, modules = _in_fresh_interpreter(
        "from study import Study, StudyOptions; "
        f"Study.create(StudyOptions(space={str(space)!r}, data={str(scifact_dir)!r}, "
        f"storage={str(tmp_path / 'studies')!r}))", timeout=120)
    assert "search_spaces.space" in modules  # the space was checked...
    assert not {"mlflow", "matplotlib", "ray", "analysis.export"} & modules  # ... lightly
    assert (tmp_path / "studies" / "light" / "study.json").exists()


def test_unreachable_tracking_server_fails_before_ray(tmp_path, scifact_dir):
    space = tiny_space(tmp_path, "noserver")
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StudyError, match="does not answer"):
        launch(_opts(space, tmp_path / "studies", scifact_dir, mlflow_uri=uri))
    assert not ray.is_initialized()


def test_study_against_a_real_mlflow_server(tmp_path, scifact_dir, scifact_features,
                                            mlflow_server):  # noqa: F811
    uri = mlflow_server.wait().uri
    space = tiny_space(tmp_path, "served", num_samples=2, epochs=2)
    launch(_opts(space, tmp_path / "studies", scifact_dir, mlflow_uri=uri))
    # check over the server's REST API, as any other client would
    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    with urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name="
            f"{S.experiment_name('served').replace('/', '%2F')}", timeout=10) as resp:
        exp_id = json.loads(resp.read())["experiment"]["experiment_id"]
    parent = post("runs/search", {"experiment_ids": [exp_id],
                                  "filter": f"tags.`{S.TAG_ROLE}` = 'study'"})["runs"][0]
    children = post("runs/search", {
        "experiment_ids": [exp_id],
        "filter": f"tags.`{S.TAG_PARENT_RUN_ID}` = '{parent['info']['run_id']}'"})["runs"]
    assert len(children) == 2
    for child in children:
        keys = {m["key"] for m in child["data"]["metrics"]}
        assert {"dev_ndcg_at_10", "effective_rank", "train_loss"} <= keys
        assert child["info"]["status"] == "FINISHED"


def test_two_node_cluster_spreads_trials(tmp_path, scifact_dir, scifact_features):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:  # the head wrote Ray's ray_current_cluster file: shut it down whatever fails next
        cluster.add_node(num_cpus=1)
        space = tiny_space(tmp_path, "spread", num_samples=4, epochs=2, steps=8)
        summary = launch(_opts(space, tmp_path / "studies", scifact_dir,
                               address=cluster.address))
        assert summary["trials"] == 4 and summary["errored"] == 0
        nodes = set()
        for result in Path(summary["study_dir"], "ray", "spread").glob("*/result.json"):
            for line in result.read_text().splitlines():
                nodes.add(json.loads(line)["node_id"])
        assert len(nodes) == 2, nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_train_mode_runs_ddp_over_two_workers(tmp_path, scifact_dir, scifact_features):
    space = tiny_space(tmp_path, "ddp", num_samples=1, epochs=2)
    summary = launch(_opts(space, tmp_path / "studies", scifact_dir, num_workers=2,
                           execution="train"))
    assert summary["errored"] == 0
    uri = Study.open(summary["study_dir"]).mlflow_uri
    (child,) = child_runs(uri, "ddp")
    assert child.data.metrics["world_size"] == 2
    assert metric_steps(uri, child.info.run_id) == [1, 2]


@pytest.mark.timeout(300)  # without the fix the third trial waits forever
def test_train_mode_trials_tune_stops_free_their_workers(tmp_path, scifact_dir, scifact_features):
    """Tune ends Train-mode trials early (here the collapse guard stops every trial after its
    first epoch, as ASHA would stop some): each stopped trial's worker placement group is
    removed, so a third trial gets a CPU on this 2-CPU machine, and no trial is given a
    stopped trial's actor (Tune fails a trial it cannot reset one for)."""
    space = tiny_space(tmp_path, "stops", num_samples=3, epochs=3,
                       collapse_guard={"min_effective_rank": 1e9})
    summary = launch(_opts(space, tmp_path / "studies", scifact_dir, execution="train"))
    assert summary["trials"] == 3 and summary["errored"] == 0
    uri = Study.open(summary["study_dir"]).mlflow_uri
    children = child_runs(uri, "stops")
    assert len(children) == 3
    for child in children:
        assert metric_steps(uri, child.info.run_id) == [1]  # stopped after epoch 1 of 3
        assert child.data.tags[S.TAG_STOP_REASON].startswith("collapse")
    study_dir = Path(summary["study_dir"])
    assert not list(study_dir.glob("trials/*/checkpoints/epoch_*"))  # and no loop copies


def _launch_cli(space: Path, storage: Path, scifact_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "study.cli", "launch", "--space", str(space), "--storage",
         str(storage), "--data", str(scifact_dir), "--max-concurrent-trials", "1"],
        cwd=tmp_cwd(storage), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def tmp_cwd(storage: Path) -> Path:
    storage.mkdir(parents=True, exist_ok=True)
    return storage


def test_resume_after_killing_the_driver(tmp_path, scifact_dir, scifact_features):
    space = tiny_space(tmp_path, "killed", num_samples=4, epochs=3, steps=6)
    storage = tmp_path / "studies"
    study_dir = storage / "killed"
    proc = _launch_cli(space, storage, scifact_dir)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                if (study_dir / "optuna.db").exists() and \
                        optuna_states(study_dir).get("COMPLETE", 0) >= 1:
                    break
            except sqlite3.OperationalError:  # the storage is still being created
                pass
            time.sleep(0.5)
        assert proc.poll() is None, "the study ended before it could be killed"
        assert optuna_states(study_dir).get("COMPLETE", 0) < 4
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    summary = resume(study_dir)
    uri = Study.open(study_dir).mlflow_uri
    assert optuna_states(study_dir).get("COMPLETE", 0) == 4
    children = child_runs(uri, "killed")
    trial_ids = [c.data.tags[S.TAG_TRIAL_ID] for c in children]
    assert len(trial_ids) == len(set(trial_ids))  # one run per trial, no duplicates
    finished = [c for c in children if c.info.status == S.STATUS_FINISHED]
    assert len(finished) == 4
    for child in finished:
        steps = metric_steps(uri, child.info.run_id)
        assert steps == sorted(set(steps)) == [1, 2, 3]
    for child in children:  # a trial started after Tune's last save is lost with the driver
        if child.info.status != S.STATUS_FINISHED:
            assert child.info.status == S.STATUS_KILLED
            assert child.data.tags[S.TAG_STOP_REASON] == S.STOP_REASON_ORPHANED
    assert summary["trials"] == 4


@pytest.mark.parametrize("send_sigint", [False, True])
def test_interrupt_watch_tells_tunes_sigint_from_a_normal_end(tmp_path, send_sigint):
    """Tune swallows Ctrl-C (saves its state, returns a grid whose stopped trials read
    TERMINATED); the launcher learns of it from ``_InterruptWatch``, never from the
    results. A study that ends normally must not read as interrupted (a resume that did
    would exit 130 without a summary)."""
    import threading

    from ray import tune

    from study.tuner import _InterruptWatch

    def sleepy(config):  # defined here: Ray pickles it by value
        for i in range(config["steps"]):
            time.sleep(0.2)
            tune.report({"i": i})

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    before = signal.getsignal(signal.SIGINT)
    steps = 200 if send_sigint else 3
    ctrl_c = threading.Timer(8, os.kill, (os.getpid(), signal.SIGINT))
    try:
        if send_sigint:
            ctrl_c.start()
        with _InterruptWatch() as watch:
            grid = tune.Tuner(sleepy, param_space={"steps": steps},
                              run_config=tune.RunConfig(storage_path=str(tmp_path),
                                                        verbose=0)).fit()
    finally:
        ctrl_c.cancel()
    assert watch.interrupted is send_sigint
    assert signal.getsignal(signal.SIGINT) is before  # Tune's handler does not outlive fit
    (result,) = list(grid)
    assert (result.metrics["i"] < steps - 1) is send_sigint


def test_stop_ray_stops_every_process_ray_started():
    """``stop_ray`` kills the local node's autoscaler monitor itself (``ray.shutdown`` would
    give it a second on SIGTERM, which it never takes up); every process ``ray.init`` started,
    the monitor, raylet, GCS and workers included, is gone after it, and Ray can start again."""
    from study.launcher import stop_ray

    for _ in range(2):  # twice: the second start finds nothing of the first in its way
        before = {p.pid for p in live_descendants(os.getpid())}  # other fixtures' servers
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        assert ray.get(ray.remote(lambda: 1).remote()) == 1
        started = [p for p in live_descendants(os.getpid()) if p.pid not in before]
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "monitor.py" in names and "raylet" in names and "gcs_server" in names
        stop_ray()
        assert not ray.is_initialized()
        deadline = time.time() + 10
        while still_alive(started) and time.time() < deadline:
            time.sleep(0.1)
        assert not still_alive(started), [p.cmdline()[:2] for p in still_alive(started)]


@pytest.mark.parametrize("space", ["quick", "jepa_core", "seed_phases"])
def test_progress_table_renders_every_switch_pattern(space):
    """Tune's console table and best-trial line, fed trials of every switch pattern
    ``at_least_one_on`` allows (the forced member's switch is then never suggested), never
    look up an absent key. These two functions are what ``CLIReporter`` prints with."""
    import itertools

    from ray.tune.experiment import Trial
    from ray.tune.progress_reporter import _best_trial_str, _trial_progress_table

    from search_spaces.space import SWITCH, load_space
    from study.tuner import progress_reporter

    spec = load_space(space)
    zero = [n for n, p in spec.parameters.items() if getattr(p, "zero", False)]
    reporter = progress_reporter(spec)
    columns = reporter._parameter_columns
    trials = []
    for pattern in itertools.product([True, False], repeat=len(zero)):
        wanted = dict(zip(zero, pattern))

        def pick(name, p, wanted=wanted):
            if p is None:
                return wanted[name.removesuffix(SWITCH)]
            return p.choices[0] if p.type == "categorical" else p.low

        params = spec._walk(pick)
        trial = Trial("jepa_trial", config=params, stub=True)
        # Tune's result carries the trial's config: the best-trial line reads it from there
        trial.run_metadata.last_result = {"epoch": 1, "dev_ndcg_at_10": 0.5, "best_epoch": 1,
                                          "best_dev_ndcg_at_10": 0.5, "effective_rank": 100.0,
                                          "config": params}
        trials.append(trial)
        assert spec.metric in _best_trial_str(trial, spec.metric, columns)
    # the case that crashed a study: the forced member's switch is absent
    assert not spec.at_least_one_on or any(
        spec.at_least_one_on[-1] + SWITCH not in t.config for t in trials)
    table = "\n".join(_trial_progress_table(trials, reporter._metric_columns, columns))
    assert table.count("jepa_trial_") == len(trials)
