"""Evaluation metrics, uncertainty decomposition and calibration plots.

All functions take plain tensors of class *probabilities* (not logits):
``probs`` is ``(N, C)`` with rows summing to 1, ``labels`` is ``(N,)`` long.
Plots are drawn with :class:`matplotlib.figure.Figure` and the Agg canvas
directly (no global backend switch) and written atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from ._utils import atomic_path

__all__ = ["classification_metrics", "confidence_auroc", "paired_bootstrap", "calibration_bins",
           "uncertainty_decomposition", "ood_auroc", "reliability_diagram", "reliability_panels", "ece_accuracy_plot", "heldout_curves_plot", "format_table"]


def _check(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``probs`` (N, C) and ``labels`` (N,); raise ValueError saying how to fix."""
    probs, labels = torch.as_tensor(probs).detach().cpu(), torch.as_tensor(labels).cpu()
    if probs.dim() != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {tuple(probs.shape)}; stack per-example rows first")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a float tensor, got dtype {probs.dtype}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match probs: expected ({probs.shape[0]},)")
    if probs.shape[0] == 0:
        raise ValueError("empty input: probs has N == 0 rows; evaluate at least one example")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}; use labels.long()")
    C = probs.shape[1]
    if C < 2:
        raise ValueError(f"probs has C={C} class column(s); at least 2 classes are needed")
    bad = (labels < 0) | (labels >= C)
    if bad.any():
        raise ValueError(f"label value {int(labels[bad][0])} out of range: allowed range is [0, {C}) for C={C}")
    p = probs.double()
    sums = p.sum(1, keepdim=True)
    ok_rows = ((sums[:, 0] - 1).abs() <= 1e-3) & (p >= 0).all(1)  # NaN fails both
    if not ok_rows.all():
        i = int((~ok_rows).nonzero()[0])
        raise ValueError(f"row {i} of probs does not sum to 1 (sum={float(sums[i]):.4g}) or has negative/NaN "
                         "entries: pass probabilities, not logits; apply softmax first")
    # Renormalise away rounding so no entry exceeds 1 (torchmetrics would then treat probs as logits).
    return (p / sums).clamp(0, 1), labels.long()


def calibration_bins(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, Tensor]:
    """Bin top-1 confidences into ``n_bins`` equal-width bins over [0, 1].

    Uses torchmetrics' convention: bin ``k`` holds ``edges[k] <= conf < edges[k+1]``
    (float32 confidences, ``torch.bucketize(..., right=True)``), so the bin-weighted
    ``|accuracy - confidence|`` equals torchmetrics' ECE. One difference: a
    confidence of exactly 1.0 goes in the last bin (torchmetrics keeps an extra
    ``[1, 1]`` bin), which can change the ECE only if that bin mixes such items with
    correct under-confident ones.

    :param probs: (N, C) class probabilities.
    :param labels: (N,) true class indices.
    :returns: ``confidence`` (n_bins,) mean confidence, ``accuracy`` (n_bins,) mean
        correctness (both NaN for empty bins), ``count`` (n_bins,) long.

    Example::

        b = calibration_bins(torch.tensor([[0.9, 0.1]]), torch.tensor([0]), n_bins=10)
        b["count"][9]  # tensor(1)
    """
    probs, labels = _check(probs, labels)
    conf, pred = probs.max(dim=1)
    conf, correct = conf.float(), pred.eq(labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins).scatter_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins).scatter_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins).scatter_add_(0, idx, correct)
    return {"confidence": conf_sum / count, "accuracy": acc_sum / count, "count": count.long()}


def classification_metrics(probs: Tensor, labels: Tensor, *, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, ECE, NLL and multi-class Brier score of predictive probabilities.

    :param probs: (N, C) class probabilities (rows sum to 1; zeros allowed).
    :param labels: (N,) long true class indices in ``[0, C)``.
    :param n_bins: equal-width confidence bins for the (L1) ECE.
    :returns: ``{"acc", "ece", "nll", "brier", "n"}`` as Python floats (``n`` is an int).

    Example::

        m = classification_metrics(torch.tensor([[0.8, 0.2], [0.3, 0.7]]), torch.tensor([0, 0]))
        m["acc"]  # 0.5
    """
    p, labels = _check(probs, labels)  # float64, rows renormalised
    N, C = p.shape
    ece = multiclass_calibration_error(p, labels, num_classes=C, n_bins=n_bins, norm="l1")
    nll = -p.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()  # p = 0 -> 27.6, not inf
    onehot = torch.nn.functional.one_hot(labels, C).double()
    return {
        "acc": float((p.argmax(1) == labels).double().mean()),
        "ece": float(ece),
        "nll": float(nll.mean()),
        "brier": float(((p - onehot) ** 2).sum(1).mean()),
        "n": int(N),
    }


def confidence_auroc(probs: Tensor, labels: Tensor) -> float:
    """How well the top probability tells right answers from wrong ones (AUROC; 0.5: not at all).

    The chance that a right answer gets a higher top probability than a wrong one (ties count half): the
    ranking a user relies on to abstain on the least confident questions. With two classes a temperature keeps
    the order of the top probabilities and so leaves this number unchanged; with more classes it can reorder
    questions whose other probabilities differ, and changes it a little. A posterior average can change it more.

    :param probs: (N, C) class probabilities. :param labels: (N,) true classes.
    :returns: the AUROC in [0, 1], or ``nan`` when every answer is right or every answer is wrong.

    Example::

        confidence_auroc(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]), torch.tensor([0, 1, 0]))  # 1.0
    """
    p, labels = _check(probs, labels)
    conf, guess = p.max(1)
    right = guess == labels
    if bool(right.all()) or not bool(right.any()):
        return math.nan
    return ood_auroc(conf[~right], conf[right])


def paired_bootstrap(probs_a: Tensor, probs_b: Tensor, labels: Tensor, *, num_resamples: int = 1000,
                     level: float = 0.95, n_bins: int = 15, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Difference ``metric(a) - metric(b)`` of two models on the same questions, with a bootstrap interval.

    Questions are resampled with replacement (the same indices for both models, so the interval is for
    the *paired* difference). On a small test set the binned ECE is noisy; this says whether a
    difference is larger than that noise.

    :param probs_a: (N, C) class probabilities of model a, or (K, N, C) for K runs (e.g. seeds) on the
        same N questions: each metric is then averaged over the K runs before taking the difference.
    :param probs_b: same shape as ``probs_a``. :param labels: (N,) true classes.
    :returns: ``{"acc"|"ece"|"nll"|"brier"|"auroc_ok": (difference, low, high)}``, the percentile interval at
        ``level``; ``auroc_ok`` is :func:`confidence_auroc` (higher is better; resamples where it is undefined,
        all answers right or all wrong, are left out of its interval, and it is ``nan`` if undefined on the full set).

    Example::

        d = paired_bootstrap(scalabl_probs, lora_probs, labels)
        d["ece"]  # (-0.012, -0.030, 0.004): lower ECE, but within the noise of N questions
    """
    a, b = (p if p.dim() == 3 else p[None] for p in (probs_a, probs_b))
    if a.shape != b.shape or a.shape[1] != labels.shape[0]:
        raise ValueError(f"probs_a {tuple(probs_a.shape)} and probs_b {tuple(probs_b.shape)} must have the same "
                         f"shape (N, C) or (K, N, C) with N = len(labels) = {labels.shape[0]}")
    if not 0 < level < 1 or num_resamples < 1:
        raise ValueError(f"level={level!r} must be in (0, 1) and num_resamples={num_resamples!r} >= 1")
    keys = ("acc", "ece", "nll", "brier", "auroc_ok")

    def one(x: Tensor, y: Tensor) -> dict[str, float]:
        return {**classification_metrics(x, y, n_bins=n_bins), "auroc_ok": confidence_auroc(x, y)}

    def diff(idx: Tensor) -> Tensor:
        ma = [one(x[idx], labels[idx]) for x in a]
        mb = [one(x[idx], labels[idx]) for x in b]
        return torch.tensor([sum(m[k] for m in ma) / len(ma) - sum(m[k] for m in mb) / len(mb) for k in keys])

    N = labels.shape[0]
    g = torch.Generator().manual_seed(seed)
    full = diff(torch.arange(N))
    boot = torch.stack([diff(torch.randint(N, (N,), generator=g)) for _ in range(num_resamples)]).double()
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.nanquantile(boot, q, dim=0)
    return {k: (float(full[i]), float(lo[i]), float(hi[i])) for i, k in enumerate(keys)}


def _entropy(p: Tensor) -> Tensor:
    return -torch.special.xlogy(p, p).sum(-1)


def uncertainty_decomposition(sample_probs: Tensor) -> dict[str, Tensor]:
    """Split predictive uncertainty into aleatoric and epistemic parts (in nats).

    :param sample_probs: (S, N, C) class probabilities under S posterior samples.
    :returns: ``mean_probs`` (N, C) Bayesian model average; ``predictive_entropy`` (N,)
        ``H[mean_s p_s]``; ``expected_entropy`` (N,) ``mean_s H[p_s]`` (aleatoric);
        ``mutual_information`` (N,) their difference, clamped at 0 (epistemic).

    Example::

        u = uncertainty_decomposition(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
        u["mutual_information"]  # tensor([0.6931])
    """
    sample_probs = torch.as_tensor(sample_probs)
    if sample_probs.dim() != 3 or sample_probs.shape[0] == 0:
        raise ValueError(f"sample_probs must be 3-D (S, N, C) with S >= 1, got shape {tuple(sample_probs.shape)}")
    mean_probs = sample_probs.mean(0)
    predictive = _entropy(mean_probs)
    expected = _entropy(sample_probs).mean(0)
    return {"mean_probs": mean_probs, "predictive_entropy": predictive, "expected_entropy": expected,
            "mutual_information": (predictive - expected).clamp_min(0)}


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """AUROC for detecting out-of-distribution inputs (positives) by a higher score.

    Scores are replaced by their ranks scaled into [0, 1] first, so large raw scores
    (e.g. NLLs) are not squashed into ties by torchmetrics' automatic sigmoid.

    :param scores_in: (N_in,) scores of in-distribution examples.
    :param scores_out: (N_out,) scores of OOD examples, e.g. predictive entropy.
    :returns: P(score_out > score_in) + 0.5 P(tie), in [0, 1].

    Example::

        ood_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.9]))  # 1.0
    """
    s_in, s_out = torch.as_tensor(scores_in).flatten(), torch.as_tensor(scores_out).flatten()
    if s_in.numel() == 0 or s_out.numel() == 0:
        raise ValueError("empty input: ood_auroc needs at least one in-distribution and one OOD score")
    scores = torch.cat([s_in, s_out]).double()
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; drop or impute them before computing the AUROC")
    uniq, ranks = torch.unique(scores, return_inverse=True)
    ranks = ranks.double() / max(len(uniq) - 1, 1)
    target = torch.cat([torch.zeros(len(s_in)), torch.ones(len(s_out))]).long()
    return float(binary_auroc(ranks, target))


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def reliability_diagram(probs: Tensor | Mapping[str, Tensor], labels: Tensor, path: str | os.PathLike, *,
                        n_bins: int = 15, title: str | None = None) -> Path:
    """Write a reliability diagram (top) and confidence histogram (bottom) as a PNG.

    :param probs: (N, C) probabilities of one model, or ``{name: (N, C)}`` to compare
        several models on the same labels (one accuracy-vs-confidence line each).
    :param labels: (N,) true class indices.
    :param path: output ``.png`` path (written atomically).
    :returns: ``Path(path)``.

    Example::

        reliability_diagram({"MAP": p_map, "ScalaBL": p_bayes}, labels, "out/reliability.png")
    """
    models = dict(probs) if isinstance(probs, Mapping) else {None: probs}
    if not models:
        raise ValueError("probs dict is empty; pass at least one {name: (N, C) tensor}")
    fig = Figure(figsize=(5.5, 6.5))
    ax, hx = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = torch.linspace(0, 1, n_bins + 1).numpy()
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, p in models.items():
        b = calibration_bins(p, labels, n_bins=n_bins)
        ece = classification_metrics(p, labels, n_bins=n_bins)["ece"]
        occ = (b["count"] > 0).numpy()
        acc, conf = b["accuracy"].nan_to_num(0.0).numpy(), b["confidence"].nan_to_num(0.0).numpy()
        conf_all = torch.as_tensor(p).max(1).values.float().clamp(0, 1).numpy()
        if name is None:
            ax.bar(centers, acc, width, edgecolor="k", color="tab:blue", label=f"accuracy (ECE={ece:.3f})")
            ax.bar(centers[occ], (conf - acc)[occ], width, bottom=acc[occ], color="tab:red", alpha=0.3,
                   hatch="//", edgecolor="tab:red", label="gap")
            hx.hist(conf_all, bins=edges, color="tab:blue", edgecolor="k")
        else:
            line, = ax.plot(conf[occ], acc[occ], "o-", ms=3, label=f"{name} (ECE={ece:.3f})")
            hx.hist(conf_all, bins=edges, histtype="step", color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title or "Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    hx.set(xlabel="confidence (max probability)", ylabel="count")
    fig.tight_layout()
    return _save(fig, path)


def reliability_panels(panels: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]], path: str | os.PathLike, *,
                       n_bins: int = 15, title: str | None = None) -> dict:
    """Reliability diagrams as bars, one panel per (method, evaluation set), each over its count histogram.

    Columns are evaluation sets (e.g. in distribution and shifted, side by side), rows are methods. A panel
    shows the accuracy of each non-empty confidence bin as a bar, the gap to the diagonal shaded (red above
    the bar: over-confident; hatched green inside it: under-confident), the ECE in its title, and below it how many predictions fall in each bin (log
    scale: with a confident model most sit in the top bins, and nearly empty bins say little).

    :param panels: ``{eval_name: {method: (probs (N, C), labels (N,))}}``.
    :param path: output ``.png`` (written atomically).
    :returns: ``{(eval_name, method): calibration_bins(...) + {"ece": float}}``, what each panel shows.

    Example::

        reliability_panels({"countries": {"LoRA": (p1, y)}, "shifted": {"LoRA": (p2, y2)}}, "reliability.png")
    """
    evals = list(panels)
    if not evals or not all(panels[e] for e in evals):
        raise ValueError("panels must map each evaluation set to a non-empty {method: (probs, labels)} dict")
    methods = list(dict.fromkeys(m for e in evals for m in panels[e]))
    R, E = len(methods), len(evals)
    fig = Figure(figsize=(4.2 * E, 4.1 * R + 0.5), layout="constrained")
    outer = fig.add_gridspec(R, E)
    edges = torch.linspace(0, 1, n_bins + 1).numpy()
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    shown = {}
    for j, ev in enumerate(evals):
        for i, m in enumerate(methods):
            cell = outer[i, j].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
            ax = fig.add_subplot(cell[0])
            hx = fig.add_subplot(cell[1], sharex=ax)
            if m not in panels[ev]:
                ax.set_axis_off(), hx.set_axis_off()
                continue
            p, y = panels[ev][m]
            b = calibration_bins(p, y, n_bins=n_bins)
            ece = classification_metrics(p, y, n_bins=n_bins)["ece"]
            shown[ev, m] = {**b, "ece": ece}
            occ = (b["count"] > 0).numpy()
            acc, conf = b["accuracy"].nan_to_num(0.0).numpy(), b["confidence"].nan_to_num(0.0).numpy()
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            ax.bar(centers[occ], acc[occ], width, color="tab:blue", edgecolor="k", lw=0.5)
            over, under = occ & (conf > acc), occ & (conf < acc)
            ax.bar(centers[over], (conf - acc)[over], width, bottom=acc[over], color="tab:red", alpha=0.35,
                   edgecolor="tab:red", lw=0.5)
            ax.bar(centers[under], (acc - conf)[under], width, bottom=conf[under], color="white", alpha=0.6,
                   hatch="///", edgecolor="tab:green", lw=0.5)
            ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{m} — {ev}\nECE {ece:.3f}, n = {int(b['count'].sum())}")
            ax.tick_params(labelbottom=False)
            if j == 0:
                ax.set_ylabel("accuracy")
            if i == 0 and j == 0:
                from matplotlib.patches import Patch

                ax.legend(handles=[Patch(facecolor="tab:blue", edgecolor="k", label="accuracy"),
                                   Patch(facecolor="tab:red", alpha=0.35, label="over-confident (gap to confidence)"),
                                   Patch(facecolor="white", hatch="///", edgecolor="tab:green", label="under-confident")],
                          loc="upper left", fontsize=7)
            hx.bar(centers[occ], b["count"].numpy()[occ], width, color="tab:gray", edgecolor="k", lw=0.5)
            hx.set_yscale("log")
            hx.yaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels crowd a short axis
            hx.set(xlim=(0, 1), xlabel="confidence" if i == R - 1 else None, ylabel="count" if j == 0 else None)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return shown


def heldout_curves_plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                        metrics: Sequence[str] = ("ece", "nll"), title: str | None = None) -> Path:
    """Held-out metrics against training epochs, one line per method, one panel per metric.

    :param curves: ``{method: records}``, each record a dict with ``epoch`` and the ``metrics`` keys (what
        :class:`~scalabl_pyro.convergence.HeldoutCurve` records).
    :param path: output ``.png`` (written atomically).

    Example::

        heldout_curves_plot({"plain LoRA": lora_curve.records, "ScalaBL": bayes_curve.records}, "curves.png")
    """
    if not curves or not all(curves.values()):
        raise ValueError("curves must map each method to a non-empty list of records")
    for name, recs in curves.items():
        missing = sorted({k for r in recs for k in ("epoch", *metrics) if k not in r})
        if missing:
            raise ValueError(f"curve {name!r}: records lack {missing}")
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = {"ece": "ECE (15 bins)", "nll": "NLL", "acc": "accuracy", "brier": "Brier", "mean_conf": "mean confidence"}
    for ax, key in zip(axes, metrics):
        for i, (name, recs) in enumerate(curves.items()):
            recs = sorted(recs, key=lambda r: r["epoch"])
            ax.plot([r["epoch"] for r in recs], [r[key] for r in recs], marker=_MARKERS[i % len(_MARKERS)], ms=3,
                    label=name)
        ax.set(xlabel="training epochs", ylabel=labels.get(key, key))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def ece_accuracy_plot(points: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                      title: str | None = None) -> Path:
    """Scatter ECE (y) against accuracy (x): colour per method, marker per dataset.

    :param points: dicts with keys ``method``, ``dataset``, ``acc``, ``ece``.
    :param path: output ``.png`` path (written atomically).
    :returns: ``Path(path)``.

    Example::

        ece_accuracy_plot([{"method": "MAP", "dataset": "boolq", "acc": 0.8, "ece": 0.1}], "out/ece_acc.png")
    """
    if not points:
        raise ValueError("points is empty; pass at least one {method, dataset, acc, ece} dict")
    for i, pt in enumerate(points):
        missing = {"method", "dataset", "acc", "ece"} - set(pt)
        if missing:
            raise ValueError(f"point {i} is missing key(s) {sorted(missing)}; each needs method, dataset, acc, ece")
    methods = list(dict.fromkeys(str(pt["method"]) for pt in points))
    datasets = list(dict.fromkeys(str(pt["dataset"]) for pt in points))
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    marker = {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(datasets)}
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for pt in points:
        ax.scatter(float(pt["acc"]), float(pt["ece"]), s=50, c=color[str(pt["method"])],
                   marker=marker[str(pt["dataset"])], edgecolors="k", linewidths=0.5)
    handles = [Line2D([], [], ls="", marker="o", color=color[m], label=m) for m in methods]
    handles += [Line2D([], [], ls="", marker=marker[d], color="gray", label=d) for d in datasets]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set(xlabel="accuracy (higher is better)", ylabel="ECE (lower is better)", title=title or "ECE vs accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def format_table(rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str] | None = None,
                 floatfmt: str = ".3f") -> str:
    """Render dicts as a GitHub Markdown table (no trailing newline).

    :param rows: one dict per table row; missing/None values render empty.
    :param columns: column order; defaults to the keys of the first row.
    :param floatfmt: format spec applied to floats (and 1-element tensors).

    Example::

        print(format_table([{"method": "MAP", "acc": 0.8123}]))
        # | method | acc |
        # | --- | --- |
        # | MAP | 0.812 |
    """
    if columns is None:
        if not rows:
            raise ValueError("rows is empty and no columns given; pass columns=[...] for an empty table")
        columns = list(rows[0])

    def cell(v: Any) -> str:
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            return ""
        text = format(v, floatfmt) if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
