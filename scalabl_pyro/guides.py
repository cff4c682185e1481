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
import operator
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import autoguide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

__all__ = ["init_to_s0", "default_guide", "make_guide", "GUIDES", "AutoDelta", "AutoIAFNormal"]

class AutoDelta(autoguide.AutoDelta):
    """Pyro's :class:`~pyro.infer.autoguide.AutoDelta` (MAP) with its point estimates kept under ``locs``.

    Pyro 1.9's AutoDelta stores the estimate of site ``a.b.c`` at attribute path ``a.b.c`` of the guide.
    For sites named ``model.layers...`` that path starts at the guide's ``model`` property, so the
    estimates end up on the model object and never reach the param store (they are not trained).
    This subclass stores them at ``locs.a.b.c`` (as :class:`~pyro.infer.autoguide.AutoNormal` does);
    everything else is Pyro's.
    """

    def _setup_prototype(self, *args, **kwargs):
        autoguide.AutoGuide._setup_prototype(self, *args, **kwargs)
        self.locs = PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            deep_setattr(self.locs, name, PyroParam(site["value"].detach(), site["fn"].support, site["fn"].event_dim))

    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        out = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                out[name] = pyro.sample(name, dist.Delta(operator.attrgetter(name)(self.locs), event_dim=site["fn"].event_dim))
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs):
        return {name: operator.attrgetter(name)(self.locs).detach() for name, _ in self.prototype_trace.iter_stochastic_nodes()}


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
    "delta": AutoDelta,
    "laplace": autoguide.AutoLaplaceApproximation,
}


def init_to_s0(model=None, *, fallback=init_to_median):
    """Initialization strategy: ``s`` sites start at ``model.s0_values()``; other sites use ``fallback``.

    Curried like Pyro's strategies: ``init_to_s0(model)`` returns ``init_loc_fn(site)``.

    Example::

        AutoDelta(model, init_loc_fn=init_to_s0(model))
    """
    if model is None:
        return functools.partial(init_to_s0, fallback=fallback)
    values = model.s0_values()

    def init_loc_fn(site):
        if site["name"] in values:  # a copy: autoguides keep the init tensor as their parameter
            return values[site["name"]].detach().clone()
        return fallback(site)

    return init_loc_fn


def default_guide(model, *, init_scale: float = 0.05):
    """The default posterior: :class:`~pyro.infer.autoguide.AutoNormal` at ``s0`` with small scales.

    The official code draws initial scales uniformly in ``[eps/sqrt(2), eps]`` with ``eps = 0.05``;
    AutoNormal takes one ``init_scale`` (default ``eps``).
    """
    return autoguide.AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=init_scale)


def make_guide(name: str, model, *, init_scale: float = 0.05, rank: int | None = None,
               hidden_dim: int | None = None, num_transforms: int = 1):
    """Build one of Pyro's autoguides by short name (see :data:`GUIDES`), initialized at ``s0``.

    :param name: ``normal`` (default), ``diagonal``, ``lowrank``, ``mvn``, ``iaf``, ``delta`` (MAP), ``laplace``.
    :param rank: rank of the ``lowrank`` covariance (default: Pyro's ``sqrt(D)``).
    :param hidden_dim: width of the ``iaf`` autoregressive network (default ``2 * D``, capped at 1024).

    Example::

        guide = make_guide("mvn", model)
    """
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}")
    init = init_to_s0(model) if hasattr(model, "s0_values") else init_to_median
    if name in ("normal", "diagonal", "mvn"):
        return GUIDES[name](model, init_loc_fn=init, init_scale=init_scale)
    if name == "lowrank":
        kw = {"rank": rank} if rank else {}
        return GUIDES[name](model, init_loc_fn=init, init_scale=init_scale, **kw)
    if name == "iaf":
        dim = getattr(model, "latent_dim", 64)
        # The flow starts from its own base Normal(0, 1); Pyro ignores init_loc_fn for it.
        return GUIDES[name](model, hidden_dim=[hidden_dim or min(2 * dim, 1024)], num_transforms=num_transforms)
    return GUIDES[name](model, init_loc_fn=init)
