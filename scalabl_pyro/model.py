"""The Pyro models: deterministic LoRA (:class:`LoRAModel`) and ScalaBL (:class:`ScalaBL`).

Both are plain callables ``model(batch, labels=None, *, num_data=None)`` usable with
``SVI``, ``Predictive`` and ``Trace_ELBO().differentiable_loss`` unchanged. Only the LoRA
projections are registered in Pyro's param store (``pyro.module``); the frozen backbone never is.

Sites (public API, stable):

* ``lora.<module>.s`` — ScalaBL only: one latent site per adapted module, event shape ``(r,)``,
  e.g. ``lora.model.layers.3.self_attn.q_proj.s`` (BLoB: ``lora.<module>.A``). Listed by :attr:`ScalaBL.latent_sites`.
* ``probs`` — deterministic class probabilities, shape ``(B, C)`` (inside the ``data`` plate).
* ``obs`` — the observed label, ``Categorical(logits)``, inside ``pyro.plate("data", num_data)``
  so the log-likelihood of a minibatch is scaled to the full data set.

Inside Pyro's ``InitMessenger`` without a replay or condition (autoguide prototype tracing,
``Predictive``'s shape inference) the models skip the backbone and emit zero logits of the right
shape: those passes only need shapes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import _PYRO_STACK

from .priors import PriorSpec, normalize_prior, prior_to_spec
from .scoring import AdaptedLM

__all__ = ["LoRAModel", "ScalaBL", "count_parameters", "register_adapters", "ParamStoreConflictError",
           "OBS_SITE", "PROBS_SITE", "DATA_PLATE"]

OBS_SITE, PROBS_SITE, DATA_PLATE = "obs", "probs", "data"


class ParamStoreConflictError(RuntimeError):
    """Pyro's global param store holds another guide's parameters under a new guide's names
    (see :func:`~scalabl_pyro.guides.check_fresh_guide`)."""


def register_adapters(name: str, adapters: torch.nn.Module) -> None:
    """``pyro.module(name, adapters)``, with this model's own tensors always the ones in the param store.

    ``pyro.module`` keeps a tensor already stored under ``name$$$...`` and leaves the module's own one out of
    the store, so SVI would train another model's tensors while this model's forward uses its own: its
    adapters would never train, silently. That happens whenever a second model is built under the same
    ``name`` without ``pyro.clear_param_store()`` (a notebook cell run twice). Here a stale entry is replaced
    by this model's tensor: whichever model runs owns the name, and every model trains its own adapters.
    """
    store = pyro.get_param_store()
    for pname, p in adapters.named_parameters():
        key = param_with_module_name(name, pname)
        if key in store and store.param_name(p) != key:
            del store[key]
    pyro.module(name, adapters)


def _in_shape_pass() -> bool:
    """True inside an autoguide prototype trace or Predictive's shape inference: an ``InitMessenger`` with no
    replay/condition. (Autoguides keep ``guide.model`` wrapped in ``InitMessenger``; replaying it, as
    ``AutoLaplaceApproximation.laplace_approximation`` does, must run the backbone.)"""
    init = replay = False
    for m in _PYRO_STACK:
        init |= isinstance(m, InitMessenger)
        replay |= isinstance(m, (ReplayMessenger, ConditionMessenger))
    return init and not replay


class LoRAModel:
    """Plain LoRA as a Pyro model with no latent sites: SVI with an empty guide is maximum likelihood.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace=False``.
    :param num_data: default data set size for the likelihood scale (overridden by the ``num_data`` kwarg).
    :param name: prefix of the projections in Pyro's param store (the model that runs owns it: see
        :func:`register_adapters`); the guides of :func:`~scalabl_pyro.guides.make_guide` are named after it.

    Example::

        model = LoRAModel(AdaptedLM(lm, tok, label_words="ABCD", subspace=False), num_data=len(train))
        svi = SVI(model, lambda *a, **k: None, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    """

    latent_sites: tuple[str, ...] = ()

    def __init__(self, net: AdaptedLM, *, num_data: int | None = None, name: str = "lora"):
        self.net = net
        self.num_data = num_data
        self.name = name
        self._adapters = net.adapters()

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def run_options(self) -> dict:
        """Constructor options (besides ``net``, ``name`` and the prior) that :func:`~scalabl_pyro.io.save_run`
        records; ``num_data`` is not one (it is given per call by :func:`~scalabl_pyro.train.fit`)."""
        return {}

    def _likelihood(self, logits, labels, num_data):
        B = logits.shape[-2]
        if labels is not None and labels.shape != (B,):
            raise ValueError(f"labels must have shape ({B},) to match the batch, got {tuple(labels.shape)}")
        if labels is not None:
            labels = labels.to(logits.device)
        with pyro.plate(DATA_PLATE, size=num_data or self.num_data or B,
                        subsample=torch.arange(B, device=logits.device), dim=-1):
            pyro.deterministic(PROBS_SITE, logits.softmax(-1), event_dim=1)
            return pyro.sample(OBS_SITE, dist.Categorical(logits=logits), obs=labels)

    def __call__(self, batch, labels=None, *, num_data: int | None = None):
        register_adapters(self.name, self._adapters)
        B = batch["labels"].shape[0]
        if _in_shape_pass():
            logits = torch.zeros(B, self.num_classes, device=self.net.device)
        else:
            logits = self.net.logits(batch)[0]
        return self._likelihood(logits, labels, num_data)


class ScalaBL(LoRAModel):
    """ScalaBL: LoRA with ``A = diag(s) V`` per adapted module and a prior on every ``s``.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace=True``.
    :param prior: a Distribution, a dict ``{site: Distribution}`` or a callable ``(site, module) -> Distribution``
        (default ``Normal(s0, net.config.prior_scale)``: centred at the initial singular values ``s0``, where
        the default guide starts; chosen on validation, ``bench/README.md`` "epochs.py": ``Normal(0, 1)`` left
        ScalaBL at chance on 480 WinoGrande-S questions). Pass ``isotropic_normal()`` for ``Normal(0, 1)``;
        see :mod:`scalabl_pyro.priors`.
    :param num_data: data set size for the likelihood scale (or pass ``num_data=`` per call).
    :param kl_weight: multiplies the latent sites' log-densities (KL annealing; scale the guide too).

    Example::

        model = ScalaBL(net, num_data=len(train))
        guide = AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=0.05)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(batch, batch["labels"])
    """

    #: Where the default prior is centred: ``"s0"`` (the initial latent values) or ``"zero"``.
    default_prior_loc = "s0"

    def __init__(self, net: AdaptedLM, *, prior: PriorSpec = None, num_data: int | None = None,
                 name: str = "scalabl", kl_weight: float = 1.0):
        if net.subspace is None:
            raise ValueError("ScalaBL needs an AdaptedLM built with subspace=True")
        super().__init__(net, num_data=num_data, name=name)
        if isinstance(prior, Mapping):
            unknown = sorted(set(prior) - set(net.subspace.sites))
            if unknown:
                raise KeyError(f"prior names unknown sites {unknown[:3]}; valid site names look like "
                               f"{next(iter(net.subspace.sites))!r} (see model.latent_sites)")
        from .priors import centered_prior, isotropic_normal

        # what save_run records; a default prior is rebuilt on load from the same seed's s0
        self.prior_spec = {"kind": "default", "loc": self.default_prior_loc} if prior is None else prior_to_spec(prior)
        scale = net.config.prior_scale
        if prior is None and self.default_prior_loc == "s0":
            prior = centered_prior(net.subspace.s0, scale)
        self.prior = normalize_prior(prior, default=isotropic_normal(scale))
        self.kl_weight = kl_weight

    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sample sites, one per adapted module, in module order."""
        return list(self.net.subspace.sites)

    @property
    def latent_dim(self) -> int:
        """Total number of latent coordinates (``r`` x number of adapted modules)."""
        return sum(v.s0.numel() for v in self.net.subspace.sites.values())

    def log_prior(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log p(s)`` summed over all latent sites, for ``values = {site: (*event)}`` (e.g. a guide draw)."""
        sites = self.net.subspace.sites
        return sum(self.prior(k, sites[k].layer, sites[k].event_shape).log_prob(v).sum() for k, v in values.items())

    def prior_param_names(self) -> list[str]:
        """Param-store names of the prior's learned parameters (e.g. :class:`~scalabl_pyro.priors.LayerScalePrior`'s)."""
        with poutine.trace(param_only=True) as tr:
            for site, info in self.net.subspace.sites.items():
                self.prior(site, info.layer, info.event_shape)
        return [name for name, node in tr.trace.nodes.items() if node["type"] == "param"]

    def s0_values(self) -> dict[str, torch.Tensor]:
        """Initial ``s`` per site (singular values of the Kaiming-initialized ``A``)."""
        return {k: v.clone() for k, v in self.net.subspace.s0.items()}

    def __call__(self, batch, labels=None, *, num_data: int | None = None):
        register_adapters(self.name, self._adapters)
        scale = poutine.scale(scale=self.kl_weight) if self.kl_weight != 1.0 else contextlib.nullcontext()
        s, leads = {}, []
        with scale:
            for site, info in self.net.subspace.sites.items():
                ev = info.event_shape
                s[site] = v = pyro.sample(site, self.prior(site, info.layer, ev))
                leads.append(v.shape[:v.dim() - len(ev)])
        lead = torch.broadcast_shapes(*leads)
        # Batch dims of s are particle/sample dims, normally left of the data plate (dim -1), so the
        # rightmost is 1. Predictive(parallel=True) reshapes event-shaped samples to (S, *event) without
        # that 1: then every batch dim is a sample dim.
        out_lead = lead[:-1] if lead and lead[-1] == 1 else lead
        B, C = batch["labels"].shape[0], self.num_classes
        if _in_shape_pass():
            logits = torch.zeros(*out_lead, B, C, device=self.net.device)
        else:
            flat = {}
            for k, v in s.items():
                ev = self.net.subspace.sites[k].event_shape
                flat[k] = v.expand(*lead, *ev).reshape(-1, *ev)
            logits = self.net.logits(batch, s=flat)  # (P, B, C), P = prod(lead)
            logits = logits.reshape(*out_lead, B, C)
        return self._likelihood(logits, labels, num_data)


def count_parameters(model: LoRAModel, guide=None) -> dict[str, int]:
    """Trainable parameter counts: LoRA projections, guide, and the extra over plain LoRA.

    Run the guide once first (autoguides create their parameters lazily).
    """
    lora = sum(p.numel() for p in model.net.trainable_parameters())
    g = 0
    if guide is not None and isinstance(guide, torch.nn.Module):
        g = sum(p.numel() for p in guide.parameters())
    extra = sum(v.numel() for k, v in pyro.get_param_store().items() if k.startswith("prior_scale."))
    return {"lora": lora, "guide": g, "extra_over_lora": g + extra, "total": lora + g + extra,
            "latent_dim": getattr(model, "latent_dim", 0)}

