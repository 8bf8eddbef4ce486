"""An exported model in MLflow: logged on its trial's run, registered in the Model Registry.

The folder written by :func:`trainables.st_export.export_sentence_transformer` is logged with
MLflow's ``sentence_transformers`` flavor (loaded first, as the flavor wants a model object),
so ``mlflow.sentence_transformers.load_model("models:/<name>/<version>")`` gives back the
same ``SentenceTransformer`` (the folder holds plain sentence-transformers modules only). Each
call makes a new version of the registered model and tags it (study, trial, scoring, dev
figure: whatever the caller passes).

MLflow's ``log_model`` and ``register_model`` read the process's tracking and registry URIs;
:func:`use_tracking_uri` points them at the given store for the call only and puts back
exactly what was there before (the module variables and the ``MLFLOW_*_URI`` environment
variables), so a caller's global MLflow settings are untouched. Calls are serialised by a
lock: two threads of one process cannot each see their own URI.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from trainables.st_export import CONFIG_FILE, MARKER_FILE

__all__ = ["MODEL_NAME", "log_and_register", "registered_model_name", "use_tracking_uri"]

#: the artifact name of the logged model on its run
MODEL_NAME = "sentence_transformer"
#: files of an export kept beside the logged model (``extra_files/``): the run config and
#: the export's description
EXTRA_FILES = (CONFIG_FILE, MARKER_FILE)
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_LOCK = threading.RLock()
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def registered_model_name(study_name: str) -> str:
    """A Model Registry name for a study's models: ``jepa-<study>``, with every run of
    characters other than letters, digits, ``_``, ``.``, ``-`` replaced by ``-``
    (MLflow forbids ``/`` and ``:`` and path-like names such as ``..``).

    Raises:
        ValueError: the study name has no usable character.
    """
    slug = _UNSAFE.sub("-", str(study_name))
    slug = re.sub(r"\.{2,}", ".", slug).strip("-.")
    if not slug:
        raise ValueError(f"study name {study_name!r} has no character usable in a registered "
                         "model name (letters, digits, _ . -)")
    return f"jepa-{slug}"


@contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Points MLflow's tracking and registry URIs at ``uri`` inside the block only.

    Unlike ``mlflow.set_tracking_uri`` and back, this restores an unset URI as unset and
    the ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` environment variables as they were.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _LOCK:
        saved_env = {k: os.environ.get(k) for k in _URI_ENV}
        saved_tracking = tracking_utils._tracking_uri
        saved_registry = registry_utils._registry_uri
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)
            registry_utils._registry_uri = saved_registry
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def log_and_register(tracking_uri: str, run_id: str, model_dir: Path, registered_name: str, *,
                     tags: Mapping[str, str]) -> tuple[str, str]:
    """Logs an exported folder on run ``run_id`` and registers it as a new version.

    Args:
        tracking_uri: the store holding the run (``sqlite:///...``, ``http://host:port``);
            the Model Registry is the same store.
        run_id: the trial's MLflow run; the model is logged on it as ``MODEL_NAME``.
        model_dir: a folder from ``export_sentence_transformer``.
        registered_name: the registered model (created when absent), e.g.
            :func:`registered_model_name` of the study.
        tags: set on the new version (study, trial, scoring, dev figure, ...); values are
            written as strings.

    Returns:
        ``(model_uri, version)``: ``models:/<registered_name>/<version>``, which
        ``mlflow.sentence_transformers.load_model`` loads, and the version number as text.

    Raises:
        ValueError: a name MLflow would refuse, found before anything is logged.
        FileNotFoundError: ``model_dir`` is no sentence-transformers folder.
        mlflow.exceptions.MlflowException: an unknown run, an illegal name, a store that
            does not answer.
    """
    import mlflow
    import mlflow.sentence_transformers
    from mlflow.tracking import MlflowClient
    from sentence_transformers import SentenceTransformer

    model_dir = Path(model_dir)
    if not registered_name.strip() or any(c in registered_name for c in "/:"):
        raise ValueError(f"registered model name {registered_name!r} is empty or holds '/' or "
                         "':' (see registered_model_name)")
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{model_dir} is no sentence-transformers folder "
                                "(no modules.json)")
    version_tags = {str(k): str(v) for k, v in tags.items()}
    # the export's config and description travel as the model's extra_files/ (the flavor
    # re-saves the model, which keeps README.md but not files it does not know)
    extras = [str(model_dir / n) for n in EXTRA_FILES if (model_dir / n).is_file()]
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)  # fails early, naming the run, when it is not in this store
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    # The logged model is created here, in the run's experiment: left to log_model, it goes
    # to the active run's experiment or the default one (and, on a sqlite store, to the
    # default experiment's ./mlruns in the working directory).
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME,
                                        source_run_id=run_id, tags=version_tags)
    with use_tracking_uri(tracking_uri):
        # the flavor's own requirements: no inference, which would load the model in a
        # subprocess only to find the same three packages
        info = mlflow.sentence_transformers.log_model(
            model, name=MODEL_NAME, run_id=run_id, model_id=logged.model_id,
            pip_requirements=mlflow.sentence_transformers.get_default_pip_requirements(),
            extra_files=extras or None)
        version = mlflow.register_model(info.model_uri, registered_name,
                                        tags=version_tags)
    # register_model's tags are set after the version is created; read them back so that a
    # version without its tags is an error here, not a surprise later
    stored = client.get_model_version(registered_name, version.version).tags
    missing = {k for k, v in version_tags.items() if stored.get(k) != v}
    if missing:
        raise RuntimeError(f"model version {registered_name}/{version.version} lacks the "
                           f"tags {sorted(missing)}")
    return f"models:/{registered_name}/{version.version}", str(version.version)
