"""Backbones: the offline char tokenizer and tiny Llama, local-path errors, and the embedded SmolLM2."""
from __future__ import annotations

import time

import math

import pytest
import torch
import pyro

from conftest import synthetic_examples
from scalabl_pyro.backbones import char_tokenizer, load_backbone, tiny_llama


def test_char_tokenizer_single_token_letters():
    tok = char_tokenizer()
    for w in ("A", "B", "C", "D", "E", "0", "?"):
        ids = tok(" " + w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (w, ids)
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in "ABCD"]
    assert len(set(ids)) == 4
    assert tok("AB", add_special_tokens=False)["input_ids"] == [tok("A", add_special_tokens=False)["input_ids"][0],
                                                               tok("B", add_special_tokens=False)["input_ids"][0]]
    assert len(tok(" AB", add_special_tokens=False)["input_ids"]) == 2


def test_char_tokenizer_round_trip_and_specials():
    tok = char_tokenizer()
    text = "Question: 2+2?\nAnswer: B"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    assert len(tok) == 5 + 2 * 95
    batch = tok(["a", "abc"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1]


def test_tiny_llama_deterministic_by_seed():
    (m1, _), (m2, _), (m3, _) = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    ids = torch.tensor([[5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(m1(input_ids=ids).logits, m2(input_ids=ids).logits, atol=0, rtol=0)


def test_tiny_llama_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), a)


def test_tiny_llama_is_frozen_eval_and_configurable():
    m, tok = tiny_llama(hidden_size=16, num_layers=3, tie_word_embeddings=False)
    assert not any(p.requires_grad for p in m.parameters())
    assert not m.training
    assert m.config.hidden_size == 16 and m.config.num_hidden_layers == 3
    assert m.config.vocab_size == len(tok)
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
    tied, _ = tiny_llama()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight


@pytest.mark.parametrize("path", ["/nonexistent/dir", "/nonexistent/dir/model-xyz"])
def test_load_backbone_missing_local_path(path):
    with pytest.raises(OSError) as info:
        load_backbone(path)
    msg = str(info.value)
    assert repr(path) in msg
    assert "local directory" in msg and "'smollm2'" in msg


def test_load_backbone_local_directory(tmp_path):
    m, tok = tiny_llama(seed=3)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = load_backbone(str(tmp_path))
    assert not any(p.requires_grad for p in m2.parameters()) and not m2.training
    assert tok2.padding_side == "left" and tok2.pad_token is not None
    ids = torch.tensor([[5, 9, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m(input_ids=ids).logits)


@pytest.mark.integration
def test_smollm2_loads_frozen_and_cached(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    for w in ("A", "B", "C", "D"):
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1
    t0 = time.perf_counter()
    model2, tok2 = load_backbone("smollm2")  # the de-quantized copy is cached on disk by now
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"second load took {elapsed:.1f}s"
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model2(input_ids=ids).logits, model(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- fail fast offline
ALLOWED = ("'smollm2'", "'tiny'", "hub id 'owner/name'", "local directory")


def _load_error(name, **kwargs) -> tuple[str, float]:
    t0 = time.perf_counter()
    with pytest.raises(OSError) as info:
        load_backbone(name, **kwargs)
    return str(info.value), time.perf_counter() - t0


def test_unknown_backbone_name_fails_fast_naming_the_allowed_names():
    msg, elapsed = _load_error("not-a-model")  # not a path, not cached, hub unreachable here: one short probe
    assert elapsed < 10.0, f"took {elapsed:.1f}s"
    assert "'not-a-model'" in msg and "hub is offline" in msg
    assert all(a in msg for a in ALLOWED), msg


def test_bare_name_goes_to_the_hub_when_it_is_reachable(monkeypatch):
    """Online, a bare name may be a legacy hub id ('gpt2'): it is not refused before the hub is asked."""
    import scalabl_pyro.backbones as backbones

    monkeypatch.setattr(backbones, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert backbones._resolve_source("gpt2") == ("gpt2", False)


def test_hub_id_with_hub_switched_off_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, elapsed = _load_error("no-such-owner/no-such-model-xyz")
    assert elapsed < 10.0, f"took {elapsed:.1f}s"
    assert "HF_HUB_OFFLINE" in msg and "local Hugging Face cache" in msg and all(a in msg for a in ALLOWED)


def test_hub_id_with_hub_unreachable_fails_fast(monkeypatch):
    import scalabl_pyro.backbones as backbones

    calls = []
    monkeypatch.setattr(backbones, "_hub_offline", lambda: False)
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: calls.append(1) or False)
    msg, elapsed = _load_error("no-such-owner/no-such-model-xyz")
    assert elapsed < 10.0 and calls == [1]  # one probe, no retries
    assert "unreachable" in msg and "'no-such-owner/no-such-model-xyz'" in msg and "'smollm2'" in msg


def test_hub_id_fails_fast_here_whether_online_or_not():
    # the real probe: offline it fails at once; online the hub answers 404 at once
    msg, elapsed = _load_error("no-such-owner/no-such-model-xyz-3141")
    assert elapsed < 10.0, f"took {elapsed:.1f}s"
    assert "'no-such-owner/no-such-model-xyz-3141'" in msg and "'smollm2'" in msg


def _fake_hf_cache(root, repo_id: str, seed: int = 3):
    """A Hugging Face hub cache holding ``repo_id`` (what ``from_pretrained`` leaves after a download)."""
    m, tok = tiny_llama(seed=seed)
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("ab" * 20)
    m.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("ab" * 20)
    return m


@pytest.mark.parametrize("offline", [True, False])
def test_cached_hub_id_loads_without_the_hub(tmp_path, monkeypatch, offline):
    import scalabl_pyro.backbones as backbones

    m = _fake_hf_cache(tmp_path, "someone/tiny-llama")
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(backbones, "_hub_offline", lambda: False)
        monkeypatch.setattr(backbones, "_hub_reachable", lambda: False)
    t0 = time.perf_counter()
    m2, tok2 = load_backbone("someone/tiny-llama", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 10.0
    assert tok2.padding_side == "left" and not m2.training
    ids = torch.tensor([[5, 9, 30, 7]])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, m(input_ids=ids).logits)


def test_load_backbone_tiny_is_the_test_model():
    m, tok = load_backbone("tiny")
    ref, _ = tiny_llama()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert tok.padding_side == "left" and not any(p.requires_grad for p in m.parameters())


# ------------------------------------------------------------------ random-weight large shapes, quantization
@pytest.mark.parametrize("shape, billions, cls", [("llama-1b", 1.236, "LlamaForCausalLM"),
                                                  ("llama-7b", 6.738, "LlamaForCausalLM"),
                                                  ("qwen2-1.5b", 1.544, "Qwen2ForCausalLM"),
                                                  ("qwen2-7b", 7.616, "Qwen2ForCausalLM")])
def test_random_shapes_have_the_published_parameter_counts(shape, billions, cls):
    from scalabl_pyro.backbones import RANDOM_CONFIGS, random_llm

    assert shape in RANDOM_CONFIGS
    model, _ = random_llm(shape, device="meta")  # shapes only: no memory
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_a_random_qwen2_trains_as_scalabl():
    """load_backbone('random:...') on a cut-down Qwen2 shape (biased q/v projections): one SVI step moves V, B, s."""
    from pyro.infer import SVI, Trace_ELBO

    from scalabl_pyro import AdaptedLM, ScalaBL, ScalaBLConfig, default_guide
    from scalabl_pyro.backbones import random_llm

    lm, tok = random_llm("qwen2-1.5b", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    net = AdaptedLM(lm.requires_grad_(False), tok, label_words="ABC", config=ScalaBLConfig(r=4, scoring="choice"))
    assert len(net.subspace.sites) == 2 * 2 + 1  # q_proj, v_proj per layer + lm_head
    pyro.clear_param_store()
    model = ScalaBL(net, num_data=8)
    guide = default_guide(model)
    batch = net.collate(synthetic_examples(4))
    before = [p.detach().clone() for p in net.trainable_parameters()]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(max_plate_nesting=1))
    assert torch.isfinite(torch.tensor(svi.step(batch, batch["labels"])))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.trainable_parameters()))
    with pytest.raises(ValueError, match="not a known shape; allowed: llama-1b"):
        random_llm("llama-70b")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_errors_name_the_fix(quantization, monkeypatch):
    import scalabl_pyro.backbones as backbones

    with pytest.raises(ValueError, match="quantizes pretrained weights"):
        load_backbone("random:llama-1b", quantization=quantization)
    with pytest.raises(ValueError, match=r"not one of \('4bit', '8bit'\)"):
        load_backbone("smollm2", quantization="2bit")
    monkeypatch.setattr(backbones, "_bnb_version", lambda: None)
    with pytest.raises(ModuleNotFoundError, match=r"needs the package 'bitsandbytes': pip install 'scalabl_pyro\[quant\]'"):
        load_backbone("smollm2", quantization=quantization, device="cpu")
    monkeypatch.setattr(backbones, "_bnb_version", lambda: (0, 45, 1))
    with pytest.raises(ValueError, match=r"on the CPU needs bitsandbytes >= 0.49 \(installed: 0.45.1\)"):
        load_backbone("smollm2", quantization=quantization, device="cpu")


def _bnb_on_cpu() -> bool:
    from scalabl_pyro.backbones import BNB_CPU_VERSION, _bnb_version

    found = _bnb_version()
    return found is not None and found >= BNB_CPU_VERSION


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (quantization needs pretrained weights on disk)."""
    from scalabl_pyro.backbones import tiny_llama

    path = tmp_path_factory.mktemp("tiny_pretrained")
    lm, tok = tiny_llama(hidden_size=64)
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.skipif(not _bnb_on_cpu(), reason="needs bitsandbytes >= 0.49 (pip install 'scalabl_pyro[quant]')")
@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantized_backbone_trains_and_predicts_on_the_cpu(saved_tiny, quantization, layer):
    """bitsandbytes weights on the CPU, QLoRA-style: the frozen projections are 4/8-bit, the adapters and s stay
    float32, the logits stay near the full-precision model's, fit moves the adapters, Predictive gives
    probabilities."""
    from scalabl_pyro import AdaptedLM, ScalaBL, ScalaBLConfig, TrainConfig, default_guide, fit, predict

    cfg = ScalaBLConfig(r=4, scoring="choice")
    pyro.clear_param_store()
    lm, tok = load_backbone(saved_tiny, quantization=quantization)
    assert type(lm.model.layers[0].self_attn.q_proj).__name__ == layer
    net = AdaptedLM(lm, tok, label_words="ABC", config=cfg)
    assert type(net.subspace.sites["lora.model.layers.0.self_attn.q_proj.s"].layer).__name__ == layer  # peft's bnb LoRA
    # bitsandbytes' CPU repacking for inference (it would cut the gradients after the evaluation below) is off
    assert all(not m.support_avx512bf16_for_cpu for m in lm.modules() if hasattr(m, "support_avx512bf16_for_cpu"))
    assert all(p.dtype == torch.float32 for p in net.trainable_parameters())
    full = AdaptedLM(*load_backbone(saved_tiny), label_words="ABC", config=cfg)
    batch = net.collate(synthetic_examples(6))
    s0 = {k: v[None] for k, v in net.subspace.s0.items()}
    with torch.no_grad():
        q, f = net.logits(batch, s=s0)[0].float(), full.logits(batch, s=s0)[0].float()
    assert not torch.equal(q, f) and float((q - f).abs().max()) < 0.1 * float(f.abs().max())
    model = ScalaBL(net, num_data=8)
    guide = default_guide(model)
    before = [p.detach().clone() for p in net.trainable_parameters()]
    res = fit(model, guide, synthetic_examples(8), config=TrainConfig(steps=2, batch_size=4, lr=1e-2), progress=False,
              warn_unconverged=False)
    assert all(math.isfinite(x) for x in res.losses)
    # every adapter trains, the decoder layers' too, although the model was evaluated (no_grad) before fit
    assert all(not torch.equal(a, b) for a, b in zip(before, net.trainable_parameters()))
    probs = predict(model, guide, synthetic_examples(3), num_samples=2).sample_probs
    assert probs.shape == (2, 3, 3) and torch.allclose(probs.sum(-1), torch.ones(2, 3))
