r"""The VAE as a Pyro probabilistic program: a generative ``model`` and a swappable ``guide``.

Generative story, for each image :math:`i = 1, \dots, N`:

.. math::

    z_i &\sim \mathcal{N}(0, I_{d}) \\
    x_i \mid z_i &\sim \prod_{j=1}^{D} \mathrm{Bernoulli}\big(\sigma(f_\theta(z_i)_j)\big)
    \quad\text{or}\quad \prod_{j} \mathcal{N}\big(\mu_\theta(z_i)_j, \sigma_\theta(z_i)_j^2\big)

The guide is a Gaussian :math:`q(z_i) = \mathcal{N}(\mu_i, \mathrm{diag}\,\sigma_i^2)` per image;
*how* :math:`(\mu_i, \sigma_i)` are chosen (an encoder network, free local parameters, ...) is the
guide's business (:mod:`pyro_vae.guides`). ``SVI`` maximises the evidence lower bound

.. math::

    \mathrm{ELBO} = \sum_{i=1}^N \mathbb{E}_{q(z_i)}\big[\log p_\theta(x_i \mid z_i)
    + \log p(z_i) - \log q(z_i)\big] \le \log p_\theta(x_{1:N}).

Both ``model`` and ``guide`` take ``(x, idx, num_data, beta)`` and open the same
``pyro.plate("data", size=num_data, subsample=idx)``: on a minibatch of ``B`` rows the plate
scales every log-density by ``N / B``, so the minibatch ELBO is an unbiased estimate of the
full-data ELBO. ``beta`` weights the latent site (KL annealing) through ``poutine.scale``.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..core.config import VAEConfig
from .guides import make_guide
from .networks import make_decoder
from .plates import data_plate

__all__ = ["VAE", "data_plate"]


class VAE(nn.Module):
    """Decoder (the model's network) plus a guide, with ``model`` and ``guide`` side by side.

    :param VAEConfig config: sizes and likelihood.
    :param guide: a :class:`~pyro_vae.guides.Guide`; by default the one ``config.guide`` names.
    :param int num_data: training images (the mean-field guide holds parameters for each).
    """

    def __init__(self, config: VAEConfig, guide: Optional[nn.Module] = None, num_data: Optional[int] = None):
        super().__init__()
        x_dim = config.x_dim  # numbers per datum, from config.event_shape (fit sets it from the data)
        self.config = config
        self.x_dim = x_dim
        self.decoder = make_decoder(config.likelihood, config.z_dim, config.hidden, x_dim, config.min_scale)
        self.inference = guide if guide is not None else make_guide(config, x_dim, num_data)
        if hasattr(self.inference, "attach"):  # guides that score images with p(x|z) themselves
            self.inference.attach(self.likelihood)

    # ------------------------------------------------------------------ the probabilistic program

    def model(self, x, idx=None, num_data=None, beta=1.0):
        """p(x, z) = p(z) p(x|z), vectorised over the images in ``x [B, D]``."""
        pyro.module("decoder", self.decoder)
        prior_loc = x.new_zeros(x.shape[0], self.config.z_dim)  # [B, z_dim]
        prior_scale = x.new_ones(x.shape[0], self.config.z_dim)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))  # [B, z_dim]
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        """q(z|x): delegated to the swappable guide component."""
        return self.inference(x, idx, num_data, beta)

    # ------------------------------------------------------------------ helpers

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) with event shape ``[D]``, batched over the leading dims of ``z``."""
        if self.config.likelihood == "bernoulli":
            logits = self.decoder(z)  # [..., D]
            # validate_args=False: with --binarize none, grey values in [0, 1] are scored too
            return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
        loc, scale = self.decoder(z)  # [..., D] each
        return dist.Normal(loc, scale).to_event(1)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or means (Normal), ``[..., D]``."""
        return self.likelihood(z).base_dist.mean

    def prior(self, batch: int) -> dist.Distribution:
        p = next(self.parameters())
        zeros = torch.zeros(batch, self.config.z_dim, device=p.device, dtype=p.dtype)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
