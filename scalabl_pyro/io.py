"""Save and load a trained run: only what is new and small, and everything needed to rebuild it.

A run directory holds

* ``adapter/`` — the LoRA projections in peft's format (``adapter_model.safetensors`` +
  ``adapter_config.json``; for ScalaBL ``lora_A`` is ``V``, and ``s`` lives in the guide),
* ``guide.safetensors`` — the guide's state (``guide.state_dict()``: its parameters, unconstrained, and
  buffers such as the Laplace posterior's covariance), exact round trip,
* ``prior.safetensors`` — learned prior parameters (:class:`~scalabl_pyro.priors.LayerScalePrior`), if any,
* ``extra.safetensors`` — model state outside peft's adapter format (PoLAR's ``theta``), if any,
* ``run.json`` — the model class and name, adapter seed, :class:`~scalabl_pyro.config.ScalaBLConfig`
  (scoring included), the prior (by name and parameters), the guide (kind and options), the
  :class:`~scalabl_pyro.config.TrainConfig`, backbone, label words and site names.

:func:`export_peft` folds the posterior median of ``s`` into ``A`` and writes a plain peft adapter for users
who want one deterministic model; it loads with ``PeftModel.from_pretrained`` and
``AutoPeftModelForCausalLM`` in both scoring formats.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pyro
import torch
from safetensors.torch import load_file, save_file

from . import distributed
from ._utils import atomic_dir, atomic_write_json
from .backbones import load_backbone
from .config import ScalaBLConfig, TrainConfig
from .guides import check_fresh_guide, guide_spec, laplace_posterior, make_guide
from .model import LoRAModel
from .priors import isotropic_normal, prior_from_spec
from .scoring import AdaptedLM

__all__ = ["save_run", "load_run", "export_peft", "RunExistsError"]

_FORMAT = 2
_SAVABLE = {("scalabl_pyro.model", "LoRAModel"), ("scalabl_pyro.model", "ScalaBL"), ("scalabl_pyro.baselines.blob", "BLoB"),
            ("scalabl_pyro.baselines.polar", "PolarVBLL")}
#: where runs saved by earlier versions name a class that has moved since (read as the new place)
_MOVED = {("scalabl_pyro.methods", "BLoB"): "scalabl_pyro.baselines.blob",
          ("scalabl_pyro.polar", "PolarVBLL"): "scalabl_pyro.baselines.polar"}


class RunExistsError(FileExistsError):
    """The run directory already holds results."""


def _model_record(model) -> dict:
    cls = type(model)
    if (cls.__module__, cls.__name__) not in _SAVABLE:
        raise ValueError(f"save_run saves the package's LoRAModel, ScalaBL, BLoB and PolarVBLL models, not "
                         f"{cls.__name__}")
    sub = model.net.subspace
    return {"class": cls.__name__, "module": cls.__module__, "name": model.name,
            "subspace": False if sub is None else ("A" if sub.latent == "A" else True),
            "options": model.run_options() if hasattr(model, "run_options") else {}}


def _prior_params(model) -> dict[str, torch.Tensor]:
    """The prior's learned parameters (unconstrained), e.g. :class:`~scalabl_pyro.priors.LayerScalePrior`'s scales."""
    if not hasattr(model, "prior_param_names"):
        return {}
    state = pyro.get_param_store().get_state()["params"]
    return {k: state[k].detach().contiguous().clone() for k in model.prior_param_names() if k in state}


def _whole_lora_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``peft_model.state_dict()``, FSDP shards gathered whole (every rank calls it)."""
    return {k: distributed.full_tensor(v.detach()).clone() for k, v in peft_model.state_dict().items() if "lora_" in k}


def save_run(path: str | os.PathLike, model, guide=None, *, train_config: TrainConfig | None = None,
             backbone: str = "smollm2", meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s adapters, ``guide``'s state, learned prior parameters and every config to ``path``.

    The directory is written beside ``path`` and moved into place (:func:`~scalabl_pyro._utils.atomic_dir`):
    an interrupted save leaves the previous run (or nothing), never a half-written one.

    :param train_config: how the run was trained (recorded so that it can be reproduced or resumed).
    :param backbone: name or path to reload the backbone with :func:`~scalabl_pyro.backbones.load_backbone`.
    :param overwrite: replace an existing run (otherwise :class:`RunExistsError`).
    :raises ValueError: for a guide or model class this package cannot rebuild.

    A net sharded by :func:`~scalabl_pyro.distributed.shard_model` is saved whole: every rank calls ``save_run``
    (the shards are gathered) and rank 0 writes.

    Example::

        save_run("runs/obqa", model, guide, train_config=tc, backbone="smollm2")
    """
    path = Path(path)
    if (path / "run.json").exists() and not overwrite:
        raise RunExistsError(f"{path} already holds a run; pass overwrite=True (--overwrite) or choose another directory")
    spec = guide_spec(guide)
    if guide is not None and getattr(guide, "prototype_trace", True) is None:
        raise ValueError("the guide has never run, so it has no parameters to save; train it (or call it once) first")
    record = _model_record(model)
    whole = None
    if distributed.sharded(model):  # FSDP: every rank gathers the adapters' shards, rank 0 writes
        whole = {"state_dict": _whole_lora_state(model.net.peft_model)}
        if not distributed.is_main():
            return path
    with atomic_dir(path, replace=True) as tmp:
        model.net.peft_model.save_pretrained(tmp / "adapter", save_embedding_layers=False, **(whole or {}))
        guide_state, prior_params = {}, {}
        if guide is not None:
            guide_state = {k: v.detach().contiguous().clone() for k, v in guide.state_dict().items()}
            save_file(guide_state, str(tmp / "guide.safetensors"))
        prior_params = _prior_params(model)
        if prior_params:
            save_file(prior_params, str(tmp / "prior.safetensors"))
        if hasattr(model, "extra_state"):  # e.g. PoLAR's theta, which peft's adapter file does not hold
            save_file({k: v.detach().contiguous().clone() for k, v in model.extra_state().items()},
                      str(tmp / "extra.safetensors"))
        run = {
            "format": _FORMAT,
            "model": record,
            "seed": getattr(model.net, "seed", 0),
            "config": model.net.config.to_dict(),
            "label_words": list(model.net.label_words),
            "backbone": backbone,
            "prior": getattr(model, "prior_spec", None),
            "prior_params": sorted(prior_params),
            "guide": spec,
            "guide_state": sorted(guide_state),
            "train_config": None if train_config is None else train_config.to_dict(),
            "latent_sites": list(model.latent_sites),
            "meta": meta or {},
        }
        atomic_write_json(tmp / "run.json", run)
    return path


def _model_class(record: dict):
    record = {**record, "module": _MOVED.get((record["module"], record["class"]), record["module"])}
    if (record["module"], record["class"]) not in _SAVABLE:
        raise ValueError(f"run.json names the model class {record['module']}.{record['class']}, outside scalabl_pyro")
    try:
        return getattr(importlib.import_module(record["module"]), record["class"])
    except (ImportError, AttributeError):
        raise ValueError(f"run.json names the model class {record['module']}.{record['class']}, which this version "
                         "of scalabl_pyro does not have") from None


def _saved_prior(spec: dict, config: ScalaBLConfig, prior):
    """The prior a run recorded. ``{"kind": "default"}`` without ``"loc"`` was written before the default moved
    from ``Normal(0, prior_scale)`` to ``Normal(s0, prior_scale)``: such runs get the prior they were trained with."""
    if spec == {"kind": "default"}:
        return isotropic_normal(config.prior_scale)
    if spec.get("kind") == "default":
        return None  # the model class's default, rebuilt from the same seed's s0
    return prior_from_spec(spec, prior=prior)


def load_run(path: str | os.PathLike, *, backbone=None, example_batch=None, device=None, prior=None,
             name: str | None = None):
    """Rebuild ``(model, guide, run_info)`` from :func:`save_run`'s directory; predictions match exactly.

    ``run_info`` is the parsed ``run.json`` plus ``"train_config"`` as a :class:`~scalabl_pyro.config.TrainConfig`
    (or ``None``).

    :param backbone: ``(model, tokenizer)`` to use instead of loading ``run["backbone"]`` again.
    :param device: where to load the backbone (``"auto"``: CUDA if available; default CPU).
    :param example_batch: a collated batch used to create the guide's parameters (any one works);
        by default a one-question dummy batch.
    :param prior: the prior callable, for runs trained with a custom one (which cannot be saved).
    :param name: param-store name of the rebuilt model and its guide (default: the saved name, or
        ``<name>_1``, ``<name>_2``... when another live model holds it, e.g. the one that was just trained).
    :raises ValueError: naming every tensor that is missing, unexpected or of the wrong shape.

    Example::

        model, guide, info = load_run("runs/obqa")
        pred = predict(model, guide, test.examples)
    """
    path = Path(path)
    if not (path / "run.json").is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no run.json); write one with save_run()")
    run = json.loads((path / "run.json").read_text(encoding="utf-8"))
    if run.get("format") != _FORMAT:
        raise ValueError(f"{path}: run format {run.get('format')} is not supported by this version ({_FORMAT}); "
                         "train and save the run again")
    rec = run["model"]
    cls = _model_class(rec)
    quantization = (run.get("meta") or {}).get("quantization")  # adapters trained on 4/8-bit weights reload on them
    lm, tok = backbone if backbone is not None else load_backbone(run["backbone"], device=device,
                                                                  quantization=quantization)
    config = ScalaBLConfig.from_dict(run["config"])
    net = AdaptedLM(lm, tok, label_words=run["label_words"], config=config, subspace=rec["subspace"],
                    seed=run["seed"])
    kw = dict(rec["options"])  # e.g. ScalaBL's layout (runs saved before it existed: the default layout)
    if rec["subspace"]:
        kw["prior"] = _saved_prior(run["prior"], config, prior)
    model = cls(net, name=name or _free_name(rec["name"]), **kw)
    _load_adapter(net.peft_model, path / "adapter" / "adapter_model.safetensors")
    if hasattr(model, "load_extra_state"):
        extra = load_file(str(path / "extra.safetensors"))
        _check_names(model.extra_state(), extra, what="adapter state")
        model.load_extra_state(extra)
    guide = None
    batch = example_batch if example_batch is not None else net.collate([_dummy_example(len(run["label_words"]))])
    if run["guide"]:
        kind, options = run["guide"]["kind"], run["guide"]["options"]
        if kind == "laplace_posterior":
            guide = laplace_posterior(model, batch)
        else:
            guide = make_guide(kind, model, **options)
            check_fresh_guide(guide)
            with torch.no_grad():
                guide(batch, batch["labels"])  # creates the guide's parameters (cheap: shape pass)
        saved = load_file(str(path / "guide.safetensors"))
        _check_names(guide.state_dict(), saved, what="guide parameters")
        guide.load_state_dict(saved)  # in place: the param store holds these very tensors
    elif rec["subspace"]:
        with torch.no_grad():
            model(batch)  # creates learned prior parameters, if any
    if run["prior_params"]:
        saved = load_file(str(path / "prior.safetensors"))
        store = pyro.get_param_store()
        current = {k: store._params[k] for k in run["prior_params"] if k in store}
        _check_names(current, saved, what="prior parameters")
        with torch.no_grad():
            for k, v in saved.items():
                current[k].copy_(v)
    info = dict(run)
    info["train_config"] = TrainConfig.from_dict(run["train_config"]) if run["train_config"] else None
    return model, guide, info


def _free_name(name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... if Pyro's param store already holds tensors under it (the model's
    ``<name>$$$...`` or its guide's ``<Guide>_<name>.``...), e.g. those of the model that was just trained."""
    keys = list(pyro.get_param_store().keys())

    def taken(n: str) -> bool:
        return any(k.startswith(n + "$$$") or f"_{n}." in k.split(".", 1)[0] + "." for k in keys)

    k, out = 0, name
    while taken(out):
        k += 1
        out = f"{name}_{k}"
    return out


def _check_names(current: dict, saved: dict, *, what: str) -> None:
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
              for k in sorted(set(current) & set(saved)) if saved[k].shape != current[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what} do not match the saved run: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shape mismatches {shapes[:5]} (was it saved with another config, backbone or guide?)")


def _load_adapter(peft_model, file: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the run directory is incomplete")
    saved = load_file(str(file))
    _check_names(get_peft_model_state_dict(peft_model, save_embedding_layers=False), saved, what="LoRA adapters")
    set_peft_model_state_dict(peft_model, saved)


class _Dummy:
    def __init__(self, c):
        self.id, self.label = "dummy", 0
        self.choices = tuple("x" * (k + 1) for k in range(c))
        self.prompt, self.context = "Answer:", "Answer:"
        self.continuations = tuple(" " + x for x in self.choices)


def _dummy_example(num_classes: int):
    return _Dummy(num_classes)


def export_peft(path: str | os.PathLike, model: LoRAModel, guide=None) -> Path:
    """Write a plain peft adapter for the full backbone: ``A = diag(s_median) V`` for ScalaBL (the posterior
    median of every ``s``), the adapters as they are for plain LoRA.

    In the letter format the output head was cut down to the answer-letter rows; its adapter is written for
    the full vocabulary head (zero rows elsewhere), so the exported adapter loads on the unmodified backbone
    (``PeftModel.from_pretrained(base, path)`` or ``AutoPeftModelForCausalLM.from_pretrained(path)``) and gives
    the same answer-letter logits.

    Example::

        export_peft("runs/obqa/peft_median", model, guide)

    Under FSDP (:func:`~scalabl_pyro.distributed.shard_model`) every rank calls it and rank 0 writes.
    """
    from peft import get_peft_model_state_dict

    net = model.net
    sub = net.subspace
    if sub is not None and sub.latent != "s":
        raise ValueError("export_peft folds ScalaBL's s into A; a BLoB run has no single A to export")
    med = None
    if sub is not None:
        try:
            med = guide.median() if guide is not None and hasattr(guide, "median") else None
        except NotImplementedError:
            med = None
        if not med:
            raise ValueError("export_peft needs a guide with a median() (e.g. AutoNormal, AutoDelta)")
    whole = _whole_lora_state(net.peft_model) if distributed.sharded(model) else None  # FSDP: every rank gathers
    if whole is not None and not distributed.is_main():
        return Path(path)  # rank 0 writes
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(net.peft_model, state_dict=whole,
                                                                          save_embedding_layers=False).items()}
    if sub is not None:
        med = model.module_values(med)  # per-module s (the vectorized site split); fixed modules keep s0
        for site, info in sub.sites.items():
            key = next(k for k in state if k.endswith(f"{info.module_name}.lora_A.weight"))  # V
            s = med[site] if site in med else info.s0
            state[key] = state[key] * s.detach().reshape(-1, 1).to(state[key])
    if net.config.scoring == "letter":
        ids = torch.tensor(net.label_token_ids)
        vocab = net.peft_model.get_base_model().get_input_embeddings().num_embeddings
        for k in [k for k in state if "lm_head.lora_B" in k]:
            full = state[k].new_zeros(vocab, state[k].shape[1])
            full[ids] = state[k]
            state[k] = full
    path = Path(path)
    with atomic_dir(path, replace=True) as tmp:
        net.peft_model.peft_config["default"].save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    return path
