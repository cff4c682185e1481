"""LoRA injection and the ScalaBL subspace re-parameterization A = diag(s) V."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import (direct_choice_scores, direct_letter_logits, random_s, randomize_lora,
                      synthetic_examples)
from scalabl_pyro.backbones import tiny_llama
from scalabl_pyro.config import ScalaBLConfig
from scalabl_pyro.layers import Subspace, add_lora, lora_layers
from scalabl_pyro.scoring import AdaptedLM

SITE = "lora.model.layers.0.self_attn.q_proj.s"


def test_misspelt_target_module_is_refused(tiny):
    lm, _ = tiny
    with pytest.raises(ValueError, match=r"no module named 'v_prj' among target_modules=\['q_proj', 'v_prj'\]"
                                         r".*'v_proj'"):
        add_lora(lm, ScalaBLConfig(r=4, target_modules=("q_proj", "v_prj")))


def test_add_lora_without_targets_lists_linear_layers(tiny):
    lm, _ = tiny
    with pytest.raises(ValueError) as info:
        add_lora(lm, ScalaBLConfig(r=4, target_modules=("foo_proj", "bar")))
    msg = str(info.value)
    assert "foo_proj" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert f"'{name}'" in msg, msg


def test_add_lora_targets_and_frozen_backbone(tiny):
    lm, _ = tiny
    pm = add_lora(lm, ScalaBLConfig(r=4))
    names = sorted(lora_layers(pm))
    assert names == sorted(["lm_head"] + [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                          for p in ("q_proj", "v_proj")])
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # peft initializes B = 0
    for layer in lora_layers(pm).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_add_lora_seeded():
    a = lora_layers(add_lora(tiny_llama()[0], ScalaBLConfig(r=4), seed=3))
    b = lora_layers(add_lora(tiny_llama()[0], ScalaBLConfig(r=4), seed=3))
    c = lora_layers(add_lora(tiny_llama()[0], ScalaBLConfig(r=4), seed=4))
    for name in a:
        wa, wb, wc = (x[name].lora_A["default"].weight for x in (a, b, c))
        assert torch.equal(wa, wb)
        assert not torch.equal(wa, wc)


def test_subspace_V_orthonormal_and_s0_are_singular_values():
    cfg = ScalaBLConfig(r=4)
    reference = {name: layer.lora_A["default"].weight.detach().clone()
                 for name, layer in lora_layers(add_lora(tiny_llama()[0], cfg, seed=0)).items()}
    sub = Subspace(add_lora(tiny_llama()[0], cfg, seed=0))
    assert set(sub.sites) == {f"lora.{n}.s" for n in reference}
    for site, info in sub.sites.items():
        A = reference[info.module_name]
        V = info.lora_A.weight.detach()
        assert V.shape == A.shape == (4, A.shape[1])
        torch.testing.assert_close(V @ V.T, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(info.s0, torch.linalg.svdvals(A), atol=1e-6, rtol=1e-6)
        assert info.s0.shape == (4,) and bool((info.s0[:-1] >= info.s0[1:]).all())
        # V spans the row space of the original A: projecting A onto it changes nothing
        torch.testing.assert_close(A @ V.T @ V, A, atol=1e-5, rtol=0)
        assert info.r == 4 and info.site == site and site == "lora." + info.module_name + ".s"


def test_r_larger_than_in_features_raises():
    lm, tok = tiny_llama(hidden_size=8)
    with pytest.raises(ValueError, match="smaller than r"):
        AdaptedLM(lm, tok, label_words=("A", "B"), config=ScalaBLConfig(r=12, target_modules=("q_proj",)))


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_zero_B_equals_base_model(make_net, scoring):
    """With B = 0 (peft init) the adapted model is the backbone itself, whatever s is."""
    net = make_net(scoring)
    base, tok = tiny_llama()  # identical weights (same seed), untouched
    exs = synthetic_examples(4)
    batch = net.collate(exs)
    got = net.logits(batch, s=random_s(net, 3))  # (3, B, C), s far from s0
    assert got.shape == (3, 4, 3)
    for i, ex in enumerate(exs):
        if scoring == "letter":
            want = direct_letter_logits(base, tok, ex, net.label_token_ids)
        else:
            want = direct_choice_scores(base, tok, ex)
        for p in range(3):
            torch.testing.assert_close(got[p, i], want, atol=1e-4, rtol=1e-4)


def _hand_lora(layer, x, s, scaling):
    """base(x) + (B diag(s_p) V x_p) * scaling for each particle block p (particle-major rows)."""
    V = layer.lora_A["default"].weight
    B = layer.lora_B["default"].weight
    P = s.shape[0]
    blocks = x.reshape(P, x.shape[0] // P, *x.shape[1:])
    upd = torch.stack([((blocks[p] @ V.T) * s[p]) @ B.T for p in range(P)]).reshape(*x.shape[:-1], B.shape[0])
    return layer.base_layer(x) + upd * scaling


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("x_shape", [(6, 32), (6, 5, 32)], ids=["2d", "3d"])
def test_adapted_layer_matches_hand_computation(make_net, P, x_shape):
    net = make_net("letter")
    randomize_lora(net, scale=0.5)
    info = net.subspace.sites[SITE]
    layer = info.layer
    scaling = net.config.scaling
    assert scaling == 2.0 and layer.scaling["default"] == scaling
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(x_shape, generator=gen)
    s = torch.randn(P, 4, generator=gen) * 2
    values = {k: v.expand(P, -1) for k, v in net.subspace.s0.items()}
    values[SITE] = s
    with torch.no_grad(), net.subspace.use(values):
        out = layer(x)
    want = _hand_lora(layer, x, s, scaling)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the update really depends on s: a different s changes the output
    values[SITE] = s + 1
    with torch.no_grad(), net.subspace.use(values):
        assert not torch.allclose(layer(x), out, atol=1e-4)
    if P == 3:  # block p uses s[p], not another particle's
        with torch.no_grad(), net.subspace.use({**values, SITE: s[1:2]}):
            one = layer(x.reshape(3, 2, *x.shape[1:])[1])
        torch.testing.assert_close(one, want.reshape(3, 2, *want.shape[1:])[1], atol=1e-5, rtol=1e-5)


def test_one_dim_s_is_accepted(make_net):
    net = make_net("letter")
    randomize_lora(net)
    layer = net.subspace.sites[SITE].layer
    x = torch.randn(2, 32)
    s = torch.rand(4) + 0.5
    values = dict(net.subspace.s0)
    values[SITE] = s
    with torch.no_grad(), net.subspace.use(values):
        torch.testing.assert_close(layer(x), _hand_lora(layer, x, s[None], net.config.scaling))


def test_hook_without_values_raises(make_net):
    net = make_net("letter")
    layer = net.subspace.sites[SITE].layer
    with pytest.raises(RuntimeError, match="s values"):
        layer(torch.randn(2, 32))


def test_rows_not_multiple_of_particles_raises(make_net):
    net = make_net("letter")
    layer = net.subspace.sites[SITE].layer
    with net.subspace.use({k: v.expand(2, -1) for k, v in net.subspace.s0.items()}):
        with pytest.raises(RuntimeError, match="multiple of 2 particles"):
            layer(torch.randn(3, 32))


def test_use_missing_site_raises_and_restores(make_net):
    net = make_net("letter")
    with pytest.raises(KeyError, match="no s value"):
        with net.subspace.use({SITE: torch.ones(1, 4)}):
            pass
    # values do not leak out of the context
    with net.subspace.use(dict(net.subspace.s0)):
        pass
    with pytest.raises(RuntimeError, match="s values"):
        net.subspace.sites[SITE].layer(torch.randn(1, 32))


def test_remove_hooks_gives_plain_lora(make_net):
    net = make_net("letter")
    randomize_lora(net)
    layer = net.subspace.sites[SITE].layer
    x = torch.randn(3, 32)
    net.subspace.remove()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _hand_lora(layer, x, torch.ones(1, 4), net.config.scaling))


def test_tied_lm_head_untied_without_warning():
    lm, tok = tiny_llama(tie_word_embeddings=True)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    emb_before = lm.get_input_embeddings().weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = add_lora(lm, ScalaBLConfig(r=4))
    tie_warnings = [str(w.message) for w in caught if "tie" in str(w.message).lower()]
    assert tie_warnings == []
    assert lm.config.tie_word_embeddings is False
    head = lora_layers(pm)["lm_head"]
    # the head's frozen weight is the (unchanged) embedding matrix; training the adapter leaves embeddings alone
    assert torch.equal(head.base_layer.weight, emb_before)
    with torch.no_grad():
        head.lora_B["default"].weight.normal_()
    sub = Subspace(pm)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(lm.get_input_embeddings()(ids), emb_before[ids])
        with sub.use(sub.s0):
            lm_out = pm(input_ids=ids).logits
        assert lm_out.shape[-1] == len(tok)
