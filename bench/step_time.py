"""Benchmark: one ScalaBL SVI step vs one plain peft-LoRA step (same backbone, batch and process).

What it measures (medians over ``--repeats`` timed steps; warmup steps excluded; ``time.perf_counter``):

* ``lora``          plain peft LoRA, letter scoring: ``cross_entropy(net.logits(batch)[0], labels)``,
                    ``backward``, one fused ``torch.optim.AdamW`` over the LoRA tensors, ``zero_grad``.
* ``scalabl_svi``   ScalaBL (``A = diag(s) V``) with ``default_guide`` and
                    ``SVI(model, guide, make_optimizer(TrainConfig()), make_elbo(TrainConfig()))``;
                    step = ``svi.step(batch, labels, num_data=N)``. The LR-scheduler advance that
                    ``train.fit`` does after every step (``optim.step()``) is timed separately.
* ``scalabl_torch`` the same model and guide, trained by a plain torch loop:
                    ``Trace_ELBO(max_plate_nesting=1).differentiable_loss`` + one fused AdamW over
                    ``net.trainable_parameters() + guide.parameters()``. ``svi - torch`` isolates the
                    Pyro optimizer (one AdamW + clipping per parameter tensor) from the model itself.
* ``scalabl_fit``   the step ``train.fit`` takes: ``autonormal_elbo_loss`` (the default guide's ELBO, all sites at
                    once, summed on the device; ``elbo_loss`` for other guides) + ``FusedAdamW``
                    (one fused AdamW in two groups, per-tensor clipping in one pass, LR schedule), one host
                    read; on its own backbone copy.
* ``vectorized_fit`` the same step on ``ScalaBL(net, layout="vectorized")`` (one plated site ``lora.s``).
* ``svi_fast``      a bare ``SVI(model, guide, make_optimizer(TrainConfig(), fused=True), make_elbo(..))`` step
                    (+ the schedule) inside ``pyro.validation_enabled(False)``: the SVI setup for speed.

The variants run in the same process on separate backbone copies (plain LoRA on one, the SVI/torch
ScalaBL steps on a second, each fit variant on its own) and are interleaved within each repeat, with a rotating order,
so drift (thermal, other load) hits them alike.

Peak memory: each variant also runs in its own fresh subprocess (``--variant``). After the model
(backbone + adapters + Pyro model/guide/optimizer) is built, the process's resident-set high-water
mark is reset (Linux ``/proc/self/clear_refs``; if that is not allowed, the lifetime peak
``ru_maxrss`` is used instead and the line says so), then warmup + a few steps run. Reported:
peak RSS over the steps, and the growth over the RSS right after model load (activations, grads,
optimizer state), plus the lifetime peak from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

Predictive throughput: ``Predictive(model, guide, num_samples=S, parallel=True/False)`` on one batch,
questions per second, and the number of backbone calls/rows (``net.forward_calls`` /
``net.forward_rows``) per Predictive call: with ``parallel=True`` one expects
``ceil(S*B / max_forward_batch)`` calls and no extra call for Predictive's shape-inference passes.

Usage::

    python bench/step_time.py                       # SmolLM2-135M, batch 8
    python bench/step_time.py --backbone tiny       # quick check on a random tiny Llama
    python bench/step_time.py --backbone random:llama-1b --device cuda   # random weights, Llama-3.2-1B's shape
                                                    # (also random:llama-7b, random:qwen2-1.5b, random:qwen2-7b;
                                                    # 4 backbone copies: a GPU, or >= 4x the model's fp32 size)
    python bench/step_time.py --out results/step_time.json
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

import benchkit  # noqa: E402  (bench/benchkit.py)
from benchkit import (cpu_snapshot, foreign_cpu, load, make_mc_examples,  # noqa: E402
                      maxrss_kb, median_ms, reset_peak, status_kb, sync, table)

_MARK = "@@BENCH_JSON@@"


# ------------------------------------------------------------------------------------------ variants
VARIANTS = ("lora", "scalabl_svi", "scalabl_torch", "scalabl_fit", "vectorized_fit")

def build_lora(lm, tok, config):
    from scalabl_pyro.scoring import AdaptedLM

    net = AdaptedLM(lm, tok, label_words="ABCD", config=config, subspace=False)
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def step(batch):
        loss = torch.nn.functional.cross_entropy(net.logits(batch)[0], batch["labels"].to(benchkit.DEVICE))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return net, step


def scalabl_model(lm, tok, config, num_data, batch_examples, layout="modules"):
    """``(net, model, guide)``: ScalaBL (``layout``) with ``default_guide``, its parameters created on one batch."""
    from scalabl_pyro.guides import default_guide
    from scalabl_pyro.model import ScalaBL
    from scalabl_pyro.scoring import AdaptedLM

    net = AdaptedLM(lm, tok, label_words="ABCD", config=config, subspace=True)
    model = ScalaBL(net, num_data=num_data, layout=layout)
    guide = default_guide(model)
    batch = net.collate(batch_examples)
    with torch.no_grad():
        guide(batch, batch["labels"], num_data=num_data)  # autoguides create their params lazily
    return net, model, guide


def build_scalabl(lm, tok, config, num_data, batch_examples, layout="modules", fused=False):
    """ScalaBL model (``layout``) + default guide; returns (net, model, guide, svi_step, sched_step, torch_step).
    ``fused``: ``make_optimizer(fused=True)`` (one fused AdamW) instead of Pyro's per-tensor optimizers."""
    from pyro.infer import SVI, Trace_ELBO

    from scalabl_pyro.config import TrainConfig
    from scalabl_pyro.train import make_elbo, make_optimizer

    net, model, guide = scalabl_model(lm, tok, config, num_data, batch_examples, layout=layout)
    tcfg = TrainConfig()
    optim = make_optimizer(tcfg, model_prefix=model.name, fused=fused)
    svi = SVI(model, guide, optim, make_elbo(tcfg))
    elbo = Trace_ELBO(max_plate_nesting=1)
    params = list(net.trainable_parameters()) + list(guide.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def svi_step(b):
        return svi.step(b, b["labels"], num_data=num_data)

    def sched_step():
        optim.step()  # what train.fit does after every svi.step: advance the LR schedule

    def torch_step(b):
        loss = elbo.differentiable_loss(model, guide, b, b["labels"], num_data=num_data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return net, model, guide, svi_step, sched_step, torch_step


def build_fit_step(lm, tok, config, num_data, batch_examples, layout="modules"):
    """The step ``train.fit`` takes (:func:`autonormal_elbo_loss` for the default guide, else :func:`elbo_loss`;
    :class:`FusedAdamW`; one host read; Pyro's validation off) on its own model."""
    import pyro
    from pyro import poutine

    from scalabl_pyro.config import TrainConfig
    from scalabl_pyro.optim import FusedAdamW, autonormal_elbo_loss, autonormal_path_applies, elbo_loss
    from scalabl_pyro.train import make_elbo

    net, model, guide = scalabl_model(lm, tok, config, num_data, batch_examples, layout=layout)
    tcfg = TrainConfig()
    optim, elbo = FusedAdamW(tcfg, model_prefix=model.name), make_elbo(tcfg)

    with pyro.validation_enabled(tcfg.validate):
        fast = autonormal_path_applies(elbo, model, guide)  # the guide has run (scalabl_model): True here

    def fit_step(b):
        with pyro.validation_enabled(tcfg.validate), poutine.trace(param_only=True) as params:
            if fast:
                loss, surrogate = autonormal_elbo_loss(model, guide, b, b["labels"], num_data=num_data)
            else:
                loss, surrogate = elbo_loss(elbo, model, guide, b, b["labels"], num_data=num_data)
        surrogate.backward()
        optim.step(params.trace)
        return float(loss)

    return net, fit_step


def _config(scoring="letter"):
    from scalabl_pyro.config import ScalaBLConfig

    return ScalaBLConfig(scoring=scoring)


# ---------------------------------------------------------------------------------- memory (child)
def run_variant(args) -> dict:
    """Child process: build one variant, reset the RSS peak, run warmup + a few steps, report memory."""
    import pyro

    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    examples = make_mc_examples(args.batch_size, args.seed)
    lm, tok = load(args.backbone)
    if args.variant == "lora":
        net, step = build_lora(lm, tok, _config())
    elif args.variant.endswith("_fit"):
        layout = "vectorized" if args.variant.startswith("vectorized") else "modules"
        net, step = build_fit_step(lm, tok, _config(), args.num_data, examples, layout=layout)
    else:
        net, _, _, svi_step, sched_step, torch_step = build_scalabl(lm, tok, _config(), args.num_data, examples)
        step = (lambda b: (svi_step(b), sched_step())) if args.variant == "scalabl_svi" else torch_step
    batch = net.collate(examples)
    gc.collect()
    if benchkit.DEVICE.type == "cuda":  # GPU memory: torch's allocator peak over the steps
        sync()
        after_load = torch.cuda.memory_allocated(benchkit.DEVICE) // 1024
        torch.cuda.reset_peak_memory_stats(benchkit.DEVICE)
        for _ in range(args.mem_steps):
            step(batch)
        sync()
        peak = torch.cuda.max_memory_allocated(benchkit.DEVICE) // 1024
        return {"variant": args.variant, "rss_after_load_kb": after_load, "peak_kb": peak,
                "peak_method": "torch.cuda.max_memory_allocated (reset after load)", "ru_maxrss_kb": maxrss_kb(),
                "growth_kb": peak - after_load, "steps": args.mem_steps}
    rss_after_load = status_kb("VmRSS")
    lifetime_peak_before = maxrss_kb()
    reset_ok = reset_peak()
    for _ in range(args.mem_steps):
        step(batch)
    hwm = status_kb("VmHWM") if reset_ok else None
    lifetime_peak = maxrss_kb()
    peak = hwm if reset_ok else lifetime_peak
    return {"variant": args.variant, "rss_after_load_kb": rss_after_load, "peak_kb": peak,
            "peak_method": "VmHWM reset after load" if reset_ok else "ru_maxrss (lifetime peak)",
            "ru_maxrss_kb": lifetime_peak, "ru_maxrss_before_steps_kb": lifetime_peak_before,
            "growth_kb": None if rss_after_load is None else peak - rss_after_load, "steps": args.mem_steps}


def measure_memory(args) -> dict:
    out = {}
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--backbone", args.backbone,
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--num-data", str(args.num_data),
               "--mem-steps", str(args.mem_steps), "--device", str(benchkit.DEVICE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess {variant} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        out[variant] = json.loads(lines[-1][len(_MARK):])
    return out


# ------------------------------------------------------------------------------------ timing (main)
def time_steps(args, lora_step, scalabl_svi, sched_step, scalabl_torch, batch_ref, batch_sbl, fits=()) -> dict:
    """``fits``: extra ``(name, step, batch)`` variants (the fit step per layout), interleaved with the rest."""
    runs = [("lora", lambda: lora_step(batch_ref)),
            ("scalabl_svi", lambda: scalabl_svi(batch_sbl)),
            ("scalabl_torch", lambda: scalabl_torch(batch_sbl))]
    runs += [(name, (lambda f, b: lambda: f(b))(f, b)) for name, f, b in fits]
    times = {name: [] for name, _ in runs}
    times["scheduler"] = []
    for i in range(args.warmup + args.repeats):
        k = i % len(runs)
        for name, fn in runs[k:] + runs[:k]:  # rotate the order: no variant always runs first
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            if name == "scalabl_svi":
                t1 = time.perf_counter()
                sched_step()
                sync()
                ds = time.perf_counter() - t1
            if i >= args.warmup:
                times[name].append(dt)
                if name == "scalabl_svi":
                    times["scheduler"].append(ds)
    return times


def _stub_logits(net):
    """A stand-in for ``net.logits`` without the backbone: tiny ops that still reach every LoRA tensor and ``s``.

    Timing the training steps with it measures what ScalaBL adds around the backbone (Pyro tracing, guide,
    ELBO, optimizer), a number that other processes on the CPU disturb far less than whole steps.
    """
    from scalabl_pyro.layers import lora_layers, site_name

    layers = [(site_name(name), m.lora_A["default"], m.lora_B["default"])
              for name, m in lora_layers(net.peft_model).items()]

    def logits(batch, *, s=None, prefix_cache=None):
        B, C = batch["labels"].shape[0], net.num_classes
        P = 1 if s is None else next(iter(s.values())).reshape(-1, net.config.r).shape[0]
        acc = torch.zeros(P, device=benchkit.DEVICE)
        for site, A, Bm in layers:
            a = A.weight.sum(-1)  # (r,)
            if s is not None:
                a = a * s[site].reshape(-1, a.shape[-1])  # (P, r)
            acc = acc + (Bm.weight.sum(0) * a).sum(-1)
        return (1e-3 * acc).reshape(P, 1, 1) * torch.arange(C, dtype=torch.float32, device=benchkit.DEVICE).expand(P, B, C)

    return logits


def time_overhead(args, nets, steps, batches) -> dict:
    """Median step time of each variant with the backbone replaced by :func:`_stub_logits`."""
    import contextlib

    @contextlib.contextmanager
    def stubbed():
        for net in nets:
            net.logits = _stub_logits(net)  # instance attribute shadows the method
        try:
            yield
        finally:
            for net in nets:
                del net.logits

    n = max(20, 5 * args.repeats)
    out = {}
    with stubbed():
        for name, fn in steps.items():
            b = batches[name]
            for _ in range(3):
                fn(b)
            ts = []
            for _ in range(n):
                sync()
                t0 = time.perf_counter()
                fn(b)
                sync()
                ts.append(time.perf_counter() - t0)
            out[name] = ts
    return out


def time_predictive(args, model, guide, batch) -> dict:
    from pyro.infer import Predictive

    net = model.net
    S, B = args.num_samples, batch["labels"].shape[0]
    res = {}
    for parallel in (True, False):
        pred = Predictive(model, guide=guide, num_samples=S, parallel=parallel, return_sites=("probs",))
        ts, calls, rows = [], [], []
        for i in range(1 + args.predictive_repeats):
            c0, r0 = net.forward_calls, net.forward_rows
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                probs = pred(batch)["probs"]
            sync()
            dt = time.perf_counter() - t0
            calls.append(net.forward_calls - c0)
            rows.append(net.forward_rows - r0)
            if i >= 1:
                ts.append(dt)
        assert probs.reshape(S, B, -1).shape == (S, B, net.num_classes), probs.shape
        res["parallel" if parallel else "sequential"] = {
            "median_s": statistics.median(ts), "questions_per_s": B / statistics.median(ts),
            "forward_calls": calls[-1], "forward_rows": rows[-1], "times_s": ts,
        }
    res["expected_parallel_calls"] = math.ceil(S * B / net.config.max_forward_batch)
    res["useful_rows"] = S * B
    res["speedup"] = res["sequential"]["median_s"] / res["parallel"]["median_s"]
    return res


def profile_step(step, batch, n: int, top: int = 25) -> str:
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        step(batch)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="smollm2", help='"smollm2" (default), "tiny" (tiny_llama), or a HF id/path')
    ap.add_argument("--batch-size", type=int, default=8, help="questions per step (default 8)")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per variant (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write all numbers to this JSON file (atomically)")
    ap.add_argument("--num-data", type=int, default=1000, help="N, the data set size for the likelihood scale")
    ap.add_argument("--num-samples", type=int, default=10, help="S posterior samples for Predictive (default 10)")
    ap.add_argument("--predictive-repeats", type=int, default=2, help="timed Predictive calls per mode (default 2)")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per memory subprocess (default 3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also cProfile N ScalaBL SVI steps and print the top functions")
    ap.add_argument("--device", default="cpu", help='"cpu" (default), "cuda" or "auto"')
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from scalabl_pyro.backbones import resolve_device

    benchkit.DEVICE = resolve_device(args.device)

    if args.variant:  # child process of the memory measurement
        print(_MARK + json.dumps(run_variant(args)), flush=True)
        return 0

    import pyro

    from scalabl_pyro._utils import atomic_write_json
    from scalabl_pyro.model import count_parameters

    torch.manual_seed(args.seed)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    examples = make_mc_examples(args.batch_size, args.seed)

    t_start = t0 = time.perf_counter()
    phases = {}
    lm1, tok1 = load(args.backbone)
    net_ref, lora_step = build_lora(lm1, tok1, _config())
    lm2, tok2 = load(args.backbone)  # fresh copy for ScalaBL
    net, model, guide, svi_step, sched_step, torch_step = build_scalabl(lm2, tok2, _config(), args.num_data, examples)
    fit_nets, fits = {}, []
    for name, layout in (("scalabl_fit", "modules"), ("vectorized_fit", "vectorized")):
        lm_f, tok_f = load(args.backbone)  # each fit variant trains its own copy
        net_f, step_f = build_fit_step(lm_f, tok_f, _config(), args.num_data, examples, layout=layout)
        fit_nets[name] = net_f
        fits.append((name, step_f, net_f.collate(examples)))
    # a bare SVI.step set up for speed: make_optimizer(fused=True), Pyro's validation off (as fit runs)
    lm_f, tok_f = load(args.backbone)
    net_f, _, _, fast_svi, fast_sched, _ = build_scalabl(lm_f, tok_f, _config(), args.num_data, examples, fused=True)

    def svi_fast_step(b, _svi=fast_svi, _sched=fast_sched):
        with pyro.validation_enabled(False):
            loss = _svi(b)
        _sched()
        return loss

    fit_nets["svi_fast"] = net_f
    fits.append(("svi_fast", svi_fast_step, net_f.collate(examples)))
    load_s = phases["build"] = time.perf_counter() - t0
    batch_ref, batch = net_ref.collate(examples), net.collate(examples)
    ntok = batch["attention_mask"].sum(-1)
    counts = count_parameters(model, guide)
    sites = len(model.latent_sites)
    r = net.config.r

    print(f"# step_time: backbone={args.backbone}  batch={args.batch_size}  prompt tokens "
          f"min/median/max={int(ntok.min())}/{int(ntok.median())}/{int(ntok.max())} (padded to {batch['input_ids'].shape[1]})"
          f"  threads={torch.get_num_threads()}  torch={torch.__version__}  pyro={pyro.__version__}  device={benchkit.DEVICE}"
          + (f" ({torch.cuda.get_device_name(benchkit.DEVICE)})" if benchkit.DEVICE.type == "cuda" else ""))
    print(f"# build (5 backbone loads + adapters) {load_s:.1f} s; timing {args.repeats} steps/variant after "
          f"{args.warmup} warmup, interleaved with rotating order", flush=True)

    t0 = time.perf_counter()
    snap = cpu_snapshot()
    times = time_steps(args, lora_step, svi_step, sched_step, torch_step, batch_ref, batch, fits)
    other_cpus = foreign_cpu(snap, cpu_snapshot())
    phases["steps"] = time.perf_counter() - t0
    med = {k: median_ms(v) for k, v in times.items()}
    paired = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    ratios = {
        "scalabl_svi/lora": med["scalabl_svi"] / med["lora"],
        "scalabl_svi+sched/lora": (med["scalabl_svi"] + med["scheduler"]) / med["lora"],
        "scalabl_torch/lora": med["scalabl_torch"] / med["lora"],
        "scalabl_svi/scalabl_torch": med["scalabl_svi"] / med["scalabl_torch"],
        "paired scalabl_svi/lora": paired("scalabl_svi", "lora"),
        "min scalabl_svi/lora": min(times["scalabl_svi"]) / min(times["lora"]),
        "min scalabl_torch/lora": min(times["scalabl_torch"]) / min(times["lora"]),
        "scalabl_fit/lora": med["scalabl_fit"] / med["lora"],
        "vectorized_fit/lora": med["vectorized_fit"] / med["lora"],
        "paired scalabl_fit/lora": paired("scalabl_fit", "lora"),
        "paired vectorized_fit/lora": paired("vectorized_fit", "lora"),
        "min vectorized_fit/lora": min(times["vectorized_fit"]) / min(times["lora"]),
        "min scalabl_fit/lora": min(times["scalabl_fit"]) / min(times["lora"]),
        "svi_fast/lora": med["svi_fast"] / med["lora"],
        "paired svi_fast/lora": paired("svi_fast", "lora"),
        "min svi_fast/lora": min(times["svi_fast"]) / min(times["lora"]),
    }
    notes = {
        "scalabl_svi/lora": "ratio of medians; target <= 1.03 (official ScalaBL: 1.07)",
        "paired scalabl_svi/lora": "median over repeats of the within-repeat ratio",
        "min scalabl_svi/lora": "ratio of fastest steps; robust when other processes share the CPU",
        "scalabl_svi/scalabl_torch": "Pyro optimizer overhead (per-tensor AdamW + clipping)",
        "scalabl_fit/lora": "train.fit's step (AutoNormal ELBO + FusedAdamW), per-module sites",
        "vectorized_fit/lora": "train.fit's step, ScalaBL(layout='vectorized'): one plated site",
        "svi_fast/lora": "bare SVI.step + make_optimizer(fused=True), Pyro's validation off",
    }
    print("\n## Training step time (median ms)\n")
    print(table(["variant", "median ms", "min ms", "max ms"], [
        (k, f"{med[k]:.1f}", f"{1e3 * min(v):.1f}", f"{1e3 * max(v):.1f}") for k, v in times.items()]))
    print("\n(scheduler = pyro LambdaLR.step() that train.fit calls after every svi.step)")

    t0 = time.perf_counter()
    snap = cpu_snapshot()
    ovh = time_overhead(args, [net_ref, net, *fit_nets.values()], {
        "lora": lora_step, "scalabl_svi": svi_step, "scalabl_torch": torch_step, "scheduler": lambda b: sched_step(),
        **{name: f for name, f, _ in fits},
    }, {"lora": batch_ref, "scalabl_svi": batch, "scalabl_torch": batch, "scheduler": batch,
        **{name: b for name, _, b in fits}})
    other_cpus_ovh = foreign_cpu(snap, cpu_snapshot())
    phases["stubbed"] = time.perf_counter() - t0
    ovh_med = {k: median_ms(v) for k, v in ovh.items()}
    print("\n## The same steps with the backbone stubbed out (median ms): the cost around the backbone\n")
    print(table(["variant", "median ms", "min ms", "extra over lora ms", "extra / lora step (full, min)"], [
        (k, f"{ovh_med[k]:.2f}", f"{1e3 * min(v):.2f}",
         f"{ovh_med[k] - ovh_med['lora']:.2f}" if k != "scheduler" else "-",
         f"{(ovh_med[k] - ovh_med['lora']) / (1e3 * min(times['lora'])):.3%}" if k != "scheduler" else "-")
        for k, v in ovh.items()]))

    print("\n## Parameters\n")
    print(table(["lora (V,B)", "guide", "extra over LoRA", f"expected 2*r*sites = 2*{r}*{sites}", "latent dim"],
                [(counts["lora"], counts["guide"], counts["extra_over_lora"], 2 * r * sites, counts["latent_dim"])]))
    lora_ref_params = sum(p.numel() for p in net_ref.trainable_parameters())
    if lora_ref_params != counts["lora"]:
        print(f"WARNING: plain LoRA has {lora_ref_params} trainable parameters, ScalaBL's projections {counts['lora']}")

    t0 = time.perf_counter()
    pred = time_predictive(args, model, guide, batch)
    phases["predictive"] = time.perf_counter() - t0
    print(f"\n## Predictive, S={args.num_samples} samples x B={args.batch_size} questions "
          f"(max_forward_batch={net.config.max_forward_batch})\n")
    print(table(["mode", "median s", "questions/s", "backbone calls", "rows through backbone"], [
        (m, f"{pred[m]['median_s']:.3f}", f"{pred[m]['questions_per_s']:.2f}", pred[m]["forward_calls"],
         pred[m]["forward_rows"]) for m in ("parallel", "sequential")]))
    print(f"\nexpected parallel calls ceil(S*B/max_forward_batch) = {pred['expected_parallel_calls']}, "
          f"useful rows S*B = {pred['useful_rows']}")

    mem = None
    if not args.no_memory:
        print("\n(memory: one fresh subprocess per variant ...)", flush=True)
        t0 = time.perf_counter()
        mem = measure_memory(args)
        phases["memory"] = time.perf_counter() - t0
        mb = lambda kb: f"{kb / 1024:.0f}"  # noqa: E731
        kind = "GPU allocated" if benchkit.DEVICE.type == "cuda" else "RSS"
        print(f"\n## Peak memory ({kind}, MiB; one fresh process per variant)\n")
        print(table(["variant", "RSS after load", "peak during steps", "growth", "lifetime ru_maxrss"], [
            (v, mb(m["rss_after_load_kb"]), mb(m["peak_kb"]), mb(m["growth_kb"]), mb(m["ru_maxrss_kb"]))
            for v, m in mem.items()]))
        print(f"\nmethod: {mem['lora']['peak_method']}; growth = peak - RSS after model load "
              f"({args.mem_steps} steps incl. the first, which allocates the optimizer state)")
        lo = mem["lora"]
        for v in VARIANTS[1:]:
            ratios[f"peak_{'gpu' if benchkit.DEVICE.type == 'cuda' else 'rss'} {v}/lora"] = mem[v]["peak_kb"] / lo["peak_kb"]
            ratios[f"rss_growth {v}/lora"] = mem[v]["growth_kb"] / max(1, lo["growth_kb"])

    ratios["est. scalabl_svi/lora"] = 1 + (ovh_med["scalabl_svi"] + ovh_med["scheduler"] - ovh_med["lora"]) / min(
        med["lora"], 1e3 * min(times["lora"]))
    notes["est. scalabl_svi/lora"] = "1 + stubbed-backbone extra (svi+sched) / fastest LoRA step"
    for v in ("scalabl_fit", "vectorized_fit", "svi_fast"):
        ratios[f"est. {v}/lora"] = 1 + (ovh_med[v] - ovh_med["lora"]) / min(med["lora"], 1e3 * min(times["lora"]))
        notes[f"est. {v}/lora"] = "1 + stubbed-backbone extra / fastest LoRA step"
    ratios["predictive parallel speedup"] = pred["speedup"]
    print("\n## RATIOS\n")
    print(table(["ratio", "value", "note"], [(k, f"{v:.3f}", notes.get(k, "")) for k, v in ratios.items()]))
    print(f"\nother processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy during the step timing"
          + (" -- WARNING: the CPU was shared; absolute times are inflated and noisy, prefer the 'min' and "
             "'paired' ratios (or rerun on an idle machine)" if other_cpus > 0.25 else ""))

    phases["total"] = time.perf_counter() - t_start
    print("\nwall time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))

    prof = None
    if args.profile:
        prof = profile_step(lambda b: (svi_step(b), sched_step()), batch, args.profile)
        print(f"\n## cProfile of {args.profile} ScalaBL SVI steps (+scheduler), by tottime\n")
        print(prof)

    if args.out:
        path = atomic_write_json(args.out, {
            "benchmark": "step_time", "backbone": args.backbone, "batch_size": args.batch_size,
            "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "num_data": args.num_data,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "pyro": pyro.__version__,
            "prompt_tokens": ntok.tolist(), "step_ms_median": med,
            "step_s": {k: v for k, v in times.items()}, "parameters": counts, "predictive": pred,
            "memory": mem, "ratios": ratios, "stubbed_step_ms_median": ovh_med, "stubbed_step_s": ovh,
            "other_processes_cpus_during_stubbed": other_cpus_ovh, "phase_seconds": phases, "other_processes_cpus_during_timing": other_cpus,
        })
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
