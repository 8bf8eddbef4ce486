"""Study search spaces: a YAML file, validated in full before any Ray or Optuna work starts.

A space file names the fixed part of every trial's run config (``base_preset`` and ``base``),
the searched parameters (dotted ``RunConfig`` paths), the objective, the searcher and the
scheduler. Optuna explores it through a define-by-run function (``SpaceSpec.define_by_run``)
so that conditional parameters (``when``) and on/off switches (``zero: true``) are only
suggested when they matter. Every mistake (unknown key, unknown config field, empty range,
a value the run config rejects, a combination of switches no run could train with, a bad
start point) raises ``SpaceError`` naming the file and the field, at load time.

Optuna parameter names are the dotted config paths; a ``zero: true`` parameter adds a
categorical switch ``"<path>:on"`` (``[true, false]``), and its value is only suggested when
the switch is on (off means 0). ``resolve`` maps such a parameter dict back to config overrides.

One config field may be searched over different ranges under different conditions: name
each alternative ``<path>@<label>`` with its own ``when`` (e.g. ``loss.lambda_iso@sigreg``
when ``loss.isotropy`` is ``sigreg``: SIGReg's scale is not the covariance penalty's). At
most one alternative of a field may be active in any trial (checked at load time); Optuna
sees each alternative as a parameter of its own, since their distributions differ.
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat,
                      StrictInt, StrictStr, ValidationError, ValidationInfo, model_validator)

from trainables.config import ConfigError, RunConfig, flatten, is_test_metric

if TYPE_CHECKING:  # heavy imports stay out of `import search_spaces`
    import optuna

SPACES_DIR = Path(__file__).resolve().parent
PRESETS_DIR = SPACES_DIR / "presets"
SWITCH = ":on"
ALTERNATIVE = "@"
_MAX_CORNERS = 4096  # combinations checked exhaustively; above this, a seeded sample
_MISSING = object()


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class _Param(_Strict):
    when: dict[str, Union[Scalar, list[Scalar]]] = Field(
        default_factory=dict, description="suggest only when every named earlier parameter "
        "has this value (or one of these values)")


class FloatParam(_Param):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    zero: bool = Field(False, description="add an on/off switch '<path>:on'; off means 0.0")


class IntParam(_Param):
    type: Literal["int"]
    low: StrictInt
    high: StrictInt
    log: bool = False
    step: StrictInt = Field(1, ge=1)
    zero: bool = Field(False, description="add an on/off switch '<path>:on'; off means 0")


class CategoricalParam(_Param):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]
_TAGS = {"float", "int", "categorical", "tpe", "random", "nsga2", "asha", "fifo"}


class TPESearcher(_Strict):
    """Optuna's TPE (single or multi-objective); ``group`` helps conditional spaces."""

    kind: Literal["tpe"]
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0, description="random trials (start points count)")
    group: bool = Field(False, description="multivariate TPE per group of co-occurring "
                        "parameters (experimental in Optuna)")


class RandomSearcher(_Strict):
    kind: Literal["random"]
    seed: int | None = 0


class NSGA2Searcher(_Strict):
    """NSGA-II, for multi-objective studies."""

    kind: Literal["nsga2"]
    seed: int | None = 0
    population_size: int = Field(50, ge=2)


class ASHAScheduler(_Strict):
    kind: Literal["asha"]
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="None: the run's number of epochs")


class FIFOScheduler(_Strict):
    kind: Literal["fifo"]


class CollapseGuard(_Strict):
    """Stop (and flag) a trial whose embeddings collapse below this effective rank."""

    min_effective_rank: float = Field(gt=0)
    metric: str = "effective_rank"


Searcher = Annotated[Union[TPESearcher, RandomSearcher, NSGA2Searcher],
                     Field(discriminator="kind")]
Scheduler = Annotated[Union[ASHAScheduler, FIFOScheduler], Field(discriminator="kind")]


class SpaceSpec(_Strict):
    """One study's search space; build it with ``load_space`` (or ``from_dict``)."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="study name default; None: the file's stem")
    description: str = ""
    base_preset: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    metric: str | list[str] = "dev_ndcg_at_10"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    num_samples: int = Field(8, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1)
    searcher_spec: Searcher = Field(default_factory=lambda: TPESearcher(kind="tpe"),
                                    alias="searcher")
    scheduler: Scheduler = Field(default_factory=lambda: FIFOScheduler(kind="fifo"))
    collapse_guard: CollapseGuard | None = None
    parameters: dict[str, Param]
    at_least_one_on: list[str] = Field(
        default_factory=list, description="zero-switch parameters of which at least one is "
        "on: the last one listed is forced on when all the others are off")
    points_to_evaluate: list[Union[str, dict[str, Any]]] = Field(default_factory=list)

    _source: str = PrivateAttr("<space>")
    _base: RunConfig | None = PrivateAttr(None)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<space>") -> "SpaceSpec":
        """Validates ``raw`` (structure, then meaning); errors name ``source`` and the field."""
        if not isinstance(raw, dict):
            raise SpaceError(f"{source}: expected a mapping at the top level, "
                             f"got {type(raw).__name__}")
        try:
            return cls.model_validate(raw, context={"source": source})
        except ValidationError as exc:
            for err in exc.errors():  # a semantic check's own message is already complete
                if isinstance(err.get("ctx", {}).get("error"), SpaceError):
                    raise err["ctx"]["error"] from None
            raise SpaceError(_format_errors(exc, source)) from None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "SpaceSpec":
        ctx = info.context or {}
        self._source = ctx.get("source", "<space>")
        if self.name is None:
            self.name = Path(self._source).stem if ctx.get("source") else "space"
        _check_meaning(self)
        return self

    def _fail(self, field: str, message: str) -> SpaceError:
        return SpaceError(f"{self._source}: {field}: {message}")

    # -- configs ---------------------------------------------------------------------------

    def base_config(self) -> RunConfig:
        """``base_preset`` (if any) with ``base`` merged over it, validated."""
        if self._base is None:
            raw = load_preset(self.base_preset) if self.base_preset else {}
            self._base = RunConfig.from_dict(_merge(raw, self.base), f"{self._source}: base")
        return self._base

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Optuna parameters (``trial.params`` or a Tune config) -> dotted config overrides.

        Switches are removed; a switch that is off gives its parameter the value 0.
        Parameters left out (inactive conditions) are not overridden: the base value holds.
        Keys without a dot (constants Tune merged in from ``param_space``) are ignored; an
        unknown dotted key (a config from another space) is an error.
        """
        known = set(self.parameters) | {p + SWITCH for p, s in self.parameters.items()
                                         if getattr(s, "zero", False)}
        unknown = sorted(k for k in set(params) - known if "." in k or k.endswith(SWITCH))
        if unknown:
            raise self._fail("parameters", f"unknown parameter(s) {unknown} (expected some "
                             f"of {sorted(known)})")
        out: dict[str, Any] = {}
        for name, spec in self.parameters.items():
            switch = params.get(name + SWITCH)
            if name in params:
                if switch is False:
                    raise self._fail(f"parameters.{name}", "value given while its switch "
                                     "is off")
                value = params[name]
                out[config_path(name)] = float(value) if spec.type == "float" else value
            elif switch is not None:
                if switch:
                    raise self._fail(f"parameters.{name}", "switch on but no value given")
                out[config_path(name)] = 0.0 if spec.type == "float" else 0
        return out

    def trial_config(self, params: dict[str, Any], data_path: str | None = None) -> RunConfig:
        """The run config of one trial: ``base_config()`` with ``resolve(params)`` applied
        and, when given, ``data_path`` as ``data.path``; built and validated once.

        This is the one way from a space file's parameters (Optuna's, Tune's trial config) to
        the config a trial trains with; a study pickles it with its space into the trials.
        """
        overrides = self.resolve(params)
        # a study's trials never score test: the study scores the trials it reports, from
        # their kept best-epoch weights (trainables.loop.score_kept)
        overrides["eval.evaluate_test"] = False
        if data_path is not None:
            overrides["data.path"] = str(data_path)
        try:
            return self.base_config().with_overrides(overrides, f"{self._source}: trial {params}")
        except ConfigError as exc:
            raise SpaceError(str(exc)) from None

    # -- Optuna ----------------------------------------------------------------------------

    def define_by_run(self, trial: "optuna.Trial") -> None:
        """Suggests every active parameter on ``trial``; the config comes from ``resolve``."""

        def pick(name: str, spec: Any) -> Any:
            if spec is None:
                return trial.suggest_categorical(name, [True, False])
            if spec.type == "float":
                return trial.suggest_float(name, spec.low, spec.high, log=spec.log,
                                           step=spec.step)
            if spec.type == "int":
                return trial.suggest_int(name, spec.low, spec.high, step=spec.step,
                                         log=spec.log)
            return trial.suggest_categorical(name, list(spec.choices))

        self._walk(pick)
        return None

    def points(self) -> list[dict[str, Any]]:
        """``points_to_evaluate`` as Optuna parameter dicts, for ``OptunaSearch``.

        Each point holds exactly the parameters ``define_by_run`` suggests given those
        values (switches included, inactive ones left out), so an enqueued trial is fully
        fixed. A preset contributes its values of the searched parameters; anything a point
        does not fix takes the base config's value, clipped into the parameter's range.
        """
        return [self._point(item, f"points_to_evaluate[{i}]")
                for i, item in enumerate(self.points_to_evaluate)]

    def always_suggested(self) -> list[str]:
        """The Optuna names every trial has (a console table fails on an absent key).

        A parameter without ``when`` is suggested in every trial, as is its on/off switch,
        except the switch of the last member of ``at_least_one_on``: it is not suggested
        (forced on) when the other members are off. A ``zero`` parameter's value is absent
        while it is off, so only its switch counts.
        """
        forced = self.at_least_one_on[-1] if self.at_least_one_on else None
        return [name + SWITCH if getattr(p, "zero", False) else name
                for name, p in self.parameters.items()
                if not p.when and not (getattr(p, "zero", False) and name == forced)]

    # -- the one walk through the parameters, shared by Optuna, points and checks ----------

    def _walk(self, pick: Callable[[str, Any], Any]) -> dict[str, Any]:
        """Calls ``pick(name, spec)`` for each parameter define-by-run would suggest, in file
        order (``spec`` None for a switch); returns the picked values by Optuna name."""
        params: dict[str, Any] = {}
        forced = self.at_least_one_on[-1] if self.at_least_one_on else None
        for path, spec in self.parameters.items():
            if not all(_holds(_state(key, params), want) for key, want in spec.when.items()):
                continue
            if getattr(spec, "zero", False):
                if not (path == forced and not any(
                        params.get(m + SWITCH) for m in self.at_least_one_on[:-1])):
                    params[path + SWITCH] = on = bool(pick(path + SWITCH, None))
                    if not on:
                        continue
            params[path] = pick(path, spec)
        return params

    def config_point(self, config: dict[str, Any]) -> dict[str, Any]:
        """A run config (e.g. an exported best config) as a ``points_to_evaluate`` entry.

        Only the searched parameters are taken, clipped into their ranges; a parameter whose
        ``when`` does not hold is left out and a switched-off one is written as 0, so that the
        entry can be appended to a space file's ``points_to_evaluate`` (``--warm-start``).
        """
        flat = flatten(config)
        want = {}
        for path, spec in self.parameters.items():
            if config_path(path) in flat:
                value = flat[config_path(path)]
                zero_off = getattr(spec, "zero", False) and value == 0
                want[path] = value if zero_off or spec.type == "categorical" \
                    else _clip(value, spec)
        params = self._point(want, "warm start", strict=False)
        point: dict[str, Any] = {}
        for path in self.parameters:
            if path in params:
                point[path] = params[path]
            elif params.get(path + SWITCH) is False:
                point[path] = 0
        return point

    def with_first(self, first: list[dict[str, Any]]) -> "SpaceSpec":
        """This space with the run configs ``first`` (``--warm-start``: earlier best configs)
        as its first ``points_to_evaluate``, so that the searcher evaluates them before
        anything else. Only the new points are checked (as ``load_space`` checks a point):
        the rest of the space was validated when it was loaded."""
        points = [self.config_point(c) for c in first]
        spec = self.model_copy(update={"points_to_evaluate": points + self.points_to_evaluate})
        for i, point in enumerate(points):
            _check_point(spec, spec.base_config(), point, f"points_to_evaluate[{i}]")
        return spec

    def to_yaml(self, first: list[dict[str, Any]] = ()) -> str:
        """The space as a study keeps it (``space.yaml``): every field spelled out, with the
        run configs ``first`` as the first ``points_to_evaluate`` (see :meth:`with_first`)."""
        raw = (self.with_first(first) if first else self).model_dump(
            mode="json", by_alias=True, exclude_none=True)
        return f"# the space {self._source}, as the study searches it\n" + \
            yaml.safe_dump(raw, sort_keys=False)

    def _point(self, item: str | dict[str, Any], where: str,
               strict: bool = True) -> dict[str, Any]:
        if isinstance(item, str):
            if item not in shipped_presets():
                raise self._fail(where, f"unknown preset {item!r} (valid: "
                                 f"{sorted(shipped_presets())})")
            preset = flatten(load_preset(item))
            want = {k: preset[config_path(k)] for k in self.parameters
                    if config_path(k) in preset}
            note, strict = f" (from preset {item})", False
        else:
            want, note = dict(item), ""
            for key in want:
                if key not in self.parameters:
                    raise self._fail(f"{where}.{key}", "not a searched parameter (valid: "
                                     f"{list(self.parameters)})")
        fill = flatten(self.base_config().to_dict())
        used: set[str] = set()

        def pick(name: str, spec: Any) -> Any:
            path = name.removesuffix(SWITCH)
            if path in want:
                used.add(path)
                if spec is None:
                    return want[path] != 0
                if not _in_range(want[path], spec):
                    raise self._fail(f"{where}.{path}", f"{want[path]!r}{note} is not in the "
                                     f"searched range {_describe(spec)}")
                return float(want[path]) if spec.type == "float" else want[path]
            if spec is None:
                return fill[config_path(path)] not in (0, None, False)
            return _clip(fill[config_path(path)], spec)

        params = self._walk(pick)
        if strict and set(want) - used:
            key = sorted(set(want) - used)[0]
            raise self._fail(f"{where}.{key}", "fixed but never suggested: its `when` "
                             f"condition {self.parameters[key].when} does not hold")
        return params


def config_path(name: str) -> str:
    """The config field a parameter searches: ``loss.lambda_iso@sigreg`` -> ``loss.lambda_iso``
    (a switch's name ``<name>:on`` gives its parameter's field too)."""
    return name.removesuffix(SWITCH).split(ALTERNATIVE, 1)[0]


# -- loading -------------------------------------------------------------------------------

def shipped_spaces() -> dict[str, Path]:
    """The space files shipped beside this module, by name."""
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def shipped_presets() -> dict[str, Path]:
    """The run-config presets shipped in ``presets/``, by name."""
    return {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def preset_path(name: str) -> Path:
    """The YAML file of a shipped preset (``minimal``, ``hybrid``, ``full``)."""
    presets = shipped_presets()
    if name not in presets:
        raise SpaceError(f"{name}: unknown preset (valid: {sorted(presets)})")
    return presets[name]


def load_run_config(spec: str, data: str | None = None) -> RunConfig:
    """A run config from a YAML file, or a shipped preset's by name (``minimal``, ``hybrid``,
    ``full``); ``data`` replaces its ``data.path`` (``--data``)."""
    path = Path(spec)
    if not path.exists() and not spec.endswith((".yaml", ".yml")):
        try:
            path = preset_path(spec)
        except SpaceError:
            raise ConfigError(f"{spec}: no such config file or preset") from None
    cfg = RunConfig.from_yaml(path)
    if data is not None:
        cfg = cfg.with_overrides({"data.path": str(Path(data).resolve())}, "--data")
    return cfg


def load_preset(name: str) -> dict[str, Any]:
    """A shipped preset's raw (partial) run-config mapping."""
    return yaml.safe_load(preset_path(name).read_text()) or {}


def space_file(path_or_name: str | Path) -> Path:
    """The file of a space: a path as given, or a bare name (``quick``) of a shipped space."""
    path = Path(path_or_name)
    if not path.is_file():
        shipped = shipped_spaces()
        if str(path_or_name) not in shipped:
            raise SpaceError(f"{path_or_name}: no such space file, nor a shipped space "
                             f"(valid: {sorted(shipped)})")
        path = shipped[str(path_or_name)]
    return path


def load_space(path_or_name: str | Path) -> SpaceSpec:
    """Loads and validates a space file; a bare name (``quick``) means a shipped space.

    A file may start from another space with ``extends: <name or path>``: its own keys are
    merged over that space's (mappings key by key, anything else replaced), so a variant
    names only what it changes (``quick_unseen``: ``quick`` selected on unseen documents).
    """
    path = space_file(path_or_name)
    source = path.name if path.parent == SPACES_DIR else str(path)
    return SpaceSpec.from_dict(_raw_space(path, source, ()), source)


def raw_space(path_or_name: str | Path) -> dict[str, Any]:
    """A space file's mapping as :func:`load_space` validates it (``extends`` merged in)."""
    path = space_file(path_or_name)
    return _raw_space(path, path.name if path.parent == SPACES_DIR else str(path), ())


def _raw_space(path: Path, source: str, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A space file's mapping with its ``extends`` chain merged in (cycles refused)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or "extends" not in raw:
        return raw
    parent = raw.pop("extends")
    if not isinstance(parent, str):
        raise SpaceError(f"{source}: extends: expected a space name or file, got {parent!r}")
    try:
        parent_path = space_file(parent if Path(parent).is_absolute() or parent in
                                 shipped_spaces() else path.parent / parent)
    except SpaceError as exc:
        raise SpaceError(f"{source}: extends: {exc}") from None
    if parent_path.resolve() in chain or parent_path.resolve() == path.resolve():
        raise SpaceError(f"{source}: extends: {parent} extends {source} again (a cycle)")
    base = _raw_space(parent_path, parent, chain + (path.resolve(),))
    base.pop("name", None)  # a variant is a space of its own: its name, else its file's
    return _merge(base, raw)


# -- checks of meaning (after pydantic has checked the structure) --------------------------

def _check_meaning(sp: SpaceSpec) -> None:
    fail = sp._fail
    if isinstance(sp.metric, list) != isinstance(sp.mode, list) or (
            isinstance(sp.metric, list) and len(sp.metric) != len(sp.mode)):
        raise fail("mode", f"one mode per metric: metric is {sp.metric!r}, mode is {sp.mode!r}")
    for metric in [sp.metric] if isinstance(sp.metric, str) else sp.metric:
        if is_test_metric(metric):
            raise fail("metric", f"{metric!r} is a test figure: test is reported, never used "
                       "to choose; use a dev figure such as best_dev_ndcg_at_10")
    if isinstance(sp.metric, list):
        if not sp.metric:
            raise fail("metric", "empty list")
        if sp.scheduler.kind == "asha":
            raise fail("scheduler.kind", "asha stops trials on a single metric; use fifo "
                       "for a multi-objective study")
    if sp.base_preset is not None and sp.base_preset not in shipped_presets():
        raise fail("base_preset", f"unknown preset {sp.base_preset!r} (valid: "
                   f"{sorted(shipped_presets())})")
    try:
        base = sp.base_config()
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None
    if not sp.parameters:
        raise fail("parameters", "empty: nothing to search")
    leaves = flatten(base.to_dict())
    seen: dict[str, Any] = {}  # Optuna names defined so far -> spec (None for a switch)
    for name, spec in sp.parameters.items():
        field = f"parameters.{name}"
        path = config_path(name)
        if path not in leaves or isinstance(leaves[path], dict):
            raise fail(field, "unknown config field")
        label = name[len(path) + 1:]
        if ALTERNATIVE in name and not re.fullmatch(r"[A-Za-z0-9_]+", label):
            raise fail(field, f"alternative label {label!r}: letters, digits and _ only")
        if spec.type == "categorical":
            values = {f"choices[{i}]": c for i, c in enumerate(spec.choices)}
            if len({repr(c) for c in spec.choices}) < len(spec.choices):
                raise fail(f"{field}.choices", "duplicate choices")
        else:
            values = {"low": spec.low, "high": spec.high}
            if spec.low >= spec.high:
                raise fail(f"{field}.low", f"low ({spec.low}) must be below high ({spec.high})")
            if spec.log and spec.low <= 0:
                raise fail(f"{field}.low", f"log scale needs low > 0 (got {spec.low})")
            if spec.log and spec.step not in (None, 1):
                raise fail(f"{field}.step", "Optuna cannot combine log with step")
        for key, value in values.items():
            try:
                base.with_overrides({path: value}, "value")
            except ConfigError as exc:
                if f"\n  {path}:" in str(exc):  # the field itself rejects it (not a combination)
                    raise fail(f"{field}.{key}", f"{value!r} is not a valid {path}: "
                               f"{_reason(exc)}") from None
        for key, want in spec.when.items():
            if key not in seen:
                raise fail(f"{field}.when.{key}", "not a parameter defined earlier in this "
                           f"file (earlier: {list(seen)})")
            cond = seen[key]
            if cond is not None and cond.type == "float":
                raise fail(f"{field}.when.{key}", "a float cannot be a condition; use a "
                           "categorical, an int or a '<path>:on' switch")
            for w in want if isinstance(want, list) else [want]:
                ok = isinstance(w, bool) if cond is None else _in_range(w, cond)
                if not ok:
                    raise fail(f"{field}.when.{key}", f"{w!r} is not among its values "
                               f"({'[True, False]' if cond is None else _describe(cond)})")
        seen[name] = spec
        if getattr(spec, "zero", False):
            seen[name + SWITCH] = None
    group = sp.at_least_one_on
    if group:
        order = list(sp.parameters)
        if len(group) < 2 or len(set(group)) < len(group):
            raise fail("at_least_one_on", "needs two or more distinct parameters")
        for m in group:
            spec = sp.parameters.get(m)
            if spec is None or not getattr(spec, "zero", False) or spec.when:
                raise fail("at_least_one_on", f"{m!r} must be a searched parameter with "
                           "`zero: true` and no `when`")
        if order.index(group[-1]) < max(order.index(m) for m in group[:-1]):
            raise fail("at_least_one_on", f"the last one listed ({group[-1]}) is forced on "
                       "when the others are off, so it must come after them in `parameters`")
    for params in corners(sp):
        active = [config_path(k) for k in params if not k.endswith(SWITCH)]
        twice = sorted({p for p in active if active.count(p) > 1})
        if twice:
            raise fail("parameters", f"{twice[0]} is searched twice in one trial (its "
                       f"alternatives' `when` conditions overlap): trials like {params}")
        try:
            base.with_overrides(sp.resolve(params), "trial")
        except ConfigError as exc:
            raise fail("parameters", f"contradictory settings: trials like {params} give an "
                       f"invalid run config: {_reason(exc)}") from None
    for i, item in enumerate(sp.points_to_evaluate):
        _check_point(sp, base, item, f"points_to_evaluate[{i}]")


def _check_point(sp: SpaceSpec, base: RunConfig, item: str | dict[str, Any], where: str) -> None:
    """A start point is one the space can suggest, and its trial's run config is valid."""
    params = sp._point(item, where)
    try:
        base.with_overrides(sp.resolve(params), where)
    except ConfigError as exc:
        raise sp._fail(where, f"invalid run config {params}: {_reason(exc)}") from None


def _reason(exc: ConfigError) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)


# -- helpers -------------------------------------------------------------------------------

def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        # drop the union tag pydantic inserts (parameters.<path>.float.low -> ...<path>.low)
        loc = [p for i, p in enumerate(loc) if not (i > 0 and p in _TAGS)]
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {'.'.join(loc) or '<root>'}: {msg}")
    return "\n".join(lines)


def _merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (YAML gives both)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _state(name: str, params: dict[str, Any]) -> Any:
    if name in params:
        return params[name]
    if name.endswith(SWITCH) and name.removesuffix(SWITCH) in params:
        return True  # a forced-on member of at_least_one_on has a value but no switch
    return _MISSING


def _holds(value: Any, want: Any) -> bool:
    return value is not _MISSING and any(
        _same(value, w) for w in (want if isinstance(want, list) else [want]))


def _in_range(value: Any, spec: Any) -> bool:
    if spec.type == "categorical":
        return any(_same(value, c) for c in spec.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if spec.type == "int" and not isinstance(value, int):
        return False
    return spec.low <= value <= spec.high


def _clip(value: Any, spec: Any) -> Any:
    if spec.type == "categorical":
        return value if _in_range(value, spec) else spec.choices[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        value = spec.low
    value = min(max(value, spec.low), spec.high)
    if spec.step:
        value = min(spec.low + round((value - spec.low) / spec.step) * spec.step, spec.high)
    return int(round(value)) if spec.type == "int" else float(value)


def _describe(spec: Any) -> str:
    if spec.type == "categorical":
        return str(list(spec.choices))
    return f"[{spec.low}, {spec.high}]" + (" (log)" if spec.log else "")


def _corner_picks(spec: Any) -> list[Any]:
    if spec is None:
        return [True, False]
    return list(spec.choices) if spec.type == "categorical" else [spec.low, spec.high]


def corners(space: SpaceSpec) -> list[dict[str, Any]]:
    """Every combination of extreme values (low/high, each choice, each switch) that
    define-by-run can produce; a seeded sample when there are more than ``_MAX_CORNERS``."""
    out: list[dict[str, Any]] = []
    stack: list[list[int]] = [[]]
    while stack and len(out) < _MAX_CORNERS:
        prefix = stack.pop()
        seq: list[int] = []

        def pick(name: str, spec: Any) -> Any:
            options = _corner_picks(spec)
            i = len(seq)
            idx = prefix[i] if i < len(prefix) else 0
            if i >= len(prefix):
                stack.extend(seq + [j] for j in range(len(options) - 1, 0, -1))
            seq.append(idx)
            return options[idx]

        out.append(space._walk(pick))
    if stack:  # too many to enumerate: add a seeded random sample
        rng = random.Random(0)
        out += [space._walk(lambda n, s: rng.choice(_corner_picks(s)))
                for _ in range(_MAX_CORNERS // 2)]
    return out
