"""Every benchmark method trains a few steps on the tiny model and gives finite metrics."""
import math

import pytest
import torch

from scalabl_pyro import ScalaBLConfig, TrainConfig, country_task, tiny_llama
from scalabl_pyro.harness.methods import METHODS, lora_parameter_count, train_method


@pytest.fixture(scope="module")
def data():
    return list(country_task("train").subset(16).examples), list(country_task("test").subset(6).examples)


@pytest.mark.parametrize("scoring", ["letter", "choice"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_predicts(method, scoring, data):
    train, test = data
    t = train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"),
                     config=ScalaBLConfig(r=4, scoring=scoring), train_config=TrainConfig(steps=3, batch_size=4),
                     num_samples=4, ensemble_size=2, progress=False)
    pred = t.predict(test)
    S = {"mle": 1, "map": 1, "ensemble": 2, "temperature": 1, "scalabl_temperature": 1}.get(method, 4)
    assert pred.sample_probs.shape == (S, 6, 4)
    torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(S, 6))
    m = pred.metrics()
    assert all(math.isfinite(m[k]) for k in ("acc", "ece", "nll", "brier"))
    assert all(math.isfinite(x) for x in t.losses)
    lp = lora_parameter_count(t.models[0].net)
    assert t.lora_params == lp
    n_sites = 5  # q_proj, v_proj in 2 layers + lm_head
    expected_extra = {"scalabl": 2 * 4 * n_sites, "mle": 0, "map": 0, "mcdropout": 0, "ensemble": lp,
                      "temperature": 1}
    if method in expected_extra:
        assert t.extra_params == expected_extra[method]
    if method == "blob":  # mean replaces A, std is extra: r*in per module
        a_params = sum(s.s0.numel() for s in t.models[0].net.subspace.sites.values())
        assert t.extra_params == a_params
    point = t.predict_point(test)  # the posterior median alone: for the methods with an autoguide
    assert (point is None) == (method in ("mle", "map", "mcdropout", "ensemble", "temperature"))
    if point is not None:
        assert point.sample_probs.shape == (1, 6, 4)
        if method in ("scalabl", "laplace"):  # the autoguide's median, checked against the net at those values
            med = t.models[0].module_values(t.guide.median())
            with torch.no_grad():
                want = t.models[0].net.logits(t.models[0].net.collate(test), s={k: v[None] for k, v in med.items()})
            torch.testing.assert_close(point.sample_probs[0], want[0].softmax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["scalabl", "blob"])
def test_named_prior_s0_centres_the_prior_at_the_start(method, data):
    train, _ = data
    t = train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"), config=ScalaBLConfig(r=4),
                     train_config=TrainConfig(steps=1, batch_size=4), prior="s0", progress=False)
    model = t.models[0]
    for site, info in model.net.subspace.sites.items():
        d = model.prior(site, info.layer, info.event_shape)
        torch.testing.assert_close(d.base_dist.loc, info.s0)
        torch.testing.assert_close(d.base_dist.scale, torch.ones_like(info.s0))
        assert d.event_shape == info.s0.shape
    with pytest.raises(ValueError, match="allowed are 's0'"):
        train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"), prior="flat", progress=False)


@pytest.mark.parametrize("name, loc_is_s0, scale", [("s0:0.3", True, 0.3), ("normal:2", False, 2.0),
                                                     ("normal", False, 1.0)])
def test_named_prior_with_a_scale(name, loc_is_s0, scale, make_net):
    from scalabl_pyro.harness.methods import describe_prior, parse_prior, resolve_prior

    net = make_net("letter")
    prior = resolve_prior(name, net)
    for site, info in net.subspace.sites.items():
        d = prior[site] if isinstance(prior, dict) else prior(site, info.layer)  # centered_prior: a dict by site
        d = d.base_dist if hasattr(d, "base_dist") else d
        loc = torch.broadcast_to(torch.as_tensor(d.loc, dtype=torch.float32), info.s0.shape)
        torch.testing.assert_close(loc, info.s0 if loc_is_s0 else torch.zeros_like(info.s0))
        torch.testing.assert_close(torch.broadcast_to(torch.as_tensor(d.scale, dtype=torch.float32), info.s0.shape),
                                   torch.full_like(info.s0, scale))
    assert parse_prior(name)[1] == scale and describe_prior(name).endswith(f", {scale:g})")
    for bad in ("s0:0", "s0:-1", "s0:x", "s0:nan", "flat:1"):
        with pytest.raises(ValueError, match="':<scale>'"):
            parse_prior(bad)


def test_unknown_method():
    with pytest.raises(ValueError, match="choose one of"):
        train_method("bayes-by-magic", tiny_llama, [], label_words=("A", "B"))


def test_laplace_covariance_is_positive_definite(data):
    train, test = data
    t = train_method("laplace", tiny_llama, train, label_words=("A", "B", "C", "D"),
                     config=ScalaBLConfig(r=4, scoring="choice"), train_config=TrainConfig(steps=3, batch_size=4),
                     progress=False)
    tril = t.guide.scale[:, None] * t.guide.scale_tril
    cov = tril @ tril.T
    assert torch.linalg.eigvalsh(cov).min() > 0
    # Prior precision alone would give variance 1 (Normal(0, 1)); data can only shrink it.
    assert (cov.diagonal() <= 1.0 + 1e-4).all()


def test_temperature_method_fits_T_on_held_out_training_data(monkeypatch):
    import scalabl_pyro.harness.methods as methods
    from conftest import LABEL_WORDS, synthetic_examples
    from scalabl_pyro.baselines.temperature import fit_temperature
    from scalabl_pyro.config import ScalaBLConfig, TrainConfig
    from scalabl_pyro.predictive import predict

    exs = synthetic_examples(20)
    seen = {}
    original = methods.fit

    def spy(model, guide, examples, **kw):
        seen["fit_ids"] = [ex.id for ex in examples]
        return original(model, guide, examples, **kw)

    monkeypatch.setattr(methods, "fit", spy)
    tc = TrainConfig(steps=4, batch_size=4, lr=5e-2, seed=3)
    t = methods.train_method("temperature", tiny_llama, exs, label_words=LABEL_WORDS,
                             config=ScalaBLConfig(r=4, scoring="letter"), train_config=tc, progress=False)
    fit_part, val_part = methods.validation_split(exs, fraction=0.1, seed=3)
    assert seen["fit_ids"] == [ex.id for ex in fit_part] and len(val_part) == 2  # never trained on val
    assert not set(seen["fit_ids"]) & {ex.id for ex in val_part}
    val = predict(t.models[0], None, val_part)
    assert t.temperature == fit_temperature(val.mean_probs, val.labels)
    pred, raw = t.predict(exs[:6]), predict(t.models[0], None, exs[:6])
    assert pred.temperature == t.temperature and torch.equal(pred.mean_probs.argmax(-1), raw.mean_probs.argmax(-1))


def test_scalabl_temperature_tempers_the_model_average_with_T_from_held_out_training_data(monkeypatch):
    import scalabl_pyro.harness.methods as methods
    from conftest import LABEL_WORDS, synthetic_examples
    from scalabl_pyro.baselines.temperature import apply_temperature, fit_temperature
    from scalabl_pyro.config import ScalaBLConfig, TrainConfig

    exs = synthetic_examples(20)
    seen = {"predict": []}
    fit0, predict0 = methods.fit, methods.predict

    def fit_spy(model, guide, examples, **kw):
        seen["fit_ids"] = [ex.id for ex in examples]
        return fit0(model, guide, examples, **kw)

    def predict_spy(model, guide, examples, **kw):
        out = predict0(model, guide, examples, **kw)
        seen["predict"].append(([ex.id for ex in examples], kw.get("num_samples"), out))
        return out

    monkeypatch.setattr(methods, "fit", fit_spy)
    monkeypatch.setattr(methods, "predict", predict_spy)
    tc = TrainConfig(steps=4, batch_size=4, lr=5e-2, guide_lr=0.05, seed=3)
    t = methods.train_method("scalabl_temperature", tiny_llama, exs, label_words=LABEL_WORDS, num_samples=3,
                             config=ScalaBLConfig(r=4, scoring="letter"), train_config=tc, progress=False)
    fit_part, val_part = methods.validation_split(exs, fraction=0.1, seed=3)  # temperature's split
    assert seen["fit_ids"] == [ex.id for ex in fit_part] and t.models[0].num_data == len(fit_part) == 18
    (ids, S, val), = seen["predict"]  # one held-out prediction, with the posterior samples
    assert ids == [ex.id for ex in val_part] and S == 3 and val.sample_probs.shape[0] == 3
    assert t.temperature == fit_temperature(val.mean_probs, val.labels)
    pred = t.predict(exs[:6])  # the model average of 3 samples, tempered: one "sample"
    assert pred.temperature == t.temperature and pred.sample_probs.shape == (1, 6, 3)
    raw = seen["predict"][-1][2]
    torch.testing.assert_close(pred.mean_probs, apply_temperature(raw.mean_probs, t.temperature))
    assert t.extra_params == 2 * 4 * 5 + 1  # loc and scale of r per module, and T
    assert t.history["posterior"] and t.predict_point(exs[:2]).sample_probs.shape == (1, 2, 3)
    assert list(t.history["adapters"]) == list(t.models[0].net.subspace.sites)  # B, V and update sizes per module


def test_validation_split_errors():
    from scalabl_pyro.harness.methods import validation_split

    with pytest.raises(ValueError, match="fraction=1.5 must be between 0 and 1"):
        validation_split(list(range(10)), fraction=1.5)
    with pytest.raises(ValueError, match="1 training examples cannot be split"):
        validation_split([0], fraction=0.1)
    a, b = validation_split(list(range(10)), fraction=0.3, seed=1)
    assert len(a) == 7 and len(b) == 3 and sorted(a + b) == list(range(10))


@pytest.mark.parametrize("method", ["mle", "temperature", "scalabl", "laplace"])
def test_make_callback_gets_the_trained_model_and_guide(method, data):
    from scalabl_pyro.convergence import HeldoutCurve

    train, test = data
    seen = {}

    def make_callback(model, guide):
        seen["model"], seen["guide"] = model, guide
        seen["curve"] = HeldoutCurve(model, guide, test, every=2, num_data=len(train), batch_size=4, num_samples=2)
        return seen["curve"]

    t = train_method(method, tiny_llama, train, label_words=("A", "B", "C", "D"), config=ScalaBLConfig(r=4),
                     train_config=TrainConfig(steps=4, batch_size=4), num_samples=2, progress=False,
                     make_callback=make_callback)
    assert seen["model"] is t.models[0]
    assert (seen["guide"] is None) == (method in ("mle", "temperature"))
    assert [r["step"] for r in seen["curve"].records] == [2, 4]
    if method == "scalabl":
        assert seen["guide"] is t.guide
        assert len(t.history["kl"]) == len(t.history["scale"]) == len(t.history["monitor_steps"]) > 0


@pytest.mark.parametrize("method", ["ensemble", "scalabl_bayesadapt"])
def test_make_callback_refused_where_it_cannot_apply(method, data):
    with pytest.raises(ValueError, match=f"make_callback is not supported for '{method}'"):
        train_method(method, tiny_llama, data[0], label_words=("A", "B", "C", "D"), progress=False,
                     make_callback=lambda m, g: None)


def test_predict_point_is_none_for_a_guide_without_median(data):
    train, test = data
    t = train_method("scalabl", tiny_llama, train, label_words=("A", "B", "C", "D"), guide="iaf",
                     config=ScalaBLConfig(r=4), train_config=TrainConfig(steps=2, batch_size=4), num_samples=2,
                     progress=False)
    assert t.predict_point(test) is None and t.predict(test).sample_probs.shape == (2, 6, 4)
