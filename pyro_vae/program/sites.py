r"""How the guide's latent site ``z`` is differentiated: reparameterized (a pathwise gradient
through :math:`z = \mu + \sigma \epsilon`) or by the score function, with a baseline.

These are properties of the guide's ``pyro.sample("z", ...)`` statement: the distribution's
``has_rsample`` flag and the site's ``infer={"baseline": ...}`` options, which Pyro's ELBOs read.
The ELBO that honours baselines lives in :mod:`pyro_vae.infer.estimators`.
"""

from __future__ import annotations

import functools
from typing import Optional

import pyro.distributions as dist
import torch
from torch import nn

from ..core.config import BASELINES, ESTIMATORS
from ..core.errors import ConfigError

__all__ = ["BASELINE_BETA", "BaselineNet", "set_estimator", "non_reparameterized", "baseline_options", "baseline_net"]

BASELINE_BETA = 0.9  # decay of the running average baseline (Pyro's default)


class BaselineNet(nn.Module):
    r"""Input-dependent baseline :math:`b_\psi(x)`: one hidden layer, one number per image.

    It is fitted (by Pyro's baseline loss :math:`(f - b)^2`, gradients to :math:`\psi` only) to
    what the running average misses of each image's cost, in nats per image; ``scale`` multiplies
    it by the data plate's :math:`N / B`, the factor Pyro's per-image costs carry.
    """

    def __init__(self, x_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * self.net(x).squeeze(-1)  # [B]


def set_estimator(guide: nn.Module, estimator: str = "reparam", baseline: str = "none", x_dim: Optional[int] = None):
    """Make ``guide`` use ``estimator`` (``reparam`` | ``score``) with ``baseline`` (``none`` |
    ``decaying-avg`` | ``neural``); a neural baseline adds ``guide.baseline_net`` (a submodule,
    so it is in ``vae.parameters()`` and in checkpoints). Returns ``guide``."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
    if estimator == "reparam" and baseline != "none":
        raise ConfigError("a baseline reduces the variance of the score-function estimator only; use --estimator score")
    guide.estimator, guide.baseline = estimator, baseline
    if baseline == "neural" and baseline_net(guide) is None:
        if x_dim is None:
            raise ValueError("a neural baseline needs x_dim")
        p = next(guide.parameters(), None)
        guide.baseline_net = BaselineNet(x_dim).to(p.device if p is not None else "cpu")
    return guide


def non_reparameterized(q):
    """``q`` marked not reparameterizable (``has_rsample_(False)``): its samples carry no
    pathwise gradient, so Pyro's ELBOs use the score function for the site."""
    if isinstance(q, torch.distributions.Independent):
        q = _Independent(non_reparameterized(q.base_dist), q.reinterpreted_batch_ndims)
    elif isinstance(q, torch.distributions.TransformedDistribution):  # a flow guide (iaf)
        q = _Transformed(q.base_dist, q.transforms)
    return q.has_rsample_(False)


class _Independent(dist.Independent):
    """``Independent`` whose ``has_rsample`` can be set. Pyro's ``Independent`` reads it from its
    base, so ``has_rsample_(False)`` fails, and ``expand`` (a vectorised particle plate) drops the
    base's flag; Pyro then copies the flag onto the expanded copy, which works here."""

    @property
    def has_rsample(self):
        return self.__dict__.get("_has_rsample", self.base_dist.has_rsample)

    @has_rsample.setter
    def has_rsample(self, value):
        self.__dict__["_has_rsample"] = value


class _Transformed(dist.TransformedDistribution):
    r"""``TransformedDistribution`` whose ``has_rsample`` can be set (as :class:`_Independent`).

    Its ``sample`` forgets the transforms' cached forward pass (made without gradients), so that
    ``log_prob(z)`` inverts the flow *with* gradients: the score function needs
    :math:`\nabla_\phi \log q_\phi(z)` at the fixed sample z."""

    def sample(self, sample_shape=torch.Size()):
        z = super().sample(sample_shape)
        for t in self.transforms:
            t._cached_x_y = None, None
            if hasattr(t, "_cached_log_scale"):  # Pyro's affine autoregressive transforms
                t._cached_log_scale = None
        return z

    @property
    def has_rsample(self):
        return self.__dict__.get("_has_rsample", self.base_dist.has_rsample)

    @has_rsample.setter
    def has_rsample(self, value):
        self.__dict__["_has_rsample"] = value


def baseline_options(guide: nn.Module, x: torch.Tensor, num_data: Optional[int] = None) -> dict:
    """The ``infer`` dict of the guide's score-function site ``z`` for ``guide.baseline``.

    ``decaying-avg``: :math:`b` is a running average of each minibatch slot's cost.
    ``neural``: that average plus :math:`b_\\psi(x)` (Pyro adds the two when both are given).
    """
    baseline = getattr(guide, "baseline", "none")
    if baseline == "none":
        return {}
    options = {"use_decaying_avg_baseline": True, "baseline_beta": BASELINE_BETA}
    if baseline == "neural":
        scale = (num_data or x.shape[0]) / x.shape[0]  # the data plate's N / B
        options.update(nn_baseline=functools.partial(guide.baseline_net, scale=scale), nn_baseline_input=x)
    return {"baseline": options}


def baseline_net(guide) -> Optional[nn.Module]:
    return guide._modules.get("baseline_net")
