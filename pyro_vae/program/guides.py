r"""Variational families: how each image's Gaussian :math:`q(z_i) = \mathcal{N}(\mu_i, \sigma_i^2)`
gets its parameters. A guide is an ``nn.Module`` called like the model, ``guide(x, idx, num_data,
beta)``; it opens the same ``"data"`` plate and samples the same site ``"z"``. Swapping guides never
touches :meth:`pyro_vae.model.VAE.model`.

- :class:`AmortizedGuide`: :math:`(\mu_i, \sigma_i) = f_\phi(x_i)`, one encoder shared by all images.
- :class:`MeanFieldGuide`: free :math:`(\mu_i, \sigma_i)` per image, nothing shared.
- :class:`SemiAmortizedGuide`: the encoder's output refined by K gradient steps on each image's ELBO.

Beyond the diagonal Gaussian (amortized, encoder-based): :class:`IAFGuide` (a base Gaussian pushed
through conditional inverse autoregressive flows) and :class:`FullRankGuide` (a Gaussian with a full
covariance). Every guide gives its q(z|x) as a distribution, :meth:`Guide.q` (event shape
``[z_dim]``); the diagonal guides build it from :meth:`Guide.posterior`'s ``(loc, scale)``.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from ..core.config import VAEConfig

from .networks import ConvEncoder, Encoder, make_encoder
from .plates import data_plate
from .sites import baseline_options, non_reparameterized, set_estimator

__all__ = ["Guide", "AmortizedGuide", "MeanFieldGuide", "SemiAmortizedGuide", "IAFGuide", "FullRankGuide",
           "make_guide", "local_elbo", "refine", "encode_with_context", "reparameterize", "GUIDE_FAMILIES"]


class Guide(nn.Module):
    """Base class: a diagonal Gaussian per image; subclasses implement :meth:`posterior`."""

    z_dim: int
    amortized = True  # posterior(x) works for any image, seen in training or not
    diagonal = True  # q is the diagonal Gaussian of posterior(x, idx) (False: only q(x, idx) describes it)
    estimator = "reparam"  # reparam | score: how the ELBO's gradient treats z (pyro_vae.estimators)
    baseline = "none"  # score only: none | decaying-avg | neural

    def posterior(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``[B, z_dim]``, of q(z) for the images ``x`` (rows ``idx``)."""
        raise NotImplementedError

    def register(self) -> None:
        """Declare the guide's parameters to Pyro (``pyro.module``/``pyro.param``)."""

    def distribution(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        return dist.Normal(loc, scale).to_event(1)

    def q(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> dist.Distribution:
        """q(z|x) of the images ``x`` (rows ``idx``): batch shape ``[B]``, event shape ``[z_dim]``."""
        loc, scale = self.posterior(x, idx)  # [B, z_dim] each
        return self.distribution(loc, scale)

    def forward(self, x, idx=None, num_data=None, beta=1.0):
        self.register()
        q, infer = self.q(x, idx), {}
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


def encode_with_context(encoder: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loc, scale, h)`` of the encoder for ``x [B, D]``: its Gaussian and a context vector ``h [B, C]``.

    For the built-in networks ``h`` is the input of their last linear layer (the features that give
    ``(loc, scale)``, as in Kingma et al. 2016); for an encoder of your own, only ``(loc, scale)``
    is known and ``h = [loc, log scale]``. :func:`context_dim` gives ``C``."""
    if isinstance(encoder, Encoder):
        h = F.softplus(encoder.body(x))  # [B, hidden[-1]]
    elif isinstance(encoder, ConvEncoder):
        h = encoder.body(x.reshape(-1, *encoder.event_shape)).flatten(1)  # [B, C' * H' * W']
    else:
        loc, scale = encoder(x)
        return loc, scale, torch.cat([loc, scale.log()], -1)
    loc, raw_scale = encoder.head(h).chunk(2, dim=-1)  # [B, z_dim] each, as the encoder computes them
    return loc, F.softplus(raw_scale) + 1e-5, h


def context_dim(encoder: nn.Module, z_dim: int) -> int:
    """The size of :func:`encode_with_context`'s ``h``."""
    return encoder.head.in_features if isinstance(encoder, (Encoder, ConvEncoder)) else 2 * z_dim


class IAFGuide(AmortizedGuide):
    r"""Amortized inverse autoregressive flow (Kingma et al. 2016): the encoder gives a base Gaussian
    and a context :math:`h(x)`; ``flow_steps`` conditional IAF transforms of Pyro
    (:class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`), each

    .. math::

        z^{(t)} = \mu_t(z^{(t-1)}, h) + \sigma_t(z^{(t-1)}, h) \odot z^{(t-1)}, \qquad
        \log q(z^{(T)} \mid x) = \log \mathcal{N}(z^{(0)}; \mu, \sigma^2)
        - \sum_{t=1}^T \sum_{j} \log \sigma_{t,j},

    with :math:`\mu_{t,j}, \sigma_{t,j}` depending on :math:`z^{(t-1)}_{<j}` only (a MADE network,
    so the Jacobian is triangular), and the order of the dimensions reversed between steps
    (:class:`~pyro.distributions.transforms.Permute`). The ``z`` site is a ``TransformedDistribution``;
    its log-density at its own samples comes from the forward pass (Pyro caches it), no inverse needed.
    ``posterior(x)`` is the *base* Gaussian :math:`(\mu, \sigma)` (before the flow).
    """

    diagonal = False

    def __init__(self, x_dim: int, hidden, z_dim: int, flow_steps: int = 2, encoder: Optional[nn.Module] = None):
        super().__init__(x_dim, hidden, z_dim, encoder)
        made_hidden = [10 * z_dim]  # Pyro's default width for the autoregressive network
        meta = next(self.encoder.parameters()).is_meta  # built on the meta device (pyro_vae.program.memory)
        with torch.device("cpu") if meta else contextlib.nullcontext():  # Pyro's MADE calls .item() at init
            identity, reverse = torch.arange(z_dim), torch.arange(z_dim - 1, -1, -1)
            self.flows = nn.ModuleList(
                ConditionalAffineAutoregressive(ConditionalAutoRegressiveNN(
                    z_dim, context_dim(self.encoder, z_dim), made_hidden, permutation=identity))
                for _ in range(flow_steps))
        self.flows.to(next(self.encoder.parameters()).device)
        self.register_buffer("reverse", reverse.to(self.flows[0].nn.permutation.device), persistent=False)

    def register(self) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)

    def q(self, x, idx=None):
        loc, scale, h = encode_with_context(self.encoder, x)  # [B, z_dim], [B, z_dim], [B, C]
        transforms = []
        for t, flow in enumerate(self.flows):
            if t > 0:  # reverse the autoregressive order between steps
                transforms.append(Permute(self.reverse))
            transforms.append(flow.condition(h))
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)


class FullRankGuide(AmortizedGuide):
    r"""Amortized Gaussian with a full covariance: :math:`q(z \mid x) = \mathcal{N}(\mu(x), L(x) L(x)^\top)`,
    :math:`L = \mathrm{diag}(\sigma(x)) + \mathrm{strictly\ lower}(W h(x) + b)`; the encoder gives
    :math:`\mu, \sigma` as for :class:`AmortizedGuide`, an extra linear layer on its features the
    :math:`d(d-1)/2` off-diagonal entries (zero at the start: the guide starts as the diagonal one).
    ``posterior(x)`` is :math:`(\mu, \sqrt{\mathrm{diag}\, LL^\top})`, q's exact marginals."""

    diagonal = False

    def __init__(self, x_dim: int, hidden, z_dim: int, encoder: Optional[nn.Module] = None):
        super().__init__(x_dim, hidden, z_dim, encoder)
        self.off_diagonal = nn.Linear(context_dim(self.encoder, z_dim), z_dim * (z_dim - 1) // 2)
        nn.init.zeros_(self.off_diagonal.weight)
        nn.init.zeros_(self.off_diagonal.bias)
        self.register_buffer("rows", torch.tril_indices(z_dim, z_dim, -1), persistent=False)  # [2, d(d-1)/2]

    def register(self) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("off_diagonal", self.off_diagonal)

    def scale_tril(self, x) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc [B, z_dim], L [B, z_dim, z_dim])``."""
        loc, scale, h = encode_with_context(self.encoder, x)
        off = scale.new_zeros(scale.shape + scale.shape[-1:])  # [B, z_dim, z_dim]
        off[:, self.rows[0], self.rows[1]] = self.off_diagonal(h)  # strictly lower triangle
        return loc, torch.diag_embed(scale) + off

    def q(self, x, idx=None):
        loc, tril = self.scale_tril(x)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def posterior(self, x, idx=None):
        loc, tril = self.scale_tril(x)
        return loc, tril.pow(2).sum(-1).sqrt()  # marginal standard deviations


def _push_normal(q, eps):
    z = q.base_dist.loc + eps * q.base_dist.scale  # what Normal.rsample computes from eps
    return z, q.log_prob(z)


def _push_mvn(q, eps):
    z = q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)  # what MultivariateNormal.rsample computes
    return z, q.log_prob(z)


def _push_flow(q, eps):
    r"""The base draw through each transform, the log-density from the forward pass:
    :math:`\log q(z) = \log q_0(z_0) - \sum_t \log |\det \partial z_t / \partial z_{t-1}|`."""
    z, log_q = reparameterize(q.base_dist, eps)
    for t in q.transforms:
        y = t(z)
        log_q = log_q - t.log_abs_det_jacobian(z, y)  # [..., B]: event dims summed by the transform
        z = y
    return z, log_q


#: the q(z|x) families the guides give -> ``(q, eps) -> (z, log q(z))``
_PUSH = {torch.distributions.Independent: _push_normal, torch.distributions.MultivariateNormal: _push_mvn,
         torch.distributions.TransformedDistribution: _push_flow}


def reparameterize(q: dist.Distribution, eps: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(z, log q(z))`` for standard-normal draws ``eps [..., B, z_dim]``: the sample ``q.rsample()``
    makes from the same draws, and its log-density. Lets evaluation give each image its own seeded
    draws (:mod:`pyro_vae.infer.evaluate`) for any guide: diagonal, full-rank or flow."""
    for family, push in _PUSH.items():
        if isinstance(q, family):
            return push(q, eps)
    raise TypeError(f"no reparameterization for {type(q).__name__}")


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
    if config.guide not in GUIDE_FAMILIES:
        raise ValueError(f"unknown guide {config.guide!r}")
    if config.guide != "mean-field" and encoder is None and config.arch != "mlp":
        encoder = make_encoder(config)  # (the MLP is the guides' own default, for x_dim inputs)
    return GUIDE_FAMILIES[config.guide](config, x_dim, num_data, encoder)


def _mean_field(config: VAEConfig, x_dim: int, num_data: Optional[int], encoder) -> Guide:
    if num_data is None:
        raise ValueError("the mean-field guide needs num_data (one set of parameters per image)")
    return MeanFieldGuide(num_data, config.z_dim)


#: ``VAEConfig.guide`` -> ``(config, x_dim, num_data, encoder) -> Guide``
GUIDE_FAMILIES = {
    "amortized": lambda c, x_dim, n, e: AmortizedGuide(x_dim, c.hidden, c.z_dim, e),
    "semi-amortized": lambda c, x_dim, n, e: SemiAmortizedGuide(x_dim, c.hidden, c.z_dim, c.refine_steps,
                                                                c.refine_lr, e),
    "mean-field": _mean_field,
    "iaf": lambda c, x_dim, n, e: IAFGuide(x_dim, c.hidden, c.z_dim, c.flow_steps, e),
    "full-rank": lambda c, x_dim, n, e: FullRankGuide(x_dim, c.hidden, c.z_dim, e),
}
