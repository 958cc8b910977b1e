"""The training loop's run folder: opened new, replaced or resumed; checkpoints saved and restored.

A checkpoint records everything a resumed run needs to continue *exactly* where it stopped: the
parameters, the optimizer state, every random stream, the history and, after an interruption,
the position inside the epoch (the epoch's minibatch order, the step, the loss so far). The files
themselves (atomic writes, safe loading) are :mod:`pyro_vae.core.rundir`'s business.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pyro
import torch

from ..core.config import VAEConfig
from ..core.errors import CheckpointError, ConfigError, ResourceError
from ..core.rundir import (
    check_resumable,
    clear_run_files,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .evaluate import EVAL_FILE
from .tensorboard import clear_event_files

__all__ = ["Checkpointer", "open_run_folder", "data_fingerprint"]


def open_run_folder(out, config: VAEConfig, overwrite: bool, resume: bool):
    """``(folder, saved)``: the run folder, checked for ``overwrite``/``resume``, and with
    ``resume`` the checkpoint to continue (``None`` otherwise)."""
    folder = prepare_run_dir(out, overwrite, resume)
    saved = None
    if resume:
        saved = load_checkpoint(folder / "checkpoint.pt")
        check_resumable(saved, config, folder / "checkpoint.pt")
    return folder, saved


def data_fingerprint(images: torch.Tensor) -> dict:
    """A small summary of the training images, checked on resume."""
    return {"num_data": len(images), "sum": float(images.sum(dtype=torch.float64))}


class Checkpointer:
    """Writes ``checkpoint.pt``, ``history.json`` and ``config.json`` into ``folder`` (nothing
    when ``folder`` is ``None`` or this process does not write, e.g. ranks other than 0)."""

    def __init__(self, folder: Optional[Path], write: bool, vae, optimizer, config: VAEConfig, fingerprint: dict):
        self.folder = folder if write else None
        self.vae, self.optimizer, self.config, self.fingerprint = vae, optimizer, config, fingerprint
        self.path = None if folder is None else Path(folder) / "checkpoint.pt"
        self.last_saved: Optional[str] = None  # what the checkpoint on disk holds, once one is saved or restored

    def clear(self) -> None:
        """Delete a replaced run's files (``overwrite``): the run files and figures, a saved
        evaluation (``eval.json``) and TensorBoard event files."""
        if self.folder is not None:
            clear_run_files(self.folder)
            (self.folder / EVAL_FILE).unlink(missing_ok=True)
            clear_event_files(self.folder)

    def write_config(self) -> None:
        if self.folder is not None:
            write_json(self.folder / "config.json", self.config.to_dict())

    def save(self, history: List[dict], position: Optional[dict] = None) -> None:
        """A checkpoint at the end of an epoch, or (``position``) inside one. A full disk raises
        :class:`ResourceError` saying what the last good checkpoint holds and how to continue."""
        if self.folder is None:
            return
        try:
            save_checkpoint(self.path, self.vae, self.optimizer, self.config, history, position, self.fingerprint)
        except ResourceError as e:
            raise self._disk_full(e, "it") from None
        self.last_saved = _progress(history, position)
        try:
            write_json(self.folder / "history.json", history)
        except ResourceError as e:
            raise self._disk_full(e, self.path.name) from None

    def _disk_full(self, error: ResourceError, subject: str) -> ResourceError:
        if self.last_saved is None:
            return ResourceError(f"{error}; no checkpoint yet: free some space, then start again with --overwrite")
        return ResourceError(f"{error}: {subject} keeps the last good state ({self.last_saved}); "
                             "free some space, then continue with --resume")

    def kept(self, history: List[dict]) -> str:
        """What the run folder still holds after a failure (nothing non-finite is ever saved)."""
        if self.path is None:
            return "Nothing was saved (no run folder)."
        if self.path.exists():
            return f"{self.path} keeps the last good state ({len(history)} epochs)."
        return "No checkpoint was written yet (start again with --overwrite)."

    def restore(self, saved: dict, history: List[dict]) -> Optional[dict]:
        """Load ``saved`` into the model, the optimizer, the param store and the random streams;
        fill ``history``; return the position inside an interrupted epoch (or ``None``)."""
        if saved.get("data") not in (None, self.fingerprint):
            raise ConfigError(f"--resume: the training images differ from the ones {self.path} was trained on")
        try:
            self.vae.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            restored = list(saved["history"])
            if [h.get("epoch") for h in restored] != list(range(1, len(restored) + 1)):
                raise ValueError("history epochs are not 1, 2, ...")
            position = self._position(saved.get("progress"), len(restored))
            extra = saved.get("param_store") or {}
            if not all(isinstance(v, torch.Tensor) for v in extra.values()):
                raise ValueError("param_store entries must be tensors")
            device = next(self.vae.parameters()).device
            for name, value in extra.items():
                pyro.get_param_store()[name] = value.to(device)
            set_rng_state(saved["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{self.path}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
        history[:] = restored
        self.last_saved = _progress(restored, position)
        return position

    def _position(self, position: Optional[dict], epochs_done: int) -> Optional[dict]:
        """Check a saved position inside an epoch; ``ValueError`` if inconsistent."""
        if position is None:
            return None
        order, num_data = position["order"], self.fingerprint["num_data"]
        steps = -(-num_data // self.config.batch_size)
        if position["epoch"] != epochs_done or not 0 <= position["step"] <= steps:
            raise ValueError("the position in the epoch is out of range")
        if not torch.equal(order.sort().values, torch.arange(num_data)):
            raise ValueError("the epoch's order is not a permutation of the training images")
        if any(not 0 <= s < steps for s in position["skipped"]):
            raise ValueError("skipped steps out of range")
        return dict(position, seconds=float(position["seconds"]), loss_sum=position["loss_sum"].reshape(()))


def _progress(history: List[dict], position: Optional[dict]) -> str:
    """``"3 epochs"`` or ``"3 epochs and 7 steps"``: what a checkpoint holds."""
    done = f"{len(history)} epoch{'' if len(history) == 1 else 's'}"
    return done if not position else f"{done} and {position['step']} steps"
