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
the small networks' arithmetic. Only the plain case is fused: reparameterized Normal guide, one
particle, ``elbo`` ``trace`` or ``meanfield``; everything else runs through Pyro.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.distributions import kl_divergence
from torch.nn import functional as F

from ..core.config import VAEConfig

__all__ = ["fused_available", "fused_elbo_loss"]


def fused_available(config: VAEConfig) -> bool:
    """Whether :func:`fused_elbo_loss` computes the same estimate as the configured Pyro ELBO."""
    return config.estimator == "reparam" and config.num_particles == 1 and config.elbo in ("trace", "meanfield")


def fused_elbo_loss(vae, x, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
                    beta: float = 1.0, analytic_kl: bool = False,
                    noise_rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The negative ELBO estimate of ``Trace_ELBO`` (``analytic_kl=False``) or
    ``TraceMeanField_ELBO`` (``analytic_kl=True``), as a differentiable scalar.

    ``noise_rows=(offset, total)``: ``x`` is rows ``offset:offset+B`` of a batch of ``total``
    images; draw the noise ε for all ``total`` rows (as ``q.rsample()`` would for that batch) and
    keep these rows (data-parallel training, :mod:`pyro_vae.distributed`). ``None``: ``q.rsample()``."""
    batch = x.shape[0]
    loc, scale = vae.inference.posterior(x, idx)  # [B, z_dim] each
    q = vae.inference.distribution(loc, scale)
    if noise_rows is None:
        z = q.rsample()  # [B, z_dim]
    else:  # what Normal.rsample does, for the whole batch of `total` rows
        offset, total = noise_rows
        eps = torch.empty((total,) + loc.shape[1:], dtype=loc.dtype, device=loc.device).normal_()
        z = loc + eps[offset:offset + batch] * scale
    if vae.config.likelihood == "bernoulli":  # sum_i log Bernoulli(x_i | logits_i), one fused reduction
        log_px_sum = -F.binary_cross_entropy_with_logits(vae.decode(z), x, reduction="sum")
    else:  # every other likelihood (normal, continuous-bernoulli): the model's own distribution
        log_px_sum = vae.likelihood(z).log_prob(x).sum()
    p = vae.prior(batch)
    if analytic_kl:
        latent = -kl_divergence(q, p)  # [B]
    else:
        latent = p.log_prob(z) - q.log_prob(z)  # [B]
    scale_n = (num_data if num_data is not None else batch) / batch
    return -(log_px_sum + beta * latent.sum()) * scale_n


