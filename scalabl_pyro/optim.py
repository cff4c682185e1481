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

Example::

    opt = FusedAdamW(TrainConfig(), model_prefix=model.name)
    with poutine.trace(param_only=True) as tr:
        loss, surrogate = elbo_loss(make_elbo(TrainConfig()), model, guide, batch, batch["labels"], num_data=n)
    surrogate.backward()
    opt.step(tr.trace)  # clip, update, zero the gradients, advance the schedule
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_identically_zero

from .config import TrainConfig

__all__ = ["FusedAdamW", "elbo_loss", "clip_per_tensor_"]

#: ``FusedAdamW.get_state()["format"]``; any other dict is read as Pyro's per-parameter ``PyroOptim`` state.
STATE_FORMAT = "fused-adamw-1"


def clip_per_tensor_(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale every gradient in place to norm at most ``max_norm``, each on its own (as ``clip_grad_norm_`` on
    one tensor, Pyro's ``clip_args``), in one pass over the list: no host read, a handful of dispatched ops.

    :param grads: gradient tensors, any shapes (modified in place).
    """
    if not grads:
        return
    norms = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))[:, None], 2, dim=-1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s arithmetic, tensor by tensor
    torch._foreach_mul_(grads, list(coef.unbind()))


class FusedAdamW:
    """One fused AdamW, one LR schedule and one clipping pass over all trainable tensors of a Pyro program.

    Parameters are picked up from the ``param_only`` trace of each step (as ``SVI.step`` does), so autoguides
    may create theirs lazily; names starting with ``model_prefix + "$$$"`` (registered by ``pyro.module``)
    form the LoRA group. :meth:`step` clips (``config.clip_norm``, per tensor), updates, sets the gradients to
    ``None`` and advances the schedule (:func:`~scalabl_pyro.train.lr_lambda`).

    :param config: ``lr``, ``guide_lr``, ``weight_decay``, ``clip_norm`` and the schedule.
    :param model_prefix: the model's ``name``.
    """

    def __init__(self, config: TrainConfig, *, model_prefix: str = "scalabl",
                 lr_lambda: Callable[[int], float] | None = None):
        from .train import lr_lambda as default_lambda

        self.config = config
        self.prefix = model_prefix + "$$$"
        self.lr_lambda = lr_lambda or default_lambda(config)
        self.names: list[str] = []  # in optimizer order: group 0 (LoRA) then group 1 (guide/prior)
        self._group_names: tuple[list[str], list[str]] = ([], [])
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
        hyper = ({"lr": c.lr, "weight_decay": c.weight_decay}, {"lr": c.guide_lr, "weight_decay": 0.0})
        build = self.optimizer is None
        if build:  # both groups always exist (one may stay empty): the group order never depends on the data
            self.optimizer = torch.optim.AdamW([{"params": [], **h} for h in hyper], fused=True)
        for k, p in new:
            g = 0 if k.startswith(self.prefix) else 1
            self.optimizer.param_groups[g]["params"].append(p)
            self._group_names[g].append(k)
            self._seen.add(id(p))
        self.names = self._group_names[0] + self._group_names[1]
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
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.config.clip_norm > 0:
            clip_per_tensor_(grads, self.config.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # --------------------------------------------------------------------------- state
    def get_state(self) -> dict:
        """Optimizer and schedule state keyed by parameter name (for :mod:`~scalabl_pyro.checkpoint`)."""
        if self.optimizer is None:
            return dict(self._pending or {})
        return {"format": STATE_FORMAT, "names": list(self.names), "optimizer": self.optimizer.state_dict(),
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
