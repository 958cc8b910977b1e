"""Run folders and checkpoints: ``config.json``, ``history.json``, ``checkpoint.pt``, figures.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code on load.
They also hold the optimizer state, every random number generator's state and, after an
interruption, the position inside the epoch, so ``fit(..., resume=True)`` continues a run exactly.
Every file of a run folder is written atomically (temporary file, ``fsync``, rename), and only
under the fixed names below: nothing read from a checkpoint is used as a path.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch

from .config import VAEConfig
from .errors import CheckpointError, ConfigError, PyroVAEError, ResourceError
from .resources import DISK_FULL_ERRNOS, disk_full_error, free_disk, human_bytes, is_allocation_error, mount_point

__all__ = [
    "save_checkpoint", "load_checkpoint", "prepare_run_dir", "clear_run_files", "check_resumable", "rng_state",
    "set_rng_state", "extra_params", "write_json", "atomic_write", "disk_full_message", "RUN_FILES", "FIGURE_FILES",
    "RESUME_MAY_CHANGE",
]

CHECKPOINT_FORMAT = "pyro-vae/1"


RUN_FILES = ("config.json", "history.json", "checkpoint.pt")  # what makes a folder a run


FIGURE_FILES = ("elbo.png", "reconstructions.png", "samples.png", "latent.png", "manifold.png")


# all else must match to resume; program_sha256 is checked against the file itself (pyro_vae.program.files)
RESUME_MAY_CHANGE = ("epochs", "device", "validate", "on_nonfinite", "program_sha256")
FROM_DATA = ("event_shape", "num_classes", "features_sha256", "feature_units")  # set from the data by fit
# (checked instead: the data fingerprint; for M1+M2 the checksum of M1 that the weights hold, program.m1m2)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.

    A full disk (or quota), however the writer reports it (``OSError`` ENOSPC, ``torch.save``'s
    ``RuntimeError: ... unexpected pos ...``), raises :class:`ResourceError` naming the file, the
    free space and that the previous version of the file is intact; the temporary file is removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise ResourceError(disk_full_message(path)) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full_error(e, path.parent)  # asked while tmp still fills it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise ResourceError(disk_full_message(path)) from None
        raise


def disk_full_message(path: Path) -> str:
    """``the disk is full: cannot write PATH (only N left on the file system at MOUNT); the previous
    NAME is intact`` (or, where there was none: nothing was written to NAME)."""
    path = Path(path)
    free = free_disk(path.parent)
    room = "" if free is None else f" (only {human_bytes(free)} left on the file system at {mount_point(path.parent)})"
    kept = f"the previous {path.name} is intact" if path.exists() else f"nothing was written to {path.name}"
    return f"the disk is full: cannot write {path}{room}; {kept}"


def prepare_run_dir(out, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or check) the run folder and return it as a ``Path``.

    Refuses a file, an unwritable place, and a folder that already holds a run unless told what
    to do with it: ``overwrite`` (replace it; see :func:`clear_run_files`) or ``resume`` (continue
    it; it must hold a ``checkpoint.pt``).
    """
    out = Path(out)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    held = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if resume and not (out / "checkpoint.pt").is_file():
        stopped = "; the run stopped before its first checkpoint: start it again with --overwrite" if held else ""
        raise CheckpointError(f"--resume: {out} holds no checkpoint.pt to resume from{stopped}")
    if held and not (overwrite or resume):
        raise ConfigError(
            f"--out {out}: already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out)
        probe.close()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def clear_run_files(out: Path) -> None:
    """Delete the files a previous run left in ``out`` (only pyro-vae's own file names), so a
    replaced run never mixes with the old one's checkpoint or figures."""
    for name in RUN_FILES + FIGURE_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(out) / name).unlink()


def rng_state(device: Optional[torch.device] = None) -> dict:
    """The state of every random number generator a run draws from: torch (CPU, and CUDA when
    ``device`` is a GPU), numpy and Python's ``random`` (Pyro seeds all three), as tensors and
    plain values that load with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where there are such devices)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another machine: at least the current device continues its stream
            torch.cuda.set_rng_state(cuda[0])


def save_checkpoint(
    path: Path, vae, optimizer, config: VAEConfig, history: list, progress: Optional[dict] = None, data=None
) -> None:
    """Write ``checkpoint.pt`` atomically.

    :param progress: position inside an interrupted epoch (``epoch``, ``step``, ``order``, ...), or
        ``None`` at an epoch boundary.
    :param data: a small fingerprint of the training images, checked on resume.
    """
    device = next(vae.parameters()).device
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "history": history,
        "rng": rng_state(device),
        "progress": progress,
        "data": data,
        "param_store": extra_params(vae),
    }
    atomic_write(path, lambda f: torch.save(state, f))


def extra_params(vae) -> dict:
    """Pyro param-store entries that are not parameters of ``vae`` (say, the running averages of
    ``TraceGraph_ELBO``'s decaying-average baselines): saved so a resumed run has them too."""

    mine = {id(p) for p in vae.parameters()}
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name, p in store.named_parameters() if id(p) not in mine}


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; :class:`CheckpointError` if unsafe or corrupt.

    A file that carries a pickled object other than tensors and plain values (which could run code
    when unpickled) is refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:  # unreadable, gone since the check above, too many open files: not a bad file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        if is_allocation_error(e):  # too large for this machine's memory: the CLI says so
            raise
        if re.search(r"(?i)unsupported global|not an allowed global", str(e)):
            name = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = name.group(1) if name else "unknown"
            reason = (
                f"it holds a pickled object ({what}) that could run code when loaded; "
                "only tensors and plain values are loaded"
            )
        else:
            reason = "the file is corrupt or truncated"
        raise CheckpointError(f"{path}: refusing to load checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a pyro-vae checkpoint")
    model, history = state.get("model"), state.get("history", [])
    if not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
        raise CheckpointError(f"{path}: not a pyro-vae checkpoint (no model weights)")
    if not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise CheckpointError(f"{path}: not a pyro-vae checkpoint (bad history)")
    return state


def check_resumable(state: dict, config: VAEConfig, path="checkpoint.pt") -> VAEConfig:
    """Check that ``config`` may continue the checkpointed run; return the checkpoint's config.

    Every setting must match the checkpoint's except :data:`RESUME_MAY_CHANGE`, and ``epochs``
    may only grow (to at least the epochs already trained).
    """
    try:
        saved = VAEConfig.from_dict(state["config"])
    except (PyroVAEError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the checkpoint's config is invalid ({str(e).splitlines()[0]})") from None
    mine, theirs = config.to_dict(), saved.to_dict()
    differ = [k for k in mine if k not in RESUME_MAY_CHANGE + FROM_DATA and mine[k] != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (asked: {mine[k]!r})" for k in differ)
        raise ConfigError(
            f"--resume: the run in {Path(path).parent} was trained with {shown}; "
            "repeat its settings (see its config.json) or start a new run"
        )
    done = len(state.get("history", []))
    if config.epochs < done or (config.epochs == done and state.get("progress")):
        raise ConfigError(f"--resume: the run already has {done} epoch(s); --epochs {config.epochs} cannot continue it")
    return saved
