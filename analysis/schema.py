"""The names a study writes to MLflow: one contract for the writer and the readers.

``study/tracking.py`` and ``study/sync.py`` write these names and ``analysis/`` reads them
back, so they live here, in one dependency-free module, instead of as string literals on both
sides.

Layout of a study in MLflow:

* one experiment per study, named by :func:`experiment_name`;
* one parent run per study (tag ``jepa.role = study``), named after the study, holding the
  study's parameters and its search space as the artifact ``space.yaml``;
* one child run per Ray Tune trial (tag ``jepa.role = trial``, ``mlflow.parentRunId`` = the
  parent's run id, ``jepa.trial_id`` = Tune's trial id), named after the trial, holding the
  trial's flattened parameters and its resolved config as the artifact ``config.yaml``.

Metric conventions: per-epoch metrics are logged with ``step = epoch`` (each (key, step) pair
exactly once per run, also across resumes). Every metric and param name goes through
:func:`mlflow_key` so that names such as ``ndcg@10`` are legal MLflow keys (``ndcg_at_10``).
Non-finite values (NaN, inf) are never logged as metrics; they are recorded in the tag
``jepa.nonfinite`` as ``key@step`` entries (see :func:`format_nonfinite`). The parent run
carries the study's summary as tags (best trial, trials by status), set by ``sync``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterable

from trainables import subsets as _subsets  # dependency-free: the split's names live there

# --- tags ------------------------------------------------------------------------------------
TAG_STUDY = "jepa.study"  #: the study name, on the parent and on every child run
TAG_TRIAL_ID = "jepa.trial_id"  #: Ray Tune's trial id, on child runs only
TAG_ROLE = "jepa.role"  #: ROLE_STUDY on the parent run, ROLE_TRIAL on child runs
TAG_STATUS = "jepa.status"  #: RUNNING / FINISHED / FAILED / KILLED, mirrors the run status
TAG_STOP_REASON = "jepa.stop_reason"  #: why a run ended (free text, e.g. an error or "asha")
TAG_GIT_COMMIT = "jepa.git_commit"  #: the commit of the code that ran the study
TAG_NONFINITE = "jepa.nonfinite"  #: comma-separated ``key@step`` of NaN/inf metric values
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  #: MLflow's own nesting tag
TAG_RUN_NAME = "mlflow.runName"  #: MLflow's own run-name tag
TAG_STUDY_DIR = "jepa.study_dir"  #: the study directory, on the parent run
TAG_BEST_TRIAL = "jepa.best_trial"  #: on the parent: trial id of the best trial by the metric
TAG_BEST_VALUE = "jepa.best_value"  #: on the parent: that trial's value of the study's metric
TAG_COUNT_PREFIX = "jepa.count."  #: on the parent, see :func:`count_tag`

ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
ROLE_ANSWER = "answer"  #: the parent run of a `jepa-study answer` (its report and table)
ROLE_RETRAIN = "retrain"  #: a run the answer retrained over a fresh seed
TAG_ANSWER_RUN = "jepa.answer_run"  #: ``<dataset>/<system>/<seed>`` of a retrained run
TAG_PER_QUERY_EPOCH = "jepa.per_query_epoch"  #: the best epoch whose per_query.json is logged

# --- experiment tags (MLflow's names) ----------------------------------------------------------
#: the experiment's kind: MLflow model development (runs, params, metrics), not GenAI (traces)
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_EXPERIMENT_NOTE = "mlflow.note.content"  #: its description, shown above its runs in the UI

# --- run statuses (MLflow's names) -----------------------------------------------------------
STATUS_RUNNING = "RUNNING"
STATUS_FINISHED = "FINISHED"
STATUS_FAILED = "FAILED"
STATUS_KILLED = "KILLED"
END_STATUSES = (STATUS_FINISHED, STATUS_FAILED, STATUS_KILLED)

#: stop reason of a run left RUNNING by a driver that ended without closing it (set by sync)
STOP_REASON_ORPHANED = "orphaned: driver ended without closing the run"

# --- a retrained run's params (``jepa-study answer``) ---------------------------------------
PARAM_DATASET = "dataset"
PARAM_SYSTEM = "system"  #: jepa, contrastive, capacity, no_pred
PARAM_SCORE_WITH = "score_with"  #: the scoring dev chose for the system

# --- the parent run's params (the study, as ``study.sync`` writes them) ----------------------
PARAM_SPACE = "space"  #: the space's name
PARAM_NUM_SAMPLES = "num_samples"  #: trials asked for
PARAM_DATA = "data"  #: the BEIR directory (export fills a config's missing data.path with it)
PARAM_SEED = "seed"  #: the searcher's seed
PARAM_NUM_WORKERS = "num_workers"  #: Train workers per trial
PARAM_GPUS_PER_WORKER = "gpus_per_worker"
PARAM_PYTHON = "python"  #: the driver's Python version


def reference_key(row: str, figure: str) -> str:
    """The parent run's metric of a reference row's figure (``reference.bm25.test_ndcg_at_10``)."""
    return f"{REFERENCE_PREFIX}{row}.{figure}"


def version_param(package: str) -> str:
    """The parent run's param of a package's version (``ray_version``, ...)."""
    return f"{package}_version"


# --- artifacts -------------------------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"  #: resolved trial config, on child runs
ARTIFACT_SPACE = "space.yaml"  #: the study's search space, on the parent run
ARTIFACT_REPORT = "report"  #: artifact folder of the HTML report and its figures (parent run)
ARTIFACT_ANSWER = "answer"  #: artifact folder of the answer's HTML, JSON and Markdown
ARTIFACT_PER_QUERY = "per_query.json"  #: the best epoch's test figures, per query too
ARTIFACT_REFERENCES = "references.json"  #: the reference rows (parent run), per query too

# --- study directory -------------------------------------------------------------------------
OPTUNA_DB = "optuna.db"  #: Optuna's RDB storage inside the study directory

# --- experiments -----------------------------------------------------------------------------
EXPERIMENT_PREFIX = "jepa-study/"


def sqlite_path(uri: str) -> str | None:
    """The database file of a local SQLite store URI (``sqlite:///<path>[?...]``), or None
    for any other URI and for an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: beside the
    database (``<db dir>/mlartifacts/<experiment>``), not MLflow's default ``./mlruns`` in
    whatever the working directory is. None for other stores (their server decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    name = mlflow_key(experiment).replace("/", "_")
    return (Path(db).resolve().parent / "mlartifacts" / name).as_uri()


def experiment_name(study: str) -> str:
    """Return the default MLflow experiment name of a study (``jepa-study/<study>``)."""
    return f"{EXPERIMENT_PREFIX}{study}"


def count_tag(source: str, state: str) -> str:
    """The parent's tag counting its study's trials in ``state`` by ``source``: ``runs`` (child
    run statuses, ``jepa.count.runs.finished``) or ``optuna`` (``jepa.count.optuna.complete``)."""
    return f"{TAG_COUNT_PREFIX}{source}.{state.lower()}"


# --- metric and param keys -------------------------------------------------------------------
PARAM_SEP = "."  #: separator of flattened nested param names (``model.predictor.depth``)
SEARCH_PREFIX = "search."  #: params holding a trial's searched values, by Optuna name
OBJECTIVE = "dev_ndcg_at_10"  #: the headline dev nDCG@10 of each epoch (its history)
SELECTION = "best_dev_ndcg_at_10"  #: a trial's value: its best dev epoch's headline (ranking)
BEST_EPOCH = "best_epoch"  #: a run's best dev epoch so far (the loop reports it each epoch)
BEST_SCORED_WITH_PREDICTOR = "best_scored_with_predictor"  #: 1 when that epoch's scoring won
BEST_TEST_PREFIX = "best_test_"  #: the best epoch's test figures (``best_test_ndcg_at_10``)
#: a split's query subsets (``trainables.subsets``): nDCG@10 on the queries whose relevant
#: documents were (seen) or were never (unseen) positives of the run's train queries,
#: ``<split>_seen_ndcg_at_10`` with its count ``<split>_n_seen``
SUBSETS = _subsets.SUBSETS
subset_key = _subsets.subset_key
count_key = _subsets.count_key
#: the reference rows' figures on the parent run: ``reference.<row>.<figure>``
#: (``reference.doc_prior.test_unseen_ndcg_at_10``; rows in ``trainables.references``)
REFERENCE_PREFIX = "reference."
MAX_KEY_LENGTH = 250  #: MLflow's limit on metric/param/tag key length
MAX_PARAM_VALUE_LENGTH = 6000  #: MLflow's limit on a param value
MAX_TAG_VALUE_LENGTH = 8000  #: MLflow's limit on a tag value

_REPLACEMENTS = (("@", "_at_"), ("%", "_pct"), ("#", "_num_"))
_ILLEGAL = re.compile(r"[^A-Za-z0-9_\-./ ]")


def mlflow_key(name: object) -> str:
    """Sanitise a metric/param/tag name to the characters MLflow accepts everywhere.

    MLflow keys may hold ASCII alphanumerics and ``_ - . / space`` (a colon is refused on
    Windows stores, so it is replaced too), must not look like a non-normalised path (no empty,
    ``.`` or ``..`` segments, no leading ``/``) and are at most 250 characters. ``@``, ``%`` and
    ``#`` get readable replacements (``ndcg@10`` -> ``ndcg_at_10``), any other character becomes
    ``_``. The function is idempotent, so readers may apply it to names they look up.

    Args:
        name: Any name; non-strings are converted with ``str``.

    Returns:
        A legal, non-empty MLflow key.
    """
    key = str(name).strip()
    for old, new in _REPLACEMENTS:
        key = key.replace(old, new)
    key = _ILLEGAL.sub("_", key)[:MAX_KEY_LENGTH]
    segments = [s.strip() for s in key.split("/") if s.strip()]
    key = "/".join("_" * len(s) if set(s) <= {"."} else s for s in segments)
    if key.startswith(".."):
        key = "_" + key[1:]
    return key or "_"


def search_key(optuna_name: str) -> str:
    """Return the param key of a searched value (``loss.lambda_pred:on`` ->
    ``search.loss.lambda_pred_on``: the colon of a switch is not a legal key character)."""
    return mlflow_key(SEARCH_PREFIX + str(optuna_name))


_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^(nan|inf|-inf)$")


def parse_param(text: object) -> Any:
    """Type a param value back from the text MLflow stores (the writer logs ``str(value)``).

    ``True``/``False`` -> bool, ``None`` -> None, integers -> int, decimals -> float,
    ``[...]``/``{...}`` -> the Python literal when it parses; anything else stays text.
    Non-strings are returned as they are, so the function is idempotent.
    """
    if not isinstance(text, str):
        return text
    value = text.strip()
    if value in ("True", "False", "true", "false"):
        return value in ("True", "true")
    if value == "None":
        return None
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    if value and value[0] in "[{(" and value[-1] in "]})":
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
    return text


# --- non-finite values -----------------------------------------------------------------------
def format_nonfinite(entries: Iterable[tuple[str, int]]) -> str:
    """Format (key, step) pairs as the value of :data:`TAG_NONFINITE`.

    Duplicates are dropped and the order kept; entries that would push the value past MLflow's
    tag limit are left out (the first occurrences are the informative ones).
    """
    out: list[str] = []
    seen: set[str] = set()
    size = 0
    for key, step in entries:
        item = f"{key}@{int(step)}"
        if item in seen:
            continue
        if size + len(item) + 1 > MAX_TAG_VALUE_LENGTH:
            break
        seen.add(item)
        out.append(item)
        size += len(item) + 1
    return ",".join(out)


def parse_nonfinite(value: str | None) -> list[tuple[str, int]]:
    """Parse the value of :data:`TAG_NONFINITE` back into (key, step) pairs."""
    pairs: list[tuple[str, int]] = []
    for item in (value or "").split(","):
        key, sep, step = item.strip().rpartition("@")
        if sep and key and step.lstrip("-").isdigit():
            pairs.append((key, int(step)))
    return pairs
