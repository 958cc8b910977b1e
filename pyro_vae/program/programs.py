"""The probabilistic programs by name (``config.model``): the VAE, Kingma et al.'s M2, and
Burda et al.'s two-stochastic-layer model (``vae2``)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from .m1m2 import M1M2, fit_features
from .m2 import M2
from .model import VAE
from .vae2 import TwoLayerVAE

__all__ = ["PROGRAMS", "build_program", "fit_to_data"]


def _vae(config: VAEConfig, num_data, train_data, encoder, decoder) -> nn.Module:
    return VAE(config, num_data=num_data, encoder=encoder, decoder=decoder)


def _m2(config: VAEConfig, num_data, train_data, encoder, decoder) -> nn.Module:
    if encoder is not None or decoder is not None:
        raise ConfigError("model=m2 uses its built-in networks; your own encoder/decoder go into model=vae")
    program = M1M2 if config.features is not None else M2  # features: M2 on the codes of a VAE run (M1+M2)
    if train_data is None:
        return program(config)
    return program(config, train_data.images, train_data.labels)


def _vae2(config: VAEConfig, num_data, train_data, encoder, decoder) -> nn.Module:
    """Burda et al.'s two-layer model: its own networks and sizes (``z_dim``, ``hidden``, ``arch`` do not apply)."""
    if encoder is not None or decoder is not None:
        raise ConfigError("model=vae2 uses its own networks; your own encoder/decoder go into model=vae")
    if config.likelihood != "bernoulli":
        raise ConfigError(f"model=vae2 has Bernoulli pixels; got likelihood={config.likelihood}")
    return TwoLayerVAE(config.event_shape)


#: ``config.model`` -> ``(config, num_data, train_data, encoder, decoder) -> module``
PROGRAMS: Dict[str, Callable] = {"vae": _vae, "m2": _m2, "vae2": _vae2}


def build_program(config: VAEConfig, num_data: Optional[int] = None, train_data=None,
                  encoder: Optional[nn.Module] = None, decoder: Optional[nn.Module] = None) -> nn.Module:
    """The module with ``model`` and ``guide`` that ``config.model`` names. ``train_data`` (an
    :class:`~pyro_vae.core.data.ImageData`): M2 chooses its labelled images from it (training);
    without it, M2's label buffers wait for ``load_state_dict`` (loading a run)."""
    return PROGRAMS[config.model](config, num_data, train_data, encoder, decoder)


def fit_to_data(config: VAEConfig, train_data) -> VAEConfig:
    """``config`` with the settings the training data decide: for M2 ``num_classes`` (the largest
    label + 1), with a one-line :class:`ConfigError` when there are no labels; for M1+M2 also M1's
    checksum and active units (:func:`~pyro_vae.program.m1m2.fit_features`)."""
    if config.model != "m2":
        return config
    if train_data.labels is None:
        raise ConfigError(f"model=m2 needs labels: {train_data.describe()} has none "
                          "(an IDX labels file, class subfolders, or --labels-file with --data)")
    config = config.replace(num_classes=int(train_data.labels.max()) + 1)
    return config if config.features is None else fit_features(config, train_data)
