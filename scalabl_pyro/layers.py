"""LoRA layers and the ScalaBL subspace re-parameterization.

peft injects ordinary LoRA layers (``lora_A``: in -> r, ``lora_B``: r -> out). ScalaBL writes
``A = diag(s) V``: :class:`Subspace` sets ``lora_A.weight = V`` (right-singular vectors of a
Kaiming-initialized r x in matrix; its singular values are ``s0``) and registers a forward hook
on ``lora_A`` that multiplies its output by ``s``. The adapter update is therefore
``B((x @ V.T) * s) * scaling`` in one pass through ``B``.

Several ``s`` vectors (ELBO particles, posterior samples) are evaluated in one batched forward:
``s`` has shape ``(P, r)`` and the batch holds ``P`` blocks of rows, particle-major; the hook
multiplies block ``p`` by ``s[p]``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from .config import ScalaBLConfig

__all__ = ["add_lora", "lora_layers", "site_name", "Subspace", "SubspaceSite", "SITE_PREFIX"]

_PEFT_PREFIX = "base_model.model."

#: Every latent site is named ``"lora.<module>.<latent>"``, e.g. ``lora.model.layers.3.self_attn.q_proj.s``.
#: The fixed first component keeps site names off every autoguide attribute (``AutoGuide.model`` in
#: particular: Pyro's ``AutoDelta`` stores site ``a.b`` at attribute path ``a.b`` of the guide).
SITE_PREFIX = "lora."


def site_name(module_name: str, latent: str = "s") -> str:
    """The latent site of an adapted module: ``site_name("lm_head") == "lora.lm_head.s"`` (``latent="A"``: BLoB)."""
    return f"{SITE_PREFIX}{module_name}.{latent}"


def _linear_names(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}
    return sorted(names)


def add_lora(backbone: nn.Module, config: ScalaBLConfig, *, seed: int = 0):
    """Wrap ``backbone`` with peft LoRA adapters as described by ``config``.

    The backbone stays frozen; only ``lora_A``/``lora_B`` train. A tied output head is untied
    first (its weight is shared, unchanged) so that an adapter on ``lm_head`` leaves the input
    embeddings alone.

    :returns: a :class:`peft.PeftModel`.

    Example::

        peft_model = add_lora(model, ScalaBLConfig(r=8))
    """
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in backbone.named_modules()}
    missing = [t for t in config.target_modules if t not in present]
    if missing:  # a misspelt name (v_prj) must not silently adapt fewer layers
        raise ValueError(
            f"The model has no module named {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
            + f" among target_modules={list(config.target_modules)}. Its linear layers are named: "
            f"{_linear_names(backbone)}; pass some of them as target_modules."
        )
    found = list(config.target_modules)
    if "lm_head" in config.target_modules and getattr(backbone.config, "tie_word_embeddings", False):
        backbone.config.tie_word_embeddings = False
        text_cfg = getattr(backbone.config, "get_text_config", lambda: None)()
        if text_cfg is not None and hasattr(text_cfg, "tie_word_embeddings"):
            text_cfg.tie_word_embeddings = False
    lcfg = LoraConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=list(found), lora_dropout=config.lora_dropout,
        bias="none", task_type="CAUSAL_LM",  # so that AutoPeftModelForCausalLM loads exported adapters
    )
    # peft draws the adapters on the CPU (then moves them to the layer's device): the same seed gives the
    # same start on any device.
    with torch.random.fork_rng(), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning from transformers
        # 5.x on every call, not about anything the user did); only that one message is silenced
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        return get_peft_model(backbone, lcfg)


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``peft_model`` keyed by the backbone's own module name.

    Example::

        list(lora_layers(pm))[:1] == ["model.layers.0.self_attn.q_proj"]
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = module
    return out


@dataclass
class SubspaceSite:
    """One adapted module: latent site ``site`` (``"lora." + module_name + ".s"``, or ``".A"`` for BLoB)."""

    module_name: str
    site: str
    layer: nn.Module  # peft LoraLayer
    lora_A: nn.Linear  # weight = V, shape (r, in)
    lora_B: nn.Linear  # weight = B, shape (out, r)
    s0: torch.Tensor  # initial latent value: (r,) singular values, or (r, in) Kaiming A for BLoB

    @property
    def r(self) -> int:
        return self.lora_A.out_features

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.s0.shape)


class Subspace:
    """The ScalaBL re-parameterization ``A = diag(s) V`` of every LoRA layer of a peft model.

    :param peft_model: model returned by :func:`add_lora` (adapter ``"default"``).

    Use :meth:`use` to set the ``s`` values for a forward pass; a forward without them raises.

    Example::

        sub = Subspace(add_lora(model, ScalaBLConfig()))
        with sub.use({name: s0[None] for name, s0 in sub.s0.items()}):
            out = sub.peft_model(input_ids)
    """

    def __init__(self, peft_model: nn.Module, *, adapter: str = "default", latent: str = "s"):
        if latent not in ("s", "A"):
            raise ValueError(f"latent={latent!r}; allowed: 's' (ScalaBL) or 'A' (BLoB)")
        self.latent = latent
        self.peft_model = peft_model
        self.sites: dict[str, SubspaceSite] = {}
        self._values: Mapping[str, torch.Tensor] | None = None
        self._handles = []
        for name, layer in lora_layers(peft_model).items():
            lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
            r, n_in = lora_A.weight.shape
            if latent == "A":
                site = site_name(name, "A")
                lora_A.weight.requires_grad_(False)  # A is the latent; lora_A.weight is unused
                self.sites[site] = SubspaceSite(name, site, layer, lora_A, lora_B, lora_A.weight.detach().clone())
                self._handles.append(lora_A.register_forward_hook(self._make_hook(site)))
                continue
            if n_in < r:
                raise ValueError(f"{name}: in_features={n_in} is smaller than r={r}; lower r or drop this module")
            with torch.no_grad():
                # On CPU in float64, with a fixed sign per row (largest entry positive): SVD signs differ
                # between backends, and the same seed must give the same V on any device.
                _, s0, vh = torch.linalg.svd(lora_A.weight.detach().double().cpu(), full_matrices=False)
                vh = vh * vh.gather(1, vh.abs().argmax(1, keepdim=True)).sign()
                lora_A.weight.copy_(vh.to(lora_A.weight))
                s0 = s0.to(device=lora_A.weight.device, dtype=torch.float32)
            site = site_name(name, "s")
            self.sites[site] = SubspaceSite(name, site, layer, lora_A, lora_B, s0.detach().clone())
            self._handles.append(lora_A.register_forward_hook(self._make_hook(site)))

    @property
    def s0(self) -> dict[str, torch.Tensor]:
        """Initial ``s`` per site (the singular values): ``{site: (r,)}``, on the adapter's device."""
        return {k: v.s0.to(v.lora_A.weight.device) for k, v in self.sites.items()}

    def adapters(self) -> nn.ModuleDict:
        """The trainable projections only (``V`` and ``B`` per site; ``B`` only for BLoB), for ``pyro.module``."""
        return nn.ModuleDict({
            v.module_name.replace(".", "_"): nn.ModuleDict(
                {"B": v.lora_B} if self.latent == "A" else {"V": v.lora_A, "B": v.lora_B})
            for v in self.sites.values()
        })

    @contextlib.contextmanager
    def use(self, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Evaluate with ``values[site]`` of shape ``(P, *event_shape)`` for every site."""
        missing = sorted(set(self.sites) - set(values))
        if missing:
            raise KeyError(f"no s value for sites {missing[:3]}{'...' if len(missing) > 3 else ''}")
        prev, self._values = self._values, values
        try:
            yield
        finally:
            self._values = prev

    def _make_hook(self, site: str):
        def hook(module, args, out):
            if self._values is None:
                raise RuntimeError(
                    f"{site}: the ScalaBL subspace needs s values. Run the backbone through the ScalaBL Pyro "
                    "model (or inside `with subspace.use(values)`)."
                )
            s = self._values[site]
            if self.latent == "A":
                return self._apply_A(site, args[0], s, out)
            if s.dim() != 2:
                s = s.reshape(-1, s.shape[-1])
            s = s.to(device=out.device, dtype=out.dtype)
            p = s.shape[0]
            if p == 1:  # (1, r) broadcasts against (..., r): no select, one op less (and its backward)
                return out * s
            if out.shape[0] % p:
                raise RuntimeError(f"{site}: batch of {out.shape[0]} rows is not a multiple of {p} particles")
            shape = (p, out.shape[0] // p) + out.shape[1:]
            return (out.reshape(shape) * s.reshape((p,) + (1,) * (out.dim() - 1) + (s.shape[-1],))).reshape(out.shape)

        return hook

    @staticmethod
    def _apply_A(site, x, a, out):
        a = a.reshape((-1,) + a.shape[-2:]).to(device=x.device, dtype=x.dtype)  # (P, r, in)
        p = a.shape[0]
        if x.shape[0] % p:
            raise RuntimeError(f"{site}: batch of {x.shape[0]} rows is not a multiple of {p} particles")
        y = torch.matmul(x.reshape(p, -1, x.shape[-1]), a.transpose(-1, -2))  # (P, rows, r)
        return y.reshape(out.shape)

    def remove(self) -> None:
        """Remove the hooks (the LoRA layers become plain LoRA with ``A = V``)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
