"""The Pyro models ScalaBL and LoRAModel: sites, shapes, param store, scaling, vectorized particles."""
from __future__ import annotations


import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import site_is_subsample

from conftest import random_s, randomize_lora, synthetic_examples, strict_warnings
from scalabl_pyro.guides import init_to_s0
from scalabl_pyro.model import LoRAModel, ScalaBL, count_parameters


def _trace(model, batch, labels="batch", **kw):
    labels = batch["labels"] if labels == "batch" else labels
    return poutine.trace(model).get_trace(batch, labels, **kw)


def _sample_sites(tr):
    return [n for n, s in tr.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic")]


EXPECTED_SITES = ["lora.model.layers.0.self_attn.q_proj.s", "lora.model.layers.0.self_attn.v_proj.s",
                  "lora.model.layers.1.self_attn.q_proj.s", "lora.model.layers.1.self_attn.v_proj.s", "lora.lm_head.s"]


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_trace_sites_and_shapes(make_model, scoring):
    model = make_model(scoring, num_data=100)
    assert model.latent_sites == EXPECTED_SITES
    batch = model.net.collate(synthetic_examples(5))
    tr = _trace(model, batch)
    assert _sample_sites(tr) == model.latent_sites + ["obs"]
    for site in model.latent_sites:
        assert tr.nodes[site]["value"].shape == (4,)
        assert not tr.nodes[site]["is_observed"]
    assert tr.nodes["obs"]["is_observed"]
    assert torch.equal(tr.nodes["obs"]["value"], batch["labels"])
    probs = tr.nodes["probs"]
    assert probs["infer"].get("_deterministic") and probs["value"].shape == (5, 3)
    torch.testing.assert_close(probs["value"].sum(-1), torch.ones(5))
    torch.testing.assert_close(probs["value"], tr.nodes["obs"]["fn"].probs)
    assert tr.nodes["_RETURN"]["value"].shape == (5,)


def test_probs_match_net_logits(make_model):
    model = make_model("choice")
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(3))
    tr = _trace(model, batch)
    s = {k: tr.nodes[k]["value"][None] for k in model.latent_sites}
    torch.testing.assert_close(tr.nodes["probs"]["value"], model.net.logits(batch, s=s)[0].softmax(-1))


def test_latent_dim_and_s0(make_model):
    model = make_model("letter", r=3)
    assert model.latent_dim == 3 * 5
    s0 = model.s0_values()
    assert list(s0) == model.latent_sites
    for site, v in s0.items():
        torch.testing.assert_close(v, model.net.subspace.sites[site].s0)
        assert v.shape == (3,) and (v > 0).all()


def test_unconditioned_model_samples_labels(make_model):
    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(6))
    tr = _trace(model, batch, labels=None)
    obs = tr.nodes["obs"]
    assert not obs["is_observed"] and obs["value"].shape == (6,)
    assert ((obs["value"] >= 0) & (obs["value"] < 3)).all()


def test_label_shape_mismatch(make_model):
    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(3))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        model(batch, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("bayes", [True, False], ids=["scalabl", "lora"])
def test_param_store_holds_only_adapters(make_model, bayes):
    model = make_model("letter", bayes=bayes)
    batch = model.net.collate(synthetic_examples(2))
    model(batch, batch["labels"])
    names = list(pyro.get_param_store().keys())
    prefix = "scalabl$$$" if bayes else "lora$$$"
    assert names and all(n.startswith(prefix) for n in names), names
    assert len(names) == 2 * 5
    kinds = sorted({n.rsplit(".", 2)[-2] for n in names})
    assert kinds == (["B", "V"] if bayes else ["A", "B"])
    # the store holds the very tensors of the network (training them trains the net)
    store_ids = {id(pyro.get_param_store()[n]) for n in names}
    assert store_ids == {id(p) for p in model.net.trainable_parameters()}
    assert not any("embed" in n or "mlp" in n for n in names)


@pytest.mark.parametrize("bayes", [True, False], ids=["scalabl", "lora"])
def test_a_second_model_under_the_same_name_trains_its_own_adapters(make_model, examples, bayes):
    """A notebook cell run twice: bare ``pyro.module`` would keep the first model's tensors in the store, so SVI
    would step those and the second model would never train. The model that runs owns its name."""
    from pyro.infer import SVI, Trace_ELBO

    from scalabl_pyro.guides import default_guide
    from scalabl_pyro.train import empty_guide

    first = make_model("letter", bayes=bayes, num_data=24)
    batch = first.net.collate(examples[:4])
    first(batch, batch["labels"])
    first_state = [p.detach().clone() for p in first.net.trainable_parameters()]
    second = make_model("letter", bayes=bayes, num_data=24)  # same name, no clear_param_store()
    start = [p.detach().clone() for p in second.net.trainable_parameters()]
    guide = default_guide(second) if bayes else empty_guide
    svi = SVI(second, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1))
    for _ in range(3):
        svi.step(batch, batch["labels"])
    assert all(not torch.equal(a, p.detach()) for a, p in zip(start, second.net.trainable_parameters()))
    assert all(torch.equal(a, p.detach()) for a, p in zip(first_state, first.net.trainable_parameters()))
    store = pyro.get_param_store()
    assert {id(store[k]) for k in store.keys() if "$$$" in k} == {id(p) for p in second.net.trainable_parameters()}
    first(batch, batch["labels"])  # running the first model again hands the name back to it
    assert {id(store[k]) for k in store.keys() if "$$$" in k} == {id(p) for p in first.net.trainable_parameters()}


@pytest.mark.parametrize("num_data, B", [(100, 4), (7, 7), (None, 5)])
def test_obs_scale_is_num_data_over_batch(make_model, num_data, B):
    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(B))
    tr = _trace(model, batch, num_data=num_data)
    want = (num_data or B) / B
    assert float(tr.nodes["obs"]["scale"]) == pytest.approx(want)
    assert float(tr.nodes["probs"]["scale"]) == pytest.approx(want)
    for site in model.latent_sites:  # the prior is not scaled by the data set size
        assert tr.nodes[site]["scale"] == 1.0
    frame = tr.nodes["obs"]["cond_indep_stack"][0]
    assert frame.name == "data" and frame.dim == -1 and frame.size == B and frame.full_size == (num_data or B)


def test_constructor_num_data_is_default(make_model):
    model = make_model("letter", num_data=40)
    batch = model.net.collate(synthetic_examples(4))
    assert float(_trace(model, batch).nodes["obs"]["scale"]) == pytest.approx(10.0)
    assert float(_trace(model, batch, num_data=8).nodes["obs"]["scale"]) == pytest.approx(2.0)


def test_log_likelihood_value(make_model):
    model = make_model("letter", num_data=12)
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(4))
    tr = _trace(model, batch)
    tr.compute_log_prob()
    logits = torch.log(tr.nodes["probs"]["value"])
    want = 3.0 * logits.gather(-1, batch["labels"][:, None]).sum()
    torch.testing.assert_close(tr.nodes["obs"]["log_prob_sum"], want, atol=1e-5, rtol=1e-5)


def test_kl_weight_scales_only_latent_sites(make_model):
    model = make_model("letter")
    model.kl_weight = 0.25
    batch = model.net.collate(synthetic_examples(2))
    tr = _trace(model, batch)
    for site in model.latent_sites:
        assert tr.nodes[site]["scale"] == 0.25
    assert float(tr.nodes["obs"]["scale"]) == 1.0


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_svi_step_raises_no_warnings(make_model, scoring):
    model = make_model(scoring, num_data=20)  # built outside: peft wrapping warns (transformers)
    batch = model.net.collate(synthetic_examples(4))
    guide = AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=0.05)
    with strict_warnings():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        loss = svi.step(batch, batch["labels"])
        loss2 = svi.step(batch, batch["labels"])
    assert torch.isfinite(torch.tensor([loss, loss2])).all()


@pytest.mark.parametrize("scoring, calls", [("letter", 1), ("choice", 2)])
def test_vectorized_particles_one_forward(make_model, scoring, calls):
    model = make_model(scoring, num_data=20)
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(4))
    guide = AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=0.5)
    guide(batch, batch["labels"])  # prototype pass: no backbone call
    assert model.net.forward_calls == 0
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    traced = poutine.trace(model)  # records the model trace the ELBO sees
    loss = elbo.loss(traced, guide, batch, batch["labels"])
    assert torch.isfinite(torch.tensor(loss))
    model_tr = traced.trace
    for site in model.latent_sites:
        assert model_tr.nodes[site]["value"].shape == (4, 1, 4)
    assert model_tr.nodes["probs"]["value"].shape == (4, 4, 3)
    assert model_tr.nodes["obs"]["value"].shape == (4,)
    # ONE chunked forward for all 4 particles x 4 questions (x 3 choices)
    assert model.net.forward_calls == calls
    assert model.net.forward_rows == (16 if scoring == "letter" else 16 + 48)
    probs = model_tr.nodes["probs"]["value"]
    assert not torch.allclose(probs[0], probs[1])  # the particles really differ
    before = model.net.forward_calls
    elbo.differentiable_loss(model, guide, batch, batch["labels"])
    assert model.net.forward_calls - before == calls


def test_vectorized_particles_equal_separate_evaluations(make_model):
    model = make_model("letter")
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(3))
    s = random_s(model.net, 4)
    stacked = {k: v[:, None, :] for k, v in s.items()}  # (P, 1, r): particle dim left of the data plate
    with pyro.plate("particles", 4, dim=-2):
        tr = poutine.trace(poutine.condition(model, stacked)).get_trace(batch, batch["labels"])
    probs = tr.nodes["probs"]["value"]
    assert probs.shape == (4, 3, 3)
    for p in range(4):
        one = poutine.trace(poutine.condition(model, {k: v[p] for k, v in s.items()})).get_trace(batch, batch["labels"])
        torch.testing.assert_close(probs[p], one.nodes["probs"]["value"], atol=1e-5, rtol=1e-5)


def test_autonormal_prototype_costs_no_backbone_call(make_model):
    model = make_model("choice")
    batch = model.net.collate(synthetic_examples(4))
    guide = AutoNormal(model, init_loc_fn=init_to_s0(model))
    out = guide(batch, batch["labels"])
    assert model.net.forward_calls == 0
    assert sorted(out) == sorted(model.latent_sites)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(batch, batch["labels"])
    assert model.net.forward_calls == 2  # one model run = context + continuations


def test_shape_pass_emits_zero_logits(make_model):
    from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample

    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(3))
    tr = poutine.trace(InitMessenger(init_to_sample)(model)).get_trace(batch, batch["labels"])
    assert model.net.forward_calls == 0
    torch.testing.assert_close(tr.nodes["probs"]["value"], torch.full((3, 3), 1 / 3))


def test_lora_model_has_no_latent_sites(make_model):
    model = make_model("choice", bayes=False, num_data=10)
    assert isinstance(model, LoRAModel) and not isinstance(model, ScalaBL)
    assert model.latent_sites == ()
    batch = model.net.collate(synthetic_examples(4))
    tr = _trace(model, batch)
    assert _sample_sites(tr) == ["obs"]
    assert tr.nodes["probs"]["value"].shape == (4, 3)
    assert float(tr.nodes["obs"]["scale"]) == pytest.approx(2.5)
    assert model.net.forward_calls == 2


def test_count_parameters(make_model):
    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(2))
    guide = AutoNormal(model, init_loc_fn=init_to_s0(model))
    guide(batch, batch["labels"])
    counts = count_parameters(model, guide)
    lora = sum(p.numel() for p in model.net.trainable_parameters())
    # letter head cut to 3 rows: q (4x32 + 32x4), v (4x32 + 16x4) per layer, head (4x32 + 3x4)
    assert lora == 2 * (256 + 192) + (128 + 12)
    assert counts == {"lora": lora, "guide": 2 * 20, "extra_over_lora": 40, "total": lora + 40, "latent_dim": 20}


def test_replaying_guide_model_runs_the_backbone(make_model):
    """Autoguides keep guide.model wrapped in InitMessenger; a replay of it (as in Pyro's exact
    AutoLaplaceApproximation.laplace_approximation) is a real pass, not a shape-only one."""
    from pyro import poutine
    from pyro.infer.autoguide import AutoLaplaceApproximation

    from scalabl_pyro.guides import init_to_s0

    model = make_model("letter", num_data=16)
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(16))
    guide = AutoLaplaceApproximation(model, init_loc_fn=init_to_s0(model))
    calls = model.net.forward_calls
    guide(batch, batch["labels"])
    assert model.net.forward_calls == calls  # the prototype pass is shape-only
    gtr = poutine.trace(guide).get_trace(batch, batch["labels"])
    mtr = poutine.trace(poutine.replay(guide.model, trace=gtr)).get_trace(batch, batch["labels"])
    assert model.net.forward_calls > calls
    direct = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, batch["labels"])
    torch.testing.assert_close(mtr.nodes["obs"]["fn"].logits, direct.nodes["obs"]["fn"].logits)
    assert mtr.nodes["obs"]["fn"].logits.abs().sum() > 0  # not the zero logits of a shape pass


# ------------------------------------------------------------------------------ the vectorized layout
def _pair(make_net, prior=None, **cfg):
    """The same network (same seed, same s0) as a per-module and as a vectorized ScalaBL."""
    a = ScalaBL(make_net("choice", **cfg), prior=prior, num_data=20)
    b = ScalaBL(make_net("choice", **cfg), prior=prior, num_data=20, layout="vectorized", name="vec")
    return a, b


def test_vectorized_layout_has_one_site_in_a_modules_plate(make_net):
    per, vec = _pair(make_net)
    M, r = len(per.latent_sites), 4
    assert vec.latent_sites == ["lora.s"] and vec.module_sites == per.latent_sites and vec.latent_dim == M * r
    batch = vec.net.collate(synthetic_examples(3))
    tr = poutine.trace(vec).get_trace(batch, batch["labels"])
    latent = [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and not site_is_subsample(s)]
    assert latent == ["lora.s"]
    site = tr.nodes["lora.s"]
    assert site["value"].shape == (M, r) and site["fn"].batch_shape == (M,) and site["fn"].event_shape == (r,)
    assert [f.name for f in site["cond_indep_stack"]] == ["lora.modules"]
    assert torch.equal(vec.s0_values()["lora.s"], torch.stack([per.s0_values()[k] for k in per.latent_sites]))
    with pytest.raises(ValueError, match="layout='nope' is not one of"):
        ScalaBL(make_net("choice"), layout="nope")


@pytest.mark.parametrize("prior", [None, "laplace", "dict"])
def test_vectorized_layout_equals_per_module_layout(make_net, prior):
    """Conditioned on the same s: the same log joint (prior + likelihood) and the same class probabilities."""
    from scalabl_pyro.priors import laplace_prior

    ref = _make_sites(make_net)
    if prior == "laplace":
        prior = laplace_prior(0.7)
    elif prior == "dict":  # one module gets its own scale
        prior = {ref[0]: pyro.distributions.Normal(0.5, 2.0)}
    per, vec = _pair(make_net, prior=prior)
    randomize_lora(per.net)
    randomize_lora(vec.net)
    s = {k: v[0] for k, v in random_s(per.net, 1).items()}
    batch = per.net.collate(synthetic_examples(4))
    t1 = poutine.trace(poutine.condition(per, data=s)).get_trace(batch, batch["labels"])
    stacked = {"lora.s": torch.stack([s[k] for k in per.latent_sites])}
    t2 = poutine.trace(poutine.condition(vec, data=stacked)).get_trace(batch, batch["labels"])
    torch.testing.assert_close(t2.log_prob_sum(), t1.log_prob_sum(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(t2.nodes["probs"]["value"], t1.nodes["probs"]["value"], rtol=0, atol=0)
    torch.testing.assert_close(vec.log_prior(stacked), per.log_prior(s), rtol=1e-6, atol=1e-5)
    assert set(vec.module_values(stacked)) == set(s)


def _make_sites(make_net):
    return ScalaBL(make_net("choice")).latent_sites


def test_vectorized_layout_refuses_mixed_prior_families(make_net):
    sites = _make_sites(make_net)
    model = ScalaBL(make_net("choice"), prior={sites[0]: pyro.distributions.Laplace(0.0, 1.0)}, layout="vectorized")
    batch = model.net.collate(synthetic_examples(2))
    with pytest.raises(ValueError, match="one prior family for all modules"):
        model(batch, batch["labels"])


@pytest.mark.parametrize("guide_name", ["normal", "delta", "lowrank", "iaf"])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_vectorized_layout_trains_with_every_guide_without_warnings(make_net, guide_name, elbo):
    from scalabl_pyro.guides import make_guide
    from scalabl_pyro.train import make_elbo
    from scalabl_pyro.config import TrainConfig

    if elbo == "meanfield" and guide_name in ("lowrank", "iaf"):
        pytest.skip("TraceMeanField_ELBO needs a mean-field guide")
    model = ScalaBL(make_net("choice"), num_data=20, layout="vectorized")
    guide = make_guide(guide_name, model)
    batch = model.net.collate(synthetic_examples(4))
    with strict_warnings():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), make_elbo(TrainConfig(elbo=elbo)))
        losses = [svi.step(batch, batch["labels"]) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    from pyro.infer import Predictive

    out = Predictive(model, guide=guide, num_samples=3, parallel=True, return_sites=["probs", "lora.s"])(batch)
    assert out["probs"].shape == (3, 4, 3) and out["lora.s"].shape == (3, len(model.module_sites), 4)


def test_public_api_exports_layout_and_fused_optimizer():
    import scalabl_pyro
    missing = [n for n in scalabl_pyro.__all__ if not hasattr(scalabl_pyro, n)]
    assert not missing
    assert {"LAYOUTS", "MODULES_PLATE", "stack_priors", "FusedAdamW", "elbo_loss", "last_layers"} <= set(scalabl_pyro.__all__)
    assert scalabl_pyro.LAYOUTS == ("modules", "vectorized")
