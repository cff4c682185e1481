"""Checkpoints of :func:`~scalabl_pyro.train.fit`: everything needed to resume training bit for bit.

``fit(..., checkpoint_dir=d, checkpoint_every=k)`` writes, every ``k`` steps and after the last one::

    d/
      step-00000040/            one complete checkpoint (only the newest is kept)
        meta.json               format, step, steps, TrainConfig, fingerprint, loss history, seconds,
                                KL weight, minibatch position, param shapes and constraints
        params.safetensors      every tensor of Pyro's param store (unconstrained values)
        state.pt                optimizer + LR-schedule state (by parameter name), RNG states (torch, CUDA,
                                python, numpy), the minibatch generator's state and the epoch order
                                (``torch.save`` of plain containers; read back with ``weights_only=True``)

A checkpoint is written into a temporary directory ``d/.step-00000040.tmp-*``, flushed and renamed into
place in one step, and only then is the previous one deleted: whenever the process dies, ``d`` holds a
complete checkpoint (the newest ``step-*`` directory). Names starting with ``.`` are never read, and
leftovers of a killed writer are removed by the next save. One writer per directory.

Resuming checks that the run is the same: the :class:`~scalabl_pyro.config.TrainConfig` (every field but
``validate``), the number of examples and a digest of their ``id`` order, the model's class and ``name``, the
guide's class, the latent sites, and every parameter's name, shape and constraint. A difference raises
:class:`CheckpointMismatchError` naming it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from safetensors.torch import load_file, save_file

from .distributed import full_tensor, is_sharded, shard_like
from ._utils import atomic_dir
from .config import TrainConfig

__all__ = ["Checkpoint", "CheckpointMismatchError", "load_checkpoint", "save_checkpoint", "latest_checkpoint",
           "resolve_every", "fingerprint", "check_compatible", "restore_params", "rng_state", "set_rng_state", "snapshot"]

FORMAT = 1
META, PARAMS, STATE = "meta.json", "params.safetensors", "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_IGNORED_CONFIG = ("validate",)  # Pyro's distribution checks do not change a single number


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a different run (config, data, model or guide) than the one resuming it."""


@dataclass
class Checkpoint:
    """One checkpoint read back by :func:`load_checkpoint`.

    :ivar path: its ``step-*`` directory. :ivar meta: ``meta.json``. :ivar params: the param store tensors (CPU).
    :ivar state: ``state.pt``: ``optim``, ``rng``, ``generator``, ``order``.
    """

    path: Path
    meta: dict
    params: dict
    state: dict

    @property
    def step(self) -> int:
        """Number of completed steps: training resumes at this step index."""
        return int(self.meta["step"])

    @property
    def losses(self) -> list[float]:
        return list(self.meta["losses"])

    @property
    def history(self) -> dict:
        """The monitored posterior summaries (``monitor_steps``, ``kl``, ``scale``) so far."""
        return dict(self.meta.get("history", {}))

    @property
    def seconds(self) -> float:
        return float(self.meta["seconds"])

    @property
    def pos(self) -> int:
        return int(self.meta["pos"])


def resolve_every(checkpoint_dir, checkpoint_every, steps: int) -> int | None:
    """Validate ``fit``'s checkpoint arguments; the default interval is ``max(1, steps // 10)``.

    :returns: the interval, or ``None`` without ``checkpoint_dir``.
    """
    if checkpoint_dir is None:
        if checkpoint_every is not None:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} needs checkpoint_dir= (where to write them)")
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path, got {type(checkpoint_dir).__name__}")
    if checkpoint_every is None:
        return max(1, steps // 10)
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a positive integer (steps between "
                         "checkpoints), or None for max(1, steps // 10)")
    return checkpoint_every


def fingerprint(model, guide, examples: Sequence) -> dict:
    """What identifies a run besides its config: data size and order, model, guide, latent sites."""
    ids = [getattr(examples[i], "id", None) for i in range(len(examples))]
    digest = (hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]
              if all(i is not None for i in ids) else None)
    return {"num_examples": len(examples), "examples_digest": digest, "model": type(model).__name__,
            "model_name": getattr(model, "name", None), "guide": None if guide is None else type(guide).__name__,
            "latent_sites": list(getattr(model, "latent_sites", ()))}


def check_compatible(ckpt: Checkpoint, config: TrainConfig, fp: dict) -> None:
    """Raise :class:`CheckpointMismatchError` naming every config field and fingerprint entry that differs."""
    saved, now = ckpt.meta["config"], config.to_dict()
    diffs = [f"config.{k}: checkpoint {saved.get(k, '<absent>')!r}, now {now.get(k, '<absent>')!r}"
             for k in sorted(set(saved) | set(now)) if k not in _IGNORED_CONFIG and saved.get(k) != now.get(k)]
    old = ckpt.meta["fingerprint"]
    diffs += [f"{k}: checkpoint {old.get(k)!r}, now {fp.get(k)!r}" for k in sorted(set(old) | set(fp))
              if old.get(k) != fp.get(k) and k != "latent_sites"]
    if old.get("latent_sites") != fp.get("latent_sites"):
        diffs.append(f"latent_sites: checkpoint has {len(old.get('latent_sites') or [])}, now "
                     f"{len(fp.get('latent_sites') or [])} (first differing: "
                     f"{_first_diff(old.get('latent_sites') or [], fp.get('latent_sites') or [])!r})")
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoint {ckpt.path} was written by a different run: " + "; ".join(diffs)
            + ". Resume with the original settings, or pass another checkpoint_dir to start afresh.")


def _first_diff(a: list, b: list):
    for x, y in itertools.zip_longest(a, b):
        if x != y:
            return x if x is not None else y
    return None


# --------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """The global RNG states: torch CPU, CUDA (when initialized), python ``random`` and numpy."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states for as many devices as are present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------------------------------- write
def _save_tensors(tensors: dict, path: Path) -> None:
    save_file(tensors, str(path))


def _save_state(obj, path: Path) -> None:
    torch.save(obj, path)


def snapshot(optim) -> tuple[dict, dict]:
    """``(params, optimizer state)`` to checkpoint: the whole param store on the CPU and ``optim``'s state, with
    tensors sharded by FSDP gathered whole (then a collective: every rank calls it, rank 0 writes)."""
    store = pyro.get_param_store()
    params = {k: full_tensor(v.detach()).cpu().contiguous().clone() for k, v in store.named_parameters()}
    # Pyro loads a parameter's optimizer state when it first sees the parameter: keep what is still waiting.
    return params, {**getattr(optim, "_state_waiting_to_be_consumed", {}), **optim.get_state()}


def save_checkpoint(checkpoint_dir, *, step: int, config: TrainConfig, fingerprint: dict, losses: list,
                    seconds: float, optim, generator: torch.Generator, order: torch.Tensor, pos: int,
                    kl_weight: float | None = None, history: dict | None = None, rng: dict | None = None,
                    taken: tuple[dict, dict] | None = None) -> Path:
    """Write the checkpoint after ``step`` completed steps to ``checkpoint_dir/step-<step>`` atomically.

    Saves the whole param store, ``optim``'s ``get_state()`` (a :class:`~scalabl_pyro.optim.FusedAdamW`, or a
    :class:`pyro.optim.PyroOptim` with its per-parameter LR scheduler counters), the RNG states, the minibatch ``generator``/``order``/``pos`` and the history; then
    deletes older checkpoints and stale temporary directories.

    :param rng: the RNG states to record (default: this process's :func:`rng_state`; a data-parallel
        :func:`~scalabl_pyro.train.fit` passes ``{"ranks": [every rank's rng_state()]}``).
    :param taken: :func:`snapshot`'s ``(params, optimizer state)`` taken on every rank (FSDP); default: taken here.
    :returns: the new checkpoint's directory.
    """
    root = Path(checkpoint_dir)
    target = root / f"step-{step:08d}"
    store = pyro.get_param_store()
    params, optim_state = taken if taken is not None else snapshot(optim)
    constraints = {k: repr(c) for k, c in store.get_state()["constraints"].items()}
    meta = {"format": FORMAT, "step": step, "steps": config.steps, "config": config.to_dict(),
            "fingerprint": fingerprint, "losses": [float(x) for x in losses], "seconds": float(seconds),
            "history": history or {},
            "kl_weight": kl_weight, "pos": int(pos), "params": {k: list(v.shape) for k, v in params.items()},
            "constraints": constraints, "torch": torch.__version__, "pyro": pyro.__version__}
    state = {"optim": optim_state, "rng": rng if rng is not None else rng_state(), "generator": generator.get_state(), "order": order.clone()}
    with atomic_dir(target) as tmp:
        _save_tensors(params, tmp / PARAMS)
        _save_state(state, tmp / STATE)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    for p in root.iterdir():  # the new checkpoint is in place: drop older ones and leftovers of killed writers
        if p != target and p.is_dir() and (_STEP_DIR.match(p.name) or p.name.startswith(".step-")):
            shutil.rmtree(p, ignore_errors=True)
    return target


# -------------------------------------------------------------------------------------------- read
def latest_checkpoint(checkpoint_dir) -> Path | None:
    """The newest complete ``step-*`` directory under ``checkpoint_dir`` (``None`` if there is none)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(checkpoint_dir) -> Checkpoint | None:
    """Read the newest checkpoint under ``checkpoint_dir``; ``None`` when it holds none.

    :raises ValueError: for a checkpoint of another format version or one with a missing file.
    """
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    meta = json.loads((path / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r} is not supported by this version "
                         f"({FORMAT})")
    for name in (PARAMS, STATE):
        if not (path / name).is_file():
            raise ValueError(f"{path} is incomplete: {name} is missing")
    params = load_file(str(path / PARAMS), device="cpu")
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    return Checkpoint(path=path, meta=meta, params=params, state=state)


def restore_params(ckpt: Checkpoint, model, guide, batch: dict, *, num_data: int) -> None:
    """Create the model's and guide's parameters and copy the checkpoint's values into them in place.

    Autoguides create their parameters on their first call, so the guide runs once on ``batch`` (without
    a guide, the model runs once as a shape pass). The values are then copied into the param store's
    tensors, which are the very tensors the guide's ``PyroParam``s and the model's adapters hold.

    :raises CheckpointMismatchError: naming missing, unexpected or reshaped parameters and changed constraints.
    """
    with torch.no_grad():
        if guide is not None:
            guide(batch, batch["labels"], num_data=num_data)
        else:  # under InitMessenger the models skip the backbone (as in an autoguide's prototype trace)
            with poutine.block(), InitMessenger(init_to_median):
                model(batch, batch["labels"], num_data=num_data)
    store = pyro.get_param_store()
    current = dict(store.named_parameters())
    constraints = {k: repr(c) for k, c in store.get_state()["constraints"].items()}
    saved, saved_c = ckpt.params, ckpt.meta.get("constraints", {})
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)}, now {tuple(current[k].shape)}"
              for k in sorted(set(current) & set(saved)) if saved[k].shape != current[k].shape]
    changed = [f"{k}: checkpoint {saved_c[k]}, now {constraints.get(k)}"
               for k in sorted(set(current) & set(saved_c)) if saved_c[k] != constraints.get(k)]
    if missing or unexpected or shapes or changed:
        raise CheckpointMismatchError(
            f"the parameters do not match the checkpoint {ckpt.path}: not in the checkpoint {missing[:5]}, "
            f"only in the checkpoint {unexpected[:5]}, shapes {shapes[:5]}, constraints {changed[:5]} (another "
            "guide or model config? Pyro's param store must hold this run's parameters only: "
            "pyro.clear_param_store() before building the model and guide)")
    with torch.no_grad():
        for k, v in saved.items():
            if is_sharded(current[k]):  # FSDP: this rank's shard of the whole saved tensor
                current[k].to_local().copy_(shard_like(v, current[k]).to_local())
            else:
                current[k].copy_(v)
