"""TensorBoard for training runs: :class:`TensorBoardWriter`, the training-loop
:class:`~pyro_vae.infer.callbacks.Callback` behind ``pyro-vae train --tensorboard`` and
``fit(..., tensorboard=True)``.

It writes event files into ``RUN_DIR/tensorboard/``, so ``tensorboard --logdir runs/`` shows every
run under ``runs/`` side by side. Per epoch (the step is the 1-based epoch):

========================= ==================================================================
tag                       value
========================= ==================================================================
``elbo/train``            the epoch's training ELBO (nats per image, as in ``history.json``)
``elbo/validation``       the validation ELBO (runs with validation images and an encoder)
``elbo/reconstruction``   E_q[log p(x|z)] on the probe images (below), one z per image
``elbo/kl``               KL(q(z|x) || p(z)) on the probe images, exact
``train/beta``            the KL weight of the epoch (KL warm-up, ``--beta``)
``train/learning_rate``   Adam's learning rate (of the shared weights)
``train/grad_norm``       the L2 norm of the whole gradient, averaged over the epoch's steps
``train/seconds``         the epoch's seconds (as in ``history.json``)
``train/skipped_steps``   steps skipped as non-finite (``--on-nonfinite skip``), when any
========================= ==================================================================

The *probe images* are the first ``probe_images`` validation images, binarized once as the
validation ELBO scores them; for guides without an encoder (mean-field) or runs without validation
images, the first training images (with their own posterior parameters). Every ``images_every``
epochs and at the last epoch it adds two image grids, ``images/reconstructions`` (originals and
reconstructions, row by row) and ``images/samples`` (64 decoded prior samples, the same z every
time), and when training completes the hyperparameters (``add_hparams``: the config) with the final
``hparam/train_elbo`` and ``hparam/val_elbo``.

For a program without the built-in Gaussian guide (``capabilities.gaussian_guide``, e.g. several
latent sites) the probe terms come from its traces (:func:`~pyro_vae.infer.traces.program_log_weights`:
the observed site's log-density, and the rest of the log weight over all latent sites as the KL),
and the grids from its own ``reconstruct`` and ``sample``; a program that has neither a Gaussian
guide nor q(z|x) for new images (``capabilities.amortized``) gets no probe terms, which the log says
once.

None of it draws from the training's random streams (``torch.random.fork_rng``, own generators),
so a run with the writer takes exactly the steps of a run without. ``tensorboard`` is an optional
package (``pip install -e ".[tensorboard]"``); :func:`summary_writer_class` says so in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torchvision.utils import make_grid

from ..core.data import eval_binarized
from ..core.errors import ConfigError
from ..program.guides import reparameterize
from .callbacks import Callback
from .evaluate import elbo_terms
from .traces import program_log_weights

__all__ = ["TensorBoardWriter", "summary_writer_class", "clear_event_files", "TENSORBOARD_DIR", "SCALAR_TAGS"]

#: the folder of a run that holds its event files
TENSORBOARD_DIR = "tensorboard"
#: how to install the optional package
INSTALL_HINT = 'pip install -e ".[tensorboard]"'
#: the scalars written every epoch (``elbo/validation`` only for runs that have a validation ELBO)
SCALAR_TAGS = ("elbo/train", "elbo/validation", "elbo/reconstruction", "elbo/kl", "train/beta",
               "train/learning_rate", "train/grad_norm", "train/seconds")


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; :class:`ConfigError` naming the extra to install
    when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}") from None
    return SummaryWriter


def clear_event_files(folder) -> None:
    """Delete the event files in ``folder/tensorboard/`` (a replaced run's; only such files)."""
    board = Path(folder) / TENSORBOARD_DIR
    if board.is_dir() and not board.is_symlink():
        for events in board.glob("events.out.tfevents.*"):
            events.unlink(missing_ok=True)


class TensorBoardWriter(Callback):
    """Write a run's scalars, image grids and hyperparameters as TensorBoard event files.

    :param log_dir: where to write; default ``RUN_DIR/tensorboard`` (the trainer's run folder).
    :param images_every: add the image grids every this many epochs (and at the last epoch).
    :param probe_images: images scored each epoch for the reconstruction term and the KL.
    :param elbo_samples: draws of z per probe image for the reconstruction term.
    :raises ConfigError: the ``tensorboard`` package is missing (at construction, before training).
    """

    def __init__(self, log_dir=None, *, images_every: int = 10, probe_images: int = 500, elbo_samples: int = 1):
        for name, value in (("images_every", images_every), ("probe_images", probe_images),
                            ("elbo_samples", elbo_samples)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value}")
        self.summary_writer = summary_writer_class()  # fail now, not after training has started
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.images_every, self.probe_images, self.elbo_samples = int(images_every), int(probe_images), int(elbo_samples)
        self.writer = None

    @classmethod
    def for_run_folder(cls, out) -> "TensorBoardWriter":
        """The writer ``fit(out, tensorboard=True)`` adds; :class:`ConfigError` without ``out``."""
        if out is None:
            raise ConfigError("tensorboard=True writes into the run folder: pass out=RUN_DIR "
                              "(or callbacks=[TensorBoardWriter(log_dir)])")
        return cls()

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, trainer) -> None:
        log_dir = self.log_dir
        if log_dir is None:
            if trainer.folder is None:
                raise ConfigError("TensorBoardWriter() writes into the run folder: pass out=RUN_DIR to fit, "
                                  "or TensorBoardWriter(log_dir)")
            log_dir = Path(trainer.folder) / TENSORBOARD_DIR
        # purge_step: TensorBoard hides events at later epochs than the ones this run continues from
        # (a resumed run's, or an older run's left in the folder)
        self.writer = self.summary_writer(str(log_dir), purge_step=len(trainer.run.history) + 1)
        self.probe, self.probe_rows = _probe_images(trainer, self.probe_images)
        self._grad_norm_sum, self._grad_steps = 0.0, 0
        capabilities = trainer.vae.capabilities
        self.probes = capabilities.gaussian_guide or capabilities.amortized
        if not self.probes:
            trainer.log(f"TensorBoard: {type(trainer.vae).__name__} has neither a Gaussian guide nor q(z|x) for new images "
                        "(capabilities): elbo/reconstruction and elbo/kl are not written")

    def on_step_end(self, trainer, loss) -> None:
        with torch.no_grad():  # one small reduction per parameter; summed without a device sync
            norms = [torch.linalg.vector_norm(p.grad.coalesce().values() if p.grad.is_sparse else p.grad)
                     for p in trainer.params if p.grad is not None]
            if norms:
                self._grad_norm_sum = self._grad_norm_sum + torch.linalg.vector_norm(torch.stack(norms))
                self._grad_steps += 1

    def on_epoch_end(self, trainer, record: dict) -> None:
        epoch = record["epoch"]
        loc, terms = self._probe_terms(trainer)
        grad_norm = float(self._grad_norm_sum / self._grad_steps) if self._grad_steps else None
        scalars = {
            "elbo/train": record["train_elbo"],
            "elbo/validation": record["val_elbo"],
            "elbo/reconstruction": terms["reconstruction"],
            "elbo/kl": terms["kl"],
            "train/beta": record["beta"],
            "train/learning_rate": _learning_rate(trainer.optimizer),
            "train/grad_norm": grad_norm,
            "train/seconds": record["seconds"],
            "train/skipped_steps": record.get("skipped_steps"),
        }
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        if epoch % self.images_every == 0 or epoch == trainer.config.epochs:
            self._add_images(trainer, loc, epoch)
        self.writer.flush()  # visible in a running TensorBoard now, kept if the run stops
        self._grad_norm_sum, self._grad_steps = 0.0, 0

    def on_train_end(self, trainer) -> None:
        history = trainer.run.history
        if history:
            last = history[-1]
            metrics = {f"hparam/{key}": last[key] for key in ("train_elbo", "val_elbo") if last.get(key) is not None}
            # run_name ".": the hyperparameters join this run's own folder (not a time-stamped sub-run)
            self.writer.add_hparams(_hparams(trainer.config), metrics, run_name=".", global_step=last["epoch"])
        self.writer.close()

    # ------------------------------------------------------------------ what is measured

    def _probe_terms(self, trainer) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The posterior means of the probe images and their mean reconstruction term and KL,
        drawn from a forked, seeded random stream."""
        x, vae = self.probe, trainer.vae
        if not self.probes:
            return None, {"reconstruction": None, "kl": None}
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)  # semi-amortized guides draw z while refining
            if not vae.capabilities.gaussian_guide:  # any program: its traces, all latent sites
                return None, _trace_terms(vae, x, self.elbo_samples)
            if not getattr(vae.inference, "diagonal", True):  # full-rank, flow: only q(x) describes it
                return _q_terms(vae, x, vae.inference.q(x, self.probe_rows), self.elbo_samples)
            loc, scale = vae.inference.posterior(x, self.probe_rows)
            generator = torch.Generator(device=x.device).manual_seed(0)
            terms = elbo_terms(vae, x, loc.detach(), scale.detach(), self.elbo_samples, generator=generator)
        return loc.detach(), {key: value.mean().item() for key, value in terms.items()}

    def _add_images(self, trainer, loc: torch.Tensor, epoch: int) -> None:
        """``images/reconstructions`` and ``images/samples`` (images only, not ``[D]`` vectors)."""
        shape = tuple(trainer.config.event_shape)
        if len(shape) != 3:
            return
        per_row = min(8, len(self.probe))
        n = min(16, len(self.probe)) // per_row * per_row  # whole rows only
        recon = _reconstructions(trainer.vae, self.probe[:n], None if loc is None else loc[:n])
        rows = [t for i in range(0, n, per_row) for t in (self.probe[i:i + per_row], recon[i:i + per_row])]
        self.writer.add_image("images/reconstructions", _grid(torch.cat(rows), shape, per_row), epoch)
        self.writer.add_image("images/samples", _grid(trainer.run.sample(64, seed=0), shape, 8), epoch)


def _trace_terms(program, x: torch.Tensor, samples: int) -> Dict[str, float]:
    """Means over the images ``x`` and ``samples`` draws of log p(x|.) and of the rest of the log
    weight, from the program's traces."""
    weights = program_log_weights(program, x, samples)
    reconstruction, elbo = weights["log_px"].mean().item(), weights["log_w"].mean().item()
    return {"reconstruction": reconstruction, "kl": reconstruction - elbo, "elbo": elbo}


@torch.no_grad()
def _reconstructions(program, x: torch.Tensor, loc: Optional[torch.Tensor]) -> torch.Tensor:
    """E[x|z] at the posterior means ``loc`` (a Gaussian guide), else the program's own
    ``reconstruct(x)`` with a seeded draw."""
    if loc is not None:
        return program.decode_mean(loc)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        return program.reconstruct(x)


def _q_terms(vae, x: torch.Tensor, q, samples: int) -> Tuple[torch.Tensor, Dict[str, float]]:
    """What ``_probe_terms`` reports for a guide that is no diagonal Gaussian: the point the zero
    draw maps to (the images' "mean" code) and Monte-Carlo means of log p(x|z) and of
    log q(z) - log p(z) over ``samples`` draws per image."""
    z, log_q = reparameterize(q, torch.randn((samples,) + q.batch_shape + q.event_shape, device=x.device))
    reconstruction = vae.likelihood(z).log_prob(x).mean()  # [S, B] -> mean
    kl = (log_q - vae.prior(x.shape[0]).log_prob(z)).mean()
    loc = reparameterize(q, x.new_zeros(q.batch_shape + q.event_shape))[0]  # [B, z_dim]
    terms = {"reconstruction": reconstruction.item(), "kl": kl.item()}
    return loc, dict(terms, elbo=terms["reconstruction"] - terms["kl"])


def _probe_images(trainer, n: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x [n, D], rows)``: the first ``n`` validation images, or (no validation images, or a
    guide without an encoder) the first training images and their rows; one fixed binarization."""
    val = trainer.val_data
    if trainer.vae.capabilities.amortized and val is not None and len(val) > 0:
        return eval_binarized(val.subset(n)).to(trainer.device), None
    train = trainer.train_data.subset(n)
    return eval_binarized(train).to(trainer.device), torch.arange(len(train), device=trainer.device)


def _grid(flat: torch.Tensor, shape: Tuple[int, ...], per_row: int) -> torch.Tensor:
    """``[B, D]`` images -> one ``[3, H', W']`` grid in ``[0, 1]``."""
    images = flat.detach().cpu().reshape(-1, *shape).clamp(0, 1)
    return make_grid(images, nrow=per_row, padding=2, pad_value=1.0)


def _learning_rate(optimizer) -> float:
    """The learning rate of the first parameter group (with several optimizers: the first's,
    the Adam of the shared weights)."""
    first = getattr(optimizer, "optimizers", (optimizer,))[0]
    return float(first.param_groups[0]["lr"])


def _hparams(config) -> dict:
    """The config as TensorBoard hyperparameters: lists joined with commas, unset (``None``) left out."""
    values = {}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if value is not None:
            values[key] = value
    return values
