r"""Data-parallel training on ``torch.distributed``: ``torchrun --nproc_per_node=W -m pyro_vae train ...``.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment) the CLI
calls :func:`init` (NCCL on GPUs, gloo on CPU) and :func:`pyro_vae.train.fit` finds the process
group with :meth:`DataParallel.current`; without one every distributed branch is skipped and the
single-process loop is unchanged.

**Batches.** ``batch_size`` is per process: global step :math:`s` takes the global batch
:math:`G_s` = ``order[s*W*B:(s+1)*W*B]`` of the epoch's permutation (the same on every rank: all
ranks share the seed, and rank 0's order is broadcast once per epoch to be sure) and rank
:math:`r` uses its contiguous share :math:`G_s^{(r)}` of it (:func:`shard`; a last, short global
batch of :math:`n` rows is split as evenly as possible, sizes differing by at most one; no image
is dropped).

**Scaling.** Each rank's loss is the plate-scaled minibatch estimate of the full-data -ELBO,
:math:`\widehat{\mathcal{L}}_r = -\frac{N}{n_r} \sum_{i \in G^{(r)}} \ell_i`, unbiased on its
own. The gradients are combined with weights :math:`w_r = n_r / n` (``all_reduce`` SUM of
:math:`w_r \nabla \widehat{\mathcal{L}}_r`):

.. math::

    \sum_r \frac{n_r}{n} \nabla \widehat{\mathcal{L}}_r
    = -\frac{N}{n} \sum_{i \in G} \nabla \ell_i ,

exactly the gradient single-process training takes with the batch :math:`G` of
:math:`n = W B` images (for full batches :math:`w_r = 1/W`: DDP's average). The loss value is
combined the same way, so the logged train ELBO is the single-process one.

**Random draws.** Every rank draws the dynamic binarization of the whole global batch and keeps
its rows, and (fused loss, amortized guide) draws the reparameterization noise
:math:`\epsilon` for the whole global batch and keeps its rows
(``fused_elbo_loss(..., noise_rows=(offset, n))``): the ranks' random streams stay in lockstep
and equal the single-process stream with batch :math:`W B`, so 2 processes x batch B reach the
parameters of 1 process x batch 2B up to float rounding (``tests/test_distributed.py``). Losses
that draw per row themselves (Pyro's traced ELBOs, the semi-amortized refinement, several
particles) draw inside a forked stream seeded by (seed, epoch, step, rank): independent across
ranks, the main stream still in lockstep, but not equal to a single-process run.

**Validation** is sharded the same way (contiguous rows), each rank scores its shard with
:func:`pyro_vae.infer.objectives.elbo_per_image`, and the sums are all-reduced (a one-sample estimate, so it
differs from the single-process number by Monte-Carlo noise).

**Files.** Rank 0 alone prepares and writes the run folder, logs and draws the progress bar;
the others wait at a barrier and receive the checkpoint (``--resume``) from rank 0. A stop signal
on any rank is all-reduced with the step's gradients, so every rank stops after the same step
and rank 0 writes the checkpoint; ``--resume`` continues it with the same ``torchrun`` command.

The mean-field guide (free parameters per image) is refused: its sparse per-image parameters
would have to be sharded by datapoint, which is not implemented.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..core.errors import ConfigError, PyroVAEError

__all__ = ["under_torchrun", "init", "shutdown", "shard", "DataParallel"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its rendezvous variables are set)."""
    return all(k in os.environ for k in _ENV)


def init(device: str = "auto", timeout_s: float = 600.0) -> bool:
    """Initialise the default process group from torchrun's environment (NCCL where the run uses
    CUDA, gloo otherwise); ``False`` (nothing done) outside torchrun or if already initialised."""
    if not under_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous rows of ``n``: sizes ``n // W`` or ``n // W + 1`` (the first
    ``n % W`` ranks take one more), covering ``0..n`` exactly once. With ``n = W * B``: rows
    ``[rank * B, (rank + 1) * B)``."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class DataParallel:
    """This process's part in data-parallel training (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.stop = False  # a stop signal seen on any rank (all-reduced with every step)

    @classmethod
    def current(cls, device: torch.device) -> Optional["DataParallel"]:
        """The data-parallel context if a process group with several ranks is initialised, else ``None``."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, config) -> None:
        if config.guide == "mean-field":
            raise ConfigError(
                "the mean-field guide holds parameters per training image and cannot be trained with torchrun "
                "(they are not sharded); use --guide amortized or semi-amortized, or a single process"
            )

    def exact_noise(self, config, loss_fn) -> bool:
        """Whether the loss draws one ε per image from the main stream (then drawn for the global batch)."""
        return bool(getattr(loss_fn, "fused", False)) and (config.guide == "amortized" or config.refine_steps == 0)

    # ------------------------------------------------------------------ rank 0 does, the others hear

    def on_main(self, fn: Callable[[], object]):
        """Run ``fn`` on rank 0 and give every rank its result; an error on rank 0 is raised on every
        rank (as the same exception class where possible), so none waits forever."""
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # PyroVAEError, OSError (an unwritable --out), ...
                box[0] = ("error", (type(e), str(e)))
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            cls, message = value
            try:
                error = cls(message)
            except Exception:  # a class that needs other arguments
                error = PyroVAEError(message)
            raise error
        return value

    def broadcast_order(self, order: torch.Tensor) -> torch.Tensor:
        dist.broadcast(order, src=0)
        return order

    def any_stop(self, local: bool) -> bool:
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag)
        self.stop = bool(flag.item() > 0)
        return self.stop

    # ------------------------------------------------------------------ one training step

    def loss_and_grads(self, loss_fn, x, idx, num_data: int, beta: float, optimizer, params: Sequence[torch.Tensor],
                       exact_noise: bool, seed: int, local_stop: bool, z_dim: int) -> torch.Tensor:
        """Compute this rank's share of the global batch ``x``/``idx``, backpropagate, and combine
        every parameter's gradient across ranks (weights ``n_r / n``, one ``all_reduce``).

        Returns the global loss (what a single process computes on the whole global batch). The
        parameters' ``.grad`` are then the global gradient (``None`` where no rank had one); any
        rank's stop signal is combined too, into :attr:`stop`."""
        n = x.shape[0]
        rows = shard(n, self.rank, self.world_size)
        x_r, idx_r = x[rows], idx[rows]
        n_r = x_r.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=x.device)
        if n_r > 0:
            if exact_noise:
                loss = loss_fn(x_r, idx_r, num_data, beta, noise_rows=(rows.start, n))
            else:
                devices = [x.device] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    loss = loss_fn(x_r, idx_r, num_data, beta)
            if bool(torch.isfinite(loss)):
                loss.backward()
        elif exact_noise:  # keep the stream in lockstep: draw this global batch's noise anyway
            torch.empty(n, z_dim, device=x.device).normal_()
        weight = n_r / n
        grads = [p.grad for p in params]
        flat = [torch.tensor([float(loss.detach()) * weight, 1.0 if local_stop else 0.0], device=x.device)]
        has = torch.tensor([0.0 if g is None else 1.0 for g in grads], device=x.device)
        flat.append(has)
        for p, g in zip(params, grads):
            flat.append((torch.zeros_like(p) if g is None else g * weight).reshape(-1))
        buffer = torch.cat(flat)
        dist.all_reduce(buffer)
        total_loss, stop = buffer[0], buffer[1]
        has = buffer[2:2 + len(params)]
        offset = 2 + len(params)
        for i, p in enumerate(params):
            k = p.numel()
            if has[i] > 0:
                p.grad = buffer[offset:offset + k].view_as(p).clone()
            else:
                p.grad = None
            offset += k
        self.stop = bool(stop > 0)
        return total_loss

    # ------------------------------------------------------------------ validation

    def elbo_per_image(self, score: Callable[[torch.Tensor], float], x: torch.Tensor) -> float:
        """The ELBO per image of all of ``x``: each rank scores its contiguous shard with ``score``
        (nats per image) and the sums are all-reduced."""
        rows = shard(x.shape[0], self.rank, self.world_size)
        part = x[rows]
        total = score(part) * part.shape[0] if part.shape[0] > 0 else 0.0
        t = torch.tensor([total], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / x.shape[0]

