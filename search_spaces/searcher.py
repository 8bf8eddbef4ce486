"""Builds Ray Tune's ``OptunaSearch`` for a space: sampler, start points, optional storage.

Kept apart from ``space.py`` so that loading and validating a space never imports Ray; this
module imports the space, never the other way round.

``ResumableOptunaSearch`` reaches into ``OptunaSearch``'s private state (``_ot_study``,
``_ot_trials``, ``_sampler``): Ray has no public API to list the trials a searcher owns or to
reseed its sampler after a restore.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from search_spaces.space import SpaceSpec


def build_searcher(space: SpaceSpec, storage_url: str | None = None,
                   study_name: str | None = None, metric: str | list[str] | None = None,
                   mode: str | list[str] | None = None) -> OptunaSearch:
    """``OptunaSearch(space.define_by_run, ...)`` with the space's sampler and points.

    ``storage_url`` (e.g. ``sqlite:///optuna.db``) makes the Optuna study persistent; the
    metric, mode and study name default to the space's.

    Ray 2.60's ``OptunaSearch`` creates the study itself (``load_if_exists=True``) from
    ``storage`` (an ``optuna.storages.BaseStorage`` instance, not a URL) and ``study_name``,
    and enqueues every start point with ``study.enqueue_trial``; so when the study already
    exists in the storage (a resumed study) the points are left out, since their waiting or
    finished trials are in the storage already.
    """
    import optuna

    metric = space.metric if metric is None else metric
    mode = space.mode if mode is None else mode
    study_name = study_name or space.name
    cfg = space.searcher_spec
    if cfg.kind == "tpe":
        extra = {"multivariate": True, "group": True} if cfg.group else {}
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, **extra)
    elif cfg.kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=cfg.seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=cfg.seed,
                                                population_size=cfg.population_size)
    storage = optuna.storages.RDBStorage(storage_url) if storage_url else None
    points = space.points()
    if storage is not None and study_name in optuna.study.get_all_study_names(storage):
        points = []
    searcher = ResumableOptunaSearch(space=space.define_by_run, metric=metric, mode=mode,
                                     points_to_evaluate=points or None, sampler=sampler,
                                     study_name=study_name, storage=storage)
    if storage is not None and not points and any(
            t.state != optuna.trial.TrialState.WAITING for t in searcher._ot_study.trials):
        # A new Tune experiment over a study that already has trials: the seeded sampler
        # would replay the draws it made the first time, so it is reseeded; trials left
        # RUNNING belong to no Tune trial any more.
        searcher._recover(reseed=True)
    return searcher


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` whose ``on_trial_complete`` is idempotent and whose restore never
    repeats a configuration.

    A driver killed after a trial finished but before Tune saved its experiment state
    restores that trial as unfinished; Tune completes it again and OptunaSearch would tell
    Optuna a second time, which raises ``UpdateFinishedTrialError`` and ends the study. The
    storage already holds the result, so the second tell is dropped.

    A driver killed after the searcher made a suggestion but before Tune saved its state
    loses that trial: Tune restores the searcher as it was at the save, so its seeded sampler
    would draw the lost trial's configuration again, and the lost trial would stay RUNNING
    in the storage for ever. :meth:`restore` marks such trials FAIL and reseeds the sampler.
    """

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._recover()

    def _recover(self, reseed: bool = False) -> list[int]:
        """FAIL the storage's RUNNING trials that no Tune trial of this searcher owns (a
        killed driver's lost suggestions) and reseed the sampler when there were any, so
        that it does not draw them again. Returns their numbers."""
        import logging

        import optuna

        owned = {t.number for t in self._ot_trials.values()}
        lost = [t.number for t in self._ot_study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if t.number not in owned]
        for number in lost:
            self._ot_study.tell(number, state=optuna.trial.TrialState.FAIL)
        if lost:
            logging.getLogger(__name__).warning(
                "Optuna trials %s were suggested but lost by a killed driver: marked FAIL",
                lost)
        if lost or reseed:
            self._sampler.reseed_rng()
        return lost

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        import optuna

        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a finished trial replayed after a restore: Optuna already has it

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        import optuna

        try:
            super().on_trial_complete(trial_id, result, error)
        except optuna.exceptions.UpdateFinishedTrialError:
            self._ot_trials.pop(trial_id, None)
