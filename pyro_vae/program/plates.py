"""The plate over images that ``model`` and every guide open, with the same name and size."""

from __future__ import annotations

from typing import Optional

import pyro
import torch

__all__ = ["data_plate"]


def data_plate(x: torch.Tensor, idx: Optional[torch.Tensor] = None, num_data: Optional[int] = None):
    """The plate over images: ``size=num_data`` (default: the batch is all data), ``subsample=idx``.

    ``idx`` are the rows of ``x`` in the full data set; they matter to guides with per-datapoint
    parameters. Without ``idx`` a minibatch still gets the right ``num_data / B`` scale.
    """
    batch = x.shape[0]
    if num_data is None:
        num_data = batch
    if idx is None and num_data != batch:
        idx = torch.arange(batch, device=x.device)
    return pyro.plate("data", size=num_data, subsample=idx, dim=-1)
