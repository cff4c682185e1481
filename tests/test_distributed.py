"""Data-parallel fit on torch.distributed (scalabl_pyro.distributed): 2 gloo processes on the CPU against one
process that computes the same thing shard by shard, with whole layers on every rank or sharded by FSDP2."""
from __future__ import annotations

import os
import socket
import traceback

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro import poutine

from conftest import _make_net, synthetic_examples
from scalabl_pyro import distributed
from scalabl_pyro.checkpoint import latest_checkpoint
from scalabl_pyro.config import TrainConfig
from scalabl_pyro.guides import default_guide
from scalabl_pyro.io import export_peft, load_run, save_run
from scalabl_pyro.model import ScalaBL
from scalabl_pyro.optim import FusedAdamW, elbo_loss
from scalabl_pyro.train import fit, make_elbo
from scalabl_pyro.trunk import last_layers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

N, WORLD = 12, 2
CFG = TrainConfig(steps=4, batch_size=4, lr=5e-2, guide_lr=5e-2, clip_norm=0.05, warmup=0.25, seed=2)


def _build(fsdp: bool = False, variant: str = "choice"):
    """``"choice"``: per-module sites, choice scoring; ``"partial"``: letter scoring, the vectorized layout and only
    the last layer (and lm_head) stochastic, so the shared trunk calls the layers one by one; ``"bf16"``: as
    ``"choice"``, computing with bfloat16 copies of the FSDP-gathered weights; ``"checkpointed"``: as ``"choice"``
    with activation checkpointing (each layer recomputed in the backward, gathered again by FSDP)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    ckpt = {"gradient_checkpointing": True, "prefix_cache": False} if variant == "checkpointed" else {}
    net = _make_net("letter" if variant == "partial" else "choice", **ckpt)
    if fsdp:  # "bf16": the gathered weights in bfloat16 (FSDP's MixedPrecisionPolicy)
        distributed.shard_model(net, param_dtype=torch.bfloat16 if variant == "bf16" else None)
    opts = {"stochastic": last_layers(net, 1), "layout": "vectorized"} if variant == "partial" else {}
    model = ScalaBL(net, **opts)
    return model, default_guide(model)


def _values(model) -> dict:
    """Every parameter, whole (sharded ones gathered: every rank calls this)."""
    whole = distributed.full_tensor
    out = {k: whole(v).detach().clone() for k, v in pyro.get_param_store().items()}
    out.update({f"net.{i}": whole(p).detach().clone() for i, p in enumerate(model.net.trainable_parameters())})
    return out


def _median_logits(model, guide, examples) -> torch.Tensor:
    batch = model.net.collate(examples)
    with torch.no_grad():
        s = {k: v[None] for k, v in model.module_values(guide.median()).items()}
        s.update({k: model.net.subspace.s0[k][None] for k in model.fixed_sites})  # plain LoRA modules: s0
        return model.net.logits(batch, s=s)


def _worker(rank: int, port: int, out: str, ckpt_dir: str | None, fail_at: int | None, fsdp: bool,
            variant: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        assert distributed.init_from_env(backend="gloo", timeout_s=60)
        model, guide = _build(fsdp, variant)
        examples = synthetic_examples(N)
        if fsdp:  # the decoder layers' weights and adapters are shards; lm_head's adapter and the guide are whole
            layer_params = [p for layer in model.net._layers for p in layer.parameters()]
            result["sharded"] = (all(distributed.is_sharded(p) for p in layer_params),
                                 any(distributed.is_sharded(p) for p in guide.parameters()))
            result["numel"] = (sum(p.to_local().numel() for p in layer_params), sum(p.numel() for p in layer_params))

        def callback(step, loss):
            if step == fail_at and rank == 1:
                raise RuntimeError("rank 1 fails on purpose")

        res = fit(model, guide, examples, config=CFG, progress=False, warn_unconverged=False, callback=callback,
                  checkpoint_dir=ckpt_dir, checkpoint_every=1 if ckpt_dir else None)
        result.update(values=_values(model), losses=res.losses, logits=_median_logits(model, guide, examples[:4]))
        if fsdp:  # every rank calls them (the shards are gathered), rank 0 writes
            save_run(f"{out}.run", model, guide, backbone="tiny")
            export_peft(f"{out}.peft", model, guide)
    except BaseException as e:  # reported to the test, which checks the error's type and message
        result.update(error=type(e).__name__, message=str(e), tb=traceback.format_exc())
    finally:
        torch.save(result, f"{out}.{rank}")
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, *, ckpt_dir=None, fail_at=None, fsdp=False, variant="choice") -> list[dict]:
    ctx = mp.get_context("spawn")
    out, port = str(tmp_path / "result"), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out, ckpt_dir, fail_at, fsdp, variant)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode is not None, "a worker hung"
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def _reference(steps: int, variant: str = "choice"):
    """One process: each step, shard k of the global batch with rank k's RNG stream (seeded as fit seeds rank
    k), gradients of the mean of the shards' ELBO estimates, one update."""
    model, guide = _build(variant=variant)
    examples = synthetic_examples(N)
    optim, elbo = FusedAdamW(CFG, model_prefix=model.name), make_elbo(CFG)
    states = []
    for k in range(WORLD):
        pyro.set_rng_seed(CFG.seed + 1000 * k)
        states.append(torch.get_rng_state())
    gen = torch.Generator().manual_seed(CFG.seed)
    order, pos, m = torch.randperm(N, generator=gen), 0, CFG.batch_size // WORLD
    losses = []  # what fit reports: the ranks' mean loss per example
    with pyro.validation_enabled(False):
        for _ in range(steps):
            if pos + CFG.batch_size > N:
                order, pos = torch.randperm(N, generator=gen), 0
            idx = order[pos:pos + CFG.batch_size].tolist()
            pos += CFG.batch_size
            step_loss = 0.0
            for k in range(WORLD):
                torch.set_rng_state(states[k])
                batch = model.net.collate([examples[i] for i in idx[k * m:(k + 1) * m]])
                with poutine.trace(param_only=True) as tr:
                    loss, surrogate = elbo_loss(elbo, model, guide, batch, batch["labels"], num_data=N)
                (surrogate / WORLD).backward()
                states[k] = torch.get_rng_state()
                step_loss += float(loss) / WORLD / N
            losses.append(step_loss)
            optim.step(tr.trace)
    return _values(model), _median_logits(model, guide, examples[:4]), losses


@pytest.mark.parametrize("fsdp, variant", [(False, "choice"), (True, "choice"), (True, "partial"), (True, "checkpointed")],
                         ids=["whole", "fsdp", "fsdp-partial", "fsdp-checkpointed"])
def test_two_processes_take_the_steps_of_one_with_the_same_draws(tmp_path, fsdp, variant):
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"), fsdp=fsdp, variant=variant)
    for r in ranks:
        assert "error" not in r, r.get("tb")
        if fsdp:
            assert r["sharded"] == (True, False)
    if fsdp:  # each rank holds its half of the layers' tensors (rows split in 2 contiguous chunks)
        local, whole = zip(*(r["numel"] for r in ranks))
        assert sum(local) == whole[0] and max(local) - min(local) <= whole[0] // 10
    want, want_logits, want_losses = _reference(CFG.steps, variant)
    assert ranks[0]["losses"] == pytest.approx(want_losses, rel=1e-5)
    for r in ranks:  # every rank ends with the parameters of the one-process computation
        assert r["values"].keys() == want.keys()
        for k in want:
            torch.testing.assert_close(r["values"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(r["logits"], want_logits, rtol=1e-5, atol=1e-5)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the mean over the ranks, on every rank
    saved = torch.load(latest_checkpoint(tmp_path / "ckpt") / "state.pt", weights_only=False)
    assert len(saved["rng"]["ranks"]) == WORLD  # rank 0 wrote every rank's RNG state
    if fsdp:  # the run saved from the shards is the whole model: one process reloads it and predicts the same
        pyro.clear_param_store()
        model, guide, _ = load_run(tmp_path / "result.run")
        torch.testing.assert_close(_median_logits(model, guide, synthetic_examples(N)[:4]), want_logits,
                                   rtol=1e-5, atol=1e-5)
        from safetensors.torch import load_file

        mine = load_file(str(export_peft(tmp_path / "whole.peft", model, guide) / "adapter_model.safetensors"))
        theirs = load_file(str(tmp_path / "result.peft" / "adapter_model.safetensors"))
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(theirs[k], mine[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("fsdp", [False, True], ids=["whole", "fsdp"])
def test_a_failing_rank_ends_the_job_with_a_clear_error_and_the_job_resumes(tmp_path, fsdp):
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"), fail_at=1, fsdp=fsdp)
    assert ranks[1]["error"] == "RuntimeError" and "on purpose" in ranks[1]["message"]
    assert ranks[0]["error"] == "RankFailedError", ranks[0].get("tb")
    assert "another process of the job failed" in ranks[0]["message"]
    last = latest_checkpoint(tmp_path / "ckpt")  # only whole checkpoints, from before the failure
    assert last is not None and last.name == "step-00000001"
    assert not [p for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("step-")]
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"), fsdp=fsdp)  # launched again: each resumes its draws
    want, _, _ = _reference(CFG.steps)
    for r in ranks:
        assert "error" not in r, r.get("tb")
        for k in want:
            torch.testing.assert_close(r["values"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_shard_refuses_a_batch_that_does_not_split(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(list(range(6))) == [2, 3]
    with pytest.raises(ValueError, match="batch_size=4 does not split over 3 processes"):
        distributed.shard(list(range(4)))


def test_without_a_process_group_nothing_changes(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env() and not distributed.active()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    t = torch.ones(3)
    distributed.all_reduce_mean_([t])
    assert torch.equal(t, torch.ones(3))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        distributed.init_from_env()


def test_a_checkpoint_resumes_only_with_as_many_processes():
    from scalabl_pyro.checkpoint import CheckpointMismatchError
    from scalabl_pyro.train import _rank_rng

    with pytest.raises(CheckpointMismatchError, match="run of 2 processes; resume it with 2"):
        _rank_rng({"ranks": [{}, {}]}, dp=False)
    assert _rank_rng({"torch": 1}, dp=False) == {"torch": 1}


@pytest.mark.parametrize("fsdp", [False, True], ids=["whole", "fsdp"])
def test_cli_train_runs_under_torchrun(tmp_path, fsdp):
    """`torchrun --nproc-per-node 2 -m scalabl_pyro -- train ...`: one run folder, written by rank 0, that loads
    (``--`` ends torchrun's options: without it torchrun reads ``--r`` as an abbreviation of its own)."""
    import subprocess
    import sys

    from scalabl_pyro.io import load_run

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "scalabl_pyro", "--", "train", "--out", str(out), "--r", "4", "--backbone", "tiny", "--steps", "2",
           "--batch-size", "4", "--train-limit", "8", "--quiet"] + (["--fsdp"] if fsdp else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved to") == 1 and "2 processes" in proc.stdout  # rank 0 alone reports and writes
    assert ("FSDP" in proc.stdout) == fsdp
    assert (out / "run.json").exists() and not (out / "checkpoint").exists()
    model, guide, info = load_run(out)
    assert model.latent_sites and guide is not None and info["train_config"].steps == 2


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs a torch.distributed group of several processes"):
        distributed.shard_model(_make_net("choice"))
    assert not distributed.sharded(_make_net("choice")) and not distributed.is_sharded(torch.ones(2))


def test_cli_fsdp_needs_torchrun(tmp_path, capsys):
    from scalabl_pyro.harness.cli import main

    assert main(["train", "--backbone", "tiny", "--fsdp", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err


def test_fsdp_in_bfloat16_follows_the_float32_steps(tmp_path):
    """shard_model(param_dtype=torch.bfloat16): the same steps as the float32 reference up to bfloat16 rounding."""
    ranks = _run(tmp_path, fsdp=True, variant="bf16")
    for r in ranks:
        assert "error" not in r, r.get("tb")
    want, want_logits, want_losses = _reference(CFG.steps)
    assert ranks[0]["losses"] == pytest.approx(want_losses, rel=2e-2)
    assert ranks[0]["losses"] != pytest.approx(want_losses, rel=1e-6)  # it did compute in bfloat16
    # (parameters are not compared: Adam's first steps move each entry by about lr whatever the gradient's size,
    # so bfloat16 noise in near-zero gradients flips single entries; the model's outputs stay close)
    torch.testing.assert_close(ranks[0]["logits"], want_logits, rtol=5e-2, atol=5e-2)
