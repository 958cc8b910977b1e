"""The two neural networks of a VAE. They return distribution *parameters* and never sample:
sampling belongs to the Pyro ``model`` and ``guide``.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["mlp", "Encoder", "BernoulliDecoder", "NormalDecoder", "make_decoder"]


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given widths with softplus between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Softplus())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Inference network: ``x [B, D] -> (loc [B, z_dim], scale [B, z_dim])`` of q(z|x)."""

    def __init__(self, x_dim: int, hidden: Sequence[int], z_dim: int):
        super().__init__()
        self.body = mlp([x_dim, *hidden])
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = F.softplus(self.body(x))  # [B, H]
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # [B, z_dim] each
        return loc, F.softplus(raw_scale) + 1e-5


class BernoulliDecoder(nn.Module):
    """Generative network for binary pixels: ``z [..., z_dim] -> logits [..., D]``.

    Logits, not probabilities: ``Bernoulli(logits=...)`` scores pixels with a stable
    log-sigmoid, so a confident wrong pixel costs a large finite number of nats, never ``inf``.
    """

    def __init__(self, z_dim: int, hidden: Sequence[int], x_dim: int):
        super().__init__()
        self.net = mlp([z_dim, *reversed(hidden), x_dim])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class NormalDecoder(nn.Module):
    """Generative network ``z -> (mu(z), sigma(z))`` of a per-pixel Normal(mu, sigma^2).

    ``mu`` is squashed into (0, 1) like the pixels; ``sigma >= min_scale`` keeps the density
    bounded (with sigma -> 0 the log-likelihood of a perfect reconstruction tends to +inf).
    """

    def __init__(self, z_dim: int, hidden: Sequence[int], x_dim: int, min_scale: float = 1e-2):
        super().__init__()
        self.body = mlp([z_dim, *reversed(hidden)])
        self.head = nn.Linear(hidden[0], 2 * x_dim)
        self.min_scale = min_scale

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = F.softplus(self.body(z))
        raw_loc, raw_scale = self.head(h).chunk(2, dim=-1)  # [..., D] each
        return torch.sigmoid(raw_loc), F.softplus(raw_scale) + self.min_scale


def make_decoder(likelihood: str, z_dim: int, hidden: Sequence[int], x_dim: int, min_scale: float):
    if likelihood == "bernoulli":
        return BernoulliDecoder(z_dim, hidden, x_dim)
    if likelihood == "normal":
        return NormalDecoder(z_dim, hidden, x_dim, min_scale)
    raise ValueError(f"unknown likelihood {likelihood!r}")
