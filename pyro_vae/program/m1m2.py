r"""Kingma et al.'s (2014) stacked model M1+M2 as one Pyro program: M2
(:mod:`pyro_vae.program.m2`) models the latent code :math:`z_1` of a trained VAE, M1, instead of
the image.

Generative story, for each image :math:`i` (M2's networks on top, M1's frozen decoder below):

.. math::

    y_i \sim \mathrm{Cat}(\tfrac{1}{K}\mathbf{1}), \qquad z_{2,i} \sim \mathcal{N}(0, I), \qquad
    z_{1,i} \mid y_i, z_{2,i} \sim \mathcal{N}\big(\mu_\theta(y_i, z_{2,i}),
        \mathrm{diag}\,\sigma^2_\theta(y_i, z_{2,i})\big), \qquad
    x_i \mid z_{1,i} \sim p_{\mathrm{M1}}(x_i \mid z_{1,i}).

The Gaussian over :math:`z_1` covers M1's *active units* only (the coordinates whose posterior
mean :math:`\mathbb{E}_{q(z_1 \mid x)}[z_1]` has a standard deviation of at least 0.1 over the
training images, as Kingma et al.'s code keeps them); the others, which M1 left at its prior,
stay :math:`\mathcal{N}(0, 1)`. The guide is

.. math::

    q(z_1 \mid x)\, q_\phi(y \mid z_1)\, q_\phi(z_2 \mid z_1, y),

with :math:`q(z_1 \mid x)` M1's encoder, frozen: a fresh draw of :math:`z_1` each step is
what M2 reads, and at test time it reads the mean of :math:`q(z_1 \mid x)`
(:meth:`M1M2.read`). Everything else is M2's: the label enumerated for unlabelled images,
the labelled plate, :math:`\alpha`, the labelled weight :math:`w`, the closed-form KL of
:math:`z_2` (``elbo="meanfield"``). The ELBO of this program bounds :math:`\log p(x)` of the
stacked model; since M1's weights are frozen and :math:`z_1` is drawn from its encoder, the terms
:math:`\log p_{\mathrm{M1}}(x \mid z_1) - \log q(z_1 \mid x)` have no gradient, and the
gradient is that of M2's objective on the draws of :math:`z_1`, as in Kingma et al.'s training.

M1's weights are not part of this program's parameters nor of its checkpoint: the run records
M1's run folder (``config.features``) and the SHA-256 of its ``checkpoint.pt``
(``config.features_sha256``, and a buffer saved with the weights), and refuses to load or resume
without that very file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..core.config import VAEConfig
from ..core.data import eval_binarized
from ..core.errors import CheckpointError, ConfigError, PyroVAEError
from ..core.rundir import load_checkpoint
from .m2 import M2, with_label
from .model import VAE
from .networks import Encoder

__all__ = ["M1M2", "ACTIVE_STD", "active_units", "fit_features", "load_m1", "file_sha256"]

ACTIVE_STD = 0.1  # a unit of z1 is active when its posterior means vary this much over the training images


def file_sha256(path) -> str:
    """The SHA-256 of a file, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_m1(path, sha256: Optional[str] = None, event_shape: Optional[Tuple[int, ...]] = None) -> Tuple[VAE, str]:
    """The VAE of the run folder ``path``, frozen (no gradients), and its checkpoint's SHA-256.

    One-line errors: no run there; the file differs from ``sha256`` (the run this M1+M2 was trained
    on changed); not a VAE with an amortized Gaussian encoder; trained on data of another shape
    than ``event_shape``."""
    ckpt = Path(path) / "checkpoint.pt"
    if not ckpt.is_file():
        raise CheckpointError(f"features {path}: no VAE run there (no checkpoint.pt); M1+M2 needs its M1 run")
    digest = file_sha256(ckpt)
    if sha256 is not None and digest != sha256:
        raise CheckpointError(f"features {path}: its checkpoint.pt changed since this M1+M2 was trained on it "
                              f"(SHA-256 {digest[:12]}..., recorded {sha256[:12]}...); M2's weights fit the old M1 only")
    state = load_checkpoint(ckpt)
    try:
        config = VAEConfig.from_dict(state["config"])
    except (PyroVAEError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"features {path}: the run's config is invalid ({str(e).splitlines()[0]})") from None
    _check_m1(path, config, event_shape)
    with torch.device("cpu"):  # real weights even where the caller builds on the meta device (shape checks)
        m1 = VAE(config)
    try:
        m1.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"features {path}: checkpoint does not match its config ({str(e).splitlines()[0]})") from None
    return m1.requires_grad_(False).eval(), digest


def _check_m1(path, config: VAEConfig, event_shape) -> None:
    """M1 must be a VAE whose q(z1|x) is an encoder's diagonal Gaussian, for images of ``event_shape``."""
    if config.model != "vae" or config.program is not None:
        what = f"model={config.model}" if config.program is None else f"your own program {config.program}"
        raise ConfigError(f"features {path}: a run of {what}, not a VAE (M1); train one with pyro-vae train --model vae")
    if config.guide != "amortized" or config.custom_modules:
        raise ConfigError(f"features {path}: M1 needs the built-in amortized encoder q(z1|x) (guide=amortized, no "
                          f"own modules); this run has guide={config.guide}, custom_modules={list(config.custom_modules)}")
    if event_shape is not None and tuple(config.event_shape) != tuple(event_shape):
        raise ConfigError(f"features {path}: M1 was trained on data of shape {list(config.event_shape)}; "
                          f"these are {list(event_shape)}")


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_STD) -> Tuple[int, ...]:
    """The coordinates whose posterior means ``[N, d]`` have a standard deviation of at least ``threshold``."""
    return tuple(int(u) for u in (posterior_means.std(0) >= threshold).nonzero().flatten())


@torch.no_grad()
def fit_features(config: VAEConfig, train_data) -> VAEConfig:
    """``config`` with what the training images decide for M1+M2: ``features_sha256`` (of the M1
    run ``config.features``) and ``feature_units``, M1's active units on one seeded binarization
    of the training images. One-line errors for an unfit M1 and for one without active units."""
    m1, digest = load_m1(config.features, config.features_sha256, tuple(train_data.event_shape))
    x = eval_binarized(train_data).cpu()
    means = torch.cat([m1.inference.posterior(part)[0] for part in x.split(1000)])  # [N, z1_dim]
    units = active_units(means)
    if not units:
        raise ConfigError(f"features {config.features}: none of M1's {m1.config.z_dim} units is active (std of the "
                          f"posterior means >= {ACTIVE_STD}); M2 would model noise")
    return config.replace(features_sha256=digest, feature_units=units)


class M1M2(M2):
    """M2 on the codes of a frozen VAE (module docstring): M2's program and objective, with
    ``z1`` as the datum M2 models; what differs is overridden, nothing else.

    :param config: M2's settings with ``features`` (M1's run folder) and ``feature_units``
        (:func:`fit_features`); ``event_shape`` is the images'.
    :param images, labels: as :class:`~pyro_vae.program.m2.M2` (the labelled images are kept as
        pixels: each step encodes them afresh).

    M2's networks read the :math:`n` active units (``config.feature_units``): ``classifier``
    :math:`n \\to K`, ``encoder`` :math:`[z_1, y] \\to z_2`, and ``decoder``
    :math:`[z_2, y] \\to (\\mu, \\sigma)` of the Gaussian over them (the same MLP as the encoder:
    an unbounded mean, a softplus scale). ``self.config`` is M2's view of its data: ``n`` numbers
    with a normal likelihood.
    """

    latent_sites = ("z1", "y", "z")  # of an image of the data plate; z is Kingma et al.'s z2

    def __init__(self, config: VAEConfig, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        if not config.feature_units:
            raise ConfigError("M1+M2 needs feature_units, the active units of M1 that fit picks (fit_features)")
        m1, digest = load_m1(config.features, config.features_sha256, config.event_shape)
        if max(config.feature_units) >= m1.config.z_dim:
            raise ConfigError(f"features {config.features}: units {list(config.feature_units)} do not fit M1's "
                              f"z_dim={m1.config.z_dim}")
        units = config.feature_units
        super().__init__(config.replace(event_shape=(len(units),), likelihood="normal"), images, labels)
        self.image_shape = tuple(config.event_shape)
        object.__setattr__(self, "m1", m1)  # not a submodule: M1's weights stay in its run, never optimised nor saved
        self.register_buffer("units", torch.tensor(units, dtype=torch.long), persistent=False)
        self.register_buffer("m1_sha256", torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8))

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return self.image_shape

    def _make_decoder(self, config: VAEConfig) -> nn.Module:
        """p(z1|y, z2)'s network: ``[z2, onehot(y)] -> (loc, scale)`` of the active units."""
        return Encoder(config.z_dim + config.num_classes, config.hidden, config.x_dim)

    # ------------------------------------------------------------------ what differs from M2

    def _sample_read(self, x, suffix: str) -> torch.Tensor:
        """``z1 ~ q(z1|x)``, M1's frozen encoder (site ``z1`` + ``suffix``); M2 reads its active units."""
        loc, scale = self._m1_posterior(x)  # [B, z1_dim]
        z1 = pyro.sample(f"z1{suffix}", dist.Normal(loc, scale).to_event(1))
        return z1[..., self.units]

    def _observe(self, x, y, z, suffix: str) -> torch.Tensor:
        """``z1 ~ p(z1|y, z2)`` (:meth:`code_distribution`), then ``x ~ p(x|z1)``, M1's frozen
        decoder, observed; returns the active units of ``z1``, which the classifier reads."""
        z1 = pyro.sample(f"z1{suffix}", self.code_distribution(y, z))  # batch [K, B] when y is enumerated
        pyro.sample(f"x{suffix}", self._m1_on(x).likelihood(z1), obs=x)
        return z1[..., self.units]

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z1|x) on the active units, ``[B, n]``: what q(y|z1) and q(z2|z1, y) read at test time."""
        return self._m1_posterior(x)[0][..., self.units]

    def code_distribution(self, y: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        """p(z1|y, z2): M2's Gaussian on the active units, N(0, 1) on the others; event ``[z1_dim]``."""
        loc, scale = self.decode(y, z)  # [..., n] each
        shape = (*loc.shape[:-1], self.m1.config.z_dim)
        loc = loc.new_zeros(shape).index_copy(-1, self.units, loc)
        scale = scale.new_ones(shape).index_copy(-1, self.units, scale)
        return dist.Normal(loc, scale).to_event(1)

    def decode_mean(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """E[x|z1] at the mean of p(z1|y, z2): through both decoders, ``[..., D]`` pixel probabilities."""
        return self._m1_on(z).decode_mean(self.code_distribution(y, z).mean)

    @property
    def noise_dim(self) -> int:
        """Standard normals per draw, label and image: z2's, then z1's (one z1 per draw, shared by the labels)."""
        return self.config.z_dim + self.m1.config.z_dim

    def class_log_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        r""":math:`\log w_{y,j} = \log p(x \mid z_1) + \log p(z_1 \mid y, z_2) + \log p(z_2)
        - \log q(z_1 \mid x) - \log q(z_2 \mid z_1, y)`, ``z1`` drawn once per draw ``j`` and shared
        by the labels: ``eps [k, K, B, noise_dim]`` -> ``[k, K, B]``; :math:`\frac{1}{k}\sum_j
        \sum_y p(y) w_{y,j}` is an unbiased estimate of :math:`p(x)`."""
        z_dim, k = self.config.z_dim, self.config.num_classes
        loc1, scale1 = self._m1_posterior(x)  # [B, z1_dim]
        z1 = loc1 + scale1 * eps[:, :1, :, z_dim:]  # [k, 1, B, z1_dim]
        y = torch.arange(k, device=x.device).unsqueeze(-1)  # [K, 1]
        loc, scale = self.encoder(with_label(z1[..., self.units], y, k))  # [k, K, B, z_dim]
        z = loc + scale * eps[..., :z_dim]
        prior = dist.Normal(torch.zeros_like(loc), torch.ones_like(scale)).to_event(1)
        log_p = self.code_distribution(y, z).log_prob(z1) + prior.log_prob(z) + self.m1.likelihood(z1).log_prob(x)
        log_q = dist.Normal(loc, scale).to_event(1).log_prob(z) + dist.Normal(loc1, scale1).to_event(1).log_prob(z1)
        return log_p - log_q

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """M2's weights, refused (one line) when they were trained on another M1 than the one loaded."""
        saved = state_dict.get("m1_sha256")
        if saved is not None and bytes(saved.tolist()) != bytes(self.m1_sha256.tolist()):
            raise CheckpointError(f"these M1+M2 weights were trained on an M1 whose checkpoint.pt had SHA-256 "
                                  f"{bytes(saved.tolist()).hex()[:12]}...; {self.config.features} now holds another")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _m1_posterior(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of M1's q(z1|x)."""
        return self._m1_on(x).inference.posterior(x)

    def _m1_on(self, like: torch.Tensor) -> VAE:
        """M1, moved to the device of ``like`` first if needed (it is no submodule: ``.to`` does not move it)."""
        if next(self.m1.parameters()).device != like.device:
            self.m1.to(like.device)
        return self.m1
