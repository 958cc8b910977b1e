r"""Test-time inference for any guide: fit one Gaussian per image with the decoder frozen.

For images :math:`x_{1:B}` and a trained decoder :math:`\theta`, :func:`fit_local` solves

.. math::

    \lambda_i^\star = \arg\max_{\lambda_i = (\mu_i, \sigma_i)} \;
    \mathbb{E}_{\mathcal{N}(z; \mu_i, \sigma_i^2)}\big[\log p_\theta(x_i \mid z)\big]
    - \mathrm{KL}\big(\mathcal{N}(\mu_i, \sigma_i^2) \,\|\, \mathcal{N}(0, I)\big)

by SVI on the same Pyro ``model`` with a :class:`~pyro_vae.guides.MeanFieldGuide` over these images
(``TraceMeanField_ELBO``, Adam, only the local parameters move; with a learned prior, for which
no closed-form KL exists, Pyro's ``TraceMeanField_ELBO`` falls back to the Monte-Carlo
:math:`\log p(z) - \log q(z)`). :func:`fit_local_flow` fits a flow per image instead
(:math:`q^\star_{\text{flow}}`, ``Trace_ELBO``). Started from the encoder's output
it measures what the encoder leaves on the table: the *amortization gap* (Cremer et al. 2018).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ..core.progress import disable, tqdm
from ..program.guides import MeanFieldGuide
from ..program.local_flows import LocalFlowGuide

__all__ = ["LocalFit", "LocalFlowFit", "fit_local", "fit_local_flow", "encoder_gaussian", "frozen"]

INITS = ("zero", "encoder")


@dataclass
class LocalFit:
    """Result of :func:`fit_local`: per-image Gaussian parameters and the optimisation curve."""

    loc: torch.Tensor  # [B, z_dim]
    scale: torch.Tensor  # [B, z_dim]
    steps: List[int] = field(default_factory=list)  # steps at which `elbo` was recorded
    elbo: List[float] = field(default_factory=list)  # one-sample ELBO estimate, nats per image


@dataclass
class LocalFlowFit:
    """Result of :func:`fit_local_flow`: the fitted per-image flows and the optimisation curve."""

    guide: LocalFlowGuide  # guide.q(x, idx): q*_flow of rows idx of the fitted images
    steps: List[int] = field(default_factory=list)
    elbo: List[float] = field(default_factory=list)  # one-sample ELBO estimate, nats per image

    def posterior(self, x: torch.Tensor, idx: torch.Tensor):
        """For :func:`~pyro_vae.infer.evaluate.evaluate`'s ``posterior``: q*_flow of rows ``idx``."""
        with torch.no_grad():
            return self.guide.q(x, idx)


@torch.no_grad()
def encoder_gaussian(vae, x: torch.Tensor, seed: Optional[int] = 0, samples: int = 1000):
    """``(loc, scale)``, each ``[B, z_dim]``: the guide's diagonal Gaussian for ``x``, or for a guide
    whose q is none (``iaf``, ``full-rank``) the Gaussian with q's means and standard deviations,
    estimated from ``samples`` draws of q (a flow's base Gaussian can lie far from q itself)."""
    guide = vae.inference
    if getattr(guide, "diagonal", True):
        return guide.posterior(x)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0 if seed is None else seed)
        z = guide.q(x).sample((samples,))  # [S, B, z_dim]
    return z.mean(0), z.std(0).clamp_min(1e-4)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Temporarily stop gradients to a module's parameters (and put it in eval mode)."""
    flags = [p.requires_grad for p in module.parameters()]
    training = module.training
    module.requires_grad_(False).train(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(training)


def fit_local(
    run_or_vae,
    x: torch.Tensor,
    steps: int = 500,
    init: str = "encoder",
    lr: float = 1e-2,
    seed: Optional[int] = 0,
    record_every: int = 10,
    progress: bool = False,
) -> LocalFit:
    """Optimise a Gaussian q(z_i) for each image of ``x [B, 784]`` (binarized as it is to be
    scored), the decoder frozen.

    :param init: ``"zero"`` (start at N(0, I)) or ``"encoder"`` (start at the guide's amortized
        output, :func:`encoder_gaussian`; falls back to ``"zero"`` for guides without an encoder).
    :param steps: Adam steps on the summed ELBO of the batch (each image's gradient is its own),
        with the learning rate decayed linearly from ``lr`` to 0.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")
    vae = getattr(run_or_vae, "vae", run_or_vae)
    x = x.to(next(vae.parameters()).device)
    guide = MeanFieldGuide(x.shape[0], vae.config.z_dim, sparse=False).to(x.device)
    if init == "encoder" and vae.inference.amortized:
        guide.set(*encoder_gaussian(vae, x, seed))
    elbo = TraceMeanField_ELBO()
    result = LocalFit(loc=torch.empty(0), scale=torch.empty(0))
    rng = torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        _optimise(vae, guide, x, elbo, steps, lr, record_every, progress, result, desc="local fit")
    with torch.no_grad():
        result.loc, result.scale = (t.detach() for t in guide.posterior(x))
    return result


def fit_local_flow(
    run_or_vae,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    steps: int = 500,
    flow_steps: int = 2,
    lr: float = 1e-2,
    seed: Optional[int] = 0,
    record_every: int = 10,
    progress: bool = False,
    start: Optional[LocalFlowGuide] = None,
) -> LocalFlowFit:
    r"""Optimise a flow :math:`q_i` per image of ``x [B, D]`` (:class:`~pyro_vae.program.local_flows.LocalFlowGuide`:
    own base Gaussian, own ``flow_steps`` IAF networks), the decoder frozen: :math:`q^\star_{\text{flow}}`.

    Starts at the Gaussians ``loc``, ``scale`` (``[B, z_dim]``, e.g. :func:`fit_local`'s
    :math:`q^\star_{\text{FFG}}`) with identity flows, or at ``start`` (e.g.
    ``LocalFlowGuide.from_guide(iaf_guide, x)``: the iaf guide's own q, copied per image), then
    ``steps`` Adam steps on the summed ELBO (``Trace_ELBO``: no closed-form KL for a flow),
    learning rate decayed linearly to 0."""
    vae = getattr(run_or_vae, "vae", run_or_vae)
    device = next(vae.parameters()).device
    x = x.to(device)
    rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        guide = start.to(device) if start is not None else LocalFlowGuide(loc.to(device), scale.to(device),
                                                                            flow_steps).to(device)
        result = LocalFlowFit(guide=guide)
        _optimise(vae, guide, x, Trace_ELBO(), steps, lr, record_every, progress, result)
    return result


def _optimise(vae, guide, x, elbo, steps: int, lr: float, record_every: int, progress: bool, result,
              desc: str = "local flow fit") -> None:
    """Adam on ``guide``'s parameters only (decoder frozen), learning rate decayed linearly to 0;
    records the ELBO per image into ``result.steps``/``result.elbo``."""
    optimizer = torch.optim.Adam(guide.parameters(), lr=lr)
    # the gradients are one-sample estimates: decay the step size linearly to 0 so the fit
    # settles at the optimum instead of wandering around it at the noise floor
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 - t / max(steps, 1))
    with frozen(vae), torch.enable_grad():
        for step in tqdm(range(steps + 1), desc=desc, leave=False, disable=disable(progress)):
            loss = elbo.differentiable_loss(vae.model, guide, x)  # -sum_i ELBO_i
            if step % record_every == 0 or step == steps:
                result.steps.append(step)
                result.elbo.append(-loss.item() / x.shape[0])
            if step == steps:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
