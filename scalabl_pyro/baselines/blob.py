"""BLoB (Wang et al., NeurIPS 2024) as a Pyro model: a mean-field Gaussian over the full LoRA ``A`` of every
adapted module (latent sites ``lora.<module>.A``), ``B`` a learned projection; ScalaBL's model with ``A`` in place
of ``s`` (:class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace="A"``).

Example::

    net = AdaptedLM(lm, tok, label_words="ABCD", config=ScalaBLConfig(scoring="choice"), subspace="A")
    model = BLoB(net, num_data=len(train))
    guide = make_guide(model, "normal")
"""
from __future__ import annotations

from ..model import ScalaBL
from ..scoring import AdaptedLM

__all__ = ["BLoB"]


class BLoB(ScalaBL):
    """BLoB as a Pyro model: latent ``<module>.A`` (event shape ``(r, in)``), ``B`` a learned projection.

    :param net: an :class:`~scalabl_pyro.scoring.AdaptedLM` built with ``subspace="A"``.
    :param prior: as :class:`~scalabl_pyro.model.ScalaBL`'s; the default is ``Normal(0, net.config.prior_scale)``
        on every entry of ``A`` (BLoB's own).
    """

    default_prior_loc = "zero"

    def __init__(self, net: AdaptedLM, *, prior=None, num_data=None, name: str = "blob", kl_weight: float = 1.0,
                 layout: str = "modules"):
        if net.subspace is None or net.subspace.latent != "A":
            raise ValueError("BLoB needs an AdaptedLM built with subspace='A'")
        super().__init__(net, prior=prior, num_data=num_data, name=name, kl_weight=kl_weight, layout=layout)
