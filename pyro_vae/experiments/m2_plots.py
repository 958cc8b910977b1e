"""Figures of an M2 run (:mod:`pyro_vae.program.m2`): the class-by-style grid (conditional
generation), the confusion matrix of the classifier q(y|x), and the plate diagram of the stacked
M1+M2 (:mod:`pyro_vae.program.m1m2`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch

from pyro.infer.inspect import get_model_relations

from ..core.data import eval_binarized
from ..core.rundir import atomic_write
from ..infer.callbacks import Callback
from ..infer.evaluate_m2 import confusion_matrix
from .diagrams import draw_plate_diagram
from .plots import DPI, _images, _show, plot_elbo

__all__ = ["class_style_grid", "plot_class_style", "plot_confusion", "plot_m1m2_diagram", "save_m2_figures",
           "SaveM2Figures"]


@torch.no_grad()
def class_style_grid(m2, x: torch.Tensor) -> torch.Tensor:
    """``[n, 1 + K, D]``: per image of ``x [n, D]``, the image, then E[x | y, z] for y = 0..K-1
    with its style ``z`` fixed at the posterior mean of q(z | x, y_hat), y_hat = argmax q(y|x)."""
    y_hat = m2.classify(x).argmax(-1)  # [n]
    z, _ = m2.posterior(x, y_hat)  # [n, z_dim]: the style of each image
    y = torch.arange(m2.config.num_classes, device=x.device).unsqueeze(-1)  # [K, 1]
    means = m2.decode_mean(y, z)  # [K, n, D]: every class in every style
    return torch.cat([x.unsqueeze(1), means.transpose(0, 1)], dim=1)


def plot_class_style(run, x: torch.Tensor, n: int = 8):
    """Rows: ``n`` images of ``x`` (first column) and their style decoded with every label."""
    grid = class_style_grid(run.vae, x[:n].to(run.device))
    k = grid.shape[1]
    return _show(_images(grid.reshape(-1, grid.shape[-1]), k, run.config.event_shape),
                 "left: image; then y = 0, 1, ... with the image's style z", (0.6 * k + 0.5, 0.6 * n + 0.7))


@torch.no_grad()
def plot_confusion(run, x: torch.Tensor, labels: torch.Tensor):
    """Confusion matrix of argmax q(y|x) on ``x`` against ``labels`` (counts; accuracy in the title)."""
    predicted = run.vae.classify(x.to(run.device)).argmax(-1).cpu()
    counts = confusion_matrix(labels.cpu(), predicted, run.config.num_classes)
    k = counts.shape[0]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(counts.numpy(), cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted: argmax q(y|x)")
    ax.set_ylabel("true label")
    accuracy = counts.diag().sum().item() / max(1, counts.sum().item())
    ax.set_title(f"{len(labels)} images, accuracy {100 * accuracy:.1f}%")
    fig.tight_layout()
    return fig


def plot_m1m2_diagram(program, x: torch.Tensor):
    """The plate diagram of an M1+M2 program (:class:`~pyro_vae.program.m1m2.M1M2`), read off its
    ``model`` and ``guide`` on images ``x [B, D]`` (the ``data`` plate; the labelled plate repeats
    it with y observed): two graphs stacked, M2's p(y) p(z2) p(z1|y, z2) on top of M1's p(x|z1);
    the guide's dashed arrows go up, x -> z1 (M1's frozen encoder) -> y, z2."""
    relations = get_model_relations(program.model, model_args=(x,))
    guide_relations = get_model_relations(program.guide, model_args=(x,))
    guide_relations["sample_sample"] = {site: parents for site, parents in guide_relations["sample_sample"].items()
                                        if site in program.latent_sites}  # not the closed-form KL's factors
    pos = {"y": (0.5, 0.76), "z": (1.0, 0.76), "z1": (0.75, 0.5), "x": (0.75, 0.18)}  # the plate box fits in [0, 1]
    fig = draw_plate_diagram(relations, guide_relations, pos=pos, size=(5.0, 4.2),
                             names={"z": "z_2", "z1": "z_1"}, reads={"z1": ["x"], "y": [], "z": []},
                             label_side={"z1": "right", "x": "right"})
    ax = fig.axes[0]
    ax.axhline(0.34, xmin=0.02, xmax=0.98, color="0.6", linestyle=":", linewidth=1)
    ax.text(0.02, 0.6, "M2\n(trained)", fontsize=8, color="0.3", va="center")
    ax.text(0.02, 0.18, "M1\n(frozen)", fontsize=8, color="0.3", va="center")
    return fig


def save_m2_figures(run, data) -> None:
    """Write ``elbo.png``, ``class_style.png`` and (when ``data`` has labels) ``confusion.png``
    into the run folder, from ``data``'s images (one seeded binarization)."""
    x = eval_binarized(data)[:2000]
    figures = {"elbo.png": plot_elbo(run.history)}
    if len(run.config.event_shape) == 3:
        figures["class_style.png"] = plot_class_style(run, x)
    if data.labels is not None:
        figures["confusion.png"] = plot_confusion(run, x, data.labels[:2000])
    for name, fig in figures.items():
        atomic_write(Path(run.path) / name, lambda f, fig=fig: fig.savefig(f, format="png", dpi=DPI))
        plt.close(fig)


class SaveM2Figures(Callback):
    """:func:`save_m2_figures` when training ends (``pyro-vae train --model m2``), from the
    validation images (the training images when there are none)."""

    def on_train_end(self, trainer) -> None:
        if trainer.folder is not None:
            save_m2_figures(trainer.run, trainer.val_data if trainer.val_data is not None else trainer.train_data)
