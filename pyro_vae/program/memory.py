"""Memory a VAE takes, estimated from its config before anything is allocated, and the refusal
when the machine has less (:func:`check_memory`): ``z_dim=1000000000`` ends as one line naming the
setting and the bytes, not as an allocator's traceback.

The estimate counts the parameters exactly (the model is built on the ``meta`` device, which
allocates nothing) times the float copies the caller keeps of each (weights, gradients, Adam's
two moments: 4 when training), plus the activations of ``rows`` data rows through the networks
(forward values kept for the backward pass and their gradients; an MLP's widths, approximately).
It is a lower bound of the real peak, so a refusal is never a false alarm by much.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..core.config import VAEConfig
from ..core.errors import ResourceError
from ..core.resources import available_memory, human_bytes
from .model import VAE

__all__ = ["parameter_count", "activation_count", "estimate_bytes", "check_memory", "check_numbers"]

_MODEL_SIZES = ("z_dim", "hidden")  # settings that size the networks (their defaults: VAEConfig())


def parameter_count(config: VAEConfig, num_data: Optional[int] = None) -> int:
    """Numbers in the model's parameters (own ``encoder``/``decoder`` modules counted as the built-in
    ones); built on the ``meta`` device: no memory, no random draws."""
    if config.guide == "mean-field" and num_data is None:  # no images given: the shared part only
        num_data = 1
    with torch.device("meta"):
        vae = VAE(config.replace(custom_modules=()), num_data=num_data)
    return sum(p.numel() for p in vae.parameters())


def activation_count(config: VAEConfig, rows: int) -> int:
    """Numbers held for one forward and backward pass of ``rows`` data rows (images x particles)."""
    outputs = 2 if config.likelihood == "normal" else 1
    per_row = 4 * sum(config.hidden) + 6 * config.z_dim + (2 * outputs + 2) * config.x_dim
    return int(rows) * per_row


def estimate_bytes(config: VAEConfig, num_data: Optional[int] = None, rows: int = 0, copies: int = 4) -> dict:
    """``{"parameters", "parameter_bytes", "activation_bytes", "bytes"}``: see the module docstring."""
    size = torch.empty((), dtype=torch.get_default_dtype(), device="meta").element_size()
    params = parameter_count(config, num_data)
    parameter_bytes, activation_bytes = params * copies * size, activation_count(config, rows) * size
    return {"parameters": params, "parameter_bytes": parameter_bytes, "activation_bytes": activation_bytes,
            "bytes": parameter_bytes + activation_bytes}


def check_memory(config: VAEConfig, device, *, num_data: Optional[int] = None, rows: int = 0, copies: int = 4,
                 what: str = "training", rows_from: str = "") -> None:
    """Raise :class:`~pyro_vae.core.errors.ResourceError` (exit code 1) when :func:`estimate_bytes`
    exceeds the memory ``device`` has free, naming the setting(s) that ask for it and the bytes.

    :param rows: data rows through the networks at once; ``rows_from`` says which settings make
        them (e.g. ``"batch_size=128, num_particles=1"``), named when they dominate.
    :param copies: float copies kept of each parameter (4: weights, gradients, Adam's moments).
    :param what: what is being done (``"training"``, ``"loading the run"``, ...), for the message.
    """
    device = torch.device(device)
    estimate = estimate_bytes(config, num_data, rows, copies)
    free = available_memory(device)
    if free is None or estimate["bytes"] <= free:
        return
    if estimate["activation_bytes"] > estimate["parameter_bytes"] and rows_from:
        culprits = rows_from
        detail = f"the activations of {rows:,} rows through the networks"
    else:
        culprits = ", ".join(_culprits(config, num_data, rows, copies, free, estimate["bytes"]))
        kept = {1: "", 2: " and their gradients", 4: ", their gradients and Adam's two moments",
                6: ", their gradients and the estimates' mean and variance"}.get(copies, f" x {copies} copies")
        detail = f"{estimate['parameters']:,} parameters{kept}"
    raise ResourceError(
        f"not enough memory: {what} with {culprits} needs about {human_bytes(estimate['bytes'])} ({detail}), "
        f"but only {human_bytes(free)} is free on {device.type}; lower {_names(culprits)}"
    )


def check_numbers(numbers: int, device, what: str, settings: str) -> None:
    """Refuse to hold ``numbers`` floats at once on ``device`` (say, evaluation's ``k x B x z_dim``
    draws) beyond its free memory: :class:`ResourceError` naming ``settings`` (``"name=value, ..."``)."""
    device = torch.device(device)
    need = int(numbers) * torch.empty((), dtype=torch.get_default_dtype(), device="meta").element_size()
    free = available_memory(device)
    if free is not None and need > free:
        raise ResourceError(f"not enough memory: {what} with {settings} needs about {human_bytes(need)} "
                            f"({int(numbers):,} numbers), but only {human_bytes(free)} is free on {device.type}; "
                            f"lower {_names(settings)}")


def _culprits(config: VAEConfig, num_data, rows, copies, free, need) -> List[str]:
    """The model settings whose default value would shrink the estimate most (those that alone
    bring it under ``free``, else every one above its default), as ``name=value``."""
    defaults, shrink = VAEConfig(), []
    for name in _MODEL_SIZES:
        value, default = getattr(config, name), getattr(VAEConfig(), name)
        if _size(value) > _size(default):
            smaller = estimate_bytes(config.replace(**{name: default}), num_data, rows, copies)["bytes"]
            shrink.append((smaller, name))
    shrink.sort()
    enough = [name for smaller, name in shrink if smaller <= free]
    names = enough or [name for _, name in shrink]
    if names:
        return [f"{name}={_shown(getattr(config, name))}" for name in names]
    found = [f"event_shape={_shown(config.event_shape)}" if config.event_shape != defaults.event_shape else None,
             f"{num_data} images (mean-field: parameters per image)" if config.guide == "mean-field" and num_data else None]
    return [f for f in found if f] or [f"z_dim={config.z_dim}, hidden={_shown(config.hidden)}"]


def _size(value) -> int:
    return sum(value) if isinstance(value, tuple) else int(value)


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _names(culprits: str) -> str:
    """``"z_dim=5, hidden=8"`` -> ``"z_dim, hidden"`` (what to lower)."""
    names = [part.split("=")[0].strip() for part in culprits.split(", ") if "=" in part]
    return ", ".join(dict.fromkeys(names)) or "the data's size or the number of images"
