"""The probabilistic programs by name (``config.model``): the VAE, and Kingma et al.'s M2."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from .m2 import M2
from .model import VAE

__all__ = ["PROGRAMS", "build_program", "fit_to_data"]


def _vae(config: VAEConfig, num_data, train_data, encoder, decoder) -> nn.Module:
    return VAE(config, num_data=num_data, encoder=encoder, decoder=decoder)


def _m2(config: VAEConfig, num_data, train_data, encoder, decoder) -> nn.Module:
    if encoder is not None or decoder is not None:
        raise ConfigError("model=m2 uses its built-in networks; your own encoder/decoder go into model=vae")
    if train_data is None:
        return M2(config)
    return M2(config, train_data.images, train_data.labels)


#: ``config.model`` -> ``(config, num_data, train_data, encoder, decoder) -> module``
PROGRAMS: Dict[str, Callable] = {"vae": _vae, "m2": _m2}


def build_program(config: VAEConfig, num_data: Optional[int] = None, train_data=None,
                  encoder: Optional[nn.Module] = None, decoder: Optional[nn.Module] = None) -> nn.Module:
    """The module with ``model`` and ``guide`` that ``config.model`` names. ``train_data`` (an
    :class:`~pyro_vae.core.data.ImageData`): M2 chooses its labelled images from it (training);
    without it, M2's label buffers wait for ``load_state_dict`` (loading a run)."""
    return PROGRAMS[config.model](config, num_data, train_data, encoder, decoder)


def fit_to_data(config: VAEConfig, train_data) -> VAEConfig:
    """``config`` with the settings the training data decide: for M2 ``num_classes`` (the largest
    label + 1), with a one-line :class:`ConfigError` when there are no labels."""
    if config.model != "m2":
        return config
    if train_data.labels is None:
        raise ConfigError(f"model=m2 needs labels: {train_data.describe()} has none "
                          "(an IDX labels file, class subfolders, or --labels-file with --data)")
    return config.replace(num_classes=int(train_data.labels.max()) + 1)
