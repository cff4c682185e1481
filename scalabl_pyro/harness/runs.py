"""Where a grid keeps a run: one flat folder per (training set, method, seed), the single place that says so.

``<out>/<train_set>.<method>.seed<k>/`` holds ``result.json`` (written last: it marks the run finished), the
averaged predictive on every evaluation set (``predictions.safetensors``: ``<eval>.mean_probs`` (N, C) and
``<eval>.labels`` (N,)) and a reliability diagram. The experiment writes them; the report, the paired
differences and the diagnostics read them back through :func:`load_predictions`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["run_dir", "predictions_path", "load_predictions", "PREDICTIONS_FILE"]

#: The file in a run folder with its averaged predictive per evaluation set.
PREDICTIONS_FILE = "predictions.safetensors"


def run_dir(out_dir: str | os.PathLike, dataset: str, method: str, seed: int) -> Path:
    """``<out_dir>/<dataset>.<method>.seed<k>``: one flat folder per run (its ``result.json`` marks it finished).

    Example::

        run_dir("bench/results_reference", "arc_easy", "scalabl", 0)  # bench/results_reference/arc_easy.scalabl.seed0
    """
    return Path(out_dir) / f"{dataset}.{method}.seed{seed}"


def predictions_path(out_dir: str | os.PathLike, result: dict) -> Path:
    """The ``predictions.safetensors`` of the run that ``result`` (its ``result.json``) describes."""
    return run_dir(out_dir, result["dataset"], result["method"], result["seed"]) / PREDICTIONS_FILE


def load_predictions(out_dir: str | os.PathLike, result: dict) -> dict[str, torch.Tensor] | None:
    """The run's saved ``{"<eval>.mean_probs", "<eval>.labels"}`` tensors, or ``None`` for a run that has none
    (runs made before December 2026)."""
    path = predictions_path(out_dir, result)
    return load_file(str(path)) if path.exists() else None
