"""SIGTERM stops every long-running command, whatever SIGINT's disposition.

A POSIX shell starts a script's background jobs with SIGINT ignored (``jepa-study ui ... &``
then ``kill $pid``), so each command here is started that way: SIGINT set to SIG_IGN before
it runs. SIGTERM must then still stop it within a bound, exit 130 ("interrupted") and leave
things as Ctrl-C does: ``launch``, ``resume`` and ``answer`` a resumable study whose runs are
ended KILLED, ``ui`` no process of its MLflow server.

Everything is real (Ray Tune, Optuna, MLflow on sqlite); the study is one trial on cached
SciFact features, and a command is stopped as soon as its trial has reported an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from study_helpers import (child_runs, live_descendants, live_in_group, parent_runs, still_alive,
                           tiny_space, wait_for)

from analysis import schema as S

ROOT = Path(__file__).resolve().parents[1]
STOP_S = 60  # SIGTERM to exit
START_S = 300  # to the first reported epoch (Ray, the trial's process) on a slow machine
EXIT_INTERRUPTED = 130
PARAMETERS = {"loss.lambda_pred": {"type": "float", "low": 0.1, "high": 2.0, "log": True}}

pytestmark = pytest.mark.timeout(900)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cli(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m study.cli ARGS`` with SIGINT ignored, as a shell's background job, in a
    session of its own (so that a failed test can kill what it started); output to ``log``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "study.cli", *args], env=env,
                                cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_ignore_sigint)


def _sigint_ignored(pid: int) -> bool:
    """Whether the process ignores SIGINT now (its SigIgn mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1]
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def _sigterm(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM to the command alone (as ``kill $pid`` does); asserts that it exits 130
    ("interrupted") within STOP_S."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_S} s after SIGTERM:\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
    assert code == EXIT_INTERRUPTED, (code, log.read_text(errors="replace")[-3000:])
    assert "interrupted" in log.read_text(errors="replace")


def _kill_session(proc: subprocess.Popen) -> None:
    """What a failed test leaves behind: the command's session (its Ray included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _epochs_reported(study_dir: Path, name: str) -> int:
    """Epoch results Tune recorded, over all trials (its ``result.json`` lines)."""
    return sum(len([ln for ln in p.read_text().splitlines() if ln.strip()])
               for p in (study_dir / "ray" / name).glob("*/result.json"))


def _assert_resumable(study_dir: Path, name: str, uri: str) -> None:
    """What Ctrl-C leaves: the study's files, `jepa-study status` answering (not finished),
    Tune's state to restore, the parent run and the open trial runs KILLED."""
    from ray import tune

    assert (study_dir / "study.json").is_file()
    assert not (study_dir / "summary.json").exists()
    status = subprocess.run([sys.executable, "-m", "study.cli", "status", str(study_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["finished"] is False
    assert tune.Tuner.can_restore(str(study_dir / "ray" / name))
    (parent,) = parent_runs(uri, name)
    assert parent.info.status == S.STATUS_KILLED
    assert parent.data.tags[S.TAG_STOP_REASON].startswith("interrupted: continue with")
    trials = child_runs(uri, name)
    assert trials and {r.info.status for r in trials} == {S.STATUS_KILLED}, \
        [(r.data.tags.get(S.TAG_TRIAL_ID), r.info.status) for r in trials]


def test_terminate_interrupts_whatever_sigint_disposition():
    """The CLI's SIGTERM handler calls the Python SIGINT handler in place (Tune's graceful
    stop inside ``Tuner.fit``), and raises ``KeyboardInterrupt`` where there is none."""
    from study.cli import _terminate

    previous = signal.getsignal(signal.SIGINT)
    calls = []
    try:
        for disposition in (signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signal.SIGINT, disposition)
            with pytest.raises(KeyboardInterrupt):
                _terminate(signal.SIGTERM, None)
            assert signal.getsignal(signal.SIGINT) == disposition  # left as it was
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
        _terminate(signal.SIGTERM, None)
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_stops_launch_and_resume_with_sigint_ignored(tmp_path, scifact_dir,
                                                             scifact_features):
    """``launch`` and then the ``resume`` of the study it left, each stopped by SIGTERM
    once its trial has reported an epoch: Tune's graceful stop, as on Ctrl-C."""
    from mlflow.tracking import MlflowClient

    name = "sigterm"
    # one trial with far more epochs than it gets to run: it is in flight when stopped
    space = tiny_space(tmp_path, name, num_samples=1, epochs=200, steps=2,
                       parameters=PARAMETERS,
                       description="One long trial, stopped by SIGTERM.")
    storage = tmp_path / "studies"
    storage.mkdir()
    study_dir = storage / name
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    log = tmp_path / "driver.log"

    proc = _cli("launch", "--space", str(space), "--storage", str(storage), "--data",
                str(scifact_dir), "--max-concurrent-trials", "1", log=log)
    try:
        wait_for(lambda: _epochs_reported(study_dir, name) >= 1, START_S, proc,
                 "the trial's first epoch", log)
        _sigterm(proc, log)
    finally:
        _kill_session(proc)
    _assert_resumable(study_dir, name, uri)
    # the study's experiment: model development, with what was searched and the report
    tags = MlflowClient(uri).get_experiment_by_name(S.experiment_name(name)).tags
    assert tags[S.TAG_EXPERIMENT_KIND] == S.EXPERIMENT_KIND
    assert "space sigterm: One long trial, stopped by SIGTERM." in tags[S.TAG_EXPERIMENT_NOTE]
    assert str(study_dir / "report.html") in tags[S.TAG_EXPERIMENT_NOTE]

    reported = _epochs_reported(study_dir, name)
    proc = _cli("resume", str(study_dir), log=log)
    try:
        wait_for(lambda: _epochs_reported(study_dir, name) > reported, START_S, proc,
                 "an epoch after the resume", log)
        _sigterm(proc, log)
    finally:
        _kill_session(proc)
    _assert_resumable(study_dir, name, uri)


def test_sigterm_stops_answer_with_sigint_ignored(tmp_path, scifact_dir, scifact_features):
    """``answer`` stopped by SIGTERM during its first arm's study: Tune's graceful stop, and
    the arm's study left resumable (a later ``answer`` resumes it)."""
    name = "sigterm-answer"
    space = tiny_space(tmp_path, "arms", num_samples=1, epochs=200, steps=2,
                       parameters={"loss.lambda_pred": {"type": "float", "low": 0.1,
                                                        "high": 2.0, "log": True,
                                                        "zero": True}})
    storage = tmp_path / "answers"
    studies = storage / name / "scifact" / "studies"
    log = tmp_path / "answer.log"
    proc = _cli("answer", "--data", str(scifact_dir), "--space", str(space), "--name", name,
                "--storage", str(storage), "--seeds", "1", "2", log=log)

    def in_flight() -> list[Path]:  # the answer's studies (scifact-jepa-s0, ...) with an epoch
        return [d for d in studies.iterdir() if _epochs_reported(d, d.name) >= 1
                and not (d / "summary.json").exists()]

    try:
        wait_for(in_flight, START_S, proc, "the first study's first epoch", log)
        _sigterm(proc, log)
    finally:
        _kill_session(proc)
    (study_dir,) = [d for d in studies.iterdir() if not (d / "summary.json").exists()]
    assert study_dir.name.startswith("scifact-jepa")  # the JEPA arm's first search
    _assert_resumable(study_dir, study_dir.name, f"sqlite:///{storage / name / 'mlflow.db'}")
    assert not (storage / name / "answer.json").exists()


# --- ui -------------------------------------------------------------------------------------

def test_sigterm_stops_ui_and_its_mlflow_server_with_sigint_ignored(tmp_path):
    """``jepa-study ui`` with SIGINT ignored: SIGTERM takes the MLflow server's whole
    process group (its main process and workers) down with it."""
    from study.tracking import seed_sqlite_store

    study_dir = tmp_path / "studies" / "ui-stop"
    study_dir.mkdir(parents=True)
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    seed_sqlite_store(uri)  # an empty store, as a study's first moments leave it
    (study_dir / "study.json").write_text(json.dumps({"name": "ui-stop", "mlflow_uri": uri}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    # MLflow's defaults (its job runner's processes too), but two web workers, not four
    proc = _cli("ui", str(study_dir), "--port", str(port), log=log, env={"MLFLOW_WORKERS": "2"})
    server = None
    try:
        wait_for(lambda: "MLflow UI: http://127.0.0.1:" in log.read_text(errors="replace"),
                 START_S, proc, "the UI's address", log)
        server_processes = live_descendants(proc.pid)  # `mlflow ui`, uvicorn, workers, jobs
        assert len(server_processes) >= 4, f"the MLflow server's processes: {server_processes}"
        (server,) = [p.pid for p in live_descendants(proc.pid, recursive=False)]
        assert _sigint_ignored(proc.pid)  # as started (a study's Tune handles it in `fit`)
        _sigterm(proc, log)
        deadline = time.monotonic() + 10  # the command waited for the server: a margin only
        while still_alive(server_processes):
            assert time.monotonic() < deadline, (
                f"MLflow server processes {still_alive(server_processes)} outlived "
                "`jepa-study ui`")
            time.sleep(0.1)
        # nor anything else of the server's group (zombies aside: a container's PID 1 may
        # reap the orphans late, and kill(2) still finds them)
        assert not live_in_group(server), (
            f"processes of the MLflow server's group {server} outlived it: "
            f"{live_in_group(server)}")
    finally:
        _kill_session(proc)
        if server is not None:
            try:
                os.killpg(server, signal.SIGKILL)
            except ProcessLookupError:
                pass
