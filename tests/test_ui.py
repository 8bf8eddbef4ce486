"""``jepa-study ui`` in a real browser: the CLI starts MLflow's UI on a study's store, and a
headless Chromium finds the study's runs there.

The study record is written with :class:`StudyTracker` like a launched study's (parent run,
one child run per trial, per-epoch ``dev_ndcg_at_10``), without Ray: a few seconds. The
browser is Debian's ``/usr/bin/chromium``, driven over the DevTools protocol with a small
standard-library WebSocket client (no browser download, no extra package); the test is
skipped only where that binary is absent (CI installs it: ``apt-get install -y chromium``).

MLflow 3.17's UI opens in its "GenAI" mode, where an experiment lands on traces; the test
switches the sidebar to "Model training" as a user would, then opens the experiment from
the experiment list, expands the parent run to see its trials and adds the metric column.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from analysis import schema as S

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STUDY = "ui-check"
#: trial id -> dev nDCG@10 per epoch; the runs table shows each run's last value
TRIALS = {"7f3a2_00000": [0.51, 0.55, 0.58],
          "7f3a2_00001": [0.60, 0.66, 0.6443],
          "7f3a2_00002": [0.40, 0.47]}
UI_START_S = 45  # the CLI prints its address once MLflow answers /health
STEP_S = 20  # one UI step (a page, a table, a column) in the browser
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"{CHROMIUM} is not installed (Debian: apt-get install -y "
                              "chromium); the MLflow UI browser test needs it"),
    pytest.mark.timeout(150),  # a hung step; the test takes about 30 s
]


def _run_name(trial_id: str) -> str:
    return f"trainable_{trial_id}"  # what MLflowTrialCallback names a trial's run: str(trial)


# --- the study ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A study directory as ``prepare_study`` writes it, whose sqlite MLflow store holds a
    finished parent run and one finished child run per trial in TRIALS."""
    from study.launcher import StudyOptions, default_mlflow_uri
    from study.tracking import StudyTracker

    root = tmp_path_factory.mktemp("studies")
    study_dir = root / STUDY
    study_dir.mkdir()
    uri = default_mlflow_uri(study_dir)
    space_file = study_dir / "space.yaml"
    space_file.write_text(f"name: {STUDY}\n")
    meta = {"name": STUDY, "options": asdict(StudyOptions(name=STUDY, storage=str(root))),
            "space_file": str(space_file), "data_dir": str(root / "data"), "mlflow_uri": uri,
            "created": time.time(), "git_commit": "unknown"}
    (study_dir / "study.json").write_text(json.dumps(meta, indent=1))

    tracker = StudyTracker(uri, STUDY, wal_dir=study_dir / "wal")
    tracker.start_study({"space": STUDY, "num_samples": len(TRIALS)},
                        {S.TAG_STUDY_DIR: str(study_dir)})
    for trial_id, dev in TRIALS.items():
        tracker.trial_run(trial_id, {"loss.lambda_pred": 0.5},
                          tags={S.TAG_RUN_NAME: _run_name(trial_id)})
        for epoch, value in enumerate(dev, start=1):
            tracker.log_epoch(trial_id, {"dev_ndcg_at_10": value, "train_loss": 1.0 / epoch},
                              epoch)
        tracker.end_trial(trial_id, S.STATUS_FINISHED, "completed")
    tracker.end_study(S.STATUS_FINISHED)
    assert tracker.flush(), "the study record was not written"
    return study_dir


# --- the UI process -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    """Sends ``first`` to the process, then SIGKILL to its whole session (it leads one)."""
    if proc.poll() is None:
        try:
            proc.send_signal(first)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _default_sigint() -> None:
    """Ctrl-C as in a terminal, also where pytest runs as a background job (which starts
    its children with SIGINT ignored, so Python would install no KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ui(study_dir, tmp_path):
    """``python -m study.cli ui STUDY --port P`` in its own session; yields (port, stdout
    file, stderr file, process). Stopped like Ctrl-C (SIGINT), then the session is killed."""
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
                                start_new_session=True, preexec_fn=_default_sigint)
    try:
        yield port, out, err, proc
    finally:
        _stop_group(proc, signal.SIGINT, 15)


def _wait_for_address(proc, out: Path, err: Path, port: int) -> str:
    """The address line the CLI prints on stdout, once the UI answers."""
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        lines = [ln for ln in out.read_text(errors="replace").splitlines()
                 if ln.startswith("MLflow UI:")]
        if lines:
            address = f"http://127.0.0.1:{port}"
            assert lines == [f"MLflow UI: {address}  (Ctrl-C to stop)"], lines
            return address
        assert proc.poll() is None, (
            f"`jepa-study ui` exited with {proc.returncode} before printing its address:\n"
            f"{out.read_text(errors='replace')}\n{err.read_text(errors='replace')[-3000:]}")
        time.sleep(0.25)
    pytest.fail(f"`jepa-study ui` printed no 'MLflow UI: http://127.0.0.1:{port}' line in "
                f"{UI_START_S} s; stdout:\n{out.read_text(errors='replace')}\nstderr:\n"
                f"{err.read_text(errors='replace')[-3000:]}")


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp{,6})."""
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{width // 4}I", raw))
            found.append(socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6,
                                          raw))
    return found


def _non_loopback_ipv4() -> list[str]:
    addrs = set()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        addrs.update(info[4][0] for info in infos)
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing address
            addrs.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a for a in addrs if not a.startswith("127.") and a != "0.0.0.0")


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


# --- a minimal DevTools client --------------------------------------------------------------
class _WebSocket:
    """Just enough of RFC 6455 for the DevTools protocol: text frames, client masking."""

    def __init__(self, port: int, path: str, timeout: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head[:200]!r}")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the browser closed the DevTools connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._recv()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(data, "big") ^ key).to_bytes(n, "big") if n else b""
        self.sock.sendall(head + mask + payload)

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 8:
                raise ConnectionError("the browser closed the DevTools connection")
            if opcode in (0, 1, 2):  # continuation, text, binary; pings are not sent
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()


class Browser:
    """Headless Chromium with one page, driven over ``--remote-debugging-port``."""

    def __init__(self, profile: Path, width: int = 1920, height: int = 1000) -> None:
        profile.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        active = profile / "DevToolsActivePort"  # "<port>\n<browser ws path>", once listening
        deadline = time.monotonic() + STEP_S
        while len(active.read_text().splitlines() if active.exists() else []) < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{CHROMIUM} did not start: "
                                   f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port, path = active.read_text().splitlines()[:2]
        self.ws = _WebSocket(int(port), path, timeout=STEP_S)
        self._id, self._session = 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target,
                                  flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        self.ws.send(json.dumps(message))
        while True:  # events arrive in between; only the answer matters
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        """The JSON value of a JavaScript expression in the page; None if it throws."""
        result = self.call("Runtime.evaluate", returnByValue=True, expression=(
            f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"))
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout: float = STEP_S):
        """Polls until ``expression`` is truthy; fails naming ``what`` and the page."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.js("document.body.innerText") or ""
                pytest.fail(f"the MLflow UI never showed {what} within {timeout:.0f} s; at "
                            f"{self.js('location.href')} the runs table holds "
                            f"{self.js(_TABLE)} and the page reads:\n{text[:1500]}")
            time.sleep(0.25)

    def click(self, expression: str, what: str) -> None:
        """Clicks the element ``expression`` evaluates to, once it exists.

        Finding and clicking happen in one evaluation, retried until it takes: React may
        re-render a list between two evaluations, and the element found by the first is
        then gone by the second (a failure seen in CI on the experiment list).
        """
        self.wait_for(f"(() => {{ const e = ({expression}); if (!e) return false; "
                      f"e.click(); return true; }})()", what)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot",
                                                    format="png")["data"]))
        return path

    def close(self) -> None:
        _stop_group(self.proc, signal.SIGTERM, 5)
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


# --- page queries ---------------------------------------------------------------------------
def _by_text(selector: str, text: str) -> str:
    return (f"[...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.textContent.trim() === {json.dumps(text)})")


#: {row index: {column id: cell text, "link": the run's page}} of the runs table (ag-grid
#: renders the pinned and the scrolling part of a row as two elements with the same row-index;
#: a cell's text is its link's, if it has one: the run name cell also holds a colour)
_TABLE = """(() => {
  const rows = {};
  for (const cell of document.querySelectorAll('.ag-row .ag-cell[col-id]')) {
    const i = cell.closest('.ag-row').getAttribute('row-index');
    const row = rows[i] = rows[i] || {};
    const link = cell.querySelector('a[href]');
    row[cell.getAttribute('col-id')] = (link || cell).innerText.trim();
    if (link && link.getAttribute('href').includes('/runs/')) row.link = link.href;
  }
  return rows;
})()"""
RUN_NAME_COL = "attributes.`Run Name`"
METRIC_COL = f"metrics.`{S.OBJECTIVE}`"


def _table(browser: Browser) -> list[dict[str, str]]:
    rows = browser.js(_TABLE) or {}
    return [rows[i] for i in sorted(rows, key=int)]


def _names(browser: Browser) -> list[str]:
    return [row.get(RUN_NAME_COL, "") for row in _table(browser)]


# --- the test -------------------------------------------------------------------------------
def test_ui_serves_the_study_on_loopback_and_shows_its_runs(study_dir, ui, browser, tmp_path):
    from mlflow.tracking import MlflowClient

    port, out, err, proc = ui
    address = _wait_for_address(proc, out, err, port)

    # bound to the loopback address only
    listening = _listening_addresses(port)
    assert listening, f"nothing listens on port {port}"
    assert set(listening) == {"127.0.0.1"}, f"the UI listens on {listening}, not 127.0.0.1 only"
    assert _connects("127.0.0.1", port), f"the UI does not answer on 127.0.0.1:{port}"
    for host in ["127.0.0.2", *_non_loopback_ipv4()]:  # both reach a 0.0.0.0 socket
        assert not _connects(host, port), f"the UI answers on {host}:{port}"

    uri = json.loads((study_dir / "study.json").read_text())["mlflow_uri"]
    experiment = MlflowClient(uri).get_experiment_by_name(S.experiment_name(STUDY))
    runs = MlflowClient(uri).search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == STUDY)
    trial_names = {_run_name(t) for t in TRIALS}
    assert {r.info.run_name for r in runs if r.data.tags.get(S.TAG_PARENT_RUN_ID)
            == parent.info.run_id} == trial_names, "the record has no parent/child runs"

    # the printed address; the sidebar switched to model training, as a user would
    browser.goto(address)
    browser.click(_by_text("[role=button]", "Model training"), "the 'Model training' switch")
    browser.click(_by_text("a", "Experiments"), "the 'Experiments' link")
    browser.click(_by_text("a", S.experiment_name(STUDY)),
                  f"the experiment {S.experiment_name(STUDY)} in the experiment list")
    browser.wait_for(f"location.hash.startsWith('#/experiments/{experiment.experiment_id}/runs')",
                     "the experiment's runs page")
    close_assistant = ("document.querySelector("
                       "'[data-component-id=\"mlflow.assistant.chat_panel.close\"]')")
    if browser.js(f"!!{close_assistant}"):
        browser.js(f"{close_assistant}.click()")  # more room for the table

    # the parent run, with its trials collapsed under it
    browser.wait_for(f"!!{_TABLE}[0]?.[{json.dumps(RUN_NAME_COL)}]", "the runs table")
    assert _names(browser) == [STUDY], (
        f"expected the parent run {STUDY!r} alone, its trials collapsed under it")
    browser.click("document.querySelector('.ag-row[row-index=\"0\"] "
                  f".ag-cell[col-id={json.dumps(RUN_NAME_COL)}] button')",
                  "the parent run's expand button")
    browser.wait_for(f"{_TABLE} && Object.keys({_TABLE}).length === {1 + len(TRIALS)}",
                     "the child runs under the expanded parent run")
    names = _names(browser)
    assert names[0] == STUDY and set(names[1:]) == trial_names, names
    links = {row[RUN_NAME_COL]: row.get("link", "") for row in _table(browser)}
    for run in runs:  # each row links to its own run's page
        assert links[run.info.run_name].endswith(f"/runs/{run.info.run_id}"), (
            run.info.run_name, links[run.info.run_name])

    # the objective as a column, with each trial's last value
    browser.click(_by_text("button", "Columns"), "the 'Columns' menu")
    checkbox = (f"document.querySelector('[title={json.dumps(S.OBJECTIVE)}]')"
                "?.closest('[class*=tree-treenode]')?.querySelector('[class*=tree-checkbox]')")
    browser.click(checkbox, f"{S.OBJECTIVE} in the 'Columns' menu")
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape",
                 windowsVirtualKeyCode=27)
    browser.call("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape",
                 windowsVirtualKeyCode=27)
    header = f"document.querySelector('.ag-header-cell[col-id={json.dumps(METRIC_COL)}]')"
    browser.wait_for(f"!!{header} && {header}.innerText.includes({json.dumps(S.OBJECTIVE)})",
                     f"a {S.OBJECTIVE} column")
    browser.wait_for(f"Object.values({_TABLE}).filter(r => /\\d/.test(r[{json.dumps(METRIC_COL)}]"
                     f" || '')).length === {len(TRIALS)}", f"{S.OBJECTIVE} values")
    shown = {row[RUN_NAME_COL]: row.get(METRIC_COL) for row in _table(browser)}
    assert shown[STUDY] in ("", "-"), f"the parent run shows {S.OBJECTIVE} = {shown[STUDY]!r}"
    for trial_id, dev in TRIALS.items():
        value = shown[_run_name(trial_id)]
        assert re.fullmatch(r"\d+\.\d+", value or ""), f"{_run_name(trial_id)}: {value!r}"
        assert float(value) == pytest.approx(dev[-1], abs=5e-5), (trial_id, value, dev[-1])

    png = browser.screenshot(tmp_path / "mlflow-ui-runs.png")
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR", f"{png} is not a PNG"
    width, height = struct.unpack("!II", data[16:24])
    assert width > 0 and height > 0 and len(data) > 10_000, (png, width, height, len(data))
