"""PoLAR-VBLL: orthogonalized low-rank adapters under a variational Bayesian last layer, as a Pyro model.

A sister method of ScalaBL. The trunk is deterministic: every adapted module (``q_proj``, ``v_proj``)
gets a PoLAR update ``dW = X Theta Y^T * scaling`` (PoLAR: Lion et al., 2025, "PoLAR: Polar-Decomposed
Low-Rank Adapter Representation") with ``X`` (out x r) and ``Y`` (in x r) on the Stiefel manifold
(orthonormal columns, restored by :func:`polar_retract` after optimizer steps) and ``Theta`` (r x r) free.
Only the class head is random (VBLL: Harrison et al., ICLR 2024, "Variational Bayesian Last Layers"):
the letter-format head rows ``W`` (C x H) get the prior ``Normal(W0, prior_scale)`` centred on the
pretrained rows ``W0`` (the zero-shot model) and any Pyro autoguide as posterior. The decoder therefore
runs once per batch and the ``P`` sampled heads are applied to the same hidden states.

Storage on the peft LoRA layers: ``lora_B.weight = X`` (out, r), ``lora_A.weight = Y^T`` (r, in), and a
forward hook on ``lora_A`` multiplies by ``Theta^T``. ``Theta`` lives in :class:`PolarLayer`. Merging the
peft adapter (``merge_and_unload``) ignores ``Theta``; use :meth:`PolarLayer.delta_weight`.

Example::

    cfg = ScalaBLConfig(scoring="letter", target_modules=("q_proj", "v_proj"))
    net = AdaptedLM(lm, tok, label_words=("A", "B", "C", "D"), config=cfg, subspace=False)
    model = PolarVBLL(net, num_data=len(train))
    guide = polar_guide(model)
    fit(model, guide, train, config=TrainConfig(steps=100), callback=retract_every(model))
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch import nn

from ..guides import name_after_model
from ..layers import lora_layers
from ..model import LoRAModel, _in_shape_pass, register_adapters
from ..scoring import AdaptedLM

__all__ = ["PolarLayer", "PolarVBLL", "make_polar", "stiefel_retract", "polar_retract", "retract_every",
           "orthogonality_error", "polar_guide", "HEAD_SITE"]

HEAD_SITE = "head.W"


def stiefel_retract(m: torch.Tensor, method: str = "polar") -> torch.Tensor:
    """Map a tall ``(n, r)`` matrix to orthonormal columns (``n >= r``), computed in float64.

    ``"polar"``: ``U V^T`` of the thin SVD ``m = U S V^T`` (the nearest orthonormal matrix in Frobenius
    norm); ``"qr"``: ``Q`` of ``m = QR`` with signs fixed so that ``diag(R) > 0``.

    Example::

        Q = stiefel_retract(X + 0.1 * torch.randn_like(X))   # Q.T @ Q == I (r x r)
    """
    m64 = m.detach().double()
    if method == "polar":
        u, _, vh = torch.linalg.svd(m64, full_matrices=False)
        q = u @ vh
    elif method == "qr":
        q, r = torch.linalg.qr(m64)
        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)  # sign fix: diag(R) >= 0
    else:
        raise ValueError(f"method={method!r}; allowed: 'polar' (SVD) or 'qr'")
    return q.to(m.dtype)


class PolarLayer(nn.Module):
    """One PoLAR adapter: ``X`` (= peft ``lora_B``, weight ``(out, r)``), ``Y`` (= ``lora_A``, weight
    ``Y^T`` of shape ``(r, in)``) and ``theta`` ``(r, r)``; the update is ``X @ theta @ Y^T * scaling``."""

    def __init__(self, layer: nn.Module, *, gen: torch.Generator, adapter: str = "default"):
        super().__init__()
        self.X, self.Y = layer.lora_B[adapter], layer.lora_A[adapter]
        (r, n_in), n_out = self.Y.weight.shape, self.X.weight.shape[0]
        if min(n_in, n_out) < r:
            raise ValueError(f"PoLAR needs in, out >= r; got in={n_in}, out={n_out}, r={r}: lower r")
        self.scaling = float(layer.scaling[adapter])
        w = self.X.weight
        self.theta = nn.Parameter(torch.zeros(r, r, dtype=w.dtype, device=w.device))
        with torch.no_grad():
            bound = 1.0 / math.sqrt(n_in)  # Kaiming-uniform(a=sqrt(5)) as in peft, then orthonormalized
            ya = torch.empty(r, n_in, dtype=torch.float64).uniform_(-bound, bound, generator=gen)
            self.Y.weight.copy_(stiefel_retract(ya.T, "qr").T.to(self.Y.weight))
            self.X.weight.copy_(stiefel_retract(torch.randn(n_out, r, generator=gen, dtype=torch.float64), "qr").to(w))
        self._hook = self.Y.register_forward_hook(lambda mod, args, out: out @ self.theta.t().to(out.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``X theta Y^T * scaling``, shape ``(out, in)``."""
        return self.X.weight @ self.theta @ self.Y.weight * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Y)`` as tall matrices with orthonormal columns (after a retraction): ``(out, r)``, ``(in, r)``."""
        return self.X.weight, self.Y.weight.T


def make_polar(net: AdaptedLM, *, seed: int = 0) -> nn.ModuleDict:
    """Turn every LoRA layer of ``net`` (built with ``subspace=False``) into a :class:`PolarLayer`.

    ``X``, ``Y`` start as random orthonormal matrices and ``theta`` at 0 (the base model). Idempotent: a second
    call returns the same ``ModuleDict`` (keys: module names with ``_`` for ``.``), also kept as ``net.polar_layers``.

    Example::

        layers = make_polar(net); layers["model_layers_0_self_attn_q_proj"].theta.shape  # (r, r)
    """
    if getattr(net, "polar_layers", None) is not None:  # already converted
        return net.polar_layers
    if net.subspace is not None:
        raise ValueError("PoLAR needs an AdaptedLM built with subspace=False")
    gen = torch.Generator().manual_seed(seed)
    net.polar_layers = nn.ModuleDict({n.replace(".", "_"): PolarLayer(m, gen=gen)
                                      for n, m in lora_layers(net.peft_model).items()})
    return net.polar_layers


def _polar_layers(obj) -> nn.ModuleDict:
    layers = getattr(obj, "polar", None) or getattr(obj, "polar_layers", None) or obj
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"expected a PolarVBLL, a PoLAR AdaptedLM or make_polar()'s ModuleDict, got {type(obj)}")
    return layers


@torch.no_grad()
def polar_retract(model, method: str = "polar") -> None:
    """Retract every ``X`` and ``Y`` of ``model`` (a :class:`PolarVBLL`, net or ModuleDict) onto the Stiefel manifold, in place."""
    for layer in _polar_layers(model).values():
        layer.X.weight.copy_(stiefel_retract(layer.X.weight, method))
        layer.Y.weight.copy_(stiefel_retract(layer.Y.weight.T, method).T)


def retract_every(model, every: int = 1, method: str = "polar") -> Callable[[int, float], None]:
    """A ``fit(..., callback=...)`` callback that calls :func:`polar_retract` after every ``every``-th step.

    Example::

        fit(model, guide, train, callback=retract_every(model, 1)); assert orthogonality_error(model) < 1e-5
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")

    def callback(step: int, loss: float = float("nan")) -> None:
        if (step + 1) % every == 0:
            polar_retract(model, method)

    return callback


@torch.no_grad()
def orthogonality_error(model) -> float:
    """Max over layers of the Frobenius norms ``||X^T X - I||`` and ``||Y^T Y - I||`` (float64)."""
    mats = [m.double() for layer in _polar_layers(model).values() for m in layer.factors()]
    return max((float(torch.linalg.matrix_norm(m.T @ m - torch.eye(m.shape[1]).to(m))) for m in mats), default=0.0)


class PolarVBLL(LoRAModel):
    """PoLAR adapters (deterministic, in the param store as ``polar$$$...``) + a Bayesian class head.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` with ``subspace=False``, ``scoring="letter"``
        and no ``lm_head`` among ``target_modules``; its LoRA layers become PoLAR (:func:`make_polar`).
    :param prior_scale: std of the Gaussian prior on each head entry.
    :param centered: prior mean ``W0`` (the pretrained head rows) if ``True``, else ``0``.
    :param kl_weight: multiplies the head's log-prior (KL annealing, set by :func:`~scalabl_pyro.train.fit`).

    Sites: ``head.W`` (event shape ``(C, H)``), ``probs`` ``(B, C)`` and ``obs`` ``(B,)`` in the ``data`` plate.
    ``logits = h_last @ W^T (+ bias)``; ``P`` head samples ``(P, C, H)`` share one decoder pass giving ``h (B, H)``.

    Example::

        model = PolarVBLL(net, num_data=len(train))
        tr = poutine.trace(model).get_trace(batch, batch["labels"])   # tr.nodes["head.W"]["value"]: (C, H)
    """

    def __init__(self, net: AdaptedLM, *, prior_scale: float = 1.0, num_data: int | None = None,
                 centered: bool = True, name: str = "polar", kl_weight: float = 1.0, seed: int = 0):
        cfg = net.config
        if cfg.scoring != "letter" or "lm_head" in cfg.target_modules:
            raise ValueError("PolarVBLL needs ScalaBLConfig(scoring='letter') without 'lm_head' in target_modules, "
                             "e.g. target_modules=('q_proj', 'v_proj')")
        if not prior_scale > 0:
            raise ValueError(f"prior_scale={prior_scale!r} must be > 0")
        super().__init__(net, num_data=num_data, name=name)
        self.polar = make_polar(net, seed=seed)
        self._adapters = self.polar
        self.W0 = net.head.weight.detach().float().clone()  # (C, H)
        self.bias = None if net.head.bias is None else net.head.bias.detach().float().clone()
        self.prior_loc = self.W0 if centered else torch.zeros_like(self.W0)
        self.prior_scale, self.centered, self.kl_weight = float(prior_scale), centered, kl_weight
        self.seed = seed

    def log_prior(self, values) -> torch.Tensor:
        """``log p(W)`` of the head, for ``values = {"head.W": (C, H)}``."""
        W = values[HEAD_SITE]
        return dist.Normal(self.prior_loc.to(W), self.prior_scale).to_event(2).log_prob(W).sum()

    def run_options(self) -> dict:
        """Constructor options that :func:`~scalabl_pyro.io.save_run` records."""
        return {"prior_scale": self.prior_scale, "centered": self.centered, "seed": self.seed}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """What peft's adapter file does not hold: every ``theta`` (and ``X``, ``Y``), for :func:`save_run`."""
        return self.polar.state_dict()

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.polar.load_state_dict(state)

    latent_sites = property(lambda self: [HEAD_SITE])  # the only latent site
    latent_dim = property(lambda self: self.W0.numel())  # C * H

    def init_values(self) -> dict[str, torch.Tensor]:
        """``{"head.W": W0}``: the guide starts at the pretrained head (the zero-shot model)."""
        return {HEAD_SITE: self.W0}

    s0_values = init_values  # lets scalabl_pyro.guides.make_guide(name, model) initialize at W0

    def hidden(self, batch) -> torch.Tensor:
        """Last-position hidden states ``(B, H)``: one decoder pass (chunked by ``max_forward_batch``)."""
        net, bs, out = self.net, self.net.config.max_forward_batch, []
        for b0 in range(0, batch["input_ids"].shape[0], bs):
            ids = batch["input_ids"][b0:b0 + bs].to(net.device)
            mask = batch["attention_mask"][b0:b0 + bs].to(net.device)
            h = net._decode(input_ids=ids, attention_mask=mask, position_ids=net._positions(mask), use_cache=False)
            out.append(h.last_hidden_state[:, -1])
        return torch.cat(out)

    def head_logits(self, h: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``h (B, H)`` and heads ``W (P, C, H)`` -> logits ``(P, B, C)``."""
        logits = torch.matmul(h.to(W.dtype), W.transpose(-1, -2))
        return logits if self.bias is None else logits + self.bias.to(logits)

    def __call__(self, batch, labels=None, *, num_data: int | None = None):
        register_adapters(self.name, self._adapters)
        prior = dist.Normal(self.prior_loc.to(self.net.device), self.prior_scale).to_event(2)
        with poutine.scale(scale=self.kl_weight) if self.kl_weight != 1.0 else contextlib.nullcontext():
            W = pyro.sample(HEAD_SITE, prior)
        lead = W.shape[:-2]
        # As in ScalaBL: sample dims sit left of the data plate (rightmost lead dim 1), except that
        # Predictive(parallel=True) hands (S, C, H) without that 1.
        out_lead = lead[:-1] if lead and lead[-1] == 1 else lead
        B, C = batch["labels"].shape[0], self.num_classes
        if _in_shape_pass():  # autoguide / Predictive shape passes: skip the decoder
            logits = torch.zeros(*out_lead, B, C, device=self.net.device)
        else:
            logits = self.head_logits(self.hidden(batch), W.reshape(-1, *W.shape[-2:]))
            logits = logits.masked_fill(~batch["choice_mask"].bool(), float("-inf")).reshape(*out_lead, B, C)
        return self._likelihood(logits, labels, num_data)


def polar_guide(model: PolarVBLL, *, init_scale: float = 0.01) -> AutoNormal:
    """The default posterior: :class:`~pyro.infer.autoguide.AutoNormal` at ``W0`` with scale ``init_scale``."""
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.init_values(), fallback=init_to_median),
                       init_scale=init_scale)
    return name_after_model(guide, model)
