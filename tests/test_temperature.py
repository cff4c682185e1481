"""Temperature scaling (scalabl_pyro.baselines): fitted T, optimality, masks, errors, predict() and calibrate()."""
from __future__ import annotations

import math

import pyro
import pytest
import torch

from conftest import make_example, randomize_lora, synthetic_examples
from scalabl_pyro import apply_temperature, calibrate, fit_temperature
from scalabl_pyro.baselines import TemperatureScaled
from scalabl_pyro.metrics import classification_metrics
from scalabl_pyro.predictive import Prediction, predict


def toy(n: int, c: int = 5, *, factor: float = 3.0, seed: int = 0, scale: float = 1.5):
    """Labels drawn from softmax(z); the predictor reports softmax(factor * z): over-confident for factor > 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return (factor * z).softmax(1), y, factor * z


def nll(probs, labels) -> float:
    """Mean NLL by hand (no clamping): the quantity temperature scaling minimizes."""
    return float(-probs.double()[torch.arange(len(labels)), labels].log().mean())


def grid_nll(logp, labels, temps):
    """NLL of softmax(logp / T) for every T in ``temps`` (G,), by brute force: (G,)."""
    x = torch.where(torch.isfinite(logp), logp, -math.inf)
    out = torch.log_softmax(x[None] / temps[:, None, None], -1)  # (G, N, C)
    return -out[:, torch.arange(len(labels)), labels].mean(1)


# ----------------------------------------------------------------------------- (a) (b) (d) the fitted T
def test_overconfident_predictor_recovers_the_generating_factor():
    val_p, val_y, _ = toy(20000, seed=0)
    test_p, test_y, _ = toy(20000, seed=1)
    T = fit_temperature(val_p, val_y)
    assert abs(T - 3.0) / 3.0 < 0.05, T  # the predictor's logits were multiplied by 3
    cal = apply_temperature(test_p, T)
    before, after = classification_metrics(test_p, test_y), classification_metrics(cal, test_y)
    assert after["nll"] < before["nll"] - 0.3  # 1.65 -> 1.09 nats on held-out data
    assert after["ece"] < before["ece"] / 3
    # (b) the argmax of every row, hence the accuracy, is unchanged exactly
    assert torch.equal(cal.argmax(1), test_p.argmax(1))
    assert after["acc"] == before["acc"]


def test_underconfident_predictor_gets_t_below_one():
    p, y, _ = toy(20000, factor=0.5, seed=2)
    T = fit_temperature(p, y)
    assert T < 1 and abs(T - 0.5) / 0.5 < 0.05, T
    assert nll(apply_temperature(p, T), y) < nll(p, y)


def test_calibrated_predictor_keeps_t_near_one():
    p, y, _ = toy(20000, factor=1.0, seed=3)
    assert abs(fit_temperature(p, y) - 1.0) < 0.05


def test_logits_and_probabilities_give_the_same_t():
    p, y, logits = toy(3000, seed=4)
    shifted = logits + torch.randn(3000, 1, dtype=torch.float64)  # a per-row shift changes no softmax
    T_p, T_z = fit_temperature(p, y), fit_temperature(shifted.float(), y, from_probs=False)
    assert T_z == pytest.approx(T_p, rel=1e-6)
    assert fit_temperature(p.float(), y) == pytest.approx(T_p, rel=1e-5)  # float32 input works too


# ----------------------------------------------------------------------------- (c) against a brute-force grid
@pytest.mark.parametrize("factor, seed", [(2.0, 5), (0.7, 6), (4.0, 7)])
def test_fitted_t_is_the_grid_minimizer(factor, seed):
    p, y, _ = toy(400, c=4, factor=factor, seed=seed)
    g = torch.Generator().manual_seed(seed)
    p = (p.log() + 0.8 * torch.randn(p.shape, generator=g, dtype=torch.float64)).softmax(1)  # off-model noise
    temps = torch.logspace(math.log10(0.05), math.log10(20.0), 4001, dtype=torch.float64)
    step = math.log(temps[1] / temps[0])  # grid spacing in log T
    curve = grid_nll(p.log(), y, temps)
    T_grid = float(temps[curve.argmin()])
    assert 0.06 < T_grid < 19  # an interior minimum (otherwise the test would only check the bounds)
    T = fit_temperature(p, y)
    assert abs(math.log(T) - math.log(T_grid)) <= step
    # the fit is at least as good as the best grid point (it is the exact minimizer)
    assert float(grid_nll(p.log(), y, torch.tensor([T], dtype=torch.float64))[0]) <= float(curve.min()) + 1e-12


def test_minimum_at_a_bound_returns_the_bound():
    p, y, _ = toy(2000, factor=0.01, seed=8)  # nearly uniform: wants T ~ 0.01, below the bounds
    assert fit_temperature(p, y) == 0.05
    assert fit_temperature(p, y, bounds=(0.001, 20.0)) == pytest.approx(0.01, rel=0.1)
    # every row right with a margin: the NLL keeps falling as T -> 0, so the lower bound
    right = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    assert fit_temperature(right, torch.tensor([0, 1]), bounds=(0.5, 2.0)) == 0.5
    p, y, _ = toy(2000, factor=100.0, seed=8)  # wants T ~ 100
    assert fit_temperature(p, y) == 20.0


def test_t_cannot_matter_gives_one():
    uniform = torch.full((6, 3), 1 / 3)
    assert fit_temperature(uniform, torch.tensor([0, 1, 2, 0, 1, 2])) == 1.0
    assert fit_temperature(uniform, torch.zeros(6, dtype=torch.long), bounds=(2.0, 5.0)) == 2.0


def test_deterministic():
    p, y, _ = toy(5000, seed=9)
    assert fit_temperature(p, y) == fit_temperature(p.clone(), y.clone())


# ----------------------------------------------------------------------------- (e) masked classes
def test_masked_classes_stay_zero_and_nothing_is_nan():
    p, y, _ = toy(3000, c=4, seed=10)
    p = p.clone()
    p[::3, 3] = 0.0  # absent choices: a third of the questions have 3 choices
    p[1::5, 2] = 0.0
    p[2::7, 1:] = 0.0  # a single possible class
    y = torch.where(p[torch.arange(len(y)), y] > 0, y, p.argmax(1))  # the true class is never masked
    p = p / p.sum(1, keepdim=True)
    T = fit_temperature(p, y)
    assert math.isfinite(T) and abs(T - 3.0) < 0.5
    for q in (apply_temperature(p, T), apply_temperature(p, 0.3), apply_temperature(p.float(), 7.0)):
        assert not torch.isnan(q).any()
        assert torch.equal(q == 0, p == 0)  # zeros stay exactly 0 and no other entry becomes 0 here
        torch.testing.assert_close(q.double().sum(1), torch.ones(len(p), dtype=torch.float64))
    assert torch.equal(apply_temperature(p, T)[2::7], p[2::7])  # one-hot rows stay one-hot
    # the same with logits: -inf marks a masked class
    logits = torch.where(p > 0, p.log(), -math.inf)
    assert fit_temperature(logits, y, from_probs=False) == pytest.approx(T, rel=1e-9)
    # and brute force agrees with the fit on masked data
    temps = torch.logspace(math.log10(1.0), math.log10(9.0), 2001, dtype=torch.float64)
    T_grid = float(temps[grid_nll(logits, y, temps).argmin()])
    assert abs(math.log(T / T_grid)) <= math.log(temps[1] / temps[0])


def test_rows_whose_true_class_is_masked_are_left_out():
    p, y, _ = toy(2000, c=3, seed=11)
    p = p.clone()
    p[:50, 0] = 0.0
    p = p / p.sum(1, keepdim=True)
    y = y.clone()
    y[:50] = 0  # true class has probability 0: NLL inf at every T, no temperature changes it
    keep = torch.arange(2000) >= 50
    assert fit_temperature(p, y) == fit_temperature(p[keep], y[keep])
    with pytest.raises(ValueError, match="probability 0.*from_probs=False"):
        fit_temperature(p[:50], y[:50])


def test_apply_on_per_sample_probabilities():
    p, _, _ = toy(60, c=4, seed=12)
    S = torch.stack([p, p.roll(1, 0), (2 * p.log()).softmax(1)]).float()  # (S, N, C)
    S[:, ::4, 0] = 0
    S = S / S.sum(-1, keepdim=True)
    out = apply_temperature(S, 1.7)
    assert out.shape == S.shape and out.dtype == torch.float32
    for s in range(3):  # a row-wise map: each sample tempered separately
        torch.testing.assert_close(out[s], apply_temperature(S[s], 1.7))
    assert torch.equal(out == 0, S == 0) and not torch.isnan(out).any()
    assert torch.equal(out.argmax(-1), S.argmax(-1))
    torch.testing.assert_close(apply_temperature(S, 1.0), S)
    torch.testing.assert_close(apply_temperature(torch.tensor([[0.9, 0.1, 0.0]]), 2.0),
                               torch.tensor([[0.75, 0.25, 0.0]]))


# ----------------------------------------------------------------------------- (f) errors
@pytest.mark.parametrize("probs, labels, kwargs, match", [
    (torch.full((4, 3), 1 / 3), torch.zeros(3, dtype=torch.long), {}, r"labels shape \(3,\).*expected \(4,\)"),
    (torch.full((2, 4, 3), 1 / 3), torch.zeros(4, dtype=torch.long), {}, r"2-D \(N, C\).*mean_probs"),
    (torch.full((0, 3), 1 / 3), torch.zeros(0, dtype=torch.long), {}, "empty input"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0, 3]), {}, r"label value 3 out of range.*\[0, 3\)"),
    (torch.full((2, 3), 1 / 3), torch.tensor([-1, 0]), {}, "label value -1 out of range"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0.0, 1.0]), {}, "integer class indices"),
    (torch.tensor([[0.5, float("nan"), 0.5]]), torch.tensor([0]), {}, "NaN or inf"),
    (torch.tensor([[0.5, float("inf"), 0.5]]), torch.tensor([0]), {}, "NaN or inf"),
    (torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0]), {}, "negative entries"),
    (torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([0]), {}, "not logits.*from_probs=False"),
    (torch.tensor([[2.0, float("nan")]]), torch.tensor([0]), {"from_probs": False}, "NaN or \\+inf"),
    (torch.tensor([[2.0, float("inf")]]), torch.tensor([0]), {"from_probs": False}, "NaN or \\+inf"),
    (torch.tensor([[-math.inf, -math.inf]]), torch.tensor([0]), {"from_probs": False}, "-inf for every class"),
    (torch.tensor([[1, 0]]), torch.tensor([0]), {}, "float tensor"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), {"bounds": (2.0, 1.0)}, "0 < lo < hi"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), {"bounds": (0.0, 1.0)}, "0 < lo < hi"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), {"bounds": 3.0}, "pair"),
    (torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), {"max_iter": 0}, "max_iter"),
])
def test_fit_errors(probs, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_temperature(probs, labels, **kwargs)


@pytest.mark.parametrize("T, exc, match", [
    (0.0, ValueError, "> 0"), (-1.0, ValueError, "> 0"), (math.nan, ValueError, "finite"),
    (math.inf, ValueError, "finite"), ("2", TypeError, "positive number"), (True, TypeError, "positive number"),
])
def test_apply_bad_temperature(T, exc, match):
    with pytest.raises(exc, match=match):
        apply_temperature(torch.tensor([[0.5, 0.5]]), T)


def test_apply_bad_probabilities():
    with pytest.raises(ValueError, match="not logits"):
        apply_temperature(torch.tensor([[3.0, -1.0, 2.0]]).abs(), 2.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        apply_temperature(torch.tensor([[float("nan"), 1.0]]), 2.0)
    with pytest.raises(ValueError, match="empty input"):
        apply_temperature(torch.zeros(0, 3), 2.0)
    with pytest.raises(ValueError, match="C >= 2"):
        apply_temperature(torch.ones(4, 1), 2.0)


# ------------------------------------------------------------- (g) a tempered prediction of the tiny model
def _guide(model):
    """A wide AutoNormal at s0 (so that its samples differ), its parameters created."""
    from scalabl_pyro.guides import make_guide

    randomize_lora(model.net)
    guide = make_guide("normal", model, init_scale=0.5)
    batch = model.net.collate(synthetic_examples(2))
    guide(batch, batch["labels"])
    return guide


def test_tempered_prediction_equals_apply_temperature(make_model):
    model = make_model("letter")
    guide = _guide(model)
    exs = [make_example(100, 1, ("yes", "no")), *synthetic_examples(6)]  # the first has a masked third class
    pyro.set_rng_seed(3)
    base = predict(model, guide, exs, num_samples=5, batch_size=4)
    assert float(base.mutual_information.mean()) > 0  # the samples differ, so S matters
    hot = TemperatureScaled.from_prediction(base, 2.5)
    assert isinstance(hot, TemperatureScaled) and isinstance(hot, Prediction) and hot.temperature == 2.5
    assert hot.sample_probs.shape == (1, 7, 3)
    want = apply_temperature(base.mean_probs, 2.5)  # the tempered model average, as one sample
    assert torch.equal(hot.sample_probs[0], want) and torch.equal(hot.mean_probs, want)
    assert not torch.equal(want, base.mean_probs)
    assert hot.sample_probs[0, 0, 2] == 0 and not torch.isnan(hot.sample_probs).any()
    assert hot.ids == base.ids and torch.equal(hot.labels, base.labels)
    assert torch.all(hot.mutual_information == 0)
    m, m0 = hot.metrics(), base.metrics()
    assert set(m) == set(m0) and m["num_samples"] == 1 and m["mean_mi"] == 0 and m["acc"] == m0["acc"]
    assert m["nll"] == pytest.approx(nll(want, base.labels), rel=1e-5)


def test_tempered_prediction_of_a_model_without_latent_sites(make_model):
    model = make_model("choice", bayes=False)
    randomize_lora(model.net)
    base = predict(model, None, synthetic_examples(5))
    hot = TemperatureScaled.from_prediction(base, 0.5)  # S = 1: tempering the average = tempering the sample
    torch.testing.assert_close(hot.sample_probs, apply_temperature(base.sample_probs, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("T", [0, -2.0, math.nan])
def test_bad_temperature(T):
    pred = Prediction(torch.tensor([[[0.7, 0.3]]]), torch.tensor([0]), ["q0"])
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled.from_prediction(pred, T)


# ----------------------------------------------------------------------------- (h) calibrate
def _prediction(n: int, seed: int, S: int = 4) -> Prediction:
    """An over-confident 'ensemble' of S members: per-sample probabilities (S, N, C) and labels."""
    _, y, logits = toy(n, c=4, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    sample = (logits[None] + 0.5 * torch.randn((S,) + logits.shape, generator=g, dtype=torch.float64)).softmax(-1)
    return Prediction(sample.float(), y, [f"q{i}" for i in range(n)])


def test_calibrate_composes_with_any_prediction():
    val, test = _prediction(3000, seed=20), _prediction(2000, seed=21)
    cal = calibrate(val, test)
    T = fit_temperature(val.mean_probs, val.labels)
    assert isinstance(cal, Prediction) and cal.temperature == T and T > 1.5
    want = apply_temperature(test.mean_probs, T)
    hand = float(-want.double()[torch.arange(2000), test.labels].log().mean())
    m, m0 = cal.metrics(), test.metrics()
    assert m["nll"] == pytest.approx(hand, rel=1e-6)
    assert m["nll"] < m0["nll"] and m["ece"] < m0["ece"]
    assert set(m) == set(m0) and m["acc"] == m0["acc"] and m["num_samples"] == 1 and m["mean_mi"] == 0
    assert cal.ids == test.ids and torch.equal(cal.labels, test.labels)
    assert torch.equal(cal.sample_probs[0], want)
    # calibrating against itself on the validation split is the in-sample optimum
    assert calibrate(val, val).metrics()["nll"] <= val.metrics()["nll"]


def test_calibrate_a_trained_ensemble(make_model):
    """Composes with methods.Trained.predict (an ensemble of two tiny LoRA members: S = 2)."""
    from scalabl_pyro.harness.methods import Trained
    from scalabl_pyro.model import LoRAModel

    members = []
    for k in range(2):
        m = make_model("letter", bayes=False)
        randomize_lora(m.net, scale=1.5, seed=k + 1)
        members.append(LoRAModel(m.net, name=f"lora{k}"))
    trained = Trained("ensemble", members)
    exs = synthetic_examples(12)
    val, test = trained.predict(exs[:8]), trained.predict(exs[8:])
    assert val.sample_probs.shape == (2, 8, 3)
    cal = calibrate(val, test)
    T = fit_temperature(val.mean_probs, val.labels)
    assert cal.temperature == T
    torch.testing.assert_close(cal.mean_probs, apply_temperature(test.mean_probs, T), rtol=0, atol=0)
    assert cal.metrics()["acc"] == test.metrics()["acc"]


def test_calibrate_errors():
    val = _prediction(50, seed=22)
    other = Prediction(torch.full((1, 5, 3), 1 / 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="C=4 classes but test predictions C=3"):
        calibrate(val, other)
    with pytest.raises(TypeError, match="Prediction"):
        calibrate(val.mean_probs, val)
