r"""The VAE as a Pyro probabilistic program: a generative ``model`` and a swappable ``guide``.

Generative story, for each image :math:`i = 1, \dots, N`:

.. math::

    z_i &\sim \mathcal{N}(0, I_{d}) \\
    x_i \mid z_i &\sim \prod_{j=1}^{784} \mathrm{Bernoulli}\big(\sigma(f_\theta(z_i)_j)\big)
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

from .config import VAEConfig
from .networks import make_decoder

__all__ = ["VAE", "data_plate", "X_DIM"]

X_DIM = 28 * 28


def data_plate(x: torch.Tensor, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None):
    """The plate over images: ``size=num_data`` (default: the batch is all data), ``subsample=idx``.

    ``idx`` are the rows of ``x`` in the full data set; they matter to guides with per-datapoint
    parameters. Without ``idx`` a minibatch still gets the right ``num_data / B`` scale.
    """
    batch = x.shape[0]
    if num_data is None:
        num_data = batch
    if idx is None and num_data != batch:
        idx = torch.arange(batch, device=x.device)
    return pyro.plate("data", size=num_data, subsample=idx, dim=-1)


class VAE(nn.Module):
    """Decoder (the model's network) plus a guide, with ``model`` and ``guide`` side by side.

    :param VAEConfig config: sizes and likelihood.
    :param guide: a :class:`~pyro_vae.guides.Guide`; by default the one ``config.guide`` names.
    :param int num_data: training images (the mean-field guide holds parameters for each).
    """

    def __init__(
        self, config: VAEConfig, guide: Optional[nn.Module] = None, x_dim: int = X_DIM, num_data: Optional[int] = None
    ):
        super().__init__()
        from .guides import make_guide  # guides import data_plate from here

        self.config = config
        self.x_dim = x_dim
        self.decoder = make_decoder(config.likelihood, config.z_dim, config.hidden, x_dim, config.min_scale)
        self.inference = guide if guide is not None else make_guide(config, x_dim, num_data)
        if hasattr(self.inference, "attach"):  # guides that score images with p(x|z) themselves
            self.inference.attach(self.likelihood)

    # ------------------------------------------------------------------ the probabilistic program

    def model(self, x, idx=None, num_data=None, beta=1.0):
        """p(x, z) = p(z) p(x|z), vectorised over the images in ``x [B, 784]``."""
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
        """p(x|z) with event shape ``[784]``, batched over the leading dims of ``z``."""
        if self.config.likelihood == "bernoulli":
            logits = self.decoder(z)  # [..., 784]
            # validate_args=False: with --binarize none, grey values in [0, 1] are scored too
            return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
        loc, scale = self.decoder(z)  # [..., 784] each
        return dist.Normal(loc, scale).to_event(1)

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or means (Normal), ``[..., 784]``."""
        return self.likelihood(z).base_dist.mean

    def prior(self, batch: int) -> dist.Distribution:
        p = next(self.parameters())
        zeros = torch.zeros(batch, self.config.z_dim, device=p.device, dtype=p.dtype)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)
