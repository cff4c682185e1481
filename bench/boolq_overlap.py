"""How much does BoolQ's fallback split leak? Metrics on test questions whose passage is also in train.

BoolQ ships no labelled local train split, so :func:`scalabl_pyro.harness.data.load_task` splits the validation
file 50/50 by question (seeded). BoolQ asks up to ~4 questions about the same Wikipedia passage, so some test
questions share their passage with a training question (not their answer). This script reads the grid's
saved predictions (``<results>/boolq.<method>.seed<k>/predictions.safetensors``), splits the test questions
into those whose passage appears in train and the rest, and prints accuracy / NLL / ECE of each method on
both parts (mean over the seeds present), plus the share of "yes" answers, which BoolQ accuracy tracks at
this model size. No model is run: seconds on a CPU.

Usage::

    python bench/boolq_overlap.py                        # bench/results, the grid's 300 test questions
    python bench/boolq_overlap.py --results bench/results --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from scalabl_pyro.harness.experiment import GridConfig, resolve_task
from scalabl_pyro.metrics import classification_metrics


def passage(example) -> str:
    """The passage of a BoolQ prompt (``"<passage>\\nQuestion: ..."``, as :mod:`scalabl_pyro.harness.data` writes it)."""
    head, sep, _ = example.context.partition("\nQuestion:")
    if not sep:
        raise SystemExit(f"BoolQ item {example.id!r} has no '\\nQuestion:' in its prompt: the prompt format of "
                         f"scalabl_pyro.harness.data changed; update passage() in this script")
    return head


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default="bench/results", help="grid output folder (holds grid.json)")
    ap.add_argument("--data-dir", default=None, help="benchmark JSONL root (default: the grid's / ../shared/data)")
    args = ap.parse_args(argv)
    results = Path(args.results)
    grid = GridConfig.load(results / "grid.json")
    data_dir = args.data_dir or grid.data_dir
    train = resolve_task("boolq", "train", data_dir=data_dir, limit=grid.train_limit, seed=0)
    test = resolve_task("boolq", "test", data_dir=data_dir, limit=grid.test_limit, seed=0)
    seen = {passage(e) for e in train.examples}
    shared = torch.tensor([passage(e) in seen for e in test.examples])
    labels = torch.tensor([e.label for e in test.examples])
    parts = {"shared": shared, "unshared": ~shared}
    print(f"BoolQ test: {len(test)} questions, {int(shared.sum())} ({shared.float().mean():.1%}) share their "
          f"passage with a training question; 'yes' rate {labels[shared].float().mean():.3f} (shared) vs "
          f"{labels[~shared].float().mean():.3f} (unshared)\n")
    rows = defaultdict(list)
    for path in sorted(results.glob("boolq.*.seed*/predictions.safetensors")):
        saved = load_file(str(path))
        if not torch.equal(saved["boolq.labels"].long(), labels):
            raise SystemExit(f"{path}: its labels differ from the BoolQ test split loaded here; pass the "
                             f"--data-dir the grid ran on")
        probs = saved["boolq.mean_probs"].double()
        m = {k: classification_metrics(probs[mask], labels[mask]) for k, mask in
             {"all": torch.ones_like(shared), **parts}.items()}
        rows[path.parent.name.split(".")[1]].append(m)
    print("| method | seeds | acc all / shared / unshared | NLL all / shared / unshared | ECE unshared |")
    print("|---|---|---|---|---|")
    for method, runs in rows.items():
        mean = {part: {k: sum(r[part][k] for r in runs) / len(runs) for k in ("acc", "nll", "ece")}
                for part in ("all", "shared", "unshared")}
        print(f"| {method} | {len(runs)} | " + " / ".join(f"{mean[p]['acc']:.3f}" for p in ("all", "shared", "unshared"))
              + " | " + " / ".join(f"{mean[p]['nll']:.3f}" for p in ("all", "shared", "unshared"))
              + f" | {mean['unshared']['ece']:.3f} |")


if __name__ == "__main__":
    main()
