"""scalabl_pyro: Bayesian LoRA fine-tuning of LLMs in an r-dimensional subspace (ScalaBL) as a Pyro model.

The LLM with LoRA projections is a Pyro model whose only latent sites are the per-layer ``s``
vectors (``A = diag(s) V``); Pyro's autoguides, ``SVI`` and ``Predictive`` do the inference.

Example::

    from pyro.infer import SVI, Trace_ELBO, Predictive
    from scalabl_pyro import AdaptedLM, ScalaBL, default_guide, load_backbone, country_task

    lm, tok = load_backbone("smollm2")
    train = country_task("train")
    net = AdaptedLM(lm, tok, label_words=train.label_words, config=ScalaBLConfig(scoring="choice"))
    model = ScalaBL(net, num_data=len(train))
    guide = default_guide(model)
"""
from .backbones import DEFAULT_BACKBONE, char_tokenizer, load_backbone, random_llm, tiny_llama
from .baselines import apply_temperature, calibrate, fit_temperature
from .config import ScalaBLConfig, TrainConfig
from .checkpoint import CheckpointMismatchError
from .convergence import ConvergenceWarning, HeldoutCurve
from .guides import GUIDES, check_fresh_guide, default_guide, guide_spec, init_to_s0, laplace_posterior, make_guide
from .io import RunExistsError, export_peft, load_run, save_run
from .layers import SITE_PREFIX, Subspace, add_lora, site_name
from .metrics import (
    classification_metrics,
    confidence_auroc,
    format_table,
    heldout_curves_plot,
    ood_auroc,
    paired_bootstrap,
    reliability_diagram,
    reliability_panels,
    uncertainty_decomposition,
)
from .model import LAYOUTS, MODULES_PLATE, LoRAModel, ParamStoreConflictError, ScalaBL, count_parameters, register_adapters
from .optim import DeviceTrace_ELBO, FusedAdamW, FusedPyroOptim, autonormal_elbo_loss, autonormal_path_applies, elbo_loss
from .posterior import adapter_norms, plot_posterior_scales, posterior_scales
from .predictive import Prediction, point_guide, predict
from .priors import (LayerScalePrior, centered_prior, isotropic_normal, laplace_prior, normalize_prior, prior_from_spec,
                     prior_to_spec, stack_priors, student_t_prior)
from .scoring import AdaptedLM
from .train import FitResult, empty_guide, fit, make_elbo, make_optimizer
from .trunk import last_layers
from .harness.data import Example, TaskData, available_datasets, load_task
from .harness.tasks import country_task
from .harness.userdata import load_user_task, task_from_records

__version__ = "0.2.0"

__all__ = [
    "AdaptedLM", "CheckpointMismatchError", "ConvergenceWarning", "DEFAULT_BACKBONE", "Example", "FitResult", "GUIDES", "HeldoutCurve",
    "DeviceTrace_ELBO", "FusedAdamW", "FusedPyroOptim", "LAYOUTS", "LayerScalePrior", "MODULES_PLATE",
    "LoRAModel", "ParamStoreConflictError", "Prediction", "RunExistsError", "SITE_PREFIX", "ScalaBL", "ScalaBLConfig",
    "Subspace", "TaskData", "TrainConfig", "adapter_norms", "add_lora", "apply_temperature", "available_datasets", "calibrate",
    "centered_prior", "char_tokenizer", "check_fresh_guide", "classification_metrics", "confidence_auroc", "count_parameters",
    "autonormal_elbo_loss", "autonormal_path_applies", "country_task", "default_guide", "elbo_loss", "empty_guide", "export_peft", "fit", "fit_temperature", "format_table",
    "guide_spec", "heldout_curves_plot", "init_to_s0", "isotropic_normal", "laplace_posterior", "laplace_prior", "last_layers", "load_backbone", "load_run",
    "load_task", "load_user_task", "make_elbo", "make_guide", "make_optimizer", "normalize_prior", "ood_auroc", "random_llm",
    "paired_bootstrap", "plot_posterior_scales", "point_guide", "posterior_scales", "predict", "prior_from_spec", "prior_to_spec", "register_adapters", "reliability_diagram", "reliability_panels",
    "save_run", "site_name", "stack_priors", "student_t_prior", "task_from_records", "tiny_llama", "uncertainty_decomposition",
]
