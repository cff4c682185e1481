"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``, or ``accelerate launch --multi_gpu``).

:func:`~scalabl_pyro.train.fit` runs unchanged in every process of a job: when a process group of more than
one process is up (or the launcher's environment names one, :func:`init_from_env`), each rank

* takes its shard of every global minibatch (``TrainConfig.batch_size`` questions, the same order on every
  rank, split in ``world_size`` contiguous shards),
* draws its own ``s`` (its RNG is seeded with ``TrainConfig.seed + 1000 * rank`` when ``fit`` starts): the
  ranks' ELBO estimates are particles of one estimate, each on its own shard,
* scales its shard's likelihood by the global data size (``num_data = len(examples)``), and
* averages gradients over the ranks (one all-reduce of all gradients per step, :func:`all_reduce_mean_`)
  before the same optimizer update on every rank, so the parameters stay equal on every rank.

Only rank 0 shows progress, warns and writes checkpoints (with every rank's RNG state); results are the
caller's to write on rank 0 (:func:`is_main`). Backends: ``gloo`` on CPU, ``nccl`` on GPUs.

Example (``train.py`` launched as ``torchrun --nproc-per-node 2 train.py``)::

    from scalabl_pyro import distributed, fit
    distributed.init_from_env()            # reads RANK / WORLD_SIZE / MASTER_ADDR set by torchrun
    res = fit(model, guide, train.examples, config=cfg)
    if distributed.is_main():
        save_run("runs/obqa", model, guide)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "world_size", "rank", "is_main", "active", "all_reduce_mean_", "shard", "RankFailedError"]


class RankFailedError(RuntimeError):
    """A collective failed because another rank of the job ended (its error is in that rank's output)."""


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that writes files."""
    return rank() == 0


def init_from_env(*, backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Start the process group a launcher describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``: ``torchrun`` and ``accelerate launch`` set them); nothing when
    ``WORLD_SIZE`` is unset or 1, or when a group is already up.

    :param backend: ``"gloo"`` (CPU; default without CUDA) or ``"nccl"`` (default with CUDA).
    :returns: whether a multi-process group is active afterwards.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; install a torch "
                           "with distributed support or launch one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={size} but {missing} are not set: launch with torchrun --nproc-per-node "
                           f"{size} (or accelerate launch), which sets them")
    from datetime import timedelta

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shard(indices: list[int]) -> list[int]:
    """This rank's contiguous share of a global minibatch (every rank holds the same ``indices``)."""
    n, k = world_size(), rank()
    if len(indices) % n:
        raise ValueError(f"batch_size={len(indices)} does not split over {n} processes: use a multiple of {n}")
    m = len(indices) // n
    return indices[k * m:(k + 1) * m]


def _collective(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:  # a peer died or timed out
        raise RankFailedError(f"rank {rank()}: another process of the job failed ({e}); see its output for "
                              "the cause. Nothing was written after the last checkpoint.") from e


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over the ranks, in one all-reduce (flattened into one buffer)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective(dist.all_reduce, flat)
    flat /= world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``tensors`` (in place)."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            _collective(dist.broadcast, t, 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _collective(dist.all_gather_object, out, obj)
    return out
