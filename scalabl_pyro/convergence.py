"""Has the variational posterior converged? What :func:`~scalabl_pyro.train.fit` records and checks.

Every ``monitor_every`` steps ``fit`` records, in its :class:`~scalabl_pyro.train.FitResult`,

* ``kl``: a Monte Carlo estimate of ``KL(q || p)`` over all latent sites, per training example
  (``E_q[log q(s) - log p(s)] / N``, from ``draws`` guide samples; the ELBO's KL term),
* ``scale``: the median posterior standard deviation over all latent coordinates (from the same draws).

The draws run under a forked RNG, so monitoring does not change the training trajectory, and with the same
seed at every monitored step (common random numbers), so the recorded values change only as the guide does. At the end,
:func:`check_convergence` warns with :class:`ConvergenceWarning`, naming the fix, when the scales ended
within ``factor`` of where they started (the guide has not moved: with Pyro's ``init_scale`` far from the
ELBO's optimum this is a posterior stuck at its initial width) or when the KL term still changes by more
than ``tolerance`` over the last part of training.

:class:`HeldoutCurve` is a ``fit`` callback that evaluates the model on held-out questions every ``every``
steps (accuracy, ECE, NLL, Brier, mean confidence and mutual information against epochs), also under a
forked RNG: the curve of over-confidence growing (or not) as training goes on.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ._utils import atomic_write_json
from .predictive import predict

__all__ = ["ConvergenceWarning", "posterior_summary", "check_convergence", "HeldoutCurve"]


class ConvergenceWarning(UserWarning):
    """The variational posterior has not converged within the training budget."""


@torch.no_grad()
def posterior_summary(model, guide, batch, *, num_data: int, draws: int = 16, seed: int = 0) -> tuple[float, float]:
    """``(KL(q || p) per training example, median posterior std)`` from ``draws`` samples of ``guide``.

    Works for every autoguide (``log q`` is the guide trace's log density, ``log p`` the model's
    ``log_prior``; a model without one gets ``nan`` for the KL); the global RNG is left as it was.

    Example::

        kl, scale = posterior_summary(model, guide, batch, num_data=len(train))
    """
    sites = list(getattr(model, "latent_sites", ()))
    if guide is None or not sites:
        return math.nan, math.nan
    log_prior = getattr(model, "log_prior", None)
    dev = model.net.device
    kls, values = [], []
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        for _ in range(draws):
            tr = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(batch, batch["labels"])
            # log q(s): autoguides sample each latent site through a Delta whose log density is the Jacobian
            # term, beside an auxiliary site with the density itself (AutoNormal: per site; AutoContinuous: joint)
            log_q = tr.log_prob_sum(site_filter=lambda name, site: not site_is_subsample(site))
            with poutine.block():  # a learned prior (LayerScalePrior) has param and factor statements
                log_p = log_prior({site: tr.nodes[site]["value"] for site in sites}) if log_prior else math.nan
            kls.append(float(log_q - log_p))
            values.append(torch.cat([tr.nodes[s]["value"].reshape(-1).float().cpu() for s in sites]))
    std = torch.stack(values).std(0)
    return sum(kls) / len(kls) / num_data, float(std.median())


def check_convergence(scales: Sequence[float], kls: Sequence[float], *, loss: float | None = None,
                      factor: float = 1.5, tolerance: float = 0.1, tail: float = 0.2) -> list[str]:
    """Warn (:class:`ConvergenceWarning`) when the posterior has not converged; returns the messages.

    :param scales: the median posterior std at each monitored step. :param kls: the KL term there.
    :param factor: scales that end within ``factor`` of their first value (either way) have not moved.
    :param tolerance: a KL whose mean over the last ``tail`` of the points differs from the mean over the
        ``tail`` before by more than this fraction is still moving...
    :param loss: ...unless the change is below 1% of this (the loss per example at the end): a KL near 0 (a
        posterior close to its prior) may change by a large fraction and still not matter to the ELBO.

    A KL that is still falling is a posterior moving towards its prior; the message then also says that where
    it ends there, the prior's scale, chosen on validation data, is what sets the spread of the samples.

    Example::

        check_convergence(result.scale, result.kl, loss=result.losses[-1])  # [] when converged
    """
    out = []
    pts = [(s, k) for s, k in zip(scales, kls) if math.isfinite(s) and math.isfinite(k)]
    if len(pts) < 5:
        return out
    s0, s1 = pts[0][0], pts[-1][0]
    if s0 > 0 and 1 / factor < s1 / s0 < factor:
        out.append(f"the posterior scales ended within {factor:g}x of where they started (median std {s0:.3g} -> "
                   f"{s1:.3g}): the guide has not moved from its initial width, so its samples barely differ. "
                   "Raise TrainConfig.guide_lr (e.g. 0.05) or train longer (more steps or epochs)")
    n = max(1, int(round(tail * len(pts))))
    last = [k for _, k in pts[-n:]]
    before = [k for _, k in pts[-2 * n:-n]]
    if before:
        a, b = sum(before) / len(before), sum(last) / len(last)
        change = abs(b - a) / max(abs(a), abs(b), 1e-12)
        if change > tolerance and (loss is None or abs(b - a) > 0.01 * abs(loss)):
            msg = (f"the KL term still changed by {change:.0%} over the last {tail:.0%} of training "
                   f"({a:.4g} -> {b:.4g} nats per example): the posterior is still moving")
            if b < a:  # falling: q is moving towards its prior
                msg += (" towards its prior. Train longer (or raise TrainConfig.guide_lr) to let it settle; where "
                        "it ends at the prior (posterior_scales: std close to prior_std), the data leave those "
                        "coordinates of s undetermined and the prior's scale alone sets how far the samples "
                        "spread: choose that scale on validation data (centered_prior(scale=...), CLI --prior "
                        "s0:SCALE)")
            else:
                msg += ". Train longer, or raise TrainConfig.guide_lr"
            out.append(msg)
    for msg in out:
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return out


class HeldoutCurve:
    """A :func:`~scalabl_pyro.train.fit` callback: held-out metrics every ``every`` steps, against epochs.

    Each evaluation runs :func:`~scalabl_pyro.predictive.predict` (``num_samples`` posterior samples, or one
    for a model without latent sites) under a forked RNG seeded with ``seed``, with the LoRA dropout layers
    switched off, so the training trajectory is the same with or without the curve. ``records`` holds one
    dict per evaluation: ``step`` (steps done), ``epoch`` (``step * batch_size / num_data``), the metrics of
    :meth:`~scalabl_pyro.predictive.Prediction.metrics`, ``mean_conf`` (mean top-class probability) and
    ``seconds`` (the evaluation's wall time; it counts in ``fit``'s).

    :param examples: held-out questions (a validation split: never the test split when choosing a budget).
    :param every: evaluate after every ``every`` steps (e.g. one epoch: ``ceil(num_data / batch_size)``).
    :param num_data: training set size; :param batch_size: training batch size (for the epoch axis).
    :param path: also write the records there as JSON (atomically) after each evaluation, and start from the
        records already there (a resumed run re-evaluates from its checkpoint's step on).

    Example::

        curve = HeldoutCurve(model, guide, val.examples, every=60, num_data=len(train), batch_size=8)
        fit(model, guide, train.examples, config=TrainConfig(steps=600), callback=curve)
        [(r["epoch"], r["ece"]) for r in curve.records]
    """

    def __init__(self, model, guide, examples: Sequence, *, every: int, num_data: int, batch_size: int = 8,
                 num_samples: int = 10, seed: int = 0, path: str | os.PathLike | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r} must be a positive integer (steps between evaluations)")
        if len(examples) == 0:
            raise ValueError("HeldoutCurve got no held-out examples")
        self.model, self.guide, self.examples = model, guide, list(examples)
        self.every, self.num_data, self.batch_size = every, num_data, batch_size
        self.num_samples, self.seed = num_samples, seed
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        if self.path is not None and self.path.exists():
            self.records = json.loads(self.path.read_text())["records"]

    def __call__(self, step: int, loss: float) -> None:
        if (step + 1) % self.every == 0:
            self.record(step + 1)

    def record(self, steps_done: int) -> dict:
        """Evaluate now (after ``steps_done`` steps) and append (or replace) that record."""
        t0 = time.perf_counter()
        net = self.model.net
        drop = [m for m in net.peft_model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
        dev = net.device
        try:
            for m in drop:
                m.eval()
            with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
                torch.manual_seed(self.seed)
                guide = self.guide if getattr(self.model, "latent_sites", ()) else None
                pred = predict(self.model, guide, self.examples, num_samples=self.num_samples)
        finally:
            for m in drop:
                m.train()
        rec = {"step": steps_done, "epoch": steps_done * self.batch_size / self.num_data, **pred.metrics(),
               "mean_conf": float(pred.mean_probs.max(-1).values.mean()), "seconds": time.perf_counter() - t0}
        self.records = [r for r in self.records if r["step"] < steps_done] + [rec]
        if self.path is not None:
            atomic_write_json(self.path, {"records": self.records})
        return rec
