"""Experiments around the semi-supervised M2 (:mod:`pyro_vae.program.m2`): the classifier of
an M2 run against the same network trained on the labelled images alone."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.config import VAEConfig
from ..program.networks import mlp

__all__ = ["accuracy", "labelled_only_classifier"]


@torch.no_grad()
def accuracy(classify, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``images [N, D]`` whose ``classify(x).argmax(-1)`` (logits or log-probabilities
    ``[B, K]``) equals ``labels [N]``."""
    right = sum(int((classify(x).argmax(-1) == y).sum()) for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return right / len(labels)


def labelled_only_classifier(config: VAEConfig, images: torch.Tensor, labels: torch.Tensor, steps: int = 1000,
                             batch_size: int = 100, dynamic: bool = True) -> torch.nn.Module:
    """The M2 classifier's network, ``mlp([D, *hidden, K])``, trained on ``images [N_l, D]`` and
    ``labels`` alone: ``steps`` Adam steps (``config.lr``) of cross-entropy on minibatches of
    ``batch_size``, each image binarized afresh when ``dynamic`` (as M2 sees them), seeded by
    ``config.seed``. The supervised baseline of Kingma et al.'s comparison."""
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net = mlp([config.x_dim, *config.hidden, config.num_classes])
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    for _ in range(steps):
        rows = torch.randperm(len(labels), generator=g)[:batch_size]
        x = images[rows]
        x = torch.bernoulli(x, generator=g) if dynamic else x
        loss = F.cross_entropy(net(x), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()
