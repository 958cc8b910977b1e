r"""The training loss without the tracing: the same ELBO estimate as ``Trace_ELBO`` (or
``TraceMeanField_ELBO``) on ``VAE.model``/``VAE.guide``, computed from the same pieces
(``guide.posterior``, ``vae.prior``, ``vae.likelihood``; for Bernoulli pixels the summed
log-density is one ``binary_cross_entropy_with_logits`` reduction) in a few fused tensor operations.

For a minibatch of :math:`B` of :math:`N` images and one reparameterized draw
:math:`z_i = \mu_i + \sigma_i \epsilon_i` per image,

.. math::

    \widehat{\mathcal{L}} = -\frac{N}{B} \sum_{i \in \text{batch}} \Big[\log p_\theta(x_i \mid z_i)
    + \beta \big(\log p(z_i) - \log q(z_i)\big)\Big]
    \quad\text{or, with the analytic KL,}\quad
    -\frac{N}{B} \sum_i \Big[\log p_\theta(x_i \mid z_i) - \beta\,\mathrm{KL}(q_i \,\|\, p)\Big].

This is exactly what Pyro's ELBOs compute for this model (the plate's :math:`N/B` scale,
``poutine.scale``'s :math:`\beta` on the latent site), with the same random draws, so losses and
gradients agree to float precision (``tests/test_fused.py``; :func:`~pyro_vae.infer.objectives.check_fused` repeats the check
on the first minibatch of every run). What it saves is Pyro's per-step bookkeeping: building two
traces, ``pyro.module`` registrations, the plate and scale messengers, which cost about as much as
the small networks' arithmetic. Fused: the ELBO with a reparameterized Normal guide, one
particle, ``elbo`` ``trace`` or ``meanfield``; and the importance-weighted objectives ``iwae`` and
``dreg`` (:func:`fused_iwae_loss`: the same :math:`K \times B` draws and log weights as
:class:`~pyro_vae.infer.iwae.IWAE_ELBO`, whose bound and DReG surrogate it reuses); everything else
runs through Pyro. Guides whose q is no diagonal Gaussian (``iaf``, ``full-rank``) are fused for the
one-sample ELBO through ``guide.q(x)``: :math:`z` = ``q.rsample()``, :math:`\log q(z)` = ``q.log_prob(z)``,
as Pyro's guide site computes them; a learned prior (``mog``, ``vamp``) is scored by ``vae.prior``,
the distribution ``VAE.model`` samples from (``tests/test_flows_priors.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.distributions import kl_divergence
from torch.nn import functional as F

from ..core.config import VAEConfig
from ..program.guides import reparameterize
from .iwae import dreg_loss, iwae_bound

#: guides whose q is no diagonal Gaussian: fused through ``guide.q(x)`` (one-sample ELBO only)
NON_DIAGONAL = ("iaf", "full-rank")

__all__ = ["fused_available", "fused_elbo_loss", "fused_iwae_loss"]


def fused_available(config: VAEConfig) -> bool:
    """Whether :func:`fused_elbo_loss` computes the same estimate as the configured Pyro ELBO."""
    if config.estimator != "reparam":
        return False
    if config.guide in NON_DIAGONAL and getattr(config, "objective", "elbo") != "elbo":
        return False  # the multi-sample objectives' fused draws are diagonal-Gaussian ones
    if config.objective != "elbo":  # iwae, dreg: any K, sampled log weights
        return config.elbo == "trace"
    return config.num_particles == 1 and config.elbo in ("trace", "meanfield")


def fused_elbo_loss(vae, x, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
                    beta: float = 1.0, analytic_kl: bool = False,
                    noise_rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The negative ELBO estimate of ``Trace_ELBO`` (``analytic_kl=False``) or
    ``TraceMeanField_ELBO`` (``analytic_kl=True``), as a differentiable scalar.

    ``noise_rows=(offset, total)``: ``x`` is rows ``offset:offset+B`` of a batch of ``total``
    images; draw the noise ε for all ``total`` rows (as ``q.rsample()`` would for that batch) and
    keep these rows (data-parallel training, :mod:`pyro_vae.distributed`). ``None``: ``q.rsample()``."""
    batch = x.shape[0]
    if not getattr(vae.inference, "diagonal", True):  # full-rank, flow: q.rsample() and its log q(z), as Pyro
        z, log_q = _draw(vae.inference.q(x, idx), x, noise_rows)  # [B, z_dim], [B]
        return _loss(vae, x, z, log_q, None, num_data, beta)
    loc, scale = vae.inference.posterior(x, idx)  # [B, z_dim] each
    q = vae.inference.distribution(loc, scale)
    if noise_rows is None:
        z = q.rsample()  # [B, z_dim]
    else:  # what Normal.rsample does, for the whole batch of `total` rows
        offset, total = noise_rows
        eps = torch.empty((total,) + loc.shape[1:], dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps[offset:offset + batch] * scale
    return _loss(vae, x, z, None if analytic_kl else q.log_prob(z), q if analytic_kl else None, num_data, beta)


def _draw(q, x: torch.Tensor, noise_rows: Optional[Tuple[int, int]]):
    """``(z, log q(z))``: ``q.rsample()`` (Pyro's draw and its cached log-density), or with
    ``noise_rows=(offset, total)`` the same push of ε (:func:`~pyro_vae.program.guides.reparameterize`)
    for rows ``offset:offset+B`` of the draws of ``total`` rows."""
    if noise_rows is None:
        z = q.rsample()  # [B, z_dim]
        return z, q.log_prob(z)
    offset, total = noise_rows
    eps = torch.empty((total,) + q.event_shape, dtype=x.dtype, device=x.device).normal_()  # [total, z_dim]
    return reparameterize(q, eps[offset:offset + x.shape[0]])


def _loss(vae, x, z, log_q, kl_q, num_data, beta):
    """The negative scaled ELBO from ``z`` and ``log q(z)`` (or, with ``kl_q``, the analytic KL)."""
    batch = x.shape[0]
    if vae.config.likelihood == "bernoulli":  # sum_i log Bernoulli(x_i | logits_i), one fused reduction
        log_px_sum = -F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="sum")
    else:  # every other likelihood (normal, continuous-bernoulli): the model's own distribution
        log_px_sum = vae.likelihood(z).log_prob(x).sum()
    p = vae.prior(batch)
    if kl_q is not None:
        latent = -kl_divergence(kl_q, p)  # [B]
    else:
        latent = p.log_prob(z) - log_q  # [B]
    scale_n = (num_data if num_data is not None else batch) / batch
    return -(log_px_sum + beta * latent.sum()) * scale_n




def _noise(loc: torch.Tensor, scale: torch.Tensor, particles: int, noise_rows: Optional[Tuple[int, int]]):
    """``z [K, B, z_dim]`` as ``q.expand([K, B]).rsample()`` draws it; ``noise_rows=(offset, total)``:
    the noise of a batch of ``total`` rows, these ``B`` rows kept (as :func:`fused_elbo_loss`)."""
    batch = loc.shape[0]
    offset, total = noise_rows if noise_rows is not None else (0, batch)
    eps = torch.empty((particles, total) + loc.shape[1:], dtype=loc.dtype, device=loc.device).normal_()
    return loc + eps[:, offset:offset + batch] * scale  # [K, B, z_dim]


def fused_iwae_loss(vae, x, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
                    beta: float = 1.0, particles: int = 1, dreg: bool = False,
                    noise_rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    r"""The negative importance-weighted bound of :class:`~pyro_vae.infer.iwae.IWAE_ELBO`
    (``dreg=False``) or :class:`~pyro_vae.infer.iwae.DReG_ELBO` (``dreg=True``, the same value with
    the DReG gradient), as a differentiable scalar, with :math:`K` = ``particles``:

    .. math::

        -\frac{N}{B} \sum_{i} \log \frac{1}{K} \sum_k \exp\Big[\log p_\theta(x_i \mid z_{ik})
        + \beta\big(\log p(z_{ik}) - \log q(z_{ik} \mid x_i)\big)\Big].
    """
    batch = x.shape[0]
    loc, scale = vae.inference.posterior(x, idx)  # [B, z_dim] each
    z = _noise(loc, scale, particles, noise_rows)  # [K, B, z_dim]
    if vae.config.likelihood == "bernoulli":  # log Bernoulli(x | logits), one fused op
        logits = vae.decode(z)  # [K, B, D]
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)  # [K, B]
    else:
        log_px = vae.likelihood(z).log_prob(x)  # [K, B]
    q = vae.inference.distribution(loc.detach(), scale.detach()) if dreg else vae.inference.distribution(loc, scale)
    log_w = log_px + beta * (vae.prior(batch).log_prob(z) - q.log_prob(z))  # [K, B]
    scale_n = (num_data if num_data is not None else batch) / batch
    if dreg:
        return dreg_loss(log_w, scale_n, [z])
    return -iwae_bound(log_w).sum() * scale_n
