"""A trained VAE and its run folder: ``config.json``, ``history.json``, ``checkpoint.pt``, figures.

Checkpoints hold only tensors and plain Python values, so they load with
``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code on load.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .config import VAEConfig
from .errors import CheckpointError, ConfigError, PyroVAEError

__all__ = ["Run", "load_run", "save_checkpoint", "load_checkpoint", "prepare_run_dir", "write_json"]

CHECKPOINT_FORMAT = "pyro-vae/1"


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
            from .local import fit_local

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


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prepare_run_dir(out, overwrite: bool = False) -> Path:
    """Create the run folder; refuse a file, an unwritable place, or (unless ``overwrite``) a
    folder that already holds a run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if (out / "checkpoint.pt").exists() and not overwrite:
        raise ConfigError(f"--out {out}: already holds a run; pass --overwrite to replace it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=out)
        probe.close()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def save_checkpoint(path: Path, vae, optimizer, config: VAEConfig, history: list) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "history": history,
        "rng": {"torch": torch.get_rng_state()},
    }
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; :class:`CheckpointError` if unsafe or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        reason = "it holds objects other than tensors and plain values" if "weights_only" in str(e) else "corrupt or truncated"
        raise CheckpointError(f"{path}: refusing to load checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a pyro-vae checkpoint")
    return state


def load_run(path, device="cpu") -> Run:
    """Load a run folder (or a ``checkpoint.pt`` path) into a :class:`Run`."""
    from .model import VAE

    path = Path(path)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if path.is_dir() and not ckpt.exists():
        raise CheckpointError(f"{path}: not a run folder (no checkpoint.pt)")
    state = load_checkpoint(ckpt)
    try:
        config = VAEConfig.from_dict(state["config"])
        local = state["model"].get("inference.local.weight")  # mean-field: one row per image
        vae = VAE(config, num_data=None if local is None else local.shape[0])
        vae.load_state_dict(state["model"])
    except (PyroVAEError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config ({str(e).splitlines()[0]})") from None
    return Run(config, vae.to(device).eval(), list(state.get("history", [])), ckpt.parent)
