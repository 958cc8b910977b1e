"""pyro-vae: the variational autoencoder as a Pyro probabilistic program.

Python API (the CLI and the notebooks use the same functions)::

    from pyro_vae import VAEConfig, fit, load_dataset, load_run
    run = fit(VAEConfig(epochs=5), out="runs/demo")
    images = run.sample(16)
"""

from .core.config import VAEConfig
from .core.data import ImageData, load_dataset, read_idx, write_idx
from .core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    IDXError,
    PyroVAEError,
    TrainingError,
    TrainingInterrupted,
)
from .experiments.compare import compare_guides
from .experiments.explorer import explore
from .experiments.plots import SaveFigures
from .experiments.runs import compare_runs
from .experiments.variance_lab import GradientMoments, gradient_moments, gradient_variance
from .infer.callbacks import Callback
from .infer.evaluate import EvalResult, elbo_terms, evaluate, iwae_bound, load_eval_data, log_importance_weights
from .infer.objectives import elbo_per_image, make_elbo
from .infer.iwae import DReG_ELBO, IWAE_ELBO
from .infer.run import Run, load_run
from .infer.svi import Trainer, fit
from .infer.tensorboard import TensorBoardWriter
from .program.guides import AmortizedGuide, Guide, make_guide
from .infer.evaluate_m2 import M2EvalResult, evaluate_m2
from .program.m2 import M2
from .program.vae2 import TwoLayerVAE
from .program.model import VAE
from .program.contract import Capabilities, Program, check_program
from .program.files import ProgramFile
from .program.pyro_style import PyroStyleProgram
from .program.plates import data_plate
from .program.sites import set_estimator

__version__ = "0.1.0"

__all__ = [
    "M2",
    "TwoLayerVAE",
    "ProgramFile",
    "PyroStyleProgram",
    "evaluate_m2",
    "M2EvalResult",
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
    "Program",
    "Capabilities",
    "check_program",
    "Run",
    "load_run",
    "fit",
    "make_elbo",
    "IWAE_ELBO",
    "DReG_ELBO",
    "elbo_per_image",
    "Trainer",
    "Callback",
    "SaveFigures",
    "compare_guides",
    "compare_runs",
    "explore",
    "TensorBoardWriter",
]
