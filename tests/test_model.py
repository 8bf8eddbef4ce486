"""Shapes, parameter counts and initial behaviour of the encoder heads and predictor."""

from __future__ import annotations

import pytest
import torch

from trainables.config import ModelConfig, PredictorConfig
from trainables.model import JEPAModel, Predictor, Projection, load_base

D, H = 512, 1024


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("depth,expected", [
    (1, D * D + D),
    (2, (D * H + H) + (H * D + D)),
    (3, (D * H + H) + (H * H + H) + (H * D + D)),
    (6, (D * H + H) + 4 * (H * H + H) + (H * D + D)),
])
def test_predictor_parameter_count(depth, expected):
    pred = Predictor(D, PredictorConfig(depth=depth, hidden_mult=2.0))
    assert _n(pred) == expected
    assert sum(isinstance(m, torch.nn.Linear) for m in pred.modules()) == depth
    assert pred(torch.randn(3, D)).shape == (3, D)


def test_residual_predictor_starts_as_identity_and_plain_does_not():
    x = torch.randn(4, D)
    res = Predictor(D, PredictorConfig(depth=3, residual=True)).eval()
    plain = Predictor(D, PredictorConfig(depth=3, residual=False)).eval()
    assert torch.allclose(res(x), x)
    assert not torch.allclose(plain(x), x)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_preserves_inner_products_at_init(kind):
    x = torch.randn(16, 384)
    z = Projection(384, D, kind).eval()(x)
    assert z.shape == (16, D)
    assert torch.allclose(x @ x.T, z @ z.T, atol=1e-3)


def test_variants_share_or_split_parameters():
    shared = JEPAModel(ModelConfig(variant="shared"), base_dim=384)
    asym = JEPAModel(ModelConfig(variant="asymmetric"), base_dim=384)
    bidi = JEPAModel(ModelConfig(variant="bidirectional"), base_dim=384)
    proj = 384 * D + D
    pred = _n(shared.predictor)
    assert _n(shared) == proj + pred
    assert shared.proj_q is shared.proj_d
    assert _n(asym) == 2 * proj + pred
    assert asym.proj_q is not asym.proj_d
    assert _n(bidi) == proj + 2 * pred
    feats_q, feats_d = torch.randn(5, 384), torch.randn(5, 384)
    out = bidi(feats_q, feats_d, torch.randn(5, 384))
    assert set(out) == {"q", "d", "pred_d", "pred_q", "neg"}
    assert all(v.shape == (5, D) for v in out.values())
    assert "pred_q" not in shared(feats_q, feats_d)
    bidi.eval()
    plain = bidi(feats_q, feats_d, predict=False)  # a phase whose λ_pred is 0
    assert set(plain) == {"q", "d"}
    assert torch.equal(plain["q"], out["q"]) and torch.equal(plain["d"], out["d"])


def test_cached_model_refuses_texts():
    model = JEPAModel(ModelConfig(), base_dim=384)
    with pytest.raises(ValueError, match="texts"):
        model.encode_queries(["a query"])


@pytest.mark.slow
def test_trainable_base_from_texts_gets_gradients():
    base = load_base("all-MiniLM-L6-v2", 64)
    model = JEPAModel(ModelConfig(freeze_base=False, variant="asymmetric", output_dim=32), base)
    out = model(["what is dna", "a query"], ["dna is a molecule", "a document"])
    out["pred_d"].sum().backward()
    q_grads = [p.grad for p in model.base_q.parameters() if p.grad is not None]
    assert q_grads and any(g.abs().sum() > 0 for g in q_grads)
    # the document base is a separate copy in the asymmetric variant
    assert model.base_d is not model.base_q
    assert len(model.base_parameters()) == 2 * len(list(base.parameters()))


def test_frozen_base_gets_no_gradient():
    base = load_base("all-MiniLM-L6-v2", 64)
    model = JEPAModel(ModelConfig(freeze_base=True, output_dim=32), base)
    out = model(["what is dna"], ["dna is a molecule"])
    assert not any(p.requires_grad for p in model.base_parameters())
    assert out["q"].requires_grad  # the projection still trains


def test_query_head_is_the_predictors_shape_on_the_query_side_only():
    cfg = ModelConfig(query_head=True, predictor=PredictorConfig(depth=3, hidden_mult=1.0,
                                                                 residual=True))
    model = JEPAModel(cfg, base_dim=384).eval()
    plain = JEPAModel(ModelConfig(predictor=cfg.predictor), base_dim=384)
    assert _n(model.query_head) == _n(model.predictor)  # capacity matched, layer for layer
    assert _n(model) == _n(plain) + _n(model.predictor)
    x = torch.randn(5, 384)
    # residual: starts as the identity, so at step 0 it scores like the plain query tower
    assert torch.allclose(model.encode_queries(x), model.proj_q(x))
    assert torch.equal(model.encode_docs(x), model.proj_d(x))
    params = {id(p) for p in model.encoder_parameters()}
    assert all(id(p) in params for p in model.query_head.parameters())
    assert JEPAModel(ModelConfig(), base_dim=384).query_head is None
