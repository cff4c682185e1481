"""The methods ScalaBL is compared with, each on the library core only (never on the harness).

* :mod:`~scalabl_pyro.baselines.temperature`: temperature scaling of any method's predictions
  (:func:`fit_temperature`, :func:`apply_temperature`, :func:`calibrate`, :class:`TemperatureScaled`);
* :mod:`~scalabl_pyro.baselines.blob`: BLoB, a Gaussian over the full LoRA ``A`` (:class:`BLoB`);
* :mod:`~scalabl_pyro.baselines.laplace`: a Laplace posterior on ``s`` around its MAP (:func:`laplace_guide`);
* :mod:`~scalabl_pyro.baselines.mcdropout`: MC dropout on the adapters (:func:`predict_mc_dropout`);
* :mod:`~scalabl_pyro.baselines.polar`: PoLAR-VBLL, orthogonal adapters under a Bayesian last layer;
* :mod:`~scalabl_pyro.baselines.bayesadapt`: the official code's training recipe (:func:`fit_bayesadapt_recipe`).

Example::

    from scalabl_pyro.baselines import calibrate
    cal = calibrate(val_prediction, test_prediction)   # a Prediction: cal.metrics(), cal.temperature
"""
from .bayesadapt import fit_bayesadapt_recipe
from .blob import BLoB
from .laplace import laplace_guide
from .mcdropout import predict_mc_dropout
from .temperature import TemperatureScaled, apply_temperature, calibrate, check_temperature, fit_temperature

__all__ = ["BLoB", "TemperatureScaled", "apply_temperature", "calibrate", "check_temperature", "fit_bayesadapt_recipe",
           "fit_temperature", "laplace_guide", "predict_mc_dropout"]
