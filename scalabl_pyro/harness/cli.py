"""Command line: ``scalabl-pyro {demo,train,evaluate,benchmark,compare-guides}`` (also ``python -m scalabl_pyro``).

Each verb takes only the options it uses (``scalabl-pyro VERB --help`` lists them, with examples). An option
a verb would ignore is refused, and so is a combination that would silently change nothing (e.g.
``train --method mle --guide lowrank``); every such error is one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]


class UsageError(ValueError):
    """A combination of options the command would silently ignore; the message names the fix."""


class _Parser(argparse.ArgumentParser):
    """One-line errors that point at ``--help`` (argparse prints the whole usage otherwise)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


_TRAINING = ("backbone", "steps", "epochs", "batch_size", "lr", "guide_lr", "kl_anneal", "prior", "scoring", "normalize",
             "train_limit")
_RUN = ("overwrite", "quiet", "device")
#: The shared options each verb takes (its own ones are added in :func:`build_parser`).
VERB_OPTIONS = {
    "demo": (*_TRAINING, "num_samples", "test_limit", "seeds", "curve_every", *_RUN),
    "train": (*_TRAINING, "data_dir", *_RUN),
    "evaluate": ("num_samples", "test_limit", "data_dir", *_RUN),
    "benchmark": (*_TRAINING, "num_samples", "test_limit", "seeds", "data_dir", "curve_every", *_RUN),
    "compare-guides": (*_TRAINING, "num_samples", "test_limit", *_RUN),
}


def _prior_name(text: str) -> str:
    """``--prior``: a prior name (:func:`~scalabl_pyro.harness.methods.parse_prior`), checked before any run."""
    from .methods import parse_prior

    try:
        parse_prior(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _option(p: argparse.ArgumentParser, key: str, verb: str) -> None:
    spec = {
        "backbone": dict(metavar="NAME", help="'smollm2' (the embedded SmolLM2-135M-Instruct; default), 'tiny' "
                         "(random-weight test model), a hub id 'owner/name' or a local model folder"),
        "steps": dict(type=int, metavar="N", help="optimizer steps (default 200)"),
        "epochs": dict(type=float, metavar="E", help="budget in passes over the training set instead of --steps "
                       "(steps = ceil(E * N / batch size) for each training set)"),
        "batch_size": dict(type=int, metavar="N", help="questions per step (default 8)"),
        "lr": dict(type=float, metavar="LR", help="learning rate of the LoRA projections V and B (default 0.001)"),
        "guide_lr": dict(type=float, metavar="LR", help="learning rate of the variational parameters (default "
                                                         "0.05, chosen on validation: bench/README.md)"),
        "kl_anneal": dict(type=float, metavar="F", help="ramp the KL weight from 0 to 1 over this fraction of the "
                                                        "steps, 0..1 (Bayesian methods; default 0)"),
        "prior": dict(type=_prior_name, metavar="PRIOR", help="prior of s: 's0' = Normal(s0, 1), centred where the "
                      "guide starts (default, chosen on validation: bench/README.md), 'normal' = Normal(0, 1); "
                      "':<scale>' sets another standard deviation, e.g. 's0:0.3'"),
        "scoring": dict(choices=("letter", "choice"), help="'choice': log-likelihood of each choice's text "
                        "(default); 'letter': logits of the answer letters after 'Answer:'"),
        "normalize": dict(choices=("none", "tokens", "chars"), help="choice scoring only: 'none' sums the "
                          "choice's token log-probs (default), 'tokens' averages them, 'chars' divides by its length"),
        "num_samples": dict(type=int, metavar="S", help="posterior samples per question at test time (default 10)"),
        "train_limit": dict(type=int, metavar="N", help="train on a seeded random subset of N questions "
                            "(default: all)"),
        "test_limit": dict(type=int, metavar="N", help="evaluate on a seeded random subset of N questions per set "
                                                       "(default: all)"),
        "seeds": dict(metavar="LIST", help="comma-separated seeds, e.g. 0,1,2: one run each, tables show mean ± std "
                                           "(default 0)"),
        "data_dir": dict(metavar="DIR", help="folder holding the benchmark folders (arc_easy/, boolq/, mmlu/, ...); "
                                             "default $SCALABL_DATA_DIR or ../shared/data"),
        "curve_every": dict(type=float, metavar="E", help="record held-out ECE/NLL on the first GridConfig.curve_limit (64) test questions "
                            "every E epochs during training (result.json 'curve'; the demo plots curves.png; "
                            "demo default 2, benchmark default off; 0 turns it off)"),
        "overwrite": dict(action="store_true", help="replace results already in the output folder"),
        "quiet": dict(action="store_true", help="no progress bars"),
        "device": dict(metavar="DEV", help="'auto' (CUDA if available; default), 'cpu', 'cuda' or 'cuda:N'"),
    }[key]
    p.add_argument("--" + key.replace("_", "-"), **({} if spec.get("action") else {"default": None}), **spec)


def _verb(sub, name: str, *, help: str, description: str, examples: str, fn):
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 100), allow_abbrev=False,
                       epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(fn=fn)
    return p


def _finish(p: argparse.ArgumentParser, verb: str) -> None:
    for key in VERB_OPTIONS[verb]:
        _option(p, key, verb)


# ------------------------------------------------------------------------------------------- checks
def _grid_overrides(args, **extra) -> dict:
    keys = ("backbone", "steps", "epochs", "batch_size", "lr", "guide_lr", "scoring", "normalize", "num_samples",
            "train_limit", "test_limit", "data_dir", "kl_anneal", "prior")
    _check_budget(args)
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if "epochs" in out:
        out["steps"] = 200  # GridConfig's default: the budget is in epochs (a config file's steps are replaced)
    if getattr(args, "seeds", None):
        out["seeds"] = _seeds_arg("--seeds", args.seeds)
    if getattr(args, "curve_every", None) is not None:
        if args.curve_every < 0:
            raise UsageError(f"--curve-every {args.curve_every:g}: give a positive number of epochs, or 0 (no curve)")
        out["curve_every"] = args.curve_every or None
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def _check_budget(args) -> None:
    if getattr(args, "epochs", None) is not None:
        if getattr(args, "steps", None) is not None:
            raise UsageError(f"--steps {args.steps} and --epochs {args.epochs:g} both set the budget: give one")
        if not args.epochs > 0:
            raise UsageError(f"--epochs {args.epochs:g}: give a positive number of passes over the training set")


def _seeds_arg(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give integers separated by commas, e.g. 0,1,2") from None


def _check_normalize(args, scoring: str, normalize: str | None, *, source: str = "") -> None:
    """``--normalize`` applies to choice scoring only (``ScalaBLConfig`` refuses it with letter scoring)."""
    if scoring == "letter" and normalize not in (None, "none"):
        n = f"--normalize {normalize}" if args.normalize else f"normalize={normalize!r}{source}"
        s = "--scoring letter" if args.scoring else f"scoring='letter'{source}"
        raise UsageError(f"{n} only applies to choice scoring, but {s} (a letter answer is one token, there is "
                         f"nothing to normalize): drop the normalization or use --scoring choice")


def _check_data_dir(data_dir, dataset: str) -> None:
    from .userdata import is_user_path

    if data_dir is None:
        return
    if is_user_path(dataset):
        raise UsageError(f"--data-dir only locates the built-in benchmarks, and --dataset {dataset} is a path to "
                         f"your own data already: drop --data-dir")
    if dataset in ("countries", "countries_shifted"):
        raise UsageError(f"--data-dir only locates the benchmark files, and {dataset} is generated by the package: "
                         f"drop --data-dir (or pick a benchmark with --dataset)")


def _check_label_words(task, run_words, scoring: str, dataset: str) -> None:
    """The evaluation set must fit the run's classes (and, for letter scoring, answer with the same words)."""
    most = max((len(ex.choices) for ex in task), default=0)
    if most > len(run_words):
        raise UsageError(f"{dataset} has questions with {most} choices but the run was trained with "
                         f"{len(run_words)} classes ({', '.join(run_words)}); evaluate on a set with at most "
                         f"{len(run_words)} choices per question")
    if scoring == "letter" and tuple(run_words[:len(task.label_words)]) != tuple(task.label_words):
        raise UsageError(f"{dataset} answers with {', '.join(task.label_words)} but the run (letter scoring) "
                         f"answers with {', '.join(run_words)}; evaluate on a set with the same answer words")


# ------------------------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from .demo import demo, demo_grid
    from .methods import describe_prior

    _check_normalize(args, args.scoring or "choice", args.normalize)
    grid = demo_grid(**_grid_overrides(args))
    table = demo(args.out, grid=grid, progress=not args.quiet, overwrite=args.overwrite, device=args.device or "auto")
    print(f"\nScalaBL vs plain LoRA on the embedded countries task ({grid.backbone}, {grid.scoring} scoring, "
          f"{grid.budget()}, guide lr {grid.guide_lr:g}, {grid.num_samples} posterior samples, prior "
          f"{describe_prior(grid.prior)})\n")
    print(table)
    out = Path(args.out)
    pics = ", ".join(str(out / f) for f in ("reliability.png", "curves.png") if (out / f).exists())
    print(f"\nWrote {out / 'results.md'}, {pics} and per-run JSON.")
    return 0


def cmd_benchmark(args) -> int:
    from .experiment import GridConfig, run_grid
    from ..metrics import format_table

    if args.no_run:
        given = [flag for flag, v in (("--device", args.device), ("--workers", args.workers),
                                      ("--only-datasets", args.only_datasets), ("--only-methods", args.only_methods),
                                      ("--only-seeds", args.only_seeds), ("--overwrite", args.overwrite or None))
                 if v is not None]
        if given:
            raise UsageError(f"--no-run only rebuilds the tables from finished runs, so {', '.join(given)} would "
                             f"change nothing: drop {'it' if len(given) == 1 else 'them'}, or drop --no-run")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give the number of runs at once, 1 or more")
    base = GridConfig.load(args.config) if args.config else GridConfig()
    _check_normalize(args, args.scoring or base.scoring, args.normalize or base.normalize,
                     source=f" in {args.config}" if args.config else "")
    grid = GridConfig.from_dict({**base.to_dict(), **_grid_overrides(args)})
    if args.no_run:
        from .experiment import report_grid

        rows = report_grid(grid, args.out, report=args.report)
    else:
        only = {k: v.split(",") for k, v in (("datasets", args.only_datasets), ("methods", args.only_methods)) if v}
        if args.only_seeds:
            only["seeds"] = _seeds_arg("--only-seeds", args.only_seeds)
        rows = run_grid(grid, args.out, progress=not args.quiet, overwrite=args.overwrite, report=args.report,
                        device=args.device or "auto", workers=args.workers or 1, only=only)
    print(format_table(rows) if rows else f"No finished runs in {args.out} yet.")
    return 0


def cmd_compare_guides(args) -> int:
    from .demo import compare_guides
    from .experiment import GridConfig
    from ..guides import GUIDES
    from ..metrics import format_table

    guides = [g.strip() for g in args.guides.split(",")]
    if bad := [g for g in guides if g not in GUIDES]:
        raise UsageError(f"--guides: unknown guide(s) {', '.join(map(repr, bad))}; choose among {', '.join(GUIDES)}")
    _check_normalize(args, args.scoring or "choice", args.normalize)
    grid = GridConfig(**_grid_overrides(args))
    out = Path(args.out)
    if (out / "guides.md").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another --out")
    rows = compare_guides(out, guides=guides, grid=grid, progress=not args.quiet, device=args.device or "auto")
    print(format_table(rows))
    return 0


#: the Bayesian methods of ``train`` (guide, prior and guide lr apply to them)
_BAYES = ("scalabl", "scalabl_last2")


def cmd_train(args) -> int:
    import torch

    from .. import distributed
    from ..config import ScalaBLConfig, TrainConfig
    from .experiment import backbone_factory, resolve_task
    from ..io import RunExistsError, save_run
    from .methods import train_method

    dp = distributed.init_from_env()  # under torchrun / accelerate launch: data-parallel fit, rank 0 writes
    main = distributed.is_main()
    if args.method not in _BAYES:
        given = [f for f, v in (("--guide", args.guide), ("--prior", args.prior), ("--guide-lr", args.guide_lr),
                                ("--kl-anneal", args.kl_anneal)) if v is not None]
        if given:
            one = len(given) == 1
            raise UsageError(f"{', '.join(given)} only appl{'ies' if one else 'y'} to the Bayesian method; --method "
                             f"{args.method} trains plain LoRA, with no posterior or prior on s: drop "
                             f"{'it' if one else 'them'}, or use --method scalabl")
    if args.quantize and args.fsdp:
        raise UsageError("--quantize and --fsdp do not combine (FSDP does not shard bitsandbytes weights): a 4-bit "
                         "backbone fits one GPU, so use --quantize alone, or --fsdp with full weights")
    if args.fsdp and not dp:
        raise UsageError("--fsdp shards the backbone over the processes of a torchrun job: launch with torchrun "
                         "--nproc-per-node N -m scalabl_pyro -- train ... (or drop --fsdp)")
    if args.quantize:  # the checks of load_backbone (a CUDA GPU, bitsandbytes, a pretrained backbone) before any work
        from ..backbones import check_quantization

        check_quantization(args.quantize, args.backbone or "smollm2", args.device or "auto")
    _check_normalize(args, args.scoring or "choice", args.normalize)
    _check_data_dir(args.data_dir, args.dataset)
    out = Path(args.out)
    if (out / "run.json").exists() and not args.overwrite:
        raise RunExistsError(f"{out} already holds a run; pass --overwrite or choose another --out")
    ckpt_dir = out / "checkpoint"  # save_run replaces the folder, checkpoint included, once the run is complete
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*"))
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the checkpointed run in --out and --overwrite starts it over: pick one")
    if args.resume and not has_ckpt:
        raise UsageError(f"--resume: {ckpt_dir} holds no checkpoint to resume; train without --resume")
    if has_ckpt and not args.resume:
        if not args.overwrite:
            raise UsageError(f"{ckpt_dir} holds the checkpoint of an unfinished run: pass --resume to continue it "
                             "(same options as before), or --overwrite to start over")
        if main:
            shutil.rmtree(ckpt_dir)
    if dp:
        torch.distributed.barrier()  # every rank sees the same checkpoint folder from here on
    train = resolve_task(args.dataset, "train", data_dir=args.data_dir, limit=args.train_limit, seed=args.seed)
    cfg = ScalaBLConfig(scoring=args.scoring or "choice", normalize=args.normalize or "none", r=args.r)
    _check_budget(args)
    opts = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, guide_lr=args.guide_lr,
                                  kl_anneal=args.kl_anneal, seed=args.seed).items() if v is not None}
    tc = TrainConfig.from_epochs(args.epochs, len(train), **opts) if args.epochs is not None else TrainConfig(**opts)
    guide = args.guide or "normal"
    backbone = args.backbone or "smollm2"
    torch.manual_seed(args.seed)
    trained = train_method(args.method, backbone_factory(backbone, args.device or "auto", quantization=args.quantize),
                           list(train.examples),
                           label_words=train.label_words, config=cfg, train_config=tc, guide=guide,
                           prior=args.prior, progress=not args.quiet and main, checkpoint_dir=ckpt_dir,
                           checkpoint_every=args.checkpoint_every, fsdp=args.fsdp)
    if main or args.fsdp:  # rank 0 writes the run (with --fsdp every rank gathers its shards for it)
        save_run(out, trained.models[0], trained.guide, train_config=tc, backbone=backbone, overwrite=args.overwrite,
                 meta={"dataset": args.dataset, "method": args.method, "train": tc.to_dict(),
                       "prior": (args.prior or "s0") if args.method in _BAYES else None,
                       "final_loss": trained.losses[-1], "fit_seconds": trained.fit_seconds,
                       "fsdp": bool(args.fsdp), "quantization": args.quantize})
    if not main:
        torch.distributed.barrier()  # rank 0 writes the run
        return 0
    print(f"trained {args.method} on {args.dataset} ({len(train)} examples, {tc.steps} steps, "
          f"{trained.fit_seconds:.0f} s{f', {distributed.world_size()} processes' if dp else ''}"
          f"{', FSDP' if args.fsdp else ''}); saved to {out}")
    if dp:
        torch.distributed.barrier()
    return 0


def cmd_evaluate(args) -> int:
    from .._utils import atomic_write_json
    from .experiment import backbone_factory, resolve_task
    from ..io import RunExistsError, load_run
    from ..metrics import format_table, reliability_diagram
    from ..predictive import predict
    from .userdata import SUFFIXES, is_user_path

    run = Path(args.run)
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else None
    if info is None:
        raise FileNotFoundError(f"{run} is not a run directory (no run.json); create one with 'scalabl-pyro train'")
    dataset = args.dataset or info["meta"].get("dataset")
    if not dataset:
        raise UsageError("pass --dataset: the run does not record the data set it was trained on")
    where = Path(dataset).expanduser()
    one_file = is_user_path(dataset) and not where.is_dir() and where.suffix.lower() in SUFFIXES
    if one_file and args.dataset is None:
        raise UsageError(f"the run was trained on the file {dataset}; pass --dataset with the file to evaluate on "
                         f"(e.g. --dataset my_test.jsonl)")
    if one_file and args.split is not None:
        raise UsageError(f"--split picks a split of a benchmark or a file in a folder, but --dataset {dataset} is "
                         f"one file, evaluated whole: drop --split")
    if args.num_samples is not None and not info.get("guide"):
        raise UsageError(f"--num-samples: the run in {run} is plain LoRA ({info['meta'].get('method', 'no guide')}), "
                         f"one deterministic model with no posterior to sample: drop --num-samples")
    _check_data_dir(args.data_dir, dataset)
    split = args.split or "test"
    task = resolve_task(dataset, split, data_dir=args.data_dir, limit=args.test_limit)
    _check_label_words(task, info["label_words"], info["config"].get("scoring", "letter"), dataset)
    backbone = backbone_factory("tiny", args.device or "auto")() if info["backbone"] == "tiny" else None
    model, guide, _ = load_run(run, backbone=backbone, device=args.device or "auto")
    pred = predict(model, guide, list(task.examples), num_samples=args.num_samples or 10, progress=not args.quiet)
    metrics = pred.metrics()
    out = Path(args.out) if args.out else run / f"eval_{task.name if is_user_path(dataset) else dataset}_{split}"
    if (out / "metrics.json").exists() and not args.overwrite:
        raise RunExistsError(f"{out} already holds results; pass --overwrite or choose another --out")
    atomic_write_json(out / "metrics.json", {"dataset": dataset, "split": split, **metrics})
    reliability_diagram(pred.mean_probs, pred.labels, out / "reliability.png", title=f"{task.name} {split}")
    print(format_table([{"dataset": dataset, "split": split, **metrics}]))
    print(f"wrote {out / 'metrics.json'} and {out / 'reliability.png'}")
    return 0


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..guides import GUIDES

    ap = _Parser(prog="scalabl-pyro", description="Bayesian LoRA (ScalaBL) as a Pyro model.", allow_abbrev=False,
                 epilog="'scalabl-pyro VERB --help' lists each verb's options, with examples.")
    ap.add_argument("--version", action="version", version=f"scalabl-pyro {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="VERB")

    p = _verb(sub, "demo", fn=cmd_demo,
              help="fine-tune the default backbone on the default task: plain LoRA vs ScalaBL",
              description="Train plain LoRA and ScalaBL on the embedded countries task, evaluate both in "
                          "distribution and on shifted questions, and write results.md, reliability.png, curves.png (held-out "
                          "ECE/NLL against epochs) and per-run JSON to --out.",
              examples="  scalabl-pyro demo                                     # SmolLM2, 200 steps, seed 0 (~48 min, 2 CPUs)\n"
                       "  scalabl-pyro demo --seeds 0,1,2 --out runs/demo3      # mean ± std over 3 seeds\n"
                       "  scalabl-pyro demo --backbone tiny --steps 2 --quiet   # a smoke run in seconds\n")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    _finish(p, "demo")

    p = _verb(sub, "train", fn=cmd_train, help="train one method on one data set and save the run",
              description="Train one method on the train split of a data set (a benchmark, the countries task, "
                          "or your own .jsonl/.csv file or folder: README 'Bring your own data') and save the run "
                          "to --out for 'scalabl-pyro evaluate'.",
              examples="  scalabl-pyro train --dataset openbookqa --method scalabl --out runs/obqa\n"
                       "  scalabl-pyro train --dataset openbookqa --method scalabl --out runs/obqa --resume  # after a stop\n"
                       "  scalabl-pyro train --dataset my_train.jsonl --out runs/mine       # your own data\n"
                       "  scalabl-pyro train --dataset arc_easy --method mle --train-limit 1000 --out runs/arc_mle\n")
    p.add_argument("--dataset", default="countries", help="a benchmark name (openbookqa, arc_easy, boolq, "
                   "mmlu_<subject>, ...), countries (default), or a path to your .jsonl/.csv file (used whole "
                   "as the training set) or to a folder holding train.jsonl / train.csv")
    p.add_argument("--method", default="scalabl", choices=("mle", "map", *_BAYES),
                   help="'scalabl' (default): Bayesian, latent s; 'scalabl_last2': s latent only in lm_head and the "
                        "last 2 decoder layers; 'mle': plain LoRA; 'map': LoRA with weight decay")
    p.add_argument("--guide", default=None, choices=tuple(GUIDES), help="autoguide of --method scalabl "
                   "(default normal)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank, also the size of each s (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization, batches and --train-limit (default 0)")
    p.add_argument("--out", default="runs/train", help="run folder to write (default runs/train)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint to <out>/checkpoint every N steps (default: every tenth of the steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run checkpointed in <out>/checkpoint (give the same options)")
    p.add_argument("--quantize", choices=("4bit", "8bit"), default=None,
                   help="load the backbone's weights in 4-bit NF4 or 8-bit (bitsandbytes, QLoRA-style; a CUDA GPU, or the "
                        "CPU with bitsandbytes >= 0.49); the adapters and s stay float32, and evaluate reloads the run "
                        "the same way")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the backbone's decoder layers over the processes (FSDP2) instead "
                        "of a whole copy on each")
    _finish(p, "train")

    p = _verb(sub, "evaluate", fn=cmd_evaluate, help="evaluate a saved run on a data set split",
              description="Evaluate a run written by 'scalabl-pyro train' (its backbone and training settings come "
                          "from the run) and write metrics.json and reliability.png.",
              examples="  scalabl-pyro evaluate runs/obqa                       # its own data set, split test\n"
                       "  scalabl-pyro evaluate runs/obqa --dataset arc_easy --test-limit 500\n"
                       "  scalabl-pyro evaluate runs/mine --dataset my_test.jsonl   # your own file, used whole\n")
    p.add_argument("run", help="run directory written by 'train'")
    p.add_argument("--dataset", default=None, help="a benchmark name, countries, a .jsonl/.csv file or a folder of "
                   "split files (default: the data set the run was trained on, unless that was one file)")
    p.add_argument("--split", default=None, help="split of a benchmark or file in a folder (default test); not "
                   "with a single file")
    p.add_argument("--out", default=None, help="output folder (default <run>/eval_<dataset>_<split>)")
    _finish(p, "evaluate")

    p = _verb(sub, "benchmark", fn=cmd_benchmark, help="run (or resume) a grid of methods x datasets x seeds",
              description="Run every cell of a grid (GridConfig JSON) not finished yet, then rebuild the tables; "
                          "safe to interrupt: an unfinished cell resumes from its last checkpoint (OUT/.checkpoints/). "
                          "Options given here override the --config grid's values.",
              examples="  scalabl-pyro benchmark --config bench/grid_cpu.json --out bench/results "
                       "--report bench/RESULTS.md   # resumable grid\n"
                       "  scalabl-pyro benchmark --config bench/grid_cpu.json --out bench/results "
                       "--device cuda --workers 8   # the same on a GPU\n"
                       "  scalabl-pyro benchmark --config bench/grid_cpu.json --out bench/results "
                       "--report bench/RESULTS.md --no-run   # tables only\n"
                       "  scalabl-pyro benchmark --config bench/grid_cpu.json --out bench/results "
                       "--only-datasets boolq --only-seeds 2   # some cells\n")
    p.add_argument("--config", help="grid JSON (see GridConfig; default: the countries grid of the demo methods)")
    p.add_argument("--out", default="runs/benchmark", help="results folder (default runs/benchmark)")
    p.add_argument("--report", default=None, help="also write a Markdown report (e.g. bench/RESULTS.md)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the tables and report from finished runs")
    p.add_argument("--workers", type=int, default=None, help="runs at once, each in its own process (default 1; "
                   "e.g. 8 on one GPU)")
    for what in ("datasets", "methods", "seeds"):
        p.add_argument(f"--only-{what}", default=None, metavar=what.upper(),
                       help=f"comma-separated {what} of the grid to run now (grid.json and the report keep "
                            f"the whole grid)")
    _finish(p, "benchmark")

    p = _verb(sub, "compare-guides", fn=cmd_compare_guides,
              help="train ScalaBL with each autoguide on the default task and compare",
              description="Train ScalaBL with each autoguide on the countries task (seed 0) and tabulate ELBO, "
                          "accuracy, ECE, NLL, Brier, guide size and seconds per step.",
              examples="  scalabl-pyro compare-guides --out runs/guides\n"
                       "  scalabl-pyro compare-guides --guides normal,lowrank --steps 100 --out runs/two\n")
    p.add_argument("--guides", default="normal,diagonal,lowrank,mvn,iaf,delta",
                   help="comma-separated autoguides (default normal,diagonal,lowrank,mvn,iaf,delta)")
    p.add_argument("--out", default="runs/guides", help="output folder (default runs/guides)")
    _finish(p, "compare-guides")
    return ap


def _unrecognized(ap: argparse.ArgumentParser, verb: str, extra: list[str]) -> str:
    verbs = ap._subparsers._group_actions[0].choices  # noqa: SLF001 - the verb parsers argparse built
    hints = []
    for flag in dict.fromkeys(a.split("=")[0] for a in extra if a.startswith("--")):
        owners = [v for v, vp in verbs.items() if flag in vp._option_string_actions]  # noqa: SLF001
        hints.append(f"{flag} is an option of {', '.join(owners)}, not of {verb}" if owners
                     else f"no verb has {flag}")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return f"unrecognized arguments: {' '.join(extra)}{hint}; see 'scalabl-pyro {verb} --help'"


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args, extra = ap.parse_known_args(argv)
    except SystemExit as e:  # --help, --version (0) or a bad option value (2); argparse has printed why
        return e.code if isinstance(e.code, int) else 0
    if extra:
        print(f"scalabl-pyro {args.command}: error: {_unrecognized(ap, args.command, extra)}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, OSError, ModuleNotFoundError,
            RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"scalabl-pyro {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("the last checkpoint is kept: rerun with --resume to continue" if args.command == "train"
                else "finished runs are kept: rerun to resume")
        print(f"interrupted; {hint}", file=sys.stderr)
        return 130
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Close the torch.distributed group a data-parallel ``train`` started (torchrun), if any."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
