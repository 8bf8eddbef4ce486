"""A trained JEPA model as a plain sentence-transformers folder.

The folder loads with ``SentenceTransformer(path)`` in a process that has never heard of this
project (offline, no ``trust_remote_code``): ``encode_query`` gives the model's query-side
vectors (the query embedding, or the predictor's output when the model scores with its
predictor) and ``encode_document`` the document embedding. Only sentence-transformers' own
modules are used, in one :class:`~sentence_transformers.base.modules.Router`::

    query:    Transformer -> Pooling -> proj_q -> [query_head] -> [predictor]
    document: Transformer -> Pooling -> proj_d

A shared base (frozen, or a trained shared/bidirectional one) is one module object in both
routes, and the Router saves it once; an asymmetric trained base is saved twice. Each head
becomes ``Dense`` layers:

* ``Linear`` -> one ``Dense`` with an ``Identity`` activation.
* A plain MLP (``Linear, GELU, Dropout, ..., Linear``) -> one ``Dense`` per ``Linear``, GELU
  on all but the last (dropout is off at inference).
* A residual block ``S·x + c + MLP(x)`` (the residual predictor, ``S = I``; the ``mlp``
  projection, ``S·x + c`` its linear part) carries ``x`` through the hidden layers as
  ``[GELU(x); GELU(-x)]``, exactly, since ``GELU(x) - GELU(-x) = x·Φ(x) + x·Φ(-x) = x``:
  layer 1 is ``Dense(W1; I; -I)`` with GELU, a middle layer ``Dense([Wk,0,0]; [0,I,-I];
  [0,-I,I])`` with GELU, the last ``Dense([W_L, S, -S], b_L + c)`` with no activation. A
  depth-1 residual predictor is ``Dense(..., use_residual=True)``.

``Dense`` stores its activation by class name and re-creates it with no arguments, so the
erf GELU (``nn.GELU()``, the one this project's modules use) survives a save and load. The
export checks itself before writing: the folder's model and the JEPA model give the same
vectors for a few probe texts, or it fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import yaml
from torch import nn

from trainables.config import RunConfig
from trainables.model import JEPAModel, Predictor, Projection, base_dimension, load_base

Scoring = Literal["query", "predictor"]
SCORINGS = ("query", "predictor")
#: written into every export; its presence lets a later export replace the folder
MARKER_FILE = "jepa_export.json"
#: the resolved run config, beside the model (``RunConfig.from_yaml`` reads it back)
CONFIG_FILE = "jepa_config.yaml"
#: the export's self-check: the most a vector may differ from the JEPA model's
SELF_CHECK_TOLERANCE = 1e-4
_PROBES = ("What causes type 2 diabetes?",
           "Vitamin D supplementation reduces the risk of fractures in elderly women.",
           "A short one.")


def export_sentence_transformer(cfg: RunConfig, state_dict: Mapping[str, torch.Tensor],
                                out_dir: Path, *, scoring: Scoring,
                                card: Mapping[str, Any] | None = None) -> Path:
    """Writes a sentence-transformers model folder for a trained JEPA model.

    Args:
        cfg: the run's resolved config (``model`` says what to build; the base comes from
            ``model.base_model`` when the state dict has none).
        state_dict: ``JEPAModel.state_dict()`` (the best epoch's weights). With
            ``model.freeze_base`` it may hold the heads only (the model was trained on
            cached features); a trained base's weights must be in it (``base_q.*``, and
            ``base_d.*`` for ``asymmetric``).
        out_dir: the folder to write; it must not exist, be empty, or hold an earlier
            export (which is replaced). Written to a temporary sibling and renamed.
        scoring: what ``encode_query`` returns: the query embedding (``query``) or the
            predictor's output (``predictor``).
        card: model-card figures: ``study``, ``trial``, ``config`` (dict), ``dev`` and
            ``test`` (metric -> value; test reported only), ``data``, ``scoring``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an unknown scoring, predictor scoring of a model whose predictor is
            never trained, or a state dict that does not fit the config.
        FileExistsError: ``out_dir`` holds something that is not an export.
        RuntimeError: the built model does not reproduce the JEPA model's vectors.
    """
    from sentence_transformers import SentenceTransformer

    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r} ({', '.join(SCORINGS)})")
    if scoring == "predictor" and not cfg.trains_predictor:
        raise ValueError("scoring 'predictor' but lambda_pred is 0 in every phase that trains "
                         "the predictor: the predictor was never trained")
    out_dir = Path(out_dir)
    _check_target(out_dir)

    # Step 1. The JEPA model, exactly as trained (a state dict that does not fit fails here)
    base, jepa = _load_jepa(cfg, state_dict)

    # Step 2. The same computation in sentence-transformers modules
    router = build_router(jepa, base, scoring=scoring)
    st = SentenceTransformer(modules=[router], similarity_fn_name=cfg.model.similarity,
                             device="cpu")
    st.eval()
    _self_check(st, jepa, base, scoring)

    # Step 3. Written whole or not at all
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        st.save(str(tmp), create_model_card=False)
        (tmp / "README.md").write_text(model_card(cfg, scoring, card))
        cfg.to_yaml(tmp / CONFIG_FILE)
        (tmp / MARKER_FILE).write_text(json.dumps(
            {"scoring": scoring, "variant": cfg.model.variant,
             "similarity": cfg.model.similarity, "base_model": cfg.model.base_model,
             "trained_base": _has_base(state_dict), "routes": describe(router)}, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# -- the JEPA model --------------------------------------------------------------------------

def export_kept(kept: tuple[RunConfig, Mapping[str, Any], Mapping[str, torch.Tensor]],
                out_dir: Path, card: Mapping[str, Any]) -> Path:
    """The model a run kept of its best dev epoch (``kept``: what
    ``trainables.loop.load_best`` returns) as a folder (:func:`export_sentence_transformer`),
    encoding queries with the scoring dev chose; the card gets that scoring and the best
    epoch's dev figure besides ``card``'s own. Returns ``out_dir``."""
    cfg, info, weights = kept
    dev = {"best_dev_ndcg_at_10": info["value"], "best_epoch": info["epoch"],
           **card.get("dev", {})}
    return export_sentence_transformer(cfg, weights, out_dir, scoring=info["mode"],
                                       card={**card, "scoring": info["mode"], "dev": dev})


def _has_base(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("base_q.") for k in state_dict)


def _load_jepa(cfg: RunConfig, state_dict: Mapping[str, torch.Tensor]
               ) -> tuple[nn.Module, JEPAModel]:
    """The base (its own weights or the state dict's) and the JEPA model with the weights.

    Returns ``(base, model)``; for a frozen base trained on cached features ``model`` holds
    the heads only and ``base`` is the pretrained base, shared by both sides.
    """
    mc = cfg.model
    base = load_base(mc.base_model, mc.max_seq_length, "cpu")
    if _has_base(state_dict):
        model = JEPAModel(mc, base)
    elif mc.freeze_base:
        model = JEPAModel(mc, None, base_dim=base_dimension(base))
    else:
        raise ValueError("model.freeze_base is false but the state dict has no base weights "
                         "(base_q.*): the trained base is missing")
    weights = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
               for k, v in state_dict.items()}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the state dict does not fit model config {mc.model_dump()}: "
                         f"{exc}") from None
    model.eval()
    return base, model


# -- heads as Dense layers ---------------------------------------------------------------------

def _dense(weight: torch.Tensor, bias: torch.Tensor, activation: nn.Module):
    from sentence_transformers.sentence_transformer.modules import Dense

    out_f, in_f = weight.shape
    return Dense(in_f, out_f, bias=True, activation_function=activation,
                 init_weight=weight.detach().clone().contiguous(),
                 init_bias=bias.detach().clone().contiguous())


def _linears(seq: nn.Module) -> list[nn.Linear]:
    """The Linear layers of an MLP (``Linear, GELU, Dropout, ...``); checks what sits
    between them, since only GELU (erf form) and Dropout are expressible."""
    layers = list(seq)
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    for m in layers:
        if isinstance(m, nn.GELU) and m.approximate != "none":
            raise ValueError(f"GELU(approximate={m.approximate!r}) cannot be stored in a Dense "
                             "(it is re-created as nn.GELU())")
        if not isinstance(m, (nn.Linear, nn.GELU, nn.Dropout)):
            raise ValueError(f"cannot export a {type(m).__name__} inside an MLP head")
    return linears


def mlp_layers(linears: list[nn.Linear]) -> list[nn.Module]:
    """``Linear, GELU, ..., Linear`` (dropout off) as Dense layers."""
    return [_dense(lin.weight, lin.bias,
                   nn.GELU() if i < len(linears) - 1 else nn.Identity())
            for i, lin in enumerate(linears)]


def residual_layers(linears: list[nn.Linear], skip_weight: torch.Tensor,
                    skip_bias: torch.Tensor) -> list[nn.Module]:
    """``skip_weight·x + skip_bias + MLP(x)`` for an MLP of two or more layers, as Dense
    layers that carry ``x`` as ``[GELU(x); GELU(-x)]`` (see the module docstring)."""
    if len(linears) < 2:
        raise ValueError("residual_layers needs an MLP of at least two layers")
    d_in = linears[0].in_features
    eye = torch.eye(d_in)
    zeros = lambda rows, cols: torch.zeros(rows, cols)  # noqa: E731
    out: list[nn.Module] = []
    first = linears[0]
    out.append(_dense(torch.cat([first.weight.detach(), eye, -eye]),
                      torch.cat([first.bias.detach(), torch.zeros(2 * d_in)]), nn.GELU()))
    for lin in linears[1:-1]:
        h_out, h_in = lin.weight.shape
        weight = torch.cat([
            torch.cat([lin.weight.detach(), zeros(h_out, 2 * d_in)], 1),
            torch.cat([zeros(d_in, h_in), eye, -eye], 1),
            torch.cat([zeros(d_in, h_in), -eye, eye], 1)])
        out.append(_dense(weight, torch.cat([lin.bias.detach(), torch.zeros(2 * d_in)]),
                          nn.GELU()))
    last = linears[-1]
    skip = skip_weight.detach()
    out.append(_dense(torch.cat([last.weight.detach(), skip, -skip], 1),
                      last.bias.detach() + skip_bias.detach(), nn.Identity()))
    return out


def projection_layers(proj: Projection) -> list[nn.Module]:
    """``linear``: one Dense; ``mlp``: ``W·x + b + MLP(x)`` as a residual block."""
    lin = proj.linear
    if proj.mlp is None:
        return [_dense(lin.weight, lin.bias, nn.Identity())]
    return residual_layers(_linears(proj.mlp), lin.weight, lin.bias)


def predictor_layers(pred: Predictor) -> list[nn.Module]:
    """A Predictor (or query head): plain MLP, or ``x + MLP(x)`` with ``residual``."""
    from sentence_transformers.sentence_transformer.modules import Dense

    linears = _linears(pred.mlp)
    if not pred.residual:
        return mlp_layers(linears)
    if len(linears) == 1:  # x + W·x + b: Dense's own residual (in == out)
        lin = linears[0]
        return [Dense(lin.in_features, lin.out_features, bias=True,
                      activation_function=nn.Identity(),
                      init_weight=lin.weight.detach().clone().contiguous(),
                      init_bias=lin.bias.detach().clone().contiguous(), use_residual=True)]
    dim = linears[0].in_features
    return residual_layers(linears, torch.eye(dim), torch.zeros(dim))


def build_router(jepa: JEPAModel, base: nn.Module, *, scoring: Scoring):
    """The Router with the query and document routes of ``jepa`` (see the module docstring).

    ``base`` is used on a side whose base is not in ``jepa`` (a frozen base on cached
    features). Modules shared in ``jepa`` are shared in the Router, which saves them once.
    """
    from sentence_transformers.sentence_transformer.modules import Router

    base_q = list(jepa.base_q if jepa.base_q is not None else base)
    base_d = list(jepa.base_d if jepa.base_d is not None else base)
    proj_q = projection_layers(jepa.proj_q)
    proj_d = proj_q if jepa.proj_d is jepa.proj_q else projection_layers(jepa.proj_d)
    query = base_q + proj_q
    if jepa.query_head is not None:
        query += predictor_layers(jepa.query_head)
    if scoring == "predictor":
        query += predictor_layers(jepa.predictor)
    return Router.for_query_document(query_modules=query, document_modules=base_d + proj_d)


def describe(router) -> dict[str, list[str]]:
    """Route -> its modules, e.g. ``Dense(384->2048, GELU)``: the card's architecture."""
    out = {}
    for route, seq in router.sub_modules.items():
        names = []
        for m in seq:
            if hasattr(m, "linear") and hasattr(m, "activation_function"):
                act = type(m.activation_function).__name__
                names.append(f"Dense({m.in_features}->{m.out_features}, {act}"
                             + (", +input" if m.use_residual else "") + ")")
            else:
                names.append(type(m).__name__)
        out[route] = names
    return out


# -- checks --------------------------------------------------------------------------------------

def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file())):
        raise FileExistsError(f"{out_dir} exists and is not an earlier export (no "
                              f"{MARKER_FILE}): refusing to overwrite it")


@torch.no_grad()
def _self_check(st, jepa: JEPAModel, base: nn.Module, scoring: Scoring) -> None:
    """The built model against the JEPA model on a few probe texts (the base's padding may
    differ by float noise; a conversion error differs by far more)."""
    texts = list(_PROBES)

    def feats(side_base):
        return side_base.encode(texts, convert_to_tensor=True, normalize_embeddings=False,
                                show_progress_bar=False).float()

    q_in = texts if jepa.base_q is not None else feats(base)
    d_in = texts if jepa.base_d is not None else feats(base)
    want_q = jepa.encode_queries(q_in)
    if scoring == "predictor":
        want_q = jepa.predict(want_q)
    want_d = jepa.encode_docs(d_in)
    got_q = st.encode_query(texts, convert_to_tensor=True, show_progress_bar=False)
    got_d = st.encode_document(texts, convert_to_tensor=True, show_progress_bar=False)
    for side, got, want in (("query", got_q, want_q), ("document", got_d, want_d)):
        diff = float((got.float() - want.float()).abs().max())
        if not diff <= SELF_CHECK_TOLERANCE:
            raise RuntimeError(f"export self-check failed: the {side} side differs from the "
                               f"JEPA model by {diff:.3g} (> {SELF_CHECK_TOLERANCE})")


# -- the model card ----------------------------------------------------------------------------

def _figures(title: str, figures: Mapping[str, Any] | None) -> list[str]:
    if not figures:
        return []
    lines = [f"**{title}**", "", "| metric | value |", "|---|---|"]
    for key, value in figures.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return lines + [""]


def model_card(cfg: RunConfig, scoring: Scoring, card: Mapping[str, Any] | None = None) -> str:
    """The folder's README.md: what the model is, how to use it, its figures and config."""
    card = dict(card or {})
    config = card.get("config") or cfg.to_dict()
    study, trial = card.get("study"), card.get("trial")
    name = " / ".join(str(x) for x in (study, trial) if x) or cfg.name
    query_side = ("the predictor's output (the JEPA way: the predicted embedding of the "
                  "relevant document)" if scoring == "predictor" else "the query embedding")
    base = cfg.model.base_model
    # a hub name in the card's metadata; a local path is no name anyone else can resolve
    hub_base = None if Path(base).exists() else (base if "/" in base
                                                 else f"sentence-transformers/{base}")
    sim = cfg.model.similarity
    score = "cosine similarity" if sim == "cosine" else "negative Euclidean distance"
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, dense-retrieval, jepa]",
        *([f"base_model: {hub_base}"] if hub_base else []),
        "---",
        "",
        f"# JEPA dense retriever: {name}",
        "",
        f"A dense-retrieval encoder from a jepa-study run: the base `{base}` "
        f"({'frozen' if cfg.model.freeze_base else 'trained'}), a `{cfg.model.projection}` "
        f"projection into a {cfg.model.output_dim}-d joint space "
        f"(variant `{cfg.model.variant}`"
        + (", with a query head" if cfg.model.query_head else "") + "). "
        f"Queries are encoded as {query_side}; documents by the document encoder. "
        f"Score: `{sim}` ({score}). Plain sentence-transformers modules (Router, Transformer, "
        "Pooling, Dense): no custom code, no `trust_remote_code`.",
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("path/to/this/folder")  # or mlflow\'s load_model(uri)',
        'q = model.encode_query(["what causes scurvy?"])    # the query route',
        'd = model.encode_document(["Scurvy is caused by a lack of vitamin C."])',
        f"scores = model.similarity(q, d)  # {sim}: higher is better",
        "```",
        "",
        "`encode()` without a task uses the document route."
        + (" Do not normalise the vectors: the score is the negative distance between the raw "
           "ones." if sim == "euclidean" else ""),
        "",
        "## Figures",
        "",
        f"Scoring: `{card.get('scoring', scoring)}`. "
        f"Data: `{card.get('data') or cfg.data.path or 'the default (see data.path)'}`. "
        "The model was chosen on dev; test figures are reported only.",
        "",
        *_figures("dev", card.get("dev")),
        *_figures("test (reported only)", card.get("test")),
        "## Provenance",
        "",
        *(f"- {k}: {v}" for k, v in {"study": study, "trial": trial,
                                     **cfg.provenance}.items() if v),
        "",
        "## Config",
        "",
        f"The run's resolved config (also in `{CONFIG_FILE}`):",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
