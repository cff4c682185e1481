"""Shared-trunk evaluation: run the deterministic lower decoder layers once for all posterior samples.

When only some modules are stochastic (``ScalaBL(net, stochastic=...)``, e.g. :func:`last_layers`: the last
``K`` decoder layers and ``lm_head``), every sample ``s`` gives the same hidden states below the lowest
decoder layer that holds a stochastic module, the *split*. :class:`~scalabl_pyro.scoring.AdaptedLM` then feeds
the decoder ``B`` rows instead of ``P * B`` and :func:`expand_at` repeats the hidden states (and the per-row
arguments of the layer: attention mask, position ids, rotary embeddings) ``P`` times, particle-major, on the
way into the split layer. In the choice format with the prefix cache the layers below the split keep a
``B``-row key/value cache and the layers above a ``P * B``-row one, so the context's cache serves every
sample too. The result equals the unshared computation (``tests/test_trunk.py``: to 1e-5).

A module's *depth* is the index of the decoder layer that holds it; modules after the decoder (``lm_head``)
have depth ``L`` (the number of layers), modules before it (embeddings) depth ``-1``.

Example::

    names = last_layers(net, 2)              # modules of the last 2 decoder layers + lm_head
    model = ScalaBL(net, stochastic=names)   # the other modules are plain LoRA (s fixed at s0)
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["decoder_layers", "module_depths", "last_layers", "expand_at"]

def decoder_layers(decoder: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of transformer blocks (``decoder.layers`` for Llama, ``h`` for GPT-2...), or None.

    It is the longest ``nn.ModuleList`` child whose length is ``config.num_hidden_layers`` when the decoder
    has a config, else the longest one.
    """
    n = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList) and len(m)]
    if n is not None:
        lists = [m for m in lists if len(m) == n] or lists
    return max(lists, key=len) if lists else None


def module_depths(decoder: nn.Module, modules: dict[str, nn.Module]) -> dict[str, int]:
    """``{name: depth}`` for ``modules`` (e.g. the subspace's peft LoRA layers): the decoder layer index that
    holds each, ``L`` for modules outside the decoder (the output head), ``-1`` for modules inside the decoder
    but in no layer (embeddings)."""
    layers = decoder_layers(decoder)
    where: dict[int, int] = {}
    if layers is not None:
        for i, block in enumerate(layers):
            for m in block.modules():
                where[id(m)] = i
    inside = {id(m) for m in decoder.modules()}
    L = len(layers) if layers is not None else 0
    return {k: where.get(id(m), -1 if id(m) in inside else L) for k, m in modules.items()}


def last_layers(net, k: int, *, head: bool = True) -> tuple[str, ...]:
    """Names of the adapted modules in the last ``k`` decoder layers (and, with ``head``, after the decoder:
    ``lm_head``), in module order: the ``stochastic=`` argument of a partial-Bayesian
    :class:`~scalabl_pyro.model.ScalaBL`.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace=True``.
    :param k: number of top decoder layers, ``0 <= k <= L``.

    Example::

        last_layers(net, 2)  # ('model.layers.28.self_attn.q_proj', ..., 'lm_head') for a 30-layer Llama
    """
    if net.subspace is None:
        raise ValueError("last_layers needs an AdaptedLM built with subspace=True")
    depths = net.site_depths
    L = net.num_layers
    if not isinstance(k, int) or not 0 <= k <= L:
        raise ValueError(f"k={k!r}: choose 0 <= k <= {L} (the backbone's decoder layers)")
    names = tuple(v.module_name for site, v in net.subspace.sites.items()
                  if L - k <= depths[site] < L or (head and depths[site] >= L))
    if not names:
        raise ValueError(f"no adapted module in the last {k} layers{' or after the decoder' if head else ''}; "
                         f"the adapted modules are {[v.module_name for v in net.subspace.sites.values()][:4]}...")
    return names


def _repeat_rows(x, rows: int, p: int):
    if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == rows:
        return x.repeat((p,) + (1,) * (x.dim() - 1))
    if isinstance(x, tuple):
        return tuple(_repeat_rows(v, rows, p) for v in x)
    return x


@contextlib.contextmanager
def expand_at(layers: nn.ModuleList, split: int, p: int) -> Iterator[None]:
    """Repeat the inputs of ``layers[split]`` ``p`` times along the batch, particle-major (rows ``(p, B)``).

    The hidden states and every per-row keyword argument (attention mask, position ids, the ``(cos, sin)``
    rotary pair, computed once by the decoder for all layers) are repeated on the way into ``layers[split]``,
    and the keyword arguments again for every later layer; size-1 (shared) tensors broadcast as they are.
    Masks the layer gets in another form (e.g. a flex-attention ``BlockMask``) raise a clear error.
    """
    def make(first: bool):
        def pre_hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            rows = h.shape[0] if first else h.shape[0] // p  # the decoder's own batch
            mask = kwargs.get("attention_mask")
            if mask is not None and not torch.is_tensor(mask):
                raise NotImplementedError(
                    f"the shared trunk cannot repeat an attention mask of type {type(mask).__name__}; "
                    "call net.logits(..., share_trunk=False) or use attn_implementation='sdpa'/'eager'")
            if first and args:
                args = (_repeat_rows(args[0], rows, p),) + tuple(args[1:])
            kwargs = {k: (_repeat_rows(v, rows, p) if k in _PER_ROW and (first or k != "hidden_states") else v)
                      for k, v in kwargs.items()}
            return args, kwargs

        return pre_hook

    handles = [layers[i].register_forward_pre_hook(make(i == split), with_kwargs=True)
               for i in range(split, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


_PER_ROW = ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
