"""The training step of :func:`~scalabl_pyro.train.fit`: one fused optimizer and an ELBO summed as tensors.

``SVI(model, guide, make_optimizer(config), make_elbo(config))`` (Pyro's way, :mod:`scalabl_pyro.train`) builds
one AdamW and one gradient clipping *per parameter tensor* (244 for SmolLM2's 61 adapted modules) and its
``Trace_ELBO`` reads every site's log-density back to the host (``.item()``: two device syncs per latent
site). ``fit`` trains the same model with the same numbers through :class:`FusedAdamW` and :func:`elbo_loss`:

* :class:`FusedAdamW`: one ``torch.optim.AdamW(fused=True)`` over every trainable tensor in two parameter
  groups (the LoRA projections at ``lr`` with weight decay; guide and prior parameters at ``guide_lr``, no
  decay), one ``LambdaLR`` schedule, and Pyro's per-tensor norm clipping done for all tensors in one
  vectorized pass. Adam is elementwise, so this is the very update of Pyro's per-tensor optimizers.
* :func:`elbo_loss`: the ELBO's loss and surrogate as tensors (no host read; ``fit`` reads the loss once).
* :func:`autonormal_elbo_loss`: for the default posterior (``AutoNormal`` on ScalaBL, ``Trace_ELBO`` with one
  particle) the same estimator with the same random draws, its per-site terms computed for all sites at once:
  the guide's locs and scales stacked into ``(M, r)``, one reparameterized draw, one guide and one (stacked)
  prior log-density, then the model's data part (:meth:`~scalabl_pyro.model.ScalaBL.observe`). Per-module
  sites otherwise cost a few dozen ops each (two sample sites in the guide, one in the model, their
  log-densities and backward): 61 of them cost more ops than the backbone's forward. ``fit`` uses it when
  :func:`autonormal_path_applies`; users' ``SVI`` and ``Trace_ELBO`` see the per-module sites as always.

Example::

    opt = FusedAdamW(TrainConfig(), model_prefix=model.name)
    with poutine.trace(param_only=True) as tr:
        loss, surrogate = elbo_loss(make_elbo(TrainConfig()), model, guide, batch, batch["labels"], num_data=n)
    surrogate.backward()
    opt.step(tr.trace)  # clip, update, zero the gradients, advance the schedule
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import pyro
from pyro import poutine
from pyro.optim import PyroOptim
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.util import is_identically_zero, is_validation_enabled
from pyro.util import warn_if_nan

from . import distributed
from .config import TrainConfig

__all__ = ["DeviceTrace_ELBO", "FusedAdamW", "FusedPyroOptim", "elbo_loss", "autonormal_elbo_loss", "autonormal_path_applies", "clip_per_tensor_",
           "lr_lambda"]

#: ``FusedAdamW.get_state()["format"]``; any other dict is read as Pyro's per-parameter ``PyroOptim`` state.
STATE_FORMAT = "fused-adamw-1"


def clip_per_tensor_(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale every gradient in place to norm at most ``max_norm``, each on its own (as ``clip_grad_norm_`` on
    one tensor, Pyro's ``clip_args``), in one pass over the list: no host read, a handful of dispatched ops.

    :param grads: gradient tensors, any shapes (modified in place).
    """
    if not grads:
        return
    if any(distributed.is_sharded(g) for g in grads):
        return _clip_sharded_(grads, max_norm)
    norms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))[:, None], 2, dim=-1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s arithmetic, tensor by tensor
    torch._foreach_mul_(grads, list(coef.unbind()))


def _clip_sharded_(grads: list[torch.Tensor], max_norm: float) -> None:
    """:func:`clip_per_tensor_` when some gradients are FSDP shards (``DTensor``): each sharded tensor's norm is the
    root of its shards' squared norms summed over the ranks (one all-reduce for all of them)."""
    local = [g.to_local() if distributed.is_sharded(g) else g for g in grads]
    sq = torch.stack(torch._foreach_norm(local)).float() ** 2
    mask = torch.tensor([distributed.is_sharded(g) for g in grads], device=sq.device)
    part = torch.where(mask, sq, torch.zeros_like(sq))
    distributed._collective(torch.distributed.all_reduce, part)  # sums the shards' squares
    norms = torch.where(mask, part, sq).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, [c.to(t.dtype) for c, t in zip(coef.unbind(), local)])


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup over ``warmup * steps``, then ``schedule``.

    Also importable as ``scalabl_pyro.train.lr_lambda``.

    Example::

        f = lr_lambda(TrainConfig(steps=100, warmup=0.1, schedule="cosine"))
        f(0), f(9), f(100)  # 0.1, 1.0, 0.0
    """
    warm = max(1, int(round(config.warmup * config.steps))) if config.warmup > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, config.steps - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if config.schedule == "cosine" else 1.0 - t

    return f


_lr_lambda = lr_lambda  # FusedAdamW's argument of the same name shadows it


class FusedAdamW:
    """One fused AdamW, one LR schedule and one clipping pass over all trainable tensors of a Pyro program.

    Parameters are picked up from the ``param_only`` trace of each step (as ``SVI.step`` does), so autoguides
    may create theirs lazily; names starting with ``model_prefix + "$$$"`` (registered by ``pyro.module``)
    form the LoRA group. :meth:`step` clips (``config.clip_norm``, per tensor), updates, sets the gradients to
    ``None`` and advances the schedule (:func:`lr_lambda`).

    :param config: ``lr``, ``guide_lr``, ``weight_decay``, ``clip_norm`` and the schedule.
    :param model_prefix: the model's ``name``.
    """

    def __init__(self, config: TrainConfig, *, model_prefix: str = "scalabl",
                 lr_lambda: Callable[[int], float] | None = None):
        self.config = config
        self.prefix = model_prefix + "$$$"
        self.lr_lambda = lr_lambda or _lr_lambda(config)
        self.names: list[str] = []  # in optimizer order: group 0 (LoRA), group 1 (guide/prior), group 2 (FSDP-sharded LoRA)
        self._group_names: tuple[list[str], ...] = ([], [], [])
        self.params: list[torch.Tensor] = []
        self._seen: set[int] = set()
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._pending: dict | None = None

    # --------------------------------------------------------------------------- parameters
    def add_params(self, named: Mapping[str, torch.Tensor]) -> None:
        """Add the tensors not seen before (``{param-store name: unconstrained tensor}``); the first call builds
        the optimizer and applies a state given to :meth:`set_state` before."""
        new = [(k, p) for k, p in named.items() if id(p) not in self._seen and p.requires_grad]
        if not new:
            return
        c = self.config
        lora = {"lr": c.lr, "weight_decay": c.weight_decay}
        hyper = (lora, {"lr": c.guide_lr, "weight_decay": 0.0}, lora)
        build = self.optimizer is None
        if build:  # every group always exists (some may stay empty): the group order never depends on the data
            self.optimizer = torch.optim.AdamW([{"params": [], **h} for h in hyper], fused=True)
        for k, p in new:
            # group 2: LoRA tensors sharded by FSDP (DTensor; one fused update cannot mix them with plain tensors)
            g = (2 if distributed.is_sharded(p) else 0) if k.startswith(self.prefix) else 1
            self.optimizer.param_groups[g]["params"].append(p)
            self._group_names[g].append(k)
            self._seen.add(id(p))
        self.names = self._group_names[0] + self._group_names[1] + self._group_names[2]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if build:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
            if self._pending is not None:
                state, self._pending = self._pending, None
                self._load(state)

    @staticmethod
    def trace_params(trace) -> dict[str, torch.Tensor]:
        """``{name: unconstrained tensor}`` of the param sites of a ``poutine.trace(param_only=True)`` trace."""
        return {site["name"]: site["value"].unconstrained() for site in trace.nodes.values()
                if site["type"] == "param"}

    # --------------------------------------------------------------------------- the update
    def step(self, trace=None) -> None:
        """Clip, update and zero the gradients of every tensor (those of ``trace`` added first), then
        advance the learning-rate schedule by one step."""
        if trace is not None:
            self.add_params(self.trace_params(trace))
        if self.optimizer is None:
            return
        self.update()
        self.scheduler.step()

    def update(self) -> None:
        """Clip, update and set to ``None`` the gradients of every tensor; the schedule does not move. In a
        ``torch.distributed`` group of several processes the gradients are first averaged over the ranks (one
        all-reduce, :func:`~scalabl_pyro.distributed.all_reduce_mean_`), so every rank takes the same update."""
        if distributed.active():
            whole = [p for p in self.params if not distributed.is_sharded(p)]  # FSDP has averaged the shards
            for p in whole:
                if p.grad is None:  # every rank reduces the same list
                    p.grad = torch.zeros_like(p)
            distributed.all_reduce_mean_([p.grad for p in whole])
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.config.clip_norm > 0:
            clip_per_tensor_(grads, self.config.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --------------------------------------------------------------------------- state
    def get_state(self) -> dict:
        """Optimizer and schedule state keyed by parameter name (for :mod:`~scalabl_pyro.checkpoint`)."""
        if self.optimizer is None:
            return dict(self._pending or {})
        sd = self.optimizer.state_dict()
        if any(distributed.is_sharded(p) for p in self.params):  # whole tensors (a collective: every rank calls it)
            sd["state"] = {i: {k: distributed.full_tensor(v) for k, v in st.items()} for i, st in sd["state"].items()}
        return {"format": STATE_FORMAT, "names": list(self.names), "optimizer": sd,
                "scheduler": self.scheduler.state_dict()}

    def set_state(self, state: dict) -> None:
        """Load :meth:`get_state`'s dict, or Pyro's per-parameter ``PyroOptim.get_state()`` of the same run (a
        checkpoint written by ``SVI`` + :func:`~scalabl_pyro.train.make_optimizer`). Applied when the
        parameters are first seen, as Pyro does."""
        if self.optimizer is None:
            self._pending = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        if state.get("format") == STATE_FORMAT:
            if sorted(state["names"]) != sorted(self.names):
                missing = sorted(set(self.names) - set(state["names"]))[:3]
                extra = sorted(set(state["names"]) - set(self.names))[:3]
                raise ValueError(f"optimizer state names other parameters: not in the state {missing}, only in "
                                 f"the state {extra}; it comes from another model or guide")
            pos = {k: i for i, k in enumerate(state["names"])}
            sd = state["optimizer"]
            per = {self.names.index(k): sd["state"][pos[k]] for k in self.names if pos[k] in sd["state"]}
            for i, st in per.items():  # whole moments of an FSDP-sharded tensor: this rank's shard
                p = self.params[i]
                if distributed.is_sharded(p):
                    per[i] = {k: distributed.shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                              for k, v in st.items()}
            current = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"state": per, "param_groups": current["param_groups"]})
            epoch = state["scheduler"]["last_epoch"]
        else:  # Pyro's {name: {"optimizer": one-tensor AdamW state, "scheduler": LambdaLR state}}
            per, epoch = {}, None
            for i, k in enumerate(self.names):
                old = state.get(k)
                if old is None:
                    continue
                if 0 in old["optimizer"]["state"]:
                    per[i] = old["optimizer"]["state"][0]
                epoch = old["scheduler"]["last_epoch"]
            self.optimizer.load_state_dict({"state": per, "param_groups": self.optimizer.state_dict()["param_groups"]})
        if epoch is not None:
            self.scheduler.last_epoch = epoch
            self.scheduler._step_count = epoch + 1
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * self.lr_lambda(epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class FusedPyroOptim(PyroOptim):
    """:class:`FusedAdamW` as a ``pyro.optim.PyroOptim`` for ``SVI``: one fused AdamW and one clipping pass over
    every parameter ``SVI.step`` hands it, where Pyro's optimizers build one AdamW and one clipping per tensor.
    The update of :func:`~scalabl_pyro.train.make_optimizer`'s per-tensor ``LambdaLR`` (same groups, learning
    rates, decay, clipping and schedule); :meth:`step` advances the schedule, as ``pyro.optim.LambdaLR.step()``.
    Built by ``make_optimizer(config, fused=True)``.

    Example::

        optim = make_optimizer(cfg, model_prefix=model.name, fused=True)
        svi = SVI(model, guide, optim, make_elbo(cfg))
        for batch in batches:
            svi.step(batch, batch["labels"], num_data=n)
            optim.step()  # the learning-rate schedule
    """

    def __init__(self, config: TrainConfig, *, model_prefix: str = "scalabl",
                 lr_lambda: Callable[[int], float] | None = None):
        super().__init__(torch.optim.AdamW, {})
        self.fused = FusedAdamW(config, model_prefix=model_prefix, lr_lambda=lr_lambda)

    def __call__(self, params, *args, **kwargs) -> None:
        store = pyro.get_param_store()
        named = {store.param_name(p): p for p in params}  # SVI passes a set: add new ones in name order
        self.fused.add_params(dict(sorted((k, p) for k, p in named.items() if k is not None)))
        if self.fused.optimizer is not None:
            self.fused.update()

    def step(self, *args, **kwargs) -> None:
        """Advance the learning-rate schedule by one step (call once per ``SVI.step``)."""
        if self.fused.scheduler is not None:
            self.fused.scheduler.step()

    def get_state(self) -> dict:
        return self.fused.get_state()

    def set_state(self, state: dict) -> None:
        self.fused.set_state(state)


def elbo_loss(elbo, model, guide, *args, **kwargs) -> tuple[torch.Tensor | float, torch.Tensor]:
    """``(loss, surrogate)`` of a ``Trace_ELBO``/``TraceMeanField_ELBO`` (and their ``num_particles``) as
    tensors: ``surrogate.backward()`` gives the gradients ``elbo.loss_and_grads`` would, ``loss`` is its value
    (detached). Pyro's ``Trace_ELBO`` sums the per-site terms with ``.item()`` (a device sync per site); here
    they stay on the device. With a guide site that needs a score-function term, or for the mean-field ELBO
    (one host read per particle), Pyro's own per-particle code runs and ``loss`` may be a float.
    """
    loss, surrogate = 0.0, 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
        pair = None if isinstance(elbo, TraceMeanField_ELBO) else _reparam_particle(model_trace, guide_trace)
        if pair is None:
            pair = elbo._differentiable_loss_particle(model_trace, guide_trace)
        loss = loss + pair[0] / elbo.num_particles
        surrogate = surrogate + pair[1] / elbo.num_particles
    return loss, surrogate


def _reparam_particle(model_trace, guide_trace):
    """Trace_ELBO's ``_differentiable_loss_particle`` for a fully reparameterized guide, summed as tensors in
    the same order; ``None`` when a guide site has a score-function term."""
    surrogate = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            surrogate = surrogate + site["log_prob_sum"]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            _, score_function_term, entropy_term = site["score_parts"]
            if not is_identically_zero(score_function_term):
                return None
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
    surrogate = -surrogate
    return (surrogate.detach() if torch.is_tensor(surrogate) else surrogate), surrogate


# ------------------------------------------------------------------------ AutoNormal: all sites at once
def _real(c) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c is constraints.real


def autonormal_path_applies(elbo, model, guide) -> bool:
    """Whether :func:`autonormal_elbo_loss` computes exactly ``elbo``'s estimator for ``model`` and ``guide``:
    ``Trace_ELBO`` (or :class:`DeviceTrace_ELBO`) with one particle, an ``AutoNormal`` (its own ``forward``) that has run, whose sites are the
    model's latent sites in model order, on the real line and in no subsampled plate, a ScalaBL model whose
    priors stack into one distribution (:meth:`~scalabl_pyro.model.ScalaBL.stacked_prior`), and Pyro's
    validation off (with it on, Pyro's own checks run: ``TrainConfig(validate=True)``)."""
    if not isinstance(elbo, Trace_ELBO) or isinstance(elbo, TraceMeanField_ELBO) or elbo.num_particles != 1 \
            or type(elbo)._differentiable_loss_particle is not Trace_ELBO._differentiable_loss_particle \
            or is_validation_enabled():
        return False
    if not isinstance(guide, AutoNormal) or type(guide).forward is not AutoNormal.forward \
            or guide.prototype_trace is None or getattr(guide, "create_plates", None) is not None:
        return False
    if not callable(getattr(model, "observe", None)) or not getattr(getattr(model, "prior", None), "fixed", False):
        return False
    sites = list(guide.prototype_trace.iter_stochastic_nodes())
    if [name for name, _ in sites] != list(model.latent_sites):
        return False
    for _, site in sites:
        if not _real(site["fn"].support) or any(
                f.full_size not in (None, f.size) for f in site["cond_indep_stack"]):
            return False
    try:
        model.stacked_prior()
    except (TypeError, ValueError):  # priors of mixed families (or not stackable): the per-site ELBO
        return False
    return True


def autonormal_elbo_loss(model, guide, batch, labels, *, num_data: int | None = None, guide_scale: float = 1.0):
    """``(loss, surrogate)`` of ``Trace_ELBO`` (one particle) for ScalaBL and its ``AutoNormal`` guide, with the
    draws ``Trace_ELBO`` would make (the same per-site standard normals, in site order) and its per-site terms
    summed as a few ops over all sites. Call only where :func:`autonormal_path_applies`; ``tests/test_optim.py``
    checks loss and gradients against ``Trace_ELBO().differentiable_loss``.

    :param batch: a collated batch; ``labels`` its labels ``(B,)``.
    :param guide_scale: the guide's ``poutine.scale`` (:func:`~scalabl_pyro.train.fit` scales the guide by the
        model's ``kl_weight`` while annealing; the model scales its own latent sites by ``kl_weight``).
    :returns: ``loss`` (detached) and ``surrogate`` (``surrogate.backward()`` gives the ELBO's gradients).
    """
    names = list(model.latent_sites)
    with guide._pyro_context:  # the guide's parameters as its forward reads them (param sites for fit's optimizer)
        locs, scales = zip(*(guide._get_loc_and_scale(name) for name in names))
    # the draws of Normal(loc, scale).rsample() site after site: torch.empty(shape).normal_()
    eps = [torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_() for loc in locs]
    if model.layout == "vectorized":
        loc, scale, eps = locs[0], scales[0], eps[0]
    else:
        loc, scale, eps = torch.stack(locs), torch.stack(scales), torch.stack(eps)
    z = loc + eps * scale  # (M, r): one value per stochastic module, in module order
    w = getattr(model, "kl_weight", 1.0)  # the model's latent sites are in poutine.scale(kl_weight)
    log_q = torch.distributions.Normal(loc, scale, validate_args=False).log_prob(z).sum()
    log_p = model.stacked_prior().log_prob(z).sum()
    s = dict(zip(model.module_sites, z.unsqueeze(1).unbind(0)))  # {site: (1, r)}: one particle
    with poutine.trace() as tr:
        model.observe(batch, labels, s, num_data=num_data)
    trace = tr.trace
    trace.compute_log_prob(site_filter=lambda name, site: not site["infer"].get("_deterministic"))
    terms = [site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample" and "log_prob_sum" in site]
    log_lik = terms[0] if len(terms) == 1 else sum(terms)
    kl = log_p - log_q if w == 1.0 and guide_scale == 1.0 else w * log_p - guide_scale * log_q  # -KL estimate
    surrogate = -(log_lik + kl)
    return surrogate.detach(), surrogate


class DeviceTrace_ELBO(Trace_ELBO):
    """Pyro's ``Trace_ELBO`` whose :meth:`loss_and_grads` (what ``SVI.step`` calls) keeps the per-site terms on the
    device: :func:`autonormal_elbo_loss` where :func:`autonormal_path_applies` (the default guide, Pyro's
    validation off), :func:`elbo_loss` otherwise; one host read per step, for the float ``SVI.step`` returns.
    The same estimator, draws and gradients as ``Trace_ELBO`` (whose ``loss`` and ``differentiable_loss`` it keeps);
    :func:`~scalabl_pyro.train.make_elbo` builds it.

    Example::

        svi = SVI(model, guide, make_optimizer(cfg), DeviceTrace_ELBO(max_plate_nesting=1))
        with pyro.validation_enabled(False):  # Pyro's checks read every site's value back to the host
            loss = svi.step(batch, batch["labels"], num_data=n)
    """

    def _fast(self, model, guide) -> bool:
        """:func:`autonormal_path_applies`, its structural part decided once per (model, guide) that has run."""
        if is_validation_enabled() or getattr(guide, "prototype_trace", None) is None:
            return False
        paths = self.__dict__.setdefault("_paths", {})
        if (model, guide) not in paths:
            paths[model, guide] = autonormal_path_applies(self, model, guide)
        return paths[model, guide]

    def loss_and_grads(self, model, guide, *args, **kwargs):
        if len(args) == 2 and args[1] is not None and set(kwargs) <= {"num_data"} and self._fast(model, guide):
            loss, surrogate = autonormal_elbo_loss(model, guide, *args, **kwargs)
        else:
            loss, surrogate = elbo_loss(self, model, guide, *args, **kwargs)
        if torch.is_tensor(surrogate) and surrogate.requires_grad:
            surrogate.backward()
        loss = float(loss)
        warn_if_nan(loss, "loss")
        return loss
