"""The study-level glue of ``report``, ``export``, ``ui`` and ``launch --warm-start``.

Each function finds a study's stores from its directory (``study.json``) and calls the
analysis package, which knows nothing about study directories.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from study.launcher import StudyError, load_meta, optuna_url

WARM_START_TOP = 3


def study_report(study: str | Path, out: str | Path | None = None,
                 paired_seeds: int = 0) -> Path:
    """Writes ``report.html`` (and logs it with its figures on the parent MLflow run).

    With ``paired_seeds`` > 0 the report answers the seed's question: the best configs with
    λ_pred > 0 and with λ_pred = 0 are re-trained at equal budget over that many seeds and
    compared on the test split.
    """
    from analysis.report import log_report, render_report
    from analysis.runs import load_runs

    meta = load_meta(study)
    uri, name, study_dir = meta["mlflow_uri"], meta["name"], meta["dir"]
    paired = None
    if paired_seeds > 0:
        from analysis.paired import paired_predictor_comparison, pick_pair

        pair = pick_pair(load_runs(uri, name), tracking_uri=uri)
        paired = paired_predictor_comparison(pair.on, pair.off, list(range(paired_seeds)),
                                             study_dir / "paired")
    report = render_report(uri, name, optuna_url(study_dir), paired)
    path = Path(out) if out else study_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.html, encoding="utf-8")
    log_report(uri, report.parent_run_id, path, report.figures)
    return path


def study_export(study: str | Path, top: int = 1, metric: str = "dev_ndcg_at_10",
                 mode: str = "max", out: str | Path | None = None) -> list[Path]:
    """The ``top`` trials' resolved configs as YAML files that ``jepa-study train`` reruns."""
    from analysis.export import export_configs

    meta = load_meta(study)
    return export_configs(meta["mlflow_uri"], meta["name"], out or meta["dir"] / "exported",
                          top=top, metric=metric, mode=mode)


def warm_start_configs(sources: list[str], scratch: Path) -> list[dict[str, Any]]:
    """Run-config dicts to evaluate first: from study directories (their best trials) or
    exported YAML files / directories of them."""
    from analysis.export import load_warm_start

    configs = []
    for source in sources:
        path = Path(source).expanduser()
        if (path / "study.json").exists():
            files = study_export(path, top=WARM_START_TOP, out=scratch / path.name)
            configs += load_warm_start(files)
        elif path.exists():
            configs += load_warm_start(path)
        else:
            raise StudyError(f"--warm-start {source}: no such study, file or directory")
    return [c.to_dict() for c in configs]


def newest_study(storage: str | Path = "studies") -> Path:
    studies = sorted(Path(storage).glob("*/study.json"), key=lambda p: p.stat().st_mtime)
    if not studies:
        raise StudyError(f"no study under {storage}/: pass a study directory")
    return studies[-1].parent


def ui_command(study: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """``mlflow ui`` on the study's tracking store, bound to ``host`` (loopback by default)."""
    meta = load_meta(study)
    uri = meta["mlflow_uri"]
    if uri.startswith(("http://", "https://")):
        raise StudyError(f"this study logs to the tracking server {uri}: open it there")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]


def serve_ui(study: str | Path | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Starts the MLflow UI, prints its address, and runs until Ctrl-C."""
    cmd = ui_command(study or newest_study(), host, port)
    proc = subprocess.Popen(cmd)
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
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)
        return 0
