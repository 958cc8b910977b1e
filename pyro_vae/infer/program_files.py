"""Programs from files in runs: what ``fit``, ``load_run`` and ``train --resume`` do with a
:class:`~pyro_vae.program.files.ProgramFile` (``pyro-vae train --program FILE:CLASS``).

A run trained from a file records it in its config (``program_file``, ``program_args``,
``program_sha256``); a later ``load_run(path)``, ``pyro-vae evaluate`` or ``train --resume``
rebuilds the program from that record, after checking that the file is still the one trained
(:meth:`~pyro_vae.program.files.ProgramFile.from_record`). Passing the program again is the way
to use a file that has changed: it is built as it is now, and a resumed run records the new digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

from ..core.config import VAEConfig
from ..core.errors import PyroVAEError
from ..core.rundir import load_checkpoint
from ..program.files import ProgramFile
from ..program.pyro_style import takes_data_only

__all__ = ["program_for_fit", "program_for_run", "say_data_only"]


def program_for_fit(config: VAEConfig, out, program, resume: bool) -> Tuple[VAEConfig, object]:
    """``(config, program)`` for :func:`~pyro_vae.infer.svi.fit`: a :class:`ProgramFile` is built
    (file, class, ``model``/``guide`` and arguments checked before anything is written) and
    recorded in ``config`` (its initial parameters drawn with ``config.seed``); with ``resume`` and
    no program, the program that the run in ``out`` recorded from a file (refused if the file changed
    or is gone); anything else as it is."""
    saved = _saved_config(Path(out) / "checkpoint.pt") if resume and out is not None else None
    if isinstance(program, ProgramFile):
        program = program if saved is None else program.or_recorded_args(saved)
        built = program.build(config.seed)  # first: a missing file, class or argument is one line, nothing written
        return config.replace(**program.record()), built
    if program is None and saved is not None and saved.program_file is not None:
        fields = {k: getattr(saved, k) for k in ("program_file", "program_args", "program_sha256")}
        return config.replace(**fields), ProgramFile.from_record(saved, run=out).build(config.seed)
    return config, program


def program_for_run(config: VAEConfig, path, program):
    """The program :func:`~pyro_vae.infer.run.load_run` rebuilds: the one given (a
    :class:`ProgramFile` built as the file is now, with the recorded arguments unless it has its
    own), else the file ``config`` recorded, if unchanged."""
    if isinstance(program, ProgramFile):
        return program.or_recorded_args(config).build()
    if program is None and config.program_file is not None:
        return ProgramFile.from_record(config, run=path).build()
    return program


def say_data_only(program, log: Callable[[str], None]) -> None:
    """Say once in the run's log that ``program`` takes the data alone, and what is done about it."""
    if program is not None and takes_data_only(program):
        log(f"{type(program).__name__}: model(x) and guide(x) take the data alone; the data plate's N/B scaling and "
            "beta (KL warm-up) are applied with effect handlers (pyro_vae.program.pyro_style)")


def _saved_config(checkpoint: Path) -> Optional[VAEConfig]:
    """The config of a checkpoint, or ``None`` where there is none to read (the resume itself then says why)."""
    if not checkpoint.is_file():
        return None
    try:
        return VAEConfig.from_dict(load_checkpoint(checkpoint)["config"])
    except (PyroVAEError, KeyError, TypeError):
        return None
