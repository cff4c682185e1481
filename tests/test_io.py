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

    pyro.clear_param_store()  # as in a fresh process
    model2, guide2, info = load_run(path, backbone=tiny_llama())
    assert isinstance(model2, ScalaBL) and type(guide2) is type(guide)
    assert info["guide"] == guide_name and info["backbone"] == "tiny" and info["meta"] == {"note": "x"}
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
    assert type(model2) is LoRAModel and guide2 is None and info["guide"] is None
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
    with pytest.raises(ValueError, match="cannot infer guide_kind for MyGuide"):
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
    run["guide"] = "delta"
    (path / "run.json").write_text(json.dumps(run))
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="guide parameters do not match.*AutoDelta"):
        load_run(path, backbone=tiny_llama())


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


@pytest.mark.parametrize("scoring", ["letter", "choice"])
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
