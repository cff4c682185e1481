"""Save and load a trained run: only what is new and small.

A run directory holds

* ``adapter/`` — the LoRA projections in peft's format (``adapter_model.safetensors`` +
  ``adapter_config.json``; for ScalaBL ``lora_A`` is ``V``, and ``s`` lives in the guide),
* ``guide.safetensors`` — the guide's parameters (unconstrained values, exact round trip),
* ``run.json`` — configs, backbone name, label words, guide kind, site names, parameter counts.

:func:`export_peft` folds the posterior median of ``s`` into ``A`` and writes a plain peft adapter
for users who want one deterministic model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyro
import torch
from safetensors.torch import load_file, save_file

from ._utils import atomic_write_json
from .backbones import load_backbone
from .config import ScalaBLConfig
from .guides import make_guide
from .model import LoRAModel, ScalaBL
from .scoring import AdaptedLM

__all__ = ["save_run", "load_run", "export_peft", "RunExistsError"]

_FORMAT = 1


class RunExistsError(FileExistsError):
    """The run directory already holds results."""


def save_run(path: str | os.PathLike, model, guide=None, *, guide_kind: str | None = None, backbone: str = "smollm2",
             meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s adapters, ``guide``'s parameters and the configs to ``path``.

    :param guide_kind: short name of the guide (see :data:`~scalabl_pyro.guides.GUIDES`); inferred for autoguides.
    :param backbone: name or path to reload the backbone with :func:`~scalabl_pyro.backbones.load_backbone`.
    :param overwrite: replace an existing run (otherwise :class:`RunExistsError`).

    Example::

        save_run("runs/obqa", model, guide, backbone="smollm2")
    """
    path = Path(path)
    if (path / "run.json").exists() and not overwrite:
        raise RunExistsError(f"{path} already holds a run; pass overwrite=True (--overwrite) or choose another directory")
    if guide is not None and guide_kind is None:
        from .guides import GUIDES

        guide_kind = next((k for k, cls in GUIDES.items() if type(guide) is cls), None)
        if guide_kind is None:
            raise ValueError(f"cannot infer guide_kind for {type(guide).__name__}; pass guide_kind=")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.net.peft_model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        guide_params = {}
        if guide is not None:
            state = pyro.get_param_store().get_state()["params"]
            guide_params = {k: v.detach().contiguous().clone() for k, v in state.items()
                            if not k.startswith(model.name + "$$$")}
            save_file(guide_params, str(tmp / "guide.safetensors"))
        run = {
            "format": _FORMAT,
            "model": type(model).__name__,
            "model_name": model.name,
            "config": model.net.config.to_dict(),
            "label_words": list(model.net.label_words),
            "backbone": backbone,
            "guide": guide_kind,
            "latent_sites": list(model.latent_sites),
            "guide_params": sorted(guide_params),
            "meta": meta or {},
        }
        atomic_write_json(tmp / "run.json", run)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_run(path: str | os.PathLike, *, backbone=None, example_batch=None, device=None):
    """Rebuild ``(model, guide, run_info)`` from :func:`save_run`'s directory; predictions match exactly.

    :param backbone: ``(model, tokenizer)`` to use instead of loading ``run["backbone"]`` again.
    :param device: where to load the backbone (``"auto"``: CUDA if available; default CPU).
    :param example_batch: a collated batch used to create the guide's parameters (any one works);
        by default a one-question dummy batch.
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
        raise ValueError(f"{path}: run format {run.get('format')} is not supported by this version ({_FORMAT})")
    lm, tok = backbone if backbone is not None else load_backbone(run["backbone"], device=device)
    config = ScalaBLConfig.from_dict(run["config"])
    is_bayes = run["model"] == "ScalaBL"
    net = AdaptedLM(lm, tok, label_words=run["label_words"], config=config, subspace=is_bayes)
    model = (ScalaBL if is_bayes else LoRAModel)(net, name=run["model_name"])
    _load_adapter(net.peft_model, path / "adapter" / "adapter_model.safetensors")
    guide = None
    if run["guide"]:
        guide = make_guide(run["guide"], model)
        batch = example_batch if example_batch is not None else net.collate([_dummy_example(len(run["label_words"]))])
        with torch.no_grad():
            guide(batch, batch["labels"])  # creates the guide's parameters (cheap: shape pass)
        saved = load_file(str(path / "guide.safetensors"))
        state = pyro.get_param_store().get_state()["params"]
        current = {k: v for k, v in state.items() if not k.startswith(model.name + "$$$")}
        _check_names(current, saved, what="guide parameters")
        with torch.no_grad():
            for k, v in saved.items():
                current[k].copy_(v)
    return model, guide, run


def _check_names(current: dict, saved: dict, *, what: str) -> None:
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
              for k in set(current) & set(saved) if saved[k].shape != current[k].shape]
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


def export_peft(path: str | os.PathLike, model: ScalaBL, guide) -> Path:
    """Write a plain peft adapter with ``A = diag(s_median) V`` (the posterior median of every ``s``).

    Example::

        export_peft("runs/obqa/peft_mean", model, guide)  # PeftModel.from_pretrained(base, that_dir)
    """
    try:
        med = guide.median() if hasattr(guide, "median") else None
    except NotImplementedError:
        med = None
    if not med:
        raise ValueError("export_peft needs a guide with a median() (e.g. AutoNormal, AutoDelta)")
    sites = model.net.subspace.sites
    saved = {}
    with torch.no_grad():
        for site, info in sites.items():
            saved[site] = info.lora_A.weight.clone()
            info.lora_A.weight.mul_(med[site].reshape(-1, 1))
        try:
            model.net.peft_model.save_pretrained(path, save_embedding_layers=False)
        finally:
            for site, info in sites.items():
                info.lora_A.weight.copy_(saved[site])
    return Path(path)

