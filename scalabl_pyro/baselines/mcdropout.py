"""MC dropout (Gal and Ghahramani 2016) for LoRA: adapter dropout kept on at test time, ``S`` stochastic forwards
of every batch in one batched pass.

Example::

    pred = predict_mc_dropout(net, test.examples, num_samples=10)   # a Prediction: pred.metrics()
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..predictive import Prediction
from ..scoring import AdaptedLM

__all__ = ["predict_mc_dropout"]


def predict_mc_dropout(net: AdaptedLM, examples: Sequence, *, num_samples: int = 10, batch_size: int = 8) -> Prediction:
    """``num_samples`` forwards of every example with the LoRA dropout on (``ScalaBLConfig(lora_dropout=p)``).

    :returns: a :class:`~scalabl_pyro.predictive.Prediction` with ``sample_probs`` of shape ``(S, N, C)``.
    """
    S = num_samples
    chunks, labels, ids = [], [], []
    net.peft_model.train()  # dropout on (the backbone has no dropout of its own in eval-equivalent configs)
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                part = examples[i:i + batch_size]
                batch = net.collate(part)
                chunks.append(net.logits(batch, repeats=S).softmax(-1).float().cpu())
                labels.append(batch["labels"])
                ids.extend(str(getattr(ex, "id", "")) for ex in part)
    finally:
        net.peft_model.eval()
    return Prediction(torch.cat(chunks, 1), torch.cat(labels), ids)
