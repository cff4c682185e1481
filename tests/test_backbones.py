"""Backbones: the offline char tokenizer and tiny Llama, local-path errors, and the embedded SmolLM2."""
from __future__ import annotations

import time

import pytest
import torch

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
