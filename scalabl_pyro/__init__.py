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
from .backbones import DEFAULT_BACKBONE, char_tokenizer, load_backbone, tiny_llama
from .config import ScalaBLConfig, TrainConfig
from .data import Example, TaskData, available_datasets, load_task
from .guides import GUIDES, default_guide, init_to_s0, make_guide
from .io import export_peft, load_run, save_run
from .layers import Subspace, add_lora
from .metrics import (
    classification_metrics,
    format_table,
    ood_auroc,
    paired_bootstrap,
    reliability_diagram,
    uncertainty_decomposition,
)
from .model import LoRAModel, ScalaBL, count_parameters
from .predictive import Prediction, predict
from .priors import LayerScalePrior, centered_prior, isotropic_normal, laplace_prior, normalize_prior, student_t_prior
from .scoring import AdaptedLM
from .tasks import country_task
from .train import empty_guide, fit, make_elbo, make_optimizer

__version__ = "0.1.0"

__all__ = [
    "AdaptedLM", "DEFAULT_BACKBONE", "Example", "GUIDES", "LayerScalePrior", "LoRAModel", "Prediction",
    "ScalaBL", "ScalaBLConfig", "Subspace", "TaskData", "TrainConfig", "add_lora", "available_datasets",
    "centered_prior", "char_tokenizer", "classification_metrics", "count_parameters", "country_task", "default_guide",
    "empty_guide", "export_peft", "fit", "format_table", "init_to_s0", "isotropic_normal", "laplace_prior",
    "load_backbone", "load_run", "load_task", "make_elbo", "make_guide", "make_optimizer", "normalize_prior",
    "ood_auroc", "paired_bootstrap", "predict", "reliability_diagram", "save_run", "student_t_prior", "tiny_llama",
    "uncertainty_decomposition",
]
