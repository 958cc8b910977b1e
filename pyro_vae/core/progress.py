"""Progress bars: :mod:`tqdm.auto`, a widget in Jupyter where ``ipywidgets`` is installed and text
everywhere else (terminals, CI, notebooks without ``ipywidgets``).

``tqdm.auto`` warns ("IProgress not found ...") when it runs in a notebook without ``ipywidgets``;
the text bar it falls back to is fine here, so that one warning is silenced. Every progress bar of
the package comes from this module: ``from ..core.progress import tqdm``.
"""

from __future__ import annotations

import warnings

from tqdm.std import TqdmWarning

with warnings.catch_warnings():
    # tqdm.auto picks the bar once, on first import: a notebook without ipywidgets gets text bars, silently
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
