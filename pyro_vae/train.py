r"""Stochastic variational inference for the VAE: the training loop behind ``pyro-vae train``.

Each step is black-box VI: take a minibatch, draw :math:`\epsilon \sim \mathcal{N}(0, I)`, set
:math:`z = \mu + \sigma \odot \epsilon` (the reparameterization trick, done by the guide's
``rsample``), compute the ELBO estimate's gradient by backpropagation and take an Adam step.
The loss is Pyro's ``ELBO.differentiable_loss`` of ``model``/``guide``; one ``torch.optim.Adam``
updates every parameter (decoder and guide) at once, as in Pyro's PyTorch-native recipe.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import pyro
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO
from tqdm import tqdm

from .config import VAEConfig
from .datasets import ImageData, load_dataset
from .errors import ConfigError
from .model import VAE
from .run import Run, prepare_run_dir, save_checkpoint, write_json

__all__ = ["fit", "make_elbo", "make_optimizer", "resolve_device", "load_splits", "elbo_per_image", "eval_binarized"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def make_elbo(config: VAEConfig):
    """The ELBO estimator that ``config.elbo`` names; several particles are vectorised."""
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
    log: Callable[[str], None] = tqdm.write,
) -> Run:
    """Train a VAE by SVI; return the :class:`~pyro_vae.run.Run` (and write it to ``out`` if given).

    :param config: every setting of the run.
    :param out: run folder to write (``config.json``, ``history.json``, ``checkpoint.pt``, figures).
    :param train_data, val_data: data to use instead of loading what ``config`` names.
    """
    config.check()
    device = resolve_device(config.device)
    out = prepare_run_dir(out, overwrite) if out is not None else None
    if train_data is None:
        train_data, val_data = load_splits(config)
    if config.batch_size > len(train_data):
        raise ConfigError(f"batch_size={config.batch_size} exceeds the {len(train_data)} training images")

    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()
    pyro.enable_validation(config.validate)
    images = train_data.images.to(device)  # [N, 784], whole data set on the device
    # the validation ELBO needs q(z|x) for unseen images: amortized guides only (others: fit_local)
    amortized = config.guide != "mean-field"
    x_val = eval_binarized(val_data).to(device) if val_data is not None and amortized else None
    num_data = len(images)

    vae = VAE(config, num_data=num_data).to(device)
    run = Run(config, vae, [], out)
    if out is not None:
        write_json(out / "config.json", config.to_dict())
    loss_fn = make_elbo(config).differentiable_loss
    optimizer = make_optimizer(vae, config)
    if train_data.binarize == "none":
        log("note: --binarize none scores grey values with a Bernoulli: ELBOs are not log-likelihoods")

    for epoch in range(config.epochs):
        start = time.perf_counter()
        beta = config.beta_at(epoch)
        order = torch.randperm(num_data, device=device)
        batches = order.split(config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress)
        loss_sum = torch.zeros((), device=device)  # sum over images of -ELBO_i (no per-step sync)
        for step, idx in enumerate(bar):
            x = images[idx]
            if train_data.binarize == "dynamic":
                x = torch.bernoulli(x)
            loss = loss_fn(vae.model, vae.guide, x, idx, num_data, beta)  # estimates -ELBO(all N)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * (len(idx) / num_data)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item() / num_data:.2f}")
        bar.close()
        train_elbo = -loss_sum.item() / num_data
        val_elbo = elbo_per_image(vae, x_val) if x_val is not None else None
        seconds = time.perf_counter() - start
        record = {"epoch": epoch + 1, "beta": beta, "train_elbo": train_elbo, "val_elbo": val_elbo, "seconds": seconds}
        run.history.append(record)
        log(_epoch_line(record, config.epochs))
        if out is not None:
            save_checkpoint(out / "checkpoint.pt", vae, optimizer, config, run.history)
            write_json(out / "history.json", run.history)

    if out is not None:
        from .plots import save_figures

        save_figures(run, val_data if val_data is not None else train_data)
    return run


def _epoch_line(r: dict, epochs: int) -> str:
    val = "" if r["val_elbo"] is None else f"  val ELBO {r['val_elbo']:9.2f}"
    beta = "" if r["beta"] == 1.0 else f"  (beta {r['beta']:.2f})"
    return f"epoch {r['epoch']:>3}/{epochs}  train ELBO {r['train_elbo']:9.2f}{val}  nats/image  {r['seconds']:.1f}s{beta}"

