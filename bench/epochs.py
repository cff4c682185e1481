"""Held-out calibration against training epochs: how long must plain LoRA train to be over-confident?

The reference recipe (BLoB / BayesAdapt scripts: 5000 steps x batch 4) trains many epochs of the small data
sets, the regime where plain LoRA is over-confident. This script holds out a seeded ``--val-fraction`` of a
data set's *train* split (its test split is not read; WinoGrande twins stay together, as in ``budget.py``),
trains each method for ``--steps`` on the rest and evaluates it on the held-out part after every epoch
(:class:`scalabl_pyro.convergence.HeldoutCurve`, forked RNG: the training trajectory is unchanged) and at
the end. It writes, per method, ``<out>/<dataset>.<tag>.json`` (the curve, the final metrics, the fit's KL /
posterior-scale history) atomically, and ``<out>/<dataset>.curves.png`` (held-out ECE and NLL against epochs
for every finished method) and ``<out>/<dataset>.<tag>.predictions.safetensors`` (the validation
predictive; ``--paired-against TAG`` prints every run minus one with paired bootstrap intervals). Runs
checkpoint every epoch into ``--ckpt`` and resume there; a finished method is skipped.

The budget is ``--steps``, or, when that is not given and the grid's budget is in epochs (e.g.
``bench/grid_reference.json``), the grid's epochs over the fit set. ``--val-rest N`` validates instead on N
seeded questions of the train split *outside* the grid's ``train_limit`` subset, so the fit set is exactly a
grid run's training set (the reference regime) and validation is not limited to a slice of it (WinoGrande:
a question whose twin is in the fit set is never used). ``--curve-every E``: a held-out point every E epochs
(0: only the final evaluation, for studies that compare end points, e.g. prior scales).

Usage::

    python bench/epochs.py --out bench/epochs                                  # WinoGrande-S, mle + scalabl
    python bench/epochs.py --out bench/epochs --methods scalabl --prior normal
    python bench/epochs.py --backbone tiny --steps 8 --dataset countries --out /tmp/epochs
    python bench/epochs.py --dataset arc_easy --grid bench/grid_reference.json --val-rest 300 \
        --curve-every 0 --methods scalabl --prior s0:0.3 --out bench/prior_study   # prior-scale study
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from budget import guide_stats, holdout, twin_pair
from scalabl_pyro._utils import atomic_path, atomic_write_json
from scalabl_pyro.convergence import HeldoutCurve
from scalabl_pyro.harness.experiment import GridConfig, backbone_factory, resolve_task
from scalabl_pyro.harness.methods import describe_prior, train_method
from scalabl_pyro.metrics import heldout_curves_plot, paired_bootstrap


def tag_of(method: str, grid: GridConfig) -> str:
    if method not in ("scalabl", "blob", "scalabl_bayesadapt"):
        return method
    return f"{method}.prior_{grid.prior.replace(':', '_')}.guide_lr{grid.guide_lr:g}"  # s0:0.3 -> prior_s0_0.3


def run(method: str, grid: GridConfig, fit_set, val_set, words, *, out: Path, ckpt: Path, dataset: str,
        device: str, curve_every: float = 1.0, validation: str = "") -> dict:
    tag = tag_of(method, grid)
    path = out / f"{dataset}.{tag}.json"
    if path.exists():
        return json.loads(path.read_text())
    per_epoch = math.ceil(len(fit_set) / grid.batch_size)
    n_fit = len(fit_set)
    train_config = grid.train_config(num_examples=n_fit)
    steps = train_config.steps
    curves = {}

    def make_callback(model, guide):
        # temperature trains on 90% of fit_set; its epochs count over what it trains on
        num = n_fit if method != "temperature" else len(fit_set) - round(0.1 * len(fit_set))
        curves["c"] = HeldoutCurve(model, guide, val_set, every=max(1, round(curve_every * per_epoch)), num_data=num,
                                   batch_size=grid.batch_size,
                                   num_samples=grid.num_samples, path=ckpt / f"{dataset}.{tag}.curve.json")
        return curves["c"]

    torch.manual_seed(0)
    t0 = time.perf_counter()
    trained = train_method(method, backbone_factory(grid.backbone, device), fit_set, label_words=words,
                           config=grid.model_config(), train_config=train_config, num_samples=grid.num_samples,
                           prior=grid.prior, progress=False, checkpoint_dir=ckpt / f"{dataset}.{tag}",
                           checkpoint_every=per_epoch, make_callback=make_callback if curve_every > 0 else None)
    records = []
    if curve_every > 0:
        curves["c"].record(steps)  # the last point (temperature: of its LoRA model, before T)
        records = curves["c"].records
    pred = trained.predict(val_set)
    metrics = {**pred.metrics(), "mean_conf": float(pred.mean_probs.max(-1).values.mean())}
    row = {"method": method, "tag": tag, "dataset": dataset, "steps": steps, "batch_size": grid.batch_size,
           "lr": grid.lr, "n_fit": n_fit, "n_val": len(val_set), "validation": validation,
           **({"guide_lr": grid.guide_lr, "prior": describe_prior(grid.prior)} if tag != method else {}),
           "epochs": round(steps * grid.batch_size / n_fit, 2), **metrics,
           "temperature": trained.temperature, "curve": records,
           "history": trained.history, "seconds": round(time.perf_counter() - t0, 1),
           "date": time.strftime("%Y-%m-%d")}
    if method == "scalabl":
        row.update(guide_stats(trained))
    with atomic_path(out / f"{dataset}.{tag}.predictions.safetensors") as tmp:  # for paired comparisons
        save_file({"mean_probs": pred.mean_probs.contiguous(), "labels": pred.labels.contiguous()}, str(tmp))
    atomic_write_json(path, row)  # written last: marks the run finished
    shutil.rmtree(ckpt / f"{dataset}.{tag}", ignore_errors=True)  # its checkpoints are no longer needed
    return row


def paired_against(out: Path, dataset: str, reference: str) -> None:
    """Print every finished run on ``dataset`` minus the run tagged ``reference``: 95% paired bootstrap over
    the same validation questions (:func:`~scalabl_pyro.metrics.paired_bootstrap`)."""
    def load(tag):
        f = out / f"{dataset}.{tag}.predictions.safetensors"
        return load_file(str(f)) if f.exists() else None
    ref = load(reference)
    if ref is None:
        raise SystemExit(f"no predictions for {dataset}.{reference} in {out}: run it first (or check the tag)")
    for f in sorted(out.glob(f"{dataset}.*.json")):
        tag = json.loads(f.read_text())["tag"]
        other = load(tag)
        if tag == reference or other is None or not torch.equal(other["labels"], ref["labels"]):
            continue
        d = paired_bootstrap(other["mean_probs"], ref["mean_probs"], ref["labels"])
        print(f"{tag} - {reference}: " + "  ".join(f"{k} {v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in d.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="winogrande_s")
    p.add_argument("--methods", default="mle,scalabl")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the grid's epochs over the fit set if its budget is in epochs, else 1000)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--val-rest", type=int, default=None,
                   help="validate on this many questions of the train split outside the grid's train_limit subset "
                        "(the fit set is then the whole subset) instead of a --val-fraction slice of it")
    p.add_argument("--curve-every", type=float, default=1.0,
                   help="epochs between held-out curve points (0: only the final evaluation)")
    p.add_argument("--grid", default="bench/grid_cpu.json", help="grid config giving every other setting")
    p.add_argument("--backbone", default=None, help="override the grid's backbone (e.g. tiny)")
    p.add_argument("--prior", default="s0", help="ScalaBL's prior: 's0' or 'normal', optionally ':<scale>' ('s0:0.3')")
    p.add_argument("--guide-lr", type=float, default=0.05, help="ScalaBL's guide learning rate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/epochs")
    p.add_argument("--ckpt", default=None, help="checkpoints and partial curves (default: <out>/ckpt, not committed)")
    p.add_argument("--paired-against", default=None, metavar="TAG",
                   help="train nothing: print each finished run minus the run TAG (paired bootstrap on the validation)")
    a = p.parse_args(argv)
    if a.paired_against:
        return paired_against(Path(a.out), a.dataset, a.paired_against)
    grid = GridConfig.load(a.grid)
    if a.curve_every < 0:
        p.error(f"--curve-every {a.curve_every:g} must be >= 0 (epochs between curve points; 0: none)")
    budget = ({"steps": a.steps, "epochs": None} if a.steps is not None
              else {} if grid.epochs is not None else {"steps": 1000})
    grid = dataclasses.replace(grid, prior=a.prior, guide_lr=a.guide_lr, **budget,
                               **({"backbone": a.backbone} if a.backbone else {}))
    train = resolve_task(a.dataset, "train", data_dir=grid.data_dir, limit=grid.train_limit, seed=0)
    group = twin_pair if a.dataset.startswith("winogrande") else (lambda e: e.id)
    if a.val_rest is None:
        fit_set, val_set = holdout(list(train.examples), fraction=a.val_fraction, group=group)
    else:
        if grid.train_limit is None:
            p.error("--val-rest needs a grid with a train_limit (the questions outside that subset validate); "
                    "use --val-fraction with this grid")
        fit_set = list(train.examples)
        taken = {group(e) for e in fit_set}
        full = resolve_task(a.dataset, "train", data_dir=grid.data_dir)
        rest = [e for e in full.examples if group(e) not in taken]
        if len(rest) < a.val_rest:
            p.error(f"--val-rest {a.val_rest}: only {len(rest)} {a.dataset} train questions lie outside the "
                    f"{len(fit_set)}-question subset; ask for at most {len(rest)}")
        random.Random(f"val-rest:{a.dataset}").shuffle(rest)
        val_set = rest[:a.val_rest]
    validation = (f"{a.val_fraction:g} of the {grid.train_limit or 'full'}-question train subset" if a.val_rest is None
                  else f"{a.val_rest} train questions outside the {len(fit_set)}-question subset")
    out = Path(a.out)
    ckpt = Path(a.ckpt) if a.ckpt else out / "ckpt"
    rows = {}
    for method in a.methods.split(","):
        row = run(method, grid, fit_set, val_set, train.label_words, out=out, ckpt=ckpt, dataset=a.dataset,
                  device=a.device, curve_every=a.curve_every, validation=validation)
        rows[row["tag"]] = row
        print(f"{row['tag']:<32} {row['epochs']:>5.1f} ep  n_val {row['n_val']}  acc {row['acc']:.3f}  "
              f"ece {row['ece']:.3f}  nll {row['nll']:.3f}  brier {row['brier']:.3f}  conf {row['mean_conf']:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)
        for r in row["curve"]:
            print(f"    epoch {r['epoch']:>5.2f}  acc {r['acc']:.3f}  ece {r['ece']:.3f}  nll {r['nll']:.3f}  "
                  f"conf {r['mean_conf']:.3f}  mi {r['mean_mi']:.4f}", flush=True)
    done = {r["tag"]: r["curve"] for r in (json.loads(f.read_text()) for f in sorted(out.glob(f"{a.dataset}.*.json")))
            if r["curve"]}  # --curve-every 0 runs have no curve
    if done:
            heldout_curves_plot(done, out / f"{a.dataset}.curves.png",
                            title=f"{a.dataset}: held-out (validation) calibration while training")


if __name__ == "__main__":
    main()
