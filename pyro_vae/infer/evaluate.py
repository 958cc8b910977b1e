r"""Held-out evaluation of a trained VAE: the ELBO, the importance-weighted bound, active units.

Behind ``pyro-vae evaluate``. For an image :math:`x` and any Gaussian
:math:`q(z) = \mathcal{N}(\mu, \mathrm{diag}\,\sigma^2)` (the guide's, or a per-image fit), the
importance weights :math:`w_i = p_\theta(x, z_i) / q(z_i)`, :math:`z_i \sim q`, give the
importance-weighted bound of Burda, Grosse & Salakhutdinov (2016)

.. math::

    \log p_\theta(x) \;\ge\; \mathcal{L}_k(x)
    = \mathbb{E}_{z_{1:k} \sim q}\Big[\log \frac{1}{k} \sum_{i=1}^k w_i\Big]
    \;\ge\; \mathcal{L}_1(x) = \mathrm{ELBO}(x),

non-decreasing in :math:`k` and tending to :math:`\log p_\theta(x)` as :math:`k \to \infty`
(the usual estimate of a VAE's test log-likelihood uses :math:`k = 5000`). The ELBO is reported
with its two terms, :math:`\mathrm{ELBO}(x) = \mathbb{E}_q[\log p_\theta(x \mid z)]
- \mathrm{KL}(q \,\|\, p(z))`, the KL in closed form.

Everything is a forward pass under ``torch.no_grad``: the :math:`k` samples of every image in a
batch go through the decoder together, in chunks of ``chunk_k`` samples, and the
:math:`\log \sum_i w_i` is accumulated chunk by chunk with ``logaddexp`` (memory is bounded by the
chunk, not by :math:`k`). Each image's standard-normal draws come from its own generator, seeded by
``(seed, row)``: the numbers do not depend on ``batch_size``, ``chunk_k`` or ``--limit``.

Pyro's :func:`pyro.infer.importance.vectorized_importance_weights` sums the log-weights over the
``data`` plate (one weight per *batch*); the IWAE bound needs one per *image*, so the weights here
are computed from the model's own distributions (:meth:`~pyro_vae.model.VAE.likelihood`,
:meth:`~pyro_vae.model.VAE.prior`), which ``tests/test_evaluate.py`` checks against Pyro's traces.

**Any program.** A :class:`~pyro_vae.program.contract.Program` without the ``gaussian_guide``
capability (several latent sites, another guide family, discrete latents) is scored from its
traces instead (:mod:`pyro_vae.infer.traces`): the log weight of an image sums
:math:`\log p - \log q` over *every* latent site of the guide's trace and the observed site,
the ELBO is their mean over ``elbo_samples`` particles (``Trace_ELBO``'s estimate), the bound their
log-mean-exp over ``iwae_k``, and active units are counted for each continuous latent site. Its
draws come from torch's stream seeded by ``(seed, first row of the batch)``: the numbers depend on
``batch_size`` (the Gaussian path's do not).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence
from torch.nn import functional as F

from ..core.data import ImageData, check_shape_matches, eval_binarized, load_dataset, source_options, kind_of_test_split
from ..core.errors import ConfigError
from ..core.progress import disable, tqdm
from ..core.rundir import write_json
from ..program.contract import Program, check_program, program_name
from ..program.guides import reparameterize
from ..program.pyro_style import as_program, takes_data_only
from .local import fit_local
from .run import Run, load_run
from .traces import program_terms

__all__ = [
    "EvalResult",
    "log_importance_weights",
    "iwae_bound",
    "elbo_terms",
    "active_units",
    "evaluate",
    "default_split",
    "load_eval_data",
    "save_result",
    "checkpoint_digest",
    "EVAL_FILE",
]

#: decoder rows (samples x images) per forward pass when ``chunk_k`` is not given: large enough
#: for fast matrix products, small enough to stay in cache and bound memory (~6 MB per [rows, 784] tensor)
CHUNK_ROWS = 2048
#: variance over images of E_q[z_d] above which latent dimension d counts as active (Burda et al.)
ACTIVE_THRESHOLD = 0.01

Posterior = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------- estimators


def _standard_normal(k: int, loc: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``[k, B, z_dim]`` standard-normal draws (on the generator's device, then moved to ``loc``'s)."""
    device = generator.device if generator is not None else loc.device
    eps = torch.randn((k,) + loc.shape, generator=generator, device=device, dtype=loc.dtype)
    return eps.to(loc.device)


def _chunk_size(chunk_k: Optional[int], batch: int) -> int:
    return max(1, CHUNK_ROWS // max(batch, 1)) if chunk_k is None else int(chunk_k)


def log_importance_weights(
    vae,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    k: Optional[int] = None,
    *,
    generator: Optional[torch.Generator] = None,
    eps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Log importance weights of ``k`` samples per image, ``[k, B]``:

    .. math::

        \log w_i = \log p_\theta(x \mid z_i) + \log p(z_i) - \log q(z_i), \qquad
        z_i = \mu + \sigma \odot \epsilon_i, \quad \epsilon_i \sim \mathcal{N}(0, I).

    :param vae: anything with ``likelihood(z)`` (p(x|z), event shape ``[D]``, batched over the
        leading dims of ``z``) and ``prior(B)`` (p(z), event shape ``[z_dim]``), e.g. a
        :class:`~pyro_vae.model.VAE`.
    :param x: images ``[B, D]``, as they are scored.
    :param loc, scale: q's parameters, ``[B, z_dim]`` each.
    :param k: samples per image (may be omitted when ``eps`` is given).
    :param eps: the standard-normal draws ``[k, B, z_dim]``; by default drawn from ``generator``.
    """
    if eps is None:
        eps = _standard_normal(k, loc, generator)
    elif k is not None and eps.shape[0] != k:
        raise ValueError(f"eps holds {eps.shape[0]} samples, k={k}")
    z = loc + scale * eps  # [k, B, z_dim]
    with pyro.validation_enabled(False):  # scoring only: no argument checks in the hot loop
        if getattr(getattr(vae, "config", None), "likelihood", None) == "bernoulli":
            # log Bernoulli(x | logits) summed over pixels, as one fused BCE pass
            logits = vae.decode(z)  # [k, B, D]
            log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        else:
            log_px_z = vae.likelihood(z).log_prob(x)  # [k, B]
        log_pz = vae.prior(x.shape[0]).log_prob(z)  # [k, B]
        # log q(z) at z = loc + scale * eps, without recomputing eps from z
        log_qz = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - scale.log().sum(-1)
    return log_px_z + log_pz - log_qz


def iwae_bound(
    vae,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    k: int,
    chunk_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    *,
    eps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The importance-weighted bound of each image, ``[B]``, from ``k`` samples:

    .. math::

        \hat{\mathcal{L}}_k(x) = \log \frac{1}{k} \sum_{i=1}^k w_i
        = \operatorname{logsumexp}_{i}(\log w_i) - \log k .

    The logsumexp streams over chunks of ``chunk_k`` samples,
    :math:`s \leftarrow \operatorname{logaddexp}(s, \operatorname{logsumexp}_{i \in \text{chunk}}
    \log w_i)`, so memory is :math:`O(\text{chunk\_k} \cdot B \cdot D)` for any ``k`` (plus the
    ``k * B * z_dim`` draws, made up front so that ``chunk_k`` changes only the summation order).

    :param chunk_k: samples per decoder call; default: about ``CHUNK_ROWS / B``.
    :param generator: source of the draws (default: torch's global generator).
    :param eps: the draws ``[k, B, z_dim]`` themselves, instead of ``generator``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if eps is None:
        eps = _standard_normal(k, loc, generator)
    total = loc.new_full(loc.shape[:-1], -math.inf)  # [B], log sum_i w_i so far
    for eps_chunk in eps.split(_chunk_size(chunk_k, x.shape[0])):
        log_w = log_importance_weights(vae, x, loc, scale, eps=eps_chunk)  # [c, B]
        total = torch.logaddexp(total, log_w.logsumexp(0))
    return total - math.log(k)


def elbo_terms(
    vae,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    num_samples: int,
    *,
    chunk_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    eps: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    r"""The ELBO of each image and its two terms, each ``[B]``, in nats:

    .. math::

        \underbrace{\mathrm{ELBO}(x)}_{\texttt{elbo}}
        = \underbrace{\mathbb{E}_{q}\big[\log p_\theta(x \mid z)\big]}_{\texttt{reconstruction}}
        - \underbrace{\mathrm{KL}\big(q \,\|\, \mathcal{N}(0, I)\big)}_{\texttt{kl}}

    ``reconstruction`` is the expected log-likelihood (a log, so :math:`\le 0` for Bernoulli
    pixels), estimated with ``num_samples`` draws of z; ``kl`` is exact
    (:func:`torch.distributions.kl_divergence`), so ``elbo`` has the Monte-Carlo error of the
    reconstruction term only.
    """
    if eps is None:
        eps = _standard_normal(num_samples, loc, generator)
    log_lik = loc.new_zeros(loc.shape[:-1])  # [B]
    for eps_chunk in eps.split(_chunk_size(chunk_k, x.shape[0])):
        z = loc + scale * eps_chunk  # [c, B, z_dim]
        log_lik = log_lik + vae.likelihood(z).log_prob(x).sum(0)
    reconstruction = log_lik / eps.shape[0]
    q, prior = dist.Normal(loc, scale).to_event(1), vae.prior(x.shape[0])
    try:
        kl = kl_divergence(q, prior)  # [B]
    except NotImplementedError:  # a learned prior (mixture): Monte Carlo over the same draws
        kl = sum((q.log_prob(z) - prior.log_prob(z)).sum(0) for z in (loc + scale * e for e in eps.split(
            _chunk_size(chunk_k, x.shape[0])))) / eps.shape[0]
    return {"elbo": reconstruction - kl, "reconstruction": reconstruction, "kl": kl}


def active_units(posterior_means: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> Tuple[int, torch.Tensor]:
    r"""Active latent dimensions (Burda et al. 2016): ``(count, variances [z_dim])``, where

    .. math::

        A_d = \mathrm{Cov}_x\big(\mathbb{E}_{q(z \mid x)}[z_d]\big) > 0.01,

    the variance over images of the posterior means ``[N, z_dim]`` (an inactive dimension's
    posterior is the prior for every image: it carries no information about x).
    """
    if posterior_means.shape[0] < 2:
        raise ValueError("active units need the posterior means of at least 2 images")
    variances = posterior_means.double().var(0)  # [z_dim]
    return int((variances > threshold).sum()), variances


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """What :func:`evaluate` measures; nats per image, standard errors over images."""

    elbo: float
    elbo_se: Optional[float]
    iwae: float
    iwae_se: Optional[float]
    iwae_k: int
    kl: float
    kl_se: Optional[float]
    reconstruction: float  # E_q[log p(x|z)]: a log-likelihood (<= 0 for Bernoulli pixels)
    reconstruction_se: Optional[float]
    active_units: Optional[int]  # None with fewer than 2 images
    z_dim: int  # latent dimensions (all continuous latent sites together)
    latent_variance: List[float]  # Cov_x(E_q[z_d]) per dimension (the sites' dimensions one after another)
    n: int
    elbo_samples: int
    seed: int
    dataset: Optional[str] = None
    split: Optional[str] = None
    binarize: Optional[str] = None
    likelihood: Optional[str] = None
    guide: Optional[str] = None
    run: Optional[str] = None
    seconds: float = 0.0
    note: Optional[str] = None  # set when the numbers are not log-likelihoods of binary images
    program: Optional[str] = None  # a program scored from its traces: its class (module.QualName)
    active_units_by_site: Dict[str, int] = field(default_factory=dict)  # such a program: per continuous latent site
    per_image: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # [n] each, not in to_dict

    def to_dict(self) -> dict:
        """Plain values only (``json.dumps``-able); ``per_image`` is left out."""
        d = asdict(self)
        del d["per_image"]
        return d

    def table(self) -> str:
        """A small readable report."""

        def row(name, value, se=None, fmt="{:10.2f}"):
            se = "" if se is None else f"  ± {se:.2f}"
            return f"  {name:<28}{fmt.format(value)}{se}"

        where = " ".join(s for s in (self.dataset, self.split) if s)
        lines = [
            f"{where or 'images'}: {self.n} images, binarize={self.binarize}, seed {self.seed}"
            + (f"  ({self.run})" if self.run else ""),
            f"  {'':<28}{'nats/image':>10}  ± std. error",
            row(f"ELBO ({self.elbo_samples} samples of z)", self.elbo, self.elbo_se),
            row("  E_q log p(x|z)", self.reconstruction, self.reconstruction_se),
            row("  KL(q || p(z))", self.kl, self.kl_se),
            row(f"IWAE bound (k={self.iwae_k})", self.iwae, self.iwae_se),
            row("IWAE - ELBO", self.iwae - self.elbo),
        ]
        au = "n/a (needs 2 images)" if self.active_units is None else f"{self.active_units} of {self.z_dim}"
        lines.append(f"  {'active units':<28}{au:>10}")
        if len(self.active_units_by_site) > 1:
            lines += [f"  {f'  site {site}':<28}{count:>10}" for site, count in self.active_units_by_site.items()]
        lines.append(f"  {'seconds':<28}{self.seconds:10.1f}")
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _image_normal(rows: torch.Tensor, k: int, z_dim: int, seed: int, stream: int) -> torch.Tensor:
    """``[k, B, z_dim]`` standard normals; image ``row``'s come from a CPU generator seeded by
    ``(seed, stream, row)`` alone."""
    out = torch.empty(len(rows), k, z_dim)  # [B, k, z_dim]
    g = torch.Generator()
    for i, row in enumerate(rows.tolist()):
        g.manual_seed(int(np.random.SeedSequence(seed, spawn_key=(stream, row)).generate_state(1)[0]))
        torch.randn(k, z_dim, generator=g, out=out[i])
    return out.transpose(0, 1)


def _summary(values: torch.Tensor) -> Tuple[float, Optional[float]]:
    """Mean and standard error of the mean of per-image values."""
    values = values.double()
    se = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else None
    return values.mean().item(), se


def _encoder_posterior(vae, local_steps: int = 300, seed: int = 0) -> Posterior:
    """The guide's own q(z|x): its encoder, or for a guide without one (mean-field) the guide's
    recipe for new images, a :func:`~pyro_vae.local.fit_local` from the prior."""
    guide = getattr(vae, "inference", None)
    if guide is None:
        raise ConfigError(f"{type(vae).__name__} has no guide to give q(z|x); pass posterior=(x, idx) -> (loc, scale)")
    if not getattr(guide, "amortized", True):
        def local_posterior(x, idx):
            fit = fit_local(vae, x, steps=local_steps, init="zero", lr=5e-2, seed=seed)
            return fit.loc, fit.scale

        return local_posterior

    def posterior(x, idx):
        with torch.no_grad():
            return guide.posterior(x, idx) if getattr(guide, "diagonal", True) else guide.q(x, idx)

    return posterior


#: what the numbers of a likelihood other than the Bernoulli mean
_DENSITY_NOTES = {
    "normal": "Normal likelihood: these are log-densities of pixel values, not comparable with Bernoulli log-likelihoods",
    "continuous-bernoulli": "continuous Bernoulli likelihood: these are log-densities of grey values in [0, 1], "
    "not comparable with Bernoulli log-likelihoods",
}


def _note(binarize: Optional[str], likelihood: Optional[str]) -> Optional[str]:
    if binarize == "none" and likelihood not in _DENSITY_NOTES:  # a Bernoulli
        return "--binarize none scores grey values with a Bernoulli: these numbers are not log-likelihoods"
    return _DENSITY_NOTES.get(likelihood)


def evaluate(
    vae_or_run,
    images,
    *,
    iwae_k: int = 5000,
    elbo_samples: int = 100,
    batch_size: int = 100,
    seed: int = 0,
    posterior: Optional[Posterior] = None,
    progress: bool = False,
    chunk_k: Optional[int] = None,
) -> EvalResult:
    r"""ELBO, IWAE bound and active units of a trained VAE on ``images``, in nats per image.

    :param vae_or_run: a :class:`~pyro_vae.run.Run`, a run folder, or a program (a
        :class:`~pyro_vae.model.VAE`, or any :class:`~pyro_vae.program.contract.Program`: one without
        the ``gaussian_guide`` capability is scored from its traces, module docstring; a module whose
        ``model(x)`` and ``guide(x)`` take the data alone is wrapped, :mod:`~pyro_vae.program.pyro_style`).
    :param images: an :class:`~pyro_vae.datasets.ImageData` (scored as
        :func:`~pyro_vae.train.eval_binarized` makes it: one fixed binarization) or a tensor
        ``[N, D]`` scored as it is.
    :param iwae_k: importance samples per image for the IWAE bound (Burda et al.: 5000).
    :param elbo_samples: draws of z per image for the ELBO's reconstruction term.
    :param batch_size: images per batch (the results do not depend on it).
    :param seed: seed of all draws; image ``i``'s draws depend only on ``(seed, i)``.
    :param posterior: ``(x [B, D], idx [B]) -> (loc, scale)``, each ``[B, z_dim]``, or a
        distribution over z (event ``[z_dim]``, e.g. a guide's ``q(x, idx)``): q for these
        images (``idx``: their rows in ``images``), e.g. a per-image fit for guides without an
        encoder. Called with gradients enabled as the caller has them; its outputs are detached.
        Default: the guide's ``posterior(x, idx)`` (amortized guides), under ``torch.no_grad``.
    :param progress: show a progress bar (on stderr).
    :param chunk_k: samples per decoder call (see :func:`iwae_bound`).
    """
    for name, value in (("iwae_k", iwae_k), ("elbo_samples", elbo_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0; got {seed}")
    if isinstance(vae_or_run, (str, bytes)) or hasattr(vae_or_run, "__fspath__"):
        vae_or_run = load_run(vae_or_run)
    run = vae_or_run if isinstance(vae_or_run, Run) else None
    vae = run.vae if run is not None else vae_or_run
    if not isinstance(vae, Program) and isinstance(vae, torch.nn.Module) and takes_data_only(vae):  # model(x), guide(x)
        vae = as_program(vae, getattr(images, "event_shape", None) or tuple(torch.as_tensor(images).shape[1:]))
    if posterior is None and isinstance(vae, Program) and not vae.capabilities.gaussian_guide:
        return _evaluate_program(vae, run, images, iwae_k, elbo_samples, batch_size, seed, chunk_k, progress)
    config = getattr(vae, "config", None)

    meta, x_all = _images_to_score(images, config, "the model" if run is None else f"run {run.path}")
    if posterior is None:
        posterior = _encoder_posterior(vae, seed=seed)
    likelihood = getattr(config, "likelihood", None)

    start = time.perf_counter()
    values = _score_images(vae, x_all, posterior, iwae_k, elbo_samples, batch_size, seed, chunk_k, progress)
    locs, n = values.pop("loc"), len(x_all)
    au, variances = active_units(locs) if n > 1 else (None, torch.zeros(locs.shape[-1]))
    summaries = {}  # elbo, elbo_se, iwae, iwae_se, kl, kl_se, reconstruction, reconstruction_se
    for key in ("elbo", "iwae", "kl", "reconstruction"):
        summaries[key], summaries[f"{key}_se"] = _summary(values[key])
    return EvalResult(
        **summaries,
        iwae_k=int(iwae_k),
        active_units=au,
        z_dim=int(locs.shape[-1]),
        latent_variance=[float(v) for v in variances],
        n=n,
        elbo_samples=int(elbo_samples),
        seed=int(seed),
        likelihood=likelihood,
        guide=getattr(config, "guide", None),
        run=str(run.path) if run is not None and run.path is not None else None,
        seconds=time.perf_counter() - start,
        note=_note(meta["binarize"], likelihood),
        per_image=values,
        **meta,
    )


def _evaluate_program(program: Program, run: Optional[Run], images, iwae_k, elbo_samples, batch_size, seed,
                      chunk_k, progress) -> EvalResult:
    """:func:`evaluate` for a program scored from its traces (:func:`~pyro_vae.infer.traces.program_terms`)."""
    start = time.perf_counter()
    meta, x_all = _images_to_score(images, run.config if run is not None else None,
                                   "the program" if run is None else f"run {run.path}")
    device = next(iter(program.parameters())).device
    if x_all.shape[1] != math.prod(program.event_shape):
        raise ConfigError(f"images must be [N, {math.prod(program.event_shape)}] ({program_name(program)}'s "
                          f"event_shape {list(program.event_shape)} flattened); got shape {tuple(x_all.shape)}")
    check_program(program, x_all[:2].to(device))
    chunk = _chunk_size(chunk_k, min(batch_size, len(x_all)))
    parts: Dict[str, List[torch.Tensor]] = {}
    bar = tqdm(total=len(x_all), unit="img", desc=f"evaluate (k={iwae_k})", disable=disable(progress), leave=False)
    for idx in torch.arange(len(x_all)).split(batch_size):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(np.random.SeedSequence(seed, spawn_key=(2, int(idx[0]))).generate_state(1)[0]))
            terms = program_terms(program, x_all[idx].to(device), elbo_samples, iwae_k, chunk)
        for key, value in terms.items():
            parts.setdefault(key, []).append(value.cpu())
        bar.update(len(idx))
    bar.close()
    values = {key: torch.cat(v) for key, v in parts.items()}
    means = {key[len("mean:"):]: values.pop(key) for key in list(values) if key.startswith("mean:")}
    by_site, variances = _site_units(means)
    summaries = {}
    for key in ("elbo", "iwae", "kl", "reconstruction"):
        summaries[key], summaries[f"{key}_se"] = _summary(values[key])
    return EvalResult(**summaries, iwae_k=int(iwae_k), active_units=sum(by_site.values()) if by_site else None,
                      z_dim=sum(m.shape[-1] for m in means.values()), latent_variance=variances, n=len(x_all),
                      elbo_samples=int(elbo_samples), seed=int(seed),
                      run=str(run.path) if run is not None and run.path is not None else None,
                      seconds=time.perf_counter() - start,
                      note=None if meta["binarize"] != "none" else f"binarize=none: grey values scored by "
                      f"{program.program_class.__name__}'s likelihood (log-likelihoods only if it is a density of them)",
                      program=program_name(program), active_units_by_site=by_site, per_image=values, **meta)


def _site_units(means: Dict[str, torch.Tensor]) -> Tuple[Dict[str, int], List[float]]:
    """Active units of each site from its posterior means ``[n, numel]``, and the variances of all
    dimensions one site after another (zeros, and no counts, with fewer than 2 images)."""
    if any(len(m) < 2 for m in means.values()):
        return {}, [0.0] * sum(m.shape[-1] for m in means.values())
    counted = {site: active_units(m) for site, m in means.items()}
    return {site: c for site, (c, _) in counted.items()}, [float(v) for _, var in counted.values() for v in var]


def _images_to_score(images, config, what: str):
    """``(meta, x [N, D])``: an ImageData as evaluation scores it (one seeded binarization), or a
    tensor as it is; checked against the model's data shape."""
    if isinstance(images, ImageData):
        if config is not None:
            check_shape_matches(images, config.event_shape, what)
        meta = dict(dataset=images.name, split=images.split, binarize=images.binarize)
        x_all = eval_binarized(images)  # [N, D], one seeded binarization
    else:
        meta = dict(dataset=None, split=None, binarize=None)
        x_all = torch.as_tensor(images)
    if x_all.ndim != 2 or len(x_all) == 0:
        raise ConfigError(f"images must be a non-empty [N, D] batch; got shape {tuple(x_all.shape)}")
    if config is not None and x_all.shape[1] != config.x_dim:
        raise ConfigError(f"images must be [N, {config.x_dim}] (the model's {list(config.event_shape)} flattened); "
                          f"got shape {tuple(x_all.shape)}")
    return meta, x_all


def _score_images(vae, x_all, posterior: Posterior, iwae_k, elbo_samples, batch_size, seed, chunk_k, progress):
    """Per-image ``elbo``, ``reconstruction``, ``kl``, ``iwae`` (``[n]`` each) and ``loc`` (``[n, z_dim]``)."""
    params = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
    device, dtype = (params.device, params.dtype) if params is not None else (x_all.device, x_all.dtype)
    n = len(x_all)
    per_image: Dict[str, List[torch.Tensor]] = {"elbo": [], "reconstruction": [], "kl": [], "iwae": [], "loc": []}
    bar = tqdm(total=n, unit="img", desc=f"evaluate (k={iwae_k})", disable=disable(progress), leave=False)
    for idx in torch.arange(n).split(batch_size):
        x = x_all[idx].to(device=device, dtype=dtype)  # [B, D]
        q = posterior(x, idx.to(device))  # (loc, scale), [B, z_dim] each, or a distribution
        if isinstance(q, torch.distributions.Distribution):  # full-rank, flow: any reparameterized q
            terms = _distribution_terms(vae, x, q, idx, elbo_samples, iwae_k, seed, chunk_k)
        else:
            terms = _gaussian_terms(vae, x, *q, idx, elbo_samples, iwae_k, seed, chunk_k)
        for key, value in terms.items():
            per_image[key].append(value.cpu())
        bar.update(len(idx))
    bar.close()
    return {key: torch.cat(parts) for key, parts in per_image.items()}


def _gaussian_terms(vae, x, loc, scale, idx, elbo_samples, iwae_k, seed, chunk_k) -> Dict[str, torch.Tensor]:
    """The per-image terms of a diagonal Gaussian q, from each image's own seeded draws."""
    device, dtype = x.device, x.dtype
    loc, scale = loc.detach().to(dtype), scale.detach().to(dtype)
    with torch.no_grad():
        z_dim = loc.shape[-1]
        eps = _image_normal(idx, elbo_samples, z_dim, seed, stream=0).to(device, dtype)  # [S, B, z_dim]
        terms = elbo_terms(vae, x, loc, scale, elbo_samples, chunk_k=chunk_k, eps=eps)
        eps = _image_normal(idx, iwae_k, z_dim, seed, stream=1).to(device, dtype)  # [k, B, z_dim]
        terms["iwae"] = iwae_bound(vae, x, loc, scale, iwae_k, chunk_k, eps=eps)
    terms["loc"] = loc
    return terms


@torch.no_grad()
def _distribution_terms(vae, x, q, idx, elbo_samples, iwae_k, seed, chunk_k) -> Dict[str, torch.Tensor]:
    r"""The per-image terms of any reparameterized q (full-rank, flow) from the same seeded draws
    :math:`\epsilon` as the Gaussian path, :math:`z = T(\epsilon)` with its :math:`\log q(z)`
    (:func:`~pyro_vae.program.guides.reparameterize`). ``kl`` is exact where torch has it in closed
    form, else the Monte-Carlo mean of :math:`\log q(z) - \log p(z)`; ``loc`` (for active units) is
    :math:`T(0)`, the point the zero draw maps to: the mean of a full-rank Gaussian, the flow's image
    of its base mean (a Monte-Carlo mean would add noise of the size of the 0.01 threshold)."""
    z_dim, prior = q.event_shape[-1], vae.prior(x.shape[0])
    sums = dict(reconstruction=0.0, kl=0.0)
    eps = _image_normal(idx, elbo_samples, z_dim, seed, stream=0).to(x.device, x.dtype)  # [S, B, z_dim]
    for chunk in eps.split(_chunk_size(chunk_k, x.shape[0])):
        z, log_q = reparameterize(q, chunk)  # [c, B, z_dim], [c, B]
        sums["reconstruction"] = sums["reconstruction"] + _log_likelihood(vae, x, z).sum(0)
        sums["kl"] = sums["kl"] + (log_q - prior.log_prob(z)).sum(0)
    terms = {key: value / elbo_samples for key, value in sums.items()}
    terms["loc"] = reparameterize(q, eps.new_zeros(eps.shape[1:]))[0]  # [B, z_dim]
    try:
        terms["kl"] = kl_divergence(q, prior)  # [B]
    except NotImplementedError:
        pass
    terms["elbo"] = terms["reconstruction"] - terms["kl"]
    total = x.new_full(x.shape[:1], -math.inf)  # [B], log sum_i w_i so far
    eps = _image_normal(idx, iwae_k, z_dim, seed, stream=1).to(x.device, x.dtype)  # [k, B, z_dim]
    for chunk in eps.split(_chunk_size(chunk_k, x.shape[0])):
        z, log_q = reparameterize(q, chunk)
        total = torch.logaddexp(total, (_log_likelihood(vae, x, z) + prior.log_prob(z) - log_q).logsumexp(0))
    terms["iwae"] = total - math.log(iwae_k)
    return terms


def _log_likelihood(vae, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log p(x|z), ``[c, B]`` for ``z [c, B, z_dim]`` (Bernoulli: one fused BCE pass)."""
    with pyro.validation_enabled(False):
        if vae.config.likelihood == "bernoulli":
            logits = vae.decode(z)  # [c, B, D]
            return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return vae.likelihood(z).log_prob(x)


#: the file ``pyro-vae evaluate RUN_DIR --save`` writes into the run folder (``pyro-vae runs`` reads it)
EVAL_FILE = "eval.json"


def checkpoint_digest(path) -> str:
    """The SHA-256 of a checkpoint file: which trained state an evaluation describes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_result(result: EvalResult, checkpoint) -> Path:
    """Write ``result`` as :data:`EVAL_FILE` into the folder of ``checkpoint`` (the file evaluated,
    usually ``RUN_DIR/checkpoint.pt``), with the checkpoint's :func:`checkpoint_digest` as
    ``checkpoint_sha256``: a reader can tell whether it still describes the run (a resumed or
    replaced run has another checkpoint). Returns the path written."""
    checkpoint = Path(checkpoint)
    path = checkpoint.parent / EVAL_FILE
    write_json(path, {**result.to_dict(), "checkpoint_sha256": checkpoint_digest(checkpoint)})
    return path


# ----------------------------------------------------------------------------- data and CLI


def default_split(dataset: Optional[str], data_dir=None, data=None) -> str:
    """``test`` where the data has a separate test split (a ``t10k-images`` file, a ``test/``
    image folder, torchvision's test set), else ``val``."""
    return "test" if kind_of_test_split(dataset, data_dir, data) == "separate" else "val"


def load_eval_data(
    config,
    split: Optional[str] = None,
    *,
    dataset: Optional[str] = None,
    data_dir=None,
    data=None,
    labels_file=None,
    image_size: Optional[int] = None,
    binarize: Optional[str] = None,
    limit: Optional[int] = None,
) -> ImageData:
    """The images a run is evaluated on: its own data settings (``dataset``/``data_dir``/``data``,
    ``binarize``, ``val_size``, ``split_seed``, ``image_size`` from ``config``) unless overridden;
    ``split`` defaults to :func:`default_split` for the run's own data, and for other data to
    ``test`` where it has one (a tensor file or an image folder: all of it); ``limit`` keeps the
    split's first images."""
    options = source_options(config)
    own = dataset is None and data_dir is None and data is None
    if not own:  # another source: none of the run's own data settings but the split and binarization
        options.update(data_dir=data_dir, data=data, labels_file=labels_file, image_size=image_size)
    else:
        options.update({k: v for k, v in (("labels_file", labels_file), ("image_size", image_size)) if v is not None})
    dataset = dataset or config.dataset  # with data_dir or data, only a name for reports
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive integer; got {limit}")
    if split is None:
        kind = kind_of_test_split(dataset, options["data_dir"], options["data"])
        split = "test" if kind == "separate" or (kind == "whole" and not own) else "val"
    options["binarize"] = binarize or config.binarize
    return load_dataset(dataset, split, limit=limit, **options)
