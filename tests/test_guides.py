"""Pyro's autoguides on ScalaBL: every guide trains and predicts; initialization at s0; the ELBO improves."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO, autoguide

from conftest import randomize_lora, synthetic_examples
from scalabl_pyro.config import TrainConfig
import scalabl_pyro.guides as scalabl_guides
from scalabl_pyro.guides import GUIDES, default_guide, init_to_s0, make_guide
from scalabl_pyro.predictive import predict
from scalabl_pyro.train import fit

GUIDE_CLASSES = {
    "normal": autoguide.AutoNormal, "diagonal": autoguide.AutoDiagonalNormal,
    "lowrank": autoguide.AutoLowRankMultivariateNormal, "mvn": autoguide.AutoMultivariateNormal,
    "iaf": scalabl_guides.AutoIAFNormal,  # Pyro's, with the flow created on the model's device
    "laplace": autoguide.AutoLaplaceApproximation,
    "delta": autoguide.AutoDelta,  # Pyro's own: site names cannot collide with its attributes
}


def test_guide_registry():
    assert GUIDES == GUIDE_CLASSES


def test_unknown_guide(make_model):
    with pytest.raises(ValueError, match="unknown guide 'flow'.*'delta'.*'normal'"):
        make_guide("flow", make_model("letter"))


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
@pytest.mark.parametrize("name", list(GUIDE_CLASSES))
def test_every_guide_trains_and_predicts(make_model, name, elbo):
    # Pyro's autoguides sample each latent site from a Delta (AutoNormal: plus an auxiliary
    # unconstrained Normal; AutoContinuous guides: plus one joint latent), so TraceMeanField_ELBO finds
    # no analytic KL for any of them and falls back on the Monte Carlo term: it runs for all seven.
    model = make_model("letter")
    guide = make_guide(name, model)
    assert type(guide) is GUIDE_CLASSES[name]
    exs = synthetic_examples(12)
    res = fit(model, guide, exs, config=TrainConfig(steps=5, batch_size=4, elbo=elbo, lr=1e-2), progress=False)
    assert res.steps == 5 and len(res.losses) == 5
    assert all(math.isfinite(x) for x in res.losses)
    pred = predict(model, guide, exs[:5], num_samples=3)
    assert pred.sample_probs.shape == (3, 5, 3)
    torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(3, 5))
    assert (pred.sample_probs >= 0).all()
    assert pred.labels.tolist() == [ex.label for ex in exs[:5]]
    if name in ("delta", "laplace"):  # point masses: every sample is the same
        torch.testing.assert_close(pred.sample_probs[0], pred.sample_probs[2])
        assert float(pred.mutual_information.max()) < 1e-5
    else:
        assert not torch.allclose(pred.sample_probs[0], pred.sample_probs[2])


def test_meanfield_equals_trace_elbo_for_autoguides(make_model):
    """With autoguides, TraceMeanField_ELBO has no analytic KL: same estimate as Trace_ELBO for a seed."""
    model = make_model("letter", num_data=12)
    guide = make_guide("normal", model, init_scale=0.3)
    batch = model.net.collate(synthetic_examples(4))
    guide(batch, batch["labels"])
    values = []
    for elbo in (Trace_ELBO(), TraceMeanField_ELBO()):
        pyro.set_rng_seed(3)
        values.append(elbo.loss(model, guide, batch, batch["labels"]))
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.parametrize("name", ["normal", "diagonal", "lowrank", "mvn", "delta"])
def test_init_to_s0_median(make_model, name):
    model = make_model("letter")
    # reference: the singular values of the Kaiming-initialized A (copied before any guide exists)
    reference = {k: v.clone() for k, v in model.s0_values().items()}
    guide = make_guide(name, model)
    batch = model.net.collate(synthetic_examples(2))
    guide(batch, batch["labels"])
    med = guide.median() if name in ("normal", "delta") else guide.median(batch, batch["labels"])
    assert sorted(med) == sorted(model.latent_sites)
    for site, s0 in reference.items():
        if name in ("normal", "delta"):
            assert torch.equal(med[site], s0), site
        else:
            torch.testing.assert_close(med[site], s0, atol=1e-6, rtol=0)


def test_laplace_guide_starts_at_s0(make_model):
    model = make_model("letter")
    guide = make_guide("laplace", model)
    batch = model.net.collate(synthetic_examples(2))
    values = guide(batch, batch["labels"])
    for site, s0 in model.s0_values().items():
        torch.testing.assert_close(values[site], s0, atol=1e-6, rtol=0)
    assert model.net.forward_calls == 0


def test_init_to_s0_is_curried(make_model):
    model = make_model("letter")
    g1 = autoguide.AutoNormal(model, init_loc_fn=init_to_s0(model))
    g2 = autoguide.AutoNormal(model, init_loc_fn=init_to_s0()(model))
    batch = model.net.collate(synthetic_examples(2))
    g1(batch, batch["labels"])
    m1 = {k: v.clone() for k, v in g1.median().items()}
    pyro.clear_param_store()
    g2(batch, batch["labels"])
    for k, v in g2.median().items():
        assert torch.equal(v, m1[k])


def test_default_guide_is_autonormal_at_s0(make_model):
    model = make_model("letter")
    guide = default_guide(model, init_scale=0.07)
    assert isinstance(guide, autoguide.AutoNormal)
    batch = model.net.collate(synthetic_examples(2))
    guide(batch, batch["labels"])
    for site, s0 in model.s0_values().items():
        assert torch.equal(guide.median()[site], s0)
        loc, scale = guide._get_loc_and_scale(site)
        torch.testing.assert_close(scale.detach(), torch.full((4,), 0.07))


def test_guide_options(make_model):
    model = make_model("letter")
    assert make_guide("lowrank", model, rank=3).rank == 3
    iaf = make_guide("iaf", model, num_transforms=2)
    batch = model.net.collate(synthetic_examples(2))
    iaf(batch, batch["labels"])
    flows = [m for m in iaf.modules() if isinstance(m, pyro.distributions.transforms.AffineAutoregressive)]
    assert len(flows) == 2
    hidden = [m for m in iaf.modules() if isinstance(m, torch.nn.Linear)]
    assert hidden and hidden[0].out_features == 2 * model.latent_dim  # default width 2 * D


def test_guide_sample_shapes(make_model):
    model = make_model("letter")
    guide = make_guide("mvn", model)
    batch = model.net.collate(synthetic_examples(2))
    out = guide(batch, batch["labels"])
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (4,) for k in model.latent_sites}
    assert model.net.forward_calls == 0  # prototype pass skipped the backbone


def test_elbo_decreases_on_learnable_toy(make_model, examples):
    model = make_model("letter")
    guide = default_guide(model)
    res = fit(model, guide, examples, config=TrainConfig(steps=40, batch_size=8, lr=2e-2, guide_lr=2e-2),
              progress=False)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_every_site_is_trained_by_the_guide(name, make_model):
    """Every latent coordinate has a variational parameter in the param store, and a step moves them."""
    model = make_model("letter")
    randomize_lora(model.net)  # B = 0 and a prior centred at s0 would give s no gradient at the start
    guide = make_guide(name, model)
    batch = model.net.collate(synthetic_examples(8))
    guide(batch, batch["labels"])
    store = pyro.get_param_store()
    guide_params = {k: v.detach().clone() for k, v in store.items() if not k.startswith(model.name + "$$$")}
    per_coordinate = sum(v.numel() for v in guide_params.values())
    assert per_coordinate >= model.latent_dim, (name, sorted(guide_params))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    svi.step(batch, batch["labels"])
    moved = [k for k, v in guide_params.items() if not torch.equal(store[k].detach(), v)]
    assert sorted(moved) == sorted(guide_params)
    assert not hasattr(model, "layers")  # nothing was attached to the model object


def test_delta_is_pyros_autodelta():
    assert GUIDES["delta"] is autoguide.AutoDelta


@pytest.mark.parametrize("cls", [c for c in vars(autoguide).values()
                                 if isinstance(c, type) and issubclass(c, autoguide.AutoGuide)],
                         ids=lambda c: c.__name__)
def test_site_names_never_collide_with_autoguide_attributes(make_model, cls):
    """Autoguides (AutoDelta) store site ``a.b.c`` at attribute path ``a.b.c``: the first component of every
    site name must not be an attribute of any autoguide class."""
    model = make_model("letter")
    heads = {site.split(".")[0] for site in model.latent_sites}
    assert heads == {"lora"}
    assert not any(hasattr(cls, h) for h in heads)


def test_pyros_autodelta_trains_every_site(make_model):
    model = make_model("letter")
    randomize_lora(model.net)  # B = 0 and a prior centred at s0 would give s no gradient at the start
    guide = autoguide.AutoDelta(model, init_loc_fn=init_to_s0(model))
    batch = model.net.collate(synthetic_examples(8))
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    svi.step(batch, batch["labels"])
    moved = {site for site, v in guide.median().items() if not torch.equal(v, model.s0_values()[site])}
    assert moved == set(model.latent_sites)


def test_fit_refuses_a_new_guide_over_another_guides_params(make_model, examples):
    from scalabl_pyro.model import ParamStoreConflictError

    first = make_model("letter", num_data=24)
    fit(first, default_guide(first), examples, config=TrainConfig(steps=2), progress=False)
    second = make_model("letter", num_data=24)  # same name: its guide's parameter names are the first one's
    assert default_guide(second)._pyro_name == "AutoNormal_scalabl"
    with pytest.raises(ParamStoreConflictError, match=r"another AutoNormal_scalabl.*pyro.clear_param_store\(\)"):
        fit(second, default_guide(second), examples, config=TrainConfig(steps=2), progress=False)
    pyro.clear_param_store()
    fit(second, default_guide(second), examples, config=TrainConfig(steps=2), progress=False)


def test_guides_of_differently_named_models_own_their_parameters(make_model, examples):
    """Pyro's bare autoguides of one class share param-store names; make_guide names them after the model."""
    a, b = make_model("letter", num_data=24), make_model("letter", num_data=24)
    b.name = "other"
    ga, gb = make_guide("normal", a), make_guide("normal", b)
    fit(a, ga, examples, config=TrainConfig(steps=3, guide_lr=0.1), progress=False)
    before = {k: v.detach().clone() for k, v in ga.state_dict().items()}
    fit(b, gb, examples, config=TrainConfig(steps=3, guide_lr=0.1, seed=1), progress=False)
    assert all(torch.equal(v, ga.state_dict()[k]) for k, v in before.items())  # training b left a alone
    assert not any(torch.equal(v, gb.state_dict()[k]) for k, v in before.items() if "locs" in k)
    store = pyro.get_param_store().keys()
    assert any(k.startswith("AutoNormal_scalabl.") for k in store) and any(k.startswith("AutoNormal_other.") for k in store)
