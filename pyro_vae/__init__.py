"""pyro-vae: the variational autoencoder as a Pyro probabilistic program.

Python API (the CLI and the notebooks use the same functions)::

    from pyro_vae import VAEConfig, fit, load_dataset, load_run
    run = fit(VAEConfig(epochs=5), out="runs/demo")
    images = run.sample(16)
"""

from .config import VAEConfig
from .datasets import ImageData, load_dataset, read_idx, write_idx
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IDXError,
    PyroVAEError,
    TrainingError,
    TrainingInterrupted,
)
from .estimators import GradientMoments, gradient_moments, gradient_variance, set_estimator
from .evaluate import EvalResult, elbo_terms, evaluate, iwae_bound, load_eval_data, log_importance_weights
from .guides import AmortizedGuide, Guide, make_guide
from .model import VAE, data_plate
from .run import Run, load_run
from .train import elbo_per_image, fit, make_elbo

__version__ = "0.1.0"

__all__ = [
    "VAEConfig",
    "ImageData",
    "load_dataset",
    "read_idx",
    "write_idx",
    "PyroVAEError",
    "ConfigError",
    "DataError",
    "IDXError",
    "CheckpointError",
    "TrainingError",
    "TrainingInterrupted",
    "EvalResult",
    "evaluate",
    "iwae_bound",
    "elbo_terms",
    "log_importance_weights",
    "GradientMoments",
    "gradient_moments",
    "gradient_variance",
    "set_estimator",
    "load_eval_data",
    "Guide",
    "AmortizedGuide",
    "make_guide",
    "VAE",
    "data_plate",
    "Run",
    "load_run",
    "fit",
    "make_elbo",
    "elbo_per_image",
]
