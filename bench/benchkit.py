"""Shared pieces of the ``bench/`` scripts: synthetic questions, the device, timers, CPU and memory probes.

``DEVICE`` is the device every script's :func:`load` and :func:`sync` use; a script sets it once from its
``--device`` option (``benchkit.DEVICE = resolve_device(args.device)``). The synthetic questions' words are a
data file beside this one (``synthetic_words.json``).
"""
from __future__ import annotations

import gc
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from scalabl_pyro import Example

__all__ = ["DEVICE", "LETTERS", "WORDS", "make_mc_examples", "make_passage_examples", "load", "sync", "median_ms",
           "table", "cpu_snapshot", "foreign_cpu", "peak_growth_kb", "status_kb", "maxrss_kb", "reset_peak"]

LETTERS = ("A", "B", "C", "D")
WORDS: dict[str, list[str]] = json.loads((Path(__file__).with_name("synthetic_words.json")).read_text(encoding="utf-8"))
DEVICE = torch.device("cpu")


def _letter_prompt(question: str, choices) -> str:
    lines = [f"Question: {question.strip()}", "Choices:"]
    lines += [f"{w}) {c.strip()}" for w, c in zip(LETTERS, choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def make_mc_examples(n: int, seed: int = 0) -> list:
    """ARC-like letter-format items: a question and 4 choices (~60-120 SmolLM2 tokens per prompt)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = rng.choice(WORDS["questions"]).format(subj=rng.choice(WORDS["subjects"]), cond=rng.choice(WORDS["conditions"]))
        choices = tuple(rng.sample(WORDS["choices"], 4))
        out.append(Example(id=f"synth-mc-{i}", label=rng.randrange(4), choices=choices,
                           prompt=_letter_prompt(q, choices), context=f"Question: {q}\nAnswer:",
                           continuations=tuple(" " + c for c in choices)))
    return out


def make_passage_examples(n: int, seed: int = 0, *, sentences: tuple[int, int] = (5, 8)) -> list:
    """BoolQ-like items: a passage (~100-200 tokens) + question as context, 4 short choices (1-3 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        passage = " ".join(rng.sample(WORDS["passage"], rng.randint(*sentences)))
        q = rng.choice(WORDS["bool_questions"]) + "?"
        choices = tuple(rng.sample(WORDS["short_answers"], 4))
        ctx = f"{passage}\nQuestion: {q}\nAnswer:"
        out.append(Example(id=f"synth-passage-{i}", label=rng.randrange(4), choices=choices,
                           prompt=_letter_prompt(f"{passage} {q}", choices), context=ctx,
                           continuations=tuple(" " + c for c in choices)))
    return out




def load(backbone: str):
    """``(model, tokenizer)`` on ``--device``: ``"tiny"`` is :func:`tiny_llama`, ``"random:<shape>"`` is built
    on the device directly, else ``load_backbone``."""
    from scalabl_pyro.backbones import load_backbone, tiny_llama

    if backbone.startswith("random:"):
        return load_backbone(backbone, device=DEVICE)
    lm, tok = tiny_llama() if backbone == "tiny" else load_backbone(backbone)
    return lm.to(DEVICE), tok


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock timers measure it (a no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_ms(xs) -> float:
    return 1e3 * statistics.median(xs)


def table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in cells[1:]])


def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def maxrss_kb() -> int:
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v // 1024 if sys.platform == "darwin" else v  # bytes on macOS, KiB on Linux


def cpu_snapshot() -> tuple[float, float, float]:
    """``(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process)``."""
    busy = float("nan")
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = (sum(f[:3]) + sum(f[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime


def foreign_cpu(a, b) -> float:
    """Mean number of CPUs kept busy by *other* processes between two :func:`cpu_snapshot` calls."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else float("nan")


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so that RSS is a fair baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_growth_kb(fn) -> tuple[object, int | None]:
    """Run ``fn()``; return its result and the RSS peak during it minus the RSS before (KiB; None if unknown)."""
    gc.collect()
    _malloc_trim()
    before = status_kb("VmRSS")
    ok = reset_peak()
    out = fn()
    peak = status_kb("VmHWM") if ok else None
    return out, (None if peak is None or before is None else peak - before)


def reset_peak() -> bool:
    """Reset the RSS high-water mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + 4096
    except OSError:
        return False
