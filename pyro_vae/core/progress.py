"""Progress bars: :mod:`tqdm.auto`, a widget in Jupyter where ``ipywidgets`` is installed and text
everywhere else (terminals, CI, notebooks without ``ipywidgets``).

``tqdm.auto`` warns ("IProgress not found ...") when it runs in a notebook without ``ipywidgets``;
the text bar it falls back to is fine here, so that one warning is silenced. Every progress bar of
the package comes from this module: ``from ..core.progress import tqdm``.

A bar is for a person watching: :func:`disable` keeps it off where its stream is not a terminal
(``pyro-vae train > train.log 2>&1``, a pipe, CI), so a log holds one line per epoch, not bar frames.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

from tqdm.std import TqdmWarning

with warnings.catch_warnings():
    # tqdm.auto picks the bar once, on first import: a notebook without ipywidgets gets text bars, silently
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm", "disable"]


def disable(progress: bool) -> Optional[bool]:
    """tqdm's ``disable=`` for a bar that the caller wants (``progress=True``) or not.

    Wanted, it is ``None`` (tqdm then draws only when its stream is a terminal), except in a Jupyter
    kernel, whose output is no terminal but shows a bar well (``False``)."""
    if not progress:
        return True
    return False if _in_jupyter_kernel() else None


def _in_jupyter_kernel() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
