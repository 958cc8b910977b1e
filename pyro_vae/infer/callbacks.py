"""Hooks into the training loop: what happens after each step, each epoch and at the end, beyond
SVI itself (figures, TensorBoard, experiment trackers, ...). Subclass :class:`Callback` and override
what you need::

    class PrintELBO(Callback):
        def on_epoch_end(self, trainer, record):
            print(record["epoch"], record["val_elbo"])

    fit(config, callbacks=[PrintELBO()])

Only the process that writes (rank 0 under ``torchrun``) calls them. The hooks must not draw from
the global random streams (``torch.random.fork_rng`` around anything that does): a run with
callbacks takes exactly the steps of a run without. :class:`~pyro_vae.infer.tensorboard.TensorBoardWriter`
and :class:`~pyro_vae.experiments.plots.SaveFigures` are callbacks.
"""

from __future__ import annotations

__all__ = ["Callback"]


class Callback:
    """Base class; every hook does nothing. ``trainer`` is the :class:`~pyro_vae.infer.svi.Trainer`
    (``trainer.run``: the :class:`~pyro_vae.infer.run.Run` with its history; ``trainer.vae``: the
    model; ``trainer.config``, ``trainer.train_data``, ``trainer.val_data``, ``trainer.folder``,
    ``trainer.optimizer``, ``trainer.params``)."""

    def on_train_begin(self, trainer) -> None:
        """Before the first step (after a resume: before the first step still to take)."""

    def on_step_end(self, trainer, loss) -> None:
        """After each optimizer step that was taken (not after a step skipped as non-finite).
        ``loss`` is the step's estimate of the full-data -ELBO, a tensor (``.item()`` syncs with
        the device: avoid it on every step); ``p.grad`` of ``trainer.params`` still holds the
        step's gradient. Called on every step: keep it cheap."""

    def on_epoch_end(self, trainer, record: dict) -> None:
        """After each epoch, once ``record`` (epoch, beta, train/val ELBO, seconds) is in the
        history and checkpointed."""

    def on_train_end(self, trainer) -> None:
        """After the last epoch, when training completed (not after an interruption or error)."""
