"""The two arms of the predictor question, derived from one space, and the controls around
the best JEPA config that ``jepa-study answer`` retrains beside them (:func:`systems`).

``jepa-study answer`` runs two studies per dataset over the same space, at the same number of
trials and under the same budget rules, that differ only in the predictive term:

* ``jepa``: L_pred always on (its weight searched); the predictor's knobs searched.
* ``contrastive``: λ_pred fixed at 0, L_con always on. The predictor's shape knobs (depth,
  width, dropout, residual) shape an optional query-side head instead (``model.query_head``,
  searched), so that the tuned contrastive encoder can buy the same extra query-side
  capacity the JEPA model's predictor gives it; stop-gradient, meaningless without L_pred,
  is dropped.

Both arms keep everything else of the space: ranges, searcher, scheduler, budget, start
points (with the other arm's parameters left out).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from search_spaces.space import SWITCH
from trainables.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

PRED = "loss.lambda_pred"
CON = "loss.lambda_con"
HEAD = "model.query_head"
ARMS = ("jepa", "contrastive")
#: predictor knobs that do not shape a query head (only L_pred gives them a meaning)
_PRED_ONLY = {"loss.stopgrad"}


def arm_space(raw: dict[str, Any], arm: str) -> dict[str, Any]:
    """The raw space of one arm (see the module docstring); validate it with
    ``SpaceSpec.from_dict``.

    Raises:
        ValueError: An unknown arm, or a space that does not search ``loss.lambda_pred``.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r} (valid: {list(ARMS)})")
    params: dict[str, Any] = raw.get("parameters") or {}
    if PRED not in params:
        raise ValueError(f"the space does not search {PRED}: it has no arms to compare")
    out = copy.deepcopy(raw)
    out["name"] = f"{raw.get('name', 'space')}-{arm}"
    out.pop("at_least_one_on", None)  # L_pred (jepa) or L_con (contrastive) is always on
    always_on = PRED if arm == "jepa" else CON
    new: dict[str, Any] = {}
    for name, spec in params.items():
        spec = copy.deepcopy(spec)
        when = spec.get("when", {})
        if when.get(always_on + SWITCH) is False:
            continue  # only suggested while the always-on term is off: never
        follows_pred = when.get(PRED + SWITCH) is True
        spec["when"] = {k: v for k, v in when.items() if k != always_on + SWITCH}
        if name == always_on:
            spec.pop("zero", None)
        if arm == "contrastive":
            if name == PRED:
                new[HEAD] = {"type": "categorical", "choices": [False, True]}
                continue
            if follows_pred:
                if name in _PRED_ONLY:
                    continue
                spec["when"] = {**{k: v for k, v in spec["when"].items()
                                   if k != PRED + SWITCH}, HEAD: True}
        if not spec["when"]:
            spec.pop("when")
        new[name] = spec
    out["parameters"] = new
    base = out.setdefault("base", {})
    if arm == "contrastive":
        base.setdefault("loss", {})["lambda_pred"] = 0.0
        base["loss"].setdefault("lambda_con", 1.0)  # searched; a valid base needs a term
        base.setdefault("model", {}).pop("query_head", None)
    # a start point with the arm's always-on term off (L_pred alone, for the contrastive
    # arm) has no counterpart in the arm: it is left out
    out["points_to_evaluate"] = [_arm_point(p, arm, new) for p in
                                 raw.get("points_to_evaluate") or []
                                 if not (isinstance(p, dict) and p.get(always_on) == 0)]
    out["description"] = (f"{ARM_TITLES[arm]} arm of {raw.get('name', 'the space')}: "
                          + str(raw.get("description", "")))
    return out


ARM_TITLES = {"jepa": "JEPA (L_pred on)", "contrastive": "contrastive (λ_pred = 0)"}


def _arm_point(point: Any, arm: str, params: dict[str, Any]) -> Any:
    """A start point of the space for one arm: the arm's parameters only."""
    if not isinstance(point, dict):
        return point  # a preset: its values of the arm's parameters are taken at load
    out = {k: v for k, v in point.items() if k in params}
    if arm == "contrastive" and HEAD in params:
        out[HEAD] = False
        out = {k: v for k, v in out.items() if not params[k].get("when", {}).get(HEAD)}
    return out


def searched_with(raw: dict[str, Any], seed: int) -> dict[str, Any]:
    """``raw`` searched with another seed of its searcher: one of an arm's several searches
    (the spread between searches is the luck of one search, measured by the answer)."""
    out = copy.deepcopy(raw)
    out.setdefault("searcher", {"kind": "tpe"})["seed"] = seed
    return out


#: the predictor's knobs C+pred searches (their ranges are the JEPA arm's)
PREDICTOR_KNOBS = ("model.predictor.depth", "model.predictor.hidden_mult",
                   "model.predictor.dropout", "model.predictor.residual")


def predictor_space(raw: dict[str, Any], contrastive: RunConfig, patience: int | None,
                    num_samples: int) -> dict[str, Any]:
    """The short search that adds the predictor to the tuned contrastive config C (C+pred):
    C fixed whole (its own epoch budget and patience, not its search run's best epoch),
    L_pred switched on with λ_pred and the predictor's shape searched over the space's
    ranges, stop-gradient on, the scoring chosen on dev; the space's metric, searcher,
    scheduler and collapse guard.

    Raises:
        ValueError: The space does not search ``loss.lambda_pred``.
    """
    params = raw.get("parameters") or {}
    if PRED not in params:
        raise ValueError(f"the space does not search {PRED}: no predictor to add")
    base = contrastive.with_overrides({"train.stop_after_epoch": None, "train.patience":
                                       patience, "loss.stopgrad": True,
                                       "eval.score_with": "auto"}, "C+pred").to_dict()
    base.pop("provenance", None)
    base.pop("name", None)
    new = {}
    for name in (PRED, *PREDICTOR_KNOBS):
        if name in params:
            spec = copy.deepcopy(params[name])
            spec.pop("when", None)
            spec.pop("zero", None)
            new[name] = spec
    out = {k: copy.deepcopy(raw[k]) for k in ("metric", "mode", "searcher", "scheduler",
                                             "collapse_guard") if k in raw}
    out.update(name=f"{raw.get('name', 'space')}-c_pred", base=base, parameters=new,
               num_samples=num_samples,
               description="C+pred: the tuned contrastive config with the JEPA predictor "
               "added; λ_pred and the predictor's shape searched, the rest of C fixed")
    return out


def systems(jepa: RunConfig, contrastive: RunConfig) -> dict[str, RunConfig]:
    """The configs retrained over seeds: J, the tuned contrastive config, and J's controls.

    ``capacity`` and ``no_pred`` are J with λ_pred = 0 in every phase (``capacity`` with a
    query head of the predictor's shape), scored with the query; one that leaves nothing to
    train (J had only L_pred) is left out with a warning.
    """
    out = {"jepa": jepa, "contrastive": contrastive}
    for name, head in (("capacity", True), ("no_pred", False)):
        raw = jepa.to_dict()
        raw["loss"]["lambda_pred"] = 0.0
        for phase in raw["train"]["phases"]:
            phase["loss"].pop("lambda_pred", None)
        raw["model"]["query_head"] = head
        raw["eval"]["score_with"] = "query"
        try:
            out[name] = RunConfig.from_dict(raw, f"control {name}")
        except ConfigError as exc:
            log.warning("answer: no %s control: %s", name, exc)
    return out


def retrain_config(cfg: RunConfig, seed: int, patience: int | None, extra_data: list[str],
                   name: str) -> RunConfig:
    """``cfg`` retrained under the study's budget rules with a fresh seed: the whole schedule
    with the space's patience (not the search run's best epoch), test and transfer scored."""
    return cfg.with_overrides({"train.seed": seed, "train.stop_after_epoch": None,
                               "train.patience": patience, "eval.evaluate_test": True,
                               "eval.extra_data": extra_data, "name": name}, "answer")
