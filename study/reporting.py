"""The study-level glue of ``report``, ``export`` and ``ui``: each takes a study's stores
from its handle and calls the analysis package, which knows nothing about study directories.
"""

from __future__ import annotations

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
    from trainables.loop import BEST_DIR, load_best
    from trainables.st_export import export_kept

    chosen = RunConfig.from_yaml(exported)
    prov, trial = chosen.provenance, study.trial_dir(chosen.provenance["trial_id"])
    retrain = (f"retrain it with `jepa-study train --config {exported} --model`, which "
               "exports the run's model")
    kept = load_best(trial)
    if kept is None:
        raise StudyError(f"trial {prov['trial_id']} of {study.name} kept no best-epoch weights "
                         f"({trial / BEST_DIR}): {retrain}")
    info = kept[1]
    if str(info["epoch"]) != prov.get("best_epoch", str(info["epoch"])):
        raise StudyError(f"trial {prov['trial_id']}: its kept weights are of epoch "
                         f"{info['epoch']}, the exported config's best epoch is "
                         f"{prov.get('best_epoch')}: {retrain}")
    card = {"study": study.name, "trial": prov["trial_id"], "config": chosen.to_dict(),
            "data": study.data_dir, "test": {k: v for k, v in prov.items()
                                             if k.startswith("best_test_")} or None,
            "dev": {k: v for k, v in prov.items() if k.startswith("best_dev_")}}
    folder = export_kept(kept, exported.with_name(exported.stem + "-model"), card)
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


def serve_ui(study: str | Path | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """``jepa-study ui``: the MLflow UI on the study's store (``analysis.ui.serve``) until
    Ctrl-C or SIGTERM; the newest study under ``studies/`` when none is named."""
    from analysis.ui import serve

    handle = Study.open(study or newest_study())
    if handle.mlflow_uri.startswith(("http://", "https://")):
        raise StudyError(f"this study logs to the tracking server {handle.mlflow_uri}: open "
                         "it there")
    return serve(handle.mlflow_uri, handle.name, host, port)
