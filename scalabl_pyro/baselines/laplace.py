"""A Laplace posterior on ScalaBL's ``s`` around its MAP, with a sampled-label Fisher (one backward per training
example) plus the prior's exact Hessian: the ``laplace`` method of the benchmark.

Example::

    map_guide = AutoLaplaceApproximation(model, init_loc_fn=init_to_s0(model))
    fit(model, map_guide, train.examples, config=cfg)
    guide = laplace_guide(model, map_guide, train.examples)    # an AutoMultivariateNormal
"""
from __future__ import annotations

from typing import Sequence

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoLaplaceApproximation, AutoMultivariateNormal

from ..guides import laplace_posterior
from ..model import ScalaBL

__all__ = ["laplace_guide"]


def laplace_guide(model: ScalaBL, map_guide: AutoLaplaceApproximation, examples: Sequence, *,
                  max_examples: int = 256, seed: int = 0, jitter: float = 1e-6) -> AutoMultivariateNormal:
    """Laplace approximation of the ``s`` posterior around the MAP of ``map_guide``.

    Precision = ``N/n * sum_i g_i g_i^T`` (Fisher with labels sampled from the MAP predictive;
    ``g_i`` the gradient of ``log p(y_i | x_i, s)`` over the ``D`` latent coordinates, on ``n <= max_examples``
    training examples) + the exact Hessian of ``-log prior``. Costs ``n`` backward passes instead of the
    ``D`` that an exact Hessian (``map_guide.laplace_approximation``) needs.

    :returns: an :class:`~pyro.infer.autoguide.AutoMultivariateNormal` holding the Laplace posterior.
    """
    n_all = len(examples)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_all, generator=gen)[:max_examples].tolist()
    loc = map_guide.loc
    D = loc.numel()
    F = torch.zeros(D, D, dtype=torch.float64, device=loc.device)
    for i in idx:
        b = model.net.collate([examples[i]])
        gtr = poutine.trace(map_guide).get_trace(b)
        mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(b)
        logits = mtr.nodes["obs"]["fn"].logits.reshape(-1)
        probs = logits.detach().float().softmax(-1).cpu()
        y = int(torch.multinomial(probs, 1, generator=gen)[0])  # a label from the MAP predictive
        g = torch.autograd.grad(torch.log_softmax(logits, -1)[y], loc)[0].double()
        F += torch.outer(g, g)
    F *= n_all / len(idx)

    def neg_log_prior(z):
        vals = {s["name"]: v for s, v in map_guide._unpack_latent(z)}
        total = 0.0
        for site in model.latent_sites:
            total = total - model.site_prior(site).log_prob(vals[site]).sum()
        return total

    with poutine.block():
        Hp = torch.autograd.functional.hessian(neg_log_prior, loc.detach()).double()
    H = F + Hp + jitter * torch.eye(D, dtype=torch.float64, device=F.device)
    with torch.no_grad():
        cov = torch.linalg.inv(H)
        scale = cov.diagonal().sqrt()
        corr = cov / scale[:, None] / scale[None, :]
        scale_tril = torch.linalg.cholesky(corr)
    return laplace_posterior(model, model.net.collate([examples[idx[0]]]), loc=loc, scale=scale.to(loc.dtype),
                             scale_tril=scale_tril.to(loc.dtype))
