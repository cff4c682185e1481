"""ScalaBLConfig / TrainConfig: defaults, JSON round trip, validation messages."""
from __future__ import annotations

import json

import pytest

from scalabl_pyro.config import ScalaBLConfig, TrainConfig


def test_scalabl_defaults():
    cfg = ScalaBLConfig()
    assert cfg.r == 8
    assert cfg.alpha == 16.0
    assert cfg.scaling == 2.0
    assert cfg.target_modules == ("q_proj", "v_proj", "lm_head")
    assert cfg.scoring == "letter" and cfg.normalize == "none"
    assert cfg.lora_dropout == 0.0 and cfg.prefix_cache is True


def test_alpha_follows_r_and_explicit_alpha():
    assert ScalaBLConfig(r=4).alpha == 8.0
    cfg = ScalaBLConfig(r=4, lora_alpha=2.0)
    assert cfg.alpha == 2.0 and cfg.scaling == 0.5


def test_train_defaults():
    cfg = TrainConfig()
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.guide_lr) == (200, 8, 1e-3, 5e-2)
    assert cfg.schedule == "cosine" and cfg.elbo == "trace" and cfg.num_particles == 1


@pytest.mark.parametrize("cfg", [
    ScalaBLConfig(),
    ScalaBLConfig(r=3, lora_alpha=5.0, target_modules=("q_proj",), scoring="choice", normalize="chars",
                  prefix_cache=False, prior_scale=0.5, max_length=64, max_forward_batch=7),
    TrainConfig(),
    TrainConfig(steps=7, batch_size=3, lr=0.5, guide_lr=0.25, schedule="linear", elbo="meanfield",
                num_particles=4, vectorize_particles=False, kl_anneal=0.5, seed=9),
], ids=["scalabl-default", "scalabl-custom", "train-default", "train-custom"])
def test_json_round_trip(cfg, tmp_path):
    path = cfg.save(tmp_path / "sub" / "cfg.json")
    on_disk = json.loads(path.read_text())
    assert on_disk["type"] == type(cfg).__name__
    loaded = type(cfg).load(path)
    assert loaded == cfg
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    if isinstance(cfg, ScalaBLConfig):
        assert isinstance(loaded.target_modules, tuple)


def test_load_wrong_type(tmp_path):
    path = TrainConfig().save(tmp_path / "t.json")
    with pytest.raises(ValueError, match="TrainConfig"):
        ScalaBLConfig.load(path)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(scoring="foo"), ["'foo'", "'letter'", "'choice'"]),
    (dict(scoring="choice", normalize="bar"), ["'bar'", "'none'", "'tokens'", "'chars'"]),
    (dict(r=0), ["r=0", "positive"]),
    (dict(r=-3), ["r=-3"]),
    (dict(normalize="tokens"), ["'tokens'", "scoring='choice'", "normalize='none'"]),
    (dict(target_modules=()), ["target_modules=()"]),
    (dict(target_modules="q_proj"), ["'q_proj'", "tuple"]),
    (dict(lora_dropout=1.5), ["lora_dropout=1.5"]),
    (dict(lora_alpha=0.0), ["lora_alpha=0.0"]),
    (dict(prior_scale=-1.0), ["prior_scale=-1.0"]),
    (dict(max_length=4), ["max_length=4"]),
    (dict(max_forward_batch=0), ["max_forward_batch=0"]),
])
def test_scalabl_bad_values(kwargs, needles):
    with pytest.raises(ValueError) as info:
        ScalaBLConfig(**kwargs)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(schedule="step"), ["'step'", "'cosine'", "'linear'", "'constant'"]),
    (dict(elbo="renyi"), ["'renyi'", "'trace'", "'meanfield'"]),
    (dict(steps=0), ["steps=0"]),
    (dict(num_particles=0), ["num_particles=0"]),
    (dict(batch_size=2.5), ["batch_size=2.5"]),
    (dict(lr=0.0), ["lr=0.0"]),
    (dict(warmup=1.5), ["warmup=1.5"]),
    (dict(kl_anneal=-0.1), ["kl_anneal=-0.1"]),
])
def test_train_bad_values(kwargs, needles):
    with pytest.raises(ValueError) as info:
        TrainConfig(**kwargs)
    for needle in needles:
        assert needle in str(info.value)


def test_non_number_is_type_error():
    with pytest.raises(TypeError, match="lr must be a number"):
        TrainConfig(lr="big")


@pytest.mark.parametrize("cls", [ScalaBLConfig, TrainConfig])
def test_from_dict_unknown_key(cls):
    with pytest.raises(ValueError) as info:
        cls.from_dict({"rank": 4})
    msg = str(info.value)
    assert "'rank'" in msg and cls.__name__ in msg
    # the allowed keys are listed
    assert "'steps'" in msg if cls is TrainConfig else "'r'" in msg


def test_configs_are_frozen():
    cfg = ScalaBLConfig()
    with pytest.raises(Exception):
        cfg.r = 2  # type: ignore[misc]


@pytest.mark.parametrize("epochs, n, batch, steps", [(1, 100, 8, 13), (2, 100, 8, 25), (0.5, 100, 8, 7), (4, 500, 8, 250),
                                                    (31, 640, 4, 4960), (0.001, 10, 8, 1), (3, 16, 16, 3)])
def test_epoch_budgets_give_the_right_step_counts(epochs, n, batch, steps):
    from scalabl_pyro.config import TrainConfig

    tc = TrainConfig.from_epochs(epochs, n, batch_size=batch, lr=2e-3)
    assert tc.steps == steps and tc.batch_size == batch and tc.lr == 2e-3
    assert tc.epochs(n) >= epochs and (tc.steps - 1) * batch / n < epochs or tc.steps == 1


def test_epoch_budget_errors():
    from scalabl_pyro.config import TrainConfig

    with pytest.raises(ValueError, match="epochs=0 must be > 0"):
        TrainConfig.from_epochs(0, 100)
    with pytest.raises(ValueError, match="num_examples=0 must be a positive integer"):
        TrainConfig.from_epochs(1, 0)
    with pytest.raises(ValueError, match="pass one of steps= and epochs"):
        TrainConfig.from_epochs(1, 100, steps=5)
