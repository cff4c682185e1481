"""Choose the demo's ScalaBL training recipe on a validation split of the *training* countries.

The default task has 156 training questions and ScalaBL has 976 latent coordinates, so the KL term of the
ELBO weighs ~1 nat per example against a data term of ~0.1-0.3. Early in training ``B`` is ~0, so the
data gradient on ``s`` is ~0 and only the KL moves the guide: its ``loc`` heads from ``s0`` to the prior
mean 0 before ``B`` has learned anything. KL annealing (``TrainConfig.kl_anneal``: the KL weight ramps from
0 to 1 over that fraction of the steps; the final objective is the plain ELBO) is the usual remedy.

This script splits the training countries 70 / 30 by seed (the test countries are not read), trains plain
LoRA and ScalaBL with each ``--kl-anneal`` value (and, with ``--centered``, with the prior ``Normal(s0, 1)``)
on the 70 % with the demo's budget and evaluates on the 30 %: acc / ECE / NLL / Brier, plus the guide's mean ``|loc| / |s0|`` and mean scale at the end. Each cell
is written to ``<out>/<name>.json`` atomically and skipped when present.

Usage::

    python bench/demo_recipe.py --out bench/demo_recipe                    # SmolLM2, ~15 min on 2 cores
    python bench/demo_recipe.py --steps 400 --kl-anneal "" --centered --out bench/demo_recipe/steps400
    python bench/demo_recipe.py --kl-anneal "" --centered --guide-lr 0.01,0.05,0.1 --split-seed 1 \
        --out bench/demo_recipe/guide_lr/split1
    python bench/demo_recipe.py --backbone tiny --steps 2 --out /tmp/recipe
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

from scalabl_pyro import country_task
from scalabl_pyro._utils import atomic_write_json
from scalabl_pyro.harness.experiment import GridConfig

from budget import validate  # bench/budget.py, beside this script


def split_by_country(examples, *, fraction: float = 0.3, seed: int = 0):
    """``(fit, validation)``: questions of a seeded ``fraction`` of the countries go to validation."""
    countries = sorted({e.id.split(":", 1)[1] for e in examples})
    random.Random(f"recipe:{seed}").shuffle(countries)
    val = set(countries[:round(fraction * len(countries))])
    held = [e.id.split(":", 1)[1] in val for e in examples]
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kl-anneal", default="0,0.5", help="comma-separated TrainConfig.kl_anneal values for ScalaBL (\"\" for none)")
    p.add_argument("--centered", action="store_true", help="also ScalaBL with the prior N(s0, 1) (no annealing)")
    p.add_argument("--guide-lr", default="0.01",
                   help="comma-separated guide learning rates for the --centered cell (default: the demo's 0.01)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="which 70/30 split of the training countries (repeated hold-out; 0 is the original split)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/demo_recipe")
    a = p.parse_args(argv)
    grid = GridConfig(backbone=a.backbone, steps=a.steps)  # the demo's settings
    fit_set, val_set = split_by_country(list(country_task("train", seed=0).examples), seed=a.split_seed)
    out = Path(a.out)
    lr0 = grid.guide_lr
    cells = [("mle", 0.0, False, lr0)] + [("scalabl", float(x), False, lr0) for x in a.kl_anneal.split(",") if x]
    cells += [("scalabl", 0.0, True, float(x)) for x in a.guide_lr.split(",") if x] if a.centered else []
    for method, kl, centered, glr in cells:
        name = "mle" if method == "mle" else ("scalabl.prior_s0" if centered else f"scalabl.kl_anneal{kl:g}")
        name += f".guide_lr{glr:g}" if glr != lr0 else ""
        path = out / f"{name}.json"
        if path.exists():
            row = json.loads(path.read_text())
        else:
            cell = dataclasses.replace(grid, kl_anneal=kl, guide_lr=glr, prior="s0" if centered else "normal")
            row = validate(method, cell, fit_set, val_set, ("A", "B", "C", "D"), a.device)
            atomic_write_json(path, row)
        extra = (f"  |loc|/|s0| {row['loc_over_s0']:.3f}  scale {row['mean_scale']:.3f}" if "mean_scale" in row else "")
        print(f"{name:<26} n_fit {row['n_fit']} n_val {row['n']}  acc {row['acc']:.3f}  "
              f"ece {row['ece']:.3f}  nll {row['nll']:.3f}  brier {row['brier']:.3f}  conf {row['mean_conf']:.3f}"
              f"{extra}  ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
