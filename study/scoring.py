"""Test, scored only where it is reported: a study's best trials and its reference rows.

A study's trials never score test (their configs turn ``eval.evaluate_test`` off); each keeps
its best dev epoch's weights (``trials/<id>/best``: the heads only with a frozen base). When
the study ends, and on demand (``jepa-study test STUDY``), the trials it reports (its top
``k`` by the study's metric, those ``report`` and ``export`` show) are scored on test from
those weights, on all, seen and unseen queries (``trials/<id>/per_query.json``), and the
reference rows (zero-shot, BM25, the document prior) once (``references.json``). Both files
are part of the study's record; ``sync`` logs them to the trials' runs and the parent run.
Nothing is chosen by them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from study.studydir import experiment_dir, load_meta, trial_output_dir

log = logging.getLogger(__name__)

#: trials a study scores on test: those its report lists (the top 10 by its metric)
DEFAULT_TOP = 10
REFERENCES_FILE = "references.json"


def ranked(trials: list[Any], metric: str, mode: str) -> list[str]:
    """Trial ids with a finite value of ``metric`` in their last result, best first."""
    values = []
    for trial in trials:
        value = (trial.last_result or {}).get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append((value, trial.trial_id))
    values.sort(key=lambda v: v[0], reverse=mode == "max")
    return [trial_id for _, trial_id in values]


def score_study(study: str | Path, top: int = DEFAULT_TOP,
                trials: list[Any] | None = None) -> dict[str, Any]:
    """Scores the study's top ``top`` trials on test from their kept weights (a trial whose
    ``per_query.json`` already holds its kept best epoch is left as it is) and writes the
    reference rows once; returns which trials were scored, already scored, or had no kept
    weights."""
    from search_spaces.space import load_space
    from study.sync import read_trials
    from trainables.cache import load_or_compute
    from trainables.data import load_beir
    from trainables.loop import BEST_DIR, PER_QUERY_FILE, score_kept
    from trainables.references import reference_rows

    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    meta = load_meta(study)
    spec = load_space(meta["space_file"])
    trials = read_trials(experiment_dir(meta)) if trials is None else trials
    metric = spec.metric if isinstance(spec.metric, str) else spec.metric[0]
    mode = spec.mode if isinstance(spec.mode, str) else spec.mode[0]
    base = spec.base_config().with_overrides({"data.path": meta["data_dir"]}, "study")
    data = load_beir(meta["data_dir"])
    features = load_or_compute(data, base.model.base_model, base.model.max_seq_length,
                               progress=False)
    out: dict[str, list[str]] = {"scored": [], "already": [], "no_weights": []}
    for trial_id in ranked(trials, metric, mode)[:top]:
        trial_dir = trial_output_dir(meta["dir"], trial_id)
        kept = trial_dir / BEST_DIR / "best.json"
        if not kept.exists():
            out["no_weights"].append(trial_id)
            continue
        epoch = json.loads(kept.read_text())["epoch"]
        done = trial_dir / PER_QUERY_FILE
        if done.exists() and json.loads(done.read_text()).get("best_epoch") == epoch:
            out["already"].append(trial_id)
            continue
        from trainables.config import RunConfig

        cfg = RunConfig.from_yaml(trial_dir / BEST_DIR / "config.yaml")
        same_base = (cfg.model.base_model, cfg.model.max_seq_length) == (
            base.model.base_model, base.model.max_seq_length)
        score_kept(trial_dir, data=data, features=features if same_base else None)
        out["scored"].append(trial_id)
    references = Path(meta["dir"]) / REFERENCES_FILE
    if not references.exists():
        rows = reference_rows(base, data, features)
        references.write_text(json.dumps(rows, indent=1))
    if out["no_weights"]:
        log.warning("trials %s kept no best-epoch weights: not scored on test",
                    out["no_weights"])
    return out
