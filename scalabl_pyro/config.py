"""Configuration dataclasses: what to build (:class:`ScalaBLConfig`) and how to train (:class:`TrainConfig`).

Both validate in ``__post_init__`` (errors name the bad value and the allowed ones)
and round-trip through JSON. Callables (priors, guides) stay out of configs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Type, TypeVar

from ._utils import atomic_write_json

__all__ = ["ScalaBLConfig", "TrainConfig", "SCORINGS", "NORMALIZATIONS"]

SCORINGS = ("letter", "choice")
NORMALIZATIONS = ("none", "tokens", "chars")
AUTOCASTS = ("bfloat16",)  # TrainConfig.autocast (or None)
ELBOS = ("trace", "meanfield")
SCHEDULES = ("cosine", "linear", "constant")

T = TypeVar("T", bound="_JsonConfig")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def _check_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *, lo_open=False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value!r} must be <= {hi}")


class _JsonConfig:
    """Mixin: JSON save/load for flat dataclasses, with a clear error on unknown keys."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls: Type[T], d: dict) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; allowed keys: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically)."""
        return atomic_write_json(path, {"type": type(self).__name__, **self.to_dict()})

    @classmethod
    def load(cls: Type[T], path: str | os.PathLike) -> T:
        """Read a config written by :meth:`save`."""
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = d.pop("type", cls.__name__)
        if kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}")
        return cls.from_dict(d)


@dataclass(frozen=True)
class ScalaBLConfig(_JsonConfig):
    """What to build: the LoRA subspace and how a question becomes class logits.

    :param r: LoRA rank; also the dimension of each latent ``s`` site.
    :param lora_alpha: LoRA scaling numerator (``scaling = lora_alpha / r``); ``None`` means ``2 * r``.
    :param target_modules: module-name suffixes to adapt (peft semantics). ``lm_head`` is the output head.
    :param lora_dropout: dropout on the adapter input (0 in the reference protocol).
    :param scoring: ``"letter"`` (reference protocol: logits of the answer-letter tokens after ``Answer:``,
        LM head cut down to those rows) or ``"choice"`` (log-likelihood of each choice's text).
    :param normalize: for ``scoring="choice"``: ``"none"`` (sum of token log-probs), ``"tokens"``
        (mean per token) or ``"chars"`` (sum divided by the choice's character count).
    :param prefix_cache: for ``scoring="choice"``: run the shared context once and reuse its
        key/value cache for every choice (``False``: one full sequence per choice).
    :param prior_scale: scale of the default prior, ``Normal(s0, prior_scale)`` on every ``s`` coordinate.
    :param max_length: longest tokenized prompt; longer ones are cut from the left.
    :param max_forward_batch: most sequences per backbone call; bigger folded batches are chunked (by particles;
        with a shared trunk, :mod:`scalabl_pyro.trunk`, by questions with every particle in each chunk, so the
        bound holds for the layers above the split and the trunk runs once per question).
    :param gradient_checkpointing: recompute each decoder layer's activations in the backward pass instead of
        keeping them (less memory, one more forward of the decoder per step); the ``diag(s)`` hooks see the same
        ``s`` in the recomputation. Transformers drops the key/value cache inside checkpointed layers, so with
        ``scoring="choice"`` it needs ``prefix_cache=False``.

    Example::

        cfg = ScalaBLConfig(r=8, scoring="choice")
        cfg.save("run/config.json"); assert ScalaBLConfig.load("run/config.json") == cfg
    """

    r: int = 8
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "lm_head")
    lora_dropout: float = 0.0
    scoring: str = "letter"
    normalize: str = "none"
    prefix_cache: bool = True
    prior_scale: float = 1.0
    max_length: int = 512
    max_forward_batch: int = 64
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive integer (the LoRA rank, e.g. 8)")
        if self.lora_alpha is not None:
            _check_range("lora_alpha", self.lora_alpha, 0, lo_open=True)
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(
                f"target_modules={self.target_modules!r} must be a non-empty tuple of module names, "
                "e.g. ('q_proj', 'v_proj', 'lm_head')"
            )
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0)
        _check_choice("scoring", self.scoring, SCORINGS)
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        if self.scoring == "letter" and self.normalize != "none":
            raise ValueError(f"normalize={self.normalize!r} only applies to scoring='choice'; use normalize='none'")
        _check_range("prior_scale", self.prior_scale, 0, lo_open=True)
        if self.max_length < 8:
            raise ValueError(f"max_length={self.max_length} is too small; use at least 8 tokens")
        if self.max_forward_batch < 1:
            raise ValueError(f"max_forward_batch={self.max_forward_batch} must be >= 1")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing={self.gradient_checkpointing!r} must be True or False")
        if self.gradient_checkpointing and self.scoring == "choice" and self.prefix_cache:
            raise ValueError("gradient_checkpointing=True drops the key/value cache inside the decoder layers, which "
                             "prefix_cache=True needs: pass prefix_cache=False (or scoring='letter')")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.r)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class TrainConfig(_JsonConfig):
    """How to train: optimizer, schedule, ELBO and minibatching.

    :param steps: optimizer steps. :param batch_size: questions per step.
    :param lr: learning rate of the LoRA projections ``V`` and ``B`` (and of every non-guide param).
    :param guide_lr: learning rate of the variational parameters (guide). The default 0.05 was chosen on
        validation (``bench/README.md``, "epochs.py" and "demo_recipe.py"): at 0.01 AutoNormal's scales move
        from 0.05 to ~0.13 in 200 steps while the ELBO optimum is ~1; at 0.05 they reach it.
    :param weight_decay: decoupled weight decay on the projections (MAP-LoRA baseline uses > 0).
    :param warmup: fraction of ``steps`` with a linear warmup; then ``schedule`` decays to 0
        (``"cosine"``, ``"linear"``) or stays (``"constant"``).
    :param clip_norm: gradient norm clipping (per parameter tensor, as ``pyro.optim`` does); 0 = off.
    :param elbo: ``"trace"`` (:class:`~pyro.infer.Trace_ELBO`) or ``"meanfield"`` (:class:`~pyro.infer.TraceMeanField_ELBO`).
        Pyro's autoguides sample each site through a ``Delta``, so with them no analytic KL applies and both
        estimate the same ELBO; ``"meanfield"`` matters for hand-written guides.
    :param num_particles: ELBO particles; with ``vectorize_particles`` they fold into one batched forward.
    :param kl_weight: final weight of the KL term; :param kl_anneal: fraction of steps to ramp it from 0.
    :param seed: seeds minibatch order, initialization and sampling.
    :param autocast: ``"bfloat16"``: run the forward of every training step under ``torch.autocast`` in bfloat16
        (matrix products in bfloat16, parameters, ``s`` and the ELBO's log-densities in float32); ``None``
        (default): full precision.
    :param validate: keep Pyro's distribution checks (``pyro.enable_validation``) on during :func:`fit`. Off by
        default: on a GPU every check is a device-to-host sync (~990 per step for SmolLM2's 61 sites), and
        the data are checked once by ``collate``. Turn it on to debug a model or a prior.
    """

    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    guide_lr: float = 5e-2
    weight_decay: float = 0.0
    warmup: float = 0.1
    schedule: str = "cosine"
    clip_norm: float = 1.0
    elbo: str = "trace"
    num_particles: int = 1
    vectorize_particles: bool = True
    kl_weight: float = 1.0
    kl_anneal: float = 0.0
    seed: int = 0
    validate: bool = False
    autocast: str | None = None

    @classmethod
    def from_epochs(cls, epochs: float, num_examples: int, **options) -> "TrainConfig":
        """A config whose budget is ``epochs`` passes over ``num_examples`` questions: ``steps =
        ceil(epochs * num_examples / batch_size)`` (at least 1).

        Example::

            TrainConfig.from_epochs(4, len(train), batch_size=8).steps   # 4 epochs of the training set
        """
        if "steps" in options:
            raise ValueError("from_epochs computes steps from epochs; pass one of steps= and epochs, not both")
        _check_range("epochs", epochs, 0, lo_open=True)
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
            raise ValueError(f"num_examples={num_examples!r} must be a positive integer (the training set size)")
        batch = options.get("batch_size", cls.batch_size)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch_size={batch!r} must be a positive integer")
        return cls(steps=max(1, math.ceil(epochs * num_examples / batch - 1e-9)), **options)

    def epochs(self, num_examples: int) -> float:
        """How many passes over ``num_examples`` questions this budget makes (``steps * batch_size / N``)."""
        return self.steps * self.batch_size / num_examples

    def __post_init__(self):
        if not isinstance(self.validate, bool):
            raise ValueError(f"validate={self.validate!r} must be True or False")
        for name in ("steps", "batch_size", "num_particles"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        _check_range("lr", self.lr, 0, lo_open=True)
        _check_range("guide_lr", self.guide_lr, 0, lo_open=True)
        _check_range("weight_decay", self.weight_decay, 0)
        _check_range("warmup", self.warmup, 0, 1)
        _check_range("kl_anneal", self.kl_anneal, 0, 1)
        _check_range("kl_weight", self.kl_weight, 0)
        _check_range("clip_norm", self.clip_norm, 0)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("elbo", self.elbo, ELBOS)
        if self.autocast is not None:
            _check_choice("autocast", self.autocast, AUTOCASTS)
