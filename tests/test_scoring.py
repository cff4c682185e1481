"""AdaptedLM: collation and class logits in the letter and choice formats, checked against plain HF forwards."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import (Example, direct_choice_scores, direct_letter_logits, make_example, random_s,
                      randomize_lora, s0_particles, synthetic_examples)
from scalabl_pyro.scoring import AdaptedLM
from scalabl_pyro.backbones import tiny_llama
from scalabl_pyro.config import ScalaBLConfig


def _set_config(net, **changes):
    net.config = dataclasses.replace(net.config, **changes)


def _one_particle(s, p):
    return {k: v[p:p + 1] for k, v in s.items()}


# ------------------------------------------------------------------------------------------ collate
def test_collate_letter_shapes(make_net):
    net = make_net("letter")
    exs = synthetic_examples(5)
    batch = net.collate(exs)
    L = max(len(net.tokenizer(ex.prompt)["input_ids"]) for ex in exs)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (5, L)
    assert batch["labels"].tolist() == [ex.label for ex in exs]
    assert batch["choice_mask"].all()
    # left padding: every row ends with the prompt's last token
    last = net.tokenizer(":", add_special_tokens=False)["input_ids"][0]
    assert (batch["input_ids"][:, -1] == last).all()
    assert (batch["attention_mask"][:, -1] == 1).all()


def test_collate_choice_lengths(make_net):
    net = make_net("choice")
    exs = synthetic_examples(4)
    batch = net.collate(exs)
    lens = batch["cont_mask"].sum(-1)
    for i, ex in enumerate(exs):
        assert lens[i].tolist() == [len(c) - 1 for c in ex.continuations]  # " word" -> " w", "o", "r", "d"
        assert batch["cont_chars"][i].tolist() == [float(len(c)) for c in ex.continuations]
    assert sorted(set(lens.flatten().tolist())) == [2, 3, 4, 5, 6]  # choices of different token lengths
    assert batch["cont_ids"].shape == (4, 3, 6)


def test_collate_cont_index_lists_the_real_tokens(make_net):
    batch = make_net("choice").collate(synthetic_examples(4))
    assert batch["cont_index"].tolist() == batch["cont_mask"].reshape(-1).nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_cont_index_path_equals_mask_path(make_net, prefix_cache):
    """Selecting tokens by collate's index (no host read) gives the mask path's logits and gradients, bit for bit."""
    net = make_net("choice", prefix_cache=prefix_cache)
    randomize_lora(net)
    batch = net.collate(synthetic_examples(4))
    outs = []
    for b in (batch, {k: v for k, v in batch.items() if k != "cont_index"}):
        s = {k: v.clone().requires_grad_() for k, v in random_s(net, 3).items()}
        logits = net.logits(b, s=s)
        logits.logsumexp(-1).sum().backward()
        outs.append((logits.detach(), [v.grad for v in s.values()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_letter_truncates_from_the_left(make_net):
    net = make_net("letter", max_length=16)
    batch = net.collate(synthetic_examples(2))
    assert batch["input_ids"].shape == (2, 16)
    tail = net.tokenizer.decode(batch["input_ids"][0, -7:])
    assert tail == "Answer:"


# ------------------------------------------------------------------------------------ letter format
def test_letter_alone_equals_in_padded_batch(make_net):
    net = make_net("letter")
    randomize_lora(net)
    s = random_s(net, 2)
    short = make_example(0, 1, ("a", "b", "c"), question="Hi?")
    others = synthetic_examples(3)
    alone = net.logits(net.collate([short]), s=s)
    mixed = net.logits(net.collate([others[0], short, others[2]]), s=s)
    assert alone.shape == (2, 1, 3) and mixed.shape == (2, 3, 3)
    torch.testing.assert_close(mixed[:, 1], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_letter_logits_equal_direct_forward(make_net):
    net = make_net("letter")
    randomize_lora(net)
    s = random_s(net, 2)
    exs = synthetic_examples(4)
    got = net.logits(net.collate(exs), s=s)
    for p in range(2):
        with torch.no_grad(), net.subspace.use(_one_particle(s, p)):
            for i, ex in enumerate(exs):
                want = direct_letter_logits(net.peft_model, net.tokenizer, ex, net.label_token_ids)
                torch.testing.assert_close(got[p, i], want, atol=1e-4, rtol=1e-4)


def test_letter_head_is_cut_to_label_rows(make_net):
    base, tok = tiny_llama()
    net = make_net("letter")
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("A", "B", "C")]
    assert net.label_token_ids == ids
    assert net.head.base_layer.weight.shape == (3, 32)
    torch.testing.assert_close(net.head.base_layer.weight, base.lm_head.weight[ids])


# ------------------------------------------------------------------------------------ choice format
@pytest.mark.parametrize("normalize", ["none", "tokens", "chars"])
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cache", "nocache"])
def test_choice_scores_equal_direct_forward(make_net, normalize, prefix_cache):
    net = make_net("choice", normalize=normalize, prefix_cache=prefix_cache)
    randomize_lora(net)
    s = random_s(net, 2)
    exs = synthetic_examples(5)
    got = net.logits(net.collate(exs), s=s)
    assert got.shape == (2, 5, 3)
    for p in range(2):
        with torch.no_grad(), net.subspace.use(_one_particle(s, p)):
            for i, ex in enumerate(exs):
                want = direct_choice_scores(net.peft_model, net.tokenizer, ex, normalize=normalize)
                torch.testing.assert_close(got[p, i], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("normalize", ["none", "tokens", "chars"])
def test_prefix_cache_equals_naive(make_net, normalize):
    net = make_net("choice", normalize=normalize)
    randomize_lora(net)
    s = random_s(net, 3)
    batch = net.collate(synthetic_examples(6) + [make_example(99, 0, ("a", "bb", "ccc"), question="?")])
    cached = net.logits(batch, s=s, prefix_cache=True)
    naive = net.logits(batch, s=s, prefix_cache=False)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


def test_normalization_arithmetic(make_net):
    net = make_net("choice")
    randomize_lora(net)
    s = random_s(net, 2)
    exs = synthetic_examples(4)
    batch = net.collate(exs)
    raw = net.logits(batch, s=s)
    n_tok = torch.tensor([[len(net.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ex.continuations]
                          for ex in exs], dtype=torch.float)
    n_chr = torch.tensor([[len(c) for c in ex.continuations] for ex in exs], dtype=torch.float)
    assert not torch.equal(n_tok, n_chr)  # the two normalizations really differ here
    _set_config(net, normalize="tokens")
    torch.testing.assert_close(net.logits(batch, s=s), raw / n_tok, atol=1e-5, rtol=1e-5)
    _set_config(net, normalize="chars")
    torch.testing.assert_close(net.logits(batch, s=s), raw / n_chr, atol=1e-5, rtol=1e-5)


def test_choice_scores_are_log_probabilities(make_net):
    net = make_net("choice")
    logits = net.logits(net.collate(synthetic_examples(3)), s=s0_particles(net))
    assert torch.isfinite(logits).all() and (logits < 0).all()


def test_empty_context_uses_bos(make_net):
    net = make_net("choice")
    randomize_lora(net)
    ex = Example(id="blank", label=0, choices=("x", "yz"), prompt="Answer:", context="",
                 continuations=("x y", "yz w"))
    batch = net.collate([ex])
    assert batch["ctx_ids"][0, -1] == net.tokenizer.bos_token_id
    s = s0_particles(net)
    got = net.logits(batch, s=s)[0, 0, :2]
    with torch.no_grad(), net.subspace.use(s):
        torch.testing.assert_close(got, direct_choice_scores(net.peft_model, net.tokenizer, ex), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ absent choices
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_absent_choices_get_minus_inf(make_net, scoring):
    net = make_net(scoring)
    randomize_lora(net)
    two = make_example(7, 1, ("yes", "no"))
    three = synthetic_examples(2)
    batch = net.collate([three[0], two, three[1]])
    assert batch["choice_mask"].tolist() == [[True] * 3, [True, True, False], [True] * 3]
    s = random_s(net, 2)
    logits = net.logits(batch, s=s)
    assert torch.isneginf(logits[:, 1, 2]).all()
    assert torch.isfinite(logits[:, [0, 2]]).all() and torch.isfinite(logits[:, 1, :2]).all()
    probs = logits.softmax(-1)
    assert (probs[:, 1, 2] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    # the present choices score exactly as in a batch without the padding choice
    if scoring == "choice":
        alone = net.logits(net.collate([two]), s=s)
        torch.testing.assert_close(logits[:, 1, :2], alone[:, 0, :2], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------ particles and chunking
@pytest.mark.parametrize("scoring, prefix_cache", [("letter", True), ("choice", True), ("choice", False)],
                         ids=["letter", "choice-cache", "choice-nocache"])
def test_particles_in_one_call_equal_separate_calls(make_net, scoring, prefix_cache):
    net = make_net(scoring, prefix_cache=prefix_cache)
    randomize_lora(net)
    P = 3
    s = random_s(net, P)
    batch = net.collate(synthetic_examples(4))
    calls = net.forward_calls
    joint = net.logits(batch, s=s)
    assert net.forward_calls - calls == (1 if scoring == "letter" or not prefix_cache else 2)
    assert joint.shape == (P, 4, 3)
    for p in range(P):
        torch.testing.assert_close(joint[p], net.logits(batch, s=_one_particle(s, p))[0], atol=1e-5, rtol=1e-5)
    # particles really differ, so a mix-up would show
    assert not torch.allclose(joint[0], joint[1], atol=1e-3)


@pytest.mark.parametrize("scoring, budget, calls", [
    ("letter", 64, 1), ("letter", 1, 12), ("letter", 8, 2), ("letter", 2, 6),
    ("choice", 64, 2), ("choice", 1, 24), ("choice", 24, 4), ("choice", 6, 12),
])
def test_chunking_gives_identical_logits(make_net, scoring, budget, calls):
    """P=3 particles x B=4 questions; letter: 1 row per question, choice: 3 rows and 2 decoder calls (cache)."""
    net = make_net(scoring)
    randomize_lora(net)
    s = random_s(net, 3)
    batch = net.collate(synthetic_examples(4))
    ref = net.logits(batch, s=s)
    _set_config(net, max_forward_batch=budget)
    before = net.forward_calls
    got = net.logits(batch, s=s)
    assert net.forward_calls - before == calls
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_plain_lora_net_logits(make_net):
    net = make_net("choice", subspace=False)
    assert net.subspace is None
    base, tok = tiny_llama()
    exs = synthetic_examples(3)
    logits = net.logits(net.collate(exs))
    assert logits.shape == (1, 3, 3)
    for i, ex in enumerate(exs):  # B = 0 at init: the base model's scores
        torch.testing.assert_close(logits[0, i], direct_choice_scores(base, tok, ex), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ errors
def test_continuation_tokenizing_to_nothing(make_net):
    net = make_net("choice")
    bad = Example(id="empty-cont", label=0, choices=("x", "y"), prompt="Answer:", context="Q:",
                  continuations=("", " y"))
    with pytest.raises(ValueError, match="'empty-cont'.*tokenizes to nothing"):
        net.collate([bad])


@pytest.mark.parametrize("scoring", ["letter", "choice"])
@pytest.mark.parametrize("label, n", [(3, 3), (2, 2), (-1, 3)])
def test_label_out_of_range(make_net, scoring, label, n):
    net = make_net(scoring)
    ex = dataclasses.replace(make_example(0, 0, ("ox", "cat", "horse")[:n]), id="badlabel", label=label)
    with pytest.raises(ValueError, match=f"'badlabel'.*label {label}"):
        net.collate([ex])


def test_too_many_choices(make_net):
    net = make_net("letter")
    ex = dataclasses.replace(make_example(0, 0, ("a", "b", "c")), id="four", choices=("a", "b", "c", "d"),
                             continuations=(" a", " b", " c", " d"))
    with pytest.raises(ValueError, match="'four' has 4 choices"):
        net.collate([ex])


def test_multi_token_label_word(tiny):
    lm, tok = tiny
    with pytest.raises(ValueError, match="'AB' is 2 tokens"):
        AdaptedLM(lm, tok, label_words=("AB", "C"), config=ScalaBLConfig(r=4))


def test_repeated_label_tokens(tiny):
    lm, tok = tiny
    with pytest.raises(ValueError, match="repeated tokens"):
        AdaptedLM(lm, tok, label_words=("A", "A"), config=ScalaBLConfig(r=4))


def test_single_label_word(tiny):
    lm, tok = tiny
    with pytest.raises(ValueError, match="at least 2 classes"):
        AdaptedLM(lm, tok, label_words=("A",), config=ScalaBLConfig(r=4))


@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_empty_batch(make_net, scoring):
    with pytest.raises(ValueError, match="empty batch"):
        make_net(scoring).collate([])


def test_scalabl_net_needs_s(make_net):
    net = make_net("letter")
    with pytest.raises(ValueError, match="needs s values"):
        net.logits(net.collate(synthetic_examples(1)))


def test_trainable_parameters_are_the_adapters(make_net):
    net = make_net("letter")
    params = net.trainable_parameters()
    assert len(params) == 10  # V and B for q/v in 2 layers + lm_head
    ids = {id(p) for p in params}
    assert ids == {id(p) for p in net.adapters().parameters()}
    assert sorted(net.adapters()["lm_head"].keys()) == ["B", "V"]
    plain = make_net("letter", subspace=False)
    assert sorted(plain.adapters()["lm_head"].keys()) == ["A", "B"]


# ------------------------------------------------------------------------ transformers API in use
@pytest.mark.parametrize("scoring, prefix_cache", [("letter", True), ("choice", True), ("choice", False)],
                         ids=["letter", "choice-cache", "choice-nocache"])
def test_forward_uses_current_transformers_api(make_net, scoring, prefix_cache):
    """No deprecation notice at all, even third-party ones: our calls into transformers (the key/value cache
    argument in particular) are those of the installed (locked) version."""
    import warnings

    net = make_net(scoring, prefix_cache=prefix_cache)
    batch = net.collate(synthetic_examples(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net.logits(batch, s=s0_particles(net, 2))
    notices = [f"{w.category.__name__}: {w.message}" for w in caught
               if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert notices == []


# ------------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("scoring", ["letter", "choice"])
def test_gradient_checkpointing_recomputes_with_the_same_s(scoring):
    """ScalaBLConfig(gradient_checkpointing=True): the ELBO's value and gradients are unchanged, and the decoder
    layers really run again in the backward pass (their diag(s) hooks see the forward's s)."""
    import pyro
    from pyro.infer import Trace_ELBO

    from conftest import synthetic_examples
    from scalabl_pyro import ScalaBL, default_guide

    out = {}
    for gc in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        lm, tok = tiny_llama(num_layers=3)
        cfg = ScalaBLConfig(r=4, scoring=scoring, prefix_cache=False, gradient_checkpointing=gc)
        net = AdaptedLM(lm, tok, label_words=("A", "B", "C"), config=cfg)
        calls = []
        net._layers[1].self_attn.v_proj.lora_A["default"].register_forward_hook(lambda *a: calls.append(1))
        model = ScalaBL(net, num_data=8)
        guide = default_guide(model)
        batch = net.collate(synthetic_examples(4))
        guide(batch, batch["labels"])
        params = list(guide.parameters()) + net.trainable_parameters()
        calls.clear()
        pyro.set_rng_seed(1)
        loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, batch, batch["labels"])
        out[gc] = (loss.detach(), torch.autograd.grad(loss, params), len(calls))
    assert out[False][2] == 1 and out[True][2] == 2  # the recomputation ran the layer again
    torch.testing.assert_close(out[True][0], out[False][0])
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_needs_the_prefix_cache_off():
    with pytest.raises(ValueError, match="drops the key/value cache.*prefix_cache=False"):
        ScalaBLConfig(scoring="choice", gradient_checkpointing=True)
    assert ScalaBLConfig.from_dict(ScalaBLConfig(gradient_checkpointing=True).to_dict()).gradient_checkpointing
