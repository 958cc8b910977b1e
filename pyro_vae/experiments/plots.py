"""Figures of a run, as PNG: ELBO curves, reconstructions, prior samples, the latent space."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from ..core.rundir import atomic_write
from ..infer.callbacks import Callback

__all__ = ["plot_elbo", "plot_reconstructions", "plot_samples", "plot_latent", "plot_manifold", "save_figures",
           "SaveFigures"]

DPI = 80


def _images(flat: torch.Tensor, nrow: int, event_shape) -> torch.Tensor:
    """``[B, C*H*W]`` -> a grid image for ``imshow``: ``[H', W']`` (grey) or ``[H', W', 3]`` (colour)."""
    grid = make_grid(flat.detach().cpu().reshape(-1, *event_shape), nrow=nrow, padding=2, pad_value=1.0)
    return grid[0].numpy() if event_shape[0] == 1 else grid.permute(1, 2, 0).clamp(0, 1).numpy()


def _show(grid: torch.Tensor, title: str, size=(6, 6)):
    fig, ax = plt.subplots(figsize=size)
    ax.imshow(grid, cmap="gray_r" if grid.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_elbo(history):
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_elbo"] for h in history], label="train")
    if any(h.get("val_elbo") is not None for h in history):
        ax.plot(epochs, [h["val_elbo"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats / image)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_reconstructions(run, x: torch.Tensor, n: int = 10):
    """Rows of ``n`` originals, each row followed by its reconstructions."""
    x = x[: 2 * n]
    recon = run.reconstruct(x).cpu()
    rows = [t for i in range(0, len(x), n) for t in (x[i : i + n].cpu(), recon[i : i + n])]
    grid = _images(torch.cat(rows), n, run.config.event_shape)
    return _show(grid, "originals (odd rows) / reconstructions (even rows)", (6, 0.65 * len(rows) + 0.5))


def plot_samples(run, n: int = 64, seed: int = 0):
    return _show(_images(run.sample(n, seed=seed), 8, run.config.event_shape), "decoded samples z ~ N(0, I)")


@torch.no_grad()
def plot_latent(run, x: torch.Tensor, labels=None):
    """Posterior means of ``x``: the two coordinates if z_dim = 2, else their PCA projection."""
    loc, _ = run.encode(x)
    loc = loc.cpu()
    if loc.shape[1] > 2:
        centred = loc - loc.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        loc, names = centred @ v[:, :2], ("PC 1", "PC 2")
    else:
        names = ("z[0]", "z[1]") if loc.shape[1] == 2 else ("z[0]", "")
        if loc.shape[1] == 1:
            loc = torch.cat([loc, torch.zeros_like(loc)], 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    c = None if labels is None else labels.cpu().numpy()
    loc = loc.numpy()
    points = ax.scatter(loc[:, 0], loc[:, 1], c=c, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    if labels is not None:
        fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title("posterior means E_q[z | x]")
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_manifold(run, n: int = 15, span: float = 2.5):
    """Decoded grid over the 2-d latent plane, ``z`` in ``[-span, span]^2`` (z_dim = 2 only)."""
    t = torch.linspace(-span, span, n)
    z = torch.stack(torch.meshgrid(-t, t, indexing="ij")[::-1], -1).reshape(-1, 2)  # rows: z[1] high to low
    images = run.vae.decode_mean(z.to(run.device))
    return _show(_images(images, n, run.config.event_shape), f"decoded grid over z in [-{span}, {span}]^2", (7, 7))


def save_figures(run, data, log=None) -> None:
    """Write ``elbo.png``, ``reconstructions.png``, ``samples.png``, ``latent.png`` (and
    ``manifold.png`` when z_dim = 2) into the run folder, using ``data`` for images (grey or
    colour grids). Data that are plain vectors (``event_shape`` ``[D]``) get the ELBO curve and the
    latent plot only, with a note to ``log``. The latent plot and the manifold need the one Gaussian
    latent of a ``gaussian_guide`` program; for other programs they are left out, with a note."""
    out = Path(run.path)
    gaussian = run.vae.capabilities.gaussian_guide
    n = 2000 if run.vae.capabilities.amortized else 500  # guides without an encoder fit each image
    x = data.images[:n]
    figures = {"elbo.png": plot_elbo(run.history)}
    if gaussian:
        figures["latent.png"] = plot_latent(run, x, None if data.labels is None else data.labels[:n])
    elif log is not None:
        log(f"note: {run.vae.program_class.__name__} has no single Gaussian latent (capabilities.gaussian_guide): "
            "latent.png and manifold.png are not drawn")
    if len(run.config.event_shape) == 3:  # images
        figures["reconstructions.png"] = plot_reconstructions(run, x)
        figures["samples.png"] = plot_samples(run)
        if gaussian and run.config.z_dim == 2:
            figures["manifold.png"] = plot_manifold(run)
    elif log is not None:
        log(f"note: the data are vectors of {run.config.x_dim} numbers, not images: "
            "reconstructions.png, samples.png and manifold.png are not drawn")
    for name, fig in figures.items():
        atomic_write(out / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=DPI))  # a full disk: one line
        plt.close(fig)


class SaveFigures(Callback):
    """Draw :func:`save_figures` into the run folder when training ends (``pyro-vae train`` uses
    it), from the validation images (the training images when there are none)."""

    def on_train_end(self, trainer) -> None:
        if trainer.folder is not None:
            save_figures(trainer.run, trainer.val_data if trainer.val_data is not None else trainer.train_data,
                         trainer.log)
