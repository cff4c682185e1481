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

**Sharded backbones** (FSDP2, for backbones whose layers do not fit one device): :func:`shard_model` applies
``torch.distributed.fsdp.fully_shard`` to every decoder layer of an :class:`~scalabl_pyro.scoring.AdaptedLM`
(frozen weights and its LoRA projections ``V``, ``B`` alike; each rank keeps ``1/world_size`` of them and
gathers one layer at a time in the forward and backward). Everything above stays as it is: the ranks still take
their shards of the batch and their own draws of ``s``; FSDP averages the layers' gradients in its
reduce-scatter and :func:`all_reduce_mean_` the rest (``lm_head``'s adapter, the guide). The embeddings, final
norm and head stay whole on every rank. Checkpoints and :func:`~scalabl_pyro.io.save_run` hold whole tensors:
every rank calls them (they gather), rank 0 writes.

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

__all__ = ["init_from_env", "world_size", "rank", "is_main", "active", "all_reduce_mean_", "shard", "RankFailedError",
           "shard_model", "sharded", "is_sharded", "full_tensor", "shard_like"]


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
    """Average ``tensors`` in place over the ranks, in one all-reduce (flattened into one buffer).

    :raises TypeError: for a sharded tensor (``DTensor``): FSDP reduces those itself.
    """
    if any(is_sharded(t) for t in tensors):
        raise TypeError("all_reduce_mean_ got a sharded tensor (DTensor); FSDP averages those in its reduce-scatter")
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
            if not is_sharded(t):  # FSDP shards were cut from equal copies (shard_model broadcasts first)
                _collective(dist.broadcast, t, 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


# ------------------------------------------------------------------------------------------ FSDP2
def is_sharded(t) -> bool:
    """True for a tensor sharded over the ranks (a ``DTensor``, as :func:`shard_model` makes the layers' weights)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it); any other tensor as it is."""
    if not is_sharded(t):
        return t
    return _collective(t.full_tensor)


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor ``value`` sharded as the ``DTensor`` ``like`` (no communication: every rank holds ``value``
    and keeps its own shard)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def sharded(model_or_net) -> bool:
    """True when some adapter of this :class:`~scalabl_pyro.scoring.AdaptedLM` (or a model's net) is sharded over the
    ranks (:func:`shard_model`, or ``fully_shard`` applied by hand)."""
    net = getattr(model_or_net, "net", model_or_net)
    return any(is_sharded(p) for p in net.trainable_parameters())


def shard_model(net, *, reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None):
    """Shard every decoder layer of ``net`` over the ranks of the process group with FSDP2 (``fully_shard``).

    Call it on every rank after building the :class:`~scalabl_pyro.scoring.AdaptedLM` (so after ``s0`` and ``V``
    are fixed) and before the Pyro model and guide; then :func:`~scalabl_pyro.train.fit`, ``Predictive``,
    checkpoints and :func:`~scalabl_pyro.io.save_run` work as without sharding. Load the backbone on the CPU
    (each rank) when it does not fit one GPU: the layers move to this rank's GPU as shards, the rest whole.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` (any ``subspace``); modified in place.
    :param reshard_after_forward: free each layer's gathered weights after its forward (least memory; they are
        gathered again for the backward) or keep them until the backward (less communication).
    :param param_dtype: compute dtype of the gathered weights (e.g. ``torch.bfloat16``; FSDP's
        ``MixedPrecisionPolicy``); the shards, ``s`` and the gradients' reduction stay in their own dtype.
    :returns: ``net``.
    :raises RuntimeError: without a process group of several processes, or for a backbone with no layer list.

    Example (every rank, under ``torchrun --nproc-per-node 2``)::

        distributed.init_from_env()
        net = AdaptedLM(lm, tok, label_words=task.label_words, config=ScalaBLConfig(scoring="choice"))
        distributed.shard_model(net)
        model = ScalaBL(net); guide = default_guide(model)
        fit(model, guide, task.examples, config=cfg)
    """
    if not active():
        raise RuntimeError("shard_model needs a torch.distributed group of several processes: launch with torchrun "
                           "--nproc-per-node N and call distributed.init_from_env() first")
    if sharded(net):
        raise RuntimeError("this net is sharded already (shard_model was called on it before)")
    layers = getattr(net, "_layers", None)
    if not layers:
        raise RuntimeError(f"{type(net.decoder).__name__} has no list of decoder layers that FSDP could shard")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    broadcast_(net.trainable_parameters())  # every rank cuts its shard from rank 0's initial adapters
    inside = {id(p) for layer in layers for p in layer.parameters()} | {id(b) for layer in layers for b in layer.buffers()}
    moved: dict[int, torch.nn.Parameter] = {}  # a tied weight (head and embeddings) stays one tensor
    with torch.no_grad():  # the whole (unsharded) part on this rank's device
        for module in net.peft_model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None and id(p) not in inside and p.device != device:
                    if id(p) not in moved:
                        moved[id(p)] = torch.nn.Parameter(p.to(device), requires_grad=p.requires_grad)
                    module._parameters[key] = moved[id(p)]
            for key, b in list(module._buffers.items()):
                if b is not None and id(b) not in inside and b.device != device:
                    module._buffers[key] = b.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype) if param_dtype is not None else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    if net.subspace is not None:  # s0 follows the adapters to the device
        for site in net.subspace.sites.values():
            site.s0 = site.s0.to(device)
    return net
