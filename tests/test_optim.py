"""fit's training step (scalabl_pyro.optim): the same update as SVI + make_optimizer + make_elbo, with one
fused optimizer, per-tensor clipping in one pass and an ELBO that never reads the device."""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import s0_particles, synthetic_examples
from scalabl_pyro.config import TrainConfig
from scalabl_pyro.guides import make_guide
from conftest import _make_net, randomize_lora
from scalabl_pyro.model import ScalaBL
from scalabl_pyro.optim import DeviceTrace_ELBO, FusedAdamW, autonormal_elbo_loss, autonormal_path_applies, clip_per_tensor_, elbo_loss
from scalabl_pyro.priors import LayerScalePrior, isotropic_normal
from scalabl_pyro.trunk import last_layers
from scalabl_pyro.train import fit, make_elbo, make_optimizer


def _fit_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """fit's minibatch order (randperm with TrainConfig.seed, reshuffled when an epoch runs out)."""
    gen = torch.Generator().manual_seed(seed)
    order, pos, out = torch.randperm(n, generator=gen), 0, []
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        out.append(order[pos:pos + batch_size].tolist())
        pos += batch_size
    return out


def _build(make_model, guide_name):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    model = make_model("choice", bayes=guide_name is not None)
    guide = make_guide(guide_name, model) if guide_name else None
    return model, guide


def _values(model):
    store = pyro.get_param_store()
    return {k: v.detach().clone() for k, v in store.items()} | {
        f"net.{i}": p.detach().clone() for i, p in enumerate(model.net.trainable_parameters())}


def _svi_steps(model, guide, examples, cfg, *, fused=False):
    """``cfg.steps`` SVI steps (make_optimizer + make_elbo, schedule advanced) on fit's minibatches:
    ``(values, optimizer)``."""
    optim = make_optimizer(cfg, model_prefix=model.name, fused=fused)
    svi = SVI(model, guide or (lambda *a, **k: None), optim, make_elbo(cfg))
    with pyro.validation_enabled(False):
        for idx in _fit_batches(len(examples), cfg.batch_size, cfg.steps, cfg.seed):
            batch = model.net.collate([examples[i] for i in idx])
            svi.step(batch, batch["labels"], num_data=len(examples))
            optim.step()
    return _values(model), optim


def _assert_same_values(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("guide_name, elbo", [("normal", "trace"), ("normal", "meanfield"), ("lowrank", "trace"),
                                              ("delta", "trace"), (None, "trace")])
def test_fit_takes_the_steps_of_svi_with_make_optimizer(make_model, guide_name, elbo):
    """5 steps of fit (warmup, cosine schedule, clipping that bites, weight decay) = 5 SVI steps by hand."""
    examples = synthetic_examples(12)
    cfg = TrainConfig(steps=5, batch_size=4, lr=5e-2, guide_lr=5e-2, clip_norm=0.05, warmup=0.4,
                      weight_decay=0.1, elbo=elbo, seed=2)
    model, guide = _build(make_model, guide_name)
    fit(model, guide, examples, config=cfg, progress=False, warn_unconverged=False)
    got = _values(model)

    _assert_same_values(got, _svi_steps(*_build(make_model, guide_name), examples, cfg)[0])


@pytest.mark.parametrize("guide_name", ["normal", None])
def test_fused_pyro_optim_takes_the_steps_of_pyros_per_tensor_optimizers(make_model, guide_name):
    """SVI with make_optimizer(fused=True) = SVI with Pyro's per-tensor LambdaLR(AdamW) (clipping, decay, warmup)."""
    examples = synthetic_examples(12)
    cfg = TrainConfig(steps=5, batch_size=4, lr=5e-2, guide_lr=5e-2, clip_norm=0.05, warmup=0.4, weight_decay=0.1)
    got, syncs = [], []
    for fused in (False, True):
        with _Syncs() as count:
            values, optim = _svi_steps(*_build(make_model, guide_name), examples, cfg, fused=fused)
        got.append(values)
        syncs.append(count.n)
    _assert_same_values(got[1], got[0])
    assert syncs[1] <= syncs[0]
    state = optim.get_state()  # the FusedAdamW format: names in group order, one state per tensor
    assert sorted(state["names"]) == sorted(pyro.get_param_store().keys()) and state["scheduler"]["last_epoch"] == 5


def test_clip_per_tensor_is_clip_grad_norm_tensor_by_tensor():
    g = [torch.randn(3, 4) * 5, torch.randn(7) * 1e-3, torch.randn(2, 2, 2)]
    ref = []
    for x in g:
        p = torch.nn.Parameter(torch.zeros_like(x))
        p.grad = x.clone()
        torch.nn.utils.clip_grad_norm_(p, 0.5)
        ref.append(p.grad)
    got = [x.clone() for x in g]
    clip_per_tensor_(got, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert got[1].norm() < 0.5 and torch.equal(got[1], g[1])  # small gradients are left alone


class _Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += str(func.overloadpacket) == "aten._local_scalar_dense"
        return func(*args, **(kwargs or {}))


def test_elbo_loss_equals_trace_elbo_without_reading_the_device(make_model):
    model, guide = _build(make_model, "normal")
    batch = model.net.collate(synthetic_examples(4))
    guide(batch, batch["labels"], num_data=20)  # create the guide's parameters
    params = list(guide.parameters())

    def run(fn):
        pyro.set_rng_seed(5)
        with pyro.validation_enabled(False), _Syncs() as syncs:
            loss, surrogate = fn()
        grads = torch.autograd.grad(surrogate, params)
        return float(loss.detach()), grads, syncs.n

    def pyro_loss():
        loss = Trace_ELBO().differentiable_loss(model, guide, batch, batch["labels"], num_data=20)
        return loss, loss

    ref_loss, ref_grads, ref_syncs = run(pyro_loss)
    loss, grads, syncs = run(lambda: elbo_loss(Trace_ELBO(), model, guide, batch, batch["labels"], num_data=20))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with _Syncs() as backbone:  # transformers' mask helpers read the attention mask: not ours to remove
        model.net.logits(batch, s=s0_particles(model.net))
    assert ref_syncs >= 2 * len(model.latent_sites) + backbone.n  # Pyro: one .item() per site of model and guide
    assert syncs == backbone.n


def _scalabl(layout="modules", stochastic=False, kl_weight=1.0, prior=None, guide_name="normal"):
    """A ScalaBL model on the tiny Llama (random B, so that every site matters) and a guide that has run once
    and was moved off its start (scales that differ by site)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    net = _make_net("choice")
    randomize_lora(net)
    model = ScalaBL(net, layout=layout, stochastic=last_layers(net, 1) if stochastic else None,
                    kl_weight=kl_weight, prior=prior)
    guide = make_guide(guide_name, model)
    batch = net.collate(synthetic_examples(4))
    guide(batch, batch["labels"], num_data=20)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model, guide, batch


@pytest.mark.parametrize("layout, stochastic, kl_weight, prior", [
    ("modules", False, 1.0, None), ("modules", True, 0.3, None), ("vectorized", False, 0.3, None),
    ("vectorized", True, 1.0, None), ("modules", False, 1.0, isotropic_normal(0.5))])
def test_autonormal_path_equals_trace_elbo(layout, stochastic, kl_weight, prior):
    """fit's AutoNormal path: Trace_ELBO's loss and gradients (guide, V and B) with the same draws, no host read."""
    model, guide, batch = _scalabl(layout, stochastic, kl_weight, prior)
    params = list(guide.parameters()) + model.net.trainable_parameters()

    def scaled_guide(*args, **kwargs):  # as fit scales the guide during KL annealing
        with poutine.scale(scale=kl_weight):
            return guide(*args, **kwargs)

    def run(fn):
        pyro.set_rng_seed(5)
        with pyro.validation_enabled(False), _Syncs() as syncs:
            loss, surrogate = fn()
        return float(loss.detach()), torch.autograd.grad(surrogate, params), syncs.n

    with pyro.validation_enabled(False):
        assert autonormal_path_applies(Trace_ELBO(), model, guide)
    ref = Trace_ELBO(max_plate_nesting=1).differentiable_loss
    ref_loss, ref_grads, _ = run(lambda: (ref(model, scaled_guide, batch, batch["labels"], num_data=20),) * 2)
    loss, grads, syncs = run(lambda: autonormal_elbo_loss(model, guide, batch, batch["labels"], num_data=20,
                                                          guide_scale=kl_weight))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in ref_grads[:len(list(guide.parameters()))])  # every guide tensor matters
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with _Syncs() as backbone:  # transformers' mask helpers read the attention mask: not ours to remove
        model.net.logits(batch, s=s0_particles(model.net))
    assert syncs == backbone.n
    pyro.set_rng_seed(6)  # other draws, another value: the loss depends on the noise
    assert float(autonormal_elbo_loss(model, guide, batch, batch["labels"], num_data=20)[0]) != pytest.approx(loss)


def test_autonormal_path_applies_only_where_it_is_trace_elbo():
    model, guide, _ = _scalabl()
    with pyro.validation_enabled(False):
        assert autonormal_path_applies(Trace_ELBO(), model, guide)
        assert not autonormal_path_applies(Trace_ELBO(num_particles=2), model, guide)
        assert not autonormal_path_applies(TraceMeanField_ELBO(), model, guide)  # analytic KL: another estimator
    with pyro.validation_enabled(True):  # the user asked for Pyro's checks
        assert not autonormal_path_applies(Trace_ELBO(), model, guide)
    with pyro.validation_enabled(False):
        for other in (_scalabl(guide_name="lowrank"), _scalabl(guide_name="delta"),
                      _scalabl(prior=LayerScalePrior())):  # a learned prior has pyro.param and pyro.factor sites
            assert not autonormal_path_applies(Trace_ELBO(), *other[:2])
        pyro.clear_param_store()
        fresh = make_guide("normal", model)  # has not run: Pyro's path creates its parameters first
        assert not autonormal_path_applies(Trace_ELBO(), model, fresh)


@pytest.mark.parametrize("layout, stochastic", [("modules", True), ("vectorized", False)])
def test_fit_takes_svi_steps_through_the_autonormal_path(monkeypatch, layout, stochastic):
    """fit (AutoNormal path from its second step) and SVI.step reach the same parameters from the same seed."""
    import scalabl_pyro.train as train

    calls = []
    monkeypatch.setattr(train, "autonormal_elbo_loss", lambda *a, **k: calls.append(1) or autonormal_elbo_loss(*a, **k))
    examples = synthetic_examples(12)
    cfg = TrainConfig(steps=4, batch_size=4, lr=5e-2, guide_lr=5e-2, clip_norm=0.05, seed=2)

    def build():
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        net = _make_net("choice")
        model = ScalaBL(net, layout=layout, stochastic=last_layers(net, 1) if stochastic else None)
        return model, make_guide("normal", model)

    model, guide = build()
    fit(model, guide, examples, config=cfg, progress=False, warn_unconverged=False)
    assert len(calls) == cfg.steps - 1  # every step after the first (which creates the guide's parameters)
    _assert_same_values(_values(model), _svi_steps(*build(), examples, cfg)[0])


@pytest.mark.parametrize("layout, kl_weight", [("modules", 0.3), ("vectorized", 1.0)])
def test_device_trace_elbo_takes_the_steps_of_trace_elbo(layout, kl_weight):
    """SVI.step with DeviceTrace_ELBO = with Trace_ELBO (the guide unscaled, as a user's SVI has it), with one
    host read per step besides the backbone's, where Trace_ELBO makes two per site."""
    got, syncs = {}, {}
    for cls in (Trace_ELBO, DeviceTrace_ELBO):
        model, guide, batch = _scalabl(layout, kl_weight=kl_weight)
        optim = make_optimizer(TrainConfig(lr=0.05, guide_lr=0.05, warmup=0.0), model_prefix=model.name)  # fused AdamW
        svi = SVI(model, guide, optim, cls(max_plate_nesting=1))
        pyro.set_rng_seed(4)
        with pyro.validation_enabled(False), _Syncs() as count:
            losses = [svi.step(batch, batch["labels"], num_data=20) for _ in range(3)]
        got[cls], syncs[cls] = (losses, _values(model)), count.n
    (ref_losses, ref), (losses, values) = got[Trace_ELBO], got[DeviceTrace_ELBO]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for k in ref:
        torch.testing.assert_close(values[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    with _Syncs() as backbone:
        model.net.logits(batch, s=s0_particles(model.net))
    assert syncs[DeviceTrace_ELBO] == 3 * (backbone.n + 1)
    assert syncs[Trace_ELBO] >= 3 * (backbone.n + len(model.latent_sites))


def test_elbo_loss_mean_field_and_particles(make_model):
    model, guide = _build(make_model, "normal")
    batch = model.net.collate(synthetic_examples(4))
    guide(batch, batch["labels"], num_data=20)
    for elbo in (TraceMeanField_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
                 Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)):
        pyro.set_rng_seed(1)
        ref = elbo.differentiable_loss(model, guide, batch, batch["labels"], num_data=20)
        pyro.set_rng_seed(1)
        loss, surrogate = elbo_loss(elbo, model, guide, batch, batch["labels"], num_data=20)
        assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5)
        assert float(surrogate.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)


def _step_once(model, guide, opt, batch):
    with poutine.trace(param_only=True) as tr:
        _, surrogate = elbo_loss(make_elbo(TrainConfig()), model, guide, batch, batch["labels"], num_data=8)
    surrogate.backward()
    opt.step(tr.trace)


def test_fused_adamw_groups(make_model):
    cfg = TrainConfig(steps=10, lr=1e-3, guide_lr=2e-2, weight_decay=0.1, warmup=0.0, schedule="linear")
    model, guide = _build(make_model, "normal")
    batch = model.net.collate(synthetic_examples(8))
    opt = FusedAdamW(cfg, model_prefix=model.name)
    _step_once(model, guide, opt, batch)
    lora, rest, sharded = opt.optimizer.param_groups  # the third holds FSDP-sharded LoRA tensors (none here)
    assert sharded["params"] == [] and sharded["weight_decay"] == 0.1 and sharded["lr"] == lora["lr"]
    assert len(lora["params"]) == len(model.net.trainable_parameters()) and lora["weight_decay"] == 0.1
    assert len(rest["params"]) == 2 * len(model.latent_sites) and rest["weight_decay"] == 0.0
    assert all(n.startswith(model.name + "$$$") for n in opt.names[:len(lora["params"])])
    assert lora["lr"] == pytest.approx(1e-3 * 0.9) and rest["lr"] == pytest.approx(2e-2 * 0.9)  # after 1 step
    assert all(p.grad is None for p in opt.params)
    assert opt.get_state()["scheduler"]["last_epoch"] == 1


def test_fused_adamw_resumes_exactly_and_reads_pyro_state(make_model):
    """k steps, save, rebuild, load, m steps = k + m steps; the same from Pyro's per-parameter state."""
    cfg = TrainConfig(steps=6, lr=5e-2, guide_lr=5e-2, clip_norm=0.1, warmup=0.3)
    ex = synthetic_examples(8)

    def straight(kind):
        model, guide = _build(make_model, "normal")
        batch = model.net.collate(ex)
        if kind == "fused":
            opt = FusedAdamW(cfg, model_prefix=model.name)
            for _ in range(5):
                _step_once(model, guide, opt, batch)
            return _values(model)
        optim = make_optimizer(cfg, model_prefix=model.name)
        svi = SVI(model, guide, optim, make_elbo(cfg))
        for _ in range(5):
            svi.step(batch, batch["labels"], num_data=8)
            optim.step()
        return _values(model)

    def resumed(kind):
        model, guide = _build(make_model, "normal")
        batch = model.net.collate(ex)
        if kind == "fused":
            opt = FusedAdamW(cfg, model_prefix=model.name)
            for _ in range(3):
                _step_once(model, guide, opt, batch)
            state = opt.get_state()
        else:
            optim = make_optimizer(cfg, model_prefix=model.name)
            svi = SVI(model, guide, optim, make_elbo(cfg))
            for _ in range(3):
                svi.step(batch, batch["labels"], num_data=8)
                optim.step()
            state = optim.get_state()
        rng = torch.get_rng_state()
        opt = FusedAdamW(cfg, model_prefix=model.name)  # a new optimizer over the same tensors
        opt.set_state(state)
        torch.set_rng_state(rng)
        for _ in range(2):
            _step_once(model, guide, opt, batch)
        return _values(model)

    ref = straight("fused")
    for kind in ("fused", "pyro"):
        got = resumed(kind)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{kind}: {k}")
    pyro_ref = straight("pyro")
    for k in ref:
        torch.testing.assert_close(pyro_ref[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_fused_adamw_state_of_another_model_is_refused(make_model):
    cfg = TrainConfig(steps=4)
    model, guide = _build(make_model, "normal")
    batch = model.net.collate(synthetic_examples(8))
    opt = FusedAdamW(cfg, model_prefix=model.name)
    _step_once(model, guide, opt, batch)
    state = opt.get_state()
    state["names"] = [n + "x" for n in state["names"]]
    opt2 = FusedAdamW(cfg, model_prefix=model.name)
    opt2.set_state(state)
    with pytest.raises(ValueError, match="another model or guide"):
        _step_once(model, guide, opt2, batch)
