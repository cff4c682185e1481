"""save_run / load_run / export_peft: exact round trips, refusals and error messages."""
from __future__ import annotations

import json

import pyro
import pytest
import torch
from safetensors.torch import load_file

from conftest import randomize_lora, synthetic_examples
from scalabl_pyro.backbones import tiny_llama
from scalabl_pyro.config import TrainConfig
from scalabl_pyro.guides import make_guide
from scalabl_pyro.io import RunExistsError, export_peft, load_run, save_run
from scalabl_pyro.model import LoRAModel, ScalaBL
from scalabl_pyro.predictive import predict
from scalabl_pyro.train import fit

ADAPTER = "adapter/adapter_model.safetensors"


def _trained(make_model, scoring, guide_name, steps=3):
    model = make_model(scoring)
    guide = make_guide(guide_name, model, init_scale=0.2)
    fit(model, guide, synthetic_examples(12), config=TrainConfig(steps=steps, batch_size=4, lr=1e-2, guide_lr=5e-2),
        progress=False)
    return model, guide


def _median_s(guide):
    return {k: v[None] for k, v in guide.median().items()}


@pytest.mark.parametrize("guide_name", ["normal", "delta"])
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_round_trip_exact(make_model, tmp_path, scoring, guide_name):
    model, guide = _trained(make_model, scoring, guide_name)
    exs = synthetic_examples(5)
    batch = model.net.collate(exs)
    with torch.no_grad():
        logits = model.net.logits(batch, s=_median_s(guide))
    pyro.set_rng_seed(11)
    pred = predict(model, guide, exs, num_samples=6)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny", meta={"note": "x"})
    assert sorted(p.name for p in path.iterdir()) == ["adapter", "guide.safetensors", "run.json"]
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    pyro.clear_param_store()  # as in a fresh process
    model2, guide2, info = load_run(path, backbone=tiny_llama())
    assert isinstance(model2, ScalaBL) and type(guide2) is type(guide)
    assert info["guide"]["kind"] == guide_name and info["backbone"] == "tiny" and info["meta"] == {"note": "x"}
    assert info["latent_sites"] == model.latent_sites
    assert model2.net.config == model.net.config and model2.net.label_words == model.net.label_words
    for k, v in guide.median().items():
        assert torch.equal(guide2.median()[k], v), k
    for (n1, p1), (n2, p2) in zip(model.net.peft_model.named_parameters(), model2.net.peft_model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with torch.no_grad():
        logits2 = model2.net.logits(model2.net.collate(exs), s=_median_s(guide2))
    torch.testing.assert_close(logits2, logits, atol=0, rtol=0)
    pyro.set_rng_seed(11)
    pred2 = predict(model2, guide2, exs, num_samples=6)
    torch.testing.assert_close(pred2.sample_probs, pred.sample_probs, atol=1e-6, rtol=0)


def test_round_trip_lora_model(make_model, tmp_path):
    model = make_model("choice", bayes=False)
    randomize_lora(model.net)
    exs = synthetic_examples(3)
    want = model.net.logits(model.net.collate(exs))
    path = save_run(tmp_path / "lora", model, None, backbone="tiny")
    assert not (path / "guide.safetensors").exists()
    pyro.clear_param_store()
    model2, guide2, info = load_run(path, backbone=tiny_llama())
    assert type(model2) is LoRAModel and guide2 is None and info["guide"] is None and info["train_config"] is None
    torch.testing.assert_close(model2.net.logits(model2.net.collate(exs)), want, atol=0, rtol=0)


def test_run_exists(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "delta", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    before = (path / "run.json").read_text()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        save_run(path, model, guide, backbone="tiny")
    assert isinstance(RunExistsError("x"), FileExistsError)
    assert (path / "run.json").read_text() == before
    save_run(path, model, guide, backbone="other", overwrite=True)
    assert json.loads((path / "run.json").read_text())["backbone"] == "other"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert leftovers == []  # no temporary directories left behind


def test_guide_kind_must_be_known(make_model, tmp_path):
    from pyro.infer.autoguide import AutoNormal

    class MyGuide(AutoNormal):
        pass

    model = make_model("letter")
    with pytest.raises(ValueError, match="cannot record a MyGuide guide"):
        save_run(tmp_path / "r", model, MyGuide(model), backbone="tiny")
    assert not (tmp_path / "r").exists()


def test_loading_with_different_r(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "normal", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    run = json.loads((path / "run.json").read_text())
    run["config"]["r"] = 2
    (path / "run.json").write_text(json.dumps(run))
    pyro.clear_param_store()
    with pytest.raises(ValueError) as info:
        load_run(path, backbone=tiny_llama())
    msg = str(info.value)
    assert "LoRA adapters do not match" in msg
    assert "saved (4, 32) vs model (2, 32)" in msg


def test_loading_with_other_guide_kind(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "normal", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    run = json.loads((path / "run.json").read_text())
    run["guide"] = {"kind": "delta", "options": {}}
    (path / "run.json").write_text(json.dumps(run))
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"guide parameters do not match.*unexpected \['locs\."):
        load_run(path, backbone=tiny_llama())


def _prior_locs(model) -> dict:
    batch = model.net.collate(synthetic_examples(2))
    tr = pyro.poutine.trace(model).get_trace(batch, batch["labels"])
    return {k: tr.nodes[k]["fn"].base_dist.loc.expand(4).clone() for k in model.latent_sites}


def test_default_prior_round_trip_and_old_default_record(make_model, tmp_path):
    """The default prior N(s0, 1) comes back from the same seed's s0; a run recorded before the default moved
    (``{"kind": "default"}`` without ``loc``) loads with the N(0, prior_scale) it was trained with."""
    model, guide = _trained(make_model, "letter", "normal", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    want = _prior_locs(model)
    assert json.loads((path / "run.json").read_text())["prior"] == {"kind": "default", "loc": "s0"}
    pyro.clear_param_store()
    loaded, _, _ = load_run(path, backbone=tiny_llama())
    got = _prior_locs(loaded)
    assert all(torch.equal(got[k], want[k]) for k in want) and any(v.abs().sum() > 0 for v in want.values())
    run = json.loads((path / "run.json").read_text())
    run["prior"] = {"kind": "default"}
    (path / "run.json").write_text(json.dumps(run))
    pyro.clear_param_store()
    old, _, _ = load_run(path, backbone=tiny_llama())
    assert all(torch.equal(v, torch.zeros(4)) for v in _prior_locs(old).values())


def test_missing_run_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run.json"):
        load_run(tmp_path, backbone=tiny_llama())


def test_missing_adapter_file(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "delta", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    (path / ADAPTER).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_run(path, backbone=tiny_llama())


def test_unsupported_format(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "delta", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    run = json.loads((path / "run.json").read_text())
    run["format"] = 99
    (path / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="format 99 is not supported"):
        load_run(path, backbone=tiny_llama())


@pytest.mark.parametrize("scoring", ["choice"])  # letter format: test_export_peft_loads_with_peft
def test_export_peft_folds_median_into_A(make_model, tmp_path, scoring):
    model, guide = _trained(make_model, scoring, "normal")
    med = guide.median()
    V = {k: v.lora_A.weight.detach().clone() for k, v in model.net.subspace.sites.items()}
    out = export_peft(tmp_path / "peft", model, guide)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert (out / "adapter_config.json").is_file()
    for site, info in model.net.subspace.sites.items():
        key = f"base_model.model.{info.module_name}.lora_A.weight"
        torch.testing.assert_close(saved[key], torch.diag(med[site]) @ V[site], atol=1e-6, rtol=1e-6)
        assert torch.equal(saved[key.replace("lora_A", "lora_B")], info.lora_B.weight)
        assert torch.equal(info.lora_A.weight, V[site])  # the live model is unchanged
    # a plain LoRA net with the exported adapter is the ScalaBL net at s = median
    from peft import set_peft_model_state_dict

    plain = make_model(scoring, bayes=False).net
    set_peft_model_state_dict(plain.peft_model, saved)
    batch = model.net.collate(synthetic_examples(4))
    with torch.no_grad():
        torch.testing.assert_close(plain.logits(batch), model.net.logits(batch, s=_median_s(guide)),
                                   atol=1e-5, rtol=1e-5)


def test_export_peft_needs_a_median(make_model, tmp_path):
    model = make_model("letter")
    with pytest.raises(ValueError, match="median"):
        export_peft(tmp_path / "x", model, object())


def test_export_peft_iaf_guide_gives_clear_error(make_model, tmp_path):
    model, guide = _trained(make_model, "letter", "iaf", steps=1)
    with pytest.raises(ValueError, match="median"):
        export_peft(tmp_path / "x", model, guide)


def test_adapter_holds_only_lora_tensors(make_model, tmp_path):
    model, guide = _trained(make_model, "choice", "delta", steps=1)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    keys = list(load_file(str(path / ADAPTER)))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_" not in k]



# ---------------------------------------------------------------- every guide, prior and method round-trips
def _priors():
    import pyro.distributions as dist

    from scalabl_pyro.priors import LayerScalePrior, isotropic_normal, laplace_prior, student_t_prior

    return {"default": None, "isotropic": isotropic_normal(0.5), "laplace": laplace_prior(0.7),
            "student_t": student_t_prior(4.0, 1.5), "layer_scale": LayerScalePrior(init=0.8),
            "distribution": dist.Normal(0.1, 0.9), "centered": "centered"}


GUIDE_OPTIONS = {"normal": {}, "diagonal": {"init_scale": 0.3}, "lowrank": {"rank": 3}, "mvn": {},
                 "iaf": {"hidden_dim": 24, "num_transforms": 2}, "delta": {}, "laplace": {}}


def _assert_same_predictions(model, guide, model2, guide2, exs):
    for (n1, p1), (n2, p2) in zip(model.net.peft_model.named_parameters(), model2.net.peft_model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    if guide is not None:
        s1, s2 = guide.state_dict(), guide2.state_dict()
        assert list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    pyro.set_rng_seed(5)
    want = predict(model, guide, exs, num_samples=4).sample_probs
    pyro.set_rng_seed(5)
    got = predict(model2, guide2, exs, num_samples=4).sample_probs
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("guide_name", sorted(GUIDE_OPTIONS))
@pytest.mark.parametrize("prior_name", sorted(_priors()))
def test_every_guide_and_prior_round_trips(make_net, tmp_path, guide_name, prior_name):
    from scalabl_pyro.priors import centered_prior

    net = make_net("letter", seed=3)  # a non-default adapter seed: s0 (and the centred prior) depend on it
    prior = _priors()[prior_name]
    prior = centered_prior(net.subspace.s0, 0.6) if prior == "centered" else prior
    model = ScalaBL(net, prior=prior, num_data=12)
    guide = make_guide(guide_name, model, **GUIDE_OPTIONS[guide_name])
    tc = TrainConfig(steps=2, batch_size=4, lr=1e-2, guide_lr=5e-2)
    fit(model, guide, synthetic_examples(12), config=tc, progress=False)
    path = save_run(tmp_path / "run", model, guide, train_config=tc, backbone="tiny")
    pyro.clear_param_store()
    model2, guide2, info = load_run(path, backbone=tiny_llama(), name="reloaded")
    assert info["train_config"] == tc and info["guide"]["kind"] == guide_name
    assert type(model2.prior_spec) is dict and model2.prior_spec == model.prior_spec
    for site, s0 in model.s0_values().items():
        assert torch.equal(model2.s0_values()[site], s0)
    site, x = model.latent_sites[0], torch.full((4,), 0.3)
    logp = []
    for m in (model, model2):
        with pyro.poutine.trace():  # LayerScalePrior adds a factor site: keep it inside a Pyro context
            logp.append(m.prior(site, m.net.subspace.sites[site].layer, (4,)).log_prob(x))
    assert torch.equal(*logp)
    _assert_same_predictions(model, guide, model2, guide2, synthetic_examples(5))


def test_custom_callable_prior_must_be_given_again(make_model, tmp_path):
    import pyro.distributions as dist

    def depth_prior(site, module):
        return dist.Normal(0.0, 2.0 if "lm_head" in site else 1.0)

    model = make_model("letter", prior=depth_prior)
    guide = make_guide("normal", model)
    fit(model, guide, synthetic_examples(8), config=TrainConfig(steps=1, batch_size=4), progress=False)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"custom prior callable 'test_custom.*depth_prior'.*load_run\(path, prior="):
        load_run(path, backbone=tiny_llama())
    pyro.clear_param_store()
    model2, guide2, _ = load_run(path, backbone=tiny_llama(), prior=depth_prior, name="reloaded")
    _assert_same_predictions(model, guide, model2, guide2, synthetic_examples(4))


@pytest.mark.parametrize("method", ["mle", "map", "mcdropout", "ensemble", "scalabl", "blob", "laplace",
                                    "scalabl_bayesadapt", "temperature"])
def test_every_method_round_trips(tmp_path, method):
    from conftest import LABEL_WORDS
    from scalabl_pyro.config import ScalaBLConfig
    from scalabl_pyro.harness.methods import METHODS, load_trained, save_trained, train_method

    assert method in METHODS
    cfg = ScalaBLConfig(r=4, scoring="letter")
    tc = TrainConfig(steps=2, batch_size=4, lr=1e-2, guide_lr=5e-2, seed=1)
    t = train_method(method, tiny_llama, synthetic_examples(12), label_words=LABEL_WORDS, config=cfg,
                     train_config=tc, progress=False, ensemble_size=2)
    path = save_trained(tmp_path / "trained", t, train_config=tc, backbone="tiny")
    t2 = load_trained(path, backbone_fn=tiny_llama)
    assert (t2.method, len(t2.models), t2.num_samples, t2.losses) == (method, len(t.models), t.num_samples, t.losses)
    assert t2.temperature == t.temperature and (t.temperature is not None) == (method == "temperature")
    for m, m2 in zip(t.models, t2.models):
        assert type(m2) is type(m) and m2.net.config == m.net.config
        for (n1, p1), (n2, p2) in zip(m.net.peft_model.named_parameters(), m2.net.peft_model.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2), n1
    if method == "laplace":
        assert json.loads((path / "member0" / "run.json").read_text())["guide"]["kind"] == "laplace_posterior"
        assert torch.equal(t2.guide.scale_tril, t.guide.scale_tril) and not torch.equal(
            t.guide.scale_tril, torch.eye(t.guide.scale_tril.shape[0]))
    exs = synthetic_examples(5)
    pyro.set_rng_seed(5)
    want = t.predict(exs, num_samples=4).sample_probs
    pyro.set_rng_seed(5)
    got = t2.predict(exs, num_samples=4).sample_probs
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_polar_vbll_round_trips(tmp_path):
    from conftest import LABEL_WORDS
    from scalabl_pyro.config import ScalaBLConfig
    from scalabl_pyro.harness.methods import train_polar_vbll

    cfg = ScalaBLConfig(r=4, scoring="letter", target_modules=("q_proj", "v_proj"))
    t = train_polar_vbll(tiny_llama, synthetic_examples(12), label_words=LABEL_WORDS, config=cfg, prior_scale=0.5,
                         centered=False, train_config=TrainConfig(steps=3, batch_size=4, lr=5e-2, seed=2),
                         progress=False)
    model, guide = t.models[0], t.guide
    assert any(float(layer.theta.detach().abs().sum()) > 0 for layer in model.polar.values())  # theta has trained
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    assert (path / "extra.safetensors").is_file()
    model2, guide2, info = load_run(path, backbone=tiny_llama())
    assert info["model"]["options"] == {"prior_scale": 0.5, "centered": False, "seed": 2}
    assert model2.prior_scale == 0.5 and not model2.centered
    for k, v in model.polar.state_dict().items():
        assert torch.equal(model2.polar.state_dict()[k], v), k
    _assert_same_predictions(model, guide, model2, guide2, synthetic_examples(5))
    # a run saved before PoLAR moved into scalabl_pyro.baselines names its old module: it still loads
    assert info["model"]["module"] == "scalabl_pyro.baselines.polar"
    run = json.loads((path / "run.json").read_text())
    run["model"]["module"] = "scalabl_pyro.polar"
    (path / "run.json").write_text(json.dumps(run))
    model3, guide3, _ = load_run(path, backbone=tiny_llama(), name="polar_old")
    assert type(model3) is type(model)
    _assert_same_predictions(model, guide, model3, guide3, synthetic_examples(5))
    run["model"]["module"] = "somewhere.else"
    (path / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="outside scalabl_pyro"):
        load_run(path, backbone=tiny_llama())


# ------------------------------------------------------------------ export_peft loads with peft's own loaders
@pytest.mark.parametrize("bayes", [True, False], ids=["scalabl", "lora"])
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_export_peft_loads_with_peft(tmp_path, scoring, bayes):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from conftest import LABEL_WORDS
    from scalabl_pyro.config import ScalaBLConfig
    from scalabl_pyro.scoring import AdaptedLM
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"  # a saved backbone: adapter_config.json points at it
    lm, tok = tiny_llama()
    lm.save_pretrained(base_dir)
    net = AdaptedLM(AutoModelForCausalLM.from_pretrained(base_dir), tok, label_words=LABEL_WORDS,
                    config=ScalaBLConfig(r=4, scoring=scoring), subspace=bayes)
    model = ScalaBL(net, num_data=12) if bayes else LoRAModel(net, num_data=12)
    guide = make_guide("normal", model, init_scale=0.2) if bayes else None
    fit(model, guide, synthetic_examples(12), config=TrainConfig(steps=3, batch_size=4, lr=5e-2, guide_lr=5e-2),
        progress=False)
    out = export_peft(tmp_path / "peft", model, guide)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    exs = synthetic_examples(4)
    batch = net.collate(exs)
    with torch.no_grad():
        want = net.logits(batch, s=_median_s(guide)) if bayes else net.logits(batch)
    loaded = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out),
              AutoPeftModelForCausalLM.from_pretrained(out)]
    for peft_model in loaded:
        with torch.no_grad():
            if scoring == "letter":
                got = torch.stack([peft_model(input_ids=torch.tensor([tok(ex.prompt, add_special_tokens=False)[
                    "input_ids"]])).logits[0, -1, net.label_token_ids] for ex in exs])
            else:
                from conftest import direct_choice_scores
                got = torch.stack([direct_choice_scores(peft_model, tok, ex) for ex in exs])
        torch.testing.assert_close(got, want[0], atol=1e-4, rtol=1e-4)


def test_load_beside_the_live_trained_model(make_model, tmp_path):
    """Train, save and load in one process: the loaded run takes a free name, and both keep their own tensors."""
    model, guide = _trained(make_model, "letter", "normal")
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    model2, guide2, _ = load_run(path, backbone=tiny_llama())
    assert model2.name == "scalabl_1" and guide2._pyro_name == "AutoNormal_scalabl_1"
    _assert_same_predictions(model, guide, model2, guide2, synthetic_examples(4))
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    fit(model2, guide2, synthetic_examples(12), config=TrainConfig(steps=2, guide_lr=0.1), progress=False)
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, guide2.state_dict()[k]) for k, v in before.items())


def _fit_save_load(model, tmp_path):
    """Train ``model`` a few steps with an AutoNormal guide, save and reload it; check that the reloaded run
    predicts the same sample probabilities. Returns ``(guide, model2, guide2, info)``."""
    guide = make_guide("normal", model, init_scale=0.2)
    fit(model, guide, synthetic_examples(12), config=TrainConfig(steps=3, batch_size=4, guide_lr=5e-2),
        progress=False, warn_unconverged=False)
    exs = synthetic_examples(5)
    pyro.set_rng_seed(11)
    pred = predict(model, guide, exs, num_samples=4)
    path = save_run(tmp_path / "run", model, guide, backbone="tiny")
    pyro.clear_param_store()
    model2, guide2, info = load_run(path, backbone=tiny_llama())
    pyro.set_rng_seed(11)
    torch.testing.assert_close(predict(model2, guide2, exs, num_samples=4).sample_probs, pred.sample_probs,
                               atol=1e-6, rtol=0)
    return guide, model2, guide2, info


def test_vectorized_layout_round_trips(make_net, tmp_path):
    model = ScalaBL(make_net("choice"), layout="vectorized")
    guide, model2, guide2, info = _fit_save_load(model, tmp_path)
    assert model2.layout == "vectorized" and info["latent_sites"] == ["lora.s"] == model2.latent_sites
    assert torch.equal(guide2.median()["lora.s"], guide.median()["lora.s"])


@pytest.mark.parametrize("layout", ["modules", "vectorized"])
def test_partial_model_round_trips_and_exports(make_net, tmp_path, layout):
    """A partial-Bayesian ScalaBL saves which modules are stochastic; export_peft folds s0 into the others."""
    from scalabl_pyro.trunk import last_layers

    net = make_net("choice")
    chosen = last_layers(net, 0)  # lm_head only
    model = ScalaBL(net, stochastic=chosen, layout=layout)
    guide, model2, _, info = _fit_save_load(model, tmp_path)
    assert model2.stochastic == chosen and model2.latent_sites == model.latent_sites == info["latent_sites"]
    out = export_peft(tmp_path / "peft", model, guide)
    saved = load_file(str(out / "adapter_model.safetensors"))
    med = model.module_values(guide.median())
    for site, info in model.net.subspace.sites.items():
        s = med[site] if site in med else info.s0
        key = f"base_model.model.{info.module_name}.lora_A.weight"
        torch.testing.assert_close(saved[key], torch.diag(s) @ info.lora_A.weight.detach(), atol=1e-6, rtol=1e-6)
