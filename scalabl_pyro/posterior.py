"""Inspecting the posterior over the subspace: which layers are uncertain.

:func:`posterior_scales` draws samples from any guide and reports, per ``s`` site, the posterior
standard deviation (mean over the ``r`` coordinates) next to the prior's; :func:`plot_posterior_scales`
draws them as bars in module order.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from pyro.infer import Predictive

from ._utils import atomic_path

__all__ = ["posterior_scales", "plot_posterior_scales"]


def posterior_scales(model, guide, batch, *, num_samples: int = 200) -> dict[str, dict[str, float]]:
    """Per-site posterior mean |s|, posterior std (mean over coordinates) and prior std.

    Works for any guide (sampled through :class:`~pyro.infer.Predictive`).

    Example::

        scales = posterior_scales(model, guide, batch)
        scales["lora.lm_head.s"]["std"]
    """
    sites = list(model.latent_sites)
    with torch.no_grad():
        samples = Predictive(guide, num_samples=num_samples, return_sites=sites)(batch, batch["labels"])
    out = {}
    for site in sites:  # the vectorized layout's (M, r) site is reported module by module
        rows = model.module_values({site: samples[site]}) if site == getattr(model, "vector_site", None) else {
            site: samples[site]}
        try:
            var = model.site_prior(site).variance
            prior_std = dict(zip(rows, var.sqrt().reshape(len(rows), -1).mean(-1).tolist()))
        except (NotImplementedError, AttributeError):
            prior_std = dict.fromkeys(rows, float("nan"))
        for name, v in rows.items():
            s = v.reshape(num_samples, -1)
            out[name] = {"mean_abs": float(s.mean(0).abs().mean()), "std": float(s.std(0).mean()),
                         "prior_std": prior_std[name]}
    return out


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
