"""The JEPA retrieval model: base encoder, projection into the joint space, latent predictor.

Shapes, for a base of dimension ``B`` and ``output_dim`` ``D``::

    text --base--> [B] --projection--> z in [D] --predictor--> predicted z of the positive doc

Variants (``ModelConfig.variant``):

* ``shared``: one base and one projection for queries and documents.
* ``asymmetric``: separate projections for queries and documents (and separate base copies
  when the base is trained; a frozen base is identical on both sides, so it is shared).
* ``bidirectional``: shared encoder, and two predictors: q->d and d->q.

``query_head`` adds an MLP of the predictor's shape after the query projection, part of the
query encoder: with lambda_pred 0 it is the capacity-matched control of a model that scores
with its predictor (the same extra query-side layers, trained contrastively instead of by
prediction).

The model accepts either texts (the base runs) or precomputed base features (a frozen base
whose outputs are cached on disk, see ``cache.py``): then only the small heads run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from trainables.config import ModelConfig, PredictorConfig, resolve_base_model

Inputs = torch.Tensor | Sequence[str]


def load_base(name: str, max_seq_length: int, device: str | torch.device = "cpu") -> nn.Module:
    """Loads a sentence-transformers model without its final ``Normalize`` module.

    The joint space is meant to be (close to) an isotropic Gaussian, so the base's unit-norm
    output is removed as in ragcun; cosine scoring is unaffected by that choice.
    """
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 moved the modules; older ones have them here only
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError:
        from sentence_transformers.models import Normalize

    path = resolve_base_model(name)
    st = SentenceTransformer(path, device=str(device), local_files_only=Path(path).exists())
    modules = [m for m in st if not isinstance(m, Normalize)]
    base = SentenceTransformer(modules=modules, device=str(device))
    base.max_seq_length = max_seq_length
    return base


def base_dimension(base: nn.Module) -> int:
    get = getattr(base, "get_embedding_dimension", None) or base.get_sentence_embedding_dimension
    return int(get())


class Projection(nn.Module):
    """Base features -> joint space.

    ``linear`` is orthogonally initialised, so at step 0 inner products (and cosine rankings)
    of the base are preserved exactly when ``D >= B``: training starts from the zero-shot
    model instead of from a random map. ``mlp`` adds ragcun's MLP (d->2d, GELU, Dropout,
    2d->out) as a residual branch whose last layer starts at zero, for the same reason.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.orthogonal_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.mlp: nn.Module | None = None
        if kind == "mlp":
            last = nn.Linear(2 * in_dim, out_dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.mlp = nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.GELU(),
                                     nn.Dropout(dropout), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.mlp is None else out + self.mlp(x)


class Predictor(nn.Module):
    """MLP predicting the positive document's embedding from the query's (or back).

    ``depth`` counts Linear layers: 1 is a single D->D map; deeper ones go D->H->...->H->D
    with GELU and dropout between, H = ``hidden_mult * D``. With ``residual`` the output is
    ``x + mlp(x)`` and the last layer starts at zero, so the untrained predictor is the
    identity (scoring with it then equals scoring with the query).
    """

    def __init__(self, dim: int, cfg: PredictorConfig):
        super().__init__()
        hidden = max(1, int(round(cfg.hidden_mult * dim)))
        widths = [dim] + [hidden] * (cfg.depth - 1) + [dim]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i < cfg.depth - 1:
                layers += [nn.GELU(), nn.Dropout(cfg.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.residual = cfg.residual
        if cfg.residual:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x) if self.residual else self.mlp(x)


class JEPAModel(nn.Module):
    """Encoder(s) plus predictor(s); see the module docstring for the variants.

    Args:
        cfg: model configuration.
        base: the sentence-transformers base, or None when the base is frozen and its
            features come precomputed (then only tensors are accepted as inputs).
        base_dim: the base's output dimension (needed when ``base`` is None).
    """

    def __init__(self, cfg: ModelConfig, base: nn.Module | None = None,
                 base_dim: int | None = None):
        super().__init__()
        if base is None and base_dim is None:
            raise ValueError("JEPAModel needs a base or its dimension")
        self.cfg = cfg
        dim = base_dim if base is None else base_dimension(base)
        self.base_q = base
        self.base_d = base
        if base is not None:
            if cfg.freeze_base:
                base.requires_grad_(False)
            elif cfg.variant == "asymmetric":
                self.base_d = copy.deepcopy(base)
        self.proj_q = Projection(dim, cfg.output_dim, cfg.projection, cfg.predictor.dropout)
        self.proj_d = (copy.deepcopy(self.proj_q) if cfg.variant == "asymmetric"
                       else self.proj_q)
        # The capacity-matched control: the predictor's shape on the query side only.
        self.query_head = Predictor(cfg.output_dim, cfg.predictor) if cfg.query_head else None
        self.predictor = Predictor(cfg.output_dim, cfg.predictor)
        self.predictor_dq = (Predictor(cfg.output_dim, cfg.predictor)
                             if cfg.variant == "bidirectional" else None)

    # -- parameter groups (separate learning rates, phase freezing) ---------------------------

    def base_parameters(self) -> list[nn.Parameter]:
        return _unique(m for m in (self.base_q, self.base_d) if m is not None)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return _unique(m for m in (self.proj_q, self.proj_d, self.query_head) if m is not None)

    def predictor_parameters(self) -> list[nn.Parameter]:
        return _unique(m for m in (self.predictor, self.predictor_dq) if m is not None)

    # -- forward --------------------------------------------------------------------------------

    def _features(self, base: nn.Module | None, x: Inputs) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        if base is None:
            raise ValueError("texts given but the model has no base (cached features only)")
        device = next(base.parameters()).device
        prep = getattr(base, "preprocess", None) or base.tokenize  # tokenize: ST < 6
        feats = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in prep(list(x)).items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_base):
            return base(feats)["sentence_embedding"]

    def encode_queries(self, x: Inputs) -> torch.Tensor:
        z = self.proj_q(self._features(self.base_q, x))
        return z if self.query_head is None else self.query_head(z)

    def encode_docs(self, x: Inputs) -> torch.Tensor:
        return self.proj_d(self._features(self.base_d, x))

    def predict(self, z_q: torch.Tensor) -> torch.Tensor:
        """Predicted positive-document embedding for query embeddings ``z_q``."""
        return self.predictor(z_q)

    def forward(self, queries: Inputs, docs: Inputs, negatives: Inputs | None = None,
                predict: bool = True) -> dict[str, torch.Tensor]:
        """One training step's embeddings: q, d, pred_d (and pred_q, neg when they apply).

        Everything goes through this one call so that DDP sees a single forward. Without
        ``predict`` (a phase whose λ_pred is 0) the predictors are not run: their output
        would enter no loss term, and with a 1,024-d bidirectional head they are most of a
        frozen-base step (2-3x its cost: ``benchmarks/RESULTS.md``, figure 5b).
        """
        q = self.encode_queries(queries)
        d = self.encode_docs(docs)
        out = {"q": q, "d": d}
        if predict:
            out["pred_d"] = self.predictor(q)
            if self.predictor_dq is not None:
                out["pred_q"] = self.predictor_dq(d)
        if negatives is not None:
            out["neg"] = self.encode_docs(negatives)
        return out


def _unique(modules) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
