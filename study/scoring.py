"""Test, scored only where it is reported: a study's best trials and its reference rows.

A study's trials never score test (their configs turn ``eval.evaluate_test`` off); each keeps
its best dev epoch's weights (``trials/<id>/best``: the heads only with a frozen base). When
the study ends, and on demand (``jepa-study test STUDY``), the trials it reports (its top
``k`` by the study's metric, those ``report`` and ``export`` show) are scored on test from
those weights, on all, seen and unseen queries (``trials/<id>/per_query.json``), and the
reference rows (zero-shot, BM25, the document prior) once (``references.json``; a launch
scores them while its trials run, since they need none). Both files
are part of the study's record; ``sync`` logs them to the trials' runs and the parent run.
Nothing is chosen by them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from analysis import schema as S
from study.study import Study

log = logging.getLogger(__name__)

#: trials a study scores on test: those its report lists (the top 10 by its metric)
DEFAULT_TOP = 10


def references(study: Study) -> None:
    """Writes the study's reference rows (``references.json``) unless it has them. They need
    no trial: a launch scores them while its trials run."""
    from trainables.references import reference_rows

    path = study.dir / S.ARTIFACT_REFERENCES
    if not path.exists():
        rows = reference_rows(_base(study), study.data, study.features)
        tmp = path.with_name(path.name + ".tmp")  # whole or not at all
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)


def _base(study: Study):
    return study.space.base_config().with_overrides({"data.path": study.data_dir}, "study")


def score(study: Study, top: int = DEFAULT_TOP, trials: list[Any] | None = None) -> dict[str, Any]:
    """Scores the study's top ``top`` trials on test from their kept weights (a trial whose
    ``per_query.json`` already holds its kept best epoch is left as it is) and writes the
    reference rows once; returns which trials were scored, already scored, or had no kept
    weights."""
    from study.sync import read_trials
    from trainables.config import RunConfig
    from trainables.loop import BEST_DIR, PER_QUERY_FILE, score_kept

    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    trials = read_trials(study.experiment_dir) if trials is None else trials
    base = _base(study)
    out: dict[str, list[str]] = {"scored": [], "already": [], "no_weights": []}
    for trial in study.ranked(trials)[:top]:
        trial_dir = study.trial_dir(trial.trial_id)
        kept = trial_dir / BEST_DIR / "best.json"
        done = trial_dir / PER_QUERY_FILE
        if not kept.exists():
            out["no_weights"].append(trial.trial_id)
        elif done.exists() and json.loads(done.read_text()).get("best_epoch") == \
                json.loads(kept.read_text())["epoch"]:
            out["already"].append(trial.trial_id)
        else:
            model = RunConfig.from_yaml(trial_dir / BEST_DIR / "config.yaml").model
            same_base = (model.base_model, model.max_seq_length) == (
                base.model.base_model, base.model.max_seq_length)
            score_kept(trial_dir, data=study.data, features=study.features if same_base
                       else None)
            out["scored"].append(trial.trial_id)
    references(study)
    if out["no_weights"]:
        log.warning("trials %s kept no best-epoch weights: not scored on test",
                    out["no_weights"])
    return out
