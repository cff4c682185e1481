"""Priors over the subspace sites ``lora.<module>.s`` (event shape ``(r,)``).

A prior may be given as

* a :class:`~pyro.distributions.Distribution` (used for every site; scalar ones are expanded to ``r``),
* a dict ``{site_name: Distribution}`` (sites not listed fall back to the ``default`` prior),
* a callable ``(site_name, module) -> Distribution``,

and :func:`normalize_prior` turns any of them into the callable form with event shape ``(r,)``, on the
adapted module's device (tensors of a prior written with CPU floats are moved there).
Ready-made priors: :func:`centered_prior` (centred at ``s0``; ScalaBL's default is ``centered_prior(net.subspace.s0,
net.config.prior_scale)``), :func:`isotropic_normal` (``Normal(0, scale)``, BLoB's default),
:func:`laplace_prior` (sparsity),
:func:`student_t_prior` (heavy tails), and :class:`LayerScalePrior` (a learned per-layer scale,
type-II maximum likelihood).

Writing your own prior takes a few lines::

    def depth_prior(site, module):
        layer = int(site.split(".")[3]) if ".layers." in site else 0  # lora.model.layers.<l>...
        return dist.Normal(0.0, 1.0 / (1 + 0.1 * layer))

    model = ScalaBL(net, prior=depth_prior)
"""
from __future__ import annotations

from typing import Callable, Mapping, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["normalize_prior", "isotropic_normal", "centered_prior", "laplace_prior", "student_t_prior",
           "LayerScalePrior", "PriorSpec", "prior_to_spec", "prior_from_spec", "stack_priors"]

PriorFn = Callable[[str, torch.nn.Module], dist.Distribution]
PriorSpec = Union[None, dist.Distribution, Mapping[str, dist.Distribution], PriorFn]


def _fixed(fn: PriorFn, **spec) -> PriorFn:
    fn.fixed = True  # same Distribution on every call: normalize_prior may cache it per site and device
    fn.spec = spec  # how save_run records it (prior_to_spec)
    return fn


def isotropic_normal(scale: float = 1.0) -> PriorFn:
    """``Normal(0, scale)`` on every coordinate of every site (ScalaBL's default before December 2026; BLoB's)."""
    return _fixed(lambda site, module: dist.Normal(0.0, float(scale)), kind="isotropic_normal", scale=float(scale))


def centered_prior(locs: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, dist.Distribution]:
    """``{site: Normal(locs[site], scale)}``: the default prior's shape, centred at given values (dict form).

    With ``locs = net.subspace.s0`` the prior sits where the guide starts: ScalaBL's default. ``Normal(0, 1)``
    pulls the guide's mean of ``s`` towards 0; with ~100-500 training examples that pull outweighs the data
    (``bench/demo_recipe.py``: the mean ends at ~10% of ``s0``; ``bench/epochs.py``: on 480 WinoGrande-S
    questions ScalaBL stays at chance, 0.50 against 0.63 with this prior), with thousands it does not.

    :param locs: ``{site: (r,)}`` (or ``(r, in)`` for BLoB's ``A``) tensors, e.g. ``net.subspace.s0``.

    Example::

        model = ScalaBL(net, prior=centered_prior(net.subspace.s0), num_data=len(train))
    """
    if not float(scale) > 0:
        raise ValueError(f"scale={scale!r} must be > 0")
    return {site: dist.Normal(loc.detach().clone(), float(scale)).to_event(loc.dim()) for site, loc in locs.items()}


def laplace_prior(scale: float = 1.0) -> PriorFn:
    """``Laplace(0, scale)``: favours sparse ``s`` (few active directions per layer)."""
    return _fixed(lambda site, module: dist.Laplace(0.0, float(scale)), kind="laplace_prior", scale=float(scale))


def student_t_prior(df: float = 3.0, scale: float = 1.0) -> PriorFn:
    """``StudentT(df, 0, scale)``: heavy tails let a few directions grow large."""
    return _fixed(lambda site, module: dist.StudentT(float(df), 0.0, float(scale)), kind="student_t_prior",
                  df=float(df), scale=float(scale))


def _device_of(module) -> torch.device | None:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def _to_device(d: dist.Distribution, device: torch.device | None, site: str) -> dist.Distribution:
    """``d`` with its parameter tensors on ``device`` (priors are usually written with CPU floats)."""
    tensors = [v for v in vars(d).values() if isinstance(v, torch.Tensor)]
    if device is None or all(v.device == device for v in tensors):
        if not isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
            return d
    if isinstance(d, dist.Independent):
        return dist.Independent(_to_device(d.base_dist, device, site), d.reinterpreted_batch_ndims)
    if isinstance(d, dist.ExpandedDistribution):
        return _to_device(d.base_dist, device, site).expand(d.batch_shape)
    names = [k for k in d.arg_constraints if isinstance(vars(d).get(k), torch.Tensor)]
    try:
        return type(d)(**{k: vars(d)[k].to(device) for k in names})
    except Exception as e:  # noqa: BLE001 - any failure means: build it on the device yourself
        raise ValueError(
            f"the prior for {site!r} ({type(d).__name__}) has tensors on {tensors[0].device if tensors else '?'} but "
            f"the model is on {device}, and it could not be moved ({e}). Build it with tensors on {device}, "
            "e.g. dist.Normal(torch.tensor(0., device=dev), 1.)"
        ) from None


class LayerScalePrior:
    """``Normal(0, sigma_l)`` with one scale per site, learned by type-II maximum likelihood.

    ``sigma_l`` is a Pyro param (``"prior_scale.<site>"``, positive) optimized with the ELBO, and a
    ``LogNormal(0, hyper_scale)`` hyperprior on it is added as a penalty (MAP-II on the scale).

    Example::

        model = ScalaBL(net, prior=LayerScalePrior(init=1.0))
    """

    def __init__(self, *, init: float = 1.0, hyper_scale: float = 1.0):
        self.init, self.hyper_scale = float(init), float(hyper_scale)

    @property
    def spec(self) -> dict:
        return {"kind": "LayerScalePrior", "init": self.init, "hyper_scale": self.hyper_scale}

    def __call__(self, site: str, module) -> dist.Distribution:
        sigma = pyro.param(f"prior_scale.{site}", lambda: torch.tensor(self.init, device=_device_of(module)),
                           constraint=constraints.positive)
        pyro.factor(f"prior_scale.{site}.hyper", dist.LogNormal(0.0, self.hyper_scale).log_prob(sigma))
        return dist.Normal(0.0, sigma)


def _as_event(d: dist.Distribution, shape: tuple[int, ...], site: str) -> dist.Distribution:
    if tuple(d.event_shape) == shape:
        return d
    if d.event_shape == () and tuple(d.batch_shape) in ((), shape, (1,)) or (
            d.event_shape == () and len(d.batch_shape) <= len(shape)
            and tuple(d.batch_shape) == shape[len(shape) - len(d.batch_shape):]):
        return d.expand(list(shape)).to_event(len(shape))
    raise ValueError(
        f"prior for {site!r} has batch_shape {tuple(d.batch_shape)} and event_shape {tuple(d.event_shape)}; "
        f"use a scalar distribution or one with event_shape {shape}"
    )


def normalize_prior(prior: PriorSpec, *, default: PriorFn | None = None) -> Callable[..., dist.Distribution]:
    """Turn any accepted prior form into ``fn(site, module, event_shape) -> Distribution``.

    ``event_shape`` is ``(r,)`` for ScalaBL's ``s`` (an int ``r`` is accepted too) and ``(r, in)`` for BLoB's ``A``.

    Example::

        fn = normalize_prior(dist.Normal(0.0, 0.5))
        fn("lora.model.layers.0.self_attn.q_proj.s", module, (8,)).event_shape == (8,)
    """
    default = default or isotropic_normal(1.0)
    fixed = prior is None and getattr(default, "fixed", False)
    if prior is None:
        base = default
    elif isinstance(prior, dist.Distribution):
        fixed = True
        base = lambda site, module: prior  # noqa: E731
    elif isinstance(prior, Mapping):
        bad = [k for k, v in prior.items() if not isinstance(v, dist.Distribution)]
        if bad:
            raise TypeError(f"prior dict values must be Distributions; not for {bad}")
        fixed = getattr(default, "fixed", False)
        base = lambda site, module: prior[site] if site in prior else default(site, module)  # noqa: E731
    elif callable(prior):
        fixed = getattr(prior, "fixed", False)
        base = prior
    else:
        raise TypeError(
            f"prior must be a Distribution, a dict {{site: Distribution}} or a callable (site, module) -> Distribution; "
            f"got {type(prior).__name__}"
        )

    cache: dict = {}

    def fn(site: str, module, event_shape) -> dist.Distribution:
        shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
        device = _device_of(module)
        # expand() freezes the validation flag into the instance: it is part of the key
        key = (site, shape, device, torch.distributions.Distribution._validate_args)
        if key in cache:
            return cache[key]
        d = base(site, module)
        if not isinstance(d, dist.Distribution):
            raise TypeError(f"the prior callable returned {type(d).__name__} for {site!r}, not a Distribution")
        d = _as_event(_to_device(d, device, site), shape, site)
        if fixed:
            cache[key] = d
        return d

    fn.fixed = fixed
    return fn


def _flat(d: dist.Distribution, site: str) -> tuple[type, dict]:
    """``(class, {parameter: tensor of the full event shape})`` of a prior with event shape ``(r,)``/``(r, in)``."""
    base, shape = d, tuple(d.event_shape)
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    names = [k for k in base.arg_constraints if isinstance(vars(base).get(k), torch.Tensor)]
    if not names or tuple(base.event_shape) != ():
        raise ValueError(f"layout='vectorized' cannot stack the prior of {site!r} ({type(d).__name__} over "
                         f"{type(base).__name__}): use a prior made of elementwise distributions with tensor "
                         "parameters (Normal, Laplace, StudentT...), or layout='modules'")
    return type(base), {k: torch.broadcast_to(vars(base)[k], shape) for k in names}


def stack_priors(priors: Mapping[str, dist.Distribution]) -> dist.Distribution:
    """One distribution of batch shape ``(M,)`` and the sites' event shape from ``M`` per-site priors of one family.

    The vectorized layout's prior: ``stack_priors({site: prior})`` evaluates ``log_prob`` of an ``(M, r)`` value
    row by row as the per-site priors would (tests/test_priors.py checks it).

    Example::

        d = stack_priors({"a.s": dist.Normal(torch.zeros(4), 1.).to_event(1), "b.s": dist.Normal(2., 3.).expand([4]).to_event(1)})
        d.batch_shape, d.event_shape  # (2,), (4,)
    """
    flats = {site: _flat(d, site) for site, d in priors.items()}
    kinds = {(cls, tuple(sorted(args))) for cls, args in flats.values()}
    if len(kinds) > 1:
        found = sorted({cls.__name__ for cls, _ in flats.values()})
        raise ValueError(f"layout='vectorized' stacks one prior family for all modules, but the priors are {found}; "
                         "give every module the same family, or use layout='modules'")
    cls, names = next(iter(kinds))
    ndim = next(iter(priors.values())).event_shape.__len__()
    args = {k: torch.stack([flats[site][1][k] for site in priors]) for k in names}
    return cls(**args).to_event(ndim)


# ------------------------------------------------------------------------------------ save and load
_FACTORIES = {"isotropic_normal": isotropic_normal, "laplace_prior": laplace_prior, "student_t_prior": student_t_prior}


def _dist_to_spec(d: dist.Distribution) -> dict:
    if isinstance(d, dist.Independent):
        return {"class": "Independent", "base": _dist_to_spec(d.base_dist),
                "reinterpreted_batch_ndims": d.reinterpreted_batch_ndims}
    if isinstance(d, dist.ExpandedDistribution):
        return {"class": "Expanded", "base": _dist_to_spec(d.base_dist), "batch_shape": list(d.batch_shape)}
    names = [k for k in d.arg_constraints if k in vars(d)]
    if not hasattr(dist, type(d).__name__) or not names:
        raise TypeError(f"cannot record a {type(d).__name__} prior; use a pyro.distributions class")
    args = {}
    for k in names:
        v = vars(d)[k]
        args[k] = v.detach().cpu().tolist() if isinstance(v, torch.Tensor) else float(v)
    return {"class": type(d).__name__, "args": args}


def _dist_from_spec(spec: dict) -> dist.Distribution:
    if spec["class"] == "Independent":
        return dist.Independent(_dist_from_spec(spec["base"]), spec["reinterpreted_batch_ndims"])
    if spec["class"] == "Expanded":
        return _dist_from_spec(spec["base"]).expand(spec["batch_shape"])
    return getattr(dist, spec["class"])(**{k: torch.tensor(v) for k, v in spec["args"].items()})


def prior_to_spec(prior: PriorSpec) -> dict:
    """A JSON-able record of a prior, for :func:`~scalabl_pyro.io.save_run`; :func:`prior_from_spec` rebuilds it.

    Ready-made priors are recorded by name and parameters, Distributions and dicts of them by class and
    parameter values; any other callable as ``{"kind": "callable", "name": ...}`` (pass it again to
    :func:`~scalabl_pyro.io.load_run`).

    Example::

        prior_from_spec(prior_to_spec(laplace_prior(0.5)))  # Laplace(0, 0.5) again
    """
    if prior is None:
        return {"kind": "default"}
    if isinstance(getattr(prior, "spec", None), dict):
        return dict(prior.spec)
    if isinstance(prior, dist.Distribution):
        return {"kind": "distribution", "dist": _dist_to_spec(prior)}
    if isinstance(prior, Mapping):
        return {"kind": "dict", "sites": {k: _dist_to_spec(v) for k, v in prior.items()}}
    return {"kind": "callable", "name": getattr(prior, "__qualname__", type(prior).__qualname__)}


def prior_from_spec(spec: dict, *, prior: PriorSpec = None) -> PriorSpec:
    """Rebuild the prior that :func:`prior_to_spec` recorded (``prior``: the callable of a ``"callable"`` record)."""
    kind = spec.get("kind")
    if kind == "callable":
        if prior is None:
            raise ValueError(f"the run was trained with the custom prior callable {spec.get('name')!r}, which cannot "
                             "be saved; pass it again: load_run(path, prior=...)")
        return prior
    if prior is not None:
        raise ValueError(f"the run records its prior ({kind}); prior= is only for runs with a custom callable prior")
    if kind == "default":
        return None
    if kind in _FACTORIES:
        return _FACTORIES[kind](**{k: v for k, v in spec.items() if k != "kind"})
    if kind == "LayerScalePrior":
        return LayerScalePrior(init=spec["init"], hyper_scale=spec["hyper_scale"])
    if kind == "distribution":
        return _dist_from_spec(spec["dist"])
    if kind == "dict":
        return {k: _dist_from_spec(v) for k, v in spec["sites"].items()}
    raise ValueError(f"unknown prior record {spec!r}; it was written by another version of scalabl_pyro")
