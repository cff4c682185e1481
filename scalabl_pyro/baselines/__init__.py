"""Post-hoc baselines that work on any method's predictions (they use only the core modules).

* :mod:`~scalabl_pyro.baselines.temperature`: temperature scaling (:func:`fit_temperature`,
  :func:`apply_temperature`, :func:`calibrate`, :class:`TemperatureScaled`).

Example::

    from scalabl_pyro.baselines import calibrate
    cal = calibrate(val_prediction, test_prediction)   # a Prediction: cal.metrics(), cal.temperature
"""
from .temperature import TemperatureScaled, apply_temperature, calibrate, check_temperature, fit_temperature

__all__ = ["TemperatureScaled", "apply_temperature", "calibrate", "check_temperature", "fit_temperature"]
