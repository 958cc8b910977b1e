r"""Stochastic variational inference for the VAE, or any program: the training loop behind ``pyro-vae train``.

Each step is black-box VI, exactly what ``pyro.infer.SVI(model, guide, Adam, Trace_ELBO()).step``
does (``tests/test_svi.py`` checks that the parameters agree step for step): take a minibatch,
draw :math:`\epsilon \sim \mathcal{N}(0, I)`, set :math:`z = \mu + \sigma \odot \epsilon` (the
reparameterization trick, done by the guide's ``rsample``), backpropagate the estimate of
:math:`-\mathrm{ELBO}` and take an Adam step:

.. math::

    \widehat{\mathcal{L}}(\theta, \phi) = -\frac{N}{B} \sum_{i \in \text{batch}}
    \Big[\log p_\theta(x_i \mid z_i) + \log p(z_i) - \log q_\phi(z_i \mid x_i)\Big],
    \qquad (\theta, \phi) \leftarrow \mathrm{Adam}\big(\nabla \widehat{\mathcal{L}}\big).

The loss is Pyro's ``ELBO.differentiable_loss`` on ``model``/``guide`` (or the same estimate
without tracing, :mod:`pyro_vae.infer.fused`); one ``torch.optim.Adam`` updates every parameter.
:meth:`Trainer.step` is that loop body. Around it, collaborators with their own names:
:class:`~pyro_vae.infer.checkpointing.Checkpointer` (checkpoints, resume),
:class:`~pyro_vae.infer.interrupts.StopSignals` (Ctrl-C/SIGTERM stop after the step),
:class:`~pyro_vae.infer.guards.NonFiniteGuard` (NaN/inf), :class:`~pyro_vae.infer.distributed.DataParallel`
(``torchrun``) and :class:`~pyro_vae.infer.callbacks.Callback` (figures, trackers).

The loop knows its program only through the contract
(:class:`~pyro_vae.program.contract.Program`): the built-in program that ``config.model`` names,
or your own, ``fit(config, program=MyProgram(...))``, which gets all of the above; its
:class:`~pyro_vae.program.contract.Capabilities` choose the estimators.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import pyro
import torch

from ..core.config import VAEConfig, resolve_device
from ..core.data import as_image_data, check_images, eval_binarized, load_splits
from ..core.errors import ConfigError, TrainingError, TrainingInterrupted
from ..core.progress import disable, tqdm
from ..program.contract import Program, check_program, program_name, record_program
from ..program.files import ProgramFile
from ..program.memory import check_memory
from ..program.programs import build_program, fit_to_data
from ..program.pyro_style import as_program
from .cache import cached_run
from .callbacks import Callback
from .checkpointing import Checkpointer, data_fingerprint, open_run_folder
from .distributed import DataParallel
from .guards import ADVICE, NonFiniteGuard
from .interrupts import SignalAt, StopSignals, signal_name
from .objectives import check_fused, elbo_per_image, fallbacks, make_loss, make_optimizer
from .program_files import program_for_fit, say_data_only
from .run import Run
from .tensorboard import TensorBoardWriter

__all__ = ["fit", "Trainer", "EpochState"]


def fit(
    config: VAEConfig,
    out=None,
    *,
    train_data=None,
    val_data=None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = tqdm.write,
    callbacks: Sequence[Callback] = (),
    tensorboard: bool = False,
    cache=False,
    encoder: Optional[torch.nn.Module] = None,
    decoder: Optional[torch.nn.Module] = None,
    program: Optional[Program] = None,
) -> Run:
    """Train a VAE (or your own program) by SVI; return the :class:`~pyro_vae.infer.run.Run`
    (and write it to ``out``).

    :param config: every setting of the run.
    :param out: run folder to write (``config.json``, ``history.json``, ``checkpoint.pt``).
    :param train_data, val_data: data to use instead of loading what ``config`` names: an
        :class:`~pyro_vae.core.data.ImageData`, a tensor or array (``[N, D]`` vectors or
        ``[N, C, H, W]`` images, floats in [0, 1] or uint8) or a ``torch.utils.data.Dataset`` of
        images (or ``(image, label)`` pairs), used whole (:func:`~pyro_vae.core.data.as_image_data`).
    :param encoder, decoder: your own networks instead of the built-in ones (the contract:
        :class:`~pyro_vae.program.model.VAE`); the run folder records them, and
        ``load_run(path, encoder=..., decoder=...)`` loads it.
    :param program: your own :class:`~pyro_vae.program.contract.Program` instead of the built-in
        model: trained with the config's training settings (batch size, epochs, learning rate,
        seed, KL warm-up, objective, ...; the built-in model's own settings are unused), checked
        first on two training images (:func:`~pyro_vae.program.contract.check_program`). The run
        folder records its class (``config.program``); ``resume`` and ``load_run(path,
        program=MyProgram(...))`` need a fresh instance again. Its initial parameters are those it
        was constructed with. A module whose ``model(x)`` and ``guide(x)`` take the data alone (Pyro's
        VAE tutorial) is wrapped, :class:`~pyro_vae.program.pyro_style.PyroStyleProgram`. A
        :class:`~pyro_vae.program.files.ProgramFile` (a class in a file, its arguments) is built and
        recorded, so ``resume`` and ``load_run(path)`` rebuild it without being told again, and
        ``cache`` keys it by the file's SHA-256 (the file alone, not the modules it imports).
    :param overwrite: replace a run already in ``out``.
    :param resume: continue the run in ``out`` from its checkpoint: the same parameters, optimizer
        state, random streams and position in the epoch, so on CPU the result equals an
        uninterrupted run. ``config`` must match the checkpoint's but for
        :data:`~pyro_vae.core.rundir.RESUME_MAY_CHANGE` (``epochs`` may grow).
    :param callbacks: :class:`~pyro_vae.infer.callbacks.Callback` hooks, e.g.
        :class:`pyro_vae.experiments.plots.SaveFigures` (what ``pyro-vae train`` adds).
    :param tensorboard: also write TensorBoard event files into ``out/tensorboard/`` (a
        :class:`~pyro_vae.infer.tensorboard.TensorBoardWriter` after ``callbacks``); needs ``out``
        and the ``tensorboard`` package (:class:`~pyro_vae.core.errors.ConfigError` otherwise).
    :param cache: ``True`` (or a cache folder): the run cache (:mod:`pyro_vae.infer.cache`,
        ``$PYRO_VAE_CACHE``, default ``~/.cache/pyro-vae/runs``). A run of the same settings on the
        same images trained before is loaded, not trained; otherwise it is trained into the cache
        (a partial or corrupt entry is trained again), and ``overwrite`` trains it again anyway.
        The run lives in the cache (``run.path``): ``out`` and ``resume`` are refused with it.
    :raises TrainingError: a non-finite loss (``on_nonfinite="stop"``) or non-finite parameters;
        ``checkpoint.pt`` keeps the last good state.
    :raises TrainingInterrupted: SIGINT or SIGTERM; the current step was finished and a
        checkpoint to resume from was written.
    """
    config, program = program_for_fit(config, out, program, resume)  # a ProgramFile built; or the one resume records
    if program is not None:
        say_data_only(program, log)
        program = _checked_program(config, program, encoder, decoder, cache)
    if cache:
        if encoder is not None or decoder is not None:
            raise ConfigError("fit(cache=True) cannot key a run on your own modules' code; train them without the cache")
        train_data, val_data = _image_data(config, train_data, val_data)  # the cache key needs their fingerprint
        options = dict(progress=progress, callbacks=callbacks, tensorboard=tensorboard)
        if config.program_file is not None:  # a program from a file: the key holds the file's digest
            config, options["program"] = record_program(config, program), ProgramFile.from_record(config)
        return _cached_fit(config, out, resume, cache, train_data, val_data, overwrite, log, options)
    if tensorboard:
        callbacks = [*callbacks, TensorBoardWriter.for_run_folder(out)]
    trainer = Trainer(config, out, train_data=train_data, val_data=val_data, progress=progress,
                      overwrite=overwrite, resume=resume, log=log, callbacks=callbacks, encoder=encoder,
                      decoder=decoder, program=program)
    return trainer.train()


def _checked_program(config: VAEConfig, program, encoder, decoder, cache) -> Program:
    """``program`` as a :class:`Program`, refused with what it cannot be combined with."""
    program = as_program(program, config.event_shape)  # model(x)/guide(x) alone: wrapped (program.pyro_style)
    if encoder is not None or decoder is not None:
        raise ConfigError("encoder= and decoder= go into the built-in VAE; your program= brings its own networks")
    if cache and config.program_file is None:  # the key would have to hold the code the program runs: its class,
        # helpers, globals, notebook cells (a ProgramFile's key holds its file's SHA-256)
        raise ConfigError("fit(cache=True) cannot key a run on your program's code (its class need not hold all the "
                          "code it runs); train it without the cache, or from a file: program=ProgramFile(...)")
    return program


def _cached_fit(config, out, resume, cache, train_data, val_data, overwrite, log, options) -> Run:
    """``fit(..., cache=...)``: the run from the run cache, or trained into it."""
    if out is not None or resume:
        raise ConfigError("fit(cache=True) keeps the run in the run cache (run.path): leave out and resume "
                          "unset, and copy the folder to keep it elsewhere")
    train_into = lambda folder, train, val: fit(config, folder, train_data=train, val_data=val,  # noqa: E731
                                                overwrite=True, log=log, **options)
    return cached_run(config, train_into, train_data=train_data, val_data=val_data, retrain=overwrite,
                      root=cache, log=log)


@dataclass
class EpochState:
    """Where the loop is inside an epoch (what a checkpoint saves when interrupted mid-epoch)."""

    epoch: int  # 0-based
    order: torch.Tensor  # [N] the epoch's permutation of the training images
    step: int = 0  # next step to take
    loss_sum: Optional[torch.Tensor] = None  # sum over images of -ELBO_i so far (no per-step sync)
    skipped: List[int] = None  # steps skipped as non-finite
    seconds: float = 0.0  # training time spent in this epoch before the current stretch

    def position(self, global_batch: Optional[int]) -> dict:
        state = {"epoch": self.epoch, "step": self.step, "order": self.order.cpu(),
                 "loss_sum": self.loss_sum.cpu(), "skipped": list(self.skipped), "seconds": self.seconds}
        if global_batch is not None:
            state["global_batch"] = global_batch
        return state


class Trainer:
    """SVI on a :class:`~pyro_vae.program.contract.Program` (the built-in one ``config.model``
    names, or ``program``); :func:`fit` is ``Trainer(...).train()``."""

    def __init__(self, config: VAEConfig, out=None, *, train_data=None, val_data=None, progress=True,
                 overwrite=False, resume=False, log=tqdm.write, callbacks: Sequence[Callback] = (),
                 encoder: Optional[torch.nn.Module] = None, decoder: Optional[torch.nn.Module] = None,
                 program: Optional[Program] = None):
        config.check()
        self.encoder, self.decoder = encoder, decoder  # your own networks (VAE(config, encoder=, decoder=))
        self.program = program  # your own program, or None: the built-in one config.model names
        custom = tuple(name for name, m in (("encoder", encoder), ("decoder", decoder)) if m is not None)
        config = config.replace(custom_modules=custom) if custom else config  # recorded: load_run needs them
        config = record_program(config, program) if program is not None else config  # load_run needs it again
        self.device = resolve_device(config.device)
        self.dp = DataParallel.current(self.device)  # None unless under torchrun
        if self.dp is not None:
            self.dp.check(config)
            if not self.dp.is_main:  # rank 0 alone logs, draws the progress bar, writes and calls back
                progress, log, callbacks = False, _silent, ()
        self.progress, self.log, self.callbacks = progress, log, list(callbacks)
        self.folder, saved = self._open(out, config, overwrite, resume)
        self.train_data, self.val_data = self._data(config, train_data, val_data)
        self.config = config = fit_to_data(config.replace(event_shape=tuple(self.train_data.event_shape)),
                                           self.train_data)  # m2: num_classes from the labels
        self.global_batch = config.batch_size * (1 if self.dp is None else self.dp.world_size)  # images per step
        if self.global_batch > len(self.train_data):
            per = "" if self.dp is None else f" x {self.dp.world_size} processes"
            raise ConfigError(f"batch_size={config.batch_size}{per} exceeds the {len(self.train_data)} training images")
        self._build(config)
        if overwrite:
            self.checkpoints.clear()
        self.position = None if saved is None else self._resume(saved)

    # ------------------------------------------------------------------ set-up

    def _open(self, out, config, overwrite, resume):
        if out is None:
            if resume:
                raise ConfigError("resume needs the run folder to continue (out=...)")
            return None, None
        opener = lambda: open_run_folder(out, config, overwrite, resume)  # noqa: E731
        return opener() if self.dp is None else self.dp.on_main(opener)  # others: rank 0's folder, checkpoint

    def _data(self, config, train_data, val_data):
        if train_data is None:
            train_data, val_data = load_splits(config)
        else:  # a tensor or Dataset handed over in Python becomes an ImageData (all of it)
            train_data, val_data = _image_data(config, train_data, val_data)
        for data in (train_data, val_data):
            if data is not None:
                check_images(data, config)
        return train_data, val_data

    def _build(self, config: VAEConfig) -> None:
        """Seed, data on the device, the model and guide, the loss and the optimizer."""
        if self.program is None:  # the built-in model's size is known from the config: refuse it before allocating
            rows = config.batch_size * config.num_particles
            check_memory(config, self.device, num_data=len(self.train_data), rows=rows,
                         rows_from=f"batch_size={config.batch_size}, num_particles={config.num_particles}")
        pyro.set_rng_seed(config.seed)
        pyro.clear_param_store()
        pyro.enable_validation(config.validate)
        self.images = self.train_data.images.to(self.device)  # [N, D], the whole data set on the device
        self.num_data = len(self.images)
        self.vae = self._program(config).to(self.device)
        # the validation ELBO needs q(z|x) for unseen images: amortized guides only
        with_encoder = self.vae.capabilities.amortized
        self.x_val = eval_binarized(self.val_data).to(self.device) if self.val_data is not None and with_encoder else None
        self.run = Run(config, self.vae, [], self.folder)
        note = fallbacks(self.vae, config, validation=self.x_val is not None)
        if note is not None:
            self.log(note)
        self.loss_fn = make_loss(self.vae, config)
        if self.loss_fn.fused:  # the fused loss must agree with Pyro's ELBO on this model: check once
            first = torch.arange(min(self.global_batch, self.num_data), device=self.device)
            check_fused(self.vae, config, self.images[first], first, self.num_data,
                        binarize=self.train_data.binarize == "dynamic")
        self.optimizer = make_optimizer(self.vae, config)
        self.base_lrs = [group["lr"] for group in _param_groups(self.optimizer)]  # config.lr_at(epoch) scales these
        self.params = list(self.vae.parameters())
        write = self.dp is None or self.dp.is_main
        self.checkpoints = Checkpointer(self.folder, write, self.vae, self.optimizer, config,
                                        data_fingerprint(self.train_data.images))
        self.guard = NonFiniteGuard(config.on_nonfinite, self.params, lambda: self.checkpoints.kept(self.run.history),
                                    self.log)
        self.exact_noise = self.dp is not None and self.dp.exact_noise(config, self.loss_fn)

    def _program(self, config: VAEConfig) -> Program:
        """The program (built-in, or ``program=``), checked on two training images."""
        program = self.program if self.program is not None else \
            build_program(config, self.num_data, self.train_data, self.encoder, self.decoder)
        if math.prod(program.event_shape) != config.x_dim:
            raise ConfigError(f"{program_name(program)}.event_shape {list(program.event_shape)} does not hold the data's "
                              f"{config.x_dim} numbers per datum ({list(config.event_shape)})")
        if self.dp is not None and not program.capabilities.data_parallel:
            raise ConfigError(f"{type(program).__name__} trains in a single process (capabilities.data_parallel: "
                              "per-image parameters, or step arguments every process would repeat)")
        rows = torch.arange(min(2, self.num_data))
        x = self.images[rows.to(self.device)].to(next(program.parameters()).device)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            x = torch.bernoulli(x) if self.train_data.binarize == "dynamic" else x
            check_program(program, x, rows.to(x.device), self.num_data, reparameterized=config.objective != "elbo")
        return program

    def _resume(self, saved: dict) -> Optional[dict]:
        position = self.checkpoints.restore(saved, self.run.history)
        if position is not None and position.get("global_batch", self.config.batch_size) != self.global_batch:
            raise ConfigError(
                f"--resume: {self.checkpoints.path} stopped inside an epoch of {position.get('global_batch')}-image "
                f"steps; resume it with the same number of processes (batch_size x processes = {self.global_batch} now)"
            )
        done, epochs = len(self.run.history), self.config.epochs
        step = f", step {position['step'] + 1}" if position else ""
        self.log(f"resuming {self.folder} at epoch {done + 1}/{epochs}{step}" if done < epochs
                 else f"{self.folder} already has {epochs} epochs: nothing to train (pass a larger --epochs to continue)")
        return position

    # ------------------------------------------------------------------ the loop

    def train(self) -> Run:
        """Run the epochs still to do; return the :class:`~pyro_vae.infer.run.Run`."""
        self.checkpoints.write_config()
        if self.train_data.binarize == "none" and self.config.likelihood == "bernoulli":
            self.log("note: --binarize none scores grey values with a Bernoulli: ELBOs are not log-likelihoods")
        for callback in self.callbacks:
            callback.on_train_begin(self)
        self.signal_at = SignalAt.from_env(0 if self.dp is None else self.dp.rank)  # tests: a signal at a chosen point
        with StopSignals(self.log) as self.signals, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")  # Pyro's; the loop reports NaN itself
            for epoch in range(len(self.run.history), self.config.epochs):
                state = self._start_epoch(epoch)
                self._schedule_lr(epoch)
                self.train_epoch(state)
                self._end_epoch(state)
            if self._stop_requested(sync=True):  # the signal came during the last epoch's bookkeeping
                raise self._interrupted(None, after_last=True)
        for callback in self.callbacks:
            callback.on_train_end(self)
        return self.run

    def _schedule_lr(self, epoch: int) -> None:
        """Set every learning rate to its configured value times ``config.lr_at(epoch)`` (a
        function of the epoch alone: a resumed run gets the same rates)."""
        factor = self.config.lr_at(epoch)
        for group, base in zip(_param_groups(self.optimizer), self.base_lrs):
            group["lr"] = base * factor

    def train_epoch(self, state: EpochState) -> None:
        """One pass over the training images in minibatches, one SVI step each."""
        start = time.perf_counter()
        batches = state.order.split(self.global_batch)  # under torchrun each rank takes its rows of each
        bar = tqdm(range(state.step, len(batches)), desc=f"epoch {state.epoch + 1}/{self.config.epochs}",
                   leave=False, disable=disable(self.progress), initial=state.step, total=len(batches))
        for state.step in bar:
            if self._stop_requested():  # finish no more steps: save the position, stop
                state.seconds += time.perf_counter() - start
                raise self._interrupted(state, steps=len(batches))
            idx = batches[state.step]  # [B] rows of the training images
            x = self.images[idx]  # [B, D]
            if self.train_data.binarize == "dynamic":
                x = torch.bernoulli(x)  # a fresh binarization every time an image is seen
            self._reached(state.epoch, state.step + 1)
            loss = self.step(x, idx, self.config.beta_at(state.epoch), state)
            self._reached(state.epoch, f"{state.step + 1}+")
            if loss is None:  # skipped (non-finite)
                state.skipped.append(state.step)
                continue
            state.loss_sum += loss.detach() * (len(idx) / self.num_data)
            if self.progress and state.step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item() / self.num_data:.2f}")
        bar.close()
        state.seconds += time.perf_counter() - start

    def step(self, x: torch.Tensor, idx: torch.Tensor, beta: float, state: EpochState) -> Optional[torch.Tensor]:
        """One SVI step: the gradient of the -ELBO estimate on the minibatch, then an Adam step.
        Returns the loss, or ``None`` when the step was skipped as non-finite."""
        loss = self._loss_and_grads(x, idx, beta, state)  # estimates -ELBO(all N images)
        where = f"epoch {state.epoch + 1}/{self.config.epochs}, step {state.step + 1}/{-(-self.num_data // self.global_batch)}"
        if not self.guard.accept(loss, where):  # NaN/inf: stop, or skip this step
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        for callback in self.callbacks:  # p.grad still holds this step's gradient
            callback.on_step_end(self, loss)
        return loss

    def _loss_and_grads(self, x, idx, beta, state: EpochState) -> torch.Tensor:
        if self.dp is not None:  # this rank's rows; gradients (and loss) combined over the ranks
            seed = _rank_seed(self.config.seed, state.epoch, state.step, self.dp.rank)
            return self.dp.loss_and_grads(self.loss_fn, x, idx, self.num_data, beta, self.optimizer, self.params,
                                          self.exact_noise, seed, self.signals.signum is not None, self.config.z_dim)
        try:
            loss = self.loss_fn(x, idx, self.num_data, beta)
        except ValueError:  # Pyro's argument validation rejects NaN parameters
            self.guard.check_params(f"before epoch {state.epoch + 1}, step {state.step + 1}")
            raise
        if bool(torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        return loss

    # ------------------------------------------------------------------ epoch bookkeeping

    def _start_epoch(self, epoch: int) -> EpochState:
        if self.position is not None:  # continue the interrupted epoch where it stopped
            p, self.position = self.position, None
            return EpochState(epoch, p["order"].to(self.device), p["step"], p["loss_sum"].to(self.device),
                              list(p["skipped"]), p["seconds"])
        self._reached(epoch, "start")
        if self._stop_requested(sync=True):  # between epochs: checkpoint, stop
            raise self._interrupted(None, epoch=epoch)
        order = torch.randperm(self.num_data, device=self.device)
        if self.dp is not None:  # every rank draws the same order; rank 0's is broadcast to be sure
            self.dp.broadcast_order(order)
        return EpochState(epoch, order, 0, torch.zeros((), device=self.device), [], 0.0)

    def _end_epoch(self, state: EpochState) -> None:
        """Score the epoch, append it to the history, checkpoint, log, call back."""
        start = time.perf_counter()
        epoch, config = state.epoch, self.config
        self.guard.check_params(f"in epoch {epoch + 1}")
        batches = state.order.split(self.global_batch)
        used = 1.0 - sum(len(batches[s]) for s in state.skipped) / self.num_data  # fraction of images scored
        if used <= 0:
            raise TrainingError(f"every step of epoch {epoch + 1} was skipped (non-finite). "
                                f"{self.checkpoints.kept(self.run.history)}{ADVICE}")
        train_elbo = -state.loss_sum.item() / self.num_data / (used if state.skipped else 1.0)
        val_elbo = self.validation_elbo()
        self._reached(epoch, "end")
        if not all(math.isfinite(v) for v in (train_elbo, val_elbo) if v is not None):
            raise self.guard.fail(f"non-finite ELBO in epoch {epoch + 1} (train {train_elbo}, validation {val_elbo})")
        record = {"epoch": epoch + 1, "beta": config.beta_at(epoch), "train_elbo": train_elbo, "val_elbo": val_elbo,
                  "seconds": state.seconds + time.perf_counter() - start}
        if state.skipped:
            record["skipped_steps"] = len(state.skipped)
        self.run.history.append(record)
        self.checkpoints.save(self.run.history)
        self.log(_epoch_line(record, config.epochs))
        for callback in self.callbacks:
            callback.on_epoch_end(self, record)

    def validation_elbo(self) -> Optional[float]:
        """The ELBO per image of the validation images (analytic KL, one z each), or ``None``."""
        if self.x_val is None:
            return None
        if self.dp is None:
            return elbo_per_image(self.vae, self.x_val)
        return self.dp.elbo_per_image(lambda part: elbo_per_image(self.vae, part), self.x_val)  # shards, all-reduced

    # ------------------------------------------------------------------ stopping on a signal

    def _reached(self, epoch: int, point) -> None:
        """Fault injection (``PYRO_VAE_SIGNAL_AT``, :class:`~pyro_vae.infer.interrupts.SignalAt`)."""
        signal_at = getattr(self, "signal_at", None)  # set by train()
        if signal_at is not None:
            signal_at.reached(epoch, point)

    def _stop_requested(self, sync: bool = False) -> bool:
        """Whether SIGINT/SIGTERM arrived (under torchrun: on any rank; ``sync`` asks the ranks now,
        otherwise the flag combined with the last step's gradients is used)."""
        local = self.signals.signum is not None
        if self.dp is None:
            return local
        return self.dp.any_stop(local) if sync else self.dp.stop

    def _interrupted(self, state: Optional[EpochState], epoch: int = 0, steps: int = 0,
                     after_last: bool = False) -> TrainingInterrupted:
        """Checkpoint where the loop stands and build the exception that says how to continue."""
        signum = self.signals.signum or signal.SIGTERM
        if after_last:
            return TrainingInterrupted(
                f"interrupted by {signal_name(signum)} after the last epoch; the training is complete and "
                f"saved{'' if self.folder is None else f' in {self.folder}'}, the figures were not drawn (--resume draws them)",
                signum,
            )
        if state is None:
            self.guard.check_params(f"before epoch {epoch + 1}")
            self.checkpoints.save(self.run.history)
            at = f"epoch {epoch + 1}/{self.config.epochs}"
        else:
            self.guard.check_params(f"in epoch {state.epoch + 1}")
            self.checkpoints.save(self.run.history, state.position(self.global_batch if self.dp is not None else None))
            at = f"epoch {state.epoch + 1}/{self.config.epochs} after step {state.step}/{steps}"
        saved_to = f"saved {self.checkpoints.path}; continue with --resume" if self.folder is not None else "nothing saved"
        return TrainingInterrupted(f"interrupted by {signal_name(signum)} in {at}; {saved_to}", signum)


def _image_data(config: VAEConfig, train_data, val_data):
    """``(train, val)`` as :class:`~pyro_vae.core.data.ImageData` (tensors, arrays, Datasets converted)."""
    return tuple(None if d is None else as_image_data(d, split=split, binarize=config.binarize, seed=config.split_seed)
                 for d, split in ((train_data, "train"), (val_data, "val")))


def _param_groups(optimizer) -> list:
    """The param groups of a torch optimizer or of :class:`~pyro_vae.infer.objectives.Optimizers`."""
    optimizers = getattr(optimizer, "optimizers", (optimizer,))
    return [group for o in optimizers for group in o.param_groups]


def _silent(message: str) -> None:
    """The log of ranks other than 0 under torchrun."""


def _rank_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of a rank's own draws in one step (losses that draw per row; pyro_vae.infer.distributed)."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2**63 - 1)


def _epoch_line(r: dict, epochs: int) -> str:
    val = "" if r["val_elbo"] is None else f"  val ELBO {r['val_elbo']:9.2f}"
    beta = "" if r["beta"] == 1.0 else f"  (beta {r['beta']:.2f})"
    return f"epoch {r['epoch']:>3}/{epochs}  train ELBO {r['train_elbo']:9.2f}{val}  nats/image  {r['seconds']:.1f}s{beta}"
