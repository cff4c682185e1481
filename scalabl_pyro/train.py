"""Training: an optimizer and ELBO for Pyro's SVI, and :func:`fit`, a thin loop around ``SVI.step``.

Everything here is optional: ``SVI(model, guide, optim, Trace_ELBO())`` and a plain torch loop over
``Trace_ELBO().differentiable_loss(model, guide, batch, labels)`` train the same model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from .config import TrainConfig

__all__ = ["make_optimizer", "make_elbo", "lr_lambda", "fit", "FitResult", "empty_guide"]


def empty_guide(*args, **kwargs):
    """Guide of a model without latent sites: SVI with it is maximum likelihood (or MAP with weight decay)."""
    return None


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup over ``warmup * steps``, then ``schedule``."""
    warm = max(1, int(round(config.warmup * config.steps))) if config.warmup > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, config.steps - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if config.schedule == "cosine" else 1.0 - t

    return f


def make_optimizer(config: TrainConfig, *, model_prefix: str = "scalabl"):
    """A :class:`pyro.optim.LambdaLR` over AdamW with separate learning rates and per-tensor clipping.

    Parameters whose param-store name starts with ``model_prefix + "$$$"`` (the LoRA projections
    registered by ``pyro.module``) use ``lr`` and ``weight_decay``; every other parameter (guide,
    learned prior scales) uses ``guide_lr`` without decay. Call ``optim.step()`` once per SVI step
    to advance the schedule.

    Example::

        optim = make_optimizer(TrainConfig(lr=1e-3, guide_lr=1e-2), model_prefix=model.name)
        svi = SVI(model, guide, optim, make_elbo(TrainConfig()))
    """
    # pyro.module registers "<prefix>$$$<name>"; the optimizer callable sees it normalized to "<prefix>.<name>".
    prefixes = (model_prefix + "$$$", model_prefix + ".")

    def per_param(name: str) -> dict:
        # fused=True: one kernel per update instead of ~12 (Pyro builds one optimizer per tensor; on a GPU
        # the launches of hundreds of small updates otherwise cost more than the adapters' compute).
        if name.startswith(prefixes):
            return {"lr": config.lr, "weight_decay": config.weight_decay, "fused": True}
        return {"lr": config.guide_lr, "weight_decay": 0.0, "fused": True}

    clip = {"clip_norm": config.clip_norm} if config.clip_norm > 0 else None
    return pyro.optim.LambdaLR(
        {"optimizer": torch.optim.AdamW, "optim_args": per_param, "lr_lambda": lr_lambda(config)}, clip_args=clip
    )


def make_elbo(config: TrainConfig):
    """``Trace_ELBO`` or ``TraceMeanField_ELBO`` with ``num_particles`` (vectorized: one batched forward).

    ``max_plate_nesting=1`` is passed so that the ELBO does not run the model once to guess it.
    """
    cls = TraceMeanField_ELBO if config.elbo == "meanfield" else Trace_ELBO
    return cls(num_particles=config.num_particles,
               vectorize_particles=config.vectorize_particles and config.num_particles > 1, max_plate_nesting=1)


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)  # per-step loss (negative ELBO estimate, per example)
    seconds: float = 0.0
    steps: int = 0


def fit(model, guide, examples: Sequence, *, config: TrainConfig = TrainConfig(), progress: bool = True,
        callback: Callable[[int, float], None] | None = None) -> FitResult:
    """Train ``model``/``guide`` on ``examples`` with ``SVI`` for ``config.steps`` minibatch steps.

    :param guide: an autoguide (ScalaBL), or ``None`` for a model without latent sites (MLE/MAP).
    :param callback: called as ``callback(step, loss)`` after every step.
    :returns: :class:`FitResult` with the per-step losses divided by the data set size.

    Example::

        res = fit(model, guide, train.examples, config=TrainConfig(steps=100))
    """
    n = len(examples)
    if n == 0:
        raise ValueError("fit() got no training examples")
    guide_fn = guide if guide is not None else empty_guide
    anneal = max(1, int(config.kl_anneal * config.steps)) if config.kl_anneal > 0 else 0

    def scaled_guide(*args, **kwargs):
        w = getattr(model, "kl_weight", 1.0)
        if w == 1.0:
            return guide_fn(*args, **kwargs)
        with poutine.scale(scale=w):
            return guide_fn(*args, **kwargs)

    optim = make_optimizer(config, model_prefix=model.name)
    svi = SVI(model, scaled_guide, optim, make_elbo(config))
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    result = FitResult()
    bar = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"fit {type(model).__name__}", dynamic_ncols=True)
    t0 = time.perf_counter()
    running = None
    try:
        with pyro.validation_enabled(config.validate):
            for step in bar:
                if pos + config.batch_size > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + config.batch_size].tolist()
                pos += config.batch_size
                batch = model.net.collate([examples[i] for i in idx])
                if hasattr(model, "kl_weight"):
                    model.kl_weight = config.kl_weight * (min(1.0, (step + 1) / anneal) if anneal else 1.0)
                loss = svi.step(batch, batch["labels"], num_data=n) / n
                optim.step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the ELBO became {loss} at step {step}; "
                                             "lower lr/guide_lr or raise clip_norm")
                result.losses.append(loss)
                running = loss if running is None else 0.9 * running + 0.1 * loss
                if progress:
                    bar.set_postfix(loss=f"{running:.4f}")
                if callback is not None:
                    callback(step, loss)
    finally:
        if hasattr(model, "kl_weight"):
            model.kl_weight = 1.0
    result.seconds = time.perf_counter() - t0
    result.steps = config.steps
    return result
