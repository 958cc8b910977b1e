r"""The likelihoods :math:`p_\theta(x \mid z)` a decoder can parameterize, by name.

Each entry of :data:`LIKELIHOOD_FAMILIES` says how many tensors the decoder returns (each
``[..., D]``) and how they become a distribution with event shape ``[D]``:

- ``bernoulli``: logits; one Bernoulli per number (binary pixels);
- ``continuous-bernoulli``: logits; one continuous Bernoulli per number (Loaiza-Ganem &
  Cunningham 2019), the normalized density on :math:`[0, 1]`,
  :math:`p(x \mid \lambda) = C(\lambda)\, \lambda^x (1 - \lambda)^{1 - x}`, for grey values, where a
  Bernoulli on grey values is not a likelihood;
- ``normal``: ``(loc, scale)``; one Normal per number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict

import pyro.distributions as dist
import torch

__all__ = ["LikelihoodFamily", "LIKELIHOOD_FAMILIES", "ContinuousBernoulli", "continuous_bernoulli_log_norm"]

TAYLOR_BELOW = 1e-2  # |logit| under which log C(lambda) uses its Taylor series (0/0 in closed form at 0)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\log C(\lambda)` of the continuous Bernoulli from its logits :math:`l`, stable for any
    :math:`l`: with :math:`\lambda = \sigma(l)`,
    :math:`C = \frac{\log(1 - \lambda) - \log \lambda}{1 - 2\lambda} = \frac{l}{\tanh(l / 2)}`;
    near :math:`l = 0`, :math:`\log 2 + l^2/12 - 7 l^4/1440`. (torch computes it from
    :math:`\lambda`, which rounds to 1 in float32 for :math:`l \gtrsim 17`: an infinite density.)"""
    small = logits.abs() < TAYLOR_BELOW
    safe = torch.where(small, torch.ones_like(logits), logits)  # no 0/0 in the branch not taken (NaN gradients)
    closed = torch.log(safe / torch.tanh(safe / 2))
    l2 = logits * logits
    taylor = math.log(2.0) + l2 / 12 - 7 * l2 * l2 / 1440
    return torch.where(small, taylor, closed)


class ContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's ``ContinuousBernoulli`` with the normalizing constant computed from the logits
    (:func:`continuous_bernoulli_log_norm`): the same density, finite for saturated logits."""

    def _cont_bern_log_norm(self):
        if "logits" in self.__dict__:
            return continuous_bernoulli_log_norm(self.logits)
        return super()._cont_bern_log_norm()

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`\mathbb{E}[x] = \frac{1}{2} + \frac{1}{2 \tanh(l/2)} - \frac{1}{l}`
        (near 0: :math:`\frac{1}{2} + \frac{l}{12} - \frac{l^3}{720}`), from the logits."""
        if "logits" not in self.__dict__:
            return super().mean
        logits = self.logits
        small = logits.abs() < 0.1
        safe = torch.where(small, torch.ones_like(logits), logits)
        closed = 0.5 + 0.5 / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + logits / 12 - logits.pow(3) / 720, closed)


@dataclass(frozen=True)
class LikelihoodFamily:
    outputs: int  # tensors the decoder returns, each [..., D]
    make: Callable  # decoder outputs -> p(x|z), event shape [D]
    names: str  # what the decoder returns, for error messages


def _bernoulli(logits):
    # validate_args=False: with --binarize none, grey values in [0, 1] are scored too
    return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


def _continuous_bernoulli(logits):
    return ContinuousBernoulli(logits=logits).to_event(1)


def _normal(params):
    loc, scale = params
    return dist.Normal(loc, scale).to_event(1)


LIKELIHOOD_FAMILIES: Dict[str, LikelihoodFamily] = {
    "bernoulli": LikelihoodFamily(1, _bernoulli, "logits"),
    "continuous-bernoulli": LikelihoodFamily(1, _continuous_bernoulli, "logits"),
    "normal": LikelihoodFamily(2, _normal, "(loc, scale)"),
}
