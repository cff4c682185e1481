"""Choose the choice-score normalization on *validation* data, after fine-tuning (not zero-shot).

``scoring="choice"`` scores answer ``k`` by ``log p(continuation_k | context)``, optionally divided
by its token count (``tokens``) or character count (``chars``). Zero-shot, ``chars`` has the best
validation NLL, but it also divides the logit differences by ~30, and 200 LoRA steps cannot undo that:
the fine-tuned model is then under-confident. This script trains plain LoRA (MLE, the grid's budget)
with each normalization on each data set's train split and evaluates on its validation split:
accuracy, ECE, NLL, Brier and mean confidence, per normalization. Test splits are not read.

Each (dataset, normalization) run is written to ``<out>/<dataset>.<normalize>.json`` atomically and
skipped when present, so an interrupted run resumes.

Usage::

    python bench/normalization.py --out bench/normalization          # SmolLM2, OBQA + ARC-Easy
    python bench/normalization.py --backbone tiny --datasets openbookqa --steps 2 --limit 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from scalabl_pyro._utils import atomic_write_json
from scalabl_pyro.harness.experiment import GridConfig, backbone_factory, resolve_task
from scalabl_pyro.harness.methods import train_method


def run(dataset: str, normalize: str, grid: GridConfig, *, limit: int, device: str) -> dict:
    train = resolve_task(dataset, "train", data_dir=grid.data_dir, limit=grid.train_limit, seed=0)
    val = resolve_task(dataset, "validation", data_dir=grid.data_dir, limit=limit, seed=0)
    words = train.label_words if len(train.label_words) >= len(val.label_words) else val.label_words
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trained = train_method("mle", backbone_factory(grid.backbone, device), list(train.examples), label_words=words,
                           config=dataclasses.replace(grid, scoring="choice", normalize=normalize).model_config(),
                           train_config=grid.train_config(),
                           progress=False)
    pred = trained.predict(list(val.examples), progress=False)
    conf = pred.mean_probs.max(-1).values.mean().item()
    return {"dataset": dataset, "normalize": normalize, "n": len(val), **pred.metrics(), "mean_conf": conf,
            "seconds": round(time.perf_counter() - t0, 1), "steps": grid.steps}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench/grid_cpu.json", help="grid JSON giving backbone, r, steps, lr, ...")
    p.add_argument("--datasets", default="openbookqa,arc_easy")
    p.add_argument("--normalizations", default="none,tokens,chars")
    p.add_argument("--limit", type=int, default=300, help="validation questions per data set")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/normalization")
    a = p.parse_args(argv)
    d = json.loads(Path(a.config).read_text())
    d.pop("type", None)
    if a.steps:
        d["steps"] = a.steps
    if a.backbone:
        d["backbone"] = a.backbone
    grid = GridConfig.from_dict(d)
    out = Path(a.out)
    rows = []
    for dataset in a.datasets.split(","):
        for norm in a.normalizations.split(","):
            path = out / f"{dataset}.{norm}.json"
            if path.exists():
                row = json.loads(path.read_text())
            else:
                row = run(dataset, norm, grid, limit=a.limit, device=a.device)
                atomic_write_json(path, row)
            rows.append(row)
            print(f"{row['dataset']:<12} {row['normalize']:<7} n={row['n']:<4} acc {row['acc']:.3f}  "
                  f"ece {row['ece']:.3f}  nll {row['nll']:.3f}  brier {row['brier']:.3f}  "
                  f"conf {row['mean_conf']:.3f}  ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
