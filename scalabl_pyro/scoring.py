"""The architecture: a causal LM with LoRA adapters that maps a batch of questions to class logits.

Two ways to turn a multiple-choice question into ``C`` class logits (``ScalaBLConfig.scoring``):

* ``"letter"`` (reference protocol): the prompt lists the choices and ends with ``Answer:``;
  the logits are the output head's rows for the answer tokens (``" A"``, ``" B"``...) at the last
  position. The head is cut down to those rows, as in Laplace-LoRA and the official ScalaBL code.
* ``"choice"``: ``logit_k = log p(continuation_k | context)``, summed over the continuation's
  tokens (optionally divided by its token or character count). With ``prefix_cache`` the context
  runs once and its key/value cache serves every choice.

Batches of several ``s`` vectors (particles / posterior samples, ``P`` of them) are folded into the
batch dimension particle-major: rows ``(P, B)`` for contexts and ``(P, B, C)`` for continuations, so
every choice of a question is scored with the same ``s``. Sites given a single value ``(1, r)`` while
others have ``P`` are shared; when every site below some decoder layer is shared (a partial-Bayesian
model), those layers run once on ``B`` rows (:mod:`scalabl_pyro.trunk`).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Mapping, Sequence

import torch
from torch import nn

from .backbones import keep_quantized_differentiable
from .config import ScalaBLConfig
from .layers import Subspace, add_lora
from .trunk import decoder_layers, expand_at, module_depths

__all__ = ["AdaptedLM"]


def _single_token(tokenizer, word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"The answer word {word!r} is {len(ids)} tokens (' {word}' -> {ids}) for this tokenizer; the letter format "
            "needs one token per answer. Use scoring='choice' or answer words that are single tokens."
        )
    return ids[0]


def _cache_kwarg(decoder: nn.Module) -> str:
    """Name of the decoder's key/value-cache argument (and output field): ``"cache"`` from transformers 5.24
    on, ``"past_key_values"`` before (5.24 still accepts it with a FutureWarning; 5.40 drops it)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class AdaptedLM:
    """A Hugging Face causal LM with (subspace) LoRA adapters, scoring multiple-choice batches.

    :param backbone: a frozen causal LM (see :func:`~scalabl_pyro.backbones.load_backbone`); it is modified in place.
    :param tokenizer: its tokenizer.
    :param label_words: answer words of the task, one per class (``("A", "B", "C", "D")``).
    :param config: adapter and scoring options.
    :param subspace: ``True`` for ScalaBL (``A = diag(s) V``), ``False`` for plain LoRA, ``"A"`` for a latent
        full ``A`` (BLoB).
    :param seed: seeds the adapter initialization.

    Example::

        net = AdaptedLM(model, tok, label_words=("A", "B", "C", "D"), config=ScalaBLConfig(scoring="choice"))
        batch = net.collate(task.examples[:8])
        logits = net.logits(batch, s={k: v[None] for k, v in net.subspace.s0.items()})  # (1, 8, 4)
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, label_words: Sequence[str],
                 config: ScalaBLConfig = ScalaBLConfig(), subspace: bool | str = True, seed: int = 0):
        if len(label_words) < 2:
            raise ValueError(f"label_words={tuple(label_words)!r}: a classification task needs at least 2 classes")
        self.config = config
        self.seed = seed  # of the adapters' initialization (V, s0): save_run records it
        self.tokenizer = tokenizer
        self.label_words = tuple(label_words)
        self.num_classes = len(label_words)
        backbone.requires_grad_(False)
        backbone.eval()
        keep_quantized_differentiable(backbone)  # bitsandbytes 4-bit on the CPU: gradients survive evaluations
        if config.scoring == "letter":
            ids = [_single_token(tokenizer, w) for w in self.label_words]
            if len(set(ids)) != len(ids):
                raise ValueError(f"label_words {self.label_words} map to repeated tokens {ids}")
            head = backbone.get_output_embeddings()
            cut = nn.Linear(head.in_features, len(ids), bias=head.bias is not None,
                            dtype=head.weight.dtype, device=head.weight.device)
            with torch.no_grad():
                cut.weight.copy_(head.weight[ids])
                if head.bias is not None:
                    cut.bias.copy_(head.bias[ids])
            cut.requires_grad_(False)
            backbone.config.tie_word_embeddings = False
            backbone.set_output_embeddings(cut)
            self.label_token_ids = ids
        self.peft_model = add_lora(backbone, config, seed=seed)
        self.peft_model.eval()  # peft's new dropout layers start in training mode; MC dropout turns them on itself
        self.subspace = (Subspace(self.peft_model, latent="A" if subspace == "A" else "s")
                         if subspace else None)
        hf = self.peft_model.get_base_model()
        self.decoder = getattr(hf, hf.base_model_prefix)
        self.head = hf.get_output_embeddings()
        self._cache_kw = _cache_kwarg(self.decoder)
        self._layers = decoder_layers(self.decoder)
        #: decoder blocks (``L``); modules after them (``lm_head``) have depth ``L`` in :attr:`site_depths`
        self.num_layers = len(self._layers) if self._layers is not None else 0
        #: ``{site: depth}``: the decoder layer holding each latent site's module (see :mod:`scalabl_pyro.trunk`)
        self.site_depths = (module_depths(self.decoder, {k: v.layer for k, v in self.subspace.sites.items()})
                            if self.subspace is not None else {})
        if config.gradient_checkpointing:
            self._enable_checkpointing(hf)
        self.forward_calls = 0  # backbone (decoder) calls
        self.forward_rows = 0  # sequences through the decoder

    def _enable_checkpointing(self, hf) -> None:
        """Transformers' activation checkpointing (non-reentrant) of every decoder layer, with the ``s`` values of
        each layer call restored for its recomputation (``context_fn``), and the layers' own ``training`` flag on
        (transformers checkpoints only layers in training mode; their dropout modules stay in eval mode)."""
        if not getattr(hf, "supports_gradient_checkpointing", False) or self._layers is None:
            raise ValueError(f"{type(hf).__name__} does not support gradient checkpointing; "
                             "use ScalaBLConfig(gradient_checkpointing=False)")
        sub = self.subspace

        def contexts():
            values = sub._values if sub is not None else None
            return contextlib.nullcontext(), (sub.use(values) if values is not None else contextlib.nullcontext())

        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                            "context_fn": contexts})
        for layer in self._layers:
            layer.training = True  # the flag transformers reads; children (dropout, attention) keep eval mode

    @property
    def device(self) -> torch.device:
        """Where the backbone's parameters live; :meth:`logits` moves batches and ``s`` there."""
        return next(self.peft_model.parameters()).device

    # ------------------------------------------------------------------ data
    def collate(self, examples: Sequence) -> dict[str, torch.Tensor]:
        """Tokenize examples (objects with ``prompt``, ``context``, ``continuations``, ``choices``, ``label``).

        :returns: a dict of tensors; ``labels`` (B,), ``choice_mask`` (B, C) and, for the letter format,
            ``input_ids``/``attention_mask`` (B, L), for the choice format ``ctx_ids``/``ctx_mask`` (B, Lc),
            ``cont_ids``/``cont_mask`` (B, C, Lk), ``cont_chars`` (B, C) and ``cont_index`` (T,): the flat
            positions in ``(B, C, Lk)`` of the ``T`` real continuation tokens, so that scoring selects them
            without reading the mask back from the device (boolean-mask indexing would make the host wait).
        """
        if len(examples) == 0:
            raise ValueError("empty batch: the data set has no examples")
        C = self.num_classes
        for ex in examples:
            n = len(ex.choices)
            if n > C or n < 1:
                raise ValueError(f"example {ex.id!r} has {n} choices; this task allows 1..{C} (label_words={self.label_words})")
            if not 0 <= ex.label < n:
                raise ValueError(f"example {ex.id!r}: label {ex.label} is outside its {n} choices (allowed 0..{n - 1})")
        tok = self.tokenizer
        batch = {
            "labels": torch.tensor([ex.label for ex in examples], dtype=torch.long),
            "choice_mask": torch.tensor([[k < len(ex.choices) for k in range(C)] for ex in examples]),
        }
        if self.config.scoring == "letter":
            tok.padding_side, tok.truncation_side = "left", "left"
            enc = tok([ex.prompt for ex in examples], padding=True, truncation=True,
                      max_length=self.config.max_length, return_tensors="pt")
            batch["input_ids"], batch["attention_mask"] = enc["input_ids"], enc["attention_mask"]
            return batch
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ctxs, conts = [], []
        for ex in examples:
            ids = tok(ex.context, add_special_tokens=False)["input_ids"] if ex.context else []
            ctxs.append(ids or [start])
            row = []
            for k, text in enumerate(ex.continuations):
                cids = tok(text, add_special_tokens=False)["input_ids"]
                if not cids:
                    raise ValueError(f"example {ex.id!r}: choice {k} ({ex.choices[k]!r}) tokenizes to nothing; "
                                     "fix or drop this choice")
                row.append(cids)
            conts.append(row)
        lk = max(len(c) for row in conts for c in row)
        lc = min(max(len(c) for c in ctxs), max(1, self.config.max_length - lk))
        pad = tok.pad_token_id
        # padded rows built as Python lists, one tensor per field: a handful of ops per batch, not a few per example
        ctx_ids, ctx_mask, cont_ids, cont_mask, cont_chars = [], [], [], [], []
        index = []  # flat positions of the real continuation tokens in (B, C, Lk), from the host's lists
        for i, (c, row) in enumerate(zip(ctxs, conts)):
            c = c[-lc:]
            ctx_ids.append([pad] * (lc - len(c)) + c)
            ctx_mask.append([0] * (lc - len(c)) + [1] * len(c))
            ids_i, mask_i, chars_i = [], [], []
            for k in range(C):
                cids = row[k] if k < len(row) else []
                ids_i.append(cids + [pad] * (lk - len(cids)))
                mask_i.append([1] * len(cids) + [0] * (lk - len(cids)))
                chars_i.append(float(max(1, len(examples[i].continuations[k]))) if k < len(row) else 1.0)
                index.extend(range((i * C + k) * lk, (i * C + k) * lk + len(cids)))
            cont_ids.append(ids_i)
            cont_mask.append(mask_i)
            cont_chars.append(chars_i)
        long = torch.long
        batch.update(ctx_ids=torch.tensor(ctx_ids, dtype=long), ctx_mask=torch.tensor(ctx_mask, dtype=long),
                     cont_ids=torch.tensor(cont_ids, dtype=long), cont_mask=torch.tensor(cont_mask, dtype=long),
                     cont_chars=torch.tensor(cont_chars), cont_index=torch.tensor(index, dtype=long))
        return batch

    # --------------------------------------------------------------- forward
    def logits(self, batch: Mapping[str, torch.Tensor], *, s: Mapping[str, torch.Tensor] | None = None,
               prefix_cache: bool | None = None, repeats: int = 1, share_trunk: bool = True) -> torch.Tensor:
        """Class logits for every particle and question, shape ``(P, B, C)``.

        :param s: ``{site: (P, *event)}`` latent values (required for ScalaBL/BLoB, ``None`` for plain LoRA);
            a site given one value ``(1, *event)`` while others have ``P > 1`` is shared by every particle.
        :param repeats: without ``s``: evaluate ``P = repeats`` stochastic copies (MC dropout) in one pass.
        :param prefix_cache: override ``config.prefix_cache`` (choice format only).
        :param share_trunk: when every site below some decoder layer is shared, run those layers once on
            ``B`` rows and repeat their output ``P`` times (:mod:`scalabl_pyro.trunk`); ``False``: ``P * B``
            rows all the way (the same numbers, more compute).
        Absent choices (``choice_mask`` False) get ``-inf``.
        """
        if self.subspace is not None and s is None:
            raise ValueError("this ScalaBL network needs s values: call it through the ScalaBL Pyro model")
        dev = self.device
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        if s is not None:
            s = {k: v.to(dev) for k, v in s.items()}
        split = None
        if s is None:
            P = repeats
        else:
            P = max(v.shape[0] for v in s.values())
            if share_trunk and P > 1:
                depth = min(self.site_depths.get(k, -1) for k, v in s.items() if v.shape[0] > 1)
                split = depth if depth > 0 else None  # layers [0, split) see no particle-specific value
        B = batch["labels"].shape[0]
        C = self.num_classes
        per_question = 1 if self.config.scoring == "letter" else C
        budget = self.config.max_forward_batch
        if split is None:
            pc = max(1, budget // (B * per_question))  # particles per chunk
            bc = B if pc > 1 or B * per_question <= budget else max(1, budget // per_question)
        else:  # shared trunk: every particle in each chunk (the trunk runs once per question), chunks of questions
            pc, bc = P, min(B, max(1, budget // (P * per_question)))
        use_cache = self.config.prefix_cache if prefix_cache is None else prefix_cache
        outs = []
        for p0 in range(0, P, pc):
            p1 = min(P, p0 + pc)
            parts = []
            for b0 in range(0, B, bc):
                # cont_index addresses the whole batch: a row chunk falls back to the mask
                sub = {k: v if bc == B else v[b0:b0 + bc] for k, v in batch.items() if k != "cont_index" or bc == B}
                if s is None:
                    parts.append(self._forward(sub, p1 - p0, use_cache))
                else:
                    chunk = {k: v if v.shape[0] == 1 else v[p0:p1] for k, v in s.items()}
                    with self.subspace.use(chunk):
                        parts.append(self._forward(sub, p1 - p0, use_cache, split))
            outs.append(torch.cat(parts, dim=1))
        logits = torch.cat(outs, dim=0)
        return logits.masked_fill(~batch["choice_mask"].bool(), float("-inf"))

    def _decode(self, **kw):
        self.forward_calls += 1
        self.forward_rows += kw["input_ids"].shape[0]
        return self.decoder(**kw)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _decode_p(self, p: int, split: int | None, **kw):
        """``(last hidden state with p * rows rows, output)``: the inputs ``kw`` hold ``p * rows`` rows
        (``split`` None), or ``rows`` rows that are repeated on the way into decoder layer ``split``."""
        if split is None:
            out = self._decode(**kw)
            return out.last_hidden_state, out
        if split < self.num_layers:
            with expand_at(self._layers, split, p):
                out = self._decode(**kw)
            return out.last_hidden_state, out
        out = self._decode(**kw)  # only modules after the decoder (lm_head) vary
        h = out.last_hidden_state
        return h.repeat((p,) + (1,) * (h.dim() - 1)), out

    def _forward(self, batch, p: int, use_cache: bool, split: int | None = None) -> torch.Tensor:
        if self.config.scoring == "letter":
            rep = p if split is None else 1
            ids, mask = batch["input_ids"].repeat(rep, 1), batch["attention_mask"].repeat(rep, 1)
            h, _ = self._decode_p(p, split, input_ids=ids, attention_mask=mask, position_ids=self._positions(mask),
                                  use_cache=False)
            return self.head(h[:, -1]).float().view(p, -1, self.num_classes)
        return self._choice_scores(batch, p, use_cache, split)

    def _choice_scores(self, batch, p: int, use_cache: bool, split: int | None = None) -> torch.Tensor:
        C = self.num_classes
        rep = p if split is None else 1  # rows fed to the decoder: p blocks, or one shared block
        ctx, cmask = batch["ctx_ids"].repeat(rep, 1), batch["ctx_mask"].repeat(rep, 1)  # (rep*b, Lc)
        b, lk = batch["cont_ids"].shape[0], batch["cont_ids"].shape[-1]
        cont_in = batch["cont_ids"].reshape(b * C, lk)
        kmask_in = batch["cont_mask"].reshape(b * C, lk)
        cont, kmask = cont_in.repeat(p, 1), kmask_in.repeat(p, 1)  # (p*b*C, Lk), particle-major
        cont_in, kmask_in = cont_in.repeat(rep, 1), kmask_in.repeat(rep, 1)
        full_mask = torch.cat([cmask.repeat_interleave(C, 0), kmask_in], dim=-1)
        if use_cache:
            last, out = self._decode_p(p, split, input_ids=ctx, attention_mask=cmask,
                                       position_ids=self._positions(cmask), use_cache=True)
            cache = getattr(out, self._cache_kw)
            cache.batch_repeat_interleave(C)
            start = cmask.sum(-1).repeat_interleave(C)[:, None]
            pos = start + torch.arange(lk, device=start.device)
            h, _ = self._decode_p(p, split, input_ids=cont_in, attention_mask=full_mask, position_ids=pos,
                                  use_cache=True, **{self._cache_kw: cache})
            pred = torch.cat([last[:, -1:].repeat_interleave(C, 0), h[:, :-1]], dim=1)
        else:
            ids = torch.cat([ctx.repeat_interleave(C, 0), cont_in], dim=-1)
            h, _ = self._decode_p(p, split, input_ids=ids, attention_mask=full_mask,
                                  position_ids=self._positions(full_mask), use_cache=False)
            lc = ctx.shape[-1]
            pred = h[:, lc - 1: lc + lk - 1]
        index = batch.get("cont_index")
        if index is None:  # a row chunk of a large batch: boolean-mask indexing (one host read of the mask)
            sel = kmask.bool()
            logp = torch.log_softmax(self.head(pred[sel]).float(), dim=-1)
            tok_lp = logp.gather(-1, cont[sel][:, None]).squeeze(-1)
            scores = torch.zeros(sel.shape, dtype=tok_lp.dtype, device=tok_lp.device).masked_scatter(sel, tok_lp)
        else:  # the same tokens in the same order, selected by collate's index: no host read
            n = b * C * lk
            flat = (index + n * torch.arange(p, device=index.device)[:, None]).reshape(-1)  # particle-major
            logp = torch.log_softmax(self.head(pred.reshape(-1, pred.shape[-1]).index_select(0, flat)).float(), dim=-1)
            tok_lp = logp.gather(-1, cont.reshape(-1).index_select(0, flat)[:, None]).squeeze(-1)
            scores = torch.zeros(p * n, dtype=tok_lp.dtype, device=tok_lp.device).index_put((flat,), tok_lp)
        scores = scores.view(p * b * C, lk).sum(-1)
        if self.config.normalize == "tokens":
            scores = scores / kmask.sum(-1).clamp(min=1)
        elif self.config.normalize == "chars":
            scores = scores / batch["cont_chars"].reshape(b * C).repeat(p).to(scores.dtype)
        return scores.view(p, b, C)

    # ----------------------------------------------------------- parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA projections (``A``/``V`` and ``B``) — the only trainable backbone tensors."""
        return [p for p in self.peft_model.parameters() if p.requires_grad]

    def adapters(self) -> nn.ModuleDict:
        """The LoRA modules only (for ``pyro.module``): ``{module: {"A"|"V": lora_A, "B": lora_B}}``."""
        if self.subspace is not None:
            return self.subspace.adapters()
        from .layers import lora_layers

        return nn.ModuleDict({
            n.replace(".", "_"): nn.ModuleDict({"A": m.lora_A["default"], "B": m.lora_B["default"]})
            for n, m in lora_layers(self.peft_model).items()
        })
