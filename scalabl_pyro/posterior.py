"""Inspecting the posterior over the subspace: which layers are uncertain.

:func:`posterior_scales` draws samples from any guide and reports, per ``s`` site, the posterior
standard deviation and mean ``|s|`` (means over the ``r`` coordinates) next to the prior's; :func:`plot_posterior_scales`
draws them as bars in module order. :func:`adapter_norms` gives the size of each module's learned projections
``B`` and ``V`` beside it: the other half of the ``B``/``s`` scale trade-off.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from pyro.infer import Predictive

from ._utils import atomic_path
from .distributed import full_tensor

__all__ = ["posterior_scales", "adapter_norms", "plot_posterior_scales"]


def posterior_scales(model, guide, batch, *, num_samples: int = 200,
                     seed: int | None = None) -> dict[str, dict[str, float]]:
    """Per-site posterior mean ``|s|`` and std (means over the ``r`` coordinates) beside the prior's.

    Works for any guide (sampled through :class:`~pyro.infer.Predictive`). Each site maps to
    ``{"mean_abs", "std", "prior_mean_abs", "prior_std"}`` (the prior's entries ``nan`` where the prior has no
    closed-form mean or variance). ``std / mean_abs`` is the relative noise a posterior draw puts on the adapter
    ``B diag(s) V``; ``mean_abs`` against ``prior_mean_abs`` shows how far the fit moved ``s`` (the ``B``/``s``
    scale trade-off: a larger ``|s|`` with the same ``std`` is a less random adapter).

    :param batch: any batch the guide accepts (e.g. ``model.net.collate(examples[:2])``); only its shapes matter.
    :param seed: draw with this seed and leave the global random state as it was (default: draw from it).

    Example::

        scales = posterior_scales(model, guide, batch, seed=0)
        scales["lora.lm_head.s"]["std"]
    """
    sites = list(model.latent_sites)
    dev = model.net.device
    with torch.no_grad(), torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else [],
                                                 enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        samples = Predictive(guide, num_samples=num_samples, return_sites=sites)(batch, batch["labels"])
    out = {}
    for site in sites:  # the vectorized layout's (M, r) site is reported module by module
        rows = model.module_values({site: samples[site]}) if site == getattr(model, "vector_site", None) else {
            site: samples[site]}
        prior_mean = _prior_moment(model, site, "mean", len(rows), lambda t: t.abs())
        prior_std = _prior_moment(model, site, "variance", len(rows), lambda t: t.sqrt())
        for k, (name, v) in enumerate(rows.items()):
            s = v.reshape(num_samples, -1)
            out[name] = {"mean_abs": float(s.mean(0).abs().mean()), "std": float(s.std(0).mean()),
                         "prior_mean_abs": prior_mean[k], "prior_std": prior_std[k]}
    return out


def adapter_norms(net) -> dict[str, dict[str, float]]:
    """Per adapted module, the Frobenius norms of its learned projections and of its update at ``s0``.

    ``{site: {"B_norm", "V_norm", "update_norm"}}`` in module order: ``B`` (out, r), ``V`` (r, in) and the
    update ``B diag(s0) V`` (out, in) before peft's ``alpha / r`` scaling, computed from the two r x r Gram
    matrices (``||B D V||^2 = sum_ij (B^T B)_ij s_i s_j (V V^T)_ij``), so ``lm_head``'s vocab x hidden update is
    never formed. Beside :func:`posterior_scales` it tells a module whose posterior stayed at the prior but
    whose ``B`` shrank (its adapter switched off rather than made random) from one that kept a large update.
    BLoB's modules (``A`` latent, no ``V``) give ``V_norm`` and ``update_norm`` as ``nan``.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace=True``.

    Example::

        adapter_norms(model.net)["lora.lm_head.s"]["B_norm"]
    """
    sub = getattr(net, "subspace", None)
    if sub is None:
        raise ValueError("adapter_norms needs an AdaptedLM built with subspace=True (ScalaBL or BLoB)")
    out = {}
    with torch.no_grad():
        for site, v in sub.sites.items():
            B = full_tensor(v.lora_B.weight.detach()).double()
            row = {"B_norm": float(B.norm()), "V_norm": math.nan, "update_norm": math.nan}
            if sub.latent == "s":
                V, s0 = full_tensor(v.lora_A.weight.detach()).double(), v.s0.detach().double().to(B.device)
                gram = (B.T @ B) * (V @ V.T).to(B.device)
                row["V_norm"] = float(V.norm())
                row["update_norm"] = float((s0 @ gram @ s0).clamp_min(0).sqrt())
            out[site] = row
    return out


def _prior_moment(model, site: str, moment: str, rows: int, f) -> list[float]:
    """``f`` of the prior's ``moment`` at ``site``, averaged per module row (``nan`` where it has none)."""
    try:
        m = f(getattr(model.site_prior(site), moment).detach().float().cpu())
        return m.reshape(-1, m.shape[-1] if m.dim() else 1).expand(rows, -1).mean(-1).tolist()
    except (NotImplementedError, AttributeError, RuntimeError):
        return [float("nan")] * rows


def plot_posterior_scales(scales: dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Bar chart of the posterior std per site (module order), with the prior std as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(scales)
    fig = Figure(figsize=(max(6, 0.18 * len(names) + 2), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue" if ".q_proj" in n else "tab:orange" if ".v_proj" in n else "tab:green" for n in names]
    ax.bar(range(len(names)), [scales[n]["std"] for n in names], color=colors)
    ax.plot(range(len(names)), [scales[n]["prior_std"] for n in names], "k--", lw=1, label="prior std")
    ticks = [n.removeprefix("lora.").replace("model.layers.", "L").replace(".self_attn.", ".").replace(".s", "") for n in names]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(ticks, rotation=90, fontsize=6)
    ax.set_ylabel("posterior std of s")
    ax.set_yscale("log")
    ax.set_title(title or "Posterior scale per adapted module (blue q_proj, orange v_proj, green head)")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
