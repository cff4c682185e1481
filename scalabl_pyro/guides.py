"""Guides: Pyro's own autoguides on the ScalaBL model, plus the init strategy that makes them work.

Pyro's default initialization would put ``s`` at the prior median 0, which zeroes the adapter
output so that ``B`` gets no gradient. :func:`init_to_s0` (curried, like Pyro's ``init_to_*``)
starts every ``s`` site at its singular values ``s0`` instead.

:func:`make_guide` builds any of Pyro's autoguides by short name; they need no changes::

    guide = AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=0.05)   # the default
    guide = make_guide("lowrank", model, rank=16)                                # correlated posterior
"""
from __future__ import annotations

import functools

import pyro
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median

from .model import ParamStoreConflictError

__all__ = ["init_to_s0", "default_guide", "make_guide", "name_after_model", "guide_spec", "laplace_posterior",
           "check_fresh_guide", "GUIDES", "AutoIAFNormal"]


class AutoIAFNormal(autoguide.AutoIAFNormal):
    """Pyro's :class:`~pyro.infer.autoguide.AutoIAFNormal` with its flow created on the model's device.

    Pyro builds the autoregressive network on the default device (CPU); here it follows the latent
    sites, so the flow guide trains on a GPU like every other autoguide. Everything else is Pyro's.
    """

    def get_posterior(self, *args, **kwargs):
        if self.transform is None:
            _, site = next(self.prototype_trace.iter_stochastic_nodes())
            self.transform = self._init_transform_fn(self.latent_dim).to(site["value"].device)
            self._prototype_tensor = next(self.transform.parameters(), site["value"])
        return super().get_posterior(*args, **kwargs)


GUIDES = {
    "normal": autoguide.AutoNormal,
    "diagonal": autoguide.AutoDiagonalNormal,
    "lowrank": autoguide.AutoLowRankMultivariateNormal,
    "mvn": autoguide.AutoMultivariateNormal,
    "iaf": AutoIAFNormal,
    "delta": autoguide.AutoDelta,
    "laplace": autoguide.AutoLaplaceApproximation,
}


def init_to_s0(model=None, *, fallback=init_to_median):
    """Initialization strategy: ``s`` sites start at ``model.s0_values()``; other sites use ``fallback``.

    Curried like Pyro's strategies: ``init_to_s0(model)`` returns ``init_loc_fn(site)``.

    Example::

        autoguide.AutoDelta(model, init_loc_fn=init_to_s0(model))
    """
    if model is None:
        return functools.partial(init_to_s0, fallback=fallback)
    values = model.s0_values()

    def init_loc_fn(site):
        if site["name"] in values:  # a copy: autoguides keep the init tensor as their parameter
            return values[site["name"]].detach().clone()
        return fallback(site)

    return init_loc_fn


def name_after_model(guide, model):
    """Name ``guide``'s parameters after its model (``AutoNormal_scalabl.locs...`` instead of Pyro's
    ``AutoNormal.locs...``), so that guides of differently named models never share param-store entries."""
    guide._pyro_name = f"{type(guide).__name__}_{getattr(model, 'name', 'model')}"
    return guide


def default_guide(model, *, init_scale: float = 0.05):
    """The default posterior: :class:`~pyro.infer.autoguide.AutoNormal` at ``s0`` with small scales.

    The official code draws initial scales uniformly in ``[eps/sqrt(2), eps]`` with ``eps = 0.05``;
    AutoNormal takes one ``init_scale`` (default ``eps``).
    """
    return name_after_model(autoguide.AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=init_scale), model)


def make_guide(name: str, model, *, init_scale: float = 0.05, rank: int | None = None,
               hidden_dim: int | list[int] | None = None, num_transforms: int = 1):
    """Build one of Pyro's autoguides by short name (see :data:`GUIDES`), initialized at ``s0``.

    Its parameters are named after the model (``AutoNormal_<model.name>.locs...``): guides of two models with
    different names never share param-store entries, as Pyro's bare autoguides of one class do.

    :param name: ``normal`` (default), ``diagonal``, ``lowrank``, ``mvn``, ``iaf``, ``delta`` (MAP), ``laplace``.
    :param rank: rank of the ``lowrank`` covariance (default: Pyro's ``sqrt(D)``).
    :param hidden_dim: width of the ``iaf`` autoregressive network (default ``2 * D``, capped at 1024), or a
        list of widths (one hidden layer each).
    :param num_transforms: number of ``iaf`` flow layers.

    Example::

        guide = make_guide("mvn", model)
    """
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}")
    init = init_to_s0(model) if hasattr(model, "s0_values") else init_to_median
    if name in ("normal", "diagonal", "mvn"):
        guide = GUIDES[name](model, init_loc_fn=init, init_scale=init_scale)
    elif name == "lowrank":
        kw = {"rank": rank} if rank else {}
        guide = GUIDES[name](model, init_loc_fn=init, init_scale=init_scale, **kw)
    elif name == "iaf":
        dim = getattr(model, "latent_dim", 64)
        # The flow starts from its own base Normal(0, 1); Pyro ignores init_loc_fn for it.
        hidden = list(hidden_dim) if isinstance(hidden_dim, (list, tuple)) else [hidden_dim or min(2 * dim, 1024)]
        guide = GUIDES[name](model, hidden_dim=hidden, num_transforms=num_transforms)
    else:
        guide = GUIDES[name](model, init_loc_fn=init)
    return name_after_model(guide, model)


def guide_spec(guide) -> dict | None:
    """``{"kind": ..., "options": {...}}``: what :func:`make_guide` needs to rebuild ``guide`` (``None`` for no guide).

    Recorded by :func:`~scalabl_pyro.io.save_run`. ``kind`` is a key of :data:`GUIDES`, or ``"laplace_posterior"``
    for :func:`laplace_posterior`'s fixed Gaussian.

    :raises ValueError: for a guide class this package cannot rebuild.
    """
    if guide is None:
        return None
    if isinstance(guide, autoguide.AutoMultivariateNormal) and "scale_tril" in guide._buffers:
        return {"kind": "laplace_posterior", "options": {}}
    kind = next((k for k, cls in GUIDES.items() if type(guide) is cls), None)
    if kind is None:
        raise ValueError(f"cannot record a {type(guide).__name__} guide: save_run rebuilds the guides of GUIDES "
                         f"({', '.join(sorted(GUIDES))}) and laplace_posterior")
    options = {}
    if kind in ("normal", "diagonal", "mvn", "lowrank"):
        options["init_scale"] = float(guide._init_scale)
    if kind == "lowrank":
        options["rank"] = guide.rank
    if kind == "iaf":  # Pyro keeps them in the flow factory: functools.partial(iterated, n, fn, hidden_dims=...)
        options["num_transforms"] = int(guide._init_transform_fn.args[0])
        options["hidden_dim"] = list(guide._init_transform_fn.keywords["hidden_dims"])
    return {"kind": kind, "options": options}


def laplace_posterior(model, batch, *, loc=None, scale=None, scale_tril=None):
    """A fixed Gaussian posterior ``N(loc, diag(scale) scale_tril scale_tril^T diag(scale))`` over all latent
    coordinates, as an :class:`~pyro.infer.autoguide.AutoMultivariateNormal` whose moments are buffers (not
    trained). :func:`~scalabl_pyro.baselines.laplace.laplace_guide` fills it; without moments it is zeros / identity
    (for :func:`~scalabl_pyro.io.load_run` to load into).

    :param batch: any collated batch (sets up the guide's prototype).
    """
    guide = name_after_model(autoguide.AutoMultivariateNormal(model), model)
    guide._setup_prototype(batch, batch["labels"])
    D = guide.loc.numel()
    ref = guide.loc.detach()
    del guide.loc, guide.scale, guide.scale_tril
    guide.register_buffer("loc", ref.new_zeros(D) if loc is None else loc.detach().clone().to(ref))
    guide.register_buffer("scale", ref.new_ones(D) if scale is None else scale.detach().to(ref))
    guide.register_buffer("scale_tril", torch.eye(D, dtype=ref.dtype, device=ref.device) if scale_tril is None
                          else scale_tril.detach().to(ref))
    return guide


def check_fresh_guide(guide) -> None:
    """Refuse a guide that has not run yet while Pyro's param store holds parameters under its name.

    An autoguide's parameters live in the global store under ``<GuideClass>.<...>``; a new guide of the same
    class would silently adopt (and share) another guide's trained values. :func:`~scalabl_pyro.train.fit`
    and :func:`~scalabl_pyro.io.load_run` call this before a guide's first use.

    :raises ~scalabl_pyro.model.ParamStoreConflictError: naming a stale parameter and the fix.
    """
    name = getattr(guide, "_pyro_name", None)
    if name is None or getattr(guide, "prototype_trace", True) is not None:
        return  # not a PyroModule autoguide, or one that has run (and owns what the store holds)
    stale = [k for k in pyro.get_param_store().keys() if k.startswith(name + ".")]
    if stale:
        raise ParamStoreConflictError(
            f"Pyro's param store already holds {len(stale)} parameters of another {name} (e.g. {stale[0]!r}): this "
            f"new guide would start from them and share them. Call pyro.clear_param_store() before building a "
            f"new model and guide (a notebook cell run twice), or resume a run with fit(checkpoint_dir=...).")
