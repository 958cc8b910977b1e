r"""The VAE as a Pyro probabilistic program: a generative ``model`` and a swappable ``guide``.

Generative story, for each image :math:`i = 1, \dots, N`:

.. math::

    z_i &\sim p(z) = \mathcal{N}(0, I_{d}) \text{ (default; or a learned prior, } \texttt{pyro_vae.program.priors}) \\
    x_i \mid z_i &\sim \prod_{j=1}^{D} \mathrm{Bernoulli}\big(\sigma(f_\theta(z_i)_j)\big)
    \quad\text{or}\quad \prod_{j} \mathcal{N}\big(\mu_\theta(z_i)_j, \sigma_\theta(z_i)_j^2\big)

The guide is a Gaussian :math:`q(z_i) = \mathcal{N}(\mu_i, \mathrm{diag}\,\sigma_i^2)` per image;
*how* :math:`(\mu_i, \sigma_i)` are chosen (an encoder network, free local parameters, ...) is the
guide's business (:mod:`pyro_vae.guides`). ``SVI`` maximises the evidence lower bound

.. math::

    \mathrm{ELBO} = \sum_{i=1}^N \mathbb{E}_{q(z_i)}\big[\log p_\theta(x_i \mid z_i)
    + \log p(z_i) - \log q(z_i)\big] \le \log p_\theta(x_{1:N}).

Both ``model`` and ``guide`` take ``(x, idx, num_data, beta)`` and open the same
``pyro.plate("data", size=num_data, subsample=idx)``: on a minibatch of ``B`` rows the plate
scales every log-density by ``N / B``, so the minibatch ELBO is an unbiased estimate of the
full-data ELBO. ``beta`` weights the latent site (KL annealing) through ``poutine.scale``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..core.config import VAEConfig
from ..core.errors import ConfigError
from .contract import Capabilities, Program
from .guides import make_guide
from .likelihoods import LIKELIHOOD_FAMILIES
from .networks import make_decoder
from .plates import data_plate
from .priors import make_prior

__all__ = ["VAE", "data_plate"]


class VAE(Program):
    """Decoder (the model's network) plus a guide, with ``model`` and ``guide`` side by side: a
    :class:`~pyro_vae.program.contract.Program` with the one latent site ``z`` and every capability
    of the built-in pieces (the fused loss, the analytic KL, the Gaussian guide).

    :param VAEConfig config: sizes, likelihood and the built-in architecture (``config.arch``).
    :param guide: a :class:`~pyro_vae.guides.Guide`; by default the one ``config.guide`` names.
    :param int num_data: training images (the mean-field guide holds parameters for each).
    :param encoder: your own inference network instead of the built-in one, put into the guide
        (``amortized`` or ``semi-amortized``). Contract: ``encoder(x) -> (loc, scale)`` for a batch
        ``x [B, D]`` of flat data (reshape with ``config.event_shape`` if it needs ``[C, H, W]``),
        ``loc`` and ``scale > 0`` each ``[B, z_dim]``.
    :param decoder: your own generative network. Contract: ``decoder(z)`` for ``z [B, z_dim]``
        returns the likelihood's parameters, each ``[B, D]`` or ``[B, *event_shape]``:
        ``logits`` (``bernoulli``, ``continuous-bernoulli``) or ``(loc, scale)`` (``normal``).

    Own modules are checked on a dummy batch of 2 here (:class:`ConfigError` naming the module, the
    expected and the found shapes) and recorded in ``config.custom_modules``: a run trained with them
    loads with ``load_run(path, encoder=..., decoder=...)``.
    """

    def __init__(self, config: VAEConfig, guide: Optional[nn.Module] = None, num_data: Optional[int] = None, *,
                 encoder: Optional[nn.Module] = None, decoder: Optional[nn.Module] = None):
        super().__init__()
        custom = tuple(name for name, m in (("encoder", encoder), ("decoder", decoder)) if m is not None)
        _check_custom(config, custom, guide)
        config = config.replace(custom_modules=custom) if custom != config.custom_modules else config
        x_dim = config.x_dim  # numbers per datum, from config.event_shape (fit sets it from the data)
        self.config = config
        self.x_dim = x_dim
        self.family = LIKELIHOOD_FAMILIES[config.likelihood]
        if decoder is not None:
            _check_decoder(decoder, config, self.family)
        self.decoder = decoder if decoder is not None else make_decoder(config, self.family.outputs)
        if encoder is not None:
            _check_encoder(encoder, config)
        self.inference = guide if guide is not None else make_guide(config, x_dim, num_data, encoder=encoder)
        if hasattr(self.inference, "attach"):  # guides that score images with p(x|z) themselves
            self.inference.attach(self.likelihood)
        self.latent_prior = make_prior(config, x_dim)  # p(z): N(0, I) or a learned prior

    latent_sites = ("z",)

    @property
    def event_shape(self) -> Tuple[int, ...]:
        return tuple(self.config.event_shape)

    @property
    def capabilities(self) -> Capabilities:
        """Fused, analytic KL, a Gaussian guide; guides without an encoder (mean-field) have no
        q(z|x) for new images and hold parameters per training image (no torchrun)."""
        amortized = bool(getattr(self.inference, "amortized", True))
        return Capabilities(analytic_kl=True, fused=True, gaussian_guide=True, amortized=amortized,
                            data_parallel=amortized)

    # ------------------------------------------------------------------ the probabilistic program

    def model(self, x, idx=None, num_data=None, beta=1.0):
        """p(x, z) = p(z) p(x|z), vectorised over the images in ``x [B, D]``."""
        pyro.module("decoder", self.decoder)
        if any(True for _ in self.latent_prior.parameters()):  # learned priors (mog, vamp)
            pyro.module("prior", self.latent_prior)
        prior = self.latent_prior(x.shape[0], self.inference, like=x)  # p(z), batch [B], event [z_dim]
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", prior)  # [B, z_dim]
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        """q(z|x): delegated to the swappable guide component."""
        return self.inference(x, idx, num_data, beta)

    # ------------------------------------------------------------------ helpers

    def decode(self, z: torch.Tensor):
        """The likelihood's parameters for ``z [..., z_dim]``: logits, or ``(loc, scale)``, each ``[..., D]``."""
        lead = z.shape[:-1]
        out = self.decoder(z if z.dim() == 2 else z.reshape(-1, z.shape[-1]))
        if self.family.outputs == 1:
            return out if out.shape[:-1] == lead and out.shape[-1] == self.x_dim else out.reshape(*lead, self.x_dim)
        return tuple(o if o.shape[:-1] == lead and o.shape[-1] == self.x_dim else o.reshape(*lead, self.x_dim)
                     for o in out)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) with event shape ``[D]``, batched over the leading dims of ``z``
        (:data:`~pyro_vae.program.likelihoods.LIKELIHOOD_FAMILIES`)."""
        return self.family.make(self.decode(z))

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or means (Normal), ``[..., D]``."""
        return self.likelihood(z).base_dist.mean

    def prior(self, batch: int) -> dist.Distribution:
        """p(z) (``config.prior``, :mod:`~pyro_vae.program.priors`), batch shape ``[batch]``, event ``[z_dim]``."""
        return self.latent_prior(batch, self.inference, like=next(self.parameters()))

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """Decoded prior samples: E[x|z] for ``z ~ p(z)`` (N(0, I), or the learned prior), ``[n, D]``."""
        if self.config.prior != "normal":  # mog, vamp: the model's own p(z)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                return self.decode_mean(self.prior(n).sample())
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        z = torch.randn(n, self.config.z_dim, generator=g).to(next(self.parameters()).device)
        return self.decode_mean(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = posterior mean]: ``[B, D]`` (for guides without an encoder, ``Run.reconstruct``
        fits q(z|x) per image first)."""
        return self.decode_mean(self.inference.posterior(x)[0])


# ----------------------------------------------------------------------------- your own modules


def _check_custom(config: VAEConfig, custom: Sequence[str], guide) -> None:
    missing = [m for m in config.custom_modules if m not in custom]
    if missing:
        given = ", ".join(f"{m}=..." for m in config.custom_modules)
        raise ConfigError(f"this config was trained with your own {' and '.join(missing)} (custom_modules): "
                          f"pass it again, VAE(config, {given})")
    if "encoder" in custom and (guide is not None or config.guide == "mean-field"):
        why = "a guide was given too" if guide is not None else "the mean-field guide has no encoder"
        raise ConfigError(f"encoder= goes into the amortized or semi-amortized guide; {why}")


def _dummy(module: nn.Module, shape) -> torch.Tensor:
    p = next(iter(module.parameters()), None)
    return torch.zeros(shape, device=p.device if p is not None else "cpu",
                       dtype=p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype())


def _shapes(out) -> str:
    if isinstance(out, torch.Tensor):
        return str(list(out.shape))
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_shapes(o) for o in out) + ")"
    return type(out).__name__


@torch.no_grad()
def _check_encoder(encoder: nn.Module, config: VAEConfig) -> None:
    """The encoder must map ``x [2, D]`` to ``(loc, scale)``, each ``[2, z_dim]``."""
    with torch.random.fork_rng(devices=[]):
        out = encoder(_dummy(encoder, (2, config.x_dim)))
    want = [2, config.z_dim]
    ok = isinstance(out, (tuple, list)) and len(out) == 2 and all(
        isinstance(o, torch.Tensor) and list(o.shape) == want for o in out)
    if not ok:
        raise ConfigError(f"encoder {type(encoder).__name__} returned {_shapes(out)} for x of shape [2, {config.x_dim}]; "
                          f"expected (loc, scale), each {want}")


@torch.no_grad()
def _check_decoder(decoder: nn.Module, config: VAEConfig, family) -> None:
    """The decoder must map ``z [2, z_dim]`` to ``outputs`` tensors of ``[2, D]`` or ``[2, *event_shape]``."""
    with torch.random.fork_rng(devices=[]):
        out = decoder(_dummy(decoder, (2, config.z_dim)))
    parts = [out] if family.outputs == 1 else out
    allowed = ([2, config.x_dim], [2, *config.event_shape])
    ok = isinstance(parts, (tuple, list)) and len(parts) == family.outputs and all(
        isinstance(o, torch.Tensor) and list(o.shape) in allowed for o in parts)
    if not ok:
        each = " each" if family.outputs > 1 else ""
        raise ConfigError(
            f"decoder {type(decoder).__name__} returned {_shapes(out)} for z of shape [2, {config.z_dim}]; "
            f"expected {family.names}{each} {allowed[0]} (or {allowed[1]}) for likelihood {config.likelihood}")
