"""predict(): parallel vs sequential Predictive, backbone-call accounting, Prediction fields and errors."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Predictive

from conftest import random_s, randomize_lora, synthetic_examples
from scalabl_pyro.guides import default_guide, make_guide
from scalabl_pyro.predictive import Prediction, point_guide, predict


def _ready(model, guide):
    """Run the guide once with labels, as training does (creates its prototype and parameters)."""
    batch = model.net.collate(synthetic_examples(1))
    with torch.no_grad():
        guide(batch, batch["labels"])
    return guide


def _trained_like(model, init_scale=0.5):
    """A fixed guide with a wide posterior around s0 and non-zero B, so samples really differ."""
    randomize_lora(model.net, scale=0.5)
    return _ready(model, default_guide(model, init_scale=init_scale))


def test_parallel_and_sequential_agree_in_distribution(make_model):
    model = make_model("letter")
    guide = _trained_like(model, init_scale=0.15)
    exs = synthetic_examples(4)
    pyro.set_rng_seed(1)
    par = predict(model, guide, exs, num_samples=200, parallel=True)
    pyro.set_rng_seed(2)
    seq = predict(model, guide, exs, num_samples=200, parallel=False)
    assert par.sample_probs.shape == seq.sample_probs.shape == (200, 4, 3)
    # the samples spread (otherwise the comparison would be vacuous) ...
    # (per-sample std ~0.09: a mean over 200 has a standard error ~0.006)
    assert float(par.sample_probs.std(0).mean()) > 0.05
    # ... and both modes estimate the same posterior predictive mean: every one of the 12 differences lies
    # within 4.5 standard errors of the difference of two 200-sample means (false alarm ~1e-4)
    se = (par.sample_probs.var(0) / 200 + seq.sample_probs.var(0) / 200).sqrt()
    assert bool(((par.mean_probs - seq.mean_probs).abs() < 4.5 * se).all())
    assert float(se.max()) < 0.015  # and the test has power: a 0.07 shift would fail it
    torch.testing.assert_close(par.sample_probs.std(0), seq.sample_probs.std(0), atol=0.02, rtol=0)


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_parallel_equals_sequential_for_given_samples(make_model, scoring):
    """With the posterior samples fixed, folding S samples into the batch changes nothing."""
    model = make_model(scoring)
    randomize_lora(model.net)
    batch = model.net.collate(synthetic_examples(3))
    samples = random_s(model.net, 5)  # {site: (S, r)}
    out = {}
    for parallel in (True, False):
        pred = Predictive(model, posterior_samples=samples, parallel=parallel, return_sites=("probs",))
        out[parallel] = pred(batch)["probs"].reshape(5, 3, 3)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
    want = model.net.logits(batch, s=samples).softmax(-1)
    torch.testing.assert_close(out[True], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scoring, S, N, batch_size, budget, calls", [
    ("letter", 4, 10, 5, 64, 2),     # S*B = 20 <= 64: exactly one decoder call per batch
    ("letter", 16, 8, 4, 64, 2),     # 64 rows: still one call per batch
    ("letter", 20, 10, 5, 64, 4),    # 100 rows: 12 samples per chunk -> 2 chunks per batch
    ("letter", 3, 6, 6, 4, 6),       # 6 questions > budget 4: chunks of 4 + 2 questions, per sample
    ("choice", 4, 10, 5, 64, 4),     # 60 rows <= 64: one chunk = context + continuations = 2 calls per batch
    ("choice", 8, 5, 5, 64, 4),      # 120 rows: 4 samples per chunk -> 2 chunks x 2 calls
])
def test_parallel_backbone_calls(make_model, scoring, S, N, batch_size, budget, calls):
    model = make_model(scoring, max_forward_batch=budget)
    guide = _ready(model, default_guide(model))
    exs = synthetic_examples(N)
    pred = predict(model, guide, exs, num_samples=S, batch_size=batch_size, parallel=True)
    assert pred.sample_probs.shape == (S, N, 3)
    # no shape-inference or prototype pass reaches the backbone: only the chunked forwards
    assert model.net.forward_calls == calls
    # letter: one row per question and sample; choice: a context row + 3 continuation rows
    assert model.net.forward_rows == S * N * (1 if scoring == "letter" else 4)


def test_sequential_costs_one_pass_per_sample(make_model):
    model = make_model("letter")
    guide = _ready(model, default_guide(model))
    predict(model, guide, synthetic_examples(6), num_samples=5, batch_size=3, parallel=False)
    assert model.net.forward_calls == 2 * 5  # 2 batches x 5 samples, no extra shape passes


def test_prediction_fields_and_metrics(make_model):
    model = make_model("letter")
    guide = _trained_like(model)
    exs = synthetic_examples(7)
    pred = predict(model, guide, exs, num_samples=6, batch_size=3)
    assert isinstance(pred, Prediction)
    assert pred.ids == [ex.id for ex in exs]
    assert pred.labels.tolist() == [ex.label for ex in exs]
    p = pred.sample_probs
    assert p.shape == (6, 7, 3) and p.dtype == torch.float32
    torch.testing.assert_close(pred.mean_probs, p.mean(0))
    H = lambda q: -(q * q.log()).sum(-1)  # noqa: E731 (all probabilities are > 0 here)
    torch.testing.assert_close(pred.predictive_entropy, H(p.mean(0)))
    torch.testing.assert_close(pred.expected_entropy, H(p).mean(0))
    torch.testing.assert_close(pred.mutual_information, (H(p.mean(0)) - H(p).mean(0)).clamp_min(0))
    assert (pred.mutual_information > 0).all()
    m = pred.metrics()
    assert set(m) == {"acc", "ece", "nll", "brier", "n", "mean_entropy", "mean_mi", "num_samples"}
    assert m["n"] == 7 and m["num_samples"] == 6
    acc = float((pred.mean_probs.argmax(-1) == pred.labels).float().mean())
    assert m["acc"] == pytest.approx(acc)
    nll = float(-pred.mean_probs[torch.arange(7), pred.labels].log().mean())
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
    assert m["mean_mi"] == pytest.approx(float(pred.mutual_information.mean()), rel=1e-5)
    assert m["mean_entropy"] == pytest.approx(float(pred.predictive_entropy.mean()), rel=1e-5)


def test_guide_none_for_scalabl_raises(make_model):
    model = make_model("letter")
    with pytest.raises(ValueError, match="latent sites.*guide"):
        predict(model, None, synthetic_examples(2))


def test_no_examples_raises(make_model):
    model = make_model("letter")
    with pytest.raises(ValueError, match="no examples"):
        predict(model, _ready(model, default_guide(model)), [])


@pytest.mark.parametrize("parallel", [True, False])
def test_lora_model_without_guide_gives_one_sample(make_model, parallel):
    model = make_model("choice", bayes=False)
    randomize_lora(model.net)
    exs = synthetic_examples(5)
    pred = predict(model, None, exs, num_samples=10, batch_size=5, parallel=parallel)
    assert pred.sample_probs.shape == (1, 5, 3)
    want = model.net.logits(model.net.collate(exs))[0].softmax(-1)
    torch.testing.assert_close(pred.sample_probs[0], want, atol=1e-5, rtol=1e-5)
    assert torch.all(pred.mutual_information == 0)


def test_single_sample_parallel(make_model):
    model = make_model("letter")
    guide = _ready(model, make_guide("delta", model))
    exs = synthetic_examples(3)
    pred = predict(model, guide, exs, num_samples=1)
    assert pred.sample_probs.shape == (1, 3, 3)
    s0 = {k: v[None] for k, v in model.s0_values().items()}
    want = model.net.logits(model.net.collate(exs), s=s0)[0].softmax(-1)
    torch.testing.assert_close(pred.sample_probs[0], want, atol=1e-5, rtol=1e-5)


def test_absent_choices_have_zero_probability(make_model):
    from conftest import make_example

    model = make_model("letter")
    guide = _ready(model, default_guide(model))
    exs = [make_example(0, 1, ("yes", "no")), *synthetic_examples(2)]
    pred = predict(model, guide, exs, num_samples=4)
    assert torch.all(pred.sample_probs[:, 0, 2] == 0)
    assert math.isfinite(pred.metrics()["nll"])


def test_predict_with_fresh_guide(make_model):
    model = make_model("letter")
    pred = predict(model, default_guide(model), synthetic_examples(3), num_samples=2)
    assert pred.sample_probs.shape == (2, 3, 3)


@pytest.mark.parametrize("layout", ["modules", "vectorized"])
def test_point_guide_predicts_at_the_posterior_median(make_net, layout):
    from scalabl_pyro import ScalaBL

    net = make_net("letter")
    randomize_lora(net, scale=0.5)
    model = ScalaBL(net, num_data=8, layout=layout)
    guide = _ready(model, default_guide(model, init_scale=0.5))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move the locs away from s0, so that the median is not the initial value
        for name, p in guide.named_parameters():
            if name.startswith("locs."):
                p.add_(torch.randn(p.shape, generator=g))
    exs = synthetic_examples(3)
    point = point_guide(guide)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(1.0)  # the median was taken when point_guide was called: later changes do not leak in
    pred = predict(model, point, exs, num_samples=3)
    with torch.no_grad():
        for p in guide.parameters():
            p.sub_(1.0)
        med = model.module_values(guide.median())
        want = model.net.logits(model.net.collate(exs), s={k: v[None] for k, v in med.items()})[0].softmax(-1)
    assert pred.sample_probs.shape == (3, 3, 3)
    for k in range(3):  # every "sample" is the same point
        torch.testing.assert_close(pred.sample_probs[k], want, atol=1e-5, rtol=1e-5)
    assert float(pred.mutual_information.abs().max()) < 1e-6
    s0 = model.net.logits(model.net.collate(exs), s={k: v[None] for k, v in model.module_values(model.s0_values()).items()})[0]
    assert not torch.allclose(want, s0.softmax(-1), atol=1e-3)  # the test sees where the point is


def test_point_guide_needs_a_median(make_model):
    with pytest.raises(TypeError, match="point_guide needs a guide with a median"):
        point_guide(lambda batch, labels=None: None)
    model = make_model("letter")
    with pytest.raises(TypeError, match="AutoIAFNormal's is not implemented. Use AutoNormal"):
        point_guide(_ready(model, make_guide("iaf", model)))
