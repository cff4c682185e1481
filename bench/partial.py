"""Benchmark: the posterior predictive of partial-Bayesian ScalaBL against one deterministic forward.

Three models on their own copies of the same backbone, evaluated on the same ``B`` questions:

* ``lora``     plain peft LoRA: one deterministic forward, ``net.logits(batch)`` (the unit of the ratios).
* ``full``     ScalaBL, every adapted module stochastic: ``Predictive(model, guide, num_samples=S,
               parallel=True)``; its ``S * B`` rows go through every layer.
* ``last2``    ScalaBL with only ``lm_head`` and the last ``--layers`` (2) decoder layers stochastic
               (``ScalaBL(net, stochastic=last_layers(net, 2))``): the same ``Predictive`` call; the layers
               below run once on ``B`` rows and their output is repeated ``S`` times (:mod:`scalabl_pyro.trunk`).

Printed: median seconds over ``--repeats`` interleaved calls (after one warmup), the ratios
``Predictive / deterministic forward`` (issue target for ``last2``: at most 2 with S = 10), the rows the
decoder took, and the largest difference between the shared and the unshared (``share_trunk=False``)
computation of the same posterior samples (must be below 1e-5).

Usage::

    python bench/partial.py                     # SmolLM2-135M, choice and letter format, B = 8, S = 10
    python bench/partial.py --backbone tiny     # seconds: checks that the script runs
    python bench/partial.py --out bench/partial.json
    python bench/partial.py --device cuda       # on a GPU (timings synchronized)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit  # noqa: E402
from benchkit import cpu_snapshot, foreign_cpu, load, make_mc_examples, sync, table  # noqa: E402


def build(args, scoring: str):
    import pyro

    from scalabl_pyro import AdaptedLM, ScalaBL, ScalaBLConfig, default_guide
    from scalabl_pyro.trunk import last_layers

    cfg = ScalaBLConfig(scoring=scoring, **({"max_forward_batch": args.max_forward_batch}
                                            if args.max_forward_batch else {}))
    examples = make_mc_examples(args.batch_size, args.seed)
    out = {}
    for name in ("lora", "full", "last2"):
        pyro.clear_param_store()
        lm, tok = load(args.backbone)
        net = AdaptedLM(lm, tok, label_words="ABCD", config=cfg, subspace=name != "lora", seed=args.seed)
        batch = net.collate(examples)
        if name == "lora":
            out[name] = (net, None, None, batch)
            continue
        part = {"stochastic": last_layers(net, args.layers)} if name == "last2" else {}
        model = ScalaBL(net, num_data=1000, name=name, **part)
        guide = default_guide(model)
        with torch.no_grad():
            guide(batch, batch["labels"])
        out[name] = (net, model, guide, batch)
    return out


def run_once(name, entry, S):
    from pyro.infer import Predictive

    net, model, guide, batch = entry
    r0 = net.forward_rows
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        if model is None:
            probs = net.logits(batch)[0].softmax(-1)
        else:
            probs = Predictive(model, guide=guide, num_samples=S, parallel=True, return_sites=("probs",))(batch)["probs"]
    sync()
    return time.perf_counter() - t0, net.forward_rows - r0, probs


def max_shared_diff(entry, S, seed) -> float:
    """The same posterior samples, shared trunk vs ``share_trunk=False``: the largest difference in probabilities."""
    import pyro

    net, model, guide, batch = entry
    res = []
    for share in (True, False):
        orig = net.logits
        net.logits = lambda b, **kw: orig(b, **{**kw, "share_trunk": share})  # noqa: B023
        try:
            pyro.set_rng_seed(seed)
            res.append(run_once("last2", entry, S)[2])
        finally:
            del net.logits
    return float((res[0] - res[1]).abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=10)
    ap.add_argument("--layers", type=int, default=2, help="stochastic decoder layers of the partial model (default 2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scoring", default="choice,letter", help="comma-separated formats (default choice,letter)")
    ap.add_argument("--max-forward-batch", type=int, default=None,
                    help="ScalaBLConfig.max_forward_batch of all three models (default: the config's, 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write all numbers to this JSON file (atomically)")
    ap.add_argument("--device", default="cpu", help='"cpu" (default), "cuda" or "auto"')
    args = ap.parse_args(argv)
    from scalabl_pyro.backbones import resolve_device

    benchkit.DEVICE = resolve_device(args.device)  # load() and sync() read it
    import pyro

    from scalabl_pyro._utils import atomic_write_json

    torch.manual_seed(args.seed)
    S, results = args.num_samples, {}
    print(f"# partial: backbone={args.backbone} B={args.batch_size} S={S} last {args.layers} layers + lm_head "
          f"stochastic; device={benchkit.DEVICE} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"pyro={pyro.__version__}")
    for scoring in args.scoring.split(","):
        entries = build(args, scoring)
        names = list(entries)
        times = {n: [] for n in names}
        rows = {}
        snap = cpu_snapshot()
        for i in range(1 + args.repeats):
            for n in names[i % 3:] + names[:i % 3]:
                dt, rws, _ = run_once(n, entries[n], S)
                rows[n] = rws
                if i:
                    times[n].append(dt)
        other = foreign_cpu(snap, cpu_snapshot())
        med = {n: statistics.median(v) for n, v in times.items()}
        diff = max_shared_diff(entries["last2"], S, args.seed)
        L = entries["last2"][0].num_layers
        nlat = len(entries["last2"][1].latent_sites)
        print(f"\n## {scoring} format ({L} decoder layers; last2 has {nlat} latent sites of "
              f"{len(entries['full'][1].latent_sites)})\n")
        print(table(["variant", "median s", "min s", "decoder rows", "/ deterministic forward"], [
            (n, f"{med[n]:.3f}", f"{min(times[n]):.3f}", rows[n], f"{med[n] / med['lora']:.2f}") for n in names]))
        print(f"\nshared vs unshared trunk, same samples: max |probability difference| = {diff:.2e}")
        print(f"other processes kept {other:.2f} CPUs busy")
        results[scoring] = {"median_s": med, "times_s": times, "decoder_rows": rows, "max_shared_diff": diff,
                            "ratios": {"full/lora": med["full"] / med["lora"], "last2/lora": med["last2"] / med["lora"],
                                       "full/last2": med["full"] / med["last2"]},
                            "latent_sites": {"full": len(entries["full"][1].latent_sites), "last2": nlat},
                            "other_processes_cpus": other}
        del entries
    print("\n## RATIOS (Predictive S samples / one deterministic forward; target for last2 <= 2)\n")
    print(table(["format", "full / lora", "last2 / lora", "full / last2", "max shared diff"], [
        (k, f"{v['ratios']['full/lora']:.2f}", f"{v['ratios']['last2/lora']:.2f}", f"{v['ratios']['full/last2']:.2f}",
         f"{v['max_shared_diff']:.1e}") for k, v in results.items()]))
    if args.out:
        print(f"\nwrote {atomic_write_json(args.out, {'benchmark': 'partial', **vars(args), 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
