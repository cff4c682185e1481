"""posterior_scales: per-site posterior |mean| and std against the guide's own parameters and the prior's."""
import math

import pyro.distributions as dist
import pytest
import torch

from scalabl_pyro import ScalaBL, default_guide
from scalabl_pyro.posterior import plot_posterior_scales, posterior_scales
from scalabl_pyro.priors import centered_prior


@pytest.mark.parametrize("layout", ["modules", "vectorized"])
def test_posterior_scales_match_the_guide_and_the_prior(make_net, examples, layout):
    net = make_net("letter")
    model = ScalaBL(net, prior=centered_prior(net.subspace.s0, scale=0.5), num_data=24, layout=layout)
    guide = default_guide(model)
    batch = net.collate(examples[:2])
    guide(batch, batch["labels"])  # materialize the guide's parameters
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # spread-out locs and scales (the unconstrained values; read back constrained)
        for name, p in guide.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 if name.startswith("locs.") else 0.5) - (
                0.0 if name.startswith("locs.") else 1.5))
        truth = {site: [t.detach() for t in guide._get_loc_and_scale(site)] for site in model.latent_sites}
    if layout == "vectorized":
        (loc, scale), = truth.values()
        locs, scales = model.module_values({model.vector_site: loc}), model.module_values({model.vector_site: scale})
    else:
        locs, scales = {k: v[0] for k, v in truth.items()}, {k: v[1] for k, v in truth.items()}

    state = torch.get_rng_state()
    out = posterior_scales(model, guide, batch, num_samples=4000, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # a seeded call leaves the global stream alone
    assert out == posterior_scales(model, guide, batch, num_samples=4000, seed=0)  # and repeats exactly
    assert list(out) == list(net.subspace.s0)  # module order, one row per adapted module in both layouts
    for site, row in out.items():
        loc, scale = locs[site].reshape(-1), scales[site].reshape(-1)
        assert row["mean_abs"] == pytest.approx(float(loc.abs().mean()), abs=0.03)
        assert row["std"] == pytest.approx(float(scale.mean()), rel=0.05)
        assert row["prior_mean_abs"] == pytest.approx(float(net.subspace.s0[site].abs().mean()), rel=1e-5)
        assert row["prior_std"] == pytest.approx(0.5)


def test_posterior_scales_without_closed_form_prior_moments(make_net, examples):
    net = make_net("letter")
    model = ScalaBL(net, prior=lambda site, module: dist.Cauchy(0.0, 1.0).expand([4]).to_event(1), num_data=24)
    guide = default_guide(model)
    batch = net.collate(examples[:2])
    out = posterior_scales(model, guide, batch, num_samples=50, seed=0)
    row = next(iter(out.values()))
    assert math.isnan(row["prior_mean_abs"]) and row["prior_std"] == math.inf  # Cauchy: torch's nan mean, inf variance
    assert row["std"] == pytest.approx(0.05, rel=0.3)  # AutoNormal's initial scale


def test_plot_posterior_scales_writes_a_png(make_net, examples, tmp_path):
    net = make_net("letter")
    model = ScalaBL(net, num_data=24)
    batch = net.collate(examples[:2])
    path = plot_posterior_scales(posterior_scales(model, default_guide(model), batch, num_samples=20, seed=0),
                                 tmp_path / "scales.png", title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_adapter_norms_match_the_formed_update(make_net):
    from scalabl_pyro.posterior import adapter_norms

    net = make_net("letter")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at 0: give it values so the update is not trivially 0
        for v in net.subspace.sites.values():
            v.lora_B.weight.copy_(torch.randn(v.lora_B.weight.shape, generator=g))
    out = adapter_norms(net)
    assert list(out) == list(net.subspace.s0)  # module order
    for site, v in net.subspace.sites.items():
        B, V = v.lora_B.weight.detach().double(), v.lora_A.weight.detach().double()
        update = B @ torch.diag(v.s0.double()) @ V  # (out, in), formed here only
        assert out[site]["B_norm"] == pytest.approx(float(B.norm()), rel=1e-9)
        assert out[site]["V_norm"] == pytest.approx(float(V.norm()), rel=1e-9)
        assert out[site]["update_norm"] == pytest.approx(float(update.norm()), rel=1e-6)
    # BLoB: A is the latent, there is no V and no fixed update
    blob = adapter_norms(make_net("letter", subspace="A"))
    assert all(math.isnan(r["V_norm"]) and math.isnan(r["update_norm"]) and r["B_norm"] == 0 for r in blob.values())
    with pytest.raises(ValueError, match="subspace=True"):
        adapter_norms(make_net("letter", subspace=False))
