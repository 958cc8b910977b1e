"""Experiments around the semi-supervised M2 (:mod:`pyro_vae.program.m2`): the classifier of
an M2 run against the same network trained on the labelled images alone (on their pixels, or for
M1+M2 on M1's codes of them)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..core.config import VAEConfig
from ..program.networks import mlp

__all__ = ["accuracy", "labelled_only_classifier", "codes_classifier"]


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
    torch.manual_seed(config.seed)
    net = mlp([config.x_dim, *config.hidden, config.num_classes])
    return _train_classifier(net, lambda x: x, images, labels, config, steps, batch_size, dynamic)


def codes_classifier(program, images: torch.Tensor, labels: torch.Tensor, steps: int = 1000,
                     batch_size: int = 100, dynamic: bool = True) -> torch.nn.Module:
    """The same network on M1's codes of the labelled images (the second baseline of an M1+M2 run,
    :class:`~pyro_vae.program.m1m2.M1M2`): ``mlp([n, *hidden, K])`` on what its classifier reads,
    ``program.read(x)`` (the mean of q(z1|x) on the n active units), trained as
    :func:`labelled_only_classifier`. Classify images with ``net(program.read(x))``."""
    config = program.config
    torch.manual_seed(config.seed)
    net = mlp([len(config.feature_units), *config.hidden, config.num_classes])
    return _train_classifier(net, program.read, images, labels, config, steps, batch_size, dynamic)


def _train_classifier(net, read, images, labels, config: VAEConfig, steps: int, batch_size: int, dynamic: bool):
    """``steps`` Adam steps of the cross-entropy of ``net(read(x))`` on minibatches of the labelled images."""
    g = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    for _ in range(steps):
        rows = torch.randperm(len(labels), generator=g)[:batch_size]
        x = images[rows]
        x = torch.bernoulli(x, generator=g) if dynamic else x
        with torch.no_grad():
            inputs = read(x)
        loss = F.cross_entropy(net(inputs), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()
