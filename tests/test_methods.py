"""Every benchmark method trains a few steps on the tiny model and gives finite metrics."""
import math

import pytest
import torch

from scalabl_pyro import ScalaBLConfig, TrainConfig, country_task, tiny_llama
from scalabl_pyro.methods import METHODS, lora_parameter_count, train_method


@pytest.fixture(scope="module")
def data():
    return list(country_task("train").subset(16).examples), list(country_task("test").subset(6).examples)


@pytest.mark.parametrize("scoring", ["letter", "choice"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_predicts(method, scoring, data):
    train, test = data
    t = train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"),
                     config=ScalaBLConfig(r=4, scoring=scoring), train_config=TrainConfig(steps=3, batch_size=4),
                     num_samples=4, ensemble_size=2, progress=False)
    pred = t.predict(test)
    S = {"mle": 1, "map": 1, "ensemble": 2}.get(method, 4)
    assert pred.sample_probs.shape == (S, 6, 4)
    torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(S, 6))
    m = pred.metrics()
    assert all(math.isfinite(m[k]) for k in ("acc", "ece", "nll", "brier"))
    assert all(math.isfinite(x) for x in t.losses)
    lp = lora_parameter_count(t.models[0].net)
    assert t.lora_params == lp
    n_sites = 5  # q_proj, v_proj in 2 layers + lm_head
    expected_extra = {"scalabl": 2 * 4 * n_sites, "mle": 0, "map": 0, "mcdropout": 0, "ensemble": lp}
    if method in expected_extra:
        assert t.extra_params == expected_extra[method]
    if method == "blob":  # mean replaces A, std is extra: r*in per module
        a_params = sum(s.s0.numel() for s in t.models[0].net.subspace.sites.values())
        assert t.extra_params == a_params


@pytest.mark.parametrize("method", ["scalabl", "blob"])
def test_named_prior_s0_centres_the_prior_at_the_start(method, data):
    train, _ = data
    t = train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"), config=ScalaBLConfig(r=4),
                     train_config=TrainConfig(steps=1, batch_size=4), prior="s0", progress=False)
    model = t.models[0]
    for site, info in model.net.subspace.sites.items():
        d = model.prior(site, info.layer, info.event_shape)
        torch.testing.assert_close(d.base_dist.loc, info.s0)
        assert d.event_shape == info.s0.shape
    with pytest.raises(ValueError, match="only named prior is 's0'"):
        train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"), prior="flat", progress=False)


def test_unknown_method():
    with pytest.raises(ValueError, match="choose one of"):
        train_method("bayes-by-magic", tiny_llama, [], label_words=("A", "B"))


def test_laplace_covariance_is_positive_definite(data):
    train, test = data
    t = train_method("laplace", tiny_llama, train, label_words=("A", "B", "C", "D"),
                     config=ScalaBLConfig(r=4, scoring="choice"), train_config=TrainConfig(steps=3, batch_size=4),
                     progress=False)
    tril = t.guide.scale[:, None] * t.guide.scale_tril
    cov = tril @ tril.T
    assert torch.linalg.eigvalsh(cov).min() > 0
    # Prior precision alone would give variance 1 (Normal(0, 1)); data can only shrink it.
    assert (cov.diagonal() <= 1.0 + 1e-4).all()
