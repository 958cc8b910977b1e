"""A trained VAE, its config and history (:class:`Run`), and :func:`load_run` for run folders
(the files themselves: :mod:`pyro_vae.core.rundir`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from ..core.config import VAEConfig
from ..core.errors import CheckpointError, PyroVAEError
from ..core.rundir import load_checkpoint
from ..program.model import VAE
from .local import fit_local

__all__ = ["Run", "load_run"]

@dataclass
class Run:
    """A VAE with its config and training history; the object notebooks work with."""

    config: VAEConfig
    vae: "torch.nn.Module"  # pyro_vae.model.VAE
    history: List[dict] = field(default_factory=list)
    path: Optional[Path] = None  # run folder, if written

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def encode(self, x: torch.Tensor, local_steps: int = 300):
        """``(loc, scale)`` of q(z|x) for images ``x [B, 784]``: the guide's encoder, or for guides
        without one (mean-field) a :func:`~pyro_vae.local.fit_local` of ``local_steps`` steps."""
        x = x.to(self.device)
        if not self.vae.inference.amortized:
            fit = fit_local(self.vae, x, steps=local_steps, init="zero")
            return fit.loc, fit.scale
        with torch.no_grad():
            return self.vae.inference.posterior(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = posterior mean of q(z|x)]: pixel probabilities/means ``[B, 784]``."""
        loc, _ = self.encode(x)
        return self.vae.decode_mean(loc)

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """Decoded prior samples: E[x|z] for ``z ~ N(0, I)``, ``[n, 784]``."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.config.z_dim, generator=g).to(self.device)
        return self.vae.decode_mean(z)


def _check_shapes(config: VAEConfig, model: dict, num_data: Optional[int]) -> None:
    """Compare the tensor shapes ``config`` implies with the checkpoint's before allocating
    anything: a crafted config (say ``hidden=[10**9]``) cannot make loading exhaust memory."""

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VAE(config, num_data=num_data).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in model.items()}
    for k in sorted(set(expected) | set(found)):
        if expected.get(k) != found.get(k):
            raise CheckpointError(
                f"tensor shapes differ: {k} is {found.get(k, 'missing')} in the file, "
                f"{expected.get(k, 'absent')} by the config"
            )


def load_run(path, device="cpu") -> Run:
    """Load a run folder (or a ``checkpoint.pt`` path) into a :class:`Run`."""

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
        local = state["model"].get("inference.local.weight")  # mean-field: one row per image
        num_data = None if local is None else local.shape[0]
        _check_shapes(config, state["model"], num_data)
        vae = VAE(config, num_data=num_data)
        vae.load_state_dict(state["model"])
    except (PyroVAEError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config ({str(e).splitlines()[0]})") from None
    return Run(config, vae.to(device).eval(), list(state.get("history", [])), ckpt.parent)
