r"""Importance-weighted objectives for a local-latent model with a subsampled ``data`` plate:
the IWAE bound (Burda, Grosse & Salakhutdinov 2016) and its doubly reparameterized gradient
(DReG; Tucker, Lawson, Gu & Maddison 2019), as Pyro ELBOs on ``VAE.model``/``VAE.guide``.

For image :math:`i` and :math:`K` draws :math:`z_{ik} \sim q(z \mid x_i)`, the log weights

.. math::

    \log w_{ik} = \log p_\theta(x_i \mid z_{ik}) + \beta\big(\log p(z_{ik}) - \log q_\phi(z_{ik} \mid x_i)\big)

give the per-image bound and, on a minibatch :math:`B` of :math:`N` images, its unbiased estimate

.. math::

    \mathcal{L}_K(x_i) = \log \frac{1}{K} \sum_{k=1}^K w_{ik} \le \log p_\theta(x_i),
    \qquad \widehat{\mathcal{L}}_K = \frac{N}{B} \sum_{i \in B} \mathcal{L}_K(x_i).

The log-mean-exp is taken per image, inside the ``data`` plate; the plate's :math:`N/B` multiplies
the bound outside it. :math:`\beta` is what ``poutine.scale(beta)`` puts on the latent site: it
weights :math:`\log p(z) - \log q(z)` *inside* each log weight (a tempered weight), so that with
:math:`K = 1` the objective is exactly ``Trace_ELBO``'s :math:`\beta`-ELBO; only :math:`\beta = 1`
is a bound on :math:`\log p(x)`.

**What Pyro's** ``RenyiELBO(alpha=0)`` **computes instead.** With every site inside the ``data``
plate, no plate dim is summed before its log-sum-exp (``get_dependent_plate_dims`` is empty), and it
uses ``site["log_prob"]``, which already carries the plate's :math:`N/B`:

.. math::

    \text{RenyiELBO}_{\alpha=0} = \sum_{i \in B} \Big[\log \sum_k \exp\big(\tfrac{N}{B} \log w_{ik}\big) - \log K\Big].

That is the log-mean-exp per image (not of the whole minibatch's summed weight) but with the
:math:`N/B` inside the exponential: equal to :math:`\widehat{\mathcal{L}}_K` only when
:math:`B = N`; under subsampling it is neither the IWAE bound nor an unbiased estimate of it,
it weights the particles as if the image were seen :math:`N/B` times (its normalised weights are
:math:`\propto w_{ik}^{N/B}`, near one-hot). ``tests/test_iwae.py`` checks both statements (this is
what pyro-ppl/pyro#3104 calls suboptimal or incorrect for local latents).

**DReG.** The IWAE gradient for the encoder has a score-function part
:math:`\tilde w_{ik} \nabla_\phi \log q_\phi(z_{ik})` whose variance does not fall with
:math:`K` (Rainforth et al. 2018). Tucker et al. rewrite it with a second reparameterization:

.. math::

    \nabla_\phi \mathcal{L}_K = \mathbb{E}\Big[\sum_k \tilde w_{ik}^2\,
    \frac{\partial \log w_{ik}}{\partial z_{ik}} \frac{\partial z_{ik}}{\partial \phi}\Big],
    \qquad \nabla_\theta \mathcal{L}_K = \mathbb{E}\Big[\sum_k \tilde w_{ik} \nabla_\theta \log p_\theta(x_i, z_{ik})\Big],

:math:`\tilde w_{ik} = w_{ik} / \sum_{k'} w_{ik'}`, with :math:`\log q` evaluated at *stopped*
parameters. :class:`DReG_ELBO`'s surrogate is :math:`\frac{N}{B}\sum_{ik} \mathrm{sg}(\tilde w_{ik})
\log w^{\mathrm{sg}(\phi)}_{ik}` with a gradient hook on each latent value that multiplies the
gradient reaching :math:`z_{ik}` by :math:`\tilde w_{ik}`: the decoder (and prior) parameters get
:math:`\tilde w`, the path to :math:`\phi` gets :math:`\tilde w^2`. The identity holds for
:math:`\beta = 1`; with :math:`\beta \ne 1` the DReG gradient is only an approximation.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

__all__ = ["IWAE_ELBO", "DReG_ELBO", "plate_scale", "stop_gradient", "iwae_bound", "dreg_loss"]


def plate_scale(site: dict) -> float:
    """The subsample scale :math:`N/B` of the plates around ``site`` (their ``full_size / size``)."""
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.vectorized:
            scale *= frame.full_size / frame.size
    return scale


def stop_gradient(fn):
    """A copy of the distribution ``fn`` whose parameters are detached (:math:`\\mathrm{sg}(\\phi)`).

    ``Independent`` and distributions built from their ``arg_constraints`` (Normal, ...) are
    handled; others (e.g. a transformed distribution with learnable transforms) raise ``NotImplementedError``."""
    if isinstance(fn, torch.distributions.Independent):
        return type(fn)(stop_gradient(fn.base_dist), fn.reinterpreted_batch_ndims)
    params = {name: getattr(fn, name).detach() for name in fn.arg_constraints if name in fn.__dict__}
    if isinstance(fn, torch.distributions.TransformedDistribution) or not params:
        raise NotImplementedError(f"DReG needs the guide's {type(fn).__name__} with detachable parameters")
    return type(fn)(**params)


class IWAE_ELBO(Trace_ELBO):
    r"""The importance-weighted bound :math:`\widehat{\mathcal{L}}_K` (module docstring) with
    :math:`K` = ``num_particles`` vectorised particles (the leftmost dim), per image in the
    ``data`` plate (at dim -1). Every latent site must be reparameterized and every site must be
    inside that plate (a local-latent model, as ``VAE.model``). ``K = 1``: exactly ``Trace_ELBO``.

    :param int num_particles: :math:`K`.
    :param int max_plate_nesting: plates in the model (1: the ``data`` plate).
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1, strict_enumeration_warning: bool = True):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True, strict_enumeration_warning=strict_enumeration_warning)

    def _log_weights(self, model_trace, guide_trace, stop_guide: bool = False, reparameterized: bool = True):
        """``(log_w [K, B], N/B)``: per-image log weights without the plate scale (the ``beta``
        of ``poutine.scale`` kept), summed over *every* sample site of the model (latent and
        observed) minus every site of the guide; ``stop_guide``: log q at detached parameters
        (DReG); ``reparameterized``: refuse guide sites without ``rsample`` (training; scoring
        needs no gradient through the draws)."""
        log_w, scale = 0.0, None
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if sign < 0 and reparameterized and not site["fn"].has_rsample:
                    raise NotImplementedError(f"{type(self).__name__} needs a reparameterized guide; site {name!r} is not")
                if not any(f.dim == -1 for f in site["cond_indep_stack"]):
                    raise ValueError(f"{type(self).__name__}: every site must be inside the data plate (dim -1); "
                                     f"{name!r} is not: a global latent has no per-image weight")
                scale = s = plate_scale(site)
                log_prob = site["log_prob"]  # [K, B] (or [B] when K = 1), scaled by N/B and beta
                if stop_guide and sign < 0:
                    log_prob = scale_and_mask(stop_gradient(site["fn"]).log_prob(site["value"]), site["scale"], site["mask"])
                log_w = log_w + sign * log_prob / s
        return log_w.reshape(self.num_particles, -1), scale  # [K, B]

    def _traces(self, model, guide, args, kwargs):
        return next(iter(self._get_traces(model, guide, args, kwargs)))

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        """:returns: :math:`-\\widehat{\\mathcal{L}}_K`, a float."""
        log_w, scale = self._log_weights(*self._traces(model, guide, args, kwargs))
        loss = -torch_item(iwae_bound(log_w).sum()) * scale
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """:math:`-\\widehat{\\mathcal{L}}_K` whose gradient is the IWAE gradient
        :math:`\\frac{N}{B}\\sum_{ik} \\tilde w_{ik} \\nabla \\log w_{ik}`."""
        log_w, scale = self._log_weights(*self._traces(model, guide, args, kwargs))
        loss = -iwae_bound(log_w).sum() * scale
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class DReG_ELBO(IWAE_ELBO):
    r"""The same bound as :class:`IWAE_ELBO`; the gradient is the doubly reparameterized one
    (module docstring): :math:`\tilde w` for the model's parameters, :math:`\tilde w^2` along the
    reparameterized path to the guide's, no score-function term."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        model_trace, guide_trace = self._traces(model, guide, args, kwargs)
        log_w, scale = self._log_weights(model_trace, guide_trace, stop_guide=True)  # [K, B], log q at sg(phi)
        latents = [site["value"] for site in guide_trace.nodes.values() if site["type"] == "sample"]
        loss = dreg_loss(log_w, scale, latents)
        warn_if_nan(loss, "loss")
        return loss


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """Per-image :math:`\\log \\frac1K \\sum_k w_{ik}` from ``log_w [K, B]``: ``[B]``."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def dreg_loss(log_w: torch.Tensor, scale: float, latents) -> torch.Tensor:
    """:math:`-\\widehat{\\mathcal{L}}_K` with the DReG gradient, from ``log_w [K, B]`` computed
    with log q at stopped parameters and the reparameterized ``latents`` (each ``[K, B, ...]`` or
    ``[B, ...]`` when K = 1) that ``log_w`` depends on: a hook multiplies each one's gradient by
    :math:`\\tilde w` (so the path to :math:`\\phi` gets :math:`\\tilde w^2`)."""
    bound = iwae_bound(log_w.detach())  # [B]; the value does not depend on the stop-gradient
    weights = (log_w.detach() - torch.logsumexp(log_w.detach(), 0)).exp()  # w~ [K, B]
    for z in latents:
        if z.requires_grad:
            unstacked = weights.shape[0] == 1 and z.shape[0] != 1  # K = 1 without a particle dim: z [B, ...]
            z.register_hook(_times(weights[0] if unstacked else weights))
    surrogate = (weights * log_w).sum() * scale
    return -bound.sum() * scale - (surrogate - surrogate.detach())


def _times(weights: torch.Tensor):
    """Gradient hook: multiply the gradient of a latent value ``[K, B, *event]`` by ``weights [K, B]``
    (or ``[B, *event]`` by ``[B]``)."""
    def hook(grad):
        return grad * weights.reshape(weights.shape + (1,) * (grad.dim() - weights.dim()))
    return hook
