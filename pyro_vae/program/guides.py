r"""Variational families: how each image's Gaussian :math:`q(z_i) = \mathcal{N}(\mu_i, \sigma_i^2)`
gets its parameters. A guide is an ``nn.Module`` called like the model, ``guide(x, idx, num_data,
beta)``; it opens the same ``"data"`` plate and samples the same site ``"z"``. Swapping guides never
touches :meth:`pyro_vae.model.VAE.model`.

- :class:`AmortizedGuide`: :math:`(\mu_i, \sigma_i) = f_\phi(x_i)`, one encoder shared by all images.
- :class:`MeanFieldGuide`: free :math:`(\mu_i, \sigma_i)` per image, nothing shared.
- :class:`SemiAmortizedGuide`: the encoder's output refined by K gradient steps on each image's ELBO.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from ..core.config import VAEConfig
from .networks import Encoder, make_encoder
from .plates import data_plate
from .sites import baseline_options, non_reparameterized, set_estimator

__all__ = ["Guide", "AmortizedGuide", "MeanFieldGuide", "SemiAmortizedGuide", "make_guide", "local_elbo", "refine"]


class Guide(nn.Module):
    """Base class: a diagonal Gaussian per image; subclasses implement :meth:`posterior`."""

    z_dim: int
    amortized = True  # posterior(x) works for any image, seen in training or not
    estimator = "reparam"  # reparam | score: how the ELBO's gradient treats z (pyro_vae.estimators)
    baseline = "none"  # score only: none | decaying-avg | neural

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
        q, infer = self.distribution(loc, scale), {}
        if self.estimator == "score" and torch.is_grad_enabled():  # no gradient, no estimator to choose
            # z is drawn without a pathwise gradient: the ELBO uses the score function (BBVI)
            q, infer = non_reparameterized(q), baseline_options(self, x, num_data)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                return pyro.sample("z", q, infer=infer)


class AmortizedGuide(Guide):
    r"""Amortized inference: :math:`q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x), \sigma_\phi(x)^2)`.

    One encoder network, shared by all images, maps any image (seen or new) to its posterior
    parameters; the cost is the *amortization gap* between this and the best Gaussian per image.
    """

    def __init__(self, x_dim: int, hidden, z_dim: int, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.z_dim = z_dim
        # any x [B, D] -> (loc, scale) network; by default the MLP of pyro_vae.program.networks
        self.encoder = encoder if encoder is not None else Encoder(x_dim, hidden, z_dim)

    def register(self) -> None:
        pyro.module("encoder", self.encoder)

    def posterior(self, x, idx=None):
        return self.encoder(x)


class MeanFieldGuide(Guide):
    r"""Mean-field VI with no shared parameters: image :math:`i` has its own free
    :math:`\lambda_i = (\mu_i, \sigma_i)`, nothing is shared between images.

    The :math:`N \times 2 d` local parameters live in one ``nn.Embedding`` indexed by the data
    plate's subsample indices, with sparse gradients: a minibatch step (``SparseAdam``) touches only
    the rows in the batch, as in stochastic VI (Hoffman et al. 2013). Pyro's ``AutoNormal`` with
    ``create_plates`` builds the same family; ``tests/test_guides.py`` checks they agree.
    New images have no parameters: :func:`pyro_vae.local.fit_local` fits them with the decoder frozen.
    """

    amortized = False

    def __init__(self, num_data: int, z_dim: int, sparse: bool = True):
        super().__init__()
        self.z_dim = z_dim
        self.num_data = num_data
        self.local = nn.Embedding(num_data, 2 * z_dim, sparse=sparse)  # [N, loc | raw scale]
        with torch.no_grad():  # start at the prior: loc 0, scale 1
            self.local.weight[:, :z_dim] = 0.0
            self.local.weight[:, z_dim:] = _softplus_inverse(1.0)

    def register(self) -> None:
        pyro.module("mean_field", self)

    def set(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Overwrite all rows with ``loc``, ``scale`` (each ``[N, z_dim]``)."""
        with torch.no_grad():
            self.local.weight.copy_(torch.cat([loc, _softplus_inverse(scale)], -1))

    def posterior(self, x, idx=None):
        if idx is None:
            if x.shape[0] != self.num_data:
                raise ValueError(
                    f"the mean-field guide holds parameters for its {self.num_data} training images only; "
                    "fit new images with pyro_vae.local.fit_local"
                )
            idx = torch.arange(self.num_data, device=x.device)
        loc, raw_scale = self.local(idx).chunk(2, dim=-1)  # [B, z_dim] each
        return loc, F.softplus(raw_scale) + 1e-5


class SemiAmortizedGuide(AmortizedGuide):
    r"""Semi-amortized VI (Kim et al. 2018): start at the encoder's :math:`\lambda^{(0)} = f_\phi(x)`,
    then take :math:`K` gradient-ascent steps on the image's own ELBO,

    .. math::

        \lambda^{(k+1)} = \lambda^{(k)} + \eta \, \nabla_\lambda \Big(
        \log p_\theta(x \mid \mu + \sigma \epsilon) - \mathrm{KL}\big(\mathcal{N}(\mu, \sigma^2) \,\|\,
        \mathcal{N}(0, I)\big)\Big)\Big|_{\lambda^{(k)}}, \qquad \lambda = (\mu, \log \sigma).

    The guide samples z from :math:`q(z; \lambda^{(K)})`, so the decoder is trained through the
    refined parameters. Gradients reach the encoder *straight through* the refinement
    (:math:`\partial \lambda^{(K)} / \partial \lambda^{(0)} \approx I`): the encoder is pulled
    towards where the refinement ends, at first-order cost, without the Hessian-vector products of
    backpropagating through the K steps (Kim et al.'s full variant). With K = 0 this is exactly
    :class:`AmortizedGuide`.
    """

    def __init__(self, x_dim: int, hidden, z_dim: int, refine_steps: int = 5, refine_lr: float = 1e-2,
                 encoder: Optional[nn.Module] = None):
        super().__init__(x_dim, hidden, z_dim, encoder)
        self.refine_steps = refine_steps
        self.refine_lr = refine_lr
        self.likelihood = None  # p(x|z) as a function of z, set by the VAE that owns this guide

    def attach(self, likelihood) -> None:
        self.likelihood = likelihood

    def posterior(self, x, idx=None):
        loc, scale = self.encoder(x)  # lambda^(0), [B, z_dim] each
        if self.refine_steps == 0:
            return loc, scale
        refined_loc, refined_log_scale = refine(
            self.likelihood, x, loc.detach(), scale.detach().log(), self.refine_steps, self.refine_lr
        )
        # straight-through: the value of lambda^(K), the gradient of lambda^(0)
        return loc + (refined_loc - loc).detach(), scale * (refined_log_scale.exp() / scale).detach()


def local_elbo(likelihood, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""One-sample ELBO of each image, ``[B]``: :math:`\log p(x \mid z) - \mathrm{KL}(q \,\|\, p)`,
    :math:`z = \mu + \sigma \epsilon` (analytic KL against the prior N(0, I))."""
    z = loc + scale * torch.randn_like(loc)
    q = dist.Normal(loc, scale)
    kl = torch.distributions.kl_divergence(q, dist.Normal(torch.zeros_like(loc), torch.ones_like(scale)))
    return likelihood(z).log_prob(x) - kl.sum(-1)


def refine(likelihood, x, loc, log_scale, steps: int, lr: float):
    """``steps`` gradient-ascent steps on each image's :func:`local_elbo` w.r.t. ``(loc, log_scale)``;
    only these local parameters move (the decoder gets no gradient from here)."""
    with torch.enable_grad():
        for _ in range(steps):
            loc, log_scale = loc.detach().requires_grad_(), log_scale.detach().requires_grad_()
            elbo = local_elbo(likelihood, x, loc, log_scale.exp()).sum()
            g_loc, g_log_scale = torch.autograd.grad(elbo, (loc, log_scale))
            loc, log_scale = loc + lr * g_loc, log_scale + lr * g_log_scale
    return loc.detach(), log_scale.detach()


def _softplus_inverse(y):
    y = torch.as_tensor(y, dtype=torch.get_default_dtype())
    return y + torch.log(-torch.expm1(-y))


def make_guide(config: VAEConfig, x_dim: int, num_data: Optional[int] = None,
               encoder: Optional[nn.Module] = None) -> Guide:
    """The guide that ``config.guide`` names (``num_data``: images, for the mean-field guide),
    set up for ``config.estimator`` and ``config.baseline``. Guides with an encoder use
    ``encoder``, or the built-in one ``config.arch`` names."""
    guide = _guide_family(config, x_dim, num_data, encoder)
    return set_estimator(guide, config.estimator, config.baseline, x_dim)


def _guide_family(config: VAEConfig, x_dim: int, num_data: Optional[int], encoder: Optional[nn.Module]) -> Guide:
    if config.guide in ("amortized", "semi-amortized") and encoder is None and config.arch != "mlp":
        encoder = make_encoder(config)  # (the MLP is the guides' own default, for x_dim inputs)
    if config.guide == "amortized":
        return AmortizedGuide(x_dim, config.hidden, config.z_dim, encoder)
    if config.guide == "semi-amortized":
        return SemiAmortizedGuide(x_dim, config.hidden, config.z_dim, config.refine_steps, config.refine_lr, encoder)
    if config.guide == "mean-field":
        if num_data is None:
            raise ValueError("the mean-field guide needs num_data (one set of parameters per image)")
        return MeanFieldGuide(num_data, config.z_dim)
    raise ValueError(f"unknown guide {config.guide!r}")
