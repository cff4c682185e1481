"""Temperature scaling (Guo et al. 2017): post-hoc calibration by one scalar ``T > 0``.

The calibrated predictive is ``softmax(log p / T)``: ``T > 1`` softens an over-confident predictor,
``T < 1`` sharpens an under-confident one, and the argmax (accuracy) never changes. ``T`` is fitted
on a held-out split by minimizing the NLL, so this works on top of *any* method's predictions.

**Bayesian models: the model average is tempered.** A :class:`~scalabl_pyro.predictive.Prediction`
holds ``S`` per-sample probabilities ``(S, N, C)``; what is evaluated (``.metrics()``) is their average
``mean_probs`` (N, C). :func:`calibrate` (and :meth:`TemperatureScaled.from_prediction`) fit and apply ``T`` to the
log of that average, for two reasons: the fitted ``T`` then minimizes the NLL of exactly the predictive
that is scored (tempering each sample and then averaging is a different map, which a ``T`` fitted on the
average does not calibrate), and the same post-hoc map applies unchanged to every method (ScalaBL,
an ensemble, MC dropout, plain LoRA). The result is a single predictive, held as one sample (``S = 1``):
its mutual information is 0 and not meaningful, so use the untempered prediction for OOD detection by MI.
:func:`apply_temperature` itself is a plain row-wise map: on ``(S, N, C)`` it tempers every sample.

Example::

    from scalabl_pyro import calibrate, predict
    val, test = predict(model, guide, val_examples), predict(model, guide, test_examples)
    cal = calibrate(val, test)         # T fitted on val's model average, applied to test's
    cal.temperature, cal.metrics()["ece"], cal.metrics()["acc"] == test.metrics()["acc"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..predictive import Prediction

__all__ = ["TemperatureScaled", "apply_temperature", "calibrate", "check_temperature", "fit_temperature"]

_SUM_TOL = 1e-3  # the same tolerance as scalabl_pyro.metrics for rows of probabilities


def check_temperature(T) -> float:
    """Return ``T`` as a float after checking it is a finite number > 0 (ValueError/TypeError otherwise)."""
    if isinstance(T, Tensor) and T.numel() == 1:
        T = T.item()
    if isinstance(T, bool) or not isinstance(T, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {T!r}")
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature={T!r} must be a finite number > 0 (1.0 leaves the probabilities unchanged)")
    return float(T)


def _check_probs(probs: Tensor, what: str = "probs") -> Tensor:
    """Float64 copy of ``probs`` (..., C) after checking it holds probabilities (ValueError naming the fix)."""
    p = torch.as_tensor(probs)
    if not p.is_floating_point():
        raise ValueError(f"{what} must be a float tensor of probabilities, got dtype {p.dtype}")
    if p.dim() == 0 or p.shape[-1] < 2:
        raise ValueError(f"{what} must have a last dimension of C >= 2 classes, got shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"empty input: {what} has shape {tuple(p.shape)}; pass at least one row")
    p = p.detach().cpu().double()
    if not torch.isfinite(p).all():
        raise ValueError(f"{what} contains NaN or inf; drop or fix those rows first")
    if (p < 0).any():
        raise ValueError(f"{what} has negative entries: pass probabilities (or logits with from_probs=False)")
    sums = p.sum(-1)
    bad = (sums - 1).abs() > _SUM_TOL
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise ValueError(f"row {i} of {what} sums to {float(sums[i]):.4g}, not 1: pass probabilities, not logits "
                         "(softmax them, or use from_probs=False)")
    return p


def _log_inputs(probs_or_logits, labels, from_probs: bool) -> tuple[Tensor, Tensor]:
    """Validated ``(z, labels)``: ``z`` (N, C) float64 log-probabilities/logits with -inf for masked classes."""
    x = torch.as_tensor(probs_or_logits)
    name = "probs" if from_probs else "logits"
    if x.dim() != 2:
        hint = " (for S posterior samples, pass their model average, e.g. prediction.mean_probs)"
        hint = hint if x.dim() == 3 else ""
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(x.shape)}{hint}")
    if x.shape[0] == 0:
        raise ValueError(f"empty input: {name} has N == 0 rows; fit the temperature on at least one example")
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {name} {tuple(x.shape)}: "
                         f"expected ({x.shape[0]},), one label per row")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}; use labels.long()")
    C = x.shape[1]
    out = (labels < 0) | (labels >= C)
    if out.any():
        raise ValueError(f"label value {int(labels[out][0])} out of range: allowed range is [0, {C}) for C={C}")
    if from_probs:
        z = _check_probs(x).log()  # exact zeros (masked classes) -> -inf
    else:
        if not x.is_floating_point():
            raise ValueError(f"logits must be a float tensor, got dtype {x.dtype}")
        z = x.detach().cpu().double()
        if torch.isnan(z).any() or (z == math.inf).any():
            raise ValueError("logits contain NaN or +inf; only -inf is allowed (a masked class)")
        empty = torch.isneginf(z).all(1)
        if empty.any():
            raise ValueError(f"row {int(empty.nonzero()[0])} of logits is -inf for every class: no class is possible")
    return z, labels.long()


class _Objective:
    """``f(b) = mean_i [logsumexp_j(b z_ij) - b z_iy]``, the NLL at ``b = 1/T``; convex in ``b``.

    ``f'(b) = mean_i [E_{p_b}[z_i] - z_iy]`` (nondecreasing), ``f''(b) = mean_i Var_{p_b}[z_i] >= 0``.
    Masked classes (``z = -inf``) get probability exactly 0 and drop out of every sum.
    """

    def __init__(self, z: Tensor, labels: Tensor):
        finite = torch.isfinite(z)
        top = torch.where(finite, z, -math.inf).max(1, keepdim=True).values
        z = z - top  # per-row shift: softmax(b z) is unchanged, and the finite z are <= 0
        self.mask = finite
        self.z = torch.where(finite, z, 0.0)  # finite stand-in, multiplied only by probabilities that are 0
        self.zy = self.z.gather(1, labels[:, None]).squeeze(1)

    def logits(self, b: float) -> Tensor:
        return torch.where(self.mask, b * self.z, -math.inf)

    def derivatives(self, b: float) -> tuple[float, float]:
        p = self.logits(b).softmax(1)
        mean = (p * self.z).sum(1)
        var = (p * (self.z - mean[:, None]) ** 2).sum(1)
        return float((mean - self.zy).mean()), float(var.mean())


def fit_temperature(probs_or_logits: Tensor, labels: Tensor, *, from_probs: bool = True, max_iter: int = 100,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature ``T`` in ``bounds`` minimizing the held-out NLL of ``softmax(log p / T)``.

    Works in log space: ``z = log p`` (or the logits), float64. With ``b = 1/T`` the NLL
    ``mean_i [logsumexp_j(b z_ij) - b z_iy]`` is convex in ``b``, so its derivative (an expectation minus the
    true class's ``z``) is monotone and the minimizer is unique: the root of the derivative is found by
    safeguarded Newton steps inside a bracket that shrinks every iteration (a bisection on ``log b`` whenever
    a Newton step would leave it or converge slowly; deterministic, to float64 precision). If the derivative does
    not change sign inside ``bounds`` the nearer bound is returned (e.g. a validation set predicted 100%
    correctly has its NLL still falling as ``T -> 0``); if ``T`` cannot change the NLL at all (every row
    has one distinct value), ``1.0`` clipped to ``bounds``.

    Masked classes (probability exactly 0, logit ``-inf``) keep probability 0 at every ``T`` and are left
    out of every sum. A row whose *true* class is masked has NLL ``inf`` at every ``T`` (no temperature
    changes it), so it does not inform ``T`` and is left out of the fit; with probabilities that also
    covers a true class whose probability underflowed to 0 (pass logits to keep such rows).

    :param probs_or_logits: ``(N, C)`` held-out class probabilities (rows sum to 1; for ``S`` posterior
        samples pass their average ``(N, C)``, e.g. ``prediction.mean_probs``), or logits with
        ``from_probs=False``.
    :param labels: ``(N,)`` integer true classes in ``[0, C)``.
    :param from_probs: whether the first argument holds probabilities (default) or logits.
    :param max_iter: at most this many Newton/bisection iterations (10-20 are typical;
        64 bisections alone reach float64 resolution).
    :param bounds: ``(lo, hi)`` with ``0 < lo < hi``: the allowed range of ``T``.
    :returns: ``T`` as a Python float.
    :raises ValueError: mismatched shapes, empty input, labels out of range, non-finite values,
        rows of probabilities that do not sum to 1, bad ``bounds``/``max_iter``.

    Example::

        T = fit_temperature(val.mean_probs, val.labels)        # e.g. 1.8: the model was over-confident
        calibrated = apply_temperature(test.mean_probs, T)     # (N, C), same argmax
    """
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"bounds={bounds!r} must be a pair (lo, hi) of numbers with 0 < lo < hi") from None
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"bounds={bounds!r} must satisfy 0 < lo < hi < inf, e.g. (0.05, 20.0)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1")
    z, labels = _log_inputs(probs_or_logits, labels, from_probs)
    keep = torch.isfinite(z.gather(1, labels[:, None]).squeeze(1))
    if not keep.any():
        raise ValueError(f"the true class of every one of the {len(labels)} rows has probability 0 (masked, or "
                         "underflowed): no temperature changes their NLL; pass logits (from_probs=False)")
    f = _Objective(z[keep], labels[keep])
    finite = f.mask
    spread = torch.where(finite, f.z, math.inf).min(1).values  # the finite z are <= 0 with max 0
    if bool((spread == 0).all()):
        return min(max(1.0, lo), hi)  # every row has a single distinct value: the NLL does not depend on T

    # bracket the root of f'(b), nondecreasing, on u = log b in [log(1/hi), log(1/lo)]
    u_lo, u_hi = -math.log(hi), -math.log(lo)
    if f.derivatives(math.exp(u_lo))[0] >= 0:
        return hi
    if f.derivatives(math.exp(u_hi))[0] <= 0:
        return lo
    # Safeguarded Newton on f'(b) = 0 (rtsafe): a Newton step when it stays inside the bracket and at least
    # halves the step before last, else a bisection of the bracket in log b. Deterministic.
    b_lo, b_hi = math.exp(u_lo), math.exp(u_hi)  # invariant: f'(b_lo) < 0 < f'(b_hi)
    b = math.sqrt(b_lo * b_hi)
    step_before = b_hi - b_lo
    step = step_before
    for _ in range(max_iter):
        g, h = f.derivatives(b)
        if g == 0:
            break
        if g < 0:
            b_lo = b
        else:
            b_hi = b
        new = b - g / h if h > 0 else math.nan
        if abs(new - b) <= 1e-13 * b:  # converged: the Newton step is below float64 resolution
            b = new
            break
        if b_lo < new < b_hi and abs(new - b) < 0.5 * step_before:
            step_before, step = step, abs(new - b)
        else:
            new = math.sqrt(b_lo * b_hi)
            step_before = step = b_hi - b_lo
        b = new
        if b_hi - b_lo <= 1e-13 * b:
            break
    return min(max(1.0 / b, lo), hi)


def apply_temperature(probs: Tensor, T: float) -> Tensor:
    """``softmax(log probs / T)`` over the last dimension: tempered probabilities, same shape and dtype.

    A row-wise map on ``(..., C)``: ``(N, C)`` one predictive; ``(S, N, C)`` tempers each of ``S``
    per-sample predictives separately (which differs from tempering their average: to calibrate a
    Bayesian model, temper ``prediction.mean_probs``, as :func:`calibrate` does). Zero probabilities
    (masked classes) stay exactly 0; the argmax of every row is unchanged.

    :param probs: ``(..., C)`` probabilities, rows summing to 1.
    :param T: temperature > 0 (``T > 1`` softens, ``T < 1`` sharpens, ``1`` renormalises only).
    :returns: tensor of ``probs``' shape and (floating) dtype, on its device.

    Example::

        apply_temperature(torch.tensor([[0.9, 0.1, 0.0]]), 2.0)  # tensor([[0.75, 0.25, 0.00]])
    """
    T = check_temperature(T)
    src = torch.as_tensor(probs)
    p = _check_probs(src)
    out = (p.log() / T).softmax(-1)  # log 0 = -inf -> exp(-inf) = 0 exactly
    return out.to(dtype=src.dtype, device=src.device)


@dataclass
class TemperatureScaled(Prediction):
    """A :class:`~scalabl_pyro.predictive.Prediction` recalibrated by a temperature (same API).

    ``sample_probs`` is ``(1, N, C)``: the tempered Bayesian model average as a single sample, so
    ``mean_probs`` is that average, ``.metrics()`` scores it, and ``mutual_information`` is 0 (not
    meaningful after tempering; ``metrics()["num_samples"]`` is 1).

    :ivar temperature: the ``T`` that was applied.
    """

    temperature: float = 1.0

    @classmethod
    def from_prediction(cls, pred: Prediction, T: float) -> "TemperatureScaled":
        """Temper ``pred``'s model average ``mean_probs`` (N, C) by ``T``; labels and ids are kept."""
        T = check_temperature(T)
        return cls(apply_temperature(pred.mean_probs, T)[None], pred.labels, list(pred.ids), temperature=T)


def calibrate(prediction_on_val: Prediction, prediction_on_test: Prediction, *, max_iter: int = 100,
              bounds: tuple[float, float] = (0.05, 20.0)) -> TemperatureScaled:
    """Fit ``T`` on a validation prediction's model average and temper the test prediction with it.

    Composes with any method: both arguments are :class:`~scalabl_pyro.predictive.Prediction` objects
    (``S`` samples each, any ``S``), e.g. from :func:`~scalabl_pyro.predictive.predict` or
    ``Trained.predict``. ``T = fit_temperature(val.mean_probs, val.labels)``; the result holds
    ``apply_temperature(test.mean_probs, T)`` as one sample (``S = 1``, mutual information 0).

    :param prediction_on_val: held-out predictions with labels (not the test set), ``(S, N_val, C)``.
    :param prediction_on_test: the predictions to recalibrate, ``(S', N_test, C)``.
    :returns: a :class:`TemperatureScaled` (a ``Prediction``; ``.temperature`` is the fitted ``T``).

    Example::

        cal = calibrate(trained.predict(val.examples), trained.predict(test.examples))
        cal.temperature, cal.metrics()["nll"]
    """
    for name, p in (("prediction_on_val", prediction_on_val), ("prediction_on_test", prediction_on_test)):
        if not isinstance(p, Prediction):
            raise TypeError(f"{name} must be a scalabl_pyro Prediction (from predict()), got {type(p).__name__}")
    c_val, c_test = prediction_on_val.mean_probs.shape[-1], prediction_on_test.mean_probs.shape[-1]
    if c_val != c_test:
        raise ValueError(f"validation predictions have C={c_val} classes but test predictions C={c_test}: "
                         "calibrate on a validation split of the same task")
    T = fit_temperature(prediction_on_val.mean_probs, prediction_on_val.labels, max_iter=max_iter, bounds=bounds)
    return TemperatureScaled.from_prediction(prediction_on_test, T)
