r"""The semi-supervised M2 model of Kingma et al. (2014) as a Pyro program: a discrete label
:math:`y` beside the style :math:`z`, observed for a few images and summed out for the rest.

Generative story, for each image :math:`i`:

.. math::

    y_i \sim \mathrm{Cat}(\pi),\ \pi = \tfrac{1}{K}\mathbf{1}, \qquad
    z_i \sim \mathcal{N}(0, I_d), \qquad
    x_i \mid y_i, z_i \sim p_\theta(x_i \mid y_i, z_i)

(the likelihood families of :mod:`~pyro_vae.program.likelihoods`, the decoder fed
:math:`[z, \mathrm{onehot}(y)]`). The guide is a classifier and an encoder,
:math:`q_\phi(y \mid x) = \mathrm{Cat}(\mathrm{softmax}\, g_\phi(x))` and
:math:`q_\phi(z \mid x, y) = \mathcal{N}(\mu_\phi(x, y), \mathrm{diag}\,\sigma^2_\phi(x, y))`.

For a **labelled** image the label is observed and

.. math::

    \mathcal{L}(x, y) = \mathbb{E}_{q(z \mid x, y)}\big[\log p_\theta(x \mid y, z) + \log p(z)
    - \log q_\phi(z \mid x, y)\big] + \log p(y) \le \log p(x, y);

for an **unlabelled** image :math:`y` is a latent variable, summed out exactly (Pyro's parallel
enumeration: all :math:`K` values at once, on a tensor dimension left of the plate):

.. math::

    \mathcal{U}(x) = \sum_{y=1}^{K} q_\phi(y \mid x)\big[\mathcal{L}(x, y) - \log q_\phi(y \mid x)\big]
    \le \log p(x).

Training maximises Kingma et al.'s objective, with the classification term that gives the
classifier a gradient from the labels (:math:`\alpha = 0.1 \cdot N`, ``config.alpha`` times the
number :math:`N` of training images):

.. math::

    \mathcal{J}^\alpha = \sum_{i \in \mathcal{D}_l} \mathcal{L}(x_i, y_i)
    + \sum_{i \in \mathcal{D}_u} \mathcal{U}(x_i)
    + \alpha \cdot \frac{1}{N_l} \sum_{i \in \mathcal{D}_l} \log q_\phi(y_i \mid x_i).

**How labels reach the program.** ``model`` and ``guide`` take the VAE's ``(x, idx, num_data,
beta)`` and one more argument, ``labelled = (x_l, y_l, rows_l)``. The ``data`` plate (size
:math:`N`, subsample ``idx``) runs over all training images in the trainer's shuffled order;
the images whose row is in the buffer ``labelled_rows`` are masked out of it
(``poutine.mask``), so the plate's :math:`N/B`-scaled sum estimates
:math:`\sum_{\mathcal{D}_u} \mathcal{U}`. The labelled term lives in a second plate,
``labelled`` (size :math:`N_l`, subsample ``rows_l``, scale :math:`N_l / L`), which every step
fills with ``labelled_batch`` labelled images (:meth:`M2.labelled_batch`): **every minibatch
mixes** :math:`B` images of the shuffled training set with :math:`L` labelled ones, so each
labelled image contributes :math:`\mathcal{L}(x, y)` and the classification term once, and
nothing through the unlabelled plate. Images without ``idx`` (validation, test) are all
unlabelled.
"""

from __future__ import annotations

from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from .likelihoods import LIKELIHOOD_FAMILIES
from .networks import Encoder, make_decoder, mlp
from .plates import data_plate

__all__ = ["M2", "choose_labelled", "with_label"]

Labelled = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x_l [L, D], y_l [L], rows_l [L] in 0..N_l-1)


def with_label(a: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[a, onehot(y)]`` on the last dim, leading dims broadcast: ``a [..., B, A]`` and an
    enumerated ``y [K, 1]`` (or observed ``y [B]``) give ``[K, B, A + K]``."""
    onehot = F.one_hot(y, num_classes).to(a.dtype)  # [..., K]
    lead = torch.broadcast_shapes(a.shape[:-1], onehot.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), onehot.expand(*lead, num_classes)], dim=-1)


def choose_labelled(labels: Optional[torch.Tensor], num_labels: int, num_classes: int, seed: int) -> torch.Tensor:
    """Rows of ``num_labels`` training images, balanced over the classes (``num_labels // K``
    each, the remainder to classes drawn at random), chosen with ``seed``; sorted, ``[N_l]``.
    :class:`ConfigError` when the data have no labels or too few images."""
    if labels is None:
        raise ConfigError("model=m2 needs labels: the data have none (IDX labels file, class subfolders or --labels-file)")
    if num_labels < num_classes:
        raise ConfigError(f"--labels {num_labels} is fewer than the {num_classes} classes: at least one per class")
    if num_labels > len(labels):
        raise ConfigError(f"--labels {num_labels} exceeds the {len(labels)} training images")
    g = torch.Generator().manual_seed(seed)
    per_class = torch.full((num_classes,), num_labels // num_classes, dtype=torch.long)
    per_class[torch.randperm(num_classes, generator=g)[: num_labels % num_classes]] += 1
    rows = []
    for k in range(num_classes):
        members = (labels.cpu() == k).nonzero().squeeze(-1)
        if len(members) < per_class[k]:
            raise ConfigError(f"--labels {num_labels} needs {int(per_class[k])} images of class {k}; the data have {len(members)}")
        rows.append(members[torch.randperm(len(members), generator=g)[: per_class[k]]])
    return torch.cat(rows).sort().values


class M2(nn.Module):
    """Kingma et al.'s M2: ``model`` p(y) p(z) p(x|y, z) and ``guide`` q(y|x) q(z|x, y).

    :param config: sizes (``z_dim``, ``hidden``, ``num_classes``, ``num_labels``), likelihood,
        ``alpha``.
    :param images, labels: the training images ``[N, D]`` and labels ``[N]``: the labelled subset
        is chosen from them (:func:`choose_labelled`). Without them (loading a run) the buffers
        are empty and filled by ``load_state_dict``.

    Networks (the building blocks of :mod:`~pyro_vae.program.networks`): ``classifier`` an MLP
    ``x -> logits [B, K]``; ``encoder`` an :class:`~pyro_vae.program.networks.Encoder` of
    ``[x, onehot(y)]``; ``decoder`` the built-in decoder of ``[z, onehot(y)]``.
    """

    def __init__(self, config: VAEConfig, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        super().__init__()
        self.config, k = config, config.num_classes
        self.x_dim = config.x_dim
        self.family = LIKELIHOOD_FAMILIES[config.likelihood]
        self.classifier = mlp([config.x_dim, *config.hidden, k])  # logits of q(y|x)
        self.encoder = Encoder(config.x_dim + k, config.hidden, config.z_dim)  # q(z|x, y)
        self.decoder = make_decoder(config.replace(z_dim=config.z_dim + k), self.family.outputs)  # p(x|y, z)
        self.register_buffer("labelled_rows", torch.zeros(config.num_labels, dtype=torch.long))  # [N_l] rows of D_l
        self.register_buffer("labelled_y", torch.zeros(config.num_labels, dtype=torch.long))  # [N_l] their labels
        # [N_l, D] their images: training data, not saved (only training needs them)
        self.register_buffer("labelled_x", torch.zeros(0, config.x_dim), persistent=False)
        if labels is not None:
            rows = choose_labelled(labels, config.num_labels, k, config.seed)
            self.labelled_rows, self.labelled_y = rows, labels.cpu()[rows]
            self.labelled_x = images.cpu()[rows]

    # ------------------------------------------------------------------ the probabilistic program

    def model(self, x, idx=None, num_data=None, beta=1.0, labelled: Optional[Labelled] = None):
        """p(x, y, z) = p(y) p(z) p(x|y, z): the unlabelled images of ``x [B, D]``, then ``labelled``."""
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, num_data), poutine.mask(mask=self._unlabelled(idx)):
            y = pyro.sample("y", self._prior_y(x.shape[0]))  # enumerated by the guide: [K, 1]
            self._generate(x, y, beta, "z", "x")
        if labelled is not None:
            xl, yl, rows = labelled
            with self._labelled_plate(rows):
                pyro.sample("y_l", self._prior_y(len(rows)), obs=yl)  # log p(y)
                self._generate(xl, yl, beta, "z_l", "x_l")
                pyro.module("classifier", self.classifier)
                with poutine.scale(scale=self._alpha(num_data)):  # alpha / N_l * log q(y|x)
                    pyro.sample("y_q", dist.Categorical(logits=self.classifier(xl)), obs=yl)

    def guide(self, x, idx=None, num_data=None, beta=1.0, labelled: Optional[Labelled] = None):
        """q(y|x) q(z|x, y); the unlabelled images' ``y`` enumerated in parallel (all K values at once)."""
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data), poutine.mask(mask=self._unlabelled(idx)):
            q_y = dist.Categorical(logits=self.classifier(x))  # [B], K values
            y = pyro.sample("y", q_y, infer={"enumerate": "parallel"})  # [K, 1]: each value of y, every image
            self._infer_z(x, y, beta, "z")  # [K, B, z_dim]
        if labelled is not None:
            xl, yl, rows = labelled
            with self._labelled_plate(rows):
                self._infer_z(xl, yl, beta, "z_l")  # [L, z_dim]

    def _generate(self, x, y, beta, z_name: str, x_name: str) -> None:
        prior_loc = x.new_zeros(x.shape[0], self.config.z_dim)  # [B, z_dim]
        with poutine.scale(scale=beta):
            z = pyro.sample(z_name, dist.Normal(prior_loc, torch.ones_like(prior_loc)).to_event(1))
        pyro.sample(x_name, self.likelihood(y, z), obs=x)  # batch [K, B] when y is enumerated

    def _infer_z(self, x, y, beta, name: str) -> torch.Tensor:
        loc, scale = self.encoder(with_label(x, y, self.config.num_classes))  # [K, B, z_dim] or [B, z_dim]
        with poutine.scale(scale=beta):
            return pyro.sample(name, dist.Normal(loc, scale).to_event(1))

    # ------------------------------------------------------------------ helpers

    def _prior_y(self, batch: int) -> dist.Categorical:
        return dist.Categorical(logits=self.labelled_rows.new_zeros(batch, self.config.num_classes, dtype=torch.float))

    def _unlabelled(self, idx):
        """``[B]`` True for the images of the batch without an observed label (``True``: all)."""
        return True if idx is None else ~torch.isin(idx, self.labelled_rows)

    def _labelled_plate(self, rows: torch.Tensor):
        return pyro.plate("labelled", size=self.config.num_labels, subsample=rows, dim=-1)

    def _alpha(self, num_data: Optional[int]) -> float:
        """Scale of ``log q(y|x)`` per labelled image: :math:`\\alpha N / N_l`."""
        return self.config.alpha * (num_data or self.config.num_labels) / self.config.num_labels

    def labelled_batch(self, size: int, binarize: bool) -> Labelled:
        """``size`` labelled images drawn without replacement (all when ``size >= N_l``), each
        pixel binarized afresh when ``binarize``: ``(x_l, y_l, rows_l)``."""
        n = len(self.labelled_y)
        rows = torch.arange(n, device=self.labelled_y.device) if size >= n else \
            torch.randperm(n, device=self.labelled_y.device)[:size]
        x = self.labelled_x[rows]
        return (torch.bernoulli(x) if binarize else x), self.labelled_y[rows], rows

    def decode(self, y: torch.Tensor, z: torch.Tensor):
        """The likelihood's parameters for label ``y`` and style ``z [..., z_dim]``."""
        return self.decoder(with_label(z, y, self.config.num_classes))

    def likelihood(self, y: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        """p(x|y, z), event shape ``[D]``, batched over the broadcast leading dims of ``y`` and ``z``."""
        return self.family.make(self.decode(y, z))

    def decode_mean(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E[x|y, z]: pixel probabilities (Bernoulli) or means, ``[..., D]``."""
        return self.likelihood(y, z).base_dist.mean

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y|x) for images ``x [B, D]``: ``[B, K]``."""
        return torch.log_softmax(self.classifier(x), dim=-1)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z|x, y), each ``[B, z_dim]``."""
        return self.encoder(with_label(x, y, self.config.num_classes))
