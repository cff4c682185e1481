"""Paired differences between two methods of a grid, with bootstrap intervals over the test questions.

Every run of a grid saves its averaged predictive on each evaluation set (``predictions.safetensors``:
``<eval>.mean_probs`` (N, C) and ``<eval>.labels`` (N,)). Two methods trained on the same data set and
evaluated on the same questions are compared question by question: :func:`paired_differences` stacks the
seeds both have finished, and :func:`~scalabl_pyro.metrics.paired_bootstrap` gives ``metric(a) - metric(b)``
averaged over those seeds with a 95% interval from resampling the questions (the same indices for both), for
accuracy, ECE, NLL, Brier and ``auroc_ok`` (:func:`~scalabl_pyro.metrics.confidence_auroc`: how well the
confidence ranks right answers above wrong ones, which a temperature changes little).
An interval that holds 0 is a difference within the noise of the test set.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

from ..metrics import paired_bootstrap
from .runs import load_predictions, predictions_path

__all__ = ["paired_differences", "METRICS"]

METRICS = ("acc", "ece", "nll", "brier", "auroc_ok")


def paired_differences(out_dir: str | os.PathLike, results: Sequence[dict], *, method: str = "scalabl",
                       against: Sequence[str] = ("mle", "temperature"), num_resamples: int = 1000,
                       level: float = 0.95) -> list[dict]:
    """``method`` minus each of ``against``, per (training set, evaluation set), over the seeds both finished.

    :param out_dir: the grid's folder (each run's ``predictions.safetensors`` is read from there).
    :param results: the finished runs' ``result.json`` dicts (:func:`~scalabl_pyro.harness.experiment.load_results`).
    :returns: one row per (train, eval, baseline) with ``seeds``, ``n`` and, per metric, the raw triple
        ``(difference, low, high)`` under ``<metric>_diff`` and its text ``"+0.012 [-0.004, +0.030]"`` under
        ``<metric>``. Pairs with no common seed are left out, and so are runs without ``predictions.safetensors``
        (written since December 2026; older grids have no paired rows).
    :raises ValueError: two runs of a pair were evaluated on different questions (other labels).

    Example::

        rows = paired_differences("bench/results_reference", load_results("bench/results_reference"))
        format_table(rows, columns=["train", "eval", "pair", "seeds", "n", "acc", "ece", "nll", "brier"])
    """
    out_dir = Path(out_dir)
    runs = {(r["dataset"], r["method"], r["seed"]): r for r in results}
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in results):
        for base in against:
            seeds = sorted(s for (d, m, s) in runs if d == ds and m == method and (ds, base, s) in runs
                           and all(predictions_path(out_dir, runs[ds, x, s]).exists()
                                   for x in (method, base)))
            if not seeds:
                continue
            saved = {(m, s): load_predictions(out_dir, runs[ds, m, s])
                     for s in seeds for m in (method, base)}
            for ev in runs[ds, method, seeds[0]]["metrics"]:
                labels = saved[method, seeds[0]][f"{ev}.labels"]
                for key, t in saved.items():
                    if not torch.equal(t[f"{ev}.labels"], labels):
                        raise ValueError(f"{ds}.{key[0]}.seed{key[1]} was evaluated on other {ev} questions than "
                                         f"{ds}.{method}.seed{seeds[0]}: rerun it with the grid's test_limit")
                a = torch.stack([saved[method, s][f"{ev}.mean_probs"] for s in seeds])
                b = torch.stack([saved[base, s][f"{ev}.mean_probs"] for s in seeds])
                d = paired_bootstrap(a, b, labels, num_resamples=num_resamples, level=level)
                row = {"train": ds, "eval": ev, "pair": f"{method} - {base}", "seeds": len(seeds), "n": len(labels)}
                for k in METRICS:
                    v, lo, hi = d[k]
                    row[f"{k}_diff"] = (v, lo, hi)
                    row[k] = ("" if math.isnan(v) else  # auroc_ok with every answer right (or wrong)
                              f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if lo > 0 or hi < 0 else ""))
                rows.append(row)
    return rows
