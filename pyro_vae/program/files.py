"""A program class in a Python file of your own: ``pyro-vae train --program FILE:CLASS``.

:class:`ProgramFile` names the file, the class and its constructor arguments (the CLI's
``--program-args`` JSON). It is checked before anything is trained or written: the file exists and
imports, the class is in it, is an ``nn.Module`` with ``model`` and ``guide``, and the arguments fit
its constructor; each failure is one :class:`~pyro_vae.core.errors.ConfigError` line.

A run records :meth:`ProgramFile.record` in its config (the file's absolute path, the class, the
arguments and the file's SHA-256: ``program_file``, ``program_args``, ``program_sha256``), so
``load_run``, ``evaluate`` and ``train --resume`` rebuild the program without being told again.
:meth:`ProgramFile.from_record` refuses a file that has changed or gone since: different code is
never loaded silently into a checkpoint made by other code. (The digest covers this one file, not
the modules it imports.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import re
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from ..core.config import VAEConfig
from ..core.errors import CheckpointError, ConfigError

__all__ = ["ProgramFile", "file_digest"]

_MODULES: Dict[tuple, object] = {}  # (path, sha256) -> the imported module: one class object per file version


def file_digest(path) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class ProgramFile:
    """``CLASS`` of the Python file ``path``, to be built as ``CLASS(**args)``.

    :param path: the ``.py`` file (recorded as an absolute path).
    :param class_name: a class defined (or imported) in it: an ``nn.Module`` with ``model`` and ``guide``.
    :param args: keyword arguments of its constructor (plain JSON values: they are recorded);
        ``None``: not given (none, or for a recorded run its recorded ones).
    """

    path: str
    class_name: str
    args: Optional[dict] = None

    @classmethod
    def parse(cls, spec: str, args: Optional[dict] = None) -> "ProgramFile":
        """``"path/to/file.py:ClassName"`` (the form of Lightning's ``--model module.Class``, with a file)."""
        path, sep, name = str(spec).rpartition(":")
        if not sep or not path or not name.isidentifier():
            raise ConfigError(f"--program {spec}: expected FILE.py:CLASS, e.g. --program my_vae.py:VAE")
        return cls(path, name, None if args is None else dict(args))

    def __post_init__(self):
        if self.args is None:
            return
        if not isinstance(self.args, dict) or not all(isinstance(k, str) for k in self.args):
            raise ConfigError(f"--program-args must be a JSON object of keyword arguments; got {self.args!r}")
        try:
            json.dumps(self.args)
        except (TypeError, ValueError):
            raise ConfigError(f"--program-args must be plain JSON values (they are recorded); got {self.args!r}") from None

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.class_name}"

    def load_class(self) -> type:
        """The class, from the file imported as it is now (one line for each way this can fail)."""
        path = Path(self.path)
        if not path.is_file():
            raise ConfigError(f"--program {self.spec}: no such file {path}")
        module = _import(path.resolve(), file_digest(path))
        found = getattr(module, self.class_name, None)
        if not isinstance(found, type):
            programs = [n for n, c in vars(module).items()  # the ones the file defines
                        if isinstance(c, type) and c.__module__ == module.__name__ and _has_model_and_guide(c)]
            have = f"its classes with model and guide: {', '.join(programs)}" if programs else "it defines none with model and guide"
            raise ConfigError(f"--program {self.spec}: the file has no class {self.class_name} ({have})")
        missing = [m for m in ("model", "guide") if not callable(getattr(found, m, None))]
        if missing:
            raise ConfigError(f"--program {self.spec}: {self.class_name} has no {' and no '.join(missing)} method; "
                              "a program is an nn.Module with model(x) and guide(x)")
        if not issubclass(found, nn.Module):
            raise ConfigError(f"--program {self.spec}: {self.class_name} is not a torch.nn.Module "
                              f"(write class {self.class_name}(nn.Module), so its parameters are trained and saved)")
        return found

    def build(self, seed: int = 0) -> nn.Module:
        """``CLASS(**args)``, the arguments checked against the constructor's signature first; its
        initial parameters drawn from torch's stream seeded with ``seed`` (``fit``: ``config.seed``),
        forked: the global stream is left as it was."""
        program_class, args = self.load_class(), self.args or {}
        try:
            inspect.signature(program_class).bind(**args)
        except TypeError as e:
            raise ConfigError(f"--program-args {json.dumps(args)} do not fit {self.class_name}"
                              f"{inspect.signature(program_class)}: {e}") from None
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return program_class(**args)
        except Exception as e:  # the constructor's own checks: one line, the traceback with --debug
            raise ConfigError(f"{self.class_name}(**{json.dumps(args)}) failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def record(self) -> dict:
        """What a run's config keeps: ``program_file`` (``/absolute/path.py:CLASS``), ``program_args``
        and the file's ``program_sha256``."""
        path = Path(self.path).resolve()
        return {"program_file": f"{path}:{self.class_name}", "program_args": dict(self.args or {}),
                "program_sha256": file_digest(path)}

    def or_recorded_args(self, config: VAEConfig) -> "ProgramFile":
        """This program, with the arguments ``config`` recorded where none were given."""
        if self.args is None and config.program_args is not None:
            return dataclasses.replace(self, args=dict(config.program_args))
        return self

    @classmethod
    def from_record(cls, config: VAEConfig, run="the run") -> "ProgramFile":
        """The program ``config`` recorded, if its file is still the one it was trained with; else a
        one-line :class:`CheckpointError` naming the file and how to use it anyway."""
        program = cls.parse(config.program_file, config.program_args)
        path, sha = Path(program.path), config.program_sha256 or ""
        if not path.is_file() or file_digest(path) != sha:
            what = "is gone" if not path.is_file() else "has changed"
            raise CheckpointError(
                f"{run} was trained with {program.spec}, which {what} since (sha256 {sha[:12]}...): refusing to load "
                f"other code; pass --program {program.spec} (Python: program=...) to use the file as it is now")
        return program


def _has_model_and_guide(cls: type) -> bool:
    return callable(getattr(cls, "model", None)) and callable(getattr(cls, "guide", None))


def _import(path: Path, sha256: str):
    """Import the file as a module of its own (once per version of the file in this process), with
    its folder first on ``sys.path`` meanwhile, as ``python FILE`` would have it (the SHA-256
    covers this file only, not the modules it imports)."""
    key = (str(path), sha256)
    if key not in _MODULES:
        name = "pyro_vae_program_" + re.sub(r"\W", "_", path.stem)  # the same for every version: config.program
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look classes up by their module
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # a syntax error, a missing import, ...: the file's own fault
            del sys.modules[name]
            raise ConfigError(f"--program {path}: importing it failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            sys.path.remove(str(path.parent))
        _MODULES[key] = module
    return _MODULES[key]
