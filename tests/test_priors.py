"""Priors over the subspace sites: the accepted forms, shape checks and the ready-made priors."""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from conftest import synthetic_examples
from scalabl_pyro.guides import default_guide
from scalabl_pyro.model import ScalaBL
from scalabl_pyro.priors import (LayerScalePrior, centered_prior, isotropic_normal, laplace_prior,
                                 normalize_prior, student_t_prior)

SITE = "lora.model.layers.0.self_attn.q_proj.s"
OTHER = "lora.lm_head.s"


def _base(d):
    """The per-coordinate distribution inside Independent(Expanded(...))."""
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return d


def _all(x, v) -> bool:
    """Every element of the (possibly expanded) parameter ``x`` equals ``v``."""
    x = torch.as_tensor(x, dtype=torch.float)
    return x.numel() >= 1 and torch.allclose(x, torch.full_like(x, float(v)))


def test_none_uses_default_isotropic_normal():
    fn = normalize_prior(None)
    d = fn(SITE, None, 5)
    assert d.event_shape == (5,) and d.batch_shape == ()
    torch.testing.assert_close(d.log_prob(torch.zeros(5)), dist.Normal(0.0, 1.0).log_prob(torch.zeros(5)).sum())
    fn = normalize_prior(None, default=isotropic_normal(0.3))
    assert _all(_base(fn(SITE, None, 5)).scale, 0.3)


@pytest.mark.parametrize("prior", [
    dist.Normal(0.0, 2.0),
    dist.Normal(torch.zeros(4), 2.0),
    dist.Normal(torch.zeros(1), 2.0),
    dist.Normal(torch.zeros(4), 2.0 * torch.ones(4)).to_event(1),
], ids=["scalar", "batch-r", "batch-1", "event-r"])
def test_distribution_prior_shapes(prior):
    d = normalize_prior(prior)(SITE, None, 4)
    assert d.event_shape == (4,) and d.batch_shape == ()
    x = torch.tensor([0.5, -1.0, 2.0, 0.0])
    torch.testing.assert_close(d.log_prob(x), dist.Normal(0.0, 2.0).log_prob(x).sum())


@pytest.mark.parametrize("prior", [
    dist.Normal(torch.zeros(3), 1.0),
    dist.Normal(torch.zeros(2, 4), 1.0),
    dist.MultivariateNormal(torch.zeros(3), torch.eye(3)),
], ids=["batch-3", "batch-2x4", "event-3"])
def test_wrong_shape_raises(prior):
    with pytest.raises(ValueError, match=f"{SITE!r}.*event_shape \\(4,\\)"):
        normalize_prior(prior)(SITE, None, 4)


def test_dict_prior_with_fallback():
    fn = normalize_prior({SITE: dist.Laplace(0.0, 0.5)}, default=isotropic_normal(3.0))
    d = _base(fn(SITE, None, 4))
    assert isinstance(d, dist.Laplace) and _all(d.scale, 0.5)
    d = _base(fn(OTHER, None, 4))
    assert isinstance(d, dist.Normal) and _all(d.scale, 3.0)


def test_callable_prior_gets_site_and_module():
    seen = []

    def prior(site, module):
        seen.append((site, module))
        return dist.StudentT(4.0, 0.0, 0.1)

    d = normalize_prior(prior)(SITE, "the-module", 6)
    assert seen == [(SITE, "the-module")]
    assert d.event_shape == (6,) and isinstance(_base(d), dist.StudentT)


@pytest.mark.parametrize("bad", [1.0, "normal", torch.distributions.Normal(0.0, 1.0)])
def test_non_distribution_raises_type_error(bad):
    # a plain torch distribution is not a Pyro distribution either
    with pytest.raises(TypeError, match="prior must be"):
        normalize_prior(bad)


def test_callable_returning_non_distribution():
    fn = normalize_prior(lambda site, module: 1.0)
    with pytest.raises(TypeError, match="returned float"):
        fn(SITE, None, 4)


def test_dict_with_non_distribution_value():
    with pytest.raises(TypeError, match=SITE):
        normalize_prior({SITE: 1.0})


def test_dict_prior_with_unknown_site(make_net):
    net = make_net("letter")
    with pytest.raises(KeyError, match="lora.model.layers.9.mlp.s"):
        ScalaBL(net, prior={"lora.model.layers.9.mlp.s": dist.Normal(0.0, 1.0)})


def test_subspace_false_rejected(make_net):
    with pytest.raises(ValueError, match="subspace=True"):
        ScalaBL(make_net("letter", subspace=False))


def _trace(model, batch):
    return poutine.trace(model).get_trace(batch, batch["labels"])


@pytest.mark.parametrize("prior, cls, params", [
    (isotropic_normal(0.25), dist.Normal, {"loc": 0.0, "scale": 0.25}),
    (laplace_prior(0.5), dist.Laplace, {"loc": 0.0, "scale": 0.5}),
    (student_t_prior(df=5.0, scale=0.7), dist.StudentT, {"df": 5.0, "loc": 0.0, "scale": 0.7}),
    (dist.Laplace(0.0, 0.2), dist.Laplace, {"loc": 0.0, "scale": 0.2}),
    (LayerScalePrior(init=0.4), dist.Normal, {"loc": 0.0, "scale": 0.4}),
], ids=["isotropic", "laplace", "student_t", "distribution", "layer_scale"])
def test_ready_priors_in_trace(make_model, prior, cls, params):
    model = make_model("letter", prior=prior)
    batch = model.net.collate(synthetic_examples(2))
    tr = _trace(model, batch)
    for site in model.latent_sites:
        fn = tr.nodes[site]["fn"]
        assert fn.event_shape == (4,) and fn.batch_shape == ()
        base = _base(fn)
        assert type(base) is cls
        for k, v in params.items():
            assert _all(getattr(base, k), v), (site, k, getattr(base, k))
        x = tr.nodes[site]["value"]
        want = sum(cls(**{k: torch.tensor(v) for k, v in params.items()}).log_prob(x))
        torch.testing.assert_close(fn.log_prob(x), want)


def test_config_prior_scale_sets_default(make_model):
    model = make_model("letter", prior_scale=0.125)
    batch = model.net.collate(synthetic_examples(1))
    fn = _trace(model, batch).nodes[OTHER]["fn"]
    assert _all(_base(fn).scale, 0.125)


def test_layer_scale_prior_params_and_gradients(make_model):
    model = make_model("letter", prior=LayerScalePrior(init=1.0, hyper_scale=0.5), num_data=8)
    batch = model.net.collate(synthetic_examples(4))
    tr = _trace(model, batch)
    names = [f"prior_scale.{s}" for s in model.latent_sites]
    store = pyro.get_param_store()
    assert sorted(k for k in store.keys() if k.startswith("prior_scale.")) == sorted(names)
    for site in model.latent_sites:  # the hyperprior enters as a factor
        node = tr.nodes[f"prior_scale.{site}.hyper"]
        assert node["is_observed"]
        torch.testing.assert_close(node["fn"].log_factor, dist.LogNormal(0.0, 0.5).log_prob(torch.tensor(1.0)))
    guide = default_guide(model)
    guide(batch, batch["labels"])  # create the guide's parameters
    # gradients reach the unconstrained scale parameters through the ELBO
    unconstrained = dict(store.named_parameters())
    loss = Trace_ELBO().differentiable_loss(model, guide, batch, batch["labels"])
    grads = torch.autograd.grad(loss, [unconstrained[n] for n in names])
    assert all(g is not None and torch.isfinite(g).all() and g.abs() > 0 for g in grads)
    # and an SVI step moves them
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    before = {n: float(store[n].detach()) for n in names}
    svi.step(batch, batch["labels"])
    for n in names:
        assert float(store[n].detach()) != before[n], n
        assert float(store[n].detach()) > 0


def test_centered_prior_sits_at_s0(make_model):
    base = make_model("letter")
    s0 = base.net.subspace.s0
    model = make_model("letter", prior=centered_prior(s0, scale=0.5))
    assert set(s0) == set(model.latent_sites)
    tr = _trace(model, model.net.collate(synthetic_examples(2)))
    for site in model.latent_sites:
        fn, x = tr.nodes[site]["fn"], tr.nodes[site]["value"]
        assert fn.event_shape == (4,)
        want = dist.Normal(s0[site], 0.5).log_prob(x).sum()
        torch.testing.assert_close(fn.log_prob(x), want)
        assert fn.log_prob(s0[site]) > fn.log_prob(torch.zeros_like(s0[site]))  # the mode is s0, not 0
    with pytest.raises(ValueError, match="scale"):
        centered_prior(s0, scale=0.0)


def test_default_prior_is_centred_at_s0(make_model):
    """ScalaBL's default prior is Normal(s0, prior_scale) per site (the guide's start), recorded as the default."""
    model = make_model("letter")
    batch = model.net.collate(synthetic_examples(2))
    tr = _trace(model, batch)
    s0 = model.net.subspace.s0
    assert model.prior_spec == {"kind": "default", "loc": "s0"}
    for site in model.latent_sites:
        base = _base(tr.nodes[site]["fn"])
        assert type(base) is dist.Normal
        torch.testing.assert_close(base.loc, s0[site])
        assert _all(base.scale, model.net.config.prior_scale)
        x = tr.nodes[site]["value"]
        torch.testing.assert_close(tr.nodes[site]["fn"].log_prob(x), dist.Normal(s0[site], 1.0).log_prob(x).sum())


def test_stack_priors_evaluates_row_by_row():
    import pyro.distributions as dist

    from scalabl_pyro.priors import stack_priors

    priors = {"a.s": dist.Normal(torch.arange(4.0), 1.0).to_event(1), "b.s": dist.Normal(2.0, 3.0).expand([4]).to_event(1)}
    d = stack_priors(priors)
    assert d.batch_shape == (2,) and d.event_shape == (4,)
    x = torch.randn(2, 4)
    want = torch.stack([priors["a.s"].log_prob(x[0]), priors["b.s"].log_prob(x[1])])
    torch.testing.assert_close(d.log_prob(x), want)
    with pytest.raises(ValueError, match="one prior family"):
        stack_priors({"a.s": priors["a.s"], "b.s": dist.Laplace(0.0, 1.0).expand([4]).to_event(1)})
