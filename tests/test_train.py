"""Training: learning-rate schedule, per-parameter optimizer settings, ELBO choice, KL annealing, fit()."""
from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

import scalabl_pyro.train as train_mod
from conftest import synthetic_examples
from scalabl_pyro.config import TrainConfig
from scalabl_pyro.guides import default_guide
from scalabl_pyro.train import FitResult, empty_guide, fit, lr_lambda, make_elbo, make_optimizer
from scalabl_pyro.optim import DeviceTrace_ELBO


# ------------------------------------------------------------------------------------- lr schedule
@pytest.mark.parametrize("schedule, step, want", [
    # steps=100, warmup=0.1 -> 10 warmup steps: (step + 1) / 10
    ("cosine", 0, 0.1), ("cosine", 4, 0.5), ("cosine", 9, 1.0),
    # then t = (step - 10) / 90
    ("cosine", 10, 1.0), ("cosine", 28, 0.5 * (1 + math.cos(math.pi * 0.2))), ("cosine", 55, 0.5),
    ("cosine", 100, 0.0), ("cosine", 150, 0.0),
    ("linear", 0, 0.1), ("linear", 10, 1.0), ("linear", 28, 0.8), ("linear", 55, 0.5), ("linear", 91, 0.1),
    ("linear", 100, 0.0),
    ("constant", 0, 0.1), ("constant", 9, 1.0), ("constant", 10, 1.0), ("constant", 99, 1.0),
])
def test_lr_lambda_values(schedule, step, want):
    f = lr_lambda(TrainConfig(steps=100, warmup=0.1, schedule=schedule))
    assert f(step) == pytest.approx(want, abs=1e-12)


def test_lr_lambda_without_warmup():
    f = lr_lambda(TrainConfig(steps=10, warmup=0.0, schedule="linear"))
    assert [round(f(i), 10) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]
    g = lr_lambda(TrainConfig(steps=10, warmup=0.0, schedule="cosine"))
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5)


def test_lr_lambda_tiny_warmup_rounds_to_one_step():
    f = lr_lambda(TrainConfig(steps=10, warmup=0.01, schedule="constant"))  # 0.1 steps -> 1
    assert f(0) == 1.0


# ------------------------------------------------------------------------------------- optimizer
def _one_step(model, guide, config):
    optim = make_optimizer(config, model_prefix=model.name)
    svi = SVI(model, guide, optim, make_elbo(config))
    batch = model.net.collate(synthetic_examples(4))
    svi.step(batch, batch["labels"], num_data=4)
    store = pyro.get_param_store()
    by_name = {store.param_name(p): obj for p, obj in optim.optim_objs.items()}
    return optim, by_name


def test_optimizer_is_adamw_with_schedule(make_model):
    model = make_model("letter")
    guide = default_guide(model)
    cfg = TrainConfig(steps=10, warmup=0.2, lr=1e-3, guide_lr=1e-2)
    optim, by_name = _one_step(model, guide, cfg)
    assert isinstance(optim, pyro.optim.PyroLRScheduler)
    assert by_name and all(isinstance(s.optimizer, torch.optim.AdamW) for s in by_name.values())
    guide_names = [n for n in by_name if n.startswith(guide._pyro_name + ".")]  # AutoNormal[_<model.name>].
    assert len(guide_names) == 2 * 5
    lrs = {n: s.optimizer.param_groups[0]["lr"] for n, s in by_name.items()}
    for n in guide_names:  # warmup of 2 steps: step 0 runs at lr * 1/2
        assert lrs[n] == pytest.approx(1e-2 * 0.5)
    optim.step()  # advance the schedule
    for n in guide_names:
        assert by_name[n].optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
        assert by_name[n].optimizer.param_groups[0]["weight_decay"] == 0.0


def test_optimizer_lr_for_adapters(make_model):
    model = make_model("letter")
    guide = default_guide(model)
    cfg = TrainConfig(steps=10, warmup=0.0, lr=1e-3, guide_lr=1e-2, weight_decay=0.1)
    _, by_name = _one_step(model, guide, cfg)
    adapter = [n for n in by_name if n.startswith("scalabl$$$")]
    assert len(adapter) == 10
    for n in adapter:
        group = by_name[n].optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(1e-3), n
        assert group["weight_decay"] == pytest.approx(0.1), n


def test_optimizer_per_param_names_seen(make_model):
    """Documents what Pyro passes to the per-param callable (the root cause of the bug above)."""
    seen = []
    cfg = TrainConfig(steps=10)
    model = make_model("letter")
    optim = make_optimizer(cfg, model_prefix=model.name)
    original = optim.pt_optim_args

    def spy(name):
        seen.append(name)
        return original(name)

    optim.pt_optim_args = spy
    svi = SVI(model, default_guide(model), optim, make_elbo(cfg))
    batch = model.net.collate(synthetic_examples(2))
    svi.step(batch, batch["labels"])
    adapter_names = [n for n in seen if "lm_head.B" in n or "lm_head.V" in n]
    assert sorted(adapter_names) == ["scalabl.lm_head.B.weight", "scalabl.lm_head.V.weight"]


def test_clip_args():
    assert make_optimizer(TrainConfig(clip_norm=0.5)).pt_clip_args == {"clip_norm": 0.5}
    assert not make_optimizer(TrainConfig(clip_norm=0.0)).pt_clip_args


@pytest.mark.parametrize("elbo, n, vec, cls, vectorized", [
    ("trace", 1, True, DeviceTrace_ELBO, False),
    ("trace", 4, True, DeviceTrace_ELBO, True),
    ("trace", 4, False, DeviceTrace_ELBO, False),
    ("meanfield", 2, True, TraceMeanField_ELBO, True),
])
def test_make_elbo(elbo, n, vec, cls, vectorized):
    e = make_elbo(TrainConfig(elbo=elbo, num_particles=n, vectorize_particles=vec))
    assert type(e) is cls and isinstance(e, Trace_ELBO)
    # max_plate_nesting=1 is passed (no guessing run); Pyro adds one dim for the vectorized particle plate
    assert e.num_particles == n and e.vectorize_particles is vectorized
    assert e.max_plate_nesting == (2 if vectorized else 1)


# --------------------------------------------------------------------------------------------- fit
def test_fit_result_and_step_accounting(make_model, examples):
    model = make_model("letter")
    guide = default_guide(model)
    seen = []
    res = fit(model, guide, examples, config=TrainConfig(steps=7, batch_size=5), progress=False,
              callback=lambda step, loss: seen.append((step, loss)))
    assert isinstance(res, FitResult)
    assert res.steps == 7 and len(res.losses) == 7 and res.seconds > 0
    assert [s for s, _ in seen] == list(range(7)) and [x for _, x in seen] == res.losses
    assert all(math.isfinite(x) for x in res.losses)
    assert model.net.forward_calls == 7  # one backbone call per step (letter format, 1 particle)
    assert model.net.forward_rows == 7 * 5


def test_fit_changes_adapters_and_guide(make_model, examples):
    model = make_model("letter")
    guide = default_guide(model)
    V0 = {k: v.lora_A.weight.detach().clone() for k, v in model.net.subspace.sites.items()}
    s0 = {k: v.clone() for k, v in model.s0_values().items()}
    fit(model, guide, examples, config=TrainConfig(steps=3, batch_size=4, lr=1e-2), progress=False)
    for site, info in model.net.subspace.sites.items():
        assert not torch.equal(info.lora_A.weight, V0[site])
        assert torch.count_nonzero(info.lora_B.weight) > 0
    med = guide.median()
    assert all(not torch.equal(med[k], v) for k, v in s0.items())


def test_fit_minibatches_cover_the_data(make_model, examples, monkeypatch):
    model = make_model("letter")
    ids = []
    original = model.net.collate

    def spy(exs):
        ids.append([ex.id for ex in exs])
        return original(exs)

    monkeypatch.setattr(model.net, "collate", spy)
    fit(model, default_guide(model), examples, config=TrainConfig(steps=3, batch_size=8), progress=False)
    flat = [i for batch in ids for i in batch]
    assert len(ids) == 3 and all(len(b) == 8 for b in ids)
    assert sorted(flat) == sorted(ex.id for ex in examples)  # one epoch without repeats


def test_fit_passes_num_data(make_model, examples, monkeypatch):
    model = make_model("letter")
    seen = []
    original = type(model).__call__

    def spy(self, batch, labels=None, *, num_data=None):
        seen.append(num_data)
        return original(self, batch, labels, num_data=num_data)

    monkeypatch.setattr(type(model), "__call__", spy)
    fit(model, default_guide(model), examples, config=TrainConfig(steps=2, batch_size=4), progress=False)
    assert seen and all(n == len(examples) for n in seen)


@pytest.mark.parametrize("kl_weight, anneal, want", [
    (1.0, 0.5, [0.5, 1.0, 1.0, 1.0]),
    (0.5, 0.0, [0.5, 0.5, 0.5, 0.5]),
    (1.0, 1.0, [0.25, 0.5, 0.75, 1.0]),
    (0.4, 0.5, [0.2, 0.4, 0.4, 0.4]),
])
def test_kl_annealing(make_model, examples, kl_weight, anneal, want):
    model = make_model("letter")
    weights = []
    fit(model, default_guide(model), examples, config=TrainConfig(steps=4, batch_size=4, kl_weight=kl_weight,
                                                                  kl_anneal=anneal),
        progress=False, callback=lambda step, loss: weights.append(model.kl_weight))
    assert weights == pytest.approx(want)
    assert model.kl_weight == 1.0


def test_kl_weight_scales_guide_too(make_model, examples, monkeypatch):
    """During annealing the guide's log-density is scaled like the prior's (so the KL term is scaled)."""
    model = make_model("letter")
    guide = default_guide(model)
    scales = []
    original = train_mod.elbo_loss

    def elbo_loss(elbo, model_, guide_, *args, **kwargs):
        gtr = pyro.poutine.trace(guide_).get_trace(*args, **kwargs)
        scales.append(gtr.nodes[model.latent_sites[0]]["scale"])
        return original(elbo, model_, guide_, *args, **kwargs)

    monkeypatch.setattr(train_mod, "elbo_loss", elbo_loss)
    # Pyro's per-site path at every step (fit's AutoNormal path scales both terms too: tests/test_optim.py)
    monkeypatch.setattr(train_mod, "autonormal_path_applies", lambda *a: False)
    fit(model, guide, examples, config=TrainConfig(steps=2, batch_size=4, kl_weight=0.3), progress=False)
    assert scales == pytest.approx([0.3, 0.3])


def test_plain_torch_loop_reduces_loss(make_model, examples):
    model = make_model("letter", num_data=len(examples))
    guide = default_guide(model)
    batch = model.net.collate(examples[:12])
    labels = batch["labels"]
    guide(batch, labels)  # create the guide's parameters
    params = model.net.trainable_parameters() + list(guide.parameters())
    assert len(params) == 10 + 10
    opt = torch.optim.Adam(params, lr=2e-2)
    elbo = Trace_ELBO()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = elbo.differentiable_loss(model, guide, batch, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 5.0, (losses[:5], losses[-5:])


def test_vectorized_particles_in_fit(make_model, examples, monkeypatch):
    model = make_model("choice")
    guide = default_guide(model)
    shapes = []
    original = model.net.logits

    def spy(batch, *, s=None, prefix_cache=None):
        shapes.append({k: tuple(v.shape) for k, v in s.items()})
        return original(batch, s=s, prefix_cache=prefix_cache)

    monkeypatch.setattr(model.net, "logits", spy)
    res = fit(model, guide, examples, config=TrainConfig(steps=3, batch_size=4, num_particles=3), progress=False)
    assert all(math.isfinite(x) for x in res.losses)
    assert len(shapes) == 3 and all(v == (3, 4) for sh in shapes for v in sh.values())
    assert model.net.forward_calls == 3 * 2  # one chunked forward per step (context + continuations)


def test_lora_model_fit_with_empty_guide(make_model, examples):
    model = make_model("letter", bayes=False)
    res = fit(model, None, examples, config=TrainConfig(steps=20, batch_size=8, lr=3e-2), progress=False)
    assert empty_guide(1, x=2) is None
    assert all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5
    assert set(pyro.get_param_store().keys()) == {n for n in pyro.get_param_store().keys() if n.startswith("lora$$$")}


def test_fit_without_examples(make_model):
    model = make_model("letter")
    with pytest.raises(ValueError, match="no training examples"):
        fit(model, default_guide(model), [], progress=False)


def _nan_after(n, monkeypatch):
    """Make fit's ELBO (either path: Pyro's per-site terms or the AutoNormal path) NaN from call n + 1 on."""
    calls = []

    def wrap(original):
        def loss_fn(*args, **kwargs):
            calls.append(1)
            loss, surrogate = original(*args, **kwargs)
            return (loss * float("nan") if len(calls) > n else loss), surrogate
        return loss_fn

    for name in ("elbo_loss", "autonormal_elbo_loss"):
        monkeypatch.setattr(train_mod, name, wrap(getattr(train_mod, name)))


def test_non_finite_elbo_raises(make_model, examples, monkeypatch):
    model = make_model("letter")
    _nan_after(2, monkeypatch)
    seen = []
    with pytest.raises(FloatingPointError, match="step 2"):
        fit(model, default_guide(model), examples, config=TrainConfig(steps=5, batch_size=4), progress=False,
            callback=lambda step, loss: seen.append(step))
    assert seen == [0, 1]


def test_kl_weight_restored_after_failure(make_model, examples, monkeypatch):
    model = make_model("letter")
    _nan_after(1, monkeypatch)
    with pytest.raises(FloatingPointError):
        fit(model, default_guide(model), examples, config=TrainConfig(steps=10, batch_size=4, kl_anneal=1.0),
            progress=False)
    assert model.kl_weight == 1.0


@pytest.mark.parametrize("guide_name", ["normal", "delta"])
def test_training_does_not_mutate_s0(make_model, examples, guide_name):
    from scalabl_pyro.guides import make_guide

    model = make_model("letter")
    before = {k: v.clone() for k, v in model.s0_values().items()}
    guide = make_guide(guide_name, model)
    fit(model, guide, examples, config=TrainConfig(steps=3, batch_size=4, lr=1e-2, guide_lr=5e-2), progress=False)
    assert any(not torch.equal(guide.median()[k], before[k]) for k in before)  # the guide moved ...
    for k, v in model.s0_values().items():  # ... the initial singular values did not
        assert torch.equal(v, before[k]), k


def test_lora_dropout_is_on_while_training_and_off_after(make_model, examples):
    import torch

    from scalabl_pyro.train import _lora_dropout

    model = make_model("letter", bayes=False, num_data=24, lora_dropout=0.5)
    dropout = _lora_dropout(model)
    assert len(dropout) == 5 and not any(d.training for d in dropout)  # AdaptedLM: eval, deterministic
    seen = []
    fit(model, None, examples, config=TrainConfig(steps=2), progress=False,
        callback=lambda step, loss: seen.append(all(d.training for d in dropout)))
    assert seen == [True, True] and not any(d.training for d in dropout)
    batch = model.net.collate(examples[:4])
    with torch.no_grad():
        assert torch.equal(model.net.logits(batch), model.net.logits(batch))


# ------------------------------------------------------------------------------------- convergence
def test_fit_records_kl_and_scale_and_warns_when_the_guide_cannot_move(make_model, examples):
    from scalabl_pyro.convergence import ConvergenceWarning
    from scalabl_pyro.guides import default_guide

    model = make_model("letter", num_data=24)
    with pytest.warns(ConvergenceWarning, match=r"within 1.5x of where they started.*guide_lr"):
        res = fit(model, default_guide(model), examples, config=TrainConfig(steps=30, guide_lr=1e-5),
                  progress=False, monitor_every=3)
    assert res.monitor_steps == [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert len(res.kl) == len(res.scale) == len(res.monitor_steps)
    assert all(abs(s - 0.05) < 0.01 for s in res.scale)  # stuck at AutoNormal's init_scale 0.05
    assert all(math.isfinite(k) and k > 0 for k in res.kl)


def test_fit_is_silent_on_a_converged_fit_and_monitoring_leaves_the_trajectory_alone(make_model, examples):
    import warnings

    from scalabl_pyro.guides import default_guide

    def run(monitor_every):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = make_model("letter", num_data=24)
        guide = default_guide(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            res = fit(model, guide, examples, config=TrainConfig(steps=300, guide_lr=0.2, lr=1e-2), progress=False,
                      monitor_every=monitor_every)
        return res, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    res, params = run(10)
    assert res.scale[-1] > 4 * res.scale[0]  # the posterior widened from 0.05 towards its optimum
    res2, params2 = run(299)  # other monitoring points: the same training
    assert res2.losses == res.losses and all(torch.equal(params[k], params2[k]) for k in params)


def test_check_convergence_on_hand_made_histories():
    import warnings

    from scalabl_pyro.convergence import ConvergenceWarning, check_convergence

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_convergence([0.05, 0.2, 0.5, 0.9, 1.0, 1.0], [5, 3, 2, 2, 2, 2]) == []
        assert check_convergence([0.05, 0.06], [1.0, 2.0]) == []  # too few points to judge
    with pytest.warns(ConvergenceWarning, match="KL term still changed by 50%"):
        msgs = check_convergence([0.05, 0.2, 0.5, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5], [9, 8, 7, 6, 5, 4, 4, 4, 2, 2])
    assert len(msgs) == 1
    # falling (4 -> 2) is a posterior moving towards its prior: the advice names the prior's scale
    assert "towards its prior" in msgs[0] and "centered_prior(scale=" in msgs[0]
    with pytest.warns(ConvergenceWarning, match=r"KL term still changed by 50% .*\(2 -> 4 nats per example\): "
                                                r"the posterior is still moving\. Train longer"):
        msgs = check_convergence([1.0] * 5 + [0.6] * 5, [2, 2, 2, 2, 2, 2, 2, 2, 4, 4])
    assert "prior" not in msgs[0]


def test_monitor_every_must_be_positive(make_model, examples):
    with pytest.raises(ValueError, match="monitor_every=0 must be a positive integer"):
        fit(make_model("letter"), None, examples, progress=False, monitor_every=0)


def test_fit_autocasts_the_forward_in_bfloat16(make_model, examples):
    """TrainConfig(autocast="bfloat16"): the decoder runs under autocast, the loss stays close to float32's."""
    seen = []
    losses = {}
    for autocast in (None, "bfloat16"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = make_model("letter")
        hook = model.net.decoder.register_forward_pre_hook(
            lambda m, a: seen.append((autocast, torch.is_autocast_enabled("cpu"))))
        res = fit(model, default_guide(model), examples, config=TrainConfig(steps=2, batch_size=4, autocast=autocast),
                  progress=False, warn_unconverged=False)
        hook.remove()
        losses[autocast] = res.losses
    assert {flag for a, flag in seen if a is None} == {False} and {flag for a, flag in seen if a} == {True}
    assert losses["bfloat16"] == pytest.approx(losses[None], rel=0.05)
    with pytest.raises(ValueError, match="autocast='float16' is not supported; allowed values: 'bfloat16'"):
        TrainConfig(autocast="float16")
    assert TrainConfig.from_dict(TrainConfig(autocast="bfloat16").to_dict()).autocast == "bfloat16"
