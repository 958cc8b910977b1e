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
number :math:`N` of training images) and a weight :math:`w` on the labelled ELBO
(``config.labelled_weight``):

.. math::

    \mathcal{J}^{\alpha, w} = \sum_{i \in \mathcal{D}_u} \mathcal{U}(x_i)
    + w \sum_{i \in \mathcal{D}_l} \mathcal{L}(x_i, y_i)
    + \alpha \cdot \frac{1}{N_l} \sum_{i \in \mathcal{D}_l} \log q_\phi(y_i \mid x_i),
    \qquad w = \begin{cases} 1 & \texttt{data} \\ \lceil N / B \rceil & \texttt{step} \\
    \text{the number given} \end{cases}

``data`` (the default) is the ELBO of all :math:`N` images: a labelled image weighs as one image
of the data. ``step`` counts the labelled minibatch's ELBO once per step beside the :math:`B`
unlabelled images, i.e. :math:`\lceil N/B \rceil` (the steps per epoch) times its share of the data;
per image of a minibatch it weighs :math:`N_l / L` times what an unlabelled image weighs
(:math:`L` = ``labelled_batch``). The classification term keeps its weight :math:`\alpha` either way.

``config.elbo="meanfield"`` computes :math:`\mathbb{E}_q[\log p(z) - \log q(z \mid x, y)] =
-\mathrm{KL}(q(z \mid x, y) \,\|\, \mathcal{N}(0, I))` in closed form (Kingma et al.'s choice), as
``TraceMeanField_ELBO`` does for the VAE, inside the enumerated ELBO: the ``z`` sites are masked
and the guide adds the KL as a factor (``pyro.factor(..., has_rsample=True)``); ``z`` is still
drawn and read by the decoder.

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
from torch.distributions import kl_divergence
from torch.nn import functional as F

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from .contract import Capabilities, Program
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


class M2(Program):
    """Kingma et al.'s M2: ``model`` p(y) p(z) p(x|y, z) and ``guide`` q(y|x) q(z|x, y); a
    :class:`~pyro_vae.program.contract.Program` whose guide enumerates ``y``, and whose training
    steps take the labelled minibatch (:meth:`step_arguments`).

    :param config: sizes (``z_dim``, ``hidden``, ``num_classes``, ``num_labels``), likelihood,
        ``alpha``.
    :param images, labels: the training images ``[N, D]`` and labels ``[N]``: the labelled subset
        is chosen from them (:func:`choose_labelled`). Without them (loading a run) the buffers
        are empty and filled by ``load_state_dict``.

    Networks (the building blocks of :mod:`~pyro_vae.program.networks`): ``classifier`` an MLP
    ``x -> logits [B, K]``; ``encoder`` an :class:`~pyro_vae.program.networks.Encoder` of
    ``[x, onehot(y)]``; ``decoder`` the built-in decoder of ``[z, onehot(y)]``.

    A model of something other than the pixels (the stacked
    :class:`~pyro_vae.program.m1m2.M1M2`) overrides what the networks read (:meth:`read` at test
    time, :meth:`_sample_read` in the guide), what the model observes (:meth:`_observe`) and the
    decoder (:meth:`_make_decoder`); the plates, the enumeration and the objective stay these.
    """

    def __init__(self, config: VAEConfig, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        super().__init__()
        self.config, k = config, config.num_classes
        self.x_dim = config.x_dim
        self.family = LIKELIHOOD_FAMILIES[config.likelihood]
        self.classifier = mlp([config.x_dim, *config.hidden, k])  # logits of q(y|x)
        self.encoder = Encoder(config.x_dim + k, config.hidden, config.z_dim)  # q(z|x, y)
        self.decoder = self._make_decoder(config)  # p(x|y, z)
        self.register_buffer("labelled_rows", torch.zeros(config.num_labels, dtype=torch.long))  # [N_l] rows of D_l
        self.register_buffer("labelled_y", torch.zeros(config.num_labels, dtype=torch.long))  # [N_l] their labels
        # [N_l, D] their images: training data, not saved (only training needs them)
        self.register_buffer("labelled_x", torch.zeros(0, config.x_dim), persistent=False)
        if labels is not None:
            rows = choose_labelled(labels, config.num_labels, k, config.seed)
            self.labelled_rows, self.labelled_y = rows, labels.cpu()[rows]
            self.labelled_x = images.cpu()[rows]

    latent_sites = ("y", "z")  # of an image of the data plate (z_l: the labelled plate's, training only)
    capabilities = Capabilities(enumerate=True, data_parallel=False)  # every rank would repeat the labelled batch

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return tuple(self.config.event_shape)

    def step_arguments(self) -> dict:
        """``labelled``: a fresh labelled minibatch for each training step (:meth:`labelled_batch`)."""
        return {"labelled": self.labelled_batch(self.config.labelled_batch, self.config.binarize == "dynamic")}

    # ------------------------------------------------------------------ the probabilistic program

    def model(self, x, idx=None, num_data=None, beta=1.0, labelled: Optional[Labelled] = None):
        """p(x, y, z) = p(y) p(z) p(x|y, z): the unlabelled images of ``x [B, D]``, then ``labelled``
        (sites ``y_l``, ``z_l``, ``x_l``, their ELBO weighted by :math:`w`, and ``y_q``)."""
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, num_data), poutine.mask(mask=self._unlabelled(idx)):
            y = pyro.sample("y", self._prior_y(x.shape[0]))  # enumerated by the guide: [K, 1]
            self._generate(x, y, beta, "")
        if labelled is not None:
            xl, yl, rows = labelled
            with self._labelled_plate(rows):
                with poutine.scale(scale=self._labelled_weight(num_data)):  # w: the labelled ELBO
                    pyro.sample("y_l", self._prior_y(len(rows)), obs=yl)  # log p(y)
                    read = self._generate(xl, yl, beta, "_l")
                pyro.module("classifier", self.classifier)
                with poutine.scale(scale=self._alpha(num_data)):  # alpha / N_l * log q(y|x)
                    pyro.sample("y_q", dist.Categorical(logits=self.classifier(read)), obs=yl)

    def guide(self, x, idx=None, num_data=None, beta=1.0, labelled: Optional[Labelled] = None):
        """q(y|x) q(z|x, y); the unlabelled images' ``y`` enumerated in parallel (all K values at once)."""
        pyro.module("classifier", self.classifier)
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data), poutine.mask(mask=self._unlabelled(idx)):
            read = self._sample_read(x, "")
            q_y = dist.Categorical(logits=self.classifier(read))  # [B], K values
            y = pyro.sample("y", q_y, infer={"enumerate": "parallel"})  # [K, 1]: each value of y, every image
            self._infer_z(read, y, beta, "")  # [K, B, z_dim]
        if labelled is not None:
            xl, yl, rows = labelled
            with self._labelled_plate(rows), poutine.scale(scale=self._labelled_weight(num_data)):
                self._infer_z(self._sample_read(xl, "_l"), yl, beta, "_l")  # [L, z_dim]

    def _generate(self, x, y, beta, suffix: str) -> torch.Tensor:
        """``z ~ N(0, I)`` then the data (:meth:`_observe`); sites ``z``, ``x`` + ``suffix``."""
        prior_loc = x.new_zeros(x.shape[0], self.config.z_dim)  # [B, z_dim]
        with poutine.scale(scale=beta), poutine.mask(mask=not self.closed_form_kl):
            z = pyro.sample(f"z{suffix}", dist.Normal(prior_loc, torch.ones_like(prior_loc)).to_event(1))
        return self._observe(x, y, z, suffix)

    def _observe(self, x, y, z, suffix: str) -> torch.Tensor:
        """``x ~ p(x|y, z)``, observed (batch ``[K, B]`` when y is enumerated); returns what the
        classifier reads of ``x``: the images themselves."""
        pyro.sample(f"x{suffix}", self.likelihood(y, z), obs=x)
        return x

    def _sample_read(self, x, suffix: str) -> torch.Tensor:
        """What the guide's networks read of the images ``x`` in a training step: ``x`` itself."""
        return x

    def _infer_z(self, read, y, beta, suffix: str) -> torch.Tensor:
        r"""``z ~ q(z|x, y)``; with :attr:`closed_form_kl` the site is masked and
        :math:`\mathrm{KL}(q \,\|\, \mathcal{N}(0, I))` enters as a factor of the guide."""
        q = dist.Normal(*self.encoder(with_label(read, y, self.config.num_classes))).to_event(1)  # [K, B] or [B]
        with poutine.scale(scale=beta):
            if not self.closed_form_kl:
                return pyro.sample(f"z{suffix}", q)
            with poutine.mask(mask=False):
                z = pyro.sample(f"z{suffix}", q)
            prior = dist.Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)).to_event(1)
            pyro.factor(f"z{suffix}_kl", kl_divergence(q, prior), has_rsample=True)  # log q - log p, in closed form
            return z

    @property
    def closed_form_kl(self) -> bool:
        """Whether the KL of ``z`` is computed in closed form (``config.elbo="meanfield"``)."""
        return self.config.elbo == "meanfield"

    # ------------------------------------------------------------------ helpers

    def _prior_y(self, batch: int) -> dist.Categorical:
        return dist.Categorical(logits=self.labelled_rows.new_zeros(batch, self.config.num_classes, dtype=torch.float))

    def _unlabelled(self, idx):
        """``[B]`` True for the images of the batch without an observed label (``True``: all)."""
        return True if idx is None else ~torch.isin(idx, self.labelled_rows)

    def _labelled_plate(self, rows: torch.Tensor):
        return pyro.plate("labelled", size=self.config.num_labels, subsample=rows, dim=-1)

    def _labelled_weight(self, num_data: Optional[int]) -> float:
        r""":math:`w`, the weight of the labelled ELBO (module docstring): 1 (``data``), the steps per
        epoch :math:`\lceil N/B \rceil` (``step``), or the number ``config.labelled_weight``."""
        weight = self.config.labelled_weight
        if weight == "data":
            return 1.0
        if weight == "step":
            return float(-(-(num_data or self.config.batch_size) // self.config.batch_size))
        return float(weight)

    def _make_decoder(self, config: VAEConfig) -> nn.Module:
        """p(x|y, z)'s network: the built-in decoder of ``[z, onehot(y)]`` for ``config.likelihood``."""
        return make_decoder(config.replace(z_dim=config.z_dim + config.num_classes), self.family.outputs)

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

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier and the encoder read of images ``x [B, D]`` at test time: ``x`` itself."""
        return x

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """log q(y|x) for images ``x [B, D]``: ``[B, K]``."""
        return torch.log_softmax(self.classifier(self.read(x)), dim=-1)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of q(z|x, y), each ``[B, z_dim]``."""
        return self.encoder(with_label(self.read(x), y, self.config.num_classes))

    @property
    def noise_dim(self) -> int:
        """Standard normals :meth:`class_log_weights` takes per draw, label and image: ``z_dim``."""
        return self.config.z_dim

    def class_log_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r""":math:`\log w_{y,j} = \log p(x \mid y, z) + \log p(z) - \log q(z \mid x, y)` for every
        label, ``z = loc_y + scale_y * eps``: ``x [B, D]``, ``eps [k, K, B, z_dim]`` -> ``[k, K, B]``
        (:mod:`pyro_vae.infer.evaluate_m2`)."""
        y = torch.arange(self.config.num_classes, device=x.device).unsqueeze(-1)  # [K, 1]
        loc, scale = self.posterior(x, y)  # [K, B, z_dim] each
        z = loc + scale * eps  # [k, K, B, z_dim]
        q = dist.Normal(loc, scale).to_event(1)
        prior = dist.Normal(torch.zeros_like(loc), torch.ones_like(scale)).to_event(1)
        return self.likelihood(y, z).log_prob(x) + prior.log_prob(z) - q.log_prob(z)  # [k, K, B]
