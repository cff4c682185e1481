"""Checkpoint and resume in fit(): an interrupted and resumed run equals an uninterrupted one exactly."""
from __future__ import annotations

import json
import logging

import pyro
import pytest
import torch

import scalabl_pyro.checkpoint as ckpt_mod
import scalabl_pyro.train as train_mod
from conftest import synthetic_examples
from scalabl_pyro.checkpoint import CheckpointMismatchError, latest_checkpoint, load_checkpoint
from scalabl_pyro.config import TrainConfig
from scalabl_pyro.guides import default_guide
from scalabl_pyro.train import fit, lr_lambda

# warmup + cosine decay, KL annealing over 9 of the 12 steps, minibatches that cross epochs (24 / 5)
CFG = TrainConfig(steps=12, batch_size=5, lr=1e-2, guide_lr=3e-2, warmup=0.25, kl_anneal=0.75, seed=3)


class Stop(Exception):
    pass


def _build(make_model, kind):
    """A fresh model and guide, built the same way every time (clean param store, seeded RNG)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = make_model("letter", bayes=kind == "scalabl", lora_dropout=0.1)
    # Active LoRA dropout draws from the global torch RNG in every forward, as the guide's sampling does:
    # then even the plain LoRA run depends on restoring it.
    for name, m in model.net.peft_model.named_modules():
        if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in name:
            m.train()
    return model, (default_guide(model) if kind == "scalabl" else None)


def _store() -> dict:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def _stop_at(s):
    def callback(step, loss):
        if step == s:
            raise Stop(step)

    return callback


@pytest.mark.parametrize("kind", ["scalabl", "lora"])
def test_resume_equals_uninterrupted(make_model, examples, tmp_path, kind):
    model, guide = _build(make_model, kind)
    ref = fit(model, guide, examples, config=CFG, progress=False)
    ref_params = _store()
    assert len(ref_params) == (20 if kind == "scalabl" else 10)

    model, guide = _build(make_model, kind)
    seen = []
    # Steps 0..7 run; the checkpoint holds 5 steps (after the first reshuffle at step 4, so the minibatch
    # generator's state matters), so 5..7 are redone.
    with pytest.raises(Stop):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5,
            callback=lambda step, loss: (seen.append(step), _stop_at(7)(step, loss)))
    assert seen == list(range(8)) and load_checkpoint(tmp_path).step == 5

    model, guide = _build(make_model, kind)
    torch.manual_seed(123)  # a different global RNG: resume must restore it
    seen = []
    res = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5,
              callback=lambda step, loss: seen.append(step))
    assert seen == list(range(5, 12)) and res.resumed_from == 5 and res.steps == 12
    assert res.losses == pytest.approx(ref.losses, abs=1e-6, rel=0)
    params = _store()
    assert params.keys() == ref_params.keys()
    for k, v in ref_params.items():
        torch.testing.assert_close(params[k], v, atol=1e-6, rtol=0, msg=k)
    if guide is not None:  # the guide's own PyroParams hold the restored values (not a detached copy)
        for name, p in guide.named_parameters():
            assert pyro.get_param_store().param_name(p) is not None, name
    assert getattr(model, "kl_weight", 1.0) == 1.0
    assert load_checkpoint(tmp_path).step == 12  # final checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000012"]


@pytest.mark.parametrize("kind", ["scalabl", "lora"])
def test_resume_without_rng_restore_differs(make_model, examples, tmp_path, monkeypatch, kind):
    """The acceptance test can fail: without restoring the RNG states the resumed run differs."""
    model, guide = _build(make_model, kind)
    ref = fit(model, guide, examples, config=CFG, progress=False)
    model, guide = _build(make_model, kind)
    with pytest.raises(Stop):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4,
            callback=_stop_at(5))
    model, guide = _build(make_model, kind)
    torch.manual_seed(123)
    monkeypatch.setattr(train_mod.ckpt, "set_rng_state", lambda state: None)
    res = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert res.losses[:4] == ref.losses[:4] and res.losses[4:] != pytest.approx(ref.losses[4:], abs=1e-6)


def test_resume_in_the_same_process_with_the_same_objects(make_model, examples, tmp_path):
    model, guide = _build(make_model, "scalabl")
    ref = fit(model, guide, examples, config=CFG, progress=False)
    model, guide = _build(make_model, "scalabl")
    with pytest.raises(Stop):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3,
            callback=_stop_at(7))
    res = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert res.losses == pytest.approx(ref.losses, abs=1e-6, rel=0)


def test_checkpoint_contents(make_model, examples, tmp_path):
    model, guide = _build(make_model, "scalabl")
    seen = {}

    def callback(step, loss):
        seen[step] = latest_checkpoint(tmp_path)

    fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5,
        callback=callback)
    assert seen[4] is None and seen[5].name == "step-00000005" and seen[10].name == "step-00000010"
    c = load_checkpoint(tmp_path)
    assert c.step == 12 and c.path.name == "step-00000012" and len(c.losses) == 12
    assert {p.name for p in c.path.iterdir()} == {"meta.json", "params.safetensors", "state.pt"}
    assert c.meta["config"] == CFG.to_dict() and TrainConfig.from_dict(c.meta["config"]) == CFG
    fp = c.meta["fingerprint"]
    assert fp["num_examples"] == 24 and fp["model"] == "ScalaBL" and fp["guide"] == "AutoNormal"
    assert set(c.params) == set(pyro.get_param_store().keys()) == set(c.meta["params"])
    assert c.meta["constraints"][f"{guide._pyro_name}.scales.{model.latent_sites[0]}"].startswith("SoftplusPositive")
    assert c.meta["kl_weight"] == pytest.approx(1.0)
    state = c.state["optim"]  # FusedAdamW's: one optimizer, its tensors' state keyed by their names
    assert state["format"] == "fused-adamw-1" and sorted(state["names"]) == sorted(c.params)
    assert state["scheduler"]["last_epoch"] == 12  # one schedule step per fit step
    i = state["names"].index(f"{guide._pyro_name}.scales.{model.latent_sites[0]}")
    assert int(state["optimizer"]["state"][i]["step"]) == 12
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == pytest.approx(
        [CFG.lr * lr_lambda(CFG)(12), CFG.guide_lr * lr_lambda(CFG)(12), CFG.lr * lr_lambda(CFG)(12)])  # 3rd: FSDP
    assert c.state["order"].shape == (24,) and c.pos == 20  # 24 // 5 = 4 steps an epoch: step 12 ends one


def test_checkpoint_at_step_k_contains_step_k(make_model, examples, tmp_path):
    model, guide = _build(make_model, "scalabl")
    with pytest.raises(Stop):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3,
            callback=_stop_at(4))
    c = load_checkpoint(tmp_path)
    assert c.step == 3 and len(c.losses) == 3 and c.meta["kl_weight"] == pytest.approx(CFG.kl_weight * 3 / 9)
    assert c.state["optim"]["scheduler"]["last_epoch"] == 3


def test_interrupted_write_keeps_the_previous_checkpoint(make_model, examples, tmp_path, monkeypatch):
    model, guide = _build(make_model, "scalabl")
    original = ckpt_mod._save_state
    calls = []

    def half_then_die(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 6): write half a file, then fail
            original(obj, path)
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
            raise OSError("disk full")
        original(obj, path)

    monkeypatch.setattr(ckpt_mod, "_save_state", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]  # no temporary leftovers
    c = load_checkpoint(tmp_path)
    assert c.step == 3 and len(c.losses) == 3
    monkeypatch.setattr(ckpt_mod, "_save_state", original)
    model, guide = _build(make_model, "scalabl")
    res = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert res.resumed_from == 3 and len(res.losses) == 12


def test_stale_temp_dirs_are_ignored_and_cleaned(make_model, examples, tmp_path):
    (tmp_path / ".step-00000009.tmp-dead").mkdir()  # a writer killed mid-write
    (tmp_path / ".step-00000009.tmp-dead" / "meta.json").write_text("{")
    assert latest_checkpoint(tmp_path) is None
    model, guide = _build(make_model, "scalabl")
    fit(model, guide, examples, config=TrainConfig(steps=2, batch_size=4), progress=False,
        checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]


def _interrupted(make_model, examples, tmp_path, config=CFG):
    model, guide = _build(make_model, "scalabl")
    with pytest.raises(Stop):
        fit(model, guide, examples, config=config, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2,
            callback=_stop_at(3))


@pytest.mark.parametrize("change, match", [
    (dict(config=TrainConfig(**{**CFG.to_dict(), "lr": 5e-3})), r"config\.lr: checkpoint 0\.01, now 0\.005"),
    (dict(config=TrainConfig(**{**CFG.to_dict(), "steps": 20})), r"config\.steps: checkpoint 12, now 20"),
    (dict(examples=synthetic_examples(12)), r"num_examples: checkpoint 24, now 12"),
    (dict(examples=synthetic_examples(24)[::-1]), r"examples_digest"),
])
def test_resume_with_another_run_raises(make_model, examples, tmp_path, change, match):
    _interrupted(make_model, examples, tmp_path)
    model, guide = _build(make_model, "scalabl")
    kw = {"config": CFG, "examples": examples, **change}
    with pytest.raises(CheckpointMismatchError, match=match):
        fit(model, guide, kw["examples"], config=kw["config"], progress=False, checkpoint_dir=tmp_path)
    assert load_checkpoint(tmp_path).step == 2  # untouched


def test_resume_with_another_model_or_guide_raises(make_model, examples, tmp_path):
    _interrupted(make_model, examples, tmp_path)
    model, _ = _build(make_model, "lora")
    with pytest.raises(CheckpointMismatchError, match=r"model: checkpoint 'ScalaBL', now 'LoRAModel'"):
        fit(model, None, examples, config=CFG, progress=False, checkpoint_dir=tmp_path)
    from scalabl_pyro.guides import make_guide

    model, _ = _build(make_model, "scalabl")
    with pytest.raises(CheckpointMismatchError, match=r"guide: checkpoint 'AutoNormal', now 'AutoDelta'"):
        fit(model, make_guide("delta", model), examples, config=CFG, progress=False, checkpoint_dir=tmp_path)
    pyro.clear_param_store()
    model = make_model("letter", target_modules=("q_proj", "lm_head"))
    with pytest.raises(CheckpointMismatchError, match=r"latent_sites: checkpoint has 5, now 3 \(first differing: "
                                                        r"'[^']*layers\.0\.self_attn\.v_proj[^']*'"):
        fit(model, default_guide(model), examples, config=CFG, progress=False, checkpoint_dir=tmp_path)
    pyro.clear_param_store()
    model = make_model("letter", r=2)  # same sites, other shapes
    with pytest.raises(CheckpointMismatchError, match=r"shapes .*checkpoint \(4,\), now \(2,\)"):
        fit(model, default_guide(model), examples, config=CFG, progress=False, checkpoint_dir=tmp_path)


def test_validate_may_differ(make_model, examples, tmp_path):
    _interrupted(make_model, examples, tmp_path)
    model, guide = _build(make_model, "scalabl")
    cfg = TrainConfig(**{**CFG.to_dict(), "validate": True})
    assert fit(model, guide, examples, config=cfg, progress=False, checkpoint_dir=tmp_path).resumed_from == 2


def test_finished_checkpoint_returns_without_training(make_model, examples, tmp_path, monkeypatch, caplog):
    model, guide = _build(make_model, "scalabl")
    first = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5)
    trained = _store()
    mtime = (latest_checkpoint(tmp_path) / "meta.json").stat().st_mtime_ns

    def no_step(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(train_mod, "elbo_loss", no_step)
    monkeypatch.setattr(train_mod, "autonormal_elbo_loss", no_step)
    model, guide = _build(make_model, "scalabl")
    with caplog.at_level(logging.INFO, logger="scalabl_pyro.train"):
        res = fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path,
                  callback=lambda step, loss: pytest.fail("callback called"))
    assert "finished run" in caplog.text
    assert res.losses == first.losses and res.steps == 12 and res.resumed_from == 12
    assert 0 < res.seconds <= first.seconds  # the saved training time (written just before fit returned)
    now = _store()
    for k, v in trained.items():  # the parameters are loaded, so the model is usable right away
        assert torch.equal(now[k], v), k
    assert (latest_checkpoint(tmp_path) / "meta.json").stat().st_mtime_ns == mtime


def test_resume_is_logged_and_shown(make_model, examples, tmp_path, caplog, capsys):
    _interrupted(make_model, examples, tmp_path)
    model, guide = _build(make_model, "scalabl")
    with caplog.at_level(logging.INFO, logger="scalabl_pyro.train"):
        fit(model, guide, examples, config=CFG, progress=True, checkpoint_dir=tmp_path)
    assert "resuming from" in caplog.text and "at step 2 of 12" in caplog.text
    assert "resumed at 2" in capsys.readouterr().err


def test_default_checkpoint_every(make_model, examples, tmp_path):
    model, guide = _build(make_model, "scalabl")
    seen = []
    fit(model, guide, examples, config=TrainConfig(steps=25, batch_size=4), progress=False,
        checkpoint_dir=tmp_path, callback=lambda step, loss: seen.append(latest_checkpoint(tmp_path)))
    assert seen[1] is None and seen[2].name == "step-00000002"  # max(1, 25 // 10) = 2
    assert load_checkpoint(tmp_path).step == 25


@pytest.mark.parametrize("every, dir_, err, match", [
    (0, True, ValueError, "checkpoint_every=0 must be a positive integer"),
    (-3, True, ValueError, "positive integer"),
    (2.5, True, ValueError, "positive integer"),
    (True, True, ValueError, "positive integer"),
    (5, False, ValueError, "needs checkpoint_dir"),
])
def test_checkpoint_every_validation(make_model, examples, tmp_path, every, dir_, err, match):
    model, guide = _build(make_model, "scalabl")
    with pytest.raises(err, match=match):
        fit(model, guide, examples, config=CFG, progress=False, checkpoint_dir=tmp_path if dir_ else None,
            checkpoint_every=every)
    assert not any(tmp_path.iterdir())


def test_meta_is_json(make_model, examples, tmp_path):
    model, guide = _build(make_model, "scalabl")
    fit(model, guide, examples, config=TrainConfig(steps=2, batch_size=4), progress=False, checkpoint_dir=tmp_path)
    meta = json.loads((tmp_path / "step-00000002" / "meta.json").read_text())
    assert meta["format"] == 1 and meta["step"] == meta["steps"] == 2
