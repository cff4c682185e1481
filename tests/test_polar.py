"""PoLAR-VBLL: Stiefel retraction, zero update at init, sites/shapes, param store, one decoder pass, training."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.poutine.util import site_is_subsample

from conftest import LABEL_WORDS, direct_letter_logits, synthetic_examples, strict_warnings
from scalabl_pyro.backbones import tiny_llama
from scalabl_pyro.config import ScalaBLConfig, TrainConfig
from scalabl_pyro.baselines.polar import (HEAD_SITE, PolarVBLL, orthogonality_error, polar_guide, polar_retract,
                                          retract_every, stiefel_retract)
from scalabl_pyro.harness.methods import train_polar_vbll
from scalabl_pyro.scoring import AdaptedLM
from scalabl_pyro.train import fit

CFG = ScalaBLConfig(r=4, scoring="letter", target_modules=("q_proj", "v_proj"))
MODULES = [f"model_layers_{i}_self_attn_{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def _net(cfg=CFG, subspace=False):
    lm, tok = tiny_llama()
    return AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=cfg, subspace=subspace)


def _sample_sites(tr):
    return [n for n, s in tr.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic")]


def _count_decoder_calls(net):
    calls = []
    net.decoder.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


# ------------------------------------------------------------------------------------------ retraction
@pytest.mark.parametrize("method", ["polar", "qr"])
def test_stiefel_retract_perturbed(method):
    gen = torch.Generator().manual_seed(0)
    X = torch.linalg.qr(torch.randn(20, 4, generator=gen))[0]
    M = X + 0.1 * torch.randn(20, 4, generator=gen)
    Q = stiefel_retract(M, method)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4), atol=1e-6, rtol=0)
    assert (Q.T @ Q - torch.eye(4)).abs().max() < (M.T @ M - torch.eye(4)).abs().max() / 100
    if method == "polar":  # the nearest orthonormal matrix: U V^T of the perturbed matrix
        u, _, vh = torch.linalg.svd(M.double(), full_matrices=False)
        torch.testing.assert_close(Q.double(), u @ vh, atol=1e-6, rtol=0)
        assert torch.linalg.norm(M - Q) <= torch.linalg.norm(M - stiefel_retract(M, "qr")) + 1e-6
    else:  # same column space, and Q^T M is upper triangular with a positive diagonal
        torch.testing.assert_close(Q @ (Q.T @ M), M, atol=1e-5, rtol=0)
        R = Q.T @ M
        torch.testing.assert_close(R, R.triu(), atol=1e-5, rtol=0)
        assert (R.diagonal() > 0).all()
    torch.testing.assert_close(stiefel_retract(X, method), X, atol=1e-6, rtol=0)  # a fixed point on the manifold


def test_polar_retract_layers_in_place():
    model = PolarVBLL(_net())
    layer = model.polar[MODULES[1]]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.X.weight.add_(0.1 * torch.randn(layer.X.weight.shape, generator=gen))
        layer.Y.weight.add_(0.1 * torch.randn(layer.Y.weight.shape, generator=gen))
    assert orthogonality_error(model) > 1e-2
    X_pert = layer.X.weight.detach().clone()
    polar_retract(model)
    assert orthogonality_error(model) < 1e-5
    u, _, vh = torch.linalg.svd(X_pert.double(), full_matrices=False)
    torch.testing.assert_close(layer.X.weight.double(), u @ vh, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ init
def test_init_orthonormal_and_zero_update():
    net = _net()
    model = PolarVBLL(net)
    assert orthogonality_error(model) < 1e-5
    assert list(model.polar) == MODULES
    for layer in model.polar.values():
        assert torch.equal(layer.theta, torch.zeros(4, 4)) and layer.X.weight.abs().sum() > 0
    exs = synthetic_examples(4)
    batch = net.collate(exs)
    lm0, tok0 = tiny_llama()  # the unadapted model, same weights, full LM head
    ref = torch.stack([direct_letter_logits(lm0, tok0, ex, net.label_token_ids) for ex in exs])
    with torch.no_grad():
        logits = model.head_logits(model.hidden(batch), model.W0[None])[0]
        tr = poutine.trace(poutine.condition(model, {HEAD_SITE: model.W0})).get_trace(batch, batch["labels"])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tr.nodes["probs"]["value"], ref.softmax(-1), atol=1e-5, rtol=1e-4)


def test_update_is_X_theta_Yt():
    model = PolarVBLL(_net())
    batch = model.net.collate(synthetic_examples(3))
    with torch.no_grad():
        before = model.hidden(batch)
        gen = torch.Generator().manual_seed(1)
        for layer in model.polar.values():
            layer.theta.copy_(torch.randn(4, 4, generator=gen))
        peft_layer = model.net.peft_model.base_model.model.model.layers[0].self_attn.v_proj
        layer = model.polar[MODULES[1]]
        x = torch.randn(5, 32, generator=gen)
        X, Y = layer.factors()
        expected = peft_layer.base_layer(x) + x @ (X @ layer.theta @ Y.T).T * layer.scaling
        torch.testing.assert_close(peft_layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.delta_weight(), (X @ layer.theta @ Y.T) * 2.0)  # scaling = 2r / r
        assert (model.hidden(batch) - before).abs().max() > 1e-3


def test_rejects_wrong_nets():
    with pytest.raises(ValueError, match="lm_head"):
        PolarVBLL(_net(ScalaBLConfig(r=4, scoring="letter")))
    with pytest.raises(ValueError, match="subspace=False"):
        PolarVBLL(_net(subspace=True, cfg=CFG))


# ------------------------------------------------------------------------------------------ Pyro model
def test_trace_sites_shapes_and_param_store():
    model = PolarVBLL(_net(), num_data=50)
    assert model.latent_sites == [HEAD_SITE] and model.name == "polar"
    batch = model.net.collate(synthetic_examples(5))
    tr = poutine.trace(model).get_trace(batch, batch["labels"])
    assert _sample_sites(tr) == ["head.W", "obs"]
    assert tr.nodes["head.W"]["value"].shape == (3, 32) and not tr.nodes["head.W"]["is_observed"]
    assert tr.nodes["obs"]["value"].shape == (5,) and tr.nodes["obs"]["is_observed"]
    assert tr.nodes["obs"]["scale"] == pytest.approx(10.0)
    probs = tr.nodes["probs"]
    assert probs["infer"].get("_deterministic") and probs["value"].shape == (5, 3)
    torch.testing.assert_close(probs["value"].sum(-1), torch.ones(5))
    guide = polar_guide(model)
    backbone = {k: v.detach().clone() for k, v in model.net.peft_model.named_parameters() if "lora" not in k}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(batch, batch["labels"])
    names = set(pyro.get_param_store().keys())
    polar = {f"polar$$${m}.{p}" for m in MODULES for p in ("X.weight", "Y.weight", "theta")}
    assert names == polar | {"AutoNormal_polar.locs.head.W", "AutoNormal_polar.scales.head.W"}
    torch.testing.assert_close(pyro.param("AutoNormal_polar.locs.head.W").detach(), model.W0, atol=0.02, rtol=0)
    for k, v in model.net.peft_model.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, backbone[k]) and not v.requires_grad


def test_decoder_runs_once_per_batch():
    model = PolarVBLL(_net(), num_data=24)
    guide = polar_guide(model, init_scale=0.1)
    calls = _count_decoder_calls(model.net)
    batch = model.net.collate(synthetic_examples(6))
    guide(batch, batch["labels"])  # autoguides set up on the conditioned model (as after training)
    for S in (1, 7):
        del calls[:]
        out = Predictive(model, guide=guide, num_samples=S, parallel=True, return_sites=("probs",))(batch)
        assert len(calls) == 1 and out["probs"].reshape(S, 6, 3).shape == (S, 6, 3)
    assert out["probs"].reshape(7, 6, 3).std(0).max() > 1e-4  # the sampled heads differ
    del calls[:]
    with torch.no_grad(), pyro.plate("particles", 5, dim=-2):  # vectorized ELBO particles, left of the data plate
        gtr = poutine.trace(guide).get_trace(batch, batch["labels"])
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, batch["labels"])
    assert gtr.nodes[HEAD_SITE]["value"].shape == (5, 1, 3, 32) and len(calls) == 1
    assert mtr.nodes["obs"]["fn"].batch_shape == (5, 6) and mtr.nodes["probs"]["value"].shape == (5, 6, 3)
    del calls[:]
    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, batch, batch["labels"])
    assert len(calls) == 1 and math.isfinite(float(loss.detach()))


def test_svi_step_raises_no_warnings():
    net = _net()
    batch = net.collate(synthetic_examples(4))
    with strict_warnings():
        model = PolarVBLL(net, num_data=24, centered=False)
        svi = SVI(model, polar_guide(model), pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1))
        assert math.isfinite(svi.step(batch, batch["labels"]))
        polar_retract(model)


# ------------------------------------------------------------------------------------------ training
def test_fit_with_retraction_keeps_adapters_orthonormal():
    model = PolarVBLL(_net(), num_data=24)
    X0 = model.polar[MODULES[0]].X.weight.detach().clone()
    retract = retract_every(model)
    drift = []

    def callback(step, loss):
        drift.append(orthogonality_error(model))  # after the optimizer step, before the retraction
        retract(step, loss)

    fit(model, polar_guide(model), synthetic_examples(24), progress=False, callback=callback,
        config=TrainConfig(steps=6, batch_size=4, lr=2e-2, warmup=0.0, schedule="constant"))
    assert max(drift) > 1e-4  # the optimizer does leave the manifold...
    assert orthogonality_error(model) < 1e-5  # ...and the retraction brings X and Y back
    assert (model.polar[MODULES[0]].X.weight - X0).abs().max() > 1e-4
    assert any(layer.theta.abs().max() > 0 for layer in model.polar.values())


def test_train_polar_vbll_and_predict():
    t = train_polar_vbll(lambda: tiny_llama(), synthetic_examples(24), label_words=LABEL_WORDS,
                         train_config=TrainConfig(steps=5, batch_size=4, lr=1e-2), num_samples=4, progress=False,
                         config=CFG)
    assert t.method == "polar_vbll" and len(t.losses) == 5 and all(map(math.isfinite, t.losses))
    assert orthogonality_error(t.models[0]) < 1e-5
    assert t.extra_params == 4 * 16 + 2 * 3 * 32  # Theta per layer + AutoNormal loc/scale of the head
    pred = t.predict(synthetic_examples(6))
    assert pred.sample_probs.shape == (4, 6, 3)
    torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(4, 6))
    m = pred.metrics()
    assert all(math.isfinite(v) for v in m.values()) and m["num_samples"] == 4
