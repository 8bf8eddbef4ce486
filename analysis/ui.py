"""The MLflow UI over a tracking store, as a foreground command (``jepa-study ui``).

The server (``mlflow ui`` and the worker processes it starts) runs in a session of its own,
so that a signal meant for the command never reaches it half-way; whatever ends
:func:`serve` (a signal, an error, the server exiting) takes its whole process group down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from analysis import schema as S

#: MLflow 3's UI shows an experiment as GenAI (traces) or model training (runs) by this URL
#: parameter or its sidebar switch (GenAI by default), not by the experiment's kind tag
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def ui_command(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """``mlflow ui`` on a local store (``sqlite:///...``), bound to ``host`` (loopback by
    default). A tracking server has a UI of its own: ValueError, naming it."""
    if tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"this study logs to the tracking server {tracking_uri}: open it there")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port)]


def serve(tracking_uri: str, study_name: str, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Starts the MLflow UI, prints its address and the study's runs page, and runs until
    Ctrl-C or SIGTERM (then ``KeyboardInterrupt`` propagates: the command exits 130);
    returns the server's exit status when it ends by itself."""
    proc = subprocess.Popen(ui_command(tracking_uri, host, port), start_new_session=True)
    address = f"http://{host}:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{address}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    return proc.returncode or 1
                time.sleep(0.5)
        print(f"MLflow UI: {address}  (Ctrl-C to stop)", flush=True)
        runs = runs_page(address, study_name)
        if runs:
            print(f"study runs: {runs}", flush=True)
        return proc.wait()
    finally:
        _stop_process_group(proc)


def runs_page(address: str, study_name: str) -> str | None:
    """The UI's page of the study's runs (model-training view); None when the study has no
    experiment yet or the server does not say."""
    query = urllib.parse.urlencode({"experiment_name": S.experiment_name(study_name)})
    try:
        with urllib.request.urlopen(f"{address}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                    timeout=10) as resp:
            experiment_id = json.load(resp)["experiment"]["experiment_id"]
    except (OSError, ValueError, KeyError):
        return None
    return f"{address}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's process group, up to ``grace_s`` for it to shut down (its
    main process stops and reaps its workers), then SIGKILL to whatever is left in it."""
    try:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    finally:  # also when a second Ctrl-C cuts the grace period short
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
