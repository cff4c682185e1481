"""Bad input, written down: every row of :data:`CASES` is one kind of bad input a user can give, what it raises,
and a pattern the message must match (it names the problem and the fix). Each runs on the tiny model.

Where the bad input would write something (a run, a checkpoint), the test also checks that nothing is left
half-written. The README's "Bad input" table lists the same cases.
"""
from __future__ import annotations

import json
import os

import pyro
import pyro.distributions as dist
import pytest
import torch

from conftest import LABEL_WORDS, make_example, synthetic_examples
from scalabl_pyro import (AdaptedLM, CheckpointMismatchError, LoRAModel, ParamStoreConflictError, RunExistsError,
                          ScalaBL, ScalaBLConfig, TrainConfig, default_guide, fit, load_run, load_task, make_guide,
                          save_run, tiny_llama)
from scalabl_pyro.backbones import load_backbone, resolve_device
from scalabl_pyro.harness.data import DataFormatError, UnknownDatasetError


def _net(**cfg):
    lm, tok = tiny_llama()
    return AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=ScalaBLConfig(r=4, **cfg))


def _trained_run(tmp_path, **cfg):
    model = ScalaBL(_net(**cfg), num_data=8)
    guide = default_guide(model)
    fit(model, guide, synthetic_examples(8), config=TrainConfig(steps=1, batch_size=4), progress=False)
    return save_run(tmp_path / "run", model, guide, backbone="tiny")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# -------------------------------------------------------------------------------------------------- cases
def unknown_backbone(tmp_path):
    load_backbone("not-a-model")  # offline here: one short probe of the hub, then the error


def unknown_dataset(tmp_path):
    load_task("openbookqq", "train")


def no_target_module(tmp_path):
    lm, tok = tiny_llama()
    AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=ScalaBLConfig(r=4, target_modules=("c_attn",)))


def misspelt_target_module(tmp_path):
    lm, tok = tiny_llama()
    AdaptedLM(lm, tok, label_words=LABEL_WORDS, config=ScalaBLConfig(r=4, target_modules=("q_proj", "v_prj")))


def bad_config_value(tmp_path):
    ScalaBLConfig(scoring="letters")


def normalize_with_letters(tmp_path):
    ScalaBLConfig(scoring="letter", normalize="tokens")


def bad_train_config(tmp_path):
    TrainConfig(steps=0)


def malformed_jsonl(tmp_path):
    p = _write(tmp_path, "bad.jsonl", '{"question": "q", "choices": ["a", "b"], "label": 0}\n{"question": "q2",\n')
    load_task(str(p), "train")


def empty_jsonl(tmp_path):
    load_task(str(_write(tmp_path, "empty.jsonl", "\n")), "train")


def label_out_of_range(tmp_path):
    p = _write(tmp_path, "lab.jsonl", '{"question": "q", "choices": ["a", "b", "c"], "label": 5}\n')
    load_task(str(p), "train")


def missing_field(tmp_path):
    load_task(str(_write(tmp_path, "nofield.jsonl", '{"question": "q", "label": 0}\n')), "train")


def unknown_file_type(tmp_path):
    load_task(str(_write(tmp_path, "data.txt", "question,choices\n")), "train")


def choice_tokenizes_to_nothing(tmp_path):
    net = _net(scoring="choice")
    ex = make_example(0, 0, ("ox", "cat", "horse"))
    net.collate([type(ex)(**{**ex.__dict__, "continuations": ("", " cat", " horse")})])


def multi_token_answer_word(tmp_path):
    lm, tok = tiny_llama()
    AdaptedLM(lm, tok, label_words=("yes", "no"), config=ScalaBLConfig(r=4, scoring="letter"))


def too_many_choices(tmp_path):
    net = _net()
    net.collate([make_example(0, 0, ("a", "b", "c")), type(make_example(1, 0, "abc"))(
        id="q9", label=0, choices=("a", "b", "c", "d"), prompt="p", context="c", continuations=(" a",) * 4)])


def labels_of_wrong_shape(tmp_path):
    model = ScalaBL(_net(), num_data=8)
    batch = model.net.collate(synthetic_examples(4))
    with pyro.poutine.trace():
        model(batch, batch["labels"][:2])


def no_training_examples(tmp_path):
    fit(ScalaBL(_net(), num_data=8), None, [], progress=False)


def nan_loss(tmp_path):
    model = ScalaBL(_net(), prior=dist.Normal(float("inf"), 1.0), num_data=8)  # a prior at infinity
    fit(model, default_guide(model), synthetic_examples(8), config=TrainConfig(steps=2, batch_size=4), progress=False)


def bad_prior_type(tmp_path):
    ScalaBL(_net(), prior=0.5)


def prior_for_unknown_site(tmp_path):
    ScalaBL(_net(), prior={"model.layers.0.self_attn.q_proj.s": dist.Normal(0.0, 1.0)})  # the pre-0.2 name


def prior_of_wrong_shape(tmp_path):
    model = ScalaBL(_net(), prior=dist.Normal(torch.zeros(3), 1.0), num_data=8)
    batch = model.net.collate(synthetic_examples(2))
    with pyro.poutine.trace():
        model(batch, batch["labels"])


def unknown_guide(tmp_path):
    make_guide("flow", ScalaBL(_net()))


def stale_guide_parameters(tmp_path):
    first = ScalaBL(_net(), num_data=8)
    fit(first, default_guide(first), synthetic_examples(8), config=TrainConfig(steps=1, batch_size=4), progress=False)
    second = ScalaBL(_net(), num_data=8)  # a notebook cell run twice, without pyro.clear_param_store()
    fit(second, default_guide(second), synthetic_examples(8), config=TrainConfig(steps=1), progress=False)


def bad_device(tmp_path):
    resolve_device("gpu0")


def existing_run_directory(tmp_path):
    path = _trained_run(tmp_path)
    save_run(path, *load_run(path, backbone=tiny_llama())[:2], backbone="tiny")


def not_a_run_directory(tmp_path):
    load_run(tmp_path, backbone=tiny_llama())


def wrong_adapter_on_load(tmp_path):
    path = _trained_run(tmp_path)
    run = json.loads((path / "run.json").read_text())
    run["config"]["r"] = 2  # the adapter on disk has rank 4
    (path / "run.json").write_text(json.dumps(run))
    load_run(path, backbone=tiny_llama())


def another_backbone_on_load(tmp_path):
    load_run(_trained_run(tmp_path), backbone=tiny_llama(hidden_size=48))


def run_from_another_version(tmp_path):
    path = _trained_run(tmp_path)
    run = json.loads((path / "run.json").read_text())
    run["format"] = 1
    (path / "run.json").write_text(json.dumps(run))
    load_run(path, backbone=tiny_llama())


def custom_prior_not_given_on_load(tmp_path):
    def my_prior(site, module):
        return dist.Normal(0.0, 2.0)

    model = ScalaBL(_net(), prior=my_prior, num_data=8)
    guide = default_guide(model)
    fit(model, guide, synthetic_examples(8), config=TrainConfig(steps=1, batch_size=4), progress=False)
    load_run(save_run(tmp_path / "run", model, guide, backbone="tiny"), backbone=tiny_llama())


def checkpoint_of_another_run(tmp_path):
    model = LoRAModel(AdaptedLM(*tiny_llama(), label_words=LABEL_WORDS, config=ScalaBLConfig(r=4), subspace=False))
    fit(model, None, synthetic_examples(8), config=TrainConfig(steps=2, batch_size=4), progress=False,
        checkpoint_dir=tmp_path / "ck", checkpoint_every=1)
    pyro.clear_param_store()
    model = LoRAModel(AdaptedLM(*tiny_llama(), label_words=LABEL_WORDS, config=ScalaBLConfig(r=4), subspace=False))
    fit(model, None, synthetic_examples(8), config=TrainConfig(steps=2, batch_size=4, lr=5e-3), progress=False,
        checkpoint_dir=tmp_path / "ck")


def bad_checkpoint_interval(tmp_path):
    fit(ScalaBL(_net(), num_data=8), None, synthetic_examples(8), progress=False, checkpoint_dir=tmp_path / "ck",
        checkpoint_every=0)


#: (kind of bad input, the case, exception type, pattern of the message: the problem and the fix)
CASES = [
    ("unknown backbone name", unknown_backbone, OSError, r"'not-a-model'.*Allowed: 'smollm2'"),
    ("unknown data set name", unknown_dataset, UnknownDatasetError, r"openbookqq.*openbookqa"),
    ("no target module in the model", no_target_module, ValueError, r"'c_attn'.*linear layers are named.*'q_proj'"),
    ("misspelt target module", misspelt_target_module, ValueError, r"no module named 'v_prj'.*'v_proj'"),
    ("unknown config value", bad_config_value, ValueError, r"scoring='letters'.*allowed values: 'letter', 'choice'"),
    ("normalize with letter scoring", normalize_with_letters, ValueError, r"normalize='tokens' only applies to scoring='choice'"),
    ("non-positive step count", bad_train_config, ValueError, r"steps=0 must be a positive integer"),
    ("malformed JSONL", malformed_jsonl, DataFormatError, r"bad.jsonl line 2"),
    ("empty JSONL", empty_jsonl, DataFormatError, r"empty.jsonl.*(no rows|empty)"),
    ("label out of range", label_out_of_range, DataFormatError, r"lab.jsonl line 1: field 'label' is 5.*allowed 0..2"),
    ("missing field", missing_field, DataFormatError, r"nofield.jsonl line 1.*'choices'"),
    ("unknown file type", unknown_file_type, (DataFormatError, ValueError), r"data.txt.*\.jsonl.*\.csv"),
    ("a choice that tokenizes to nothing", choice_tokenizes_to_nothing, ValueError, r"choice 0.*tokenizes to nothing; fix or drop"),
    ("answer word of several tokens (letter format)", multi_token_answer_word, ValueError, r"'yes' is \d+ tokens.*scoring='choice'"),
    ("more choices than classes", too_many_choices, ValueError, r"q9.*has 4 choices; this task allows 1..3"),
    ("labels of the wrong shape", labels_of_wrong_shape, ValueError, r"labels must have shape \(4,\)"),
    ("no training examples", no_training_examples, ValueError, r"no training examples"),
    ("NaN loss", nan_loss, FloatingPointError, r"ELBO became (nan|inf) at step 0.*validate=True"),
    ("prior of an unknown type", bad_prior_type, TypeError, r"prior must be a Distribution, a dict.*or a callable"),
    ("prior for an unknown site", prior_for_unknown_site, KeyError, r"unknown sites.*'lora\.model\.layers\.0"),
    ("prior of the wrong shape", prior_of_wrong_shape, ValueError, r"batch_shape \(3,\).*use a scalar distribution"),
    ("unknown guide name", unknown_guide, ValueError, r"unknown guide 'flow'; choose one of"),
    ("a new guide over another guide's parameters", stale_guide_parameters, ParamStoreConflictError, r"pyro.clear_param_store\(\)"),
    ("unknown device", bad_device, ValueError, r"device='gpu0' is not a device.*'cpu', 'cuda'"),
    ("existing run directory", existing_run_directory, RunExistsError, r"already holds a run; pass overwrite=True"),
    ("not a run directory", not_a_run_directory, FileNotFoundError, r"no run.json.*save_run"),
    ("wrong adapter on load", wrong_adapter_on_load, ValueError, r"LoRA adapters do not match.*saved \(4, 32\) vs model \(2, 32\)"),
    ("another backbone on load", another_backbone_on_load, ValueError, r"do not match the saved run.*another config, backbone"),
    ("a run from another version", run_from_another_version, ValueError, r"format 1 is not supported.*train and save the run again"),
    ("custom prior not given on load", custom_prior_not_given_on_load, ValueError, r"custom prior callable.*my_prior.*load_run\(path, prior="),
    ("checkpoint of another run", checkpoint_of_another_run, CheckpointMismatchError, r"config.lr"),
    ("checkpoint interval of 0", bad_checkpoint_interval, ValueError, r"checkpoint_every=0 must be a positive integer"),
]


@pytest.mark.parametrize("kind, case, exc, pattern", CASES, ids=[c[0].replace(" ", "-") for c in CASES])
def test_bad_input_gives_a_clear_error(tmp_path, kind, case, exc, pattern):
    before = set(os.listdir(tmp_path))
    with pytest.raises(exc, match=pattern) as info:
        case(tmp_path)
    assert not str(info.value).startswith("Traceback")
    hidden = [p for p in os.listdir(tmp_path) if p.startswith(".") and p not in before]
    assert hidden == []  # no temporary (half-written) file or folder left behind


def test_at_least_twenty_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


def test_interrupted_save_leaves_no_half_written_run(tmp_path, monkeypatch):
    import scalabl_pyro.io as io

    path = _trained_run(tmp_path)
    before = {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    model, guide, _ = load_run(path, backbone=tiny_llama())

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", fail)  # dies half-way: after the adapter, before the guide state
    with pytest.raises(OSError, match="disk full"):
        save_run(path, model, guide, backbone="tiny", overwrite=True)
    assert {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(OSError, match="disk full"):
        save_run(tmp_path / "new", model, guide, backbone="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
