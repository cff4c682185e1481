"""The Pyro models: deterministic LoRA (:class:`LoRAModel`) and ScalaBL (:class:`ScalaBL`).

Both are plain callables ``model(batch, labels=None, *, num_data=None)`` usable with
``SVI``, ``Predictive`` and ``Trace_ELBO().differentiable_loss`` unchanged. Only the LoRA
projections are registered in Pyro's param store (``pyro.module``); the frozen backbone never is.

Sites (public API, stable):

* ``lora.<module>.s`` — ScalaBL only: one latent site per adapted module, event shape ``(r,)``,
  e.g. ``lora.model.layers.3.self_attn.q_proj.s`` (BLoB: ``lora.<module>.A``). Listed by :attr:`ScalaBL.latent_sites`.
* ``lora.s`` — ScalaBL with ``layout="vectorized"`` instead: one latent site of shape ``(M, r)`` (``M`` adapted
  modules, in :attr:`ScalaBL.module_sites` order) under the plate ``lora.modules`` (size ``M``, ``dim=-1``):
  one prior, one guide distribution and one log-density for all modules (BLoB: ``lora.A``).
* With ``stochastic=`` (partial-Bayesian ScalaBL) only the chosen modules have a latent site (in either
  layout); the others are plain LoRA, listed by :attr:`ScalaBL.fixed_sites`.
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
           "OBS_SITE", "PROBS_SITE", "DATA_PLATE", "MODULES_PLATE", "LAYOUTS"]

OBS_SITE, PROBS_SITE, DATA_PLATE, MODULES_PLATE = "obs", "probs", "data", "lora.modules"
#: ``"modules"``: one latent site per adapted module (the default); ``"vectorized"``: one ``(M, r)`` site.
LAYOUTS = ("modules", "vectorized")


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
    :param layout: ``"modules"`` (default): one site ``lora.<module>.s`` per adapted module, which users
        condition, block and inspect one by one; ``"vectorized"``: one site ``lora.s`` of shape ``(M, r)``
        under the plate ``lora.modules``, with the per-module priors stacked into one distribution (same
        family per module), so that prior, guide and ELBO cost a few ops instead of a few per module.
        Every autoguide, :func:`~scalabl_pyro.io.save_run` and ``Predictive`` work with both.
    :param stochastic: partial-Bayesian ScalaBL: the adapted modules whose ``s`` is latent, as module names
        (e.g. :func:`~scalabl_pyro.trunk.last_layers`: the last K decoder layers and ``lm_head``) or a callable
        ``module_name -> bool``; the other modules are plain LoRA (``s`` fixed at ``s0``, ``V`` and ``B``
        learned). Posterior samples then share the decoder layers below the lowest stochastic one, which run
        once per question (:mod:`scalabl_pyro.trunk`). ``None`` (default): every adapted module.

    Example::

        model = ScalaBL(net, num_data=len(train))
        guide = AutoNormal(model, init_loc_fn=init_to_s0(model), init_scale=0.05)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(batch, batch["labels"])
    """

    #: Where the default prior is centred: ``"s0"`` (the initial latent values) or ``"zero"``.
    default_prior_loc = "s0"

    def __init__(self, net: AdaptedLM, *, prior: PriorSpec = None, num_data: int | None = None,
                 name: str = "scalabl", kl_weight: float = 1.0, layout: str = "modules", stochastic=None):
        if net.subspace is None:
            raise ValueError("ScalaBL needs an AdaptedLM built with subspace=True")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
        super().__init__(net, num_data=num_data, name=name)
        self.layout = layout
        self.stochastic, self._sites = _stochastic_sites(net, stochastic)
        self._fixed = {k: v for k, v in net.subspace.sites.items() if k not in self._sites}
        sites = self._sites
        first = next(iter(sites))
        #: the site of the vectorized layout: ``lora.s`` (BLoB: ``lora.A``)
        self.vector_site = "lora" + first[first.rindex("."):]
        if layout == "vectorized":
            shapes = sorted({tuple(v.event_shape) for v in sites.values()})
            if len(shapes) > 1:
                raise ValueError(f"layout='vectorized' stacks the modules' {self.vector_site} values, but their shapes "
                                 f"differ ({shapes[:3]}); use layout='modules'")
        self._stacked: dict = {}
        if isinstance(prior, Mapping):
            unknown = sorted(set(prior) - set(sites))
            if unknown and set(prior) == set(net.subspace.sites):  # a prior for every module (centered_prior(
                prior = {k: v for k, v in prior.items() if k in sites}  # net.subspace.s0)): the latent ones' part
                unknown = []
            if unknown:
                raise KeyError(f"prior names unknown sites {unknown[:3]}; valid site names look like "
                               f"{next(iter(sites))!r} (see model.module_sites: the stochastic modules' sites)")
        from .priors import centered_prior, isotropic_normal

        # what save_run records; a default prior is rebuilt on load from the same seed's s0
        self.prior_spec = {"kind": "default", "loc": self.default_prior_loc} if prior is None else prior_to_spec(prior)
        scale = net.config.prior_scale
        if prior is None and self.default_prior_loc == "s0":
            prior = centered_prior(net.subspace.s0, scale)
        self.prior = normalize_prior(prior, default=isotropic_normal(scale))
        self.kl_weight = kl_weight

    def run_options(self) -> dict:
        opts = {"layout": self.layout}
        if self.stochastic is not None:
            opts["stochastic"] = list(self.stochastic)
        return opts

    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sample sites: one per stochastic module, in module order (``[lora.s]`` when
        vectorized)."""
        return [self.vector_site] if self.layout == "vectorized" else list(self._sites)

    @property
    def module_sites(self) -> list[str]:
        """The per-module site names ``lora.<module>.s`` of the stochastic modules in module order (the rows of
        ``lora.s`` when vectorized); all adapted modules unless ``stochastic`` was given."""
        return list(self._sites)

    @property
    def fixed_sites(self) -> list[str]:
        """The subspace sites that are not latent (``stochastic`` given): their ``s`` stays at ``s0``."""
        return list(self._fixed)

    def site_prior(self, site: str) -> "dist.Distribution":
        """The prior of one latent site (a per-module site, or the vectorized site: batch ``(M,)``, event ``(r,)``)."""
        if site == self.vector_site:
            return self.stacked_prior()
        info = self._sites[site]
        return self.prior(site, info.layer, info.event_shape)

    def stacked_prior(self) -> "dist.Distribution":
        """The per-module priors as one distribution of batch shape ``(M,)`` (module order) and event ``(r,)``;
        built once for a fixed prior, at every call for one with learned parameters."""
        from .priors import stack_priors

        key = (self.net.device, torch.distributions.Distribution._validate_args)
        if key in self._stacked:
            return self._stacked[key]
        d = stack_priors({k: self.prior(k, v.layer, v.event_shape) for k, v in self._sites.items()})
        if getattr(self.prior, "fixed", False):
            self._stacked[key] = d
        return d

    def module_values(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{lora.<module>.s: (*lead, r)}`` from latent values of either layout (the vectorized one is split)."""
        if self.vector_site not in values:
            return dict(values)
        v = values[self.vector_site]
        ev = len(next(iter(self._sites.values())).event_shape)
        return dict(zip(self.module_sites, v.unbind(v.dim() - ev - 1)))

    @property
    def latent_dim(self) -> int:
        """Total number of latent coordinates (``r`` x number of stochastic modules)."""
        return sum(v.s0.numel() for v in self._sites.values())

    def log_prior(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log p(s)`` summed over all latent sites, for ``values = {site: (*event)}`` (e.g. a guide draw)."""
        return sum(self.site_prior(k).log_prob(v).sum() for k, v in values.items())

    def prior_param_names(self) -> list[str]:
        """Param-store names of the prior's learned parameters (e.g. :class:`~scalabl_pyro.priors.LayerScalePrior`'s)."""
        with poutine.trace(param_only=True) as tr:
            for site, info in self._sites.items():
                self.prior(site, info.layer, info.event_shape)
        return [name for name, node in tr.trace.nodes.items() if node["type"] == "param"]

    def s0_values(self) -> dict[str, torch.Tensor]:
        """Initial ``s`` per site (singular values of the Kaiming-initialized ``A``); ``{lora.s: (M, r)}`` when vectorized."""
        s0 = self.net.subspace.s0
        if self.layout == "vectorized":
            return {self.vector_site: torch.stack([s0[k] for k in self.module_sites])}
        return {k: s0[k].clone() for k in self._sites}

    def __call__(self, batch, labels=None, *, num_data: int | None = None):
        scale = poutine.scale(scale=self.kl_weight) if self.kl_weight != 1.0 else contextlib.nullcontext()
        sites = self._sites
        ev = next(iter(sites.values())).event_shape
        s, leads = {}, []
        with scale:
            if self.layout == "vectorized":
                with pyro.plate(MODULES_PLATE, len(sites), dim=-1):
                    v = pyro.sample(self.vector_site, self.stacked_prior())
                s[self.vector_site] = v
                lead = out_lead = v.shape[:v.dim() - len(ev) - 1]  # (*sample dims, M, *event)
            else:
                for site, info in sites.items():
                    s[site] = v = pyro.sample(site, self.prior(site, info.layer, info.event_shape))
                    leads.append(v.shape[:v.dim() - len(info.event_shape)])
                lead = torch.broadcast_shapes(*leads)
                # Batch dims of s are particle/sample dims, normally left of the data plate (dim -1), so the
                # rightmost is 1. Predictive(parallel=True) reshapes event-shaped samples to (S, *event) without
                # that 1: then every batch dim is a sample dim.
                out_lead = lead[:-1] if lead and lead[-1] == 1 else lead
        if _in_shape_pass():
            register_adapters(self.name, self._adapters)
            B, C = batch["labels"].shape[0], self.num_classes
            return self._likelihood(torch.zeros(*out_lead, B, C, device=self.net.device), labels, num_data)
        if self.layout == "vectorized":  # one unbind: its backward is one stack
            v = s[self.vector_site]
            flat = dict(zip(sites, v.reshape(-1, len(sites), *ev).unbind(1)))
        else:
            flat = {k: v.expand(*lead, *ev).reshape(-1, *ev) for k, v in s.items()}
        return self.observe(batch, labels, flat, lead=out_lead, num_data=num_data)

    def observe(self, batch, labels, s: Mapping[str, torch.Tensor], *, lead: tuple = (), num_data: int | None = None):
        """The model's data part for given latent values: the sites ``probs`` and ``obs`` only (no latent site).

        :param s: ``{lora.<module>.s: (P, r)}`` for every stochastic module, ``P = prod(lead)`` particles (or 1).
        :param lead: the particle shape of the logits, ``(P,)`` or ``()`` for one particle.

        ``model(batch, labels)`` samples ``s`` and calls this; :func:`~scalabl_pyro.optim.autonormal_elbo_loss`
        calls it with a guide draw (``Trace_ELBO`` of the whole model, its latent terms computed vectorized).
        """
        register_adapters(self.name, self._adapters)
        B, C = batch["labels"].shape[0], self.num_classes
        flat = dict(s)
        # partial: the other modules at s0, one value shared by all particles (logits moves it to the device)
        flat.update({k: v.s0[None] for k, v in self._fixed.items()})
        logits = self.net.logits(batch, s=flat)  # (P, B, C), P = prod(lead)
        return self._likelihood(logits.reshape(*lead, B, C), labels, num_data)


def _stochastic_sites(net: AdaptedLM, stochastic) -> tuple[tuple[str, ...] | None, dict]:
    """``(module names or None, {site: SubspaceSite})`` of the latent modules chosen by ``stochastic``."""
    all_sites = net.subspace.sites
    if stochastic is None:
        return None, dict(all_sites)
    by_module = {v.module_name: k for k, v in all_sites.items()}
    if callable(stochastic):
        names = [m for m in by_module if stochastic(m)]
    elif isinstance(stochastic, str):
        raise TypeError(f"stochastic={stochastic!r}: pass a list of module names (e.g. last_layers(net, 2)) "
                        "or a callable module_name -> bool")
    else:
        names = list(stochastic)
        unknown = [m for m in names if m not in by_module]
        if unknown:
            raise ValueError(f"stochastic names modules that are not adapted: {unknown[:3]}; the adapted modules "
                             f"are named like {list(by_module)[:2]} (see last_layers for the top layers)")
    if not names:
        raise ValueError("stochastic selects no adapted module: a ScalaBL model needs at least one latent site "
                         "(for none at all, use LoRAModel)")
    chosen = set(names)
    order = tuple(m for m in by_module if m in chosen)
    return order, {by_module[m]: all_sites[by_module[m]] for m in order}


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

