r"""Stochastic variational inference for the VAE: the training loop behind ``pyro-vae train``.

Each step is black-box VI: take a minibatch, draw :math:`\epsilon \sim \mathcal{N}(0, I)`, set
:math:`z = \mu + \sigma \odot \epsilon` (the reparameterization trick, done by the guide's
``rsample``), compute the ELBO estimate's gradient by backpropagation and take an Adam step.
The loss is Pyro's ``ELBO.differentiable_loss`` of ``model``/``guide``; one ``torch.optim.Adam``
updates every parameter (decoder and guide) at once, as in Pyro's PyTorch-native recipe.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm import tqdm

from .config import VAEConfig
from .datasets import ImageData, load_dataset
from .distributed import DataParallel
from .errors import CheckpointError, ConfigError, DataError, TrainingError, TrainingInterrupted
from .estimators import baseline_elbo
from .fused import check_fused, fused_available, fused_elbo_loss
from .interrupts import StopSignals, signal_name
from .model import VAE, X_DIM
from .run import (
    Run,
    check_resumable,
    clear_run_files,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    set_rng_state,
    write_json,
)

__all__ = [
    "fit",
    "make_elbo",
    "make_loss",
    "make_optimizer",
    "resolve_device",
    "load_splits",
    "elbo_per_image",
    "eval_binarized",
    "check_images",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def make_elbo(config: VAEConfig):
    """The ELBO estimator that ``config.elbo`` names; several particles are vectorised.
    Score-function baselines need ``TraceGraph_ELBO`` (``Trace_ELBO`` ignores them)."""
    if config.estimator == "score" and config.baseline != "none":
        return baseline_elbo(config.num_particles)
    cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "jit": JitTrace_ELBO}[config.elbo]
    vectorize = config.num_particles > 1
    return cls(num_particles=config.num_particles, vectorize_particles=vectorize, max_plate_nesting=1)


def load_splits(config: VAEConfig):
    """``(train, val)`` :class:`ImageData` as the config describes (val is ``None`` if val_size=0)."""
    common = dict(
        data_dir=config.data_dir,
        val_size=config.val_size,
        split_seed=config.split_seed,
        binarize=config.binarize,
    )
    train = load_dataset(config.dataset, "train", limit=config.limit, **common)
    val = load_dataset(config.dataset, "val", **common) if config.val_size > 0 else None
    return train, val


def eval_binarized(data: ImageData, seed: int = 0) -> torch.Tensor:
    """The images as evaluation scores them: one fixed, seeded binarization (or grey if none)."""
    if data.binarize != "dynamic":
        return data.images
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(data.images.cpu(), generator=g).to(data.images.device)


@torch.no_grad()
def elbo_per_image(vae: VAE, x: torch.Tensor, batch_size: int = 1000, seed: int = 0) -> float:
    """The ELBO in nats per image, with the analytic KL (``TraceMeanField_ELBO``), one z per image.

    Uses its own seeded random stream so calling it does not change the training stream.
    """
    elbo = TraceMeanField_ELBO()
    devices = [x.device] if x.device.type == "cuda" else []
    total = 0.0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for chunk in x.split(batch_size):
            total += elbo.loss(vae.model, vae.guide, chunk)
    return -total / x.shape[0]


class Optimizers:
    """Several torch optimizers stepped as one, with the single-optimizer interface."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def make_loss(vae: VAE, config: VAEConfig):
    """``loss(x, idx, num_data, beta)``: a differentiable estimate of the full-data -ELBO.

    Pyro's ``ELBO.differentiable_loss`` on ``vae.model``/``vae.guide``; where ``config.fused``
    and it is exact, :func:`~pyro_vae.fused.fused_elbo_loss`, the same estimate without tracing.
    """
    if config.fused and fused_available(config):
        analytic_kl = config.elbo == "meanfield"

        def loss(x, idx, num_data, beta, noise_rows=None):
            return fused_elbo_loss(vae, x, idx, num_data, beta, analytic_kl, noise_rows)

        loss.fused = True
        return loss
    elbo = make_elbo(config)

    def loss(x, idx, num_data, beta):  # num_data, beta by keyword: JitTrace_ELBO traces tensors only
        return elbo.differentiable_loss(vae.model, vae.guide, x, idx, num_data=num_data, beta=beta)

    loss.fused = False
    return loss


def make_optimizer(vae: VAE, config: VAEConfig):
    """One ``torch.optim.Adam`` over all parameters; with per-datapoint (sparse) parameters, a
    ``SparseAdam`` for those, so a minibatch step moves only the rows of its images."""
    sparse = [p for m in vae.modules() if isinstance(m, torch.nn.Embedding) and m.sparse for p in m.parameters()]
    dense = [p for p in vae.parameters() if all(p is not q for q in sparse)]
    adam = torch.optim.Adam(dense, lr=config.lr)
    if not sparse:
        return adam
    return Optimizers(adam, torch.optim.SparseAdam(sparse, lr=config.local_lr))


def fit(
    config: VAEConfig,
    out=None,
    *,
    train_data: Optional[ImageData] = None,
    val_data: Optional[ImageData] = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = tqdm.write,
) -> Run:
    """Train a VAE by SVI; return the :class:`~pyro_vae.run.Run` (and write it to ``out`` if given).

    :param config: every setting of the run.
    :param out: run folder to write (``config.json``, ``history.json``, ``checkpoint.pt``, figures).
    :param train_data, val_data: data to use instead of loading what ``config`` names.
    :param overwrite: replace a run already in ``out``.
    :param resume: continue the run in ``out`` from its checkpoint: the same parameters, optimizer
        state, random streams and position in the epoch, so on CPU the result equals an
        uninterrupted run. ``config`` must match the checkpoint's but for
        :data:`~pyro_vae.run.RESUME_MAY_CHANGE` (``epochs`` may grow).
    :raises TrainingError: a non-finite loss (``on_nonfinite="stop"``) or non-finite parameters;
        ``checkpoint.pt`` keeps the last good state.
    :raises TrainingInterrupted: SIGINT or SIGTERM; the current step was finished and a
        checkpoint to resume from was written.
    """
    config.check()
    device = resolve_device(config.device)
    dp = DataParallel.current(device)  # None unless under torchrun (pyro_vae.distributed)
    if dp is not None:
        dp.check(config)
        if not dp.is_main:  # rank 0 alone logs, draws the progress bar and writes files
            progress, log = False, _silent
    write = dp is None or dp.is_main
    saved = None
    if out is not None:

        def open_run():
            run_dir = prepare_run_dir(out, overwrite, resume)
            state = None
            if resume:
                state = load_checkpoint(run_dir / "checkpoint.pt")
                check_resumable(state, config, run_dir / "checkpoint.pt")
            return run_dir, state

        out, saved = open_run() if dp is None else dp.on_main(open_run)  # others: rank 0's folder, checkpoint
    elif resume:
        raise ConfigError("resume needs the run folder to continue (out=...)")
    if train_data is None:
        train_data, val_data = load_splits(config)
    for data in (train_data, val_data):
        if data is not None:
            check_images(data, config)
    global_batch = config.batch_size * (1 if dp is None else dp.world_size)  # images per optimizer step
    if global_batch > len(train_data):
        per = "" if dp is None else f" x {dp.world_size} processes"
        raise ConfigError(f"batch_size={config.batch_size}{per} exceeds the {len(train_data)} training images")
    if overwrite and write and out is not None:
        clear_run_files(out)

    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    pyro.enable_validation(config.validate)
    images = train_data.images.to(device)  # [N, 784], whole data set on the device
    # the validation ELBO needs q(z|x) for unseen images: amortized guides only (others: fit_local)
    amortized = config.guide != "mean-field"
    x_val = eval_binarized(val_data).to(device) if val_data is not None and amortized else None
    num_data = len(images)
    fingerprint = {"num_data": num_data, "sum": float(train_data.images.sum(dtype=torch.float64))}

    vae = VAE(config, num_data=num_data).to(device)
    run = Run(config, vae, [], out)
    loss_fn = make_loss(vae, config)
    if loss_fn.fused:  # the fused loss must agree with Pyro's ELBO on this model: check once
        first = torch.arange(min(global_batch, num_data), device=device)  # the same draws under torchrun
        check_fused(vae, config, torch.bernoulli(images[first]) if train_data.binarize == "dynamic" else images[first],
                    first, num_data)
    optimizer = make_optimizer(vae, config)
    params = list(vae.parameters())
    position = None  # where an interrupted epoch stopped (resume only)
    if saved is not None:
        position = _restore(saved, vae, optimizer, run, fingerprint, out / "checkpoint.pt")
        if position is not None and position.get("global_batch", config.batch_size) != global_batch:
            raise ConfigError(
                f"--resume: {out / 'checkpoint.pt'} stopped inside an epoch of {position.get('global_batch')}-image "
                f"steps; resume it with the same number of processes (batch_size x processes = {global_batch} now)"
            )
    exact_noise = dp is not None and dp.exact_noise(config, loss_fn)
    if out is not None and write:
        write_json(out / "config.json", config.to_dict())
    if train_data.binarize == "none":
        log("note: --binarize none scores grey values with a Bernoulli: ELBOs are not log-likelihoods")
    if saved is not None:
        step = f", step {position['step'] + 1}" if position else ""
        log(f"resuming {out} at epoch {len(run.history) + 1}/{config.epochs}{step}" if len(run.history) < config.epochs
            else f"{out} already has {config.epochs} epochs: nothing to train (pass a larger --epochs to continue)")

    def save(progress_state=None):
        if out is not None and write:
            save_checkpoint(out / "checkpoint.pt", vae, optimizer, config, run.history, progress_state, fingerprint)
            write_json(out / "history.json", run.history)

    def interrupted(signum, epoch, step=None, steps=None) -> TrainingInterrupted:
        at = f"epoch {epoch + 1}/{config.epochs}" + ("" if step is None else f" after step {step}/{steps}")
        saved_to = f"saved {out / 'checkpoint.pt'}; continue with --resume" if out is not None else "nothing saved"
        return TrainingInterrupted(f"interrupted by {signal_name(signum)} in {at}; {saved_to}", signum)

    with StopSignals(log) as stop, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN")  # Pyro's; the loop reports NaN itself
        for epoch in range(len(run.history), config.epochs):
            beta = config.beta_at(epoch)
            if position is not None:  # continue the interrupted epoch where it stopped
                order, first = position["order"].to(device), position["step"]
                loss_sum, skipped = position["loss_sum"].to(device), list(position["skipped"])
                elapsed, position = position["seconds"], None
            else:
                if stop.signum is not None if dp is None else dp.any_stop(stop.signum is not None):
                    _check_params(params, f"before epoch {epoch + 1}", out, run)  # between epochs: checkpoint
                    save()
                    raise interrupted(stop.signum or signal.SIGTERM, epoch)
                order = torch.randperm(num_data, device=device)
                if dp is not None:  # every rank draws the same order; rank 0's is broadcast to be sure
                    dp.broadcast_order(order)
                first, elapsed, skipped = 0, 0.0, []
                loss_sum = torch.zeros((), device=device)  # sum over images of -ELBO_i (no per-step sync)
            start = time.perf_counter()
            batches = order.split(global_batch)  # under torchrun each rank takes its rows of each
            bar = tqdm(
                range(first, len(batches)),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                leave=False,
                disable=not progress,
                initial=first,
                total=len(batches),
            )
            for step in bar:
                if stop.signum is not None if dp is None else dp.stop:  # finish no more steps: save the position
                    _check_params(params, f"in epoch {epoch + 1}", out, run)
                    elapsed += time.perf_counter() - start
                    state = {"epoch": epoch, "step": step, "order": order.cpu(), "loss_sum": loss_sum.cpu(),
                             "skipped": skipped, "seconds": elapsed}
                    if dp is not None:
                        state["global_batch"] = global_batch
                    save(state)
                    raise interrupted(stop.signum or signal.SIGTERM, epoch, step, len(batches))
                idx = batches[step]
                x = images[idx]
                if train_data.binarize == "dynamic":
                    x = torch.bernoulli(x)
                if dp is not None:  # this rank's rows; gradients (and loss) combined over the ranks
                    loss = dp.loss_and_grads(loss_fn, x, idx, num_data, beta, optimizer, params, exact_noise,
                                             _rank_seed(config.seed, epoch, step, dp.rank),
                                             stop.signum is not None, config.z_dim)
                    finite = bool(torch.isfinite(loss)) and (config.on_nonfinite == "stop" or _grads_finite(params))
                else:
                    try:
                        loss = loss_fn(x, idx, num_data, beta)  # estimates -ELBO(all N)
                    except ValueError:  # Pyro's argument validation rejects NaN parameters
                        _check_params(params, f"before epoch {epoch + 1}, step {step + 1}", out, run)
                        raise
                    finite = bool(torch.isfinite(loss))  # the loop's one sync per step
                    if finite:
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        finite = config.on_nonfinite == "stop" or _grads_finite(params)
                if not finite:
                    what = f"non-finite loss ({loss.item()})" if not torch.isfinite(loss) else "non-finite gradients"
                    where = f"epoch {epoch + 1}/{config.epochs}, step {step + 1}/{len(batches)}"
                    if config.on_nonfinite == "stop":
                        raise TrainingError(f"{what} in {where}; training stopped. {_kept(out, run)}{_ADVICE}")
                    log(f"{what} in {where}: step skipped")
                    skipped.append(step)
                    optimizer.zero_grad(set_to_none=True)
                    continue
                optimizer.step()
                loss_sum += loss.detach() * (len(idx) / num_data)
                if progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item() / num_data:.2f}")
            bar.close()
            _check_params(params, f"in epoch {epoch + 1}", out, run)
            used = 1.0 - sum(len(batches[s]) for s in skipped) / num_data  # fraction of images scored
            if used <= 0:
                raise TrainingError(
                    f"every step of epoch {epoch + 1} was skipped (non-finite). {_kept(out, run)}{_ADVICE}"
                )
            train_elbo = -loss_sum.item() / num_data / (used if skipped else 1.0)
            if x_val is None:
                val_elbo = None
            elif dp is None:
                val_elbo = elbo_per_image(vae, x_val)
            else:  # each rank scores its shard; the sums are all-reduced
                val_elbo = dp.elbo_per_image(lambda part: elbo_per_image(vae, part), x_val)
            if not all(math.isfinite(v) for v in (train_elbo, val_elbo) if v is not None):
                raise TrainingError(
                    f"non-finite ELBO in epoch {epoch + 1} (train {train_elbo}, validation {val_elbo}); "
                    f"training stopped. {_kept(out, run)}{_ADVICE}"
                )
            seconds = elapsed + time.perf_counter() - start
            record = {
                "epoch": epoch + 1,
                "beta": beta,
                "train_elbo": train_elbo,
                "val_elbo": val_elbo,
                "seconds": seconds,
            }
            if skipped:
                record["skipped_steps"] = len(skipped)
            run.history.append(record)
            save()
            log(_epoch_line(record, config.epochs))
        if stop.signum is not None if dp is None else dp.any_stop(stop.signum is not None):
            raise TrainingInterrupted(  # the signal came during the last epoch's bookkeeping
                f"interrupted by {signal_name(stop.signum or signal.SIGTERM)} after the last epoch; the training is complete and "
                f"saved{'' if out is None else f' in {out}'}, the figures were not drawn (--resume draws them)",
                stop.signum or signal.SIGTERM,
            )

    if out is not None and write:
        from .plots import save_figures

        save_figures(run, val_data if val_data is not None else train_data)
    return run


_ADVICE = " Lower --lr, or pass --on-nonfinite skip to skip such steps."


def _silent(message: str) -> None:
    """The log of ranks other than 0 under torchrun."""


def _rank_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Seed of a rank's own draws in one step (losses that draw per row; pyro_vae.distributed)."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1_009 + rank) % (2**63 - 1)


def _kept(out, run: Run) -> str:
    """What the run folder still holds after a failure (nothing non-finite is ever saved)."""
    if out is None:
        return "Nothing was saved (no run folder)."
    if (Path(out) / "checkpoint.pt").exists():
        return f"{Path(out) / 'checkpoint.pt'} keeps the last good state ({len(run.history)} epochs)."
    return "No checkpoint was written yet (start again with --overwrite)."


def _check_params(params, where: str, out, run: Run) -> None:
    """:class:`TrainingError` if any parameter is NaN or infinite (checked before every save)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainingError(f"parameters became non-finite {where}; training stopped. {_kept(out, run)}{_ADVICE}")


def _grads_finite(params) -> bool:
    """Whether every gradient is finite (one reduction; used only with ``on_nonfinite="skip"``)."""
    norms = [(p.grad._values() if p.grad.is_sparse else p.grad).norm() for p in params if p.grad is not None]
    return bool(torch.isfinite(torch.stack(norms).sum())) if norms else True


def check_images(data: ImageData, config: VAEConfig) -> None:
    """:class:`DataError` unless ``data`` is ``[N, 784]``, finite and, where pixels are read as
    probabilities of ink (Bernoulli likelihood or any binarization), within ``[0, 1]``.

    Out-of-range values are rejected, not clipped: they mean the data was scaled wrongly.
    """
    x = data.images
    if x.ndim != 2 or x.shape[1] != X_DIM:
        raise DataError(f"{data.describe()}: images must be flattened 28x28, [N, {X_DIM}]; got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{data.describe()}: images contain NaN or infinite values")
    if config.likelihood == "bernoulli" or data.binarize != "none":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{data.describe()}: pixel values must lie in [0, 1] (probabilities of ink); found [{lo:g}, {hi:g}]"
            )


def _restore(saved: dict, vae: VAE, optimizer, run: Run, fingerprint: dict, path) -> Optional[dict]:
    """Load a checkpoint's state into a freshly built run for ``resume``; return the position in
    an interrupted epoch (or ``None``). :class:`CheckpointError` for anything inconsistent."""
    if saved.get("data") not in (None, fingerprint):
        raise ConfigError(f"--resume: the training images differ from the ones {path} was trained on")
    try:
        vae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        history = list(saved["history"])
        if [h.get("epoch") for h in history] != list(range(1, len(history) + 1)):
            raise ValueError("history epochs are not 1, 2, ...")
        position = saved.get("progress")
        if position is not None:
            order, num_data = position["order"], fingerprint["num_data"]
            steps = -(-num_data // run.config.batch_size)
            if position["epoch"] != len(history) or not 0 <= position["step"] <= steps:
                raise ValueError("the position in the epoch is out of range")
            if not torch.equal(order.sort().values, torch.arange(num_data)):
                raise ValueError("the epoch's order is not a permutation of the training images")
            if any(not 0 <= s < steps for s in position["skipped"]):
                raise ValueError("skipped steps out of range")
            position = dict(position, seconds=float(position["seconds"]), loss_sum=position["loss_sum"].reshape(()))
        extra = saved.get("param_store") or {}
        if not all(isinstance(v, torch.Tensor) for v in extra.values()):
            raise ValueError("param_store entries must be tensors")
        device = next(vae.parameters()).device
        for name, value in extra.items():
            pyro.get_param_store()[name] = value.to(device)
        set_rng_state(saved["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({str(e).splitlines()[0]})") from None
    run.history[:] = history
    return position


def _epoch_line(r: dict, epochs: int) -> str:
    val = "" if r["val_elbo"] is None else f"  val ELBO {r['val_elbo']:9.2f}"
    beta = "" if r["beta"] == 1.0 else f"  (beta {r['beta']:.2f})"
    return f"epoch {r['epoch']:>3}/{epochs}  train ELBO {r['train_elbo']:9.2f}{val}  nats/image  {r['seconds']:.1f}s{beta}"

