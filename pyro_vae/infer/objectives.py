r"""The objectives SVI minimises: Pyro's ELBO estimators on any program's ``model``/``guide``
(:class:`~pyro_vae.program.contract.Program`), the fused equivalent for programs that offer it
(:mod:`pyro_vae.infer.fused`), and the optimizers that step them.

Which estimator a program gets is read from its
:class:`~pyro_vae.program.contract.Capabilities`, never from its class: ``enumerate`` gives
``TraceEnum_ELBO`` (discrete sites summed out), otherwise the config's ELBO or importance-weighted
objective; ``fused`` allows :mod:`~pyro_vae.infer.fused`, and a program without it trains on Pyro's
traced path (said once in the log).
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from ..program.contract import Program, program_name
from .estimators import baseline_elbo
from .fused import fused_available, fused_elbo_loss, fused_iwae_loss
from .iwae import DReG_ELBO, IWAE_ELBO

__all__ = ["make_elbo", "training_elbo", "scoring_elbo", "make_loss", "fallbacks", "check_fused", "make_optimizer",
           "Optimizers", "elbo_per_image"]

def make_elbo(config: VAEConfig):
    """The Pyro ELBO (a ``pyro.infer.ELBO``) that ``config.objective`` names: the ELBO estimator
    of ``config.elbo``, or the importance-weighted bound with K = ``num_particles``
    (:mod:`pyro_vae.infer.iwae`)."""
    return OBJECTIVES[config.objective](config)


def _elbo(config: VAEConfig):
    """The ELBO estimator that ``config.elbo`` names; several particles are vectorised.
    Score-function baselines need ``TraceGraph_ELBO`` (``Trace_ELBO`` ignores them)."""
    if config.estimator == "score" and config.baseline != "none":
        return baseline_elbo(config.num_particles)
    cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "jit": JitTrace_ELBO}[config.elbo]
    vectorize = config.num_particles > 1
    return cls(num_particles=config.num_particles, vectorize_particles=vectorize, max_plate_nesting=1)


OBJECTIVES = {  # config.objective -> the Pyro ELBO for a config
    "elbo": _elbo,
    "iwae": lambda config: IWAE_ELBO(num_particles=config.num_particles),
    "dreg": lambda config: DReG_ELBO(num_particles=config.num_particles),
}



def training_elbo(program: Program, config: VAEConfig):
    """The Pyro ELBO that trains ``program``: with the ``enumerate`` capability ``TraceEnum_ELBO``
    (its discrete sites summed out; the importance-weighted objectives are refused), else
    :func:`make_elbo`."""
    if not program.capabilities.enumerate:
        return make_elbo(config)
    if config.objective != "elbo":
        raise ConfigError(f"objective={config.objective} weights sampled latents; {type(program).__name__} enumerates "
                          "its discrete sites (capabilities.enumerate): use objective=elbo")
    vectorize = config.num_particles > 1
    return TraceEnum_ELBO(num_particles=config.num_particles, vectorize_particles=vectorize, max_plate_nesting=1)


def scoring_elbo(program: Program):
    """The estimator of the validation ELBO: ``TraceEnum_ELBO`` for a program that enumerates,
    ``TraceMeanField_ELBO`` (closed-form KL) for one with ``analytic_kl``, else ``Trace_ELBO``."""
    capabilities = program.capabilities
    if capabilities.enumerate:
        return TraceEnum_ELBO(max_plate_nesting=1)
    return TraceMeanField_ELBO() if capabilities.analytic_kl else Trace_ELBO()


class Optimizers:
    """Several torch optimizers stepped as one, with the single-optimizer interface."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def make_loss(program: Program, config: VAEConfig):
    """``loss(x, idx, num_data, beta)``: a differentiable estimate of the full-data -ELBO (or of the
    configured objective), with ``program.step_arguments()`` drawn for every call.

    Pyro's ``ELBO.differentiable_loss`` on ``program.model``/``program.guide``
    (:func:`training_elbo`); where ``config.fused``, the program has the ``fused`` capability and
    the fused estimate is exact, :func:`~pyro_vae.fused.fused_elbo_loss`, the same estimate without
    tracing.
    """
    if config.fused and fused_available(config) and program.capabilities.fused:
        def loss(x, idx, num_data, beta, noise_rows=None):
            return fused_loss(program, config, x, idx, num_data, beta, noise_rows)

        loss.fused = True
        return loss
    elbo = training_elbo(program, config)

    def loss(x, idx, num_data, beta):  # num_data, beta by keyword: JitTrace_ELBO traces tensors only
        extra = program.step_arguments()  # drawn before the ELBO's own draws, every step
        return elbo.differentiable_loss(program.model, program.guide, x, idx, num_data=num_data, beta=beta, **extra)

    loss.fused = False
    return loss


def fallbacks(program: Program, config: VAEConfig, validation: bool) -> Optional[str]:
    """One line saying where ``program`` lacks a closed form that ``config`` would use, and what
    runs instead (``None`` when it lacks none): the fused loss (Pyro's traced ELBO trains it) and,
    with ``validation``, the analytic KL (``Trace_ELBO`` scores the validation ELBO)."""
    capabilities, instead = program.capabilities, []
    if config.fused and fused_available(config) and not capabilities.fused:
        instead.append(f"Pyro's traced {type(training_elbo(program, config)).__name__} trains it (no fused loss)")
    if validation and not (capabilities.analytic_kl or capabilities.enumerate):
        instead.append("Trace_ELBO scores the validation ELBO, one draw per image (no closed-form KL)")
    if not instead:
        return None
    return f"{program_name(program)}: " + "; ".join(instead) + " (capabilities.fused, capabilities.analytic_kl)"


def fused_loss(vae, config: VAEConfig, x, idx, num_data, beta, noise_rows=None) -> torch.Tensor:
    """The fused estimate of what :func:`make_elbo` computes (where :func:`fused_available`)."""
    if config.objective == "elbo":
        return fused_elbo_loss(vae, x, idx, num_data, beta, config.elbo == "meanfield", noise_rows)
    return fused_iwae_loss(vae, x, idx, num_data, beta, config.num_particles, config.objective == "dreg", noise_rows)


def make_optimizer(vae: Program, config: VAEConfig):
    """One ``torch.optim.Adam`` over all parameters; with per-datapoint (sparse) parameters, a
    ``SparseAdam`` for those, so a minibatch step moves only the rows of its images.

    ``foreach=True``: the multi-tensor update, torch's default on CUDA but not on CPU, where the
    one-tensor-at-a-time loop costs about 0.1 ms per parameter tensor and step (15% of a step of
    the two-layer model at batch 20, timed alone); the numbers it computes are the same."""
    sparse = [p for m in vae.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    dense = [p for p in vae.parameters() if all(p is not q for q in sparse)]
    adam = torch.optim.Adam(dense, lr=config.lr, betas=(config.adam_beta1, 0.999), foreach=True)
    if not sparse:
        return adam
    return Optimizers(adam, torch.optim.SparseAdam(sparse, lr=config.local_lr))


@torch.no_grad()
def elbo_per_image(vae: Program, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> float:
    """The ELBO in nats per image, one draw of the latents per image, by :func:`scoring_elbo`: the
    analytic KL (``TraceMeanField_ELBO``) where the program has it, enumerated sites summed out.

    Uses its own seeded random stream so calling it does not change the training stream.
    """
    elbo = scoring_elbo(vae)
    devices = [x.device] if x.device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for chunk in x.split(batch_size):
            total += elbo.loss(vae.model, vae.guide, chunk)
    return -total / x.shape[0]


def check_fused(vae, config: VAEConfig, x, idx, num_data, beta: float = 1.0, rtol: float = 1e-4,
                binarize: bool = False) -> None:
    """Compare :func:`fused_loss` with the Pyro ELBO on one minibatch (same seed); raise
    ``RuntimeError`` if they differ, e.g. after a change to the model that the fused path lacks.
    ``binarize``: draw a binarization of ``x`` first. The check draws from its own random stream,
    so training with and without the fused path draws the same numbers."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        if binarize:
            x = torch.bernoulli(x)
        torch.manual_seed(0)
        reference = make_elbo(config).loss(vae.model, vae.guide, x, idx, num_data=num_data, beta=beta)
        torch.manual_seed(0)
        fused = fused_loss(vae, config, x, idx, num_data, beta).item()
    if abs(fused - reference) > rtol * abs(reference) + 1e-3:
        raise RuntimeError(f"fused ELBO {fused} differs from Pyro's {reference}: run with fused=False")
