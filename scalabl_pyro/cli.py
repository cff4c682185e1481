"""Command line: ``scalabl-pyro {demo,train,evaluate,benchmark}`` (also ``python -m scalabl_pyro``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="smollm2", help="'smollm2' (embedded), a hub id, a local path, or 'tiny'")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 200)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the LoRA projections")
    p.add_argument("--guide-lr", type=float, default=None,
                   help="learning rate of the variational parameters (default 0.01; demo 0.05)")
    p.add_argument("--scoring", choices=("letter", "choice"), default=None)
    p.add_argument("--num-samples", type=int, default=None, help="posterior samples at test time (default 10)")
    p.add_argument("--kl-anneal", type=float, default=None,
                   help="ramp the KL weight from 0 to 1 over this fraction of the steps (Bayesian methods)")
    p.add_argument("--prior", choices=("normal", "s0"), default=None,
                   help="prior of s: 'normal' = Normal(0, 1), 's0' = Normal(s0, 1), centred at the start "
                        "(default: 'normal'; for demo 's0', chosen on validation: bench/demo_recipe.py)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (tables show mean ± std)")
    p.add_argument("--data-dir", default=None, help="folder with the benchmark JSONL files (default ../shared/data)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'")


def _grid_overrides(args, **extra) -> dict:
    keys = {"backbone": "backbone", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
            "guide_lr": "guide_lr", "scoring": "scoring", "num_samples": "num_samples",
            "train_limit": "train_limit", "test_limit": "test_limit", "data_dir": "data_dir",
            "kl_anneal": "kl_anneal", "prior": "prior"}
    out = {v: getattr(args, k) for k, v in keys.items() if getattr(args, k, None) is not None}
    if getattr(args, "seeds", None):
        out["seeds"] = _seeds_arg("--seeds", args.seeds)
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _seeds_arg(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give integers separated by commas, e.g. 0,1,2") from None


def cmd_demo(args) -> int:
    from .experiment import demo, demo_grid
    from .methods import PRIORS

    grid = demo_grid(**_grid_overrides(args))
    table = demo(args.out, grid=grid, progress=not args.quiet, overwrite=args.overwrite, device=args.device)
    print(f"\nScalaBL vs plain LoRA on the embedded countries task ({grid.backbone}, {grid.scoring} scoring, "
          f"{grid.steps} steps, guide lr {grid.guide_lr:g}, {grid.num_samples} posterior samples, prior "
          f"{PRIORS[grid.prior]})\n")
    print(table)
    print(f"\nWrote {Path(args.out) / 'results.md'}, {Path(args.out) / 'reliability.png'} and per-run JSON.")
    return 0


def cmd_benchmark(args) -> int:
    from .experiment import GridConfig, run_grid
    from .metrics import format_table

    base = GridConfig.load(args.config) if args.config else GridConfig()
    grid = GridConfig.from_dict({**base.to_dict(), **_grid_overrides(args)})
    if args.no_run:
        from .experiment import report_grid

        rows = report_grid(grid, args.out, report=args.report)
    else:
        only = {k: v.split(",") for k, v in (("datasets", args.only_datasets), ("methods", args.only_methods)) if v}
        if args.only_seeds:
            only["seeds"] = _seeds_arg("--only-seeds", args.only_seeds)
        rows = run_grid(grid, args.out, progress=not args.quiet, overwrite=args.overwrite, report=args.report,
                        device=args.device, workers=args.workers, only=only)
    print(format_table(rows) if rows else f"No finished runs in {args.out} yet.")
    return 0


def cmd_compare_guides(args) -> int:
    from .experiment import GridConfig, compare_guides
    from .metrics import format_table

    grid = GridConfig(**_grid_overrides(args))
    out = Path(args.out)
    if (out / "guides.md").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another --out")
    rows = compare_guides(out, guides=args.guides.split(","), grid=grid, progress=not args.quiet, device=args.device)
    print(format_table(rows))
    return 0


def cmd_train(args) -> int:
    import torch

    from .config import ScalaBLConfig, TrainConfig
    from .experiment import backbone_factory, resolve_task
    from .io import RunExistsError, save_run
    from .methods import train_method

    out = Path(args.out)
    if (out / "run.json").exists() and not args.overwrite:
        raise RunExistsError(f"{out} already holds a run; pass --overwrite or choose another --out")
    train = resolve_task(args.dataset, "train", data_dir=args.data_dir, limit=args.train_limit, seed=args.seed)
    cfg = ScalaBLConfig(scoring=args.scoring or "choice", r=args.r)
    tc = TrainConfig(**{k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                              guide_lr=args.guide_lr, kl_anneal=args.kl_anneal,
                                              seed=args.seed).items() if v is not None})
    torch.manual_seed(args.seed)
    trained = train_method(args.method, backbone_factory(args.backbone, args.device), list(train.examples),
                           label_words=train.label_words, config=cfg, train_config=tc, guide=args.guide,
                           prior=args.prior, progress=not args.quiet)
    save_run(out, trained.models[0], trained.guide, guide_kind=args.guide if trained.guide is not None else None,
             backbone=args.backbone, overwrite=args.overwrite,
             meta={"dataset": args.dataset, "method": args.method, "train": tc.to_dict(),
                   "prior": args.prior or "normal", "final_loss": trained.losses[-1],
                   "fit_seconds": trained.fit_seconds})
    print(f"trained {args.method} on {args.dataset} ({len(train)} examples, {tc.steps} steps, "
          f"{trained.fit_seconds:.0f} s); saved to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from ._utils import atomic_write_json
    from .experiment import backbone_factory, resolve_task
    from .io import load_run
    from .metrics import format_table, reliability_diagram
    from .predictive import predict

    run = Path(args.run)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else None
    if info is None:
        raise FileNotFoundError(f"{run} is not a run directory (no run.json); create one with 'scalabl-pyro train'")
    dataset = args.dataset or info["meta"].get("dataset")
    if not dataset:
        raise ValueError("pass --dataset: the run does not record the data set it was trained on")
    task = resolve_task(dataset, args.split, data_dir=args.data_dir, limit=args.test_limit)
    backbone = backbone_factory("tiny", args.device)() if info["backbone"] == "tiny" else None
    model, guide, _ = load_run(run, backbone=backbone, device=args.device)
    pred = predict(model, guide, list(task.examples), num_samples=args.num_samples or 10, progress=not args.quiet)
    metrics = pred.metrics()
    out = Path(args.out) if args.out else run / f"eval_{dataset}_{args.split}"
    if (out / "metrics.json").exists() and not args.overwrite:
        from .io import RunExistsError

        raise RunExistsError(f"{out} already holds results; pass --overwrite or choose another --out")
    atomic_write_json(out / "metrics.json", {"dataset": dataset, "split": args.split, **metrics})
    reliability_diagram(pred.mean_probs, pred.labels, out / "reliability.png", title=f"{dataset} {args.split}")
    print(format_table([{"dataset": dataset, "split": args.split, **metrics}]))
    print(f"wrote {out / 'metrics.json'} and {out / 'reliability.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scalabl-pyro", description="Bayesian LoRA (ScalaBL) as a Pyro model")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="fine-tune the default backbone on the default task: plain LoRA vs ScalaBL")
    p.add_argument("--out", default="runs/demo")
    _add_common(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("benchmark", help="run (or resume) a grid of methods x datasets x seeds")
    p.add_argument("--config", help="grid JSON (see GridConfig); command-line options override it")
    p.add_argument("--out", default="runs/benchmark")
    p.add_argument("--report", default=None, help="also write a Markdown report (e.g. bench/RESULTS.md)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the tables and report from finished runs")
    p.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (e.g. 8 on one GPU)")
    for what in ("datasets", "methods", "seeds"):
        p.add_argument(f"--only-{what}", default=None, metavar=what.upper(),
                       help=f"comma-separated {what} of the grid to run now (grid.json and the report keep "
                            f"the whole grid)")
    _add_common(p)
    p.set_defaults(fn=cmd_benchmark)
    p = sub.add_parser("compare-guides", help="train ScalaBL with each autoguide on the default task and compare")
    p.add_argument("--guides", default="normal,diagonal,lowrank,mvn,iaf,delta")
    p.add_argument("--out", default="runs/guides")
    _add_common(p)
    p.set_defaults(fn=cmd_compare_guides)
    p = sub.add_parser("train", help="train one method on one data set and save the run")
    p.add_argument("--dataset", default="countries")
    p.add_argument("--method", default="scalabl", choices=("mle", "map", "scalabl"))
    p.add_argument("--guide", default="normal", help="autoguide for scalabl: normal, diagonal, lowrank, mvn, iaf, delta")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train")
    _add_common(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a saved run on a data set split")
    p.add_argument("run", help="run directory written by 'train'")
    p.add_argument("--dataset", default=None, help="default: the data set the run was trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default=None)
    _add_common(p)
    p.set_defaults(fn=cmd_evaluate)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, OSError, ModuleNotFoundError,
            RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"scalabl-pyro {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept (rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
