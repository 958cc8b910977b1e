r"""Programs as Pyro users write them: ``model(x)`` and ``guide(x)``, nothing else.

Pyro's VAE tutorial (and ``examples/vae/vae.py``) writes an ``nn.Module`` whose ``model(self, x)``
and ``guide(self, x)`` register their networks with ``pyro.module`` and open a plain
``pyro.plate("data", x.shape[0])``. Such a program takes neither the rows ``idx`` of its minibatch,
nor the size ``num_data`` of the data set, nor a KL weight ``beta``. What the training loop needs
of those, it applies from outside with Pyro's effect handlers, the way Pyro's own examples anneal
the KL term:

* :class:`DataPlateScale`: every site inside the ``data`` plate is scaled by :math:`N / B`, as if
  the plate had been opened with ``size=N`` and a subsample of :math:`B` rows, so a minibatch gives
  an unbiased estimate of the ELBO of all :math:`N` images (sites outside the plate, global
  latents, are not scaled: they are seen once per step whatever the batch).
* :class:`LatentScale`: the log-densities of the *unobserved* sample sites, in model and guide,
  scaled by :math:`\beta` (KL warm-up, the :math:`\beta`-VAE); observed sites untouched.

The program's code is not changed: the handlers act on the messages of its ``pyro.sample``
statements.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..core.errors import ConfigError
from .contract import DATA_PLATE, Capabilities, Program
from .contract import as_program as as_contract_program

__all__ = ["PyroStyleProgram", "DataPlateScale", "LatentScale", "takes_data_only", "as_program"]


class DataPlateScale(Messenger):
    r"""Scale the sites inside the plate ``name`` from a minibatch to the whole data set.

    A site inside ``pyro.plate(name, size)`` gets the factor :math:`N / \text{size}` (``size`` the
    plate's full size: :math:`B` for the tutorial's ``pyro.plate("data", x.shape[0])``), so that

    .. math::

        \frac{N}{B} \sum_{i \in \text{batch}} \big[\log p(x_i, z_i) - \log q(z_i \mid x_i)\big]

    estimates the sum over all :math:`N` images. A plate the program opens with a ``subsample``
    of its own keeps its own :math:`\text{size}/B`: the product is :math:`N / B` again.

    A plate with another name (the program's ``data_plate``) is passed on to the layers above as
    the ``data`` plate, whose dimension ``evaluate`` reads one number per image from.

    :param int num_data: :math:`N`, the training images (``None``: no scaling, e.g. when scoring).
    :param str name: the plate over images (``"data"``, or the plate the program names).
    """

    def __init__(self, num_data: Optional[int], name: str = DATA_PLATE):
        super().__init__()
        self.num_data, self.name = num_data, name

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        frames = msg["cond_indep_stack"]
        for i, frame in enumerate(frames):
            if frame.name == self.name:
                if self.num_data is not None:
                    msg["scale"] = msg["scale"] * (self.num_data / (frame.full_size or frame.size))
                if self.name != DATA_PLATE:  # the layers above read the plate named "data"
                    msg["cond_indep_stack"] = frames[:i] + (frame._replace(name=DATA_PLATE),) + frames[i + 1:]
                return


class LatentScale(Messenger):
    r"""Scale the log-density of every unobserved sample site by :math:`\beta`; observed sites keep theirs.

    Around both ``model`` and ``guide`` it turns ``Trace_ELBO``'s objective into

    .. math::

        \mathcal{L}_\beta = \mathbb{E}_{q(z \mid x)}\big[\log p(x \mid z)\big]
        + \beta \Big(\mathbb{E}_{q(z \mid x)}\big[\log p(z)\big] - \mathbb{E}_{q(z \mid x)}\big[\log q(z \mid x)\big]\Big)
        = \mathbb{E}_q\big[\log p(x \mid z)\big] - \beta\, \mathrm{KL}\big(q(z \mid x) \,\|\, p(z)\big),

    the ELBO at :math:`\beta = 1`. **Where it differs from the contract's** ``beta`` **argument:**
    a program written on the contract decides itself which terms :math:`\beta` weighs (the built-in
    VAE: its one latent site ``z``, so for a VAE the two agree). The handler weighs *every*
    unobserved site: all layers of a hierarchical model, a discrete latent (M2's label of an
    unlabelled image), and any global latent outside the data plate.
    The plate's own subsample site has no density and is left alone.

    :param float beta: the weight, > 0.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta


def takes_data_only(program) -> bool:
    """Whether ``program.model`` and ``program.guide`` each accept the data alone, ``(x)``, and not
    the contract's ``(x, idx, num_data, beta)``: the tutorial's signature (read with ``inspect``)."""

    def accepts(method, *args, **kwargs) -> bool:
        try:
            inspect.signature(method).bind(*args, **kwargs)
        except TypeError:
            return False
        return True

    methods = (getattr(program, "model", None), getattr(program, "guide", None))
    if not all(callable(m) for m in methods):  # not a program at all: as_program says so
        return False
    return all(accepts(m, None) for m in methods) and not all(accepts(m, None, None, num_data=1, beta=1.0)
                                                            for m in methods)


class PyroStyleProgram(Program):
    r"""A program whose ``model(x)`` and ``guide(x)`` take the data alone, on the contract.

    ``model(x, idx, num_data, beta)`` calls ``program.model(x)`` under :class:`DataPlateScale`
    (:math:`N/B`) and :class:`LatentScale` (:math:`\beta`); ``guide`` the same. The wrapped program
    is the submodule ``program``: its parameters are trained and checkpointed as they are.

    What the contract asks a program to declare is read from a trace of ``guide`` and ``model`` on
    a batch of two zero images (the class's own ``latent_sites``/``data_site`` win):
    ``latent_sites``, the guide's sample sites; ``data_site``, the model's one observed site.

    :param program: an ``nn.Module`` with ``model(x)`` and ``guide(x)``; its plate over images is
        ``pyro.plate("data", x.shape[0])``, or the plate its class attribute ``data_plate`` names.
    :param event_shape: the shape of one datum (the program's own ``event_shape`` attribute wins).
    """

    capabilities = Capabilities()  # Pyro's traced path; its guide takes any x (no idx): amortized

    def __init__(self, program: nn.Module, event_shape: Optional[Tuple[int, ...]] = None):
        super().__init__()
        self.program = program
        self.plate = getattr(program, "data_plate", DATA_PLATE)
        shape = getattr(program, "event_shape", None) or event_shape
        if not shape:
            raise ConfigError(f"{type(program).__name__}: the shape of one datum is unknown; set event_shape = "
                              "(1, 28, 28) (for example) on the class")
        self.event_shape = tuple(int(d) for d in shape)
        self.latent_sites, self.data_site = self._declared_sites()

    @property
    def program_class(self) -> type:
        return type(self.program)

    def model(self, x, idx=None, num_data=None, beta=1.0):
        with self.handlers(num_data, beta):
            return self.program.model(x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        with self.handlers(num_data, beta):
            return self.program.guide(x)

    def handlers(self, num_data: Optional[int], beta: float) -> contextlib.ExitStack:
        """:class:`DataPlateScale` and (``beta != 1``) :class:`LatentScale`, to put around a call of
        the wrapped program's ``model`` or ``guide``."""
        stack = contextlib.ExitStack()
        stack.enter_context(DataPlateScale(num_data, self.plate))
        if beta != 1.0:
            stack.enter_context(LatentScale(beta))
        return stack

    def _declared_sites(self) -> Tuple[Tuple[str, ...], str]:
        """``(latent_sites, data_site)``: the class's own, or read from one trace on zeros."""
        guide_trace, model_trace = self._traces(torch.zeros(2, self._numel(), device=_device(self.program)))
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            self._check_plate(role, trace)
        latent = getattr(self.program, "latent_sites", None) or tuple(
            name for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site))
        observed = [name for name, site in model_trace.nodes.items() if site["type"] == "sample" and site["is_observed"]]
        data_site = getattr(self.program, "data_site", None)
        if data_site is None and len(observed) != 1:
            raise ConfigError(f"{type(self.program).__name__}.model observes {len(observed)} sites ({', '.join(observed)}); "
                              "name the one of the data with the class attribute data_site = \"...\"")
        return tuple(latent), data_site or observed[0]

    def _traces(self, x: torch.Tensor):
        """Traces of ``guide`` and of ``model`` replayed on its draws (a forked random stream); the
        program's own failure as one line (its traceback chained, for ``--debug``)."""
        name, traces = type(self.program).__name__, {}
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad(), \
                pyro.validation_enabled(False):
            for role, fn in (("guide", self.guide), ("model", self.model)):
                try:
                    fn = fn if role == "guide" else poutine.replay(fn, trace=traces["guide"])
                    traces[role] = poutine.trace(fn).get_trace(x)
                except Exception as e:
                    text = (str(e).strip().splitlines() or [""])[0]
                    raise ConfigError(f"{name}.{role} failed on a batch of shape {list(x.shape)} (event_shape "
                                      f"{list(self.event_shape)}): {type(e).__name__}: {text}") from e
        return traces["guide"], traces["model"]

    def _check_plate(self, role: str, trace) -> None:
        """A one-line :class:`ConfigError` saying how to add the data plate, if no site of ``trace`` is inside it."""
        inside = [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)
                  and any(frame.name == DATA_PLATE for frame in site["cond_indep_stack"])]
        if not inside:
            raise ConfigError(
                f"{type(self.program).__name__}.{role} opens no plate named {self.plate!r} around its sample "
                f"statements: put them under `with pyro.plate({self.plate!r}, x.shape[0]):` as Pyro's VAE tutorial "
                "does (or name your plate with the class attribute data_plate = \"...\")")

    def _numel(self) -> int:
        size = 1
        for d in self.event_shape:
            size *= d
        return size


def _device(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def as_program(program, event_shape: Optional[Tuple[int, ...]] = None) -> Program:
    """``program`` on the contract: a :class:`~pyro_vae.program.contract.Program` as it is, an object
    whose ``model`` and ``guide`` take the data alone wrapped in a :class:`PyroStyleProgram` (a
    :class:`PyroStyleProgram` as it is); anything else a one-line :class:`ConfigError`."""
    if not isinstance(program, Program) and isinstance(program, nn.Module) and takes_data_only(program):
        return PyroStyleProgram(program, event_shape)
    return as_contract_program(program)
