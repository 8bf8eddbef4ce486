"""Tests of ``trainables.losses``: closed-form values on hand-built tensors, and properties."""

from __future__ import annotations

import math

import pytest
import torch

from trainables.config import ConfigError, LossConfig, RunConfig
from trainables.losses import (
    CovarianceIsotropyLoss,
    EmbeddingRegLoss,
    InfoNCELoss,
    JEPALoss,
    MarginLoss,
    PredictiveLoss,
    SIGRegLoss,
)

E1 = torch.tensor([1.0, 0.0])
E2 = torch.tensor([0.0, 1.0])


def _eye_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.stack([E1, E2])
    return q, q.clone()


def _reference_epps_pulley(x: torch.Tensor, t_max: float = 3.0, points: int = 17) -> float:
    """Independent SIGReg statistic of 1-d samples: trapezoid over the symmetric [-t_max, t_max]."""
    t = torch.linspace(-t_max, t_max, 2 * points - 1, dtype=torch.float64)
    x = x.double()
    ecf_re = torch.cos(x[:, None] * t).mean(0)
    ecf_im = torch.sin(x[:, None] * t).mean(0)
    phi = torch.exp(-t**2 / 2)
    err = (ecf_re - phi) ** 2 + ecf_im**2
    return float(torch.trapezoid(err * phi, t) * x.numel())


# -- predictive ---------------------------------------------------------------------------


def test_predictive_closed_form() -> None:
    loss = PredictiveLoss()
    assert loss(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(1.0)
    assert loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])).item() == pytest.approx(4.0)
    assert loss(torch.ones(2, 3), torch.ones(2, 3)).item() == 0.0


@pytest.mark.parametrize("stopgrad", [True, False])
def test_predictive_stopgrad(stopgrad: bool) -> None:
    pred = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    out = PredictiveLoss()(pred, target, stopgrad=stopgrad)
    assert out.dim() == 0 and out.requires_grad
    out.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    if stopgrad:
        assert target.grad is None or target.grad.abs().sum() == 0
    else:
        assert target.grad is not None and target.grad.abs().sum() > 0


def test_predictive_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="differ"):
        PredictiveLoss()(torch.zeros(2, 3), torch.zeros(3, 2))


# -- InfoNCE ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_infonce_orthogonal_closed_form(temperature: float) -> None:
    q, d = _eye_pairs()
    loss = InfoNCELoss(temperature)
    # scores/T: [[1, 0], [0, 1]] / T -> -log(e^{1/T} / (e^{1/T} + 1)) per row.
    assert loss(q, d).item() == pytest.approx(math.log1p(math.exp(-1 / temperature)), rel=1e-5)
    assert loss(q, d.flip(0)).item() == pytest.approx(math.log1p(math.exp(1 / temperature)),
                                                      rel=1e-5)


def test_infonce_euclidean_closed_form() -> None:
    q, d = _eye_pairs()
    # distances [[0, sqrt2], [sqrt2, 0]] -> scores -dist/T.
    out = InfoNCELoss(0.5, "euclidean")(q, d)
    assert out.item() == pytest.approx(math.log1p(math.exp(-math.sqrt(2) / 0.5)), rel=1e-5)


def test_infonce_chance_is_log_candidates() -> None:
    q = torch.zeros(4, 3)  # cosine of a zero vector is 0 everywhere: uniform softmax
    assert InfoNCELoss(0.05)(q, torch.randn(4, 3)).item() == pytest.approx(math.log(4))
    out = InfoNCELoss(0.05)(q, torch.randn(4, 3), hard_neg=torch.randn(4, 3))
    assert out.item() == pytest.approx(math.log(8))


def test_infonce_hard_negatives_closed_form() -> None:
    q, d = _eye_pairs()
    hard = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # row 0 scores [1, 0, 0.6, 0.8]; row 1 [0, 1, 0.8, 0.6]: the same loss.
    expected = -1 + math.log(math.e + 1 + math.exp(0.6) + math.exp(0.8))
    out = InfoNCELoss(1.0)(q, d, hard_neg=hard)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    assert out.item() > InfoNCELoss(1.0)(q, d).item()


def test_infonce_masks_duplicate_positives() -> None:
    e = torch.eye(3)
    q = torch.stack([e[0], e[0], e[2]])
    d = q.clone()
    loss = InfoNCELoss(1.0)
    e1 = math.e
    # unmasked: rows 0, 1 see [1, 1, 0] -> log((2e + 1) / e); row 2 [0, 0, 1] -> log((e + 2) / e)
    unmasked = (2 * math.log((2 * e1 + 1) / e1) + math.log((e1 + 2) / e1)) / 3
    # masked: the twin column of rows 0 and 1 is -inf -> log((e + 1) / e)
    masked = (2 * math.log((e1 + 1) / e1) + math.log((e1 + 2) / e1)) / 3
    assert loss(q, d).item() == pytest.approx(unmasked, rel=1e-5)
    assert loss(q, d, doc_ids=["a", "a", "b"]).item() == pytest.approx(masked, rel=1e-5)
    assert loss(q, d, doc_ids=["a", "b", "c"]).item() == pytest.approx(unmasked, rel=1e-5)


def test_infonce_masks_hard_negative_equal_to_positive() -> None:
    q, d = _eye_pairs()
    hard = torch.stack([E1, E1])  # the second hard negative is doc "a", row 0's positive
    loss = InfoNCELoss(1.0)
    plain = loss(q, d, hard_neg=hard, doc_ids=["a", "b"]).item()
    masked = loss(q, d, hard_neg=hard, doc_ids=["a", "b"], hard_neg_ids=["x", "a"]).item()
    # row 0: [1, 0, 1, 1] -> [1, 0, 1, -inf]; row 1 ([0, 1, 0, 0]) has no "a" positive.
    row0_plain = -1 + math.log(3 * math.e + 1)
    row0_masked = -1 + math.log(2 * math.e + 1)
    row1 = -1 + math.log(math.e + 3)
    assert plain == pytest.approx((row0_plain + row1) / 2, rel=1e-5)
    assert masked == pytest.approx((row0_masked + row1) / 2, rel=1e-5)


def test_infonce_masks_other_positives_of_the_same_query() -> None:
    # Rows 0 and 1 are one query with two relevant documents "a" and "b" (SciFact claims have
    # several): each row's other positive is not a negative; row 2's query is unrelated.
    e = torch.eye(3)
    q = torch.stack([e[0], e[0], e[2]])
    d = torch.stack([e[0], 0.9 * e[0] + 0.1 * e[1], e[2]])
    loss = InfoNCELoss(1.0)
    ids = ["a", "b", "c"]
    plain = loss(q, d, doc_ids=ids).item()
    masked = loss(q, d, doc_ids=ids, positives=[{"a", "b"}, {"a", "b"}, {"c"}]).item()
    scores = torch.nn.functional.normalize(d, dim=-1)
    s = (torch.nn.functional.normalize(q, dim=-1) @ scores.T).tolist()
    row = [math.log(sum(math.exp(x) for j, x in enumerate(s[i]) if keep(i, j))) - s[i][i]
           for i, keep in ((0, lambda i, j: j != 1), (1, lambda i, j: j != 0),
                           (2, lambda i, j: True))]
    assert masked == pytest.approx(sum(row) / 3, rel=1e-5)
    assert masked < plain  # the twin positives no longer push each other away
    # a hard negative that is relevant to the row's query is masked too
    hard = torch.stack([d[1], e[1], e[1]])
    kept = loss(q, d, hard_neg=hard, doc_ids=ids, hard_neg_ids=["b", "x", "x"]).item()
    masked_hard = loss(q, d, hard_neg=hard, doc_ids=ids, hard_neg_ids=["b", "x", "x"],
                       positives=[{"a", "b"}, {"a", "b"}, {"c"}]).item()
    assert masked_hard < kept


def test_infonce_properties() -> None:
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    d = (q + 0.1 * torch.randn(8, 16)).detach().requires_grad_()
    loss = InfoNCELoss(0.05)
    matched = loss(q, d)
    assert matched.dim() == 0 and matched.requires_grad
    assert matched.item() < loss(q, d.roll(1, 0)).item()
    matched.backward()
    assert q.grad.abs().sum() > 0 and d.grad.abs().sum() > 0


def test_infonce_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="similarity"):
        InfoNCELoss(0.05, "dot")  # type: ignore[arg-type]
    q, d = _eye_pairs()
    with pytest.raises(ValueError, match="doc_ids"):
        InfoNCELoss(0.05)(q, d, doc_ids=["a"])


# -- margin -------------------------------------------------------------------------------


def test_margin_cosine_in_batch() -> None:
    q, d = _eye_pairs()
    loss = MarginLoss(0.5)
    assert loss(q, d).item() == pytest.approx(0.0)  # relu(0.5 - 1 + 0)
    assert loss(q, d.flip(0)).item() == pytest.approx(1.5)  # relu(0.5 - 0 + 1)


def test_margin_uses_hard_negatives_when_given() -> None:
    q, d = _eye_pairs()
    hard = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    # row 0: relu(0.5 - 1 + s(e1, (.6, .8)) = 0.6) = 0.1; row 1 the same.
    assert MarginLoss(0.5)(q, d, hard_neg=hard).item() == pytest.approx(0.1, rel=1e-5)


def test_margin_euclidean_ragcun_form() -> None:
    q = torch.tensor([[0.0, 0.0]])
    d = torch.tensor([[1.0, 0.0]])
    loss = MarginLoss(1.0, "euclidean")
    # relu(|q-p| - |q-n| + margin)
    assert loss(q, d, hard_neg=torch.tensor([[0.0, 3.0]])).item() == pytest.approx(0.0)
    assert loss(q, d, hard_neg=torch.tensor([[0.0, 1.5]])).item() == pytest.approx(0.5)
    assert loss(q, d).item() == 0.0  # no in-batch negative for a batch of one


def test_margin_euclidean_hardest_in_batch() -> None:
    q = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    d = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 12.0]])
    # nearest other document: row 0 -> d1 (sqrt 101), row 1 -> d0 (9), row 2 -> d0 (sqrt 101)
    expected = ((20 + 1 - math.sqrt(101)) + (20 + 1 - 9) + (20 + 2 - math.sqrt(101))) / 3
    assert MarginLoss(20.0, "euclidean")(q, d).item() == pytest.approx(expected, rel=1e-5)


def test_margin_masks_duplicate_positives() -> None:
    q = torch.stack([E1, E1, E2])
    d = q.clone()
    loss = MarginLoss(0.5)
    # unmasked: rows 0, 1 take their twin (score 1) as the hardest negative: relu(0.5) each.
    assert loss(q, d).item() == pytest.approx(1 / 3)
    assert loss(q, d, doc_ids=["a", "a", "b"]).item() == pytest.approx(0.0)


def test_margin_skips_other_positives_of_the_same_query() -> None:
    q = torch.stack([E1, E1, E2])
    d = torch.stack([E1, 0.99 * E1 + 0.01 * E2, E2])
    loss = MarginLoss(0.5)
    # without positives, row 0's hardest negative is "b" (its own query's other positive)
    assert loss(q, d, doc_ids=["a", "b", "c"]).item() > 0.3
    # with them, rows 0 and 1 only have "c" (score 0) left: relu(0.5 - 1 + 0) = 0
    assert loss(q, d, doc_ids=["a", "b", "c"],
                positives=[{"a", "b"}, {"a", "b"}, {"c"}]).item() == pytest.approx(0.0)


def test_margin_properties() -> None:
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    d = q.detach() + 0.1 * torch.randn(8, 16)
    out = MarginLoss(0.5)(q, d)
    assert out.dim() == 0 and out.requires_grad
    assert out.item() < MarginLoss(0.5)(q, d.roll(1, 0)).item()


# -- covariance isotropy ------------------------------------------------------------------


def test_covariance_isotropy_closed_form() -> None:
    loss = CovarianceIsotropyLoss()
    # Cov = [[2, 0], [0, 0]]; mean var 1; ||diag(1, -1)||_F / 2
    assert loss(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(
        math.sqrt(2) / 2)
    # Cov = [[2, 2], [2, 2]]; mean var 2; ||[[0, 1], [1, 0]]||_F / 2
    assert loss(torch.tensor([[1.0, 1.0], [-1.0, -1.0]])).item() == pytest.approx(
        math.sqrt(2) / 2)
    # Cov = 2/3 I: isotropic, at any scale
    iso = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert loss(iso).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(5 * iso).item() == pytest.approx(0.0, abs=1e-6)


def test_covariance_isotropy_is_scale_free() -> None:
    torch.manual_seed(0)
    loss = CovarianceIsotropyLoss()
    n, dim = 4096, 32
    # isotropic Gaussian samples of any scale score ~0: only sampling noise, about
    # sqrt(D (D + 1) / N) / D
    noise = math.sqrt(dim * (dim + 1) / n) / dim
    gauss = torch.randn(n, dim)
    for scale in (1e-3, 1.0, 1e3):
        assert loss(scale * gauss).item() < 1.5 * noise
    # shrinking (or growing) embeddings leaves the penalty as it is: no pull towards a
    # collapse in scale, as the unnormalised ||Cov - s I||_F / D (quadratic in scale) has
    aniso = gauss * torch.linspace(0.1, 3.0, dim)
    base = loss(aniso).item()
    assert base > 5 * noise
    for scale in (1e-2, 0.5, 10.0):
        assert loss(scale * aniso).item() == pytest.approx(base, rel=1e-4)
    # a collapse onto one direction scores ~1
    line = torch.randn(n, 1) * torch.ones(1, dim)
    assert loss(line).item() == pytest.approx(1.0, abs=0.05)


def test_covariance_isotropy_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="N>=2"):
        CovarianceIsotropyLoss()(torch.zeros(1, 4))


# -- SIGReg -------------------------------------------------------------------------------


def test_sigreg_matches_symmetric_trapezoid_in_1d() -> None:
    # In 1-d the unit direction is +-1 and the statistic is sign-invariant, so it must equal
    # an independent full-range trapezoid integral of |ecf - phi|^2 * phi times N.
    torch.manual_seed(1)
    loss = SIGRegLoss(num_slices=4)
    for x in (torch.randn(64), torch.zeros(8), 2.0 * torch.randn(32) + 0.5):
        expected = _reference_epps_pulley(x)
        assert loss(x[:, None]).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("points", [2, 16, 18])
def test_sigreg_needs_an_odd_number_of_points(points: int) -> None:
    with pytest.raises(ValueError, match="odd"):
        SIGRegLoss(num_points=points)
    with pytest.raises(ConfigError, match="sigreg_points"):
        RunConfig.from_dict({"loss": {"sigreg_points": points}})


def test_sigreg_weights_are_official_buffers() -> None:
    loss = SIGRegLoss(num_points=17, t_max=3.0)
    dt = 3.0 / 16
    assert loss.t[0] == 0 and loss.t[-1] == pytest.approx(3.0)
    assert loss.weights[0].item() == pytest.approx(dt)  # phi(0) = 1
    assert loss.weights[1].item() == pytest.approx(2 * dt * math.exp(-(dt**2) / 2))
    assert loss.weights[-1].item() == pytest.approx(dt * math.exp(-4.5))


def test_sigreg_gaussian_small_deviations_large() -> None:
    torch.manual_seed(0)
    n, dim = 512, 64
    loss = SIGRegLoss(num_slices=256)
    gauss = loss(torch.randn(n, dim)).item()
    # E[N |ecf - phi|^2] = 1 - phi^2 for exact N(0, 1) samples, so E[stat] is
    # int_{-3}^{3} (1 - phi^2) phi dt ~= 1.06 whatever N is.
    t = torch.linspace(-3, 3, 33, dtype=torch.float64)
    phi = torch.exp(-t**2 / 2)
    expected = torch.trapezoid((1 - phi**2) * phi, t).item()
    mean = sum(loss(torch.randn(n, dim), step=s).item() for s in range(4)) / 4
    assert mean == pytest.approx(expected, rel=0.25)
    aniso = torch.randn(n, dim)
    aniso[:, 0] *= 10
    u = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    bad = {
        "collapsed": torch.zeros(n, dim),
        "constant": torch.full((n, dim), 0.7),
        "scaled": 5 * torch.randn(n, dim),
        "rank1": torch.randn(n, 1) * u,
        "anisotropic": aniso,
    }
    for name, z in bad.items():
        assert loss(z).item() > 20 * gauss, name


def test_sigreg_grows_with_batch_for_a_fixed_departure() -> None:
    torch.manual_seed(0)
    loss = SIGRegLoss(num_slices=64)
    small = loss(2 * torch.randn(256, 16)).item()
    large = loss(2 * torch.randn(2048, 16)).item()
    assert large / small == pytest.approx(8, rel=0.25)


def test_sigreg_deterministic_per_step() -> None:
    torch.manual_seed(0)
    z = torch.randn(128, 32)
    loss = SIGRegLoss(num_slices=16, seed=3)
    assert loss(z, step=5).item() == loss(z, step=5).item()
    assert loss(z, step=5).item() != loss(z, step=6).item()
    assert SIGRegLoss(num_slices=16, seed=3)(z, step=5).item() == loss(z, step=5).item()
    assert SIGRegLoss(num_slices=16, seed=4)(z, step=5).item() != loss(z, step=5).item()
    a = loss.directions(32, step=5)
    assert a.shape == (32, 16) and not a.requires_grad
    assert torch.allclose(a.norm(dim=0), torch.ones(16))
    assert torch.equal(a, loss.directions(32, step=5))
    assert not torch.equal(a, loss.directions(32, step=6))


def test_sigreg_gradient_flows() -> None:
    z = (2 * torch.randn(64, 8)).requires_grad_()
    out = SIGRegLoss(num_slices=8)(z)
    assert out.dim() == 0 and out.requires_grad
    out.backward()
    assert z.grad.abs().sum() > 0


# -- embedding regulariser ----------------------------------------------------------------


def test_embedding_reg_closed_form() -> None:
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert EmbeddingRegLoss("l2")(z).item() == pytest.approx(7.5)
    # per-dim unbiased std of [[0, 0], [2, 4]]: sqrt 2 and 2 sqrt 2
    z = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    expected = ((math.sqrt(2) - 1) ** 2 + (2 * math.sqrt(2) - 1) ** 2) / 2
    assert EmbeddingRegLoss("std", 1.0)(z).item() == pytest.approx(expected, rel=1e-6)
    assert EmbeddingRegLoss("std", math.sqrt(2))(torch.tensor([[0.0], [2.0]])).item() == \
        pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="reg kind"):
        EmbeddingRegLoss("l1")  # type: ignore[arg-type]


# -- combined -----------------------------------------------------------------------------


def _batch(seed: int = 0, b: int = 8, dim: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, dim, generator=g, requires_grad=True)
    d = torch.randn(b, dim, generator=g, requires_grad=True)
    w = torch.randn(dim, dim, generator=g, requires_grad=True)
    return {"q": q, "d": d, "w": w, "pred_d": q @ w}


@pytest.mark.parametrize("contrastive,isotropy,reg", [
    ("infonce", "covariance", "l2"), ("margin", "sigreg", "std")])
def test_jepa_total_is_weighted_sum(contrastive: str, isotropy: str, reg: str) -> None:
    cfg = LossConfig(lambda_pred=1.0, lambda_con=0.5, lambda_iso=0.25, lambda_reg=0.1,
                     contrastive=contrastive, isotropy=isotropy, reg=reg, sigreg_slices=16)
    x = _batch()
    total, parts = JEPALoss(cfg)(x["q"], x["d"], x["pred_d"], step=3)
    assert set(parts) == {"pred", "con", "iso", "reg", "total"}
    assert total.requires_grad and total.dim() == 0
    expected = (1.0 * parts["pred"] + 0.5 * parts["con"] + 0.25 * parts["iso"]
                + 0.1 * parts["reg"])
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["total"].item() == pytest.approx(total.item())
    assert all(parts[k].item() > 0 for k in ("pred", "con", "iso", "reg"))
    # each part is the standalone term
    assert parts["pred"].item() == pytest.approx(
        PredictiveLoss()(x["pred_d"], x["d"]).item())
    both = torch.cat([x["q"], x["d"]])
    iso = (SIGRegLoss(16)(both, step=3) if isotropy == "sigreg"
           else CovarianceIsotropyLoss()(both))
    assert parts["iso"].item() == pytest.approx(iso.item(), rel=1e-6)


class _Forbidden(torch.nn.Module):
    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("a term with lambda 0 was computed")


def test_jepa_skips_zero_lambda_terms() -> None:
    cfg = LossConfig(lambda_pred=1.0, lambda_con=0.0, lambda_iso=0.0, lambda_reg=0.0)
    loss = JEPALoss(cfg)
    loss.con_loss = loss.iso_loss = loss.reg_loss = _Forbidden()
    x = _batch()
    total, parts = loss(x["q"], x["d"], x["pred_d"])
    assert parts["con"].item() == parts["iso"].item() == parts["reg"].item() == 0.0
    assert total.item() == pytest.approx(parts["pred"].item())
    # without λ_pred the predictor's output may be absent (its forward was skipped) ...
    off = JEPALoss(LossConfig(lambda_pred=0.0, lambda_con=1.0))
    total, parts = off(x["q"], x["d"], None)
    assert parts["pred"].item() == 0.0 and total.item() == pytest.approx(parts["con"].item())
    # ... and with it, its absence is a named error, not a silent zero
    with pytest.raises(ValueError, match="pred_d"):
        loss(x["q"], x["d"], None)


@pytest.mark.parametrize("stopgrad", [True, False])
def test_jepa_pred_stopgrad(stopgrad: bool) -> None:
    cfg = LossConfig(lambda_pred=1.0, stopgrad=stopgrad)
    x = _batch()
    total, _ = JEPALoss(cfg)(x["q"], x["d"], x["pred_d"])
    total.backward()
    assert x["w"].grad is not None and x["w"].grad.abs().sum() > 0
    if stopgrad:
        assert x["d"].grad is None or x["d"].grad.abs().sum() == 0
    else:
        assert x["d"].grad is not None and x["d"].grad.abs().sum() > 0


def test_jepa_bidirectional_averages_both_directions() -> None:
    x = _batch()
    pred_q = x["d"] @ x["w"].T
    loss = JEPALoss(LossConfig(lambda_pred=2.0))
    total, parts = loss(x["q"], x["d"], x["pred_d"], pred_q=pred_q)
    fwd = PredictiveLoss()(x["pred_d"], x["d"]).item()
    bwd = PredictiveLoss()(pred_q, x["q"]).item()
    assert parts["pred"].item() == pytest.approx((fwd + bwd) / 2)
    assert total.item() == pytest.approx(2.0 * (fwd + bwd) / 2)


def test_jepa_passes_doc_ids_and_hard_negatives() -> None:
    q = torch.stack([E1, E1, E2])
    cfg = LossConfig(lambda_pred=0.0, lambda_con=1.0, contrastive="margin", margin=0.5)
    loss = JEPALoss(cfg)
    _, masked = loss(q, q, q, doc_ids=["a", "a", "b"])
    _, unmasked = loss(q, q, q)
    assert masked["con"].item() == pytest.approx(0.0)
    assert unmasked["con"].item() == pytest.approx(1 / 3)
    hard = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.8, 0.6]])
    _, with_hard = loss(q, q, q, hard_neg=hard)
    assert with_hard["con"].item() == pytest.approx(0.1, rel=1e-5)


def test_jepa_loss_of_a_phase() -> None:
    cfg = RunConfig.from_dict({"loss": {"lambda_pred": 1.0}, "model": {
        "similarity": "euclidean"}, "train": {"phases": [{"name": "isotropy_finetune", "loss": {
            "lambda_pred": 0.0, "lambda_iso": 1.0, "isotropy": "sigreg"}}]}})
    phase = JEPALoss(cfg.phase_loss(cfg.train.phases[0]), cfg.model.similarity)
    assert isinstance(phase.iso_loss, SIGRegLoss)
    assert phase.similarity == "euclidean" and phase.cfg.lambda_pred == 0.0
    assert phase.get_config_dict()["lambda_iso"] == 1.0


def test_half_precision_inputs_give_float32_losses() -> None:
    q, d = _eye_pairs()
    out = InfoNCELoss(1.0)(q.bfloat16(), d.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-5)
    assert SIGRegLoss(8)(torch.randn(16, 4).bfloat16()).dtype == torch.float32


def test_euclidean_gradients_finite_at_zero_distance() -> None:
    q = torch.randn(40, 8, requires_grad=True)  # > 25 rows: cdist's matmul path
    (InfoNCELoss(0.05, "euclidean")(q, q) + MarginLoss(1.0, "euclidean")(q, q)).backward()
    assert torch.isfinite(q.grad).all()


def test_jepa_passes_hard_negative_ids_to_infonce() -> None:
    q, d = _eye_pairs()
    hard = torch.stack([E1, E1])
    loss = JEPALoss(LossConfig(lambda_pred=0.0, lambda_con=1.0, temperature=1.0))
    _, plain = loss(q, d, q, hard_neg=hard, doc_ids=["a", "b"])
    _, masked = loss(q, d, q, hard_neg=hard, doc_ids=["a", "b"], hard_neg_ids=["x", "a"])
    assert masked["con"].item() < plain["con"].item()
