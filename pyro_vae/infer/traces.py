r"""Per-image log weights of any program, from Pyro's traces: what :func:`~pyro_vae.infer.evaluate.evaluate`
and the TensorBoard probes use for programs without the built-in Gaussian guide.

For image :math:`x_i` and :math:`K` draws of *all* latent sites from the guide,
:math:`z_{ik} \sim q(z \mid x_i)`, the guide is traced with :math:`K` vectorized particles (Pyro's
``vectorize_particles``: a plate of :math:`K` left of the ``data`` plate), the model is replayed
on the draws, and the log weight of each image and particle is the sum over the model's sample
sites (latent and observed) minus the sum over the guide's:

.. math::

    \log w_{ik} = \sum_{s \in \text{model}} \log p(s_{ik} \mid \mathrm{pa}(s)_{ik})
    - \sum_{s \in \text{guide}} \log q(s_{ik} \mid \mathrm{pa}(s)_{ik}),

read inside the ``data`` plate (one number per image; :class:`~pyro_vae.infer.iwae.IWAE_ELBO`'s
``_log_weights``). Then :math:`\frac{1}{K}\sum_k \log w_{ik}` is ``Trace_ELBO``'s estimate of the
image's ELBO and :math:`\log \frac{1}{K}\sum_k w_{ik}` its importance-weighted bound; with
:math:`K = 1` and the same draw they are the same number. The reconstruction term is the observed
site's :math:`\log p(x_i \mid \cdot)` alone, and the rest, :math:`\mathbb{E}_q[\log q - \log p]`
over the latent sites, is the KL of the whole latent vector.

For active units each continuous latent site gets :math:`\mathbb{E}_q[z_s \mid x_i]`, the mean over
particles of the guide site's own mean (exact for a site that depends on :math:`x` alone;
Rao-Blackwellised over its parents' draws otherwise).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict

import pyro
import torch

from ..program.contract import Program
from .iwae import IWAE_ELBO

__all__ = ["program_log_weights", "program_terms"]


@torch.no_grad()
def program_log_weights(program: Program, x: torch.Tensor, particles: int) -> Dict[str, torch.Tensor]:
    """``log_w`` and ``log_px`` (``[K, B]`` each) and, per continuous latent site, ``mean:SITE``
    (``[B, numel]``: the mean over the K particles of the guide site's mean), from one vectorized
    trace of ``program`` on ``x [B, D]`` (no ``idx``: one image counts once, ``beta = 1``)."""
    elbo = IWAE_ELBO(num_particles=particles)
    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found sample sites configured for enumeration")
        model_trace, guide_trace = elbo._traces(program.model, program.guide, (x,), {})
    log_w, _ = elbo._log_weights(model_trace, guide_trace, reparameterized=False)
    out = {"log_w": log_w, "log_px": model_trace.nodes[program.data_site]["log_prob"].reshape(particles, -1)}
    for name in program.latent_sites:
        site = guide_trace.nodes[name]
        if site["fn"].has_enumerate_support:  # discrete: no active units
            continue
        try:
            mean = site["fn"].mean
        except NotImplementedError:  # no closed-form mean: the draws themselves
            mean = site["value"]
        mean = mean.expand(site["value"].shape)
        out[f"mean:{name}"] = mean.reshape(particles, x.shape[0], -1).mean(0)  # [B, numel]
    return out


@torch.no_grad()
def program_terms(program: Program, x: torch.Tensor, elbo_samples: int, iwae_k: int,
                  chunk: int) -> Dict[str, torch.Tensor]:
    r"""Per-image ``elbo``, ``reconstruction``, ``kl``, ``iwae`` (``[B]`` each) and the
    ``mean:SITE`` of every continuous latent site, from ``elbo_samples`` particles (the ELBO, the
    mean of :math:`\log w`) and ``iwae_k`` further ones (the bound, a log-mean-exp), in chunks of at
    most ``chunk`` particles per trace (memory bounded by the chunk, not by ``k``)."""
    sums: Dict[str, torch.Tensor] = {}
    for size in _chunks(elbo_samples, chunk):
        part = program_log_weights(program, x, size)
        for key, value in (("elbo", part["log_w"].sum(0)), ("reconstruction", part["log_px"].sum(0)),
                           *((k, v * size) for k, v in part.items() if k.startswith("mean:"))):
            sums[key] = sums[key] + value if key in sums else value
    terms = {key: value / elbo_samples for key, value in sums.items()}
    terms["kl"] = terms["reconstruction"] - terms["elbo"]
    total = x.new_full(x.shape[:1], -math.inf)  # [B], log sum_k w_k so far
    for size in _chunks(iwae_k, chunk):
        total = torch.logaddexp(total, program_log_weights(program, x, size)["log_w"].logsumexp(0))
    terms["iwae"] = total - math.log(iwae_k)
    return terms


def _chunks(total: int, chunk: int):
    """Sizes of at most ``chunk`` that add up to ``total``."""
    done = 0
    while done < total:
        size = min(chunk, total - done)
        yield size
        done += size
