"""One Markdown report for several grids: each grid owns a section that its next run replaces in place.

``bench/RESULTS.md`` leads with the reference regime and keeps the short-budget grid below it; both are
written by ``scalabl-pyro benchmark --report bench/RESULTS.md``, each from its own ``--out`` folder.
A section runs from ``<!-- grid: KEY -->`` to ``<!-- end grid: KEY -->`` (``KEY``: the grid's output folder,
relative to the report's folder, so the same folder gets the same section whatever the working directory
and however it is spelled: :func:`write_grid_section`); text outside the sections (the title, notes written
by hand) is kept. A report without any section (the single-grid format before December 2026) is replaced by
the first section written to it. :func:`write_tables` writes a grid's tables: the per-method means, the paired
differences (:mod:`.paired`) and the reading of every run (:mod:`.diagnostics`).
"""
from __future__ import annotations

import csv
import io as _io
import os
import re
from collections import Counter
from pathlib import Path
from statistics import mean, pstdev
from typing import TYPE_CHECKING, Sequence

from .._utils import atomic_write_text
from ..metrics import ece_accuracy_plot, format_table, reliability_panels
from .diagnostics import DIAGNOSTIC_COLUMNS, run_diagnostics
from .methods import METHODS, describe_prior
from .paired import paired_differences
from .runs import load_predictions, predictions_path

if TYPE_CHECKING:  # the grid's config lives above this module (experiment imports report)
    from .experiment import GridConfig

__all__ = ["write_report_section", "write_grid_section", "grid_section_key", "report_sections", "REPORT_TITLE",
           "summarize", "report_header", "write_tables", "reliability_figures", "METRIC_KEYS", "FIGURE_METHODS"]

METRIC_KEYS = ("acc", "ece", "nll", "brier")
#: The methods drawn side by side in a grid's reliability figure per training set (those that finished).
FIGURE_METHODS = ("mle", "temperature", "scalabl", "scalabl_temperature")

REPORT_TITLE = "# Benchmark results\n"
_BEGIN, _END = "<!-- grid: {} -->", "<!-- end grid: {} -->"


def _check_key(key: str) -> str:
    if not key or "-->" in key or "\n" in key:
        raise ValueError(f"report section key {key!r} must be a non-empty one-line name without '-->' "
                         "(the grid's output folder, e.g. 'bench/results')")
    return key


def report_sections(text: str) -> list[str]:
    """The section keys of a report, in the order they appear."""
    return re.findall(r"<!-- grid: (.+?) -->", text)


def write_report_section(path: str | os.PathLike, key: str, body: str, *, replaces: str | None = None) -> Path:
    """Put ``body`` in the section ``key`` of the report at ``path`` (atomically) and return the path.

    The section is replaced where it stands; a new one is appended after the others. A missing file, or
    one without sections, starts as :data:`REPORT_TITLE` followed by this section.

    :param key: names the section (one line), e.g. the grid's output folder ``"bench/results_reference"``.
    :param body: Markdown of the section (its heading included).
    :param replaces: an older key of the same section: when ``key`` is not in the file, the section ``replaces``
        is rewritten in its place under ``key``.
    :raises ValueError: the file holds the section's begin marker without its end marker (edited by hand).

    Example::

        write_report_section("bench/RESULTS.md", "bench/results", "## Short budget\\n\\n| ... |\\n")
    """
    path, key = Path(path), _check_key(key)
    begin, end = _BEGIN.format(key), _END.format(key)
    section = f"{begin}\n{body.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if not report_sections(old):
        return atomic_write_text(path, f"{REPORT_TITLE}\n{section}")
    target = key if begin in old else replaces if replaces and _BEGIN.format(replaces) in old else None
    if target is not None:
        head, rest = old.split(_BEGIN.format(target), 1)
        if _END.format(target) not in rest:
            raise ValueError(f"{path}: section {target!r} has no end marker {_END.format(target)!r}; restore it or "
                             "delete the section")
        tail = rest.split(_END.format(target), 1)[1].lstrip("\n")
        return atomic_write_text(path, f"{head}{section}" + (f"\n{tail}" if tail else ""))
    return atomic_write_text(path, f"{old.rstrip()}\n\n{section}")


def grid_section_key(report: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """The section key of a grid's output folder: its path relative to the report's folder (POSIX separators).

    Example::

        grid_section_key("bench/RESULTS.md", "bench/results_reference")  # 'results_reference'
    """
    out, base = Path(out_dir).resolve(), Path(report).resolve().parent
    try:
        return Path(os.path.relpath(out, base)).as_posix()
    except ValueError:  # another drive (Windows)
        return out.as_posix()


def _names_folder(key: str, report: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """Whether an existing key names ``out_dir``: read relative to the working directory, the report's folder or
    any folder above it (keys written before :func:`grid_section_key`, e.g. ``bench/results`` from the repo root)."""
    out, k = Path(out_dir).resolve(), Path(key)
    if k.is_absolute():
        return k.resolve() == out
    return any((base / k).resolve() == out for base in (Path.cwd(), *Path(report).resolve().parents))


def write_grid_section(report: str | os.PathLike, out_dir: str | os.PathLike, body: str) -> Path:
    """Put a grid's section (keyed by :func:`grid_section_key`) in the report; a section written earlier for the
    same folder under another spelling (absolute, or relative to another directory) is replaced and re-keyed.

    Example::

        write_grid_section("bench/RESULTS.md", "/work/main/bench/results", "## Short budget\\n")
    """
    key = grid_section_key(report, out_dir)
    old = Path(report).read_text(encoding="utf-8") if Path(report).exists() else ""
    same = [k for k in report_sections(old) if k != key and _names_folder(k, report, out_dir)]
    return write_report_section(report, key, body, replaces=same[0] if same else None)


def _in_table_order(results: Sequence[dict]) -> list[dict]:
    return sorted(results, key=lambda r: (r["dataset"], METHODS.index(r["method"]) if r["method"] in METHODS
                                          else len(METHODS), r["seed"]))


def summarize(results: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (train set, method, evaluation set)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        for ev, m in r["metrics"].items():
            groups.setdefault((r["dataset"], ev, r["method"]), []).append({**m, "extra_params": r["extra_params"]})
    rows = []
    for (ds, ev, method), ms in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != kv[0][0], kv[0][1],
                                                                          METHODS.index(kv[0][2]))):
        row = {"train": ds, "eval": ev, "method": method, "seeds": len(ms), "n": ms[0]["n"]}
        for k in METRIC_KEYS + ("auroc_entropy", "auroc_mi"):
            vals = [m[k] for m in ms if k in m]
            if vals:
                row[k] = f"{mean(vals):.3f}" + (f" ± {pstdev(vals):.3f}" if len(vals) > 1 else "")
        row["extra_params"] = ms[0]["extra_params"]
        rows.append(row)
    return rows


def report_header(grid: GridConfig, results: Sequence[dict]) -> str:
    """Budget, hardware, date and the command that regenerates the table."""
    hw = "; ".join(f"{h} ({n} runs)" for h, n in Counter(r["hardware"] for r in results).items()) or "?"
    dates = sorted({r["date"] for r in results}) or ["?"]
    secs = sum(r["fit_seconds"] + r["eval_seconds"] for r in results)
    return "\n".join([
        f"Backbone `{grid.backbone}`, `{grid.scoring}` scoring (normalize={grid.normalize}), LoRA r={grid.r} on "
        f"q_proj/v_proj/lm_head; {grid.budget()}, lr {grid.lr} (projections) / "
        f"{grid.guide_lr} (guide), KL annealed over {grid.kl_anneal:.0%} of the steps, prior "
        f"{describe_prior(grid.prior)}, {grid.num_samples} posterior samples at test time.",
        f"Training sets capped at {grid.train_limit or 'all'} examples, each evaluation set at "
        f"{grid.test_limit or 'all'} (seeded subsets). Seeds per cell: see `seeds`. ECE uses 15 equal-width bins.",
        f"Finished runs: {len(results)} of {len(grid.methods) * len(grid.datasets) * len(grid.seeds)} in the grid; "
        f"compute {secs / 3600:.1f} h on: {hw}; dates {dates[0]} to {dates[-1]}.",
        *([grid.note] if grid.note else []),
        "OOD columns: AUROC of predictive entropy / mutual information for telling the training set's test "
        "questions from the evaluation set's.",
    ])


def _shown(path) -> str:
    """A path as the report's command shows it: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(os.path.abspath(path))
    except ValueError:  # another drive (Windows)
        rel = ".."
    return Path(os.path.abspath(path) if rel.startswith("..") else rel).as_posix()


def reliability_figures(out_dir: str | os.PathLike, results: Sequence[dict], *,
                        methods: Sequence[str] = FIGURE_METHODS) -> dict[str, tuple[Path, int]]:
    """Per training set, reliability diagrams (bars over counts) of ``methods`` side by side on its own test
    questions, for the lowest seed at which most of them finished: ``<out_dir>/<train>.reliability.png``.

    :returns: ``{train set: (figure path, seed)}`` (sets where fewer than two of ``methods`` share a seed with
        saved predictions are left out).

    Example::

        reliability_figures("bench/results_reference", load_results("bench/results_reference"))
    """
    out_dir = Path(out_dir)
    runs = {(r["dataset"], r["method"], r["seed"]): r for r in results
            if r["method"] in methods and predictions_path(out_dir, r).exists()}
    written = {}
    for ds in dict.fromkeys(d for d, _, _ in runs):
        seeds = sorted({s for d, _, s in runs if d == ds})
        seed = max(seeds, key=lambda s: (sum((ds, m, s) in runs for m in methods), -s))
        have = [m for m in methods if (ds, m, seed) in runs]
        if len(have) < 2:
            continue
        panels = {}
        for m in have:
            saved = load_predictions(out_dir, runs[ds, m, seed])
            panels[m] = {ds: (saved[f"{ds}.mean_probs"], saved[f"{ds}.labels"])}
        path = out_dir / f"{ds}.reliability.png"
        reliability_panels(panels, path, title=f"{ds}, seed {seed}: reliability on its test questions")
        written[ds] = (path, seed)
    return written


def write_tables(out_dir: Path, results: list[dict], grid: GridConfig | None = None,
                 report: str | os.PathLike | None = None) -> list[dict]:
    """Write the grid's tables (``results.md``, ``results.csv``, ``ece_vs_acc.png`` in ``out_dir``) and, with
    ``report`` and ``grid``, its section of that report: the per-method table, the paired differences of ScalaBL
    against plain LoRA and temperature scaling, and the diagnostics of every run (:mod:`.diagnostics`)."""
    rows = summarize(results)
    cols = ["train", "eval", "method", "seeds", "n", *METRIC_KEYS, "auroc_entropy", "auroc_mi", "extra_params"]
    table = format_table(rows, columns=cols) + "\n" if rows else "No finished runs yet.\n"
    pairs = paired_differences(out_dir, results) + paired_differences(
        out_dir, results, method="scalabl_temperature", against=("scalabl", "temperature"))
    pairs.sort(key=lambda row: (row["train"], row["eval"] != row["train"], row["eval"]))  # stable: pair order kept
    if pairs:
        table += ("\nPaired differences, ScalaBL minus plain LoRA (`mle`) and minus temperature scaling (and, where "
                  "it ran, ScalaBL with a temperature minus each remedy alone), per metric averaged over the seeds "
                  "both finished, with a 95% paired bootstrap interval over the test "
                  "questions (`*`: the interval excludes 0; lower is better for ECE, NLL and Brier, higher for "
                  "`auroc_ok`, how well the confidence ranks right answers above wrong ones):\n\n"
                  + format_table(pairs, columns=["train", "eval", "pair", "seeds", "n", *METRIC_KEYS, "auroc_ok"])
                  + "\n")
    diag = run_diagnostics(out_dir, _in_table_order(results))
    if any(row["conf"] or row["mi"] for row in diag):  # grids from before predictions were saved: nothing to add
        table += ("\nReading the runs, on each training set's own test questions (means over seeds): `conf` is the "
                  "mean top probability and `gap` = conf - acc (> 0: over-confident), `auroc_ok` how well that "
                  "confidence tells right answers from wrong ones (AUROC; a temperature changes it little), `mi` "
                  "the mutual information of a sampled method's samples (nats). For the methods with a guide: "
                  "`kl_end` the ELBO's KL term per training example at the end and `kl_tail` its change over the last fifth of training, `rel_noise` the median over "
                  "modules of posterior std / mean |s| (how random a posterior draw of the adapter is), `s_moved` "
                  "the median of mean |s| / the prior's mean |s|, and `ece_point` / `nll_point` the same model at "
                  "its posterior median beside the averaged `ece` / `nll` (what the Bayesian average adds). Blank: "
                  "not recorded (runs before the posterior was recorded, or no guide).\n\n"
                  + format_table(diag, columns=list(DIAGNOSTIC_COLUMNS)) + "\n")
    figures = reliability_figures(out_dir, results)

    def figure_links(where) -> str:  # links relative to the folder of the file they are written into
        return "" if not figures else (
            "\nReliability diagrams (bars: accuracy per confidence bin, red: the over-confident gap; below: how "
            "many answers fall in each bin): " + ", ".join(
                f"[{ds}, seed {seed}]({Path(os.path.relpath(path, where)).as_posix()})"
                for ds, (path, seed) in figures.items()) + ".\n")
    if report is not None and grid is not None:
        cmd = (f"scalabl-pyro benchmark --config {_shown(out_dir / 'grid.json')} --out {_shown(out_dir)} "
               f"--report {_shown(report)}")
        write_grid_section(report, out_dir, f"## {grid.title or 'Grid: ' + grid.budget()}\n\n"
                           f"{report_header(grid, results)}\n\nRegenerate (resumes; finished runs are skipped):"
                           f"\n\n```\n{cmd}\n```\n\n{table}{figure_links(Path(report).parent)}")
    if not rows:
        return rows
    atomic_write_text(out_dir / "results.md", table + figure_links(out_dir))
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buf.getvalue())
    points = [{"method": r["method"], "dataset": ev, "acc": m["acc"], "ece": m["ece"]}
              for r in results for ev, m in r["metrics"].items()]
    ece_accuracy_plot(points, out_dir / "ece_vs_acc.png", title="ECE vs accuracy")
    return rows
