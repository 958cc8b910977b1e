r"""The program contract: what the inference layer needs of a probabilistic program, in one place.

A *program* is an ``nn.Module`` with a generative ``model`` and a ``guide``, both called as

.. code-block:: python

    program.model(x, idx=None, num_data=None, beta=1.0)
    program.guide(x, idx=None, num_data=None, beta=1.0)

for a batch ``x [B, D]`` of flat data (``D = prod(event_shape)``), the rows ``idx [B]`` of the
batch in the training set, its size ``num_data`` and the KL weight ``beta``. Both open the
package's ``data`` plate, :func:`~pyro_vae.program.plates.data_plate` ``(x, idx, num_data)``,
around everything that belongs to one image, and every site inside it scores one number per image
(batch shape ``[B]``; use ``.to_event``). On a minibatch of :math:`B` of :math:`N` images the plate
scales each log-density by :math:`N/B`, so every Pyro ELBO on ``(model, guide)`` estimates the
full-data objective. ``beta`` weights the latent sites: model and guide put
``poutine.scale(scale=beta)`` around them (not around the observed ``data_site``), so the
objective is

.. math::

    \mathcal{L}_\beta = \sum_{i=1}^{N} \mathbb{E}_{q(z_i \mid x_i)}\Big[\log p_\theta(x_i \mid z_i)
    + \beta \big(\log p_\theta(z_i) - \log q_\phi(z_i \mid x_i)\big)\Big],

where :math:`z_i` stands for all latent sites of image :math:`i` (``latent_sites``), and
:math:`\beta = 1` is the ELBO, a lower bound on :math:`\log p_\theta(x_{1:N})`.

What the layers above need and may not guess is written on :class:`Program`: the names of the
latent sites and of the observed site, the shape of one datum, what a figure's samples and
reconstructions are, and the :class:`Capabilities` that let the inference layer choose an
estimator without knowing the program's class. :func:`check_program` traces a program once on a
tiny batch and says in one line what is missing. ``fit(config, program=P)``,
``load_run(path, program=P)`` and ``evaluate(P or run, images)`` take any :class:`Program`.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..core.config import VAEConfig
from ..core.errors import ConfigError

__all__ = ["Capabilities", "Program", "as_program", "program_name", "record_program", "check_program", "DATA_PLATE"]

#: what ``pyro.module`` puts between a module's name and its parameters' names in the param store
_MODULE_DIVIDER = "$$$"
#: the name of the plate over images that model and guide open (:func:`~pyro_vae.program.plates.data_plate`)
DATA_PLATE = "data"


@dataclass(frozen=True)
class Capabilities:
    """What a program offers beyond the contract; the inference layer reads these flags, never
    the program's class. Each defaults to what any program can do.

    :param enumerate: the guide marks discrete sites ``infer={"enumerate": "parallel"}``: training and
        the validation ELBO use ``TraceEnum_ELBO`` (the sites summed out exactly); ``iwae``/``dreg``
        are refused.
    :param analytic_kl: the validation ELBO may use ``TraceMeanField_ELBO`` (the KL of each latent site
        in closed form where torch has one, a draw elsewhere); otherwise ``Trace_ELBO``.
    :param fused: the program has the built-in VAE's pieces (``inference.posterior``, ``prior(B)``,
        ``likelihood(z)``, ``decode(z)``, ``config.likelihood``) from which
        :mod:`pyro_vae.infer.fused` computes the same loss without tracing.
    :param gaussian_guide: ``program.inference`` is a :class:`~pyro_vae.program.guides.Guide` with a
        single latent site ``z``: ``posterior(x, idx) -> (loc, scale)`` (or ``q(x, idx)``) and
        ``decode_mean(z)``; used by ``Run.encode``, evaluate's per-image-seeded path, the
        TensorBoard probes and the latent-space figures (others use traces instead, or skip).
    :param amortized: the guide gives q(z|x) for images it was not trained on (validation ELBO).
    :param data_parallel: ``torchrun`` may shard its minibatches over processes (False: e.g. free
        parameters per image, or :meth:`Program.step_arguments` that every process would repeat).
    """

    enumerate: bool = False
    analytic_kl: bool = False
    fused: bool = False
    gaussian_guide: bool = False
    amortized: bool = True
    data_parallel: bool = True


class Program(nn.Module, abc.ABC):
    """Base class of a probabilistic program (module docstring): subclass it, set
    ``latent_sites`` and ``event_shape``, write ``model`` and ``guide``.

    Its parameters are the module's own (``nn.Parameter``, submodules, ``PyroModule``
    parameters): ``fit`` optimises, checkpoints and restores exactly those; register submodules
    with ``pyro.module(name, module)`` as usual. Parameters are initialised when you construct the
    program (seed before constructing it for a reproducible start).

    :cvar latent_sites: names of the latent sample sites of one image (every one sampled by the
        guide, scored by the model, inside the ``data`` plate). ``evaluate`` weights all of them.
    :cvar data_site: the observed site ``pyro.sample(data_site, p(x | ...), obs=x)`` of the model.
    :cvar capabilities: :class:`Capabilities` (a class attribute or a property).
    :ivar event_shape: the shape of one datum, e.g. ``(1, 28, 28)``; ``x`` is given flat, ``[B, D]``.
    """

    latent_sites: Tuple[str, ...] = ()
    data_site: str = "x"
    capabilities: Capabilities = Capabilities()
    event_shape: Tuple[int, ...] = ()

    @abc.abstractmethod
    def model(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
              beta: float = 1.0):
        """p(x, z): samples ``latent_sites`` and observes ``data_site`` inside the ``data`` plate."""

    @abc.abstractmethod
    def guide(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
              beta: float = 1.0):
        """q(z|x): samples every one of ``latent_sites`` inside the ``data`` plate."""

    @property
    def program_class(self) -> type:
        """The class a run records and messages name (:func:`program_name`); an adapter around
        another module (:class:`~pyro_vae.program.pyro_style.PyroStyleProgram`): the class it wraps."""
        return type(self)

    def step_arguments(self) -> Dict[str, Any]:
        """Keyword arguments that ``model`` and ``guide`` take in a training step beside
        ``(x, idx, num_data, beta)``, drawn afresh each step (from torch's seeded stream, so a
        resumed run draws the same); scoring calls them without. Default: none."""
        return {}

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        r"""``[n, D]`` decoded prior samples for figures: :math:`\mathbb{E}[x \mid z]`, :math:`z \sim p(z)`,
        the mean of ``data_site`` in a trace of ``model`` (its observed values are ignored).
        ``seed``: a private seeded stream (the global one untouched)."""
        x = torch.zeros(n, _numel(self.event_shape), device=_device(self))
        with _seeded(seed, x.device):
            trace = poutine.trace(self.model).get_trace(x)
        return trace.nodes[self.data_site]["fn"].mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        r"""``[B, D]`` reconstructions for figures: :math:`\mathbb{E}[x \mid z]` for one draw
        :math:`z \sim q(z \mid x)` (as Pyro's VAE example draws it): the guide traced, the model
        replayed on its draws, the mean of ``data_site``."""
        guide_trace = poutine.trace(self.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(x)
        return model_trace.nodes[self.data_site]["fn"].mean


def program_name(program: nn.Module) -> str:
    """``module.QualName`` of the program's class (what a run folder records)."""
    cls = program.program_class if isinstance(program, Program) else type(program)
    return f"{cls.__module__}.{cls.__qualname__}"


def record_program(config: VAEConfig, program: Program) -> VAEConfig:
    """``config`` of a run of ``program``: ``config.program`` names its class; a one-line
    :class:`ConfigError` when ``config.model`` names a built-in program besides it."""
    if config.model != VAEConfig.model:
        raise ConfigError(f"model={config.model} names a built-in program; with program= leave model at its default")
    return config.replace(program=program_name(program))


def as_program(program) -> Program:
    """``program`` when it is a :class:`Program`; a one-line :class:`ConfigError` otherwise."""
    if isinstance(program, Program):
        return program
    raise ConfigError(f"program= takes a pyro_vae.Program (model/guide of (x, idx, num_data, beta), latent_sites, "
                      f"event_shape); got {type(program).__name__}")


def _numel(shape) -> int:
    size = 1
    for d in shape:
        size *= int(d)
    return size


def _device(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _seeded(seed: Optional[int], device: torch.device):
    """A forked random stream seeded with ``seed``; the global stream when ``seed`` is ``None``."""
    if seed is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed)
    return stack


# ----------------------------------------------------------------------------- the check


def check_program(program: Program, x: torch.Tensor, idx: Optional[torch.Tensor] = None,
                  num_data: Optional[int] = None, reparameterized: bool = False) -> None:
    """Trace ``guide`` and ``model`` (replayed on the guide's draws) once on the small batch ``x``
    and raise a one-line :class:`ConfigError` naming what is missing: a declared latent site that
    model or guide does not sample, a latent site the other does not have, no observed
    ``data_site``, a site outside the ``data`` plate or with more than one number per image, a
    ``pyro.param`` that is not the module's parameter, and (``reparameterized``, for the IWAE and
    DReG objectives) a guide site without ``rsample``. Draws from a forked stream."""
    name = program.program_class.__name__
    if not program.latent_sites:
        raise ConfigError(f"{name} declares no latent_sites (the names of its latent sample sites)")
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        guide_trace, model_trace = _traces(program, name, x, idx, num_data)
    guide_sites, model_latent, observed = _sample_sites(guide_trace), *_model_sites(model_trace)
    _check_names(program, name, guide_sites, model_latent, observed)
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for site in _sample_sites(trace).values():
            _check_site(f"site {site['name']!r} of {name}.{role}", site, x.shape[0])
        _check_params(program, name, role, trace)
    if reparameterized:
        plain = [s for s, site in guide_sites.items() if not site["fn"].has_rsample]
        if plain:
            raise ConfigError(f"the importance-weighted objectives need a reparameterized guide: site {plain[0]!r} of "
                              f"{name}.guide has no rsample (use objective=elbo)")


def _traces(program: Program, name: str, x, idx, num_data) -> Tuple[Trace, Trace]:
    try:
        guide_trace = poutine.trace(program.guide).get_trace(x, idx, num_data)
    except (ConfigError, NotImplementedError):
        raise
    except Exception as e:  # the user's code: say where, keep the cause chained
        raise ConfigError(f"{name}.guide failed on a batch of shape {list(x.shape)}: {_first_line(e)}") from e
    try:
        model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(x, idx, num_data)
    except (ConfigError, NotImplementedError):
        raise
    except Exception as e:
        raise ConfigError(f"{name}.model failed on a batch of shape {list(x.shape)}: {_first_line(e)}") from e
    return guide_trace, model_trace


#: what to do about Pyro's shape error inside the data plate
_ONE_PER_IMAGE = "inside the data plate a site scores one number per image: declare the other dims with .to_event"


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    hint = f" ({_ONE_PER_IMAGE})" if "Shape mismatch inside plate" in str(e) else ""
    return f"{type(e).__name__}: {text[0] if text else ''}{hint}"


def _sample_sites(trace: Trace, observed: bool = False) -> Dict[str, dict]:
    """The latent (or observed) sample sites of ``trace``; a plate's subsample site is neither."""
    return {n: s for n, s in trace.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s) and s["is_observed"] == observed}


def _model_sites(trace: Trace):
    return _sample_sites(trace), _sample_sites(trace, observed=True)


def _check_names(program: Program, name: str, guide_sites: dict, model_latent: dict, observed: dict) -> None:
    """Declared latent sites against the traces; the observed data site."""
    for site in program.latent_sites:
        for role, sites in (("guide", guide_sites), ("model", model_latent)):
            if site not in sites:
                raise ConfigError(f"{name}.{role} samples no site {site!r}, which {name}.latent_sites declares")
    undeclared = [s for s in guide_sites if s not in program.latent_sites]
    if undeclared:
        raise ConfigError(f"{name}.guide samples {undeclared[0]!r}, which {name}.latent_sites does not declare")
    unguided = [s for s in model_latent if s not in guide_sites]
    if unguided:
        raise ConfigError(f"{name}.model samples {unguided[0]!r}, which {name}.guide does not sample")
    if program.data_site not in observed:
        raise ConfigError(f"{name}.model observes no site {program.data_site!r} (data_site): "
                          f"pyro.sample({program.data_site!r}, p(x | z), obs=x)")


def _check_site(where: str, site: dict, batch: int) -> None:
    """Inside the ``data`` plate, one number per image."""
    if not any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"]):
        raise ConfigError(f"{where} is not inside the {DATA_PLATE!r} plate: open it with "
                          f"pyro_vae.data_plate(x, idx, num_data) around the sites of each image")
    shape = tuple(site["fn"].batch_shape)
    if shape != (batch,):
        raise ConfigError(f"{where} has batch shape {list(shape)} for {batch} images; {_ONE_PER_IMAGE}")


def _check_params(program: Program, name: str, role: str, trace: Trace) -> None:
    """Every ``pyro.param`` of the trace is (the unconstrained form of) one of the module's
    parameters; those of ``pyro.module(name, module)`` (named ``name$$$...``) are the module's own."""
    own = {id(p) for p in program.parameters()}
    store = dict(pyro.get_param_store().named_parameters())  # name -> unconstrained tensor
    for site_name, site in trace.nodes.items():
        if site["type"] != "param" or _MODULE_DIVIDER in site_name:
            continue
        if id(store.get(site_name, site["value"])) not in own:
            raise ConfigError(f"{name}.{role} uses pyro.param({site_name!r}), which is not a parameter of the module: "
                              "make it an nn.Parameter (or a submodule) so that fit optimises and checkpoints it")
