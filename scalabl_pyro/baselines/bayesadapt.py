"""The official ScalaBL code's training recipe (BayesAdapt's VI trainer), for comparison with the ELBO: the
``scalabl_bayesadapt`` method of the benchmark.

Example::

    losses = fit_bayesadapt_recipe(model, default_guide(model), train.examples, config=TrainConfig(steps=200))
"""
from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from pyro import poutine

from ..config import TrainConfig
from ..model import ScalaBL

__all__ = ["fit_bayesadapt_recipe"]


def fit_bayesadapt_recipe(model: ScalaBL, guide, examples: Sequence, *, config: TrainConfig,
                          kl_lr: float = 0.2, gamma: float = 8.0, progress: bool = True) -> list[float]:
    """Train like the official ScalaBL code (BayesAdapt's VI trainer), for comparison with the ELBO.

    Per step: AdamW (``config.lr``, linear warmup/decay) on the mean NLL of a minibatch under one sample
    ``s ~ q``; then SGD (``kl_lr``) on ``sum KL(p || q)`` scaled by BLoB's schedule
    ``lin(step) * 2**i / (2**(M+1) - 1)``, ``i = step % M + 1``, ``M = int(100 * N**(pi/gamma) / batch_size)``.
    Note the direction: KL(prior || posterior), not the ELBO's KL(q || p).
    """
    import math

    from torch.distributions import kl_divergence

    n = len(examples)
    gen = torch.Generator().manual_seed(config.seed)
    first = model.net.collate([examples[0]])
    guide(first, first["labels"])  # create the guide's parameters
    params = list(model.net.trainable_parameters()) + list(guide.parameters())
    nll_opt = torch.optim.AdamW(params, lr=config.lr, eps=1e-6, weight_decay=0.0)
    kl_opt = torch.optim.SGD(params, lr=kl_lr)
    warm = int(config.steps * config.warmup)
    M = max(1, int(100 * n ** (math.pi / gamma) / config.batch_size))

    def lin(step):
        if step < warm:
            return step / max(1, warm)
        return max(0.0, (config.steps - step) / max(1, config.steps - warm))

    losses = []
    it = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="fit ScalaBL (BayesAdapt recipe)")
    for step in it:
        idx = torch.randint(0, n, (config.batch_size,), generator=gen).tolist()
        batch = model.net.collate([examples[i] for i in idx])
        for g in nll_opt.param_groups:
            g["lr"] = config.lr * lin(step + 1)
        gtr = poutine.trace(guide).get_trace(batch, batch["labels"])
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(batch, batch["labels"])
        nll = -mtr.nodes["obs"]["fn"].log_prob(mtr.nodes["obs"]["value"]).mean()
        nll_opt.zero_grad()
        nll.backward()
        nll_opt.step()
        kl = 0.0
        for site in model.latent_sites:
            loc, scale = guide._get_loc_and_scale(site)
            p = model.site_prior(site)
            kl = kl + kl_divergence(p, dist.Normal(loc, scale).to_event(1)).sum()
        pi = 2 ** (step % M + 1) / (2 ** (M + 1) - 1)
        for g in kl_opt.param_groups:
            g["lr"] = kl_lr * lin(step) * pi
        kl_opt.zero_grad()
        kl.backward()
        kl_opt.step()
        losses.append(nll.item() + kl.item() / n)
    return losses
