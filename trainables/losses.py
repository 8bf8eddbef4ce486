"""Loss terms of the JEPA retrieval objective, one class a term, and their weighted sum.

``JEPALoss`` combines ``λ_pred·L_pred + λ_con·L_con + λ_iso·L_iso + λ_reg·L_reg`` from a
``LossConfig``; every term is an ``nn.Module`` usable (and tested) alone, whose ``forward``
returns a scalar and whose ``get_config_dict()`` gives its settings for logging. Every term
computes in float32 even under bf16 autocast (cross-entropies, covariances and SIGReg's
characteristic function are not safe with an 8-bit mantissa).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.config import LossConfig

Similarity = Literal["cosine", "euclidean"]
_SIMILARITIES = ("cosine", "euclidean")


def _upcast(x: Tensor) -> Tensor:
    """Returns ``x`` in float32 when it is in a half-precision dtype, else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fp32(x: Tensor) -> torch.autocast:
    """A context that turns autocast off on ``x``'s device, so matmuls run in float32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check_similarity(similarity: str) -> None:
    if similarity not in _SIMILARITIES:
        raise ValueError(f"unknown similarity {similarity!r}; valid: {list(_SIMILARITIES)}")


def pairwise_scores(a: Tensor, b: Tensor, similarity: str) -> Tensor:
    """``[N, M]`` scores (higher is closer) of the rows of ``a`` against the rows of ``b``.

    ``cosine`` is cosine similarity; ``euclidean`` the negative L2 distance, the score of
    ragcun's un-normalised Gaussian embeddings. Computed in float32 even under autocast.
    """
    _check_similarity(similarity)
    with _fp32(a):
        a, b = _upcast(a), _upcast(b)
        if similarity == "cosine":
            return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        return -torch.cdist(a, b, p=2)


def _rowwise_scores(a: Tensor, b: Tensor, similarity: str) -> Tensor:
    """Scores of row ``i`` of ``a`` against row ``i`` of ``b``: ``[N]``."""
    _check_similarity(similarity)
    if similarity == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    return -torch.linalg.vector_norm(a - b, dim=-1)


def _false_negative_mask(
    doc_ids: Sequence[Any] | None,
    hard_neg_ids: Sequence[Any] | None,
    batch: int,
    num_hard: int,
    device: torch.device,
    positives: Sequence[Collection[Any]] | None = None,
) -> Tensor | None:
    """``[B, B + H]`` mask of the candidates that are relevant to row ``i``'s query.

    ``positives[i]`` is every document judged relevant to row ``i``'s query (its own positive
    among them); without it, row ``i``'s own positive id only. In-batch column ``j != i`` is
    masked when ``doc_ids[j]`` is in that set (another positive of the same query, or the same
    document twice), hard negative column ``k`` when ``hard_neg_ids[k]`` is. None without
    ``doc_ids``.
    """
    if doc_ids is None:
        return None
    if (len(doc_ids) != batch or (hard_neg_ids is not None and len(hard_neg_ids) != num_hard)
            or (positives is not None and len(positives) != batch)):
        raise ValueError(f"doc_ids/hard_neg_ids/positives lengths do not match {batch} rows "
                         f"and {num_hard} hard negatives")
    columns = list(doc_ids) + (list(hard_neg_ids) if hard_neg_ids is not None
                               else [None] * num_hard)
    relevant = positives if positives is not None else [{d} for d in doc_ids]
    rows = [[c is not None and c in rel for c in columns] for rel in relevant]
    mask = torch.tensor(rows, dtype=torch.bool, device=device).reshape(batch, len(columns))
    mask[:, :batch].fill_diagonal_(False)
    return mask


class PredictiveLoss(nn.Module):
    """JEPA predictive term: MSE between the predicted and the actual target embedding.

    ``L = mean((pred - sg(target))²)`` over all elements, a per-dimension squared error so that
    its λ does not depend on the embedding width. With ``stopgrad`` the target is detached: the
    predictor chases the encoder, and the encoder is not pulled towards the predictor's output
    (the usual guard against the trivial solution in which both collapse together).

    Example:
        >>> loss = PredictiveLoss()
        >>> loss(torch.zeros(2, 3), torch.ones(2, 3)).item()
        1.0
    """

    def forward(self, pred: Tensor, target: Tensor, stopgrad: bool = True) -> Tensor:
        """Scalar mean squared error of ``pred`` against the (optionally detached) ``target``.

        Args:
            pred: ``[B, D]`` predictor output.
            target: ``[B, D]`` embedding to predict.
            stopgrad: detach ``target`` so no gradient reaches it.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        target = target.detach() if stopgrad else target
        return F.mse_loss(_upcast(pred), _upcast(target))

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class InfoNCELoss(nn.Module):
    """InfoNCE (multiple-negatives ranking) loss over in-batch and hard negatives.

    Row ``i`` scores query ``q_i`` against every document of the batch plus every hard
    negative (appended columns); the target is column ``i``. Scores are ``cos/T`` or
    ``-L2/T``. At chance the loss is ``log(B + H)``. Candidates relevant to row ``i``'s query
    other than its target (another positive of the same query, e.g. SciFact claims with
    several supporting abstracts; or the same document twice) are masked out (``-inf``): the
    model must not learn to push a query away from its own relevant documents.

    Example:
        >>> q = torch.eye(2); loss = InfoNCELoss(temperature=0.05)
        >>> loss(q, q) < loss(q, q.flip(0))
        tensor(True)
    """

    def __init__(self, temperature: float = 0.05, similarity: Similarity = "cosine") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        _check_similarity(similarity)
        self.temperature = temperature
        self.similarity = similarity

    def forward(
        self,
        q: Tensor,
        d: Tensor,
        hard_neg: Tensor | None = None,
        doc_ids: Sequence[Any] | None = None,
        hard_neg_ids: Sequence[Any] | None = None,
        positives: Sequence[Collection[Any]] | None = None,
    ) -> Tensor:
        """Scalar mean cross-entropy of each query over its candidates, target the positive.

        Args:
            q: ``[B, D]`` query embeddings.
            d: ``[B, D]`` positive document embeddings (row ``i`` is the positive of query i).
            hard_neg: ``[H, D]`` extra negatives shared by all rows (usually ``H = B``).
            doc_ids: ids of the ``B`` positives; a candidate with row ``i``'s positive id is
                masked for row ``i``.
            hard_neg_ids: ids of the hard negatives. Used only with ``doc_ids``.
            positives: per row, every document id relevant to its query; candidates among
                them are masked (other than row ``i``'s target). Used only with ``doc_ids``.
        """
        q, d = _upcast(q), _upcast(d)
        cands = d if hard_neg is None else torch.cat([d, _upcast(hard_neg)], dim=0)
        scores = pairwise_scores(q, cands, self.similarity) / self.temperature
        mask = _false_negative_mask(doc_ids, hard_neg_ids, q.size(0), cands.size(0) - d.size(0),
                                    q.device, positives)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        target = torch.arange(q.size(0), device=q.device)
        return F.cross_entropy(scores, target)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "similarity": self.similarity}


class MarginLoss(nn.Module):
    """Triplet margin loss: ``mean relu(margin - s(q, p) + s(q, n))``.

    ``s`` is cosine similarity or negative Euclidean distance (the latter is ragcun's
    ``relu(‖q-p‖ - ‖q-n‖ + margin)``). The negative ``n`` of row ``i`` is its hard negative
    when one is given, else the hardest in-batch negative: the other document with the highest
    score, skipping documents relevant to row ``i``'s query (its positive's id, or any id in
    ``positives[i]``). A row with no usable negative (batch of one, or every other document
    relevant) contributes 0.
    """

    def __init__(self, margin: float = 1.0, similarity: Similarity = "cosine") -> None:
        super().__init__()
        _check_similarity(similarity)
        self.margin = margin
        self.similarity = similarity

    def forward(
        self,
        q: Tensor,
        d: Tensor,
        hard_neg: Tensor | None = None,
        doc_ids: Sequence[Any] | None = None,
        positives: Sequence[Collection[Any]] | None = None,
    ) -> Tensor:
        """Scalar mean hinge on the score gap between each query's positive and negative.

        Args:
            q: ``[B, D]`` query embeddings.
            d: ``[B, D]`` positive document embeddings.
            hard_neg: ``[B, D]``: row ``i`` is the negative of query ``i``.
            doc_ids: ids of the ``B`` positives, for the in-batch search only.
            positives: per row, every document id relevant to its query (skipped by the
                in-batch search).
        """
        q, d = _upcast(q), _upcast(d)
        pos = _rowwise_scores(q, d, self.similarity)
        if hard_neg is not None:
            if hard_neg.shape != q.shape:
                raise ValueError(f"hard_neg {tuple(hard_neg.shape)} != q {tuple(q.shape)}")
            neg = _rowwise_scores(q, _upcast(hard_neg), self.similarity)
            return F.relu(self.margin - pos + neg).mean()
        scores = pairwise_scores(q, d, self.similarity)
        mask = torch.eye(q.size(0), dtype=torch.bool, device=q.device)
        dup = _false_negative_mask(doc_ids, None, q.size(0), 0, q.device, positives)
        if dup is not None:
            mask = mask | dup
        neg = scores.masked_fill(mask, float("-inf")).max(dim=1).values
        has_neg = torch.isfinite(neg)
        hinge = F.relu(self.margin - pos + torch.where(has_neg, neg, torch.zeros_like(neg)))
        return torch.where(has_neg, hinge, torch.zeros_like(hinge)).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "similarity": self.similarity}


class CovarianceIsotropyLoss(nn.Module):
    """Scale-free isotropy penalty: ``‖Cov(z) / σ̄² - I‖_F / D`` with ``σ̄² = mean(diag Cov)``.

    ragcun's penalty is ``‖Cov(z) - σ̄²·I‖_F / D``, which is quadratic in the embeddings'
    scale: shrinking them lowers it without making them any more isotropic, so it pulls
    towards collapse in scale. Dividing by the mean variance makes it a function of the
    covariance's shape only: the same for ``z`` and ``c·z``, about ``1/sqrt(N)`` for
    isotropic samples of any scale (sampling noise), and about 1 for a collapse onto one
    direction. The scale is left to the regulariser. ``Cov`` is the unbiased sample
    covariance (divisor ``N - 1``); ``σ̄²`` is the mean of its diagonal (the multiple of I
    closest to it in Frobenius norm).
    """

    def forward(self, z: Tensor) -> Tensor:
        """Scalar distance of the sample covariance's shape of ``z`` from the identity's.

        Args:
            z: ``[N, D]`` embeddings, ``N >= 2``.
        """
        if z.dim() != 2 or z.size(0) < 2:
            raise ValueError(f"need z of shape [N>=2, D], got {tuple(z.shape)}")
        with _fp32(z):
            z = _upcast(z)
            centered = z - z.mean(dim=0, keepdim=True)
            cov = centered.T @ centered / (z.size(0) - 1)
            scalar = torch.diagonal(cov).mean().clamp_min(1e-12)
            eye = torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device)
            return torch.linalg.matrix_norm(cov / scalar - eye, ord="fro") / cov.size(0)

    def get_config_dict(self) -> dict[str, Any]:
        return {}


class SIGRegLoss(nn.Module):
    """LeJEPA's SIGReg: sliced Epps-Pulley test of the embeddings against N(0, I).

    As in rbalestr-lab/lejepa (``lejepa/multivariate/slicing.py``, ``SlicingUnivariateTest``;
    ``lejepa/univariate/epps_pulley.py``, ``EppsPulley``): ``K`` directions ``A ~ N(0, 1)``
    (``[D, K]``, unit-norm columns, no gradient); projections ``x = z @ A``; per slice, on
    ``t = linspace(0, t_max, P)``, ``err(t) = (mean cos(t·x) - φ(t))² + (mean sin(t·x))²``
    with ``φ(t) = exp(-t²/2)``; ``T = N · Σ_t err(t)·w(t)·φ(t)``, where ``w`` are trapezoid
    weights on ``[0, t_max]`` doubled for the mirrored half (``2·dt``, ``dt`` at both ends)
    and ``φ`` enters once, as the integration window (the official ``weights`` buffer is
    ``w·φ``; ``err`` is not weighted again). Mean over slices.

    Under ``torch.distributed`` (initialised, world size > 1), ``c`` and ``s`` are averaged over
    ranks with the differentiable ``torch.distributed.nn.functional.all_reduce`` and ``N`` is
    the global sample count (local ``N`` × world size, as in the official code).

    Directions come from a CPU generator seeded with ``(seed, step)``: the same step gives the
    same directions on every rank and device, and a new step gives new ones (the official code
    uses a synchronised step counter the same way). Pass the global optimisation step.

    Scale: the statistic is *not* normalised. Its target is N(0, 1) per projection, so it
    depends on the embeddings' scale (std 5 is penalised as hard as a collapse), and it is ``N``
    times an integral, so at a fixed departure from Gaussianity it grows linearly with the
    batch size; for exact Gaussian samples its expectation is ``O(1)`` regardless of ``N``.
    LeJEPA weights it with λ ≈ 0.02.
    """

    def __init__(
        self, num_slices: int = 256, num_points: int = 17, t_max: float = 3.0, seed: int = 0
    ) -> None:
        super().__init__()
        if num_slices < 1 or num_points < 3 or num_points % 2 == 0 or t_max <= 0:
            raise ValueError(f"bad SIGReg settings: num_slices={num_slices} (>= 1), "
                             f"num_points={num_points} (odd, >= 3), t_max={t_max} (> 0)")
        self.num_slices = num_slices
        self.num_points = num_points
        self.t_max = t_max
        self.seed = seed
        t = torch.linspace(0, t_max, num_points, dtype=torch.float32)
        dt = t_max / (num_points - 1)
        trap = torch.full((num_points,), 2 * dt, dtype=torch.float32)
        trap[[0, -1]] = dt
        phi = torch.exp(-t.square() / 2.0)
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("phi", phi, persistent=False)
        self.register_buffer("weights", trap * phi, persistent=False)

    def directions(self, dim: int, step: int, device: torch.device | str = "cpu") -> Tensor:
        """The ``[dim, num_slices]`` unit-column projection matrix for ``step`` (float32)."""
        gen = torch.Generator(device="cpu")
        # The CPU generator keeps only 32 bits of its seed, so (seed, step) is folded into 32
        # bits: distinct steps of one seed never collide; seeds are spread by a golden-ratio
        # multiplier.
        gen.manual_seed((self.seed * 0x9E3779B1 + step) & 0xFFFFFFFF)
        a = torch.randn(dim, self.num_slices, generator=gen, dtype=torch.float32)
        a /= a.norm(p=2, dim=0)
        return a.to(device)

    def forward(self, z: Tensor, step: int = 0) -> Tensor:
        """Scalar sliced Epps-Pulley statistic of ``z`` against N(0, I), mean over slices.

        Args:
            z: ``[N, D]`` embeddings.
            step: global optimisation step; selects the random directions.
        """
        if z.dim() != 2:
            raise ValueError(f"need z of shape [N, D], got {tuple(z.shape)}")
        z = z.float()
        with torch.no_grad():
            a = self.directions(z.size(1), step, z.device)
        with _fp32(z):
            x_t = (z @ a).unsqueeze(-1) * self.t.to(z.device)  # [N, K, P]
            cos_mean = x_t.cos().mean(0)  # [K, P]
            sin_mean = x_t.sin().mean(0)
        n = z.size(0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            world = dist.get_world_size()
            cos_mean = all_reduce(cos_mean, op=dist.ReduceOp.SUM) / world
            sin_mean = all_reduce(sin_mean, op=dist.ReduceOp.SUM) / world
            n = n * world
        err = (cos_mean - self.phi.to(z.device)).square() + sin_mean.square()
        stat = (err @ self.weights.to(z.device)) * n  # [K]
        return stat.mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"num_slices": self.num_slices, "num_points": self.num_points,
                "t_max": self.t_max, "seed": self.seed}


class EmbeddingRegLoss(nn.Module):
    """Scale regulariser of the embeddings.

    ``l2``: mean squared coordinate, ``mean(z²)`` (weight decay on the outputs: keeps
    un-normalised embeddings from drifting in scale). ``std``: ``mean_d (std_d(z) - target)²``
    over dimensions (unbiased per-dimension std; ragcun applies the same penalty to the std of
    all elements at once), which also pushes dead dimensions back to life.
    """

    def __init__(self, kind: Literal["l2", "std"] = "l2", target_std: float = 1.0) -> None:
        super().__init__()
        if kind not in ("l2", "std"):
            raise ValueError(f"unknown reg kind {kind!r}; valid: ['l2', 'std']")
        self.kind = kind
        self.target_std = target_std

    def forward(self, z: Tensor) -> Tensor:
        """Scalar scale penalty of ``z`` (see the class docstring).

        Args:
            z: ``[N, D]`` embeddings (``N >= 2`` for ``std``).
        """
        z = _upcast(z)
        if self.kind == "l2":
            return z.square().mean()
        if z.size(0) < 2:
            raise ValueError("reg 'std' needs at least 2 rows")
        return (z.std(dim=0) - self.target_std).square().mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target_std": self.target_std}


class JEPALoss(nn.Module):
    """``λ_pred·L_pred + λ_con·L_con + λ_iso·L_iso + λ_reg·L_reg`` from a ``LossConfig``.

    * pred: ``PredictiveLoss(pred_d, d)``; with ``pred_q`` (bidirectional variant) the mean of
      that and ``PredictiveLoss(pred_q, q)``; both targets detached when ``cfg.stopgrad``.
    * con: ``InfoNCELoss`` or ``MarginLoss`` (``cfg.contrastive``) between ``q`` and ``d``.
    * iso: ``CovarianceIsotropyLoss`` or ``SIGRegLoss`` (``cfg.isotropy``) on ``cat([q, d])``.
    * reg: ``EmbeddingRegLoss`` on ``cat([q, d])``.

    Terms whose λ is 0 are not computed (reported as 0). Build one per training phase (phases
    may override λ's): ``JEPALoss(run_config.phase_loss(phase), similarity)``.
    """

    def __init__(self, cfg: LossConfig, similarity: Similarity = "cosine") -> None:
        super().__init__()
        self.cfg = cfg
        self.similarity = similarity
        self.pred_loss = PredictiveLoss()
        self.con_loss: nn.Module = (
            InfoNCELoss(cfg.temperature, similarity) if cfg.contrastive == "infonce"
            else MarginLoss(cfg.margin, similarity)
        )
        self.iso_loss: nn.Module = (
            CovarianceIsotropyLoss() if cfg.isotropy == "covariance"
            else SIGRegLoss(cfg.sigreg_slices, cfg.sigreg_points, cfg.sigreg_t_max)
        )
        self.reg_loss = EmbeddingRegLoss(cfg.reg, cfg.reg_target_std)

    def forward(
        self,
        q: Tensor,
        d: Tensor,
        pred_d: Tensor | None,
        *,
        pred_q: Tensor | None = None,
        hard_neg: Tensor | None = None,
        doc_ids: Sequence[Any] | None = None,
        hard_neg_ids: Sequence[Any] | None = None,
        positives: Sequence[Collection[Any]] | None = None,
        step: int = 0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the enabled terms, and every term for logging.

        Args:
            q: ``[B, D]`` query embeddings.
            d: ``[B, D]`` positive document embeddings.
            pred_d: ``[B, D]`` predictor output for ``d`` (from ``q``); None only where
                ``lambda_pred`` is 0.
            pred_q: ``[B, D]`` reverse predictor output for ``q`` (bidirectional variant).
            hard_neg: ``[B, D]`` hard negative embeddings, one per query.
            doc_ids: ids of the positives (masks duplicate positives in the contrastive term).
            hard_neg_ids: ids of the hard negatives (InfoNCE masks one relevant to the row).
            positives: per row, every document id relevant to its query: the contrastive
                term never treats them as negatives.
            step: global step (seeds SIGReg's directions).

        Returns:
            ``(total, parts)``: ``total`` carries the gradient; ``parts`` holds detached
            ``pred``, ``con``, ``iso``, ``reg`` (unweighted) and ``total``.
        """
        cfg = self.cfg
        terms: dict[str, Tensor] = {}
        if cfg.lambda_pred > 0:
            if pred_d is None:
                raise ValueError("lambda_pred > 0 needs the predictor's output (pred_d)")
            terms["pred"] = self.pred_loss(pred_d, d, cfg.stopgrad)
            if pred_q is not None:
                terms["pred"] = 0.5 * (terms["pred"] + self.pred_loss(pred_q, q, cfg.stopgrad))
        if cfg.lambda_con > 0:
            extra = {"hard_neg_ids": hard_neg_ids} if isinstance(self.con_loss, InfoNCELoss) else {}
            terms["con"] = self.con_loss(q, d, hard_neg, doc_ids, positives=positives, **extra)
        both = torch.cat([q, d], dim=0) if cfg.lambda_iso > 0 or cfg.lambda_reg > 0 else None
        if cfg.lambda_iso > 0:
            terms["iso"] = (self.iso_loss(both, step) if isinstance(self.iso_loss, SIGRegLoss)
                            else self.iso_loss(both))
        if cfg.lambda_reg > 0:
            terms["reg"] = self.reg_loss(both)

        lambdas = {"pred": cfg.lambda_pred, "con": cfg.lambda_con, "iso": cfg.lambda_iso,
                   "reg": cfg.lambda_reg}
        total = sum((lambdas[k] * v for k, v in terms.items()), torch.zeros((), device=q.device))
        zero = torch.zeros((), device=q.device)
        parts = {k: terms[k].detach() if k in terms else zero for k in lambdas}
        parts["total"] = total.detach()
        return total, parts

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.cfg.model_dump(), "similarity": self.similarity}
