"""Reading a grid's runs: how over-confident each method is, and what its posterior did about it.

:func:`run_diagnostics` gives one row per (training set, method), means over the finished seeds, on the
training set's own test questions: the mean top probability (``conf``) and its gap to the accuracy (``gap``
> 0: over-confident), read from each run's ``predictions.safetensors``, and how well the confidence ranks the
answers (``auroc_ok``: the AUROC of the top probability for telling right answers from wrong ones, which a
temperature changes little: it keeps each question's ranking of the classes and rescales all questions
alike); the mutual information of a sampled method's samples (before the temperature of ``scalabl_temperature``,
from ``untempered_metrics``); and, for the methods with a guide, what the run recorded about its posterior
(``result.json``'s ``history`` and ``point_metrics``, written since December 2026): the KL term per example at
the end and how much it still moved over the last fifth of training, the relative noise a posterior draw puts on ``s`` (median over modules
of std / mean ``|s|``), how far ``|s|`` moved from the prior's mean, and the ECE and NLL of the same model at its
posterior median, which set beside the averaged ones show what the Bayesian average adds.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from statistics import mean, median
from typing import Sequence

from ..metrics import confidence_auroc
from .runs import load_predictions

__all__ = ["run_diagnostics", "DIAGNOSTIC_COLUMNS", "kl_tail_change"]

#: The columns of :func:`run_diagnostics`' rows, in table order.
DIAGNOSTIC_COLUMNS = ("train", "method", "seeds", "acc", "conf", "gap", "auroc_ok", "mi", "kl_end", "kl_tail", "rel_noise",
                      "s_moved", "ece_point", "ece", "nll_point", "nll")


#: How a column's mean is written (default ``{:.3f}``).
_FORMATS = {"gap": "{:+.3f}", "kl_tail": "{:+.0%}", "kl_end": "{:.3g}", "mi": "{:.3g}"}


def kl_tail_change(kls: Sequence[float], *, tail: float = 0.2) -> float:
    """Signed relative change of the KL term: mean over the last ``tail`` of the points against the ``tail``
    before (the quantity :func:`~scalabl_pyro.convergence.check_convergence` warns on); ``nan`` if too short.

    Example::

        kl_tail_change([4, 3, 2, 2, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0])  # (1.05 - 1.25) / 1.25 = -0.16
    """
    pts = [k for k in kls if math.isfinite(k)]
    n = max(1, int(round(tail * len(pts))))
    if len(pts) < 2 * n or len(pts) < 5:
        return math.nan
    a, b = mean(pts[-2 * n:-n]), mean(pts[-n:])
    return (b - a) / max(abs(a), 1e-12)


def _one(r: dict, out_dir: Path) -> dict:
    """The diagnostics of one run (keys of :data:`DIAGNOSTIC_COLUMNS`; absent where the run has no record)."""
    ds = r["dataset"]
    m = r["metrics"][ds]
    out = {"acc": m["acc"], "ece": m["ece"], "nll": m["nll"]}
    saved = load_predictions(out_dir, r)
    if saved is not None:
        probs, labels = saved[f"{ds}.mean_probs"], saved[f"{ds}.labels"]
        out["conf"] = float(probs.max(-1).values.mean())
        out["gap"] = out["conf"] - m["acc"]
        auroc = confidence_auroc(probs, labels)  # P(conf of a right answer > conf of a wrong one)
        if not math.isnan(auroc):
            out["auroc_ok"] = auroc
    raw = (r.get("untempered_metrics") or {}).get(ds, m)  # before a temperature, which keeps one sample
    if raw.get("num_samples", 1) > 1:  # several samples or members: their disagreement
        out["mi"] = raw.get("mean_mi", math.nan)
    h = r.get("history") or {}
    if h.get("kl"):
        out["kl_end"] = h["kl"][-1]
        out["kl_tail"] = kl_tail_change(h["kl"])
    post = h.get("posterior") or {}
    if post:
        out["rel_noise"] = median(v["std"] / max(v["mean_abs"], 1e-12) for v in post.values())
        moved = [v["mean_abs"] / v["prior_mean_abs"] for v in post.values()
                 if math.isfinite(v["prior_mean_abs"]) and v["prior_mean_abs"] > 0]
        if moved:
            out["s_moved"] = median(moved)
    point = (r.get("point_metrics") or {}).get(ds)
    if point:
        out["ece_point"], out["nll_point"] = point["ece"], point["nll"]
    return out


def run_diagnostics(out_dir: str | os.PathLike, results: Sequence[dict]) -> list[dict]:
    """One row per (training set, method): :data:`DIAGNOSTIC_COLUMNS`, means over the seeds that have each value,
    as text (``""`` where no seed has it), in the order the runs come in (sort ``results`` first).

    :param out_dir: the grid's folder (each run's ``predictions.safetensors`` is read from there).
    :param results: the finished runs' ``result.json`` dicts (:func:`~scalabl_pyro.harness.experiment.load_results`).

    Example::

        rows = run_diagnostics("bench/results_reference", load_results("bench/results_reference"))
        format_table(rows, columns=DIAGNOSTIC_COLUMNS)
    """
    out_dir = Path(out_dir)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"]), []).append(_one(r, out_dir))
    rows = []
    for (ds, method), runs in groups.items():
        row = {"train": ds, "method": method, "seeds": len(runs)}
        for k in DIAGNOSTIC_COLUMNS[3:]:
            vals = [x[k] for x in runs if k in x and math.isfinite(x[k])]
            row[k] = _FORMATS.get(k, "{:.3f}").format(mean(vals)) if vals else ""
        rows.append(row)
    return rows
