"""Benchmark: choice log-likelihood scoring with the prefix (key/value) cache vs naive full sequences.

``scoring="choice"`` turns a question into ``C`` class logits ``log p(continuation_k | context)``.
Naively that is ``C`` full sequences ``context + continuation_k`` per question; with the prefix
cache the shared context runs once and its key/value cache serves all ``C`` continuations.
Caching pays when contexts are long and continuations short (BoolQ-like passages, short answers),
which is what this script builds: a ~100-200-token passage + question, 4 answers of 1-3 tokens.

For ``P`` in ``{1, 10}`` subspace values ``s`` (particles folded into the batch; particle 0 is
``s0``, the others ``s0`` times ``1 + 0.1 * noise``) and ScalaBL adapters whose ``B`` is small
random noise (so the adapters change the outputs), it compares
``net.logits(batch, s=s, prefix_cache=True)`` with ``prefix_cache=False``:

* max abs difference of the ``(P, B, C)`` logits (must be <= ``--tol``, default 1e-4; the script
  exits with status 1 otherwise), and of the gradients of a cross-entropy loss w.r.t. the adapters;
* median time under ``torch.no_grad()`` (evaluation / Predictive) and with ``backward()`` (training),
  cached and naive calls interleaved; the first call of each setting (the correctness pass) is the warmup;
* the speedups naive / cached, the padded tokens each path puts through the backbone, and the peak RSS
  growth of one training call.

Training keeps every activation of the whole batch for backward (the ``max_forward_batch`` chunking
does not bound it): the naive path needs ``P*B*C`` full sequences in one graph, ~21 GiB on SmolLM2 for
P=10, B=2. A training comparison whose naive side is estimated above ``--max-train-gib`` (default 5)
is skipped and the table says so; the no-grad comparison always runs.

Usage::

    python bench/prefix_cache.py                    # SmolLM2-135M
    python bench/prefix_cache.py --backbone tiny    # quick check on a random tiny Llama
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import cpu_snapshot, foreign_cpu, load, make_passage_examples, peak_growth_kb, table  # noqa: E402,E501


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_bytes_per_token(lm) -> int:
    """Rough activation memory that backward keeps per token: ~(10 * hidden + 5 * intermediate) values per layer.

    (Measured on SmolLM2-135M in fp32: ~2 MB per token, this gives 1.6 MB.)
    """
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    h = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or 4 * h
    size = next(lm.parameters()).element_size()
    return int(cfg.num_hidden_layers * (10 * h + 5 * inter) * size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2", help='"smollm2" (default), "tiny" (tiny_llama), or a HF id/path')
    ap.add_argument("--batch-size", type=int, default=2, help="questions per batch (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per setting (default 3)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="extra untimed calls per setting (default 0: the correctness pass already warms up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write all numbers to this JSON file (atomically)")
    ap.add_argument("--particles", type=int, nargs="+", default=[1, 10], help="P values (default 1 10)")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B init (default 0.02)")
    ap.add_argument("--max-train-gib", type=float, default=5.0,
                    help="skip the training comparison of a P whose naive path would need more activation memory "
                         "than this (estimated; default 5 GiB)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed abs logit difference (default 1e-4)")
    args = ap.parse_args(argv)

    from scalabl_pyro._utils import atomic_write_json
    from scalabl_pyro.config import ScalaBLConfig
    from scalabl_pyro.scoring import AdaptedLM

    torch.manual_seed(args.seed)
    lm, tok = load(args.backbone)
    config = ScalaBLConfig(scoring="choice")
    net = AdaptedLM(lm, tok, label_words="ABCD", config=config, subspace=True, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for site in net.subspace.sites.values():
            site.lora_B.weight.copy_(torch.randn(site.lora_B.weight.shape, generator=gen) * args.b_std)
    params = net.trainable_parameters()
    examples = make_passage_examples(args.batch_size, args.seed)
    batch = net.collate(examples)
    B, C = batch["labels"].shape[0], net.num_classes
    lc = batch["ctx_mask"].sum(-1)
    lk = batch["cont_mask"].sum(-1)
    print(f"# prefix_cache: backbone={args.backbone}  B={B} questions x C={C} choices  context tokens "
          f"min/median/max={int(lc.min())}/{int(lc.median())}/{int(lc.max())} (padded {batch['ctx_ids'].shape[1]})  "
          f"choice tokens {int(lk.min())}-{int(lk.max())}  max_forward_batch={config.max_forward_batch}  "
          f"threads={torch.get_num_threads()}  {args.repeats} timed calls per setting", flush=True)

    rows, results, failed = [], {}, False
    lc_pad, lk_pad = batch["ctx_ids"].shape[1], batch["cont_ids"].shape[-1]
    per_token = train_bytes_per_token(lm)
    snap = cpu_snapshot()
    for P in args.particles:
        noise = 1 + 0.1 * torch.randn((P, 1), generator=gen)
        noise[0] = 1.0
        s = {k: (v[None] * noise).contiguous() for k, v in net.subspace.s0.items()}  # (P, r)
        # Tokens through the backbone (padded) in one call: the naive path runs P*B*C full sequences.
        tokens = {True: P * B * lc_pad + P * B * C * lk_pad, False: P * B * C * (lc_pad + lk_pad)}
        est_gib = {k: v * per_token / 2**30 for k, v in tokens.items()}
        do_train = est_gib[False] <= args.max_train_gib

        def score(cache: bool) -> torch.Tensor:
            return net.logits(batch, s=s, prefix_cache=cache)

        def train(cache: bool) -> list[torch.Tensor]:
            logits = score(cache)  # (P, B, C)
            loss = torch.nn.functional.cross_entropy(logits.reshape(P * B, C), batch["labels"].repeat(P))
            loss.backward()
            grads = [p.grad.detach().clone() for p in params]
            for p in params:
                p.grad = None
            return grads

        # Correctness pass (doubles as the warmup call of every setting): logits, gradients, backbone
        # calls, and the peak-RSS growth of one training call.
        res = results[f"P={P}"] = {"tokens": {"cached": tokens[True], "naive": tokens[False]},
                                   "est_train_gib": {"cached": est_gib[True], "naive": est_gib[False]}}
        out, grads, mem = {}, {}, {}
        for cache in (True, False):
            name = "cached" if cache else "naive"
            c0, r0 = net.forward_calls, net.forward_rows
            with torch.no_grad():
                out[cache] = score(cache)
            res[f"{name}_backbone"] = {"calls": net.forward_calls - c0, "rows": net.forward_rows - r0}
            if do_train:
                grads[cache], mem[cache] = peak_growth_kb(lambda: train(cache))
                res[f"{name}_train_peak_growth_mib"] = None if mem[cache] is None else mem[cache] / 1024
        a, b = out[True], out[False]
        diff = float((a - b).abs().max())
        ok = diff <= args.tol and bool(torch.isfinite(a).all())
        failed |= not ok
        res.update(max_abs_logit_diff=diff, ok=bool(ok), logit_range=[float(b.min()), float(b.max())])
        if do_train:
            gdiff = max(float((x - y).abs().max()) for x, y in zip(grads[True], grads[False]))
            gscale = max(float(y.abs().max()) for y in grads[False])
            res.update(max_abs_grad_diff=gdiff, max_abs_grad=gscale)
        else:
            res["train_skipped"] = (f"naive training would hold ~{est_gib[False]:.1f} GiB of activations "
                                    f"({tokens[False]} tokens in one graph) > --max-train-gib {args.max_train_gib}")
        del grads, out

        t = {}
        modes = ("eval", "train") if do_train else ("eval",)
        for i in range(args.warmup + args.repeats):  # interleave cached/naive so drift hits both alike
            for cache in ((True, False) if i % 2 == 0 else (False, True)):
                with torch.no_grad():
                    dt = _seconds(lambda: score(cache))
                dtt = _seconds(lambda: train(cache)) if do_train else None
                if i >= args.warmup:
                    t.setdefault(("eval", cache), []).append(dt)
                    t.setdefault(("train", cache), []).append(dtt)
        for mode in modes:
            tc, tn = statistics.median(t[(mode, True)]), statistics.median(t[(mode, False)])
            res[mode] = {"cached_s": tc, "naive_s": tn, "speedup": tn / tc,
                         "cached_times_s": t[(mode, True)], "naive_times_s": t[(mode, False)]}
            if mode == "eval":
                check = f"{diff:.2e} (logits)" + ("" if ok else " FAIL")
                mc = mn = "-"
            else:
                check = f"{gdiff:.2e} (grads)"
                mib = lambda kb: "?" if kb is None else f"{kb / 1024:.0f}"  # noqa: E731
                mc, mn = mib(mem[True]), mib(mem[False])
            rows.append((P, mode, tokens[True], tokens[False], f"{1e3 * tc:.0f}", f"{1e3 * tn:.0f}",
                         f"{tn / tc:.2f}", mc, mn, check))
        if not do_train:
            rows.append((P, "train", tokens[True], tokens[False], "skipped", "skipped", "-", "-", "-",
                         f"naive needs ~{est_gib[False]:.0f} GiB > --max-train-gib"))
        print(f"P={P}: max|logit diff|={diff:.2e}"
              + (f"  max|grad diff|={gdiff:.2e} (max|grad|={gscale:.2e})" if do_train else "  (training skipped)")
              + f"  backbone calls/rows cached={res['cached_backbone']} naive={res['naive_backbone']}", flush=True)
    other_cpus = foreign_cpu(snap, cpu_snapshot())

    print("\n## Choice scoring (median ms per net.logits call on the batch; train = forward + backward)\n")
    print(table(["P", "mode", "tokens cached", "tokens naive", "cached ms", "naive ms", "speedup",
                 "train peak MiB cached", "train peak MiB naive", "max abs diff"], rows))
    print("\n(tokens = padded tokens through the backbone per call; train peak = RSS high-water mark of one "
          "training call minus the RSS before it)")
    print("\n## RATIOS (naive / cached; > 1 means the prefix cache is faster)\n")
    print(table(["ratio", "value"], [(f"P={P} {m}", f"{results[f'P={P}'][m]['speedup']:.2f}")
                                     for P in args.particles for m in ("eval", "train") if m in results[f"P={P}"]]))
    print(f"\nother processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy during the measurements"
          + (" -- WARNING: the CPU was shared; times are inflated and noisy (rerun on an idle machine)"
             if other_cpus > 0.25 else ""))
    verdict = "OK" if not failed else f"FAIL: a logit difference exceeds tol={args.tol}"
    print(f"\ncorrectness (max abs logit diff <= {args.tol}): {verdict}")

    if args.out:
        path = atomic_write_json(args.out, {
            "benchmark": "prefix_cache", "backbone": args.backbone, "batch_size": B, "num_classes": C,
            "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "tol": args.tol,
            "b_std": args.b_std, "context_tokens": lc.tolist(), "choice_tokens": lk.tolist(),
            "max_forward_batch": config.max_forward_batch, "torch_threads": torch.get_num_threads(),
            "max_train_gib": args.max_train_gib, "est_train_bytes_per_token": per_token, "results": results, "ok": not failed,
            "other_processes_cpus": other_cpus,
        })
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
