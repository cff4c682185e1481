"""Experiments: one run (train a method, evaluate in and out of distribution) and a resumable grid of them
(the demo and the guide comparison build on it: :mod:`~scalabl_pyro.harness.demo`).

A run writes ``<out>/<train_set>.<method>.seed<k>/result.json`` (atomically; see :func:`run_dir`) and a reliability
diagram; a grid skips runs whose ``result.json`` exists and re-aggregates every finished run into
``results.md`` / ``results.csv``. For a method with a guide, ``result.json``'s ``history`` holds fit's posterior
monitoring (``monitor_steps``, ``kl`` per example, median posterior ``scale``) and the final ``posterior`` per
adapted module (:func:`~scalabl_pyro.posterior.posterior_scales`: mean ``|s|`` and std beside the prior's), and
``point_metrics`` the in-distribution metrics of the model at its posterior median
(:meth:`~scalabl_pyro.harness.methods.Trained.predict_point`): what averaging over the posterior adds.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from safetensors.torch import save_file

from .._utils import atomic_path, atomic_write_json
from ..backbones import load_backbone, resolve_device, tiny_llama
from ..checkpoint import CheckpointMismatchError
from ..config import ScalaBLConfig, TrainConfig, _JsonConfig
from ..convergence import HeldoutCurve
from .data import TaskData, load_task
from .report import METRIC_KEYS, summarize, write_tables
from .runs import PREDICTIONS_FILE, run_dir
from .methods import METHODS, NO_CALLBACK, parse_prior, train_method
from ..metrics import ood_auroc, reliability_diagram
from .tasks import country_task

__all__ = ["GridConfig", "resolve_task", "run_dir", "run_one", "run_grid", "report_grid", "summarize",
           "GridMismatchError", "check_finished", "checkpoint_dir", "NO_CHECKPOINT", "RUN_SETTINGS", "METRIC_KEYS",
           "DEMO_METHODS", "load_results", "backbone_factory"]

#: The methods of a grid by default (and of the demo): plain LoRA and ScalaBL.
DEMO_METHODS = ("mle", "scalabl")


def resolve_task(name: str, split: str, *, data_dir=None, limit: int | None = None, seed: int = 0) -> TaskData:
    """``countries`` / ``countries_shifted`` (embedded), any :func:`~scalabl_pyro.harness.data.load_task` name, or a path to
    your own ``.jsonl``/``.csv`` file or folder of split files (:func:`~scalabl_pyro.harness.userdata.load_user_task`)."""
    if name in ("countries", "countries_shifted"):
        task = country_task(split, seed=0, shifted=name == "countries_shifted")
        return task.subset(limit, seed=seed) if limit else task
    return load_task(name, split, data_dir=data_dir, limit=limit, seed=seed)


def backbone_factory(name: str, device: str | torch.device | None = None, *, quantization: str | None = None):
    """``lambda: (model, tokenizer)`` on ``device`` (``"auto"``: CUDA if available); ``"tiny"``: the test model;
    ``quantization``: see :func:`~scalabl_pyro.backbones.load_backbone`."""
    def load():
        if name != "tiny" or quantization is not None:
            return load_backbone(name, device=device, quantization=quantization)
        model, tok = tiny_llama()
        return (model.to(resolve_device(device)) if device is not None else model), tok

    return load


def _hardware(device) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    return f"{torch.cuda.get_device_name(dev)}; {cpu}" if dev.type == "cuda" else cpu


@dataclass(frozen=True)
class GridConfig(_JsonConfig):
    """A benchmark grid: methods x training sets x seeds, each evaluated on its test split and OOD sets.

    :param ood: ``{train_set: [ood_set, ...]}``, evaluated (split ``test``) next to the in-distribution test set.
    :param kl_anneal: :attr:`TrainConfig.kl_anneal` of the Bayesian methods (KL weight ramped from 0 to 1 over
        this fraction of the steps).
    :param prior: prior of the Bayesian methods: ``"s0"`` (``Normal(s0, 1)``, :func:`~scalabl_pyro.priors.centered_prior`,
        the default) or ``"normal"`` (``Normal(0, 1)``; ``bench/grid_cpu.json`` was run with it), either with
        ``":<scale>"`` for another standard deviation (``"s0:0.3"``; :func:`~scalabl_pyro.harness.methods.parse_prior`).
    :param train_limit: cap on training examples (seeded subset); :param test_limit: cap per evaluation set.
    :param epochs: the training budget in passes over each run's training set (``steps = ceil(epochs * N /
        batch_size)``, :meth:`TrainConfig.from_epochs`), so data sets of different sizes train equally long; it
        replaces ``steps``, which must then stay at its default. ``None``: ``steps`` for every data set.
    :param title: heading of the grid's section in a ``--report`` file (default: its budget); a report holds
        one section per output folder (:func:`~scalabl_pyro.harness.report.write_grid_section`).
    :param curve_every: record a held-out curve during training: every this many epochs (rounded to whole
        steps) evaluate the run on the first ``curve_limit`` questions of its in-distribution test split
        (:class:`~scalabl_pyro.convergence.HeldoutCurve`: forked RNG, dropout off, so the run's numbers are the
        same with or without it), saved as ``curve`` in ``result.json``. It describes how calibration evolves
        and is never used to choose a budget (choose on a validation split: ``bench/epochs.py``). ``None``: no
        curve. Not for ``ensemble`` and ``scalabl_bayesadapt`` (their ``curve`` is ``null``); for
        ``temperature`` it is the curve of the LoRA model before its temperature is fitted.
    :param curve_limit: questions per curve evaluation (``None``: the whole test split, as capped by
        ``test_limit``); each evaluation costs ``num_samples`` forwards per question for a Bayesian method.
    """

    methods: tuple[str, ...] = DEMO_METHODS
    datasets: tuple[str, ...] = ("countries",)
    seeds: tuple[int, ...] = (0,)
    ood: dict = field(default_factory=lambda: {"countries": ["countries_shifted"]})
    backbone: str = "smollm2"
    scoring: str = "choice"
    normalize: str = "none"
    r: int = 8
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    guide_lr: float = 5e-2
    num_samples: int = 10
    guide: str = "normal"
    kl_anneal: float = 0.0
    prior: str = "s0"
    train_limit: int | None = None
    test_limit: int | None = None
    data_dir: str | None = None
    epochs: float | None = None
    note: str = ""
    title: str = ""
    curve_every: float | None = None
    curve_limit: int | None = 64

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; allowed: {list(METHODS)}")
        if not self.datasets or not self.seeds:
            raise ValueError("a grid needs at least one dataset and one seed")
        parse_prior(self.prior)  # ValueError naming the allowed forms
        if self.epochs is not None:
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not self.epochs > 0:
                raise ValueError(f"epochs={self.epochs!r} must be a positive number (passes over the training set) "
                                 "or None (use steps)")
            if self.steps != GridConfig.steps:
                raise ValueError(f"give the budget as steps or as epochs, not both (steps={self.steps}, "
                                 f"epochs={self.epochs}); drop one")
        if self.curve_every is not None and (isinstance(self.curve_every, bool) or not isinstance(
                self.curve_every, (int, float)) or not self.curve_every > 0):
            raise ValueError(f"curve_every={self.curve_every!r} must be a positive number of epochs between "
                             "held-out evaluations, or None (no curve)")
        if self.curve_limit is not None and (isinstance(self.curve_limit, bool) or not isinstance(
                self.curve_limit, int) or self.curve_limit < 1):
            raise ValueError(f"curve_limit={self.curve_limit!r} must be a positive number of questions, or None "
                             "(the whole test split)")
        self.model_config(), self.train_config(num_examples=1)  # validate

    def model_config(self) -> ScalaBLConfig:
        """The adapter settings of every run: ``r``, ``scoring``, ``normalize``."""
        return ScalaBLConfig(r=self.r, scoring=self.scoring, normalize=self.normalize)

    def train_config(self, *, seed: int = 0, num_examples: int | None = None) -> TrainConfig:
        """The training settings of a run (budget, batch, learning rates, KL annealing) for ``seed``.

        :param num_examples: the run's training set size; needed when the budget is in :attr:`epochs`.
        """
        opts = dict(batch_size=self.batch_size, lr=self.lr, guide_lr=self.guide_lr, kl_anneal=self.kl_anneal, seed=seed)
        if self.epochs is None:
            return TrainConfig(steps=self.steps, **opts)
        if num_examples is None:
            raise ValueError("this grid's budget is in epochs: pass num_examples (the training set size)")
        return TrainConfig.from_epochs(self.epochs, num_examples, **opts)

    def budget(self) -> str:
        """The budget in words: ``"200 steps x batch 8"`` or ``"10 epochs x batch 8"``."""
        return (f"{self.steps} steps" if self.epochs is None else f"{self.epochs:g} epochs") + f" x batch {self.batch_size}"

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["ood"] = {k: list(v) for k, v in self.ood.items()}
        return d


def _label_words(tasks: Sequence[TaskData]) -> tuple[str, ...]:
    words = max((t.label_words for t in tasks), key=len)
    for t in tasks:
        if tuple(words[:len(t.label_words)]) != tuple(t.label_words):
            raise ValueError(f"{t.name} answers with {t.label_words} but {words} is used by another set; "
                             "evaluate out of distribution only on sets with the same answer words")
    return tuple(words)


def checkpoint_dir(out_dir, dataset: str, method: str, seed: int) -> Path:
    """``<out_dir>/.checkpoints/<dataset>.<method>.seed<k>``: where an unfinished run's training checkpoints."""
    return Path(out_dir) / ".checkpoints" / run_dir(out_dir, dataset, method, seed).name


#: Methods whose training does not checkpoint (their own loop): a killed run of these starts again.
NO_CHECKPOINT = ("scalabl_bayesadapt",)


def run_one(grid: GridConfig, method: str, dataset: str, seed: int, out_dir, *, progress: bool = True,
            overwrite: bool = False, device: str | None = None) -> dict:
    """Train ``method`` on ``dataset``'s train split and evaluate it; write ``result.json`` atomically.

    Training checkpoints every tenth of its steps into :func:`checkpoint_dir` (deleted once ``result.json`` is
    written), so a killed run resumes where its last checkpoint stood and ends with the same numbers
    (:func:`~scalabl_pyro.train.fit`'s checkpoints restore the random state). Not for :data:`NO_CHECKPOINT`
    methods, nor with held-out curves (``curve_every``: the points before a resume would be lost), which train
    from the start again. The result records ``resumed_from`` (the checkpoint steps, or ``None``).

    :param overwrite: train again even if the run finished (or has a checkpoint: it is discarded).
    :param device: where to run (``"auto"``: CUDA if available; default CPU); recorded in ``hardware``.
    """
    folder = run_dir(out_dir, dataset, method, seed)
    result_path = folder / "result.json"
    if result_path.exists() and not overwrite:
        return json.loads(result_path.read_text())
    ckpt_dir = checkpoint_dir(out_dir, dataset, method, seed)
    if overwrite:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    train = resolve_task(dataset, "train", data_dir=grid.data_dir, limit=grid.train_limit, seed=seed)
    evals = {dataset: resolve_task(dataset, "test", data_dir=grid.data_dir, limit=grid.test_limit, seed=0)}
    for name in grid.ood.get(dataset, []):
        evals[name] = resolve_task(name, "test", data_dir=grid.data_dir, limit=grid.test_limit, seed=0)
    words = _label_words([train, *evals.values()])
    torch.manual_seed(seed)
    tc = grid.train_config(seed=seed, num_examples=len(train))
    curves: list[HeldoutCurve] = []
    curve_set = list(evals[dataset].examples[:grid.curve_limit])

    def make_curve(model, guide):
        n_fit = model.num_data or len(train)  # ``temperature`` trains on 90% of the training set
        every = max(1, round(grid.curve_every * n_fit / tc.batch_size))
        curves.append(HeldoutCurve(model, guide, curve_set, every=every, num_data=n_fit,
                                   batch_size=tc.batch_size, num_samples=grid.num_samples, seed=seed))
        return curves[-1]
    make_callback = make_curve if grid.curve_every is not None and method not in NO_CALLBACK else None
    ck = {} if make_callback is not None or method in NO_CHECKPOINT else {"checkpoint_dir": ckpt_dir}
    try:
        trained = train_method(method, backbone_factory(grid.backbone, device), list(train.examples),
                               label_words=words, config=grid.model_config(), train_config=tc, guide=grid.guide,
                               num_samples=grid.num_samples, prior=grid.prior, progress=progress,
                               make_callback=make_callback, **ck)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{folder.name}: its checkpoint in {ckpt_dir} comes from another run ({e}); "
                                      "delete that folder to train this run afresh, or pass --overwrite") from e
    metrics, preds, untempered = {}, {}, {}
    t0 = time.perf_counter()
    for name, task in evals.items():
        raw = trained.predict(list(task.examples), progress=progress, tempered=False)
        preds[name] = pred = trained.temper(raw)
        metrics[name] = {**pred.metrics(), "note": task.note}
        if pred is not raw:  # a temperature method: its model average before T (and a sampled one's MI)
            untempered[name] = raw.metrics()
    point = trained.predict_point(list(evals[dataset].examples))  # the posterior median alone (in distribution)
    eval_seconds = time.perf_counter() - t0
    ind = preds[dataset]
    for name, pred in preds.items():
        if name != dataset:
            metrics[name]["auroc_entropy"] = ood_auroc(ind.predictive_entropy, pred.predictive_entropy)
            metrics[name]["auroc_mi"] = ood_auroc(ind.mutual_information, pred.mutual_information)
    result = {
        "method": method, "dataset": dataset, "seed": seed, "grid": grid.to_dict(),
        "train_examples": len(train), "train_note": train.note, "label_words": list(words),
        "steps": tc.steps, "epochs": round(tc.epochs(len(train)), 3),
        "extra_params": trained.extra_params, "lora_params": trained.lora_params,
        "fit_seconds": round(trained.fit_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "final_loss": trained.losses[-1] if trained.losses else None, "resumed_from": trained.resumed_from,
        "history": trained.history or None, "metrics": metrics,
        "point_metrics": {dataset: point.metrics()} if point is not None else None,
        "temperature": trained.temperature,  # T fitted on held-out training data (temperature methods), else None
        "untempered_metrics": untempered or None,  # the temperature methods' predictions before T
        "curve": curves[-1].records if curves else None,
        "date": datetime.date.today().isoformat(),
        "hardware": _hardware(device),
    }
    folder.mkdir(parents=True, exist_ok=True)
    reliability_diagram(ind.mean_probs, ind.labels, folder / "reliability.png",
                        title=f"{method} on {dataset}")
    tensors = {}
    for name, pred in preds.items():
        tensors[f"{name}.mean_probs"] = pred.mean_probs.contiguous()
        tensors[f"{name}.labels"] = pred.labels.contiguous()
    with atomic_path(folder / PREDICTIONS_FILE) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(result_path, result)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # another worker's checkpoint may have appeared; a link is left alone
        ckpt_dir.parent.rmdir()  # only if empty
    return result


def load_results(out_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("*.seed*/result.json"))]


#: Grid settings that change a run's numbers: a finished run made with other values does not belong in the table.
RUN_SETTINGS = ("backbone", "scoring", "normalize", "r", "steps", "batch_size", "lr", "guide_lr", "num_samples",
                "guide", "kl_anneal", "prior", "train_limit", "test_limit", "epochs")


class GridMismatchError(ValueError):
    """Finished runs in the output folder were made with other settings than the grid asks for."""


def check_finished(grid: GridConfig, results: Sequence[dict], out_dir) -> None:
    """Raise :class:`GridMismatchError` naming every finished run whose :data:`RUN_SETTINGS` differ from ``grid``."""
    bad = []
    for r in results:
        saved = r.get("grid", {})
        diff = [f"{k}={saved[k]!r} (grid: {getattr(grid, k)!r})" for k in RUN_SETTINGS
                if k in saved and saved[k] != getattr(grid, k)]
        if diff:
            bad.append(f"{run_dir(out_dir, r['dataset'], r['method'], r['seed']).name}: {', '.join(diff)}")
    if bad:
        raise GridMismatchError(
            f"{len(bad)} finished run(s) in {out_dir} were made with other settings than this grid, so they "
            f"cannot share its table:\n  " + "\n  ".join(bad[:10]) + ("\n  ..." if len(bad) > 10 else "")
            + "\nUse another --out, move those folders away, or pass --overwrite to redo them.")


def report_grid(grid: GridConfig, out_dir, *, report: str | os.PathLike | None = None) -> list[dict]:
    """Rebuild ``results.md``/``.csv``, the ECE-vs-accuracy plot and ``report`` from the finished runs only.

    Runs done elsewhere (another machine, a GPU) can be copied into ``out_dir`` first: each
    ``result.json`` records its hardware, and the report lists them.

    :raises GridMismatchError: a finished run was made with other :data:`RUN_SETTINGS` than ``grid``.
    """
    results = load_results(out_dir)
    check_finished(grid, results, out_dir)
    return write_tables(Path(out_dir), results, grid, report)


def _run_cell(args) -> tuple[str, str | None]:
    """Worker of :func:`run_grid` (a fresh process: its own Pyro param store). Returns ``(cell, error)``."""
    grid_dict, method, dataset, seed, out_dir, device, overwrite, threads = args
    torch.set_num_threads(threads)
    cell = run_dir(out_dir, dataset, method, seed).name
    try:
        run_one(GridConfig.from_dict(grid_dict), method, dataset, seed, out_dir, progress=False,
                overwrite=overwrite, device=device)
        return cell, None
    except Exception as e:  # noqa: BLE001 - reported by the parent, the other cells go on
        return cell, f"{type(e).__name__}: {e}"


def _only_cells(grid: GridConfig, only: Mapping[str, Sequence] | None) -> dict[str, set]:
    """Normalize :func:`run_grid`'s ``only``: each of ``datasets``/``methods``/``seeds`` -> the grid's values kept."""
    keys = ("datasets", "methods", "seeds")
    only = dict(only or {})
    if unknown := sorted(set(only) - set(keys)):
        raise ValueError(f"only: unknown key(s) {unknown}; allowed: {list(keys)}")
    keep = {}
    for k in keys:
        allowed = getattr(grid, k)
        wanted = list(only.get(k) or allowed)
        if missing := [v for v in wanted if v not in allowed]:
            raise ValueError(f"only: {k} {missing} are not in the grid ({list(allowed)}); add them to the grid "
                             f"config, or pick among those")
        keep[k] = set(wanted)
    return keep


def run_grid(grid: GridConfig, out_dir, *, progress: bool = True, overwrite: bool = False,
             report: str | os.PathLike | None = None, device: str | None = None, workers: int = 1,
             only: Mapping[str, Sequence] | None = None) -> list[dict]:
    """Run every (dataset, method, seed) not finished yet, then rewrite the tables. Safe to interrupt.

    :param report: also write a Markdown report (header with budget, hardware, date and command + table) there.
    :param device: ``"cpu"``, ``"cuda"``, ``"auto"``... (default CPU).
    :raises GridMismatchError: (before running anything) finished runs in ``out_dir`` used other settings.
    :param workers: run cells in this many worker processes at once (one GPU serves several small runs;
        each worker gets ``cpu_count // workers`` threads). A failed cell is reported and the others go on.
    :param only: run just these cells now, e.g. ``{"datasets": ["boolq"], "seeds": [2]}`` (keys ``datasets``,
        ``methods``, ``seeds``; values must be in the grid). ``grid.json`` and the tables still describe the
        whole grid, so machines can share a grid's cells without a config of their own.

    Example::

        grid = GridConfig.load("bench/grid_cpu.json")
        run_grid(grid, "bench/results", only={"datasets": ["boolq"], "seeds": [2]}, report="bench/RESULTS.md")
    """
    out_dir = Path(out_dir)
    keep = _only_cells(grid, only)
    if not overwrite:
        check_finished(grid, load_results(out_dir), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid.save(out_dir / "grid.json")
    todo = []
    for seed in grid.seeds:  # seed-major: an interrupted grid has whole tables for its first seeds
        for dataset in grid.datasets:
            for method in grid.methods:
                if seed not in keep["seeds"] or dataset not in keep["datasets"] or method not in keep["methods"]:
                    continue
                folder = run_dir(out_dir, dataset, method, seed)
                if (folder / "result.json").exists() and not overwrite:
                    print(f"[skip] {folder.name} (finished)", flush=True)
                else:
                    todo.append((dataset, method, seed))
    if workers <= 1:
        for dataset, method, seed in todo:
            print(f"[run]  {run_dir(out_dir, dataset, method, seed).name}", flush=True)
            run_one(grid, method, dataset, seed, out_dir, progress=progress, overwrite=overwrite, device=device)
            report_grid(grid, out_dir, report=report)
        return report_grid(grid, out_dir, report=report)
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(grid.to_dict(), m, d, s, str(out_dir), device, overwrite, threads) for d, m, s in todo]
    failed = []
    with mp.get_context("spawn").Pool(workers) as pool:
        for cell, err in pool.imap_unordered(_run_cell, jobs):
            print(f"[{'fail' if err else 'done'}] {cell}" + (f": {err}" if err else ""), flush=True)
            if err:
                failed.append(f"{cell}: {err}")
            else:
                report_grid(grid, out_dir, report=report)
    rows = report_grid(grid, out_dir, report=report)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} runs failed (the others are saved; rerun to retry):\n"
                           + "\n".join(failed))
    return rows
