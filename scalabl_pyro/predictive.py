"""Posterior predictive: :func:`predict` runs :class:`pyro.infer.Predictive` over a data set.

With ``parallel=True`` the ``S`` posterior samples fold into the batch dimension, so one batch
costs one (chunked) backbone pass for all samples; the model skips the backbone in Predictive's
shape-inference passes. The result holds per-sample class probabilities, their Bayesian model
average, and the entropy decomposition (total = aleatoric + epistemic). :func:`point_guide` puts the model at
its guide's posterior median instead (a point estimate: what the Bayesian average adds is the difference).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive

from .metrics import classification_metrics, uncertainty_decomposition
from .model import PROBS_SITE

__all__ = ["Prediction", "point_guide", "predict"]


@dataclass
class Prediction:
    """Predictions on ``N`` examples from ``S`` posterior samples and ``C`` classes.

    :ivar sample_probs: ``(S, N, C)`` per-sample class probabilities.
    :ivar labels: ``(N,)`` true labels. :ivar ids: example ids.
    """

    sample_probs: torch.Tensor
    labels: torch.Tensor
    ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        u = uncertainty_decomposition(self.sample_probs)
        self.mean_probs = u["mean_probs"]  # (N, C) Bayesian model average
        self.predictive_entropy = u["predictive_entropy"]  # (N,) total
        self.expected_entropy = u["expected_entropy"]  # (N,) aleatoric
        self.mutual_information = u["mutual_information"]  # (N,) epistemic

    def metrics(self, *, n_bins: int = 15) -> dict[str, float]:
        """ACC, ECE, NLL, Brier of the averaged predictive, plus mean entropy and mutual information."""
        out = classification_metrics(self.mean_probs, self.labels, n_bins=n_bins)
        out.update(mean_entropy=float(self.predictive_entropy.mean()), mean_mi=float(self.mutual_information.mean()),
                   num_samples=int(self.sample_probs.shape[0]))
        return out


def predict(model, guide, examples: Sequence, *, num_samples: int = 10, batch_size: int = 8,
            parallel: bool = True, progress: bool = False, validate: bool = False) -> Prediction:
    """Posterior predictive class probabilities for ``examples``.

    :param model: a :class:`~scalabl_pyro.model.ScalaBL` (or :class:`~scalabl_pyro.model.LoRAModel`).
    :param guide: the trained guide; ``None`` for a model without latent sites (then ``S = 1``).
    :param examples: objects accepted by ``model.net.collate``.
    :param num_samples: ``S`` posterior samples per example.
    :param parallel: vectorize the samples (one batched forward) instead of a loop over them.
    :param validate: keep Pyro's distribution checks on (off by default: on a GPU each is a sync).

    Example::

        pred = predict(model, guide, test.examples, num_samples=10)
        pred.metrics()["ece"], pred.mutual_information.shape  # (N,)
    """
    if len(examples) == 0:
        raise ValueError("predict() got no examples")
    if guide is None and getattr(model, "latent_sites", ()):
        raise ValueError("this model has latent sites: pass its trained guide")
    S = num_samples if guide is not None else 1
    predictive = Predictive(model, guide=guide, num_samples=S, parallel=parallel, return_sites=(PROBS_SITE,))
    chunks, labels, ids = [], [], []
    it = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"predict ({S} samples)", leave=False)
    with torch.no_grad(), pyro.validation_enabled(validate):
        for i in it:
            part = examples[i:i + batch_size]
            batch = model.net.collate(part)
            # Labels are passed so that a guide run here for the first time sees `obs` as observed;
            # the probabilities do not depend on them.
            probs = predictive(batch, batch["labels"])[PROBS_SITE]
            chunks.append(probs.reshape(S, len(part), -1).float().cpu())
            labels.append(batch["labels"])
            ids.extend(str(getattr(ex, "id", i + j)) for j, ex in enumerate(part))
    return Prediction(torch.cat(chunks, 1), torch.cat(labels), ids)


def point_guide(guide):
    """A guide that puts every latent site at ``guide``'s posterior median (a ``Delta``; no randomness).

    ``predict(model, point_guide(guide), examples, num_samples=1)`` is the fitted model at its point estimate
    (for AutoNormal the posterior mean of ``s``): set beside ``predict(model, guide, ...)`` it shows what
    averaging over the posterior adds to the calibration. The median is taken once, when this is called.

    :param guide: a trained guide with a ``median()`` (Pyro's autoguides: AutoNormal, AutoDelta,
        AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoLaplaceApproximation's posterior, ...).

    Example::

        at_mean = predict(model, point_guide(guide), test.examples, num_samples=1).metrics()
    """
    if not callable(getattr(guide, "median", None)):
        raise TypeError(f"point_guide needs a guide with a median() (an autoguide such as AutoNormal); "
                        f"{type(guide).__name__} has none")
    try:
        with torch.no_grad():
            med = {site: v.detach() for site, v in guide.median().items()}
    except NotImplementedError as e:  # e.g. AutoIAFNormal: no closed-form median
        raise TypeError(f"point_guide needs a guide with a median(); {type(guide).__name__}'s is not "
                        "implemented. Use AutoNormal or another guide with a closed-form median") from e

    def at_median(*args, **kwargs):
        return {site: pyro.sample(site, dist.Delta(v, event_dim=v.dim())) for site, v in med.items()}
    return at_median
