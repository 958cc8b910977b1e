r"""The prior :math:`p(z)` of the model, one ``nn.Module`` per family (``VAEConfig.prior``).

- :class:`NormalPrior`: :math:`\mathcal{N}(0, I)`, no parameters (the default, and every closed-form KL).
- :class:`MixturePrior`: a learned mixture of :math:`K` diagonal Gaussians,
  :math:`p_\psi(z) = \sum_k \pi_k \, \mathcal{N}(z; m_k, \mathrm{diag}\, s_k^2)`.
- :class:`VampPrior` (Tomczak & Welling 2018): the encoder's own posterior averaged over :math:`K`
  learned pseudo-inputs :math:`u_k`,

  .. math::

      p_\lambda(z) = \frac{1}{K} \sum_{k=1}^K q_\phi(z \mid u_k),

  which is what the optimal prior (the aggregate posterior :math:`\frac{1}{N}\sum_i q(z \mid x_i)`)
  would be with :math:`K = N` and :math:`u_k = x_k`.

Each is called as ``prior(batch, guide)`` and returns a distribution with batch shape ``[batch]`` and
event shape ``[z_dim]`` (:meth:`pyro_vae.program.model.VAE.prior`); the model samples ``z`` from it.
The mixtures are ``pyro.distributions.MixtureSameFamily``; their KL against a guide has no closed
form, so ``elbo=meanfield`` needs ``prior=normal`` (:class:`~pyro_vae.core.config.VAEConfig`), and
evaluation and local fits estimate :math:`\mathbb{E}_q[\log q(z) - \log p(z)]` by Monte Carlo.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ..core.config import VAEConfig

__all__ = ["NormalPrior", "MixturePrior", "VampPrior", "make_prior", "PRIOR_FAMILIES"]


class NormalPrior(nn.Module):
    r""":math:`p(z) = \mathcal{N}(0, I_d)`."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim

    def forward(self, batch: int, guide=None, like: torch.Tensor = None) -> dist.Distribution:
        zeros = like.new_zeros(batch, self.z_dim)  # [B, z_dim]
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)


def _mixture(logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, batch: int) -> dist.Distribution:
    """``MixtureSameFamily`` of ``K`` diagonal Gaussians (``loc``, ``scale`` ``[K, z_dim]``), batch ``[batch]``."""
    k, z_dim = loc.shape
    mix = dist.Categorical(logits=logits.expand(batch, k))  # [B] over K
    components = dist.Normal(loc.expand(batch, k, z_dim), scale.expand(batch, k, z_dim)).to_event(1)  # [B, K]
    return dist.MixtureSameFamily(mix, components)


class MixturePrior(nn.Module):
    r"""A learned mixture of :math:`K` Gaussians: weights :math:`\pi = \mathrm{softmax}(\alpha)`,
    means :math:`m_k`, scales :math:`s_k = \mathrm{softplus}(\rho_k)`. The means start spread as
    :math:`\mathcal{N}(0, I)` draws and the scales at 1, so the mixture starts close to the standard prior."""

    def __init__(self, z_dim: int, components: int):
        super().__init__()
        self.z_dim = z_dim
        self.logits = nn.Parameter(torch.zeros(components))  # [K]
        self.loc = nn.Parameter(torch.randn(components, z_dim))  # [K, z_dim]
        self.raw_scale = nn.Parameter(torch.full((components, z_dim), 0.5413))  # softplus(0.5413) = 1

    def forward(self, batch: int, guide=None, like: torch.Tensor = None) -> dist.Distribution:
        return _mixture(self.logits, self.loc, F.softplus(self.raw_scale) + 1e-5, batch)


class VampPrior(nn.Module):
    r"""VampPrior: :math:`p(z) = \frac{1}{K}\sum_k q_\phi(z \mid u_k)` with learned pseudo-inputs
    :math:`u_k = \sigma(r_k) \in (0, 1)^D` and the guide's encoder :math:`q_\phi`.

    The components are the encoder's diagonal Gaussians ``guide.encoder(u_k)``: for the ``iaf``
    guide that is its base Gaussian (scoring a flow's density at a given z would need the flow's
    inverse, one network pass per latent dimension), for ``full-rank`` its diagonal part. The encoder
    is passed at each call, not held, so its parameters are stored once, in the guide."""

    def __init__(self, x_dim: int, z_dim: int, components: int):
        super().__init__()
        self.z_dim = z_dim
        # pseudo-inputs start as faint noise around grey 0.5 (Tomczak & Welling start near the data mean)
        self.raw_inputs = nn.Parameter(0.1 * torch.randn(components, x_dim))  # [K, D]

    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_inputs)  # [K, D]

    def forward(self, batch: int, guide=None, like: torch.Tensor = None) -> dist.Distribution:
        encoder = getattr(guide, "encoder", None)
        if encoder is None:
            raise ValueError("the VampPrior needs a guide with an encoder (q(z|u_k) of the pseudo-inputs)")
        loc, scale = encoder(self.pseudo_inputs())  # [K, z_dim] each
        return _mixture(loc.new_zeros(loc.shape[0]), loc, scale, batch)


#: ``VAEConfig.prior`` -> ``(config, x_dim) -> nn.Module``
PRIOR_FAMILIES = {
    "normal": lambda config, x_dim: NormalPrior(config.z_dim),
    "mog": lambda config, x_dim: MixturePrior(config.z_dim, config.prior_components),
    "vamp": lambda config, x_dim: VampPrior(x_dim, config.z_dim, config.prior_components),
}


def make_prior(config: VAEConfig, x_dim: int) -> nn.Module:
    """The prior module that ``config.prior`` names."""
    return PRIOR_FAMILIES[config.prior](config, x_dim)
