"""Partial-Bayesian ScalaBL and the shared trunk: latent sites of the chosen modules only, and posterior samples
that share the deterministic lower layers give the numbers of the unshared computation."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive
from pyro.poutine.util import site_is_subsample

from conftest import LABEL_WORDS, randomize_lora, strict_warnings, synthetic_examples
from scalabl_pyro import AdaptedLM, ScalaBL, ScalaBLConfig, TrainConfig, make_elbo, make_guide, tiny_llama
from scalabl_pyro.trunk import decoder_layers, last_layers, module_depths

L = 4  # decoder layers of the tiny Llama used here


def _net(scoring="choice", *, seed=0, **cfg) -> AdaptedLM:
    lm, tok = tiny_llama(num_layers=L)
    net = AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=ScalaBLConfig(r=4, scoring=scoring, **cfg), seed=seed)
    randomize_lora(net)
    return net


def _mixed_s(net, P, stochastic, *, seed=3):
    """``{site: (P, r)}`` random for the modules in ``stochastic``, ``{site: (1, r)}`` = s0 for the rest."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in net.subspace.sites.items():
        out[k] = (v.s0 + torch.randn((P,) + v.s0.shape, generator=gen)) if v.module_name in stochastic else v.s0[None]
    return out


# ------------------------------------------------------------------------------------------ depths
def test_module_depths_and_last_layers():
    net = _net()
    assert len(decoder_layers(net.decoder)) == L and net.num_layers == L
    for site, info in net.subspace.sites.items():
        name = info.module_name
        expect = L if name == "lm_head" else int(name.split("layers.")[1].split(".")[0])
        assert net.site_depths[site] == expect, name
    top = last_layers(net, 1)
    assert top == ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj", "lm_head")
    assert last_layers(net, 0) == ("lm_head",)
    assert "lm_head" not in last_layers(net, 2, head=False) and len(last_layers(net, 2, head=False)) == 4
    with pytest.raises(ValueError, match="choose 0 <= k <= 4"):
        last_layers(net, 5)
    with pytest.raises(ValueError, match="no adapted module in the last 0 layers"):
        last_layers(net, 0, head=False)
    # a module in the decoder but in no block (an embedding) has depth -1
    assert module_depths(net.decoder, {"emb": net.decoder.embed_tokens, "blk": net.decoder.layers[2].mlp}) == \
        {"emb": -1, "blk": 2}


# ------------------------------------------------------------------------------- shared = unshared
@pytest.mark.parametrize("scoring,prefix_cache", [("letter", True), ("choice", True), ("choice", False)])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_shared_trunk_equals_unshared_logits_and_gradients(scoring, prefix_cache, k):
    net = _net(scoring)
    stochastic = last_layers(net, k)
    batch = net.collate(synthetic_examples(5))
    P = 3
    grads = {}
    for share in (True, False):
        s = {kk: v.clone().requires_grad_(v.shape[0] > 1) for kk, v in _mixed_s(net, P, stochastic).items()}
        rows0 = net.forward_rows
        logits = net.logits(batch, s=s, prefix_cache=prefix_cache, share_trunk=share)
        rows = net.forward_rows - rows0
        assert logits.shape == (P, 5, 3) and torch.isfinite(logits).all()
        (logits * torch.arange(1.0, 4.0)).sum().backward()
        grads[share] = (logits.detach(), [p.grad.clone() for p in net.trainable_parameters()],
                        {kk: v.grad.clone() for kk, v in s.items() if v.requires_grad}, rows)
        for p in net.trainable_parameters():
            p.grad = None
    (l1, g1, gs1, rows1), (l2, g2, gs2, rows2) = grads[True], grads[False]
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    # gradients: the repeat's backward sums the particles' contributions in another order (float rounding)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for kk in gs1:
        torch.testing.assert_close(gs1[kk], gs2[kk], atol=1e-4, rtol=1e-4)
    assert rows1 * P == rows2  # the decoder took B rows (per call) instead of P * B


def test_unshared_equals_every_module_at_its_own_value():
    """The (1, r) shared values are the same numbers as s0 repeated for every particle."""
    net = _net()
    stochastic = last_layers(net, 1)
    batch = net.collate(synthetic_examples(4))
    s = _mixed_s(net, 2, stochastic)
    full = {k: v.expand(2, -1) for k, v in s.items()}
    with torch.no_grad():
        torch.testing.assert_close(net.logits(batch, s=s), net.logits(batch, s=full), atol=1e-5, rtol=1e-5)
        # and particle p is the single-particle evaluation at s[p]
        for p in range(2):
            one = {k: v[p:p + 1] if v.shape[0] > 1 else v for k, v in s.items()}
            torch.testing.assert_close(net.logits(batch, s=s)[p], net.logits(batch, s=one)[0], atol=1e-5, rtol=1e-5)


def test_shared_trunk_with_row_chunks():
    """max_forward_batch smaller than P * B * C: particle chunks each share their own trunk."""
    net = _net(max_forward_batch=8)
    batch = net.collate(synthetic_examples(2))
    s = _mixed_s(net, 5, last_layers(net, 1))
    with torch.no_grad():
        torch.testing.assert_close(net.logits(batch, s=s), net.logits(batch, s=s, share_trunk=False),
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- the model
def test_partial_model_latent_sites_are_exactly_the_chosen_modules():
    net = _net()
    chosen = last_layers(net, 1)
    model = ScalaBL(net, stochastic=chosen, num_data=10)
    expect = [f"lora.{m}.s" for m in chosen]
    assert model.latent_sites == expect == model.module_sites and model.latent_dim == 4 * len(chosen)
    assert model.fixed_sites == [k for k in net.subspace.sites if k not in expect]
    batch = net.collate(synthetic_examples(3))
    tr = poutine.trace(model).get_trace(batch, batch["labels"])
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and not site_is_subsample(s)]
    assert latent == expect
    assert set(model.s0_values()) == set(expect)
    # the fixed modules are at s0: the model's probabilities at s = s0 are the net's at s0 everywhere
    s0 = net.subspace.s0
    cond = poutine.condition(model, data={k: s0[k] for k in expect})
    probs = poutine.trace(cond).get_trace(batch).nodes["probs"]["value"]
    with torch.no_grad():
        ref = net.logits(batch, s={k: v[None] for k, v in s0.items()})[0].softmax(-1)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=1e-6)
    # a callable picks the same modules
    assert ScalaBL(_net(), stochastic=lambda m: m in chosen).latent_sites == expect
    # the vectorized layout stacks only the chosen modules
    vec = ScalaBL(_net(), stochastic=chosen, layout="vectorized")
    assert vec.latent_sites == ["lora.s"] and vec.module_sites == expect
    assert vec.s0_values()["lora.s"].shape == (len(chosen), 4)


def test_partial_model_bad_choices_name_the_fix():
    net = _net()
    with pytest.raises(ValueError, match="not adapted: \\['model.layers.9.q'\\]"):
        ScalaBL(net, stochastic=["model.layers.9.q"])
    with pytest.raises(ValueError, match="selects no adapted module"):
        ScalaBL(net, stochastic=[])
    with pytest.raises(TypeError, match="pass a list of module names"):
        ScalaBL(net, stochastic="lm_head")
    fixed = next(k for k in net.subspace.sites if "layers.0" in k)
    with pytest.raises(KeyError, match="prior names unknown sites"):
        ScalaBL(net, stochastic=["lm_head"], prior={fixed: pyro.distributions.Normal(0.0, 1.0)})


@pytest.mark.parametrize("layout", ["modules", "vectorized"])
@pytest.mark.parametrize("guide_name", ["normal", "delta", "lowrank", "iaf"])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_partial_model_trains_and_predicts_with_every_guide(layout, guide_name, elbo):
    if elbo == "meanfield" and guide_name in ("lowrank", "iaf"):
        pytest.skip("TraceMeanField_ELBO needs a mean-field guide")
    net = _net()
    model = ScalaBL(net, stochastic=last_layers(net, 1), num_data=20, layout=layout)
    guide = make_guide(guide_name, model)
    batch = net.collate(synthetic_examples(4))
    fixed_V = {k: net.subspace.sites[k].lora_A.weight.detach().clone() for k in model.fixed_sites}
    with strict_warnings():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo(TrainConfig(elbo=elbo)))
        losses = [svi.step(batch, batch["labels"]) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the deterministic modules are plain LoRA: their projections train too
    assert any(not torch.equal(net.subspace.sites[k].lora_A.weight, v) for k, v in fixed_V.items())
    sites = ["probs", *model.latent_sites]
    rows0 = net.forward_rows
    out = Predictive(model, guide=guide, num_samples=6, parallel=True, return_sites=sites)(batch)
    assert out["probs"].shape == (6, 4, 3)
    # every question goes through the decoder once for all 6 samples: a context pass on B = 4 rows and a
    # continuation pass on B * C = 12 rows (in chunks of questions: max_forward_batch bounds the 6x rows above)
    assert net.forward_rows - rows0 == 4 + 12


def test_partial_predictive_equals_unshared_evaluation_of_its_samples():
    net = _net()
    model = ScalaBL(net, stochastic=last_layers(net, 2), num_data=20)
    guide = make_guide("normal", model, init_scale=0.5)
    batch = net.collate(synthetic_examples(4))
    with torch.no_grad():
        guide(batch, batch["labels"])  # creates the guide's parameters
        out = Predictive(model, guide=guide, num_samples=5, parallel=True,
                         return_sites=["probs", *model.latent_sites])(batch)
        s = {k: out[k].reshape(5, -1) if k in out else v[None] for k, v in net.subspace.s0.items()}
        ref = net.logits(batch, s=s, share_trunk=False).softmax(-1)
    torch.testing.assert_close(out["probs"].reshape(5, 4, 3), ref, atol=1e-5, rtol=1e-5)


def test_partial_model_takes_a_prior_for_every_module_and_the_grid_method_trains():
    """A dict prior over all modules (what the grid's default ``centered_prior(net.subspace.s0)`` is) keeps the
    stochastic modules' entries; ``train_method("scalabl_last2")`` makes only the top layers latent."""
    from scalabl_pyro.harness.methods import train_method
    from scalabl_pyro.priors import centered_prior

    net = _net()
    model = ScalaBL(net, stochastic=last_layers(net, 1), prior=centered_prior(net.subspace.s0))
    site = model.latent_sites[0]
    torch.testing.assert_close(model.site_prior(site).mean, net.subspace.s0[site])
    t = train_method("scalabl_last2", lambda: tiny_llama(num_layers=L), synthetic_examples(8), label_words=LABEL_WORDS,
                     config=ScalaBLConfig(r=4, scoring="choice"), train_config=TrainConfig(steps=2, batch_size=4),
                     prior="s0", progress=False)
    assert t.models[0].latent_sites == [f"lora.{m}.s" for m in last_layers(t.models[0].net, 2)]
    assert len(t.models[0].latent_sites) == 5 < len(t.models[0].net.subspace.sites)
    assert t.predict(synthetic_examples(3), num_samples=2).mean_probs.shape == (3, 3)
