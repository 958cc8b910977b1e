"""What ``pyro-vae`` says when the machine, not the input, fails a command: an allocation that
failed (CPU or CUDA out of memory) and a write that failed (a full disk; the standard output
redirected into a file included). One line each, for :func:`pyro_vae.cli.main`.

Sizes that can be estimated beforehand are refused before allocating
(:func:`pyro_vae.program.memory.check_memory`); this is the net under everything else.
"""

from __future__ import annotations

import os
import re
import sys

from ..core.errors import PyroVAEError
from ..core.resources import DISK_FULL_ERRNOS, free_disk, human_bytes, is_allocation_error, mount_point

__all__ = ["SIZE_FLAGS", "is_allocation_error", "out_of_memory_line", "os_error_line", "flush_stdout"]

#: per command, the flags whose values size its memory (named in the out-of-memory line)
SIZE_FLAGS = {
    "train": ("z_dim", "hidden", "batch_size", "num_particles"),
    "evaluate": ("batch_size", "iwae_k", "elbo_samples"),
    "compare-guides": ("iwae_k", "eval_limit", "limit"),
    "grad-variance": ("batch_size", "num_particles", "repeats", "sweep"),
}


def out_of_memory_line(error: BaseException, args) -> str:
    """``out of memory: the CPU could not allocate 1.5 TiB for pyro-vae train (--z-dim ..., ...);
    lower these sizes``: the amount from the allocator's message where it gives one."""
    text = str(error)
    exact = re.search(r"(?i)tried to allocate (\d+) bytes", text)
    stated = re.search(r"(?i)tried to allocate ([\d.]+ ?[KMGTP]i?B)", text)
    amount = human_bytes(int(exact.group(1))) if exact else stated.group(1) if stated else None
    device = "GPU" if "CUDA" in text or type(error).__name__ == "OutOfMemoryError" else "CPU"
    command = getattr(args, "command", None) or "the command"
    flags = [f"--{name.replace('_', '-')} {_shown(getattr(args, name))}"
             for name in SIZE_FLAGS.get(command, ()) if getattr(args, name, None) not in (None, [], ())]
    sizes = f" with {', '.join(flags)}" if flags else ""
    what = f"allocate {amount}" if amount else "allocate the memory it needed"
    return f"out of memory: the {device} could not {what} for pyro-vae {command}{sizes}; lower these sizes"


def os_error_line(error: OSError) -> str:
    """The system's words, with the file; a full disk says so (and which file system), and a
    failed write to the standard output says where that goes."""
    if error.filename is None:  # a write without a file name: the output, redirected (print's own error)
        target = _stdout_failed()
        if target is None and error.errno in DISK_FULL_ERRNOS and not _isatty(sys.stdout):
            target = _silence_stdout()
        if target is not None:
            return _stdout_line(error, target)
    if error.errno in DISK_FULL_ERRNOS:
        where = error.filename or "a file"
        return f"the disk is full: cannot write {where}{_room(error.filename)}"
    return f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}"


def flush_stdout() -> None:
    """Flush the standard output inside the command's ``try``: a full disk under ``> FILE`` then
    ends as one line here (:class:`PyroVAEError`, exit code 1), not at exit as a traceback."""
    try:
        sys.stdout.flush()
    except OSError as e:
        raise PyroVAEError(_stdout_line(e, _silence_stdout())) from None


def _stdout_line(error: OSError, target: str) -> str:
    if error.errno in DISK_FULL_ERRNOS:
        room = _room(target) if os.path.isfile(target) else ""  # not for /dev/full, a pipe, ...
        return f"the disk is full: cannot write the standard output to {target}{room}"
    return f"cannot write the standard output to {target}: {error.strerror or error}"


def _room(path) -> str:
    """`` (only N left on the file system at MOUNT)`` for a file's folder, or nothing."""
    if not path or str(path).startswith(("pipe:", "socket:", "its file")):
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    free = free_disk(folder)
    return "" if free is None else f" (only {human_bytes(free)} left on the file system at {mount_point(folder)})"


def _stdout_failed():
    """Where the standard output goes, if it cannot take its buffered text (it is then silenced,
    so that Python's own flush at exit does not fail again with a second message); else ``None``."""
    try:
        sys.stdout.flush()
        return None
    except (OSError, ValueError):
        return _silence_stdout()


def _silence_stdout() -> str:
    """Point the standard output at ``os.devnull``; return where it went before."""
    target = _stdout_target()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a notebook, a test's capture)
        pass
    return target


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError, AttributeError):
        return False


def _stdout_target() -> str:
    try:
        return os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}")
    except (OSError, ValueError, AttributeError):
        return "its file"


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
