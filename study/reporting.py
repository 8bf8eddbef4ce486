"""The study-level glue of ``report``, ``export`` and ``ui``: each takes a study's stores
from its handle and calls the analysis package, which knows nothing about study directories.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from study.study import Study, StudyError


def report(study: Study, out: str | Path | None = None) -> Path:
    """Writes ``report.html`` (and logs it with its figures on the parent MLflow run)."""
    from analysis.report import log_report, render_report

    rendered = render_report(study.mlflow_uri, study.name, study.optuna_url)
    path = Path(out) if out else study.dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered.html, encoding="utf-8")
    log_report(study.mlflow_uri, rendered.parent_run_id, path, rendered.figures)
    return path


def export(study: Study, top: int = 1, metric: str = "best_dev_ndcg_at_10", mode: str = "max",
           out: str | Path | None = None) -> list[Path]:
    """The ``top`` trials' resolved configs as YAML files that ``jepa-study train`` reruns."""
    from analysis.export import export_configs
    from trainables.config import ConfigError, is_test_metric

    if is_test_metric(metric):
        raise ConfigError(f"--metric {metric}: a test figure; test is reported, never used to "
                          "choose (rank by a dev figure such as best_dev_ndcg_at_10)")
    return export_configs(study.mlflow_uri, study.name, out or study.dir / "exported", top=top,
                          metric=metric, mode=mode)


def export_model(study: Study, exported: Path, register: bool = True) -> dict[str, str]:
    """The model of an exported config (``export``'s YAML), from its trial's kept best-epoch
    weights (no retraining): a sentence-transformers folder beside the YAML
    (``<stem>-model/``), logged with MLflow's sentence_transformers flavor on the trial's run
    and registered as a new version of the study's registered model.

    Raises:
        StudyError: The trial kept no weights of its best epoch (it predates kept weights,
            or never finished an epoch): the message says to retrain the config with
            ``jepa-study train --config <yaml> --model``.
    """
    from analysis.registry import log_and_register, registered_model_name
    from trainables.config import RunConfig
    from trainables.loop import load_best
    from trainables.st_export import export_sentence_transformer

    chosen = RunConfig.from_yaml(exported)
    prov = chosen.provenance
    kept = load_best(study.trial_dir(prov["trial_id"]))
    retrain = (f"retrain it with `jepa-study train --config {exported} --model`, which "
               "exports the run's model")
    if kept is None:
        raise StudyError(f"trial {prov['trial_id']} of {study.name} kept no best-epoch weights "
                         f"({study.trial_dir(prov['trial_id'])}/best): {retrain}")
    cfg, info, weights = kept
    if str(info["epoch"]) != prov.get("best_epoch", str(info["epoch"])):
        raise StudyError(f"trial {prov['trial_id']}: its kept weights are of epoch "
                         f"{info['epoch']}, the exported config's best epoch is "
                         f"{prov.get('best_epoch')}: {retrain}")
    test = {k: v for k, v in prov.items() if k.startswith("best_test_")}
    card = {"study": study.name, "trial": prov["trial_id"], "config": chosen.to_dict(),
            "scoring": info["mode"], "data": study.data_dir,
            "dev": {"best_dev_ndcg_at_10": info["value"], "best_epoch": info["epoch"],
                    **{k: v for k, v in prov.items() if k.startswith("best_dev_")}},
            "test": test or None}
    folder = export_sentence_transformer(
        cfg, weights, exported.with_name(exported.stem + "-model"), scoring=info["mode"],
        card=card)
    out = {"model": str(folder)}
    if register:
        uri, version = log_and_register(
            study.mlflow_uri, prov["mlflow_run_id"], folder, registered_model_name(study.name),
            tags={"study": study.name, "trial": prov["trial_id"], "scoring": info["mode"],
                  "best_dev_ndcg_at_10": f"{info['value']:.4f}",
                  "best_epoch": str(info["epoch"])})
        out.update(registered=uri, version=version)
    return out


def newest_study(storage: str | Path = "studies") -> Path:
    studies = sorted(Path(storage).glob("*/study.json"), key=lambda p: p.stat().st_mtime)
    if not studies:
        raise StudyError(f"no study under {storage}/: pass a study directory")
    return studies[-1].parent


def ui_command(study: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """``mlflow ui`` on the study's tracking store, bound to ``host`` (loopback by default)."""
    uri = Study.open(study).mlflow_uri
    if uri.startswith(("http://", "https://")):
        raise StudyError(f"this study logs to the tracking server {uri}: open it there")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--host", host, "--port", str(port)]


def serve_ui(study: str | Path | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Starts the MLflow UI, prints its address and the study's runs page, and runs until
    Ctrl-C or SIGTERM (then ``KeyboardInterrupt`` propagates: the command exits 130).

    The server (``mlflow ui`` and the worker processes it starts) runs in a session of its
    own, so a signal meant for this command never reaches it half-way; whatever ends this
    function (a signal, an error, the server exiting) takes its whole process group down.
    """
    study_dir = study or newest_study()
    cmd = ui_command(study_dir, host, port)
    proc = subprocess.Popen(cmd, start_new_session=True)
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
        runs = _study_runs_page(address, Study.open(study_dir).name)
        if runs:
            print(f"study runs: {runs}", flush=True)
        return proc.wait()
    finally:
        _stop_process_group(proc)


#: MLflow 3's UI shows an experiment as GenAI (traces) or model training (runs) by this URL
#: parameter or its sidebar switch (GenAI by default), not by the experiment's kind tag
_MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def _study_runs_page(address: str, study_name: str) -> str | None:
    """The UI's page of the study's runs (model-training view); None when the study has no
    experiment yet or the server does not say."""
    import json
    import urllib.parse

    from analysis import schema as S

    query = urllib.parse.urlencode({"experiment_name": S.experiment_name(study_name)})
    try:
        with urllib.request.urlopen(f"{address}/api/2.0/mlflow/experiments/get-by-name?{query}",
                                    timeout=10) as resp:
            experiment_id = json.load(resp)["experiment"]["experiment_id"]
    except (OSError, ValueError, KeyError):
        return None
    return f"{address}/#/experiments/{experiment_id}/runs?{_MODEL_TRAINING_VIEW}"


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the server's process group, up to ``grace_s`` for it to shut down (its
    main process stops and reaps its workers), then SIGKILL to whatever is left in it."""
    import os
    import signal

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
