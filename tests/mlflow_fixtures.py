"""MLflow backends for tests: a local sqlite store and a real ``mlflow server`` subprocess.

``tracking_uri`` is parametrised over both backends (module scope: a server costs ~5-10 s to
start). :class:`MlflowServer` starts and stops a server on a fixed port with a fixed store, so
a test can take the server away mid-study and bring it back with the same data.

Use from a test module with ``from mlflow_fixtures import mlflow_server, tracking_uri`` (both
names: ``tracking_uri`` depends on ``mlflow_server``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_ok(uri: str, timeout: float = 1.0) -> bool:
    """True when ``<uri>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


class MlflowServer:
    """An ``mlflow server`` on 127.0.0.1:``port`` with its store and artifacts under ``root``.

    The same instance can be stopped and started again: same port, same sqlite store, same
    artifact directory, as a server that went away and came back.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._started = 0.0

    def start(self, timeout: float = 60.0, wait: bool = True) -> "MlflowServer":
        """Start the server; with ``wait``, block until ``/health`` answers (:meth:`wait`)."""
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers: faster
        logfile = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed by the child
        self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.root, start_new_session=True)
        logfile.close()
        self._started = time.monotonic()
        return self.wait(timeout) if wait else self

    def wait(self, timeout: float = 60.0) -> "MlflowServer":
        """Block until ``/health`` answers, at most ``timeout`` s after the start."""
        deadline = self._started + timeout
        while not health_ok(self.uri, timeout=0.5):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"mlflow server on {self.uri} did not start:\n{tail}")
            time.sleep(0.1)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its worker processes (its own process group) and free the port."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=3)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:  # graceful shutdown waits on open connections
            pass
        try:  # the main process if it hung, and workers that outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        while health_ok(self.uri, timeout=0.2) and time.monotonic() < deadline:
            time.sleep(0.1)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The module's tracking server, started without waiting (call ``.wait()``); a test may
    stop and restart it."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start(wait=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["sqlite", "server"])
def tracking_uri(request: pytest.FixtureRequest, mlflow_server: MlflowServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tracking URI: a local sqlite store, then the module's tracking server.

    The server boots in the background while the sqlite tests run.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"
        return
    if mlflow_server.proc is None:  # a test stopped it and failed before restarting it
        mlflow_server.start(wait=False)
    yield mlflow_server.wait().uri
