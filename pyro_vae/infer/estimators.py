r"""Gradient estimators of the ELBO: reparameterization versus score function.

For one image write the ELBO as an expectation under the guide,

.. math::

    \mathcal{L}(\theta, \phi) = \mathbb{E}_{q_\phi(z)}\big[f_{\theta, \phi}(z)\big], \qquad
    f_{\theta, \phi}(z) = \log p_\theta(x, z) - \log q_\phi(z).

The decoder gradient :math:`\nabla_\theta \mathcal{L} = \mathbb{E}_q[\nabla_\theta \log p_\theta(x, z)]`
is the same for both estimators (the same z, the same distribution). They differ in the guide's
gradient :math:`\nabla_\phi \mathcal{L}`, where the sampling distribution itself depends on
:math:`\phi`:

.. math::

    \text{reparameterization:}\quad \nabla_\phi \mathcal{L}
        &= \mathbb{E}_{\epsilon \sim \mathcal{N}(0, I)}\big[\nabla_\phi f(t_\phi(\epsilon))\big],
        \qquad z = t_\phi(\epsilon) = \mu_\phi + \sigma_\phi \odot \epsilon \\
    \text{score function:}\quad \nabla_\phi \mathcal{L}
        &= \mathbb{E}_{q_\phi(z)}\big[(f(z) - b)\, \nabla_\phi \log q_\phi(z)\big]

The score-function (REINFORCE) estimator is black-box VI in its original form (Ranganath et
al. 2014): it needs only :math:`\log q` and its gradient, not a differentiable :math:`f`, and any
baseline :math:`b` that does not depend on :math:`z` keeps it unbiased because
:math:`\mathbb{E}_q[\nabla_\phi \log q_\phi(z)] = 0`. It is far noisier: it scores whole
log-densities instead of following the gradient of :math:`f` along :math:`z`.

In Pyro, a guide site whose distribution has ``has_rsample == False`` is sampled without a
pathwise gradient, and ``Trace_ELBO`` adds the score-function surrogate
:math:`\log q_\phi(z) \cdot \mathrm{stop\_grad}(f(z))` for it. ``Trace_ELBO`` ignores baselines;
``TraceGraph_ELBO`` reads them from the site's ``infer={"baseline": {...}}``. This module

- gives ``TraceGraph_ELBO`` the ``differentiable_loss`` the training loop calls
  (:class:`DifferentiableTraceGraph_ELBO`), keeping one decaying average per minibatch size;
- switches a guide's estimator for a while (:func:`estimator_mode`).

The guide's side, the site's ``has_rsample`` flag and its baseline options (``decaying-avg``:
``use_decaying_avg_baseline``; ``neural``: the decaying average plus a
:class:`~pyro_vae.program.sites.BaselineNet` of :math:`x`, as in NVIL, Mnih and Gregor 2014), is in
:mod:`pyro_vae.program.sites`; the variance lab in :mod:`pyro_vae.experiments.variance_lab`.
"""

from __future__ import annotations

import contextlib

import pyro
import torch
from pyro.infer import TraceGraph_ELBO
from torch import nn

from ..core.errors import ConfigError
from ..program.sites import baseline_net, set_estimator

__all__ = ["estimator_mode", "DifferentiableTraceGraph_ELBO", "baseline_elbo", "fresh_averages"]

_AVG_PREFIX = "__baseline_avg_downstream_cost_"  # Pyro's param-store name of a decaying average


@contextlib.contextmanager
def estimator_mode(guide: nn.Module, estimator: str, baseline: str = "none"):
    """Temporarily switch ``guide`` to another estimator (a neural baseline needs its network)."""
    saved = getattr(guide, "estimator", "reparam"), getattr(guide, "baseline", "none")
    if baseline == "neural" and baseline_net(guide) is None:
        raise ConfigError("the neural baseline needs a run trained with --estimator score --baseline neural")
    set_estimator(guide, estimator, baseline)
    try:
        yield guide
    finally:
        guide.estimator, guide.baseline = saved


# ---------------------------------------------------------------------------- the ELBO


class DifferentiableTraceGraph_ELBO(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` (the Pyro ELBO that implements baselines) with the
    ``differentiable_loss`` of ``Trace_ELBO``: its value is the :math:`-\\mathrm{ELBO}` estimate,
    its gradient that of the surrogate loss (score-function terms with baselines, plus the
    baselines' own squared-error loss, whose gradient reaches only the baseline network).

    Pyro keeps a decaying-average baseline in the param store, shaped like the minibatch's costs
    (``[B]``, or ``[P, B]`` with vectorised particles), and fails on a minibatch of another size.
    The last, smaller minibatch of an epoch (whose costs also carry another :math:`N / B` scale)
    therefore gets its own average: before each call, averages of another batch size are parked
    in the param store under ``name@B`` and the one for this batch size is brought back. All of
    them stay in the param store, so checkpoints save them.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if args and torch.is_tensor(args[0]):
            _select_averages(args[0].shape[0])
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _select_averages(batch: int) -> None:
    """Park the decaying averages of other batch sizes; bring back those of ``batch``."""
    store = pyro.get_param_store()
    names = [n for n in store.keys() if n.startswith(_AVG_PREFIX)]
    for name in names:  # active averages: the last dim is the batch
        if "@" not in name and store[name].shape[-1] != batch:
            store[f"{name}@{store[name].shape[-1]}"] = store[name].detach()
            del store[name]
    for name in names:
        if name.endswith(f"@{batch}"):
            store[name.rsplit("@", 1)[0]] = store[name].detach()
            del store[name]


@contextlib.contextmanager
def fresh_averages():
    """Run with no decaying-average baselines in the param store; put back the ones there before."""
    store = pyro.get_param_store()

    def pop():
        names = [n for n in store.keys() if n.startswith(_AVG_PREFIX)]
        values = {n: store[n].detach() for n in names}
        for n in names:
            del store[n]
        return values

    outside = pop()
    try:
        yield
    finally:
        pop()
        for name, value in outside.items():
            store[name] = value


def baseline_elbo(num_particles: int = 1) -> DifferentiableTraceGraph_ELBO:
    """The ELBO for score-function training with a baseline; particles are vectorised (the
    decaying average then has one slot per particle and image, ``[P, B]``)."""
    return DifferentiableTraceGraph_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


# ---------------------------------------------------------------------------- the variance lab


# ---------------------------------------------------------------------------- reports


# ---------------------------------------------------------------------------- command line


