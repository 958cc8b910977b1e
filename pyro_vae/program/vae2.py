r"""Burda, Grosse & Salakhutdinov's (2016) two-stochastic-layer model, ``--model vae2``: the
first program written on the program contract alone (plain ``torch`` networks, ``pyro.sample``
statements and the package's ``data`` plate; nothing of :mod:`pyro_vae.infer`).

Generative story, for each image :math:`i` (their appendix: 50 and 100 latent units, tanh layers):

.. math::

    z_{2,i} &\sim \mathcal{N}(0, I_{50}) \\
    z_{1,i} \mid z_{2,i} &\sim \mathcal{N}\big(\mu_\theta(z_{2,i}), \mathrm{diag}\,\sigma_\theta^2(z_{2,i})\big)
    && \text{(two tanh layers of 100)} \\
    x_i \mid z_{1,i} &\sim \prod_{j=1}^{D} \mathrm{Bernoulli}\big(\mathrm{sigmoid}(f_\theta(z_{1,i})_j)\big)
    && \text{(two tanh layers of 200)}

and the guide mirrors it, bottom-up:

.. math::

    q_\phi(z_{1,i}, z_{2,i} \mid x_i) = \mathcal{N}\big(z_{1,i};\ \mu_\phi(x_i), \mathrm{diag}\,\sigma_\phi^2(x_i)\big)
    \ \mathcal{N}\big(z_{2,i};\ \mu_\phi(z_{1,i}), \mathrm{diag}\,\sigma_\phi^2(z_{1,i})\big)

(two tanh layers of 200 for :math:`q(z_1 \mid x)`, of 100 for :math:`q(z_2 \mid z_1)`). Its ELBO,

.. math::

    \mathcal{L}(x_i) = \mathbb{E}_{q}\big[\log p_\theta(x_i \mid z_1) + \log p_\theta(z_1 \mid z_2)
    + \log p(z_2) - \log q_\phi(z_1 \mid x_i) - \log q_\phi(z_2 \mid z_1)\big] \le \log p_\theta(x_i),

has no closed-form KL (:math:`p(z_1 \mid z_2)` depends on a sample), so it is trained on Pyro's
traced path. ``model`` and ``guide`` take ``(x, idx, num_data, beta)`` and open the one ``data``
plate; ``beta`` (KL warm-up) weights both latent sites in both, through ``poutine.scale``.
The networks return distribution parameters and never sample.
"""

from __future__ import annotations

import math
from typing import Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from .contract import Program
from .plates import data_plate

__all__ = ["TwoLayerVAE", "GaussianLayer", "tanh_mlp"]


def tanh_mlp(sizes) -> nn.Sequential:
    """Linear layers of the widths ``sizes`` with a tanh after each (Burda et al.'s hidden layers)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers)


class GaussianLayer(nn.Module):
    """``h [..., n_in] -> (loc, scale)`` of a diagonal Gaussian, each ``[..., n_out]``: two tanh
    layers of ``hidden``, then a linear head; ``scale = softplus(.) + 1e-5 > 0``."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.body = tanh_mlp([n_in, hidden, hidden])
        self.head = nn.Linear(hidden, 2 * n_out)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.head(self.body(h)).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-5


class TwoLayerVAE(Program):
    """The two-stochastic-layer VAE (module docstring): ``model`` p(z2) p(z1|z2) p(x|z1) and
    ``guide`` q(z1|x) q(z2|z1), side by side. A :class:`~pyro_vae.program.contract.Program` with
    the default capabilities (Pyro's traced path; ``sample`` and ``reconstruct`` from traces).

    :param event_shape: the shape of one image (``(1, 28, 28)`` for MNIST); its pixels are Bernoulli.
    :param int z1_dim, z2_dim: the latent layers (Burda et al.: 100 and 50).
    :param int hidden1, hidden2: widths of the tanh layers next to x (200) and between z1 and z2 (100).
    """

    latent_sites = ("z1", "z2")

    def __init__(self, event_shape=(1, 28, 28), z1_dim: int = 100, z2_dim: int = 50, hidden1: int = 200,
                 hidden2: int = 100):
        super().__init__()
        self.event_shape = tuple(int(d) for d in event_shape)
        x_dim = math.prod(self.event_shape)
        self.z2_dim = z2_dim
        self.p_x = nn.Sequential(tanh_mlp([z1_dim, hidden1, hidden1]), nn.Linear(hidden1, x_dim))  # logits
        self.p_z1 = GaussianLayer(z2_dim, hidden2, z1_dim)
        self.q_z1 = GaussianLayer(x_dim, hidden1, z1_dim)
        self.q_z2 = GaussianLayer(z1_dim, hidden2, z2_dim)

    def model(self, x, idx=None, num_data=None, beta=1.0):
        """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1) for the images ``x [B, D]``."""
        pyro.module("p_x", self.p_x)
        pyro.module("p_z1", self.p_z1)
        zeros = x.new_zeros(x.shape[0], self.z2_dim)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z2 = pyro.sample("z2", dist.Normal(zeros, 1.0).to_event(1))  # [B, 50] (or [K, B, 50])
                z1 = pyro.sample("z1", dist.Normal(*self.p_z1(z2)).to_event(1))  # [..., B, 100]
            pyro.sample("x", dist.Bernoulli(logits=self.p_x(z1)).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        """q(z1, z2 | x) = q(z1|x) q(z2|z1)."""
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z1 = pyro.sample("z1", dist.Normal(*self.q_z1(x)).to_event(1))
                pyro.sample("z2", dist.Normal(*self.q_z2(z1)).to_event(1))
