"""Every method of the benchmark behind one interface: :func:`train_method` returns a :class:`Trained`
whose :meth:`Trained.predict` gives a :class:`~scalabl_pyro.predictive.Prediction`.

=============  ==============================================================================
``mle``        plain LoRA, maximum likelihood (SVI with an empty guide)
``map``        plain LoRA with decoupled weight decay (a Gaussian prior on the projections)
``scalabl``    ScalaBL: latent ``s`` per layer, Pyro autoguide (default AutoNormal), SVI
``blob``       BLoB (Wang et al. 2024): mean-field Gaussian over the full LoRA ``A``, ``B`` deterministic
``laplace``    MAP in the ScalaBL subspace (AutoLaplaceApproximation), then a Laplace posterior on ``s``
               with a sampled-label Fisher (one backward per training example) + the prior's Hessian
``mcdropout``  LoRA trained with adapter dropout, kept on at test time
``ensemble``   deep ensemble of LoRA adapters (``ensemble_size`` seeds)
``scalabl_bayesadapt``  the same ScalaBL model and AutoNormal guide trained with the official code's
               recipe instead of the ELBO (for comparison): AdamW on the NLL of one sample, then a
               separate SGD step on the analytic KL(p || q) with BLoB's KL schedule
``temperature``  plain LoRA on 90% of the training data, then one temperature fitted by NLL on the other
               10% (:mod:`scalabl_pyro.baselines.temperature`); never on the test split
``scalabl_last2``  partial-Bayesian ScalaBL: ``s`` latent only in ``lm_head`` and the last 2 decoder
               layers, the other modules plain LoRA; posterior samples share the lower layers (one pass)
``scalabl_temperature``  ScalaBL on 90% of the training data, then one temperature fitted by NLL on the
               model average of the other 10% (the same split as ``temperature``): both remedies together
=============  ==============================================================================

Each method gets its own freshly loaded backbone from ``backbone_fn``.
"""
from __future__ import annotations

import math

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pyro
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation

from .. import distributed
from .._utils import atomic_dir, atomic_write_json
from ..baselines.bayesadapt import fit_bayesadapt_recipe
from ..baselines.blob import BLoB
from ..baselines.laplace import laplace_guide
from ..baselines.mcdropout import predict_mc_dropout
from ..baselines.polar import PolarVBLL, polar_guide, polar_retract, retract_every
from ..baselines.temperature import TemperatureScaled, fit_temperature
from ..config import ScalaBLConfig, TrainConfig
from ..guides import init_to_s0, make_guide
from ..io import RunExistsError, load_run, save_run
from ..model import LoRAModel, ScalaBL
from ..posterior import adapter_norms, posterior_scales
from ..predictive import Prediction, point_guide, predict
from ..priors import centered_prior, isotropic_normal
from ..scoring import AdaptedLM
from ..train import fit
from ..trunk import last_layers

__all__ = ["METHODS", "NO_CALLBACK", "Trained", "train_method", "train_polar_vbll", "save_trained", "load_trained",
           "validation_split", "lora_parameter_count"]

METHODS = ("mle", "map", "scalabl", "blob", "laplace", "mcdropout", "ensemble", "scalabl_bayesadapt", "temperature",
           "scalabl_last2", "scalabl_temperature")
#: Methods whose training takes no ``make_callback`` (several models, or their own loop).
NO_CALLBACK = ("ensemble", "scalabl_bayesadapt")
#: ``scalabl_last2``: partial-Bayesian ScalaBL, only ``lm_head`` and the last ``PARTIAL_LAYERS`` decoder layers
#: stochastic (:func:`~scalabl_pyro.trunk.last_layers`); posterior samples share the layers below.
PARTIAL_LAYERS = 2


def lora_parameter_count(net: AdaptedLM) -> int:
    """Parameters of plain LoRA on the same modules: sum of ``r*in + out*r``."""
    from ..layers import lora_layers

    return sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
               for m in lora_layers(net.peft_model).values())


@dataclass
class Trained:
    """A trained method. ``predict(examples)`` returns per-sample probabilities ``(S, N, C)``."""

    method: str
    models: list  # LoRAModel / ScalaBL / BLoB (several for an ensemble)
    guide: object = None
    num_samples: int = 10
    losses: list = field(default_factory=list)
    fit_seconds: float = 0.0
    extra_params: int = 0
    lora_params: int = 0
    temperature: float | None = None  # ``temperature``, ``scalabl_temperature``: T fitted on held-out training data
    resumed_from: list | None = None  # the checkpoint step(s) training resumed from (None: trained from step 0)
    history: dict = field(default_factory=dict)  # if a guide: fit's monitoring (FitResult.monitor_steps / kl / scale)
    # and the final ``posterior`` and ``adapters`` per site (:func:`~scalabl_pyro.posterior.posterior_scales`,
    # :func:`~scalabl_pyro.posterior.adapter_norms`)

    def predict(self, examples: Sequence, *, num_samples: int | None = None, batch_size: int = 8,
                progress: bool = False, tempered: bool = True) -> Prediction:
        """Predictions on ``examples`` (``S`` samples or members); ``tempered=False`` leaves out the fitted
        temperature of the ``temperature`` methods (:meth:`temper` adds it afterwards)."""
        pred = self._predict(examples, num_samples=num_samples, batch_size=batch_size, progress=progress)
        return self.temper(pred) if tempered else pred

    def temper(self, pred: Prediction) -> Prediction:
        """``pred`` tempered by this run's fitted ``temperature`` (its model average, one sample); ``pred``
        itself for the methods without one."""
        return pred if self.temperature is None else TemperatureScaled.from_prediction(pred, self.temperature)

    def _predict(self, examples: Sequence, *, num_samples: int | None, batch_size: int, progress: bool) -> Prediction:
        S = num_samples or self.num_samples
        if self.method == "mcdropout":
            return predict_mc_dropout(self.models[0].net, examples, num_samples=S, batch_size=batch_size)
        if self.method == "ensemble":
            preds = [predict(m, None, examples, batch_size=batch_size) for m in self.models]
            return Prediction(torch.cat([p.sample_probs for p in preds]), preds[0].labels, preds[0].ids)
        guide = self.guide if self.models[0].latent_sites else None
        return predict(self.models[0], guide, examples, num_samples=S, batch_size=batch_size, progress=progress)

    def predict_point(self, examples: Sequence, *, batch_size: int = 8) -> Prediction | None:
        """The model at its guide's posterior median (:func:`~scalabl_pyro.predictive.point_guide`), one pass;
        ``None`` for a method without such a guide (the LoRA baselines, MC dropout, the ensemble, AutoIAFNormal)."""
        if self.guide is None or self.method == "ensemble":
            return None
        try:
            point = point_guide(self.guide)
        except TypeError:  # no (closed-form) median
            return None
        return predict(self.models[0], point, examples, num_samples=1, batch_size=batch_size)


def validation_split(examples: Sequence, *, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """``(fit, validation)``: a seeded random ``fraction`` of ``examples`` held out (at least one of each).

    Example::

        fit_part, val_part = validation_split(train.examples, fraction=0.1, seed=0)
    """
    n = len(examples)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction!r} must be between 0 and 1 (the held-out share, e.g. 0.1)")
    if n < 2:
        raise ValueError(f"{n} training examples cannot be split into a fitting and a validation part; need >= 2")
    k = min(n - 1, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


#: Priors that :func:`train_method` (and ``GridConfig.prior`` / ``--prior``) accept by name.
PRIORS = {"normal": "Normal(0, 1)", "s0": "Normal(s0, 1)"}


def parse_prior(name: str) -> tuple[str, float]:
    """``(kind, scale)`` of a prior name: a key of :data:`PRIORS`, optionally with ``:<scale>`` for another
    standard deviation (``"s0:0.3"`` is ``Normal(s0, 0.3)``, ``"normal:2"`` is ``Normal(0, 2)``).

    :raises ValueError: naming the bad value and the allowed forms.

    Example::

        parse_prior("s0:0.3")  # ("s0", 0.3)
    """
    kind, _, scale = str(name).partition(":")
    try:
        value = float(scale) if scale else 1.0
    except ValueError:
        value = math.nan
    if kind not in PRIORS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"prior={name!r}: allowed are 's0' (Normal(s0, 1), ScalaBL's default) and 'normal' "
                         "(Normal(0, 1)), each optionally with ':<scale>' for another positive standard deviation, "
                         "e.g. 's0:0.3'")
    return kind, value


def describe_prior(name: str) -> str:
    """``"Normal(s0, 0.3)"`` for ``"s0:0.3"`` (see :func:`parse_prior`)."""
    kind, scale = parse_prior(name)
    return f"Normal({'s0' if kind == 's0' else 0}, {scale:g})"


def resolve_prior(prior, net: AdaptedLM):
    """A prior by name (:func:`parse_prior`; ``"s0"`` needs ``net`` for its ``s0``) or any prior object, unchanged."""
    if not isinstance(prior, str):
        return prior
    kind, scale = parse_prior(prior)
    return centered_prior(net.subspace.s0, scale=scale) if kind == "s0" else isotropic_normal(scale)


def train_method(method: str, backbone_fn: Callable[[], tuple], train_examples: Sequence, *, label_words,
                 config: ScalaBLConfig = ScalaBLConfig(), train_config: TrainConfig = TrainConfig(),
                 guide: str = "normal", prior=None, num_samples: int = 10, ensemble_size: int = 3,
                 dropout: float = 0.1, map_weight_decay: float = 1e-2, progress: bool = True,
                 checkpoint_dir=None, checkpoint_every: int | None = None, val_fraction: float = 0.1,
                 make_callback: Callable | None = None, fsdp: bool = False) -> Trained:
    """Build and train ``method`` on ``train_examples``.

    :param backbone_fn: returns a fresh ``(model, tokenizer)`` (e.g. ``lambda: load_backbone("smollm2")``).
    :param guide: autoguide name for ``scalabl``/``blob`` (see :data:`~scalabl_pyro.guides.GUIDES`).
    :param prior: any prior form of :func:`~scalabl_pyro.priors.normalize_prior` (default: the model's, ``Normal(s0, 1)`` for
        ScalaBL, ``Normal(0, 1)`` for BLoB), or
        a name (:func:`parse_prior`: ``"s0"``, ``"normal"``, optionally ``":<scale>"``): ``"s0"`` is
        :func:`~scalabl_pyro.priors.centered_prior` at the net's ``s0``.
    :param val_fraction: ``temperature`` and ``scalabl_temperature``: the share of ``train_examples`` held out
        (seeded by ``train_config.seed``) to fit ``T`` on; the model trains on the rest. The test split is never used.
    :param make_callback: called as ``make_callback(model, guide)`` (``guide`` is ``None`` for the LoRA methods)
        once the model is built; it returns the ``callback(step, loss)`` given to
        :func:`~scalabl_pyro.train.fit`, e.g. a :class:`~scalabl_pyro.convergence.HeldoutCurve`. Not for
        ``ensemble`` and ``scalabl_bayesadapt``.
    :param fsdp: shard every net's decoder layers over the ranks of the running ``torch.distributed`` job
        (:func:`~scalabl_pyro.distributed.shard_model`; launch with ``torchrun``).
    :param checkpoint_dir: checkpoint :func:`~scalabl_pyro.train.fit` there and resume from it (an ensemble
        member ``k`` in ``member<k>/``); not for ``scalabl_bayesadapt``, which has its own loop.

    Example::

        t = train_method("scalabl", lambda: load_backbone("smollm2"), train.examples, label_words=train.label_words)
        metrics = t.predict(test.examples).metrics()
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = len(train_examples)
    if checkpoint_dir is not None and method == "scalabl_bayesadapt":
        raise ValueError("scalabl_bayesadapt trains with its own loop, which does not checkpoint; drop checkpoint_dir")
    ck = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every} if checkpoint_dir is not None else {}
    if make_callback is not None and method in NO_CALLBACK:
        raise ValueError(f"make_callback is not supported for {method!r} (several models, or its own loop); "
                         "drop it, or train the members one by one with fit()")

    def cb(model, guide=None):
        return {"callback": make_callback(model, guide)} if make_callback is not None else {}
    earlier, resumed = 0.0, []  # training seconds of the calls a resumed fit continued, their checkpoint steps

    def fit_(*args, **kwargs):
        nonlocal earlier
        t = time.perf_counter()
        res = fit(*args, **kwargs)
        if res.resumed_from is not None:
            earlier += max(0.0, res.seconds - (time.perf_counter() - t))
            resumed.append(res.resumed_from)
        return res

    def held_out():  # ``(fit part, validation part)`` of the temperature methods: never the test split
        return validation_split(train_examples, fraction=val_fraction, seed=train_config.seed)

    def held_out_temperature(model, guide, val_part) -> float:  # T by NLL on the model average there
        val = predict(model, guide, val_part, num_samples=num_samples, batch_size=8)
        return fit_temperature(val.mean_probs, val.labels)

    def done(trained: Trained) -> Trained:
        trained.fit_seconds += earlier
        trained.resumed_from = resumed or None
        return trained
    pyro.clear_param_store()
    t0 = time.perf_counter()

    if fsdp and method == "scalabl_bayesadapt":
        raise ValueError("scalabl_bayesadapt trains with its own loop, which does not run under FSDP; drop fsdp")

    def net_of(subspace, cfg=config, seed=train_config.seed):
        lm, tok = backbone_fn()
        net = AdaptedLM(lm, tok, label_words=label_words, config=cfg, subspace=subspace, seed=seed)
        return distributed.shard_model(net) if fsdp else net

    if method in ("mle", "map", "mcdropout"):
        cfg = dataclasses.replace(config, lora_dropout=dropout) if method == "mcdropout" else config
        tc = dataclasses.replace(train_config, weight_decay=map_weight_decay) if method == "map" else train_config
        net = net_of(False, cfg)
        if method == "mcdropout":
            net.peft_model.train()
        model = LoRAModel(net, num_data=n)
        res = fit_(model, None, train_examples, config=tc, progress=progress, **ck, **cb(model))
        net.peft_model.eval()
        lp = lora_parameter_count(net)
        return done(Trained(method, [model], None, num_samples, res.losses, time.perf_counter() - t0, 0, lp))
    if method == "temperature":
        fit_part, val_part = held_out()
        model = LoRAModel(net_of(False), num_data=len(fit_part))
        res = fit_(model, None, fit_part, config=train_config, progress=progress, **ck, **cb(model))
        T = held_out_temperature(model, None, val_part)
        lp = lora_parameter_count(model.net)
        return done(Trained(method, [model], None, 1, res.losses, time.perf_counter() - t0, 1, lp, temperature=T))
    if method == "ensemble":
        models, losses = [], []
        for k in range(ensemble_size):
            pyro.clear_param_store()
            tc = dataclasses.replace(train_config, seed=train_config.seed + 1000 * k)
            model = LoRAModel(net_of(False, seed=tc.seed), num_data=n, name=f"lora{k}")
            member = {**ck, "checkpoint_dir": os.path.join(checkpoint_dir, f"member{k}")} if ck else {}
            losses.extend(fit_(model, None, train_examples, config=tc, progress=progress, **member).losses)
            models.append(model)
        lp = lora_parameter_count(models[0].net)
        return done(Trained(method, models, None, ensemble_size, losses, time.perf_counter() - t0,
                            (ensemble_size - 1) * lp, lp))
    if method == "scalabl_bayesadapt":
        model = ScalaBL(net := net_of(True), prior=resolve_prior(prior, net), num_data=n)
        g = make_guide("normal", model)
        losses = fit_bayesadapt_recipe(model, g, train_examples, config=train_config, progress=progress)
        lp = lora_parameter_count(model.net)
        return done(Trained(method, [model], g, num_samples, losses, time.perf_counter() - t0,
                            sum(p.numel() for p in g.parameters()), lp))
    if method == "blob":
        model = BLoB(net := net_of("A"), prior=resolve_prior(prior, net), num_data=n)
        g = make_guide(guide, model)
    elif method == "laplace":
        model = ScalaBL(net := net_of(True), prior=resolve_prior(prior, net), num_data=n)
        g = AutoLaplaceApproximation(model, init_loc_fn=init_to_s0(model))
    else:
        if method == "scalabl_temperature":  # the split (and so the steps per epoch) of ``temperature``
            train_examples, val_part = held_out()
        net = net_of(True)
        part = {"stochastic": last_layers(net, PARTIAL_LAYERS)} if method == "scalabl_last2" else {}
        model = ScalaBL(net, prior=resolve_prior(prior, net), num_data=len(train_examples), **part)
        g = make_guide(guide, model)
    res = fit_(model, g, train_examples, config=train_config, progress=progress, **ck, **cb(model, g))
    T = held_out_temperature(model, g, val_part) if method == "scalabl_temperature" else None
    if method == "laplace":
        g = laplace_guide(model, g, train_examples, seed=train_config.seed)
    guide_params = sum(p.numel() for p in g.parameters()) + sum(b.numel() for b in g.buffers())
    lp = lora_parameter_count(model.net)
    trainable = sum(p.numel() for p in model.net.trainable_parameters())
    extra = trainable + guide_params - lp + (T is not None)
    batch = model.net.collate(list(train_examples[:2]))  # the guide reads only the shapes
    history = {"monitor_steps": res.monitor_steps, "kl": res.kl, "scale": res.scale,
               "posterior": posterior_scales(model, g, batch, seed=train_config.seed),
               "adapters": adapter_norms(model.net)}
    return done(Trained(method, [model], g, num_samples, res.losses, time.perf_counter() - t0, extra, lp,
                        temperature=T, history=history))



def save_trained(path, trained: Trained, *, train_config: TrainConfig | None = None, backbone: str = "smollm2",
                 meta: dict | None = None, overwrite: bool = False):
    """Save a trained method: one :func:`~scalabl_pyro.io.save_run` directory per model (``member0/``, ...; an
    ensemble has several) and ``trained.json`` (method, posterior samples, losses, parameter counts).

    Written beside ``path`` and moved into place, like a run. :func:`load_trained` reads it back.

    Example::

        save_trained("runs/obqa_ensemble", train_method("ensemble", ...), backbone="smollm2")
    """
    path = Path(path)
    if (path / "trained.json").exists() and not overwrite:
        raise RunExistsError(f"{path} already holds a trained method; pass overwrite=True or choose another directory")
    with atomic_dir(path, replace=True) as tmp:
        for k, model in enumerate(trained.models):
            guide = trained.guide if k == 0 and model.latent_sites else None
            save_run(tmp / f"member{k}", model, guide, train_config=train_config, backbone=backbone, meta=meta)
        atomic_write_json(tmp / "trained.json", {
            "method": trained.method, "members": len(trained.models), "num_samples": trained.num_samples,
            "losses": list(trained.losses), "fit_seconds": trained.fit_seconds, "extra_params": trained.extra_params,
            "lora_params": trained.lora_params, "temperature": trained.temperature, "meta": meta or {}})
    return path


def load_trained(path, *, backbone_fn: Callable[[], tuple] | None = None, device=None) -> Trained:
    """Rebuild the :class:`Trained` that :func:`save_trained` wrote; ``predict`` gives the same probabilities.

    :param backbone_fn: returns a fresh ``(model, tokenizer)`` for each member (default: load each member's
        recorded backbone).
    """
    path = Path(path)
    if not (path / "trained.json").is_file():
        raise FileNotFoundError(f"{path} holds no trained.json; write one with save_trained()")
    info = json.loads((path / "trained.json").read_text(encoding="utf-8"))
    models, guide = [], None
    for k in range(info["members"]):
        model, g, _ = load_run(path / f"member{k}", backbone=backbone_fn() if backbone_fn else None, device=device)
        models.append(model)
        guide = guide if k else g
    return Trained(info["method"], models, guide, info["num_samples"], info["losses"], info["fit_seconds"],
                   info["extra_params"], info["lora_params"], info.get("temperature"))


def train_polar_vbll(backbone_fn: Callable[[], tuple], train_examples: Sequence, *, label_words,
                     train_config: TrainConfig = TrainConfig(), num_samples: int = 10, progress: bool = True,
                     config: ScalaBLConfig | None = None, prior_scale: float = 1.0, centered: bool = True,
                     init_scale: float = 0.01, every: int = 1, method: str = "polar") -> Trained:
    """Build and train PoLAR-VBLL (SVI + Stiefel retraction every ``every`` steps); method name ``"polar_vbll"``.

    :param backbone_fn: returns a fresh ``(model, tokenizer)``.
    :param config: default ``ScalaBLConfig(scoring="letter", target_modules=("q_proj", "v_proj"))``.

    Example::

        t = train_polar_vbll(lambda: load_backbone("smollm2"), train.examples, label_words=train.label_words,
                             train_config=TrainConfig(steps=200))
        t.predict(test.examples).metrics()
    """
    pyro.clear_param_store()
    t0, (lm, tok) = time.perf_counter(), backbone_fn()
    cfg = config or ScalaBLConfig(scoring="letter", target_modules=("q_proj", "v_proj"))
    net = AdaptedLM(lm, tok, label_words=label_words, config=cfg, subspace=False, seed=train_config.seed)
    model = PolarVBLL(net, prior_scale=prior_scale, num_data=len(train_examples), centered=centered,
                      seed=train_config.seed)
    guide = polar_guide(model, init_scale=init_scale)
    res = fit(model, guide, train_examples, config=train_config, progress=progress,
              callback=retract_every(model, every, method))
    polar_retract(model, method)
    lp = lora_parameter_count(net)
    extra = sum(p.numel() for p in model.polar.parameters()) + sum(p.numel() for p in guide.parameters()) - lp
    return Trained("polar_vbll", [model], guide, num_samples, res.losses, time.perf_counter() - t0, extra, lp)
