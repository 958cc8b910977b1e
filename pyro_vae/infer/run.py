"""A trained program, its config and history (:class:`Run`), and :func:`load_run` for run folders
(the files themselves: :mod:`pyro_vae.core.rundir`). A run of your own program
(:class:`~pyro_vae.program.contract.Program`, ``fit(config, program=...)``) loads with
``load_run(path, program=MyProgram(...))``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..core.config import VAEConfig
from ..core.errors import CheckpointError, ConfigError, PyroVAEError, ResourceError
from ..core.rundir import load_checkpoint
from ..program.contract import Program, program_name
from ..program.memory import check_memory
from ..program.programs import build_program
from ..program.pyro_style import as_program
from .local import fit_local
from .program_files import program_for_run

__all__ = ["Run", "load_run"]

@dataclass
class Run:
    """A trained program with its config and training history; the object notebooks work with."""

    config: VAEConfig
    vae: "torch.nn.Module"  # the program: pyro_vae.program.model.VAE, M2 or your own Program
    history: List[dict] = field(default_factory=list)
    path: Optional[Path] = None  # run folder, if written

    @property
    def program(self) -> Program:
        """The trained program (the same object as ``vae``)."""
        return self.vae

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode(self, x: torch.Tensor, local_steps: int = 300):
        """``(loc, scale)`` of q(z|x) for images ``x [B, D]``: the guide's encoder, or for guides
        without one (mean-field) a :func:`~pyro_vae.local.fit_local` of ``local_steps`` steps.
        (``iaf``: the flow's base Gaussian; ``full-rank``: the mean and marginal standard deviations;
        ``vae.inference.q(x)`` is the whole q.) Programs with the ``gaussian_guide`` capability only."""
        if not self.vae.capabilities.gaussian_guide:
            raise ConfigError(f"Run.encode gives the one Gaussian q(z|x) of a gaussian_guide program; "
                              f"{self.vae.program_class.__name__} has other latent sites: trace run.program.guide for its draws")
        x = x.to(self.device)
        if not self.vae.inference.amortized:
            fit = fit_local(self.vae, x, steps=local_steps, init="zero")
            return fit.loc, fit.scale
        with torch.no_grad():
            return self.vae.inference.posterior(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructions ``[B, D]``: E[x | z = posterior mean of q(z|x)] for a Gaussian guide (fitted
        per image where it has no encoder), else the program's own
        :meth:`~pyro_vae.program.contract.Program.reconstruct`."""
        if not self.vae.capabilities.gaussian_guide:
            return self.vae.reconstruct(x.to(self.device))
        loc, _ = self.encode(x)
        return self.vae.decode_mean(loc)

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """Decoded prior samples ``[n, D]``: E[x|z] for ``z ~ p(z)``
        (:meth:`~pyro_vae.program.contract.Program.sample`)."""
        return self.vae.sample(n, seed=seed)


def _check_shapes(config: VAEConfig, model: dict, num_data: Optional[int], vae: Optional[nn.Module] = None) -> None:
    """Compare the tensor shapes ``config`` implies with the checkpoint's before allocating
    anything: a crafted config (say ``hidden=[10**9]``) cannot make loading exhaust memory.
    (A ``vae`` around your own modules exists already: its shapes are compared.)"""

    if vae is not None:
        expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    else:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_program(config, num_data).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model.items()}
    for k in sorted(set(expected) | set(found)):
        if expected.get(k) != found.get(k):
            raise CheckpointError(
                f"tensor shapes differ: {k} is {found.get(k, 'missing')} in the file, "
                f"{expected.get(k, 'absent')} by the config"
            )


def _own_modules(config: VAEConfig, path: Path, encoder, decoder) -> dict:
    """The modules a run trained with your own networks needs again (:class:`CheckpointError`
    showing the ``load_run`` call when missing)."""
    given = {name: m for name, m in (("encoder", encoder), ("decoder", decoder)) if m is not None}
    missing = [name for name in config.custom_modules if name not in given]
    if missing:
        call = ", ".join(f"{name}=My{name.capitalize()}(...)" for name in config.custom_modules)
        raise CheckpointError(
            f"{path} was trained with your own {' and '.join(config.custom_modules)} (custom_modules in config.json), "
            f"which the command line cannot rebuild; load it in Python: load_run({str(path)!r}, {call})"
        )
    extra = [name for name in given if name not in config.custom_modules]
    if extra:
        raise ConfigError(f"{path} uses the built-in {config.arch} {' and '.join(extra)}; do not pass {extra[0]}=")
    return given


def load_run(path, device="cpu", *, encoder: Optional[nn.Module] = None, decoder: Optional[nn.Module] = None,
             program: Optional[Program] = None) -> Run:
    """Load a run folder (or a ``checkpoint.pt`` path) into a :class:`Run`.

    Built-in architectures (``arch`` ``mlp``, ``conv``) are rebuilt from the saved config; a run
    trained with your own networks needs them again, fresh instances of the same classes:
    ``load_run(path, encoder=MyEncoder(...), decoder=MyDecoder(...))`` (the ones ``config.json``'s
    ``custom_modules`` lists); a run of your own program (``config.json``'s ``program``) needs a
    fresh instance of it, ``load_run(path, program=MyProgram(...))``, unless it was trained from a
    file (``pyro-vae train --program FILE:CLASS``): that file is imported again, if unchanged since
    (a :class:`~pyro_vae.program.files.ProgramFile` as ``program=`` uses the file as it is now).
    Their weights come from the checkpoint.
    """

    path = Path(path)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if path.is_dir() and not ckpt.exists():
        raise CheckpointError(
            f"{path}: not a run folder (no checkpoint.pt); train one with pyro-vae train --out {path}"
        )
    state = load_checkpoint(ckpt)
    try:
        config = VAEConfig.from_dict(state["config"])
    except (PyroVAEError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config ({str(e).splitlines()[0]})") from None
    if config.program is not None or program is not None:
        return _load_program_run(config, state, ckpt, program, device)
    modules = _own_modules(config, ckpt.parent, encoder, decoder)
    local = state["model"].get("inference.local.weight")  # mean-field: one row per image
    num_data = None if local is None else local.shape[0]
    own = build_program(config, num_data, **modules) if modules else None  # a module of the wrong shape: its error
    try:
        _check_shapes(config, state["model"], num_data, own)
        check_memory(config, "cpu", num_data=num_data, copies=1, what="loading the run")  # a second copy of the weights
        vae = own if own is not None else build_program(config, num_data)
        vae.load_state_dict(state["model"])
    except ResourceError:
        raise
    except (PyroVAEError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config ({str(e).splitlines()[0]})") from None
    return Run(config, vae.to(device).eval(), list(state.get("history", [])), ckpt.parent)


def _own_program(config: VAEConfig, path: Path, program: Optional[Program]) -> Program:
    """The program a run of your own program needs again, checked against ``config.program``."""
    if config.program is None:
        raise ConfigError(f"{path} is a run of a built-in model (its config.json names no program); do not pass program=")
    program = program_for_run(config, path, program)  # a run of pyro-vae train --program FILE:CLASS: from its record
    if program is None:
        cls = config.program.rsplit(".", 1)[-1]
        raise CheckpointError(f"{path} was trained with your own program {config.program} (program in config.json), "
                              f"which a run folder cannot rebuild; load it in Python: load_run({str(path)!r}, "
                              f"program={cls}(...))")
    program = as_program(program, config.event_shape)
    if program_name(program).rsplit(".", 1)[-1] != config.program.rsplit(".", 1)[-1]:
        raise ConfigError(f"{path} was trained with {config.program}; got program={program_name(program)}")
    return program


def _load_program_run(config: VAEConfig, state: dict, ckpt: Path, program: Optional[Program], device) -> Run:
    """:func:`load_run` for a run of your own program: its weights from the checkpoint."""
    program = _own_program(config, ckpt.parent, program)
    try:
        _check_shapes(config, state["model"], None, program)
        program.load_state_dict(state["model"])
    except (PyroVAEError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: checkpoint does not match {program.program_class.__name__} "
                              f"({str(e).splitlines()[0]})") from None
    return Run(config, program.to(device).eval(), list(state.get("history", [])), ckpt.parent)
