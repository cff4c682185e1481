"""Training: an optimizer and ELBO for Pyro's SVI, and :func:`fit`, a thin loop that takes SVI's steps.

Everything here is optional: ``SVI(model, guide, optim, Trace_ELBO())`` and a plain torch loop over
``Trace_ELBO().differentiable_loss(model, guide, batch, labels)`` train the same model. ``fit`` takes the
step of ``SVI(model, guide, make_optimizer(config), make_elbo(config))`` through one fused optimizer and an
ELBO summed on the device (:mod:`scalabl_pyro.optim`): the same update with far fewer ops and host reads.
``fit(..., checkpoint_dir=...)`` checkpoints and resumes (:mod:`scalabl_pyro.checkpoint`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .convergence import check_convergence, posterior_summary
from .guides import check_fresh_guide
from .optim import (DeviceTrace_ELBO, FusedAdamW, FusedPyroOptim, autonormal_elbo_loss, autonormal_path_applies, elbo_loss,
                    lr_lambda)

__all__ = ["make_optimizer", "make_elbo", "lr_lambda", "fit", "FitResult", "empty_guide"]

logger = logging.getLogger(__name__)


def empty_guide(*args, **kwargs):
    """Guide of a model without latent sites: SVI with it is maximum likelihood (or MAP with weight decay)."""
    return None


def make_optimizer(config: TrainConfig, *, model_prefix: str = "scalabl", fused: bool = False):
    """A :class:`pyro.optim.LambdaLR` over AdamW with separate learning rates and per-tensor clipping.

    Parameters whose param-store name starts with ``model_prefix + "$$$"`` (the LoRA projections
    registered by ``pyro.module``) use ``lr`` and ``weight_decay``; every other parameter (guide,
    learned prior scales) uses ``guide_lr`` without decay. Call ``optim.step()`` once per SVI step
    to advance the schedule.

    :param fused: ``True``: the same update as one fused AdamW and one clipping pass over all tensors
        (:class:`~scalabl_pyro.optim.FusedPyroOptim`, what :func:`fit` uses) instead of Pyro's one optimizer and
        one clipping per tensor (244 of each for SmolLM2's 61 adapted modules).

    Example::

        optim = make_optimizer(TrainConfig(lr=1e-3, guide_lr=1e-2), model_prefix=model.name)
        svi = SVI(model, guide, optim, make_elbo(TrainConfig()))
    """
    if fused:
        return FusedPyroOptim(config, model_prefix=model_prefix, lr_lambda=lr_lambda(config))
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
    """``Trace_ELBO`` (as :class:`~scalabl_pyro.optim.DeviceTrace_ELBO`: the same estimator, summed on the device
    in ``SVI.step``) or ``TraceMeanField_ELBO`` with ``num_particles`` (vectorized: one batched forward).

    ``max_plate_nesting=1`` is passed so that the ELBO does not run the model once to guess it.
    """
    cls = TraceMeanField_ELBO if config.elbo == "meanfield" else DeviceTrace_ELBO
    return cls(num_particles=config.num_particles,
               vectorize_particles=config.vectorize_particles and config.num_particles > 1, max_plate_nesting=1)


@dataclass
class FitResult:
    """What :func:`fit` returns: the loss of every step (from step 0, also after a resume) and timings."""

    losses: list[float] = field(default_factory=list)  # per-step loss (negative ELBO estimate, per example)
    seconds: float = 0.0  # training wall time, summed over the calls of a resumed run
    steps: int = 0
    resumed_from: int | None = None  # the checkpoint step this call resumed from (None: started at step 0)
    monitor_steps: list[int] = field(default_factory=list)  # steps (0-based) after which kl and scale were taken
    kl: list[float] = field(default_factory=list)  # KL(q || p) per training example (the ELBO's KL term), MC
    scale: list[float] = field(default_factory=list)  # median posterior std over all latent coordinates


def _lora_dropout(model) -> list[torch.nn.Module]:
    """The LoRA layers' dropout modules (``lora_dropout > 0``; peft uses Identity otherwise)."""
    from .layers import lora_layers

    net = getattr(model, "net", None)
    if net is None:
        return []
    return [d for layer in lora_layers(net.peft_model).values() for d in layer.lora_dropout.values()
            if isinstance(d, torch.nn.Dropout)]


def _rank_rng(state: dict, dp: bool) -> dict:
    """This process's RNG state from a checkpoint's (one state, or one per rank of a data-parallel run)."""
    if "ranks" not in state:
        if dp:
            raise ckpt.CheckpointMismatchError("the checkpoint comes from a single-process run; resume it with one "
                                               "process (or start the data-parallel run afresh)")
        return state
    states, W = state["ranks"], distributed.world_size()
    if len(states) != W:
        raise ckpt.CheckpointMismatchError(f"the checkpoint comes from a run of {len(states)} processes; resume it "
                                           f"with {len(states)} (now {W}): each process continues its own draws")
    return states[distributed.rank()]


def fit(model, guide, examples: Sequence, *, config: TrainConfig = TrainConfig(), progress: bool = True,
        callback: Callable[[int, float], None] | None = None, checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None, monitor_every: int | None = None,
        warn_unconverged: bool = True) -> FitResult:
    """Train ``model``/``guide`` on ``examples`` for ``config.steps`` minibatch steps of SVI.

    Each step is ``SVI(model, guide, make_optimizer(config), make_elbo(config)).step(batch, labels,
    num_data=N)`` taken through :class:`~scalabl_pyro.optim.FusedAdamW` and :func:`~scalabl_pyro.optim.elbo_loss`,
    or, for the default posterior (:func:`~scalabl_pyro.optim.autonormal_path_applies`), through
    :func:`~scalabl_pyro.optim.autonormal_elbo_loss` (every site's terms at once, the same draws) from the second
    step on (the same parameters after every step, up to float rounding; ``tests/test_optim.py`` checks it).

    Under ``torchrun`` (a ``torch.distributed`` group of several processes, see :mod:`scalabl_pyro.distributed`)
    every process calls ``fit`` alike: each takes its share of every global batch of ``config.batch_size``, draws
    its own ``s``, and the gradients are averaged before the update; only rank 0 shows progress, warns and writes
    checkpoints.

    :param guide: an autoguide (ScalaBL), or ``None`` for a model without latent sites (MLE/MAP).
    :param callback: called as ``callback(step, loss)`` after every step this call runs.
    :param checkpoint_dir: write checkpoints there (see :mod:`scalabl_pyro.checkpoint` for the layout)
        and **resume automatically** when it already holds one: the parameters, optimizer and LR-schedule
        state, RNG states, minibatch order, KL-annealing position and loss history are restored and training
        continues at the saved step, exactly as if it had never stopped (logged at INFO level by
        ``scalabl_pyro.train``; the progress bar starts there). A checkpoint of a finished run loads its
        parameters and returns its history without training. The checkpoint must come from the same run:
        another config (any field but ``validate``), data, model or guide raises
        :class:`~scalabl_pyro.checkpoint.CheckpointMismatchError`. Build ``model`` and ``guide`` afresh
        after ``pyro.clear_param_store()``, as for the first call.
    :param checkpoint_every: steps between checkpoints (a positive integer; default ``max(1, steps // 10)``);
        one is also written after the last step. Each is written after that step's ``callback``; an
        exception (from the callback, or a non-finite ELBO) ends the call with the previous checkpoint in
        place. Needs ``checkpoint_dir``.
    :param monitor_every: with a guide, record the KL term and the median posterior std (:mod:`scalabl_pyro.
        convergence`) after the first step and every ``monitor_every`` steps (default ``max(1, steps // 100)``;
        16 guide draws each, under a forked RNG: the trajectory does not change).
    :param warn_unconverged: at the end, warn (:class:`~scalabl_pyro.convergence.ConvergenceWarning`, naming the
        fix) when the posterior scales ended within 1.5x of their start or the KL term is still moving.
    :returns: :class:`FitResult` with the per-step losses divided by the data set size (from step 0, also
        when resumed), and the monitored ``kl`` / ``scale`` at ``monitor_steps``.

    Example::

        res = fit(model, guide, train.examples, config=TrainConfig(steps=100))
        res = fit(model, guide, train.examples, config=cfg, checkpoint_dir="runs/obqa/ckpt", checkpoint_every=50)
    """
    n = len(examples)
    if n == 0:
        raise ValueError("fit() got no training examples")
    every = ckpt.resolve_every(checkpoint_dir, checkpoint_every, config.steps)
    if monitor_every is not None and (not isinstance(monitor_every, int) or isinstance(monitor_every, bool)
                                      or monitor_every < 1):
        raise ValueError(f"monitor_every={monitor_every!r} must be a positive integer (steps between summaries)")
    monitor = monitor_every or max(1, config.steps // 100)
    watched = guide is not None and bool(getattr(model, "latent_sites", ()))
    if guide is not None:
        check_fresh_guide(guide)
    saved = fp = None
    if checkpoint_dir is not None:
        fp = ckpt.fingerprint(model, guide, examples)
        saved = ckpt.load_checkpoint(checkpoint_dir)
        if saved is not None:
            ckpt.check_compatible(saved, config, fp)
    dp = distributed.active()
    if dp:  # data parallel (scalabl_pyro.distributed): a shard per rank, its own draws of s, averaged gradients
        W, rank = distributed.world_size(), distributed.rank()
        if config.batch_size % W:
            raise ValueError(f"TrainConfig(batch_size={config.batch_size}) does not split over {W} processes: "
                             f"use a multiple of {W} (the global batch; each process takes batch_size / {W})")
        progress, warn_unconverged = progress and rank == 0, warn_unconverged and rank == 0
        pyro.set_rng_seed(config.seed + 1000 * rank)  # each rank its own s draws (restored on resume)
        distributed.broadcast_(model.net.trainable_parameters())  # the same start on every rank
    guide_fn = guide if guide is not None else empty_guide
    anneal = max(1, int(config.kl_anneal * config.steps)) if config.kl_anneal > 0 else 0

    def scaled_guide(*args, **kwargs):
        w = getattr(model, "kl_weight", 1.0)
        if w == 1.0:
            return guide_fn(*args, **kwargs)
        with poutine.scale(scale=w):
            return guide_fn(*args, **kwargs)

    # the very update of SVI(model, guide, make_optimizer(config), make_elbo(config)), as one fused optimizer
    # and an ELBO summed on the device (scalabl_pyro.optim): one host read per step, for the loss
    optim = FusedAdamW(config, model_prefix=model.name)
    elbo = make_elbo(config)
    fast = None  # AutoNormal's sites all at once (optim.autonormal_elbo_loss): decided once the guide has run
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=gen)
    pos = start = 0
    result = FitResult()
    if saved is not None:
        batch = model.net.collate([examples[i] for i in range(min(n, config.batch_size))])
        ckpt.restore_params(saved, model, guide, batch, num_data=n)
        start, result.losses, result.resumed_from = saved.step, saved.losses, saved.step
        hist = saved.history
        result.monitor_steps, result.kl, result.scale = (list(hist.get(k, [])) for k in ("monitor_steps", "kl", "scale"))
        if start >= config.steps:
            logger.info("fit: %s holds a finished run (%d steps): parameters loaded, nothing to train",
                        saved.path, start)
            result.seconds, result.steps = saved.seconds, config.steps
            return result
        optim.set_state(saved.state["optim"])  # Pyro loads each parameter's state when it first sees it
        gen.set_state(saved.state["generator"])
        order, pos = saved.state["order"], saved.pos
        ckpt.set_rng_state(_rank_rng(saved.state["rng"], dp))  # last: building the guide above drew random numbers
        logger.info("fit: resuming from %s at step %d of %d", saved.path, start, config.steps)
    bar = range(start, config.steps)
    if progress:
        from tqdm.auto import tqdm

        desc = f"fit {type(model).__name__}" + (f" (resumed at {start})" if start else "")
        bar = tqdm(bar, desc=desc, dynamic_ncols=True, initial=start, total=config.steps)
    t0 = time.perf_counter()
    seconds0 = saved.seconds if saved is not None else 0.0
    running = None
    for x in result.losses:
        running = x if running is None else 0.9 * running + 0.1 * x
    precision = (torch.autocast(device_type=model.net.device.type, dtype=torch.bfloat16)
                 if config.autocast == "bfloat16" else contextlib.nullcontext())
    dropout = _lora_dropout(model)
    modes = [m.training for m in dropout]
    try:
        for m in dropout:  # LoRA dropout is on while training, off (as AdaptedLM leaves it) for prediction
            m.train()
        with pyro.validation_enabled(config.validate):
            for step in bar:
                if pos + config.batch_size > n:
                    order, pos = torch.randperm(n, generator=gen), 0
                idx = order[pos:pos + config.batch_size].tolist()
                pos += config.batch_size
                if dp:
                    idx = distributed.shard(idx)
                batch = model.net.collate([examples[i] for i in idx])
                if hasattr(model, "kl_weight"):
                    model.kl_weight = config.kl_weight * (min(1.0, (step + 1) / anneal) if anneal else 1.0)
                if fast is None and getattr(guide, "prototype_trace", None) is not None:
                    fast = autonormal_path_applies(elbo, model, guide)
                with poutine.trace(param_only=True) as params, precision:
                    if fast:
                        loss, surrogate = autonormal_elbo_loss(model, guide, batch, batch["labels"], num_data=n,
                                                               guide_scale=getattr(model, "kl_weight", 1.0))
                    else:
                        loss, surrogate = elbo_loss(elbo, model, scaled_guide, batch, batch["labels"], num_data=n)
                if torch.is_tensor(surrogate) and surrogate.requires_grad:
                    surrogate.backward()
                if dp:  # the ranks' mean loss (FusedAdamW averages the gradients)
                    loss = torch.as_tensor(loss, dtype=torch.float32).detach().reshape(1).clone()
                    distributed.all_reduce_mean_([loss])
                optim.step(params.trace)  # clip, update, zero the gradients, advance the schedule
                loss = float(loss) / n
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the ELBO became {loss} at step {step}: check the prior and the data (TrainConfig("
                        "validate=True) makes Pyro name a bad value), or lower lr/guide_lr or raise clip_norm")
                result.losses.append(loss)
                running = loss if running is None else 0.9 * running + 0.1 * loss
                if progress:
                    bar.set_postfix(loss=f"{running:.4f}")
                if watched and (step == 0 or (step + 1) % monitor == 0 or step + 1 == config.steps):
                    kl, scale = posterior_summary(model, guide, batch, num_data=n, seed=config.seed)  # same noise each time
                    result.monitor_steps.append(step)
                    result.kl.append(kl)
                    result.scale.append(scale)
                if callback is not None:
                    callback(step, loss)
                if every is not None and ((step + 1) % every == 0 or step + 1 == config.steps):
                    rng = {"ranks": distributed.gather_objects(ckpt.rng_state())} if dp else None
                    taken = ckpt.snapshot(optim) if distributed.sharded(model) else None  # every rank gathers shards
                    if not dp or rank == 0:  # rank 0 writes, with every rank's RNG state
                        ckpt.save_checkpoint(checkpoint_dir, step=step + 1, config=config, fingerprint=fp, rng=rng,
                                             taken=taken,
                                             losses=result.losses, seconds=seconds0 + time.perf_counter() - t0,
                                             optim=optim, generator=gen, order=order, pos=pos,
                                             kl_weight=getattr(model, "kl_weight", None),
                                             history={"monitor_steps": result.monitor_steps, "kl": result.kl,
                                                      "scale": result.scale})
    finally:
        for m, mode in zip(dropout, modes):
            m.train(mode)
        if hasattr(model, "kl_weight"):
            model.kl_weight = 1.0
    result.seconds = seconds0 + time.perf_counter() - t0
    result.steps = config.steps
    if watched and warn_unconverged:
        tail = result.losses[-max(1, len(result.losses) // 5):]
        check_convergence(result.scale, result.kl, loss=sum(tail) / len(tail))
    return result
