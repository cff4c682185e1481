"""Data-parallel fit on torch.distributed (scalabl_pyro.distributed): 2 gloo processes on the CPU against one
process that computes the same thing shard by shard."""
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
from scalabl_pyro.model import ScalaBL
from scalabl_pyro.optim import FusedAdamW, elbo_loss
from scalabl_pyro.train import fit, make_elbo

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

N, WORLD = 12, 2
CFG = TrainConfig(steps=4, batch_size=4, lr=5e-2, guide_lr=5e-2, clip_norm=0.05, warmup=0.25, seed=2)


def _build():
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    model = ScalaBL(_make_net("choice"))
    return model, default_guide(model)


def _values(model) -> dict:
    out = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    out.update({f"net.{i}": p.detach().clone() for i, p in enumerate(model.net.trainable_parameters())})
    return out


def _median_logits(model, guide, examples) -> torch.Tensor:
    batch = model.net.collate(examples)
    with torch.no_grad():
        return model.net.logits(batch, s={k: v[None] for k, v in guide.median().items()})


def _worker(rank: int, port: int, out: str, ckpt_dir: str | None, fail_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = {"rank": rank}
    try:
        assert distributed.init_from_env(backend="gloo", timeout_s=60)
        model, guide = _build()
        examples = synthetic_examples(N)

        def callback(step, loss):
            if step == fail_at and rank == 1:
                raise RuntimeError("rank 1 fails on purpose")

        res = fit(model, guide, examples, config=CFG, progress=False, warn_unconverged=False, callback=callback,
                  checkpoint_dir=ckpt_dir, checkpoint_every=1 if ckpt_dir else None)
        result.update(values=_values(model), losses=res.losses, logits=_median_logits(model, guide, examples[:4]))
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


def _run(tmp_path, *, ckpt_dir=None, fail_at=None) -> list[dict]:
    ctx = mp.get_context("spawn")
    out, port = str(tmp_path / "result"), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out, ckpt_dir, fail_at)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode is not None, "a worker hung"
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def _reference(steps: int):
    """One process: each step, shard k of the global batch with rank k's RNG stream (seeded as fit seeds rank
    k), gradients of the mean of the shards' ELBO estimates, one update."""
    model, guide = _build()
    examples = synthetic_examples(N)
    optim, elbo = FusedAdamW(CFG, model_prefix=model.name), make_elbo(CFG)
    states = []
    for k in range(WORLD):
        pyro.set_rng_seed(CFG.seed + 1000 * k)
        states.append(torch.get_rng_state())
    gen = torch.Generator().manual_seed(CFG.seed)
    order, pos, m = torch.randperm(N, generator=gen), 0, CFG.batch_size // WORLD
    with pyro.validation_enabled(False):
        for _ in range(steps):
            if pos + CFG.batch_size > N:
                order, pos = torch.randperm(N, generator=gen), 0
            idx = order[pos:pos + CFG.batch_size].tolist()
            pos += CFG.batch_size
            for k in range(WORLD):
                torch.set_rng_state(states[k])
                batch = model.net.collate([examples[i] for i in idx[k * m:(k + 1) * m]])
                with poutine.trace(param_only=True) as tr:
                    _, surrogate = elbo_loss(elbo, model, guide, batch, batch["labels"], num_data=N)
                (surrogate / WORLD).backward()
                states[k] = torch.get_rng_state()
            optim.step(tr.trace)
    return _values(model), _median_logits(model, guide, examples[:4])


def test_two_processes_take_the_steps_of_one_with_the_same_draws(tmp_path):
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"))
    for r in ranks:
        assert "error" not in r, r.get("tb")
    want, want_logits = _reference(CFG.steps)
    for r in ranks:  # every rank ends with the parameters of the one-process computation
        assert r["values"].keys() == want.keys()
        for k in want:
            torch.testing.assert_close(r["values"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(r["logits"], want_logits, rtol=1e-5, atol=1e-5)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the mean over the ranks, on every rank
    saved = torch.load(latest_checkpoint(tmp_path / "ckpt") / "state.pt", weights_only=False)
    assert len(saved["rng"]["ranks"]) == WORLD  # rank 0 wrote every rank's RNG state


def test_a_failing_rank_ends_the_job_with_a_clear_error_and_the_job_resumes(tmp_path):
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"), fail_at=1)
    assert ranks[1]["error"] == "RuntimeError" and "on purpose" in ranks[1]["message"]
    assert ranks[0]["error"] == "RankFailedError", ranks[0].get("tb")
    assert "another process of the job failed" in ranks[0]["message"]
    last = latest_checkpoint(tmp_path / "ckpt")  # only whole checkpoints, from before the failure
    assert last is not None and last.name == "step-00000001"
    assert not [p for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith("step-")]
    ranks = _run(tmp_path, ckpt_dir=str(tmp_path / "ckpt"))  # launched again: each rank resumes its own draws
    want, _ = _reference(CFG.steps)
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


def test_cli_train_runs_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m scalabl_pyro -- train ...`: one run folder, written by rank 0, that loads
    (``--`` ends torchrun's options: without it torchrun reads ``--r`` as an abbreviation of its own)."""
    import subprocess
    import sys

    from scalabl_pyro.io import load_run

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "scalabl_pyro", "--", "train", "--out", str(out), "--r", "4", "--backbone", "tiny", "--steps", "2",
           "--batch-size", "4", "--train-limit", "8", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved to") == 1 and "2 processes" in proc.stdout  # rank 0 alone reports and writes
    assert (out / "run.json").exists() and not (out / "checkpoint").exists()
    model, guide, info = load_run(out)
    assert model.latent_sites and guide is not None and info["train_config"].steps == 2
