"""The two neural networks of a VAE. They return distribution *parameters* and never sample:
sampling belongs to the Pyro ``model`` and ``guide``.

Two built-in architectures (``VAEConfig.arch``): ``mlp`` (fully connected, softplus) and ``conv``
(strided convolutions down, transposed convolutions up, sizes derived from the image shape). Both
take and return flat data, ``[B, D]``: a convolutional network reshapes with ``event_shape``
itself, so likelihoods, the fused loss and evaluation never see the difference.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["mlp", "Encoder", "BernoulliDecoder", "NormalDecoder", "ConvEncoder", "ConvDecoder", "conv_sizes",
           "make_encoder", "make_decoder", "ENCODERS", "DECODERS"]


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


# ----------------------------------------------------------------------------- convolutional

CONV_CHANNELS = (32, 64, 128, 256)  # channels after each stride-2 convolution
CONV_STOP = 8  # halve the image while its smaller side is larger than this (at least once)


def conv_sizes(height: int, width: int) -> List[Tuple[int, int]]:
    """Image sizes down the convolutional path: ``(H, W)``, then each side halved (rounded down, as a
    4x4 convolution with stride 2 and padding 1 does) while the smaller side exceeds
    :data:`CONV_STOP`, at least once and at most ``len(CONV_CHANNELS)`` times. 28x28: 28, 14, 7;
    32x32: 32, 16, 8; 64x64: 64, 32, 16, 8."""
    sizes = [(height, width)]
    while len(sizes) <= len(CONV_CHANNELS) and (len(sizes) == 1 or min(sizes[-1]) > CONV_STOP):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


class ConvEncoder(nn.Module):
    """Convolutional inference network: ``x [B, D]`` (reshaped to ``event_shape`` ``[C, H, W]``) ->
    4x4 stride-2 convolutions with ReLU (32, 64, ... channels) -> a linear layer ->
    ``(loc [B, z_dim], scale [B, z_dim])``."""

    def __init__(self, event_shape: Sequence[int], z_dim: int):
        super().__init__()
        self.event_shape = tuple(event_shape)
        sizes = conv_sizes(*self.event_shape[1:])
        channels = [self.event_shape[0], *CONV_CHANNELS[: len(sizes) - 1]]
        layers = []
        for a, b in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1] * math.prod(sizes[-1]), 2 * z_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x.reshape(-1, *self.event_shape)).flatten(1)  # [B, C' * H' * W']
        loc, raw_scale = self.head(h).chunk(2, dim=-1)  # [B, z_dim] each
        return loc, F.softplus(raw_scale) + 1e-5


class ConvDecoder(nn.Module):
    """Convolutional generative network, the encoder mirrored: ``z [..., z_dim]`` -> a linear layer
    with ReLU -> 4x4 stride-2 transposed convolutions (``output_padding`` restores odd sizes
    exactly) -> ``outputs`` maps of the image's shape, each returned flat, ``[..., D]``:
    Bernoulli logits (``outputs=1``) or a Normal's ``(mu, sigma)`` (``outputs=2``, squashed as
    :class:`NormalDecoder` does)."""

    def __init__(self, z_dim: int, event_shape: Sequence[int], outputs: int = 1, min_scale: float = 1e-2):
        super().__init__()
        self.event_shape, self.outputs, self.min_scale = tuple(event_shape), outputs, min_scale
        sizes = conv_sizes(*self.event_shape[1:])
        channels = [*CONV_CHANNELS[: len(sizes) - 1]][::-1] + [self.event_shape[0] * outputs]
        self.start = (channels[0], *sizes[-1])  # [C', H', W'] the transposed convolutions start from
        self.fc = nn.Linear(z_dim, math.prod(self.start))
        layers = []
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            (h, w), (big_h, big_w) = sizes[-1 - i], sizes[-2 - i]
            layers.append(nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, output_padding=(big_h - 2 * h, big_w - 2 * w)))
            if i < len(channels) - 2:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor):
        lead = z.shape[:-1]
        h = F.relu(self.fc(z.reshape(-1, z.shape[-1]))).view(-1, *self.start)
        out = self.body(h)  # [N, C * outputs, H, W]
        if self.outputs == 1:
            return out.reshape(*lead, -1)
        raw_loc, raw_scale = out.chunk(2, dim=1)  # [N, C, H, W] each
        return (torch.sigmoid(raw_loc).reshape(*lead, -1),
                (F.softplus(raw_scale) + self.min_scale).reshape(*lead, -1))


# ----------------------------------------------------------------------------- by name


def _mlp_encoder(config) -> nn.Module:
    return Encoder(config.x_dim, config.hidden, config.z_dim)


def _conv_encoder(config) -> nn.Module:
    return ConvEncoder(config.event_shape, config.z_dim)


def _mlp_decoder(config, outputs: int) -> nn.Module:
    if outputs == 1:
        return BernoulliDecoder(config.z_dim, config.hidden, config.x_dim)
    return NormalDecoder(config.z_dim, config.hidden, config.x_dim, config.min_scale)


def _conv_decoder(config, outputs: int) -> nn.Module:
    return ConvDecoder(config.z_dim, config.event_shape, outputs, config.min_scale)


#: ``config.arch`` -> the built-in encoder (``config -> module``)
ENCODERS: Dict[str, Callable] = {"mlp": _mlp_encoder, "conv": _conv_encoder}
#: ``config.arch`` -> the built-in decoder (``(config, outputs) -> module``; outputs: 1 logits, 2 (mu, sigma))
DECODERS: Dict[str, Callable] = {"mlp": _mlp_decoder, "conv": _conv_decoder}


def make_encoder(config) -> nn.Module:
    """The built-in encoder ``config.arch`` names, for data of ``config.event_shape``."""
    return ENCODERS[config.arch](config)


def make_decoder(config, outputs: int) -> nn.Module:
    """The built-in decoder ``config.arch`` names, returning ``outputs`` tensors ``[..., D]``."""
    return DECODERS[config.arch](config, outputs)
