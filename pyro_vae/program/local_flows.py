r"""A flow per image, nothing shared: the family of :math:`q^\star_{\text{flow}}` in Cremer, Li &
Duvenaud (2018)'s gap decomposition (fitted by :func:`pyro_vae.infer.local.fit_local_flow`).

Image :math:`i` has its own base Gaussian :math:`\mathcal{N}(\mu_i, \sigma_i^2)` and its own
inverse autoregressive flow: ``flow_steps`` Pyro
:class:`~pyro.distributions.transforms.AffineAutoregressive` transforms whose autoregressive network
(:class:`PerImageMADE`) has separate weights for every image, with the order of the dimensions
reversed between steps. All :math:`B` images are computed together: one batched, masked matrix
product per layer (``torch.einsum``), the MADE masks from Pyro's
:func:`pyro.nn.auto_reg_nn.create_mask`.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive, Permute
from pyro.nn.auto_reg_nn import create_mask
from torch import nn
from torch.nn import functional as F

from .guides import Guide, _softplus_inverse, encode_with_context

__all__ = ["PerImageMADE", "LocalFlowGuide"]


class PerImageMADE(nn.Module):
    r"""A one-hidden-layer MADE (Germain et al. 2015) per image: for ``x [..., B, d]``,

    .. math::

        h_b = \mathrm{relu}\big((W^1_b \odot M^1)\, x_b + c^1_b\big), \qquad
        (m_b, \log s_b) = (W^2_b \odot M^2)\, h_b + c^2_b,

    so output :math:`j` depends on :math:`x_{<j}` only. The output layer starts at zero: each flow
    step starts as the identity. Called by Pyro's ``AffineAutoregressive`` as its ``autoregressive_nn``."""

    def __init__(self, num_images: int, z_dim: int, hidden: Optional[int] = None, masks=None):
        super().__init__()
        hidden = hidden or 10 * z_dim  # the iaf guide's width (Pyro's default for a conditional MADE)
        self.permutation = torch.arange(z_dim)  # the identity order (AffineAutoregressive's inverse reads it)
        if masks is None:
            masks, _ = create_mask(z_dim, 0, [hidden], self.permutation, 2)  # [H, d], [2d, H]
        self.register_buffer("mask_in", masks[0])
        self.register_buffer("mask_out", masks[1])
        self.w_in = nn.Parameter(torch.randn(num_images, hidden, z_dim) / z_dim ** 0.5)  # [B, H, d]
        self.b_in = nn.Parameter(torch.zeros(num_images, hidden))  # [B, H]
        self.w_out = nn.Parameter(torch.zeros(num_images, 2 * z_dim, hidden))  # [B, 2d, H]
        self.b_out = nn.Parameter(torch.zeros(num_images, 2 * z_dim))  # [B, 2d]

    @classmethod
    @torch.no_grad()
    def from_conditional(cls, arn, context: torch.Tensor) -> "PerImageMADE":
        r"""The per-image networks that Pyro's one-hidden-layer ``ConditionalAutoRegressiveNN`` ``arn``
        is for the contexts ``h_i`` (``context [B, C]``): its first layer reads ``[h, x]``, so
        :math:`W^1 [h_i, x] + c^1 = W^1_x x + (W^1_h h_i + c^1)`: the same weights for every image,
        the context folded into each image's bias."""
        first, last = arn.layers[0], arn.layers[-1]
        if len(arn.layers) != 2 or arn.skip_layer is not None:
            raise ValueError("a per-image copy needs a one-hidden-layer MADE without skip connections")
        c = context.shape[-1]
        w_first = first.weight * first.mask  # [H, C + d]
        made = cls(len(context), arn.input_dim, first.out_features, masks=(first.mask[:, c:], last.mask))
        made.w_in.copy_(w_first[:, c:].expand_as(made.w_in))
        made.b_in.copy_(context @ w_first[:, :c].T + first.bias)  # [B, H]
        made.w_out.copy_((last.weight * last.mask).expand_as(made.w_out))
        made.b_out.copy_(last.bias.expand_as(made.b_out))
        return made

    def get_permutation(self) -> torch.Tensor:
        return self.permutation

    def forward(self, x: torch.Tensor, rows=slice(None)):
        """``(mean, log_scale)`` for ``x [..., B, d]`` of the images ``rows`` (default: all)."""
        w_in, w_out = self.w_in[rows] * self.mask_in, self.w_out[rows] * self.mask_out
        h = F.relu(torch.einsum("...bi,bhi->...bh", x, w_in) + self.b_in[rows])  # [..., B, H]
        out = torch.einsum("...bh,boh->...bo", h, w_out) + self.b_out[rows]  # [..., B, 2d]
        mean, log_scale = out.unflatten(-1, (2, x.shape[-1])).unbind(-2)  # [..., B, d] each
        return mean, log_scale


class LocalFlowGuide(Guide):
    r"""Free per-image parameters of :math:`q_i(z) = T_{i}(\mathcal{N}(\mu_i, \sigma_i^2))` for a
    fixed set of ``num_images`` images (no encoder: ``q(x, idx)`` is the q of rows ``idx`` of those
    images, ``idx=None`` all of them). Starts at ``loc``, ``scale`` with identity flows."""

    amortized = False
    diagonal = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, flow_steps: int = 2, hidden: Optional[int] = None):
        super().__init__()
        num_images, z_dim = loc.shape
        self.z_dim = z_dim
        self.loc = nn.Parameter(loc.detach().clone())  # [B, z_dim]
        # [B, z_dim], so that softplus(raw_scale) + 1e-5 == scale
        self.raw_scale = nn.Parameter(_softplus_inverse((scale.detach() - 1e-5).clamp_min(1e-6)))
        self.nets = nn.ModuleList(PerImageMADE(num_images, z_dim, hidden) for _ in range(flow_steps))
        self.register_buffer("reverse", torch.arange(z_dim - 1, -1, -1), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_guide(cls, guide, x: torch.Tensor) -> "LocalFlowGuide":
        """A copy, per image of ``x``, of an :class:`~pyro_vae.program.guides.IAFGuide`'s q(z|x):
        its base Gaussian and its flows (the context folded in); fitting then starts at the guide's own q."""
        loc, scale, h = encode_with_context(guide.encoder, x)
        local = cls(loc, scale, flow_steps=len(guide.flows))
        local.nets = nn.ModuleList(PerImageMADE.from_conditional(flow.nn, h) for flow in guide.flows)
        return local

    def register(self) -> None:
        pyro.module("local_flow", self)

    def q(self, x=None, idx=None) -> dist.Distribution:
        rows = slice(None) if idx is None else idx
        base = dist.Normal(self.loc[rows], F.softplus(self.raw_scale[rows]) + 1e-5).to_event(1)
        transforms = []
        for t, net in enumerate(self.nets):
            if t > 0:
                transforms.append(Permute(self.reverse))
            rows_net = partial(net, rows=rows)  # these images' networks (as Pyro's conditional transforms do)
            rows_net.permutation, rows_net.get_permutation = net.permutation, net.get_permutation
            transforms.append(AffineAutoregressive(rows_net))
        return dist.TransformedDistribution(base, transforms)
