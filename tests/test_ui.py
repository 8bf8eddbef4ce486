"""``jepa-study ui`` in a real browser: the CLI serves a study's MLflow store on 127.0.0.1,
prints the study's runs page, and that page shows the study as this project records it.

The study record is written with :class:`StudyTracker` like a launched study's (parent run,
one child run per trial, per-epoch ``dev_ndcg_at_10``, the experiment's kind and
description), without Ray: a few seconds. The browser is Debian's ``/usr/bin/chromium``
driven by pytest-playwright's ``browser`` and ``page`` fixtures (launched from that path: no
browser download); the test is skipped only where that binary is absent (CI installs it:
``apt-get install -y chromium``). Only loopback addresses are touched: the page's requests
elsewhere are aborted. A failed run keeps a Playwright trace and a screenshot under
``.pytest_cache/playwright/`` (``addopts`` in pyproject.toml; ``playwright show-trace``).

What is checked is what this project controls: the address and its loopback binding, the
experiment ``jepa-study/<study>`` opening on its runs with the study's description, the parent
run with its trials under it, a trial's metric, and a page that shows all this without a
script error or a failed request to the UI. The ids the page must link to are asked of the
served UI's own REST API, never read from the store the fixture wrote. MLflow's markup is
only reached through roles and texts (Playwright's locators wait and retry while React
re-renders).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Page, expect
from study_helpers import ended_trial, live_descendants, write_parent

from analysis import schema as S

CHROMIUM = "/usr/bin/chromium"
#: without the background-networking flags this machine's closed network refuses Chromium's
#: own connections; as root Chromium only starts without its sandbox
CHROMIUM_ARGS = ["--headless", *(["--no-sandbox"] if os.geteuid() == 0 else []),
                 "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STUDY = "ui-check"
SPACE_ABOUT = "Three short trials around the hybrid preset, for the browser test."
#: trial id -> dev nDCG@10 per epoch; a run shows its last value
TRIALS = {"7f3a2_00000": [0.51, 0.55, 0.58],
          "7f3a2_00001": [0.60, 0.66, 0.6443],
          "7f3a2_00002": [0.40, 0.47]}
BEST = "7f3a2_00001"
UI_START_S = 60  # the CLI prints its address once MLflow answers /health
STEP_MS = 60_000  # one UI step (a page, a table, a row) on a slow, shared machine

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is not installed (Debian: apt-get install -y "
                              "chromium); the MLflow UI browser test needs it"),
    pytest.mark.timeout(300),  # a hung step; the test takes about 30 s
]


def _run_name(trial_id: str) -> str:
    return f"trainable_{trial_id}"  # what MLflowTrialCallback names a trial's run: str(trial)


# --- the study ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A study directory as ``prepare_study`` writes it, whose sqlite MLflow store holds a
    finished parent run and one finished child run per trial in TRIALS; the experiment's
    description is written as the launcher writes it."""
    from study.study import StudyOptions
    from study.sync import TrialWriter
    from study.tracking import StudyTracker

    root = tmp_path_factory.mktemp("studies")
    study_dir = root / STUDY
    study_dir.mkdir()
    uri = f"sqlite:///{study_dir / 'mlflow.db'}"
    space_file = study_dir / "space.yaml"
    space_file.write_text(f"name: {STUDY}\ndescription: {SPACE_ABOUT}\n")
    meta = {"name": STUDY, "options": asdict(StudyOptions(name=STUDY, storage=str(root))),
            "space_file": str(space_file), "data_dir": str(root / "data"), "mlflow_uri": uri,
            "created": time.time(), "git_commit": "unknown"}
    (study_dir / "study.json").write_text(json.dumps(meta, indent=1))

    description = (f"Study {STUDY} searches the space {STUDY}: {SPACE_ABOUT} "
                   f"Report: {study_dir / 'report.html'} "
                   f"(written by `jepa-study report {study_dir}`).")
    tracker = StudyTracker(uri, STUDY, description=description)
    write_parent(tracker, {"space": STUDY, "num_samples": len(TRIALS)},
                 {S.TAG_STUDY_DIR: str(study_dir)})
    writer = TrialWriter(tracker, str(study_dir), max_epochs=max(map(len, TRIALS.values())))
    for trial_id, dev in TRIALS.items():
        trial = ended_trial(trial_id, {"loss.lambda_pred": 0.5},
                            [{S.OBJECTIVE: value, "train_loss": 1.0 / epoch}
                             for epoch, value in enumerate(dev, start=1)],
                            S.STATUS_FINISHED, "completed")
        trial.name = _run_name(trial_id)
        writer.write(trial)
    tracker.end(tracker.run(), S.STATUS_FINISHED, None)
    return study_dir


# --- the UI process -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def ui(study_dir, tmp_path):
    """``python -m study.cli ui STUDY --port P`` in a session of its own; yields (port,
    stdout file, stderr file, process). Stopped with SIGTERM; whatever is left of it and of
    the MLflow server (a session of its own too) is killed."""
    port = _free_port()
    out, err = tmp_path / "ui.stdout", tmp_path / "ui.stderr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
               [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           # a quicker start on a small machine; the CLI and the UI are the same
           "MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(out, "wb") as fout, open(err, "wb") as ferr:
        proc = subprocess.Popen([sys.executable, "-m", "study.cli", "ui", str(study_dir),
                                 "--port", str(port)], cwd=PROJECT_ROOT, env=env,
                                stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        yield port, out, err, proc
    finally:
        servers = ([p.pid for p in live_descendants(proc.pid, recursive=False)]
                   if proc.poll() is None else [])  # each leads a group of its own
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for pgid in [proc.pid, *servers]:
            _kill_group(pgid)
        proc.wait(timeout=10)


def _wait_for_lines(proc, out: Path, err: Path, port: int) -> tuple[str, str]:
    """The two lines the CLI prints on stdout once the UI answers: its address and the
    study's runs page."""
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        lines = out.read_text(errors="replace").splitlines()
        found = [ln for ln in lines if ln.startswith(("MLflow UI:", "study runs:"))]
        if len(found) == 2:
            return found[0], found[1]
        assert proc.poll() is None, (
            f"`jepa-study ui` exited with {proc.returncode} before printing its address:\n"
            f"{out.read_text(errors='replace')}\n{err.read_text(errors='replace')[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"`jepa-study ui` printed no address and study runs page for port {port} in "
                f"{UI_START_S} s; stdout:\n{out.read_text(errors='replace')}\nstderr:\n"
                f"{err.read_text(errors='replace')[-3000:]}")


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# --- the browser ----------------------------------------------------------------------------
def _is_loopback(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _loopback_only(route) -> None:
    """Lets the page reach loopback addresses only (the UI); anything else is aborted."""
    if _is_loopback(route.request.url) or route.request.url.startswith("data:"):
        route.continue_()
    else:
        route.abort()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's ``browser`` is Debian's chromium, with the flags this machine
    needs (the command line's options, e.g. ``--headed``, kept)."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": CHROMIUM_ARGS, "timeout": STEP_MS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    return {**browser_context_args, "viewport": {"width": 1600, "height": 1000}}


@pytest.fixture
def context(context: BrowserContext) -> BrowserContext:
    """pytest-playwright's context (traced, screenshot on failure): loopback only, with
    generous waits."""
    context.route("**/*", _loopback_only)
    context.set_default_timeout(STEP_MS)
    context.set_default_navigation_timeout(STEP_MS)
    return context


@pytest.fixture
def page_problems(page: Page) -> list[str]:
    """What went wrong on ``page`` while the test ran: uncaught script errors, and requests to
    the UI that failed or that its server answered with an error (5xx). Not counted: 4xx (the
    UI probes optional endpoints, e.g. ``users/current`` without an auth plugin: 404), the
    requests the page cancels itself, and those elsewhere that ``_loopback_only`` aborts."""
    problems: list[str] = []

    def on_response(response) -> None:
        if response.status >= 500 and _is_loopback(response.url):
            problems.append(f"HTTP {response.status} {response.request.method} {response.url}")

    def on_failed(request) -> None:
        if _is_loopback(request.url) and request.failure != "net::ERR_ABORTED":
            problems.append(f"{request.failure} {request.method} {request.url}")

    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("response", on_response)
    page.on("requestfailed", on_failed)
    return problems


# --- the test -------------------------------------------------------------------------------
def test_ui_serves_the_study_on_loopback_and_shows_its_runs(study_dir, ui, page, page_problems):
    from mlflow.tracking import MlflowClient

    from analysis.ui import ui_command
    from study import Study

    # bound to the loopback address only: asked for, and refused on another loopback
    # address (a socket bound to every address would answer on 127.0.0.2 too)
    command = ui_command(Study.open(study_dir).mlflow_uri)
    assert command[command.index("--host") + 1] == "127.0.0.1", command
    port, out, err, proc = ui
    address_line, runs_line = _wait_for_lines(proc, out, err, port)
    address = f"http://127.0.0.1:{port}"
    assert address_line == f"MLflow UI: {address}  (Ctrl-C to stop)", address_line
    assert _connects("127.0.0.1", port), f"the UI does not answer on 127.0.0.1:{port}"
    assert not _connects("127.0.0.2", port), f"the UI answers on 127.0.0.2:{port}"

    # what the served UI holds, asked of its REST API (the one its pages call): the study's
    # experiment, its parent run and the trials under it
    served = MlflowClient(address)
    experiment = served.get_experiment_by_name(S.experiment_name(STUDY))
    assert experiment is not None, f"{address} serves no experiment {S.experiment_name(STUDY)}"
    runs = {r.info.run_name: r for r in served.search_runs([experiment.experiment_id])}
    parent = runs[STUDY]
    assert {name for name, r in runs.items() if r.data.tags.get(S.TAG_PARENT_RUN_ID)
            == parent.info.run_id} == {_run_name(t) for t in TRIALS}

    # the printed runs page: the experiment opens on its runs, under its name and description
    runs_page = f"{address}/#/experiments/{experiment.experiment_id}/runs?"
    assert runs_line.startswith(f"study runs: {runs_page}"), runs_line
    page.goto(runs_line.split(" ", 2)[2])
    expect(page).to_have_url(re.compile(re.escape(runs_page)))
    for text in (S.experiment_name(STUDY), SPACE_ABOUT,
                 str(study_dir / "report.html")):  # not folded away
        expect(page.get_by_text(text).first).to_be_in_viewport()

    # the parent run, and its trials once it is expanded; each row links to its run
    grid = page.get_by_role("grid")
    parent_link = grid.get_by_role("link", name=STUDY, exact=True)
    expect(parent_link).to_have_attribute("href", re.compile(f"/runs/{parent.info.run_id}$"))
    child_links = {t: grid.get_by_role("link", name=_run_name(t), exact=True) for t in TRIALS}
    parent_row = grid.get_by_role("row").filter(
        has=page.get_by_role("link", name=STUDY, exact=True))  # `has` is row-relative
    parent_row.get_by_role("button").first.click()  # the expand button by the run's name
    for trial_id, link in child_links.items():
        run_id = runs[_run_name(trial_id)].info.run_id
        expect(link).to_have_attribute("href", re.compile(f"/runs/{run_id}$"))

    # a trial's page: its last dev nDCG@10
    child_links[BEST].click()
    expect(page).to_have_url(re.compile(f"/runs/{runs[_run_name(BEST)].info.run_id}"))
    metric_row = page.get_by_role("row").filter(has_text=S.OBJECTIVE)
    expect(metric_row.first).to_contain_text(str(TRIALS[BEST][-1]))

    # all of it shown without a script error or a failed request to the UI
    assert not page_problems, "the UI's pages went wrong:\n" + "\n".join(page_problems)
