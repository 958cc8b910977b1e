r"""Variational families: how each image's Gaussian :math:`q(z_i) = \mathcal{N}(\mu_i, \sigma_i^2)`
gets its parameters. A guide is an ``nn.Module`` called like the model, ``guide(x, idx, num_data,
beta)``; it opens the same ``"data"`` plate and samples the same site ``"z"``. Swapping guides never
touches :meth:`pyro_vae.model.VAE.model`.

- :class:`AmortizedGuide`: :math:`(\mu_i, \sigma_i) = f_\phi(x_i)`, one encoder shared by all images.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .config import VAEConfig
from .model import data_plate
from .networks import Encoder

__all__ = ["Guide", "AmortizedGuide", "make_guide"]


class Guide(nn.Module):
    """Base class: a diagonal Gaussian per image; subclasses implement :meth:`posterior`."""

    z_dim: int

    def posterior(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``[B, z_dim]``, of q(z) for the images ``x`` (rows ``idx``)."""
        raise NotImplementedError

    def register(self) -> None:
        """Declare the guide's parameters to Pyro (``pyro.module``/``pyro.param``)."""

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x, idx=None, num_data=None, beta=1.0):
        self.register()
        loc, scale = self.posterior(x, idx)  # [B, z_dim] each
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", self.distribution(loc, scale))


class AmortizedGuide(Guide):
    r"""Amortized inference: :math:`q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x), \sigma_\phi(x)^2)`.

    One encoder network, shared by all images, maps any image (seen or new) to its posterior
    parameters; the cost is the *amortization gap* between this and the best Gaussian per image.
    """

    def __init__(self, x_dim: int, hidden, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(x_dim, hidden, z_dim)

    def register(self) -> None:
        pyro.module("encoder", self.encoder)

    def posterior(self, x, idx=None):
        return self.encoder(x)


def make_guide(config: VAEConfig, x_dim: int) -> Guide:
    """The guide that ``config.guide`` names."""
    if config.guide == "amortized":
        return AmortizedGuide(x_dim, config.hidden, config.z_dim)
    raise ValueError(f"unknown guide {config.guide!r}")
