"""What the machine has to give: free memory (for a model before it is built) and free disk space
(to tell a full disk apart from other write failures). Both are best effort: ``None`` where the
system does not say.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["human_bytes", "available_memory", "free_disk", "mount_point", "disk_full_error", "is_allocation_error",
           "DISK_FULL_ERRNOS"]

DISK_FULL_ERRNOS = tuple(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)

_ALLOCATION_MESSAGES = ("DefaultCPUAllocator: can't allocate", "out of memory", "Cannot allocate memory")


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to EiB."""
    n = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover (the loop returns at PiB)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation on ``device`` can still get: free GPU memory on CUDA; on the CPU the
    kernel's ``MemAvailable``, lowered to the room left under a cgroup (container) limit."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver, a device that is gone: no estimate, no refusal
            return None
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(known) if known else None


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_room() -> Optional[int]:
    """``limit - usage`` of this process's memory cgroup (v2, else v1); ``None`` without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit (v1 says so with ~2^63)
            return None
        return max(int(limit) - usage, 0)
    return None


def free_disk(folder) -> Optional[int]:
    """Bytes this process may still write on the file system of ``folder`` (root may use the
    blocks reserved for it)."""
    try:
        s = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    blocks = s.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else s.f_bavail
    return blocks * s.f_frsize


def mount_point(folder) -> Path:
    """The folder at which the file system holding ``folder`` is mounted (where to free space)."""
    path = Path(os.path.abspath(folder))
    try:
        device = path.stat().st_dev
        while path.parent != path and path.parent.stat().st_dev == device:
            path = path.parent
    except OSError:
        pass
    return path


def disk_full_error(error: BaseException, folder) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk (or quota) is full:
    an ``OSError`` ENOSPC/EDQUOT, also one wrapped by another error (``torch.save`` reports a failed
    write as ``RuntimeError: ... unexpected pos ...`` whose context is the ``OSError``), or a
    ``RuntimeError`` from a writer while the file system has no room left."""
    seen = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    if isinstance(error, RuntimeError) and not is_allocation_error(error):
        free = free_disk(folder)
        return free is not None and free < 64 * 1024  # less than a few blocks: the write hit the end
    return False


def is_allocation_error(error: BaseException) -> bool:
    """Whether ``error`` is a failed memory allocation: ``MemoryError``, ``torch.OutOfMemoryError``
    (CUDA), or the CPU allocator's ``RuntimeError`` (``DefaultCPUAllocator: can't allocate ...``)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _ALLOCATION_MESSAGES)
