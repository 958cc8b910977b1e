"""Hooks into the training loop: what happens after each epoch and at the end, beyond SVI itself
(figures, experiment trackers, ...). Subclass :class:`Callback` and override what you need::

    class PrintKL(Callback):
        def on_epoch_end(self, trainer, record):
            print(record["epoch"], record["val_elbo"])

    fit(config, callbacks=[PrintKL()])

Only the process that writes (rank 0 under ``torchrun``) calls them.
"""

from __future__ import annotations

__all__ = ["Callback"]


class Callback:
    """Base class; every hook does nothing. ``trainer`` is the :class:`~pyro_vae.infer.svi.Trainer`
    (``trainer.run``: the :class:`~pyro_vae.infer.run.Run` with its history; ``trainer.vae``,
    ``trainer.config``, ``trainer.train_data``, ``trainer.val_data``, ``trainer.folder``)."""

    def on_train_begin(self, trainer) -> None:
        """Before the first step (after a resume: before the first step still to take)."""

    def on_epoch_end(self, trainer, record: dict) -> None:
        """After each epoch, once ``record`` (epoch, beta, train/val ELBO, seconds) is in the
        history and checkpointed."""

    def on_train_end(self, trainer) -> None:
        """After the last epoch, when training completed (not after an interruption or error)."""
