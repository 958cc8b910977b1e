r"""Gradient estimators of the ELBO: reparameterization versus score function, and a lab that
measures their variance (``pyro-vae grad-variance``).

For one image write the ELBO as an expectation under the guide,

.. math::

    \mathcal{L}(\theta, \phi) = \mathbb{E}_{q_\phi(z)}\big[f_{\theta, \phi}(z)\big], \qquad
    f_{\theta, \phi}(z) = \log p_\theta(x, z) - \log q_\phi(z).

The decoder gradient :math:`\nabla_\theta \mathcal{L} = \mathbb{E}_q[\nabla_\theta \log p_\theta(x, z)]`
is the same for both estimators (the same z, the same distribution). They differ in the guide's
gradient :math:`\nabla_\phi \mathcal{L}`, where the sampling distribution itself depends on
:math:`\phi`:

.. math::

    \text{reparameterization:}\quad \nabla_\phi \mathcal{L}
        &= \mathbb{E}_{\epsilon \sim \mathcal{N}(0, I)}\big[\nabla_\phi f(t_\phi(\epsilon))\big],
        \qquad z = t_\phi(\epsilon) = \mu_\phi + \sigma_\phi \odot \epsilon \\
    \text{score function:}\quad \nabla_\phi \mathcal{L}
        &= \mathbb{E}_{q_\phi(z)}\big[(f(z) - b)\, \nabla_\phi \log q_\phi(z)\big]

The score-function (REINFORCE) estimator is black-box VI in its original form (Ranganath et
al. 2014): it needs only :math:`\log q` and its gradient, not a differentiable :math:`f`, and any
baseline :math:`b` that does not depend on :math:`z` keeps it unbiased because
:math:`\mathbb{E}_q[\nabla_\phi \log q_\phi(z)] = 0`. It is far noisier: it scores whole
log-densities instead of following the gradient of :math:`f` along :math:`z`.

In Pyro, a guide site whose distribution has ``has_rsample == False`` is sampled without a
pathwise gradient, and ``Trace_ELBO`` adds the score-function surrogate
:math:`\log q_\phi(z) \cdot \mathrm{stop\_grad}(f(z))` for it. ``Trace_ELBO`` ignores baselines;
``TraceGraph_ELBO`` reads them from the site's ``infer={"baseline": {...}}``. This module

- switches a :class:`~pyro_vae.guides.Guide` between the two estimators (:func:`set_estimator`,
  :func:`estimator_mode`) and builds the site's baseline options (:func:`baseline_options`):
  ``decaying-avg`` (``use_decaying_avg_baseline``) or ``neural`` (the decaying average plus a
  :class:`BaselineNet` of :math:`x` fitted to the residual, as in NVIL, Mnih and Gregor 2014);
- gives ``TraceGraph_ELBO`` the ``differentiable_loss`` the training loop calls
  (:class:`DifferentiableTraceGraph_ELBO`);
- measures the estimators' means and variances on one fixed minibatch (:func:`gradient_moments`,
  :func:`gradient_variance`), in the spirit of Kucukelbir et al. (2017), figure 8.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from torch import nn

from .config import BASELINES, ESTIMATORS
from .errors import ConfigError

__all__ = [
    "LAB_ESTIMATORS",
    "BASELINE_BETA",
    "BaselineNet",
    "set_estimator",
    "estimator_mode",
    "non_reparameterized",
    "baseline_options",
    "DifferentiableTraceGraph_ELBO",
    "baseline_elbo",
    "fresh_averages",
    "parameter_groups",
    "GradientMoments",
    "gradient_moments",
    "gradient_variance",
    "plot_grad_variance",
    "format_table",
    "write_grad_variance",
    "add_parser",
]

#: the estimators the variance lab compares: name -> (estimator, baseline)
LAB_ESTIMATORS = {
    "reparam": ("reparam", "none"),
    "score": ("score", "none"),
    "score+baseline": ("score", "decaying-avg"),
    "score+neural": ("score", "neural"),  # needs a run trained with --baseline neural
}
BASELINE_BETA = 0.9  # decay of the running average baseline (Pyro's default)
WARMUP = 30  # lab: estimates drawn before measuring, so a running-average baseline has settled
SWEEP = (1, 4, 16, 64)  # lab: numbers of particles of the variance plot
DEFAULT_ESTIMATORS = ("reparam", "score", "score+baseline")
REPEATS = 50  # lab: independent estimates per estimator
BATCH = 64  # lab: images in the fixed minibatch
_AVG_PREFIX = "__baseline_avg_downstream_cost_"  # Pyro's param-store name of a decaying average


# ---------------------------------------------------------------------------- the latent site


class BaselineNet(nn.Module):
    r"""Input-dependent baseline :math:`b_\psi(x)`: one hidden layer, one number per image.

    It is fitted (by Pyro's baseline loss :math:`(f - b)^2`, gradients to :math:`\psi` only) to
    what the running average misses of each image's cost, in nats per image; ``scale`` multiplies
    it by the data plate's :math:`N / B`, the factor Pyro's per-image costs carry.
    """

    def __init__(self, x_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * self.net(x).squeeze(-1)  # [B]


def set_estimator(guide: nn.Module, estimator: str = "reparam", baseline: str = "none", x_dim: Optional[int] = None):
    """Make ``guide`` use ``estimator`` (``reparam`` | ``score``) with ``baseline`` (``none`` |
    ``decaying-avg`` | ``neural``); a neural baseline adds ``guide.baseline_net`` (a submodule,
    so it is in ``vae.parameters()`` and in checkpoints). Returns ``guide``."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if baseline not in BASELINES:
        raise ConfigError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
    if estimator == "reparam" and baseline != "none":
        raise ConfigError("a baseline reduces the variance of the score-function estimator only; use --estimator score")
    guide.estimator, guide.baseline = estimator, baseline
    if baseline == "neural" and _baseline_net(guide) is None:
        if x_dim is None:
            raise ValueError("a neural baseline needs x_dim")
        p = next(guide.parameters(), None)
        guide.baseline_net = BaselineNet(x_dim).to(p.device if p is not None else "cpu")
    return guide


@contextlib.contextmanager
def estimator_mode(guide: nn.Module, estimator: str, baseline: str = "none"):
    """Temporarily switch ``guide`` to another estimator (a neural baseline needs its network)."""
    saved = getattr(guide, "estimator", "reparam"), getattr(guide, "baseline", "none")
    if baseline == "neural" and _baseline_net(guide) is None:
        raise ConfigError("the neural baseline needs a run trained with --estimator score --baseline neural")
    set_estimator(guide, estimator, baseline)
    try:
        yield guide
    finally:
        guide.estimator, guide.baseline = saved


def non_reparameterized(q):
    """``q`` marked not reparameterizable (``has_rsample_(False)``): its samples carry no
    pathwise gradient, so Pyro's ELBOs use the score function for the site."""
    if isinstance(q, torch.distributions.Independent):
        q = _Independent(non_reparameterized(q.base_dist), q.reinterpreted_batch_ndims)
    return q.has_rsample_(False)


class _Independent(dist.Independent):
    """``Independent`` whose ``has_rsample`` can be set. Pyro's ``Independent`` reads it from its
    base, so ``has_rsample_(False)`` fails, and ``expand`` (a vectorised particle plate) drops the
    base's flag; Pyro then copies the flag onto the expanded copy, which works here."""

    @property
    def has_rsample(self):
        return self.__dict__.get("_has_rsample", self.base_dist.has_rsample)

    @has_rsample.setter
    def has_rsample(self, value):
        self.__dict__["_has_rsample"] = value


def baseline_options(guide: nn.Module, x: torch.Tensor, num_data: Optional[int] = None) -> dict:
    """The ``infer`` dict of the guide's score-function site ``z`` for ``guide.baseline``.

    ``decaying-avg``: :math:`b` is a running average of each minibatch slot's cost.
    ``neural``: that average plus :math:`b_\\psi(x)` (Pyro adds the two when both are given).
    """
    baseline = getattr(guide, "baseline", "none")
    if baseline == "none":
        return {}
    options = {"use_decaying_avg_baseline": True, "baseline_beta": BASELINE_BETA}
    if baseline == "neural":
        scale = (num_data or x.shape[0]) / x.shape[0]  # the data plate's N / B
        options.update(nn_baseline=functools.partial(guide.baseline_net, scale=scale), nn_baseline_input=x)
    return {"baseline": options}


def _baseline_net(guide) -> Optional[nn.Module]:
    return guide._modules.get("baseline_net")


# ---------------------------------------------------------------------------- the ELBO


class DifferentiableTraceGraph_ELBO(TraceGraph_ELBO):
    """``TraceGraph_ELBO`` (the Pyro ELBO that implements baselines) with the
    ``differentiable_loss`` of ``Trace_ELBO``: its value is the :math:`-\\mathrm{ELBO}` estimate,
    its gradient that of the surrogate loss (score-function terms with baselines, plus the
    baselines' own squared-error loss, whose gradient reaches only the baseline network).

    Pyro keeps a decaying-average baseline in the param store, shaped like the minibatch's costs
    (``[B]``, or ``[P, B]`` with vectorised particles), and fails on a minibatch of another size.
    The last, smaller minibatch of an epoch (whose costs also carry another :math:`N / B` scale)
    therefore gets its own average: before each call, averages of another batch size are parked
    in the param store under ``name@B`` and the one for this batch size is brought back. All of
    them stay in the param store, so checkpoints save them.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if args and torch.is_tensor(args[0]):
            _select_averages(args[0].shape[0])
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return -elbo.detach() + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


def _select_averages(batch: int) -> None:
    """Park the decaying averages of other batch sizes; bring back those of ``batch``."""
    store = pyro.get_param_store()
    names = [n for n in store.keys() if n.startswith(_AVG_PREFIX)]
    for name in names:  # active averages: the last dim is the batch
        if "@" not in name and store[name].shape[-1] != batch:
            store[f"{name}@{store[name].shape[-1]}"] = store[name].detach()
            del store[name]
    for name in names:
        if name.endswith(f"@{batch}"):
            store[name.rsplit("@", 1)[0]] = store[name].detach()
            del store[name]


@contextlib.contextmanager
def fresh_averages():
    """Run with no decaying-average baselines in the param store; put back the ones there before."""
    store = pyro.get_param_store()

    def pop():
        names = [n for n in store.keys() if n.startswith(_AVG_PREFIX)]
        values = {n: store[n].detach() for n in names}
        for n in names:
            del store[n]
        return values

    outside = pop()
    try:
        yield
    finally:
        pop()
        for name, value in outside.items():
            store[name] = value


def baseline_elbo(num_particles: int = 1) -> DifferentiableTraceGraph_ELBO:
    """The ELBO for score-function training with a baseline; particles are vectorised (the
    decaying average then has one slot per particle and image, ``[P, B]``)."""
    return DifferentiableTraceGraph_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )


# ---------------------------------------------------------------------------- the variance lab


def parameter_groups(vae) -> Dict[str, List[torch.Tensor]]:
    """``{"encoder": guide parameters (not a baseline network's), "decoder": decoder parameters}``."""
    net = _baseline_net(vae.inference)
    skip = set() if net is None else {id(p) for p in net.parameters()}
    encoder = [p for p in vae.inference.parameters() if id(p) not in skip and p.requires_grad]
    decoder = [p for p in vae.decoder.parameters() if p.requires_grad]
    return {"encoder": encoder, "decoder": decoder}


@dataclass
class GradientMoments:
    r"""Mean and variance, per parameter, of ``repeats`` independent gradient estimates of the
    minibatch's mean ELBO (nats per image): ``mean``, ``var`` are flat ``float64`` vectors over all
    parameters, ``groups`` names the slice of each parameter group (``encoder``, ``decoder``)."""

    estimator: str
    num_particles: int
    repeats: int
    mean: torch.Tensor  # [D] float64
    var: torch.Tensor  # [D] float64, unbiased sample variance
    groups: Dict[str, slice]
    elbo: float  # mean ELBO estimate, nats per image

    def standard_error(self) -> torch.Tensor:
        """Standard error of ``mean``, per parameter."""
        return (self.var / self.repeats).sqrt()

    def summary(self, group: Optional[str] = None) -> dict:
        r"""``total_variance`` :math:`\mathrm{tr}\,\mathrm{Cov}[\hat g]`, ``mean_norm``
        :math:`\|\mathbb{E} \hat g\|` (:math:`\|\bar g\|^2 - \mathrm{tr}\,\mathrm{Cov}/R` is its unbiased
        square), ``snr`` :math:`\|\mathbb{E} \hat g\| / \sqrt{\mathrm{tr}\,\mathrm{Cov}}`, for one group
        or (``None``) all parameters."""
        s = self.groups[group] if group is not None else slice(None)
        mean, var = self.mean[s], self.var[s]
        total = var.sum().item()
        raw = mean.square().sum().item()
        norm = math.sqrt(max(raw - total / self.repeats, 0.0))
        return {
            "mean_norm": norm,
            "mean_norm_raw": math.sqrt(raw),
            "mean_noise": math.sqrt(total / self.repeats),  # sqrt(tr Cov / R): the noise in mean_norm_raw
            "total_variance": total,
            "snr": norm / math.sqrt(total) if total > 0 else math.inf,
            "parameters": int(mean.numel()),
        }


class _Welford:
    """Running mean and sum of squared deviations, per component (float64, numerically stable)."""

    def __init__(self, size: int, device):
        self.n = 0
        self.mean = torch.zeros(size, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def update(self, x: torch.Tensor) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n - 1, 1)


def _lab_elbo(baseline: str, num_particles: int):
    if baseline == "none":  # Trace_ELBO: the score-function surrogate, no baseline
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
    return baseline_elbo(num_particles)


def gradient_moments(
    vae,
    x: torch.Tensor,
    estimator: str = "reparam",
    *,
    repeats: int = REPEATS,
    num_particles: int = 1,
    warmup: int = WARMUP,
    elbo=None,
    seed: Optional[int] = 0,
) -> GradientMoments:
    r"""Draw ``repeats`` independent estimates of :math:`\nabla \frac1B \mathrm{ELBO}(x_{1:B})`
    with respect to the encoder and decoder parameters, each from ``num_particles`` samples of z
    per image, and return their per-parameter mean and variance.

    :param vae: a :class:`~pyro_vae.model.VAE` (its guide is switched temporarily).
    :param x: the fixed minibatch ``[B, D]``, already binarized.
    :param estimator: a key of :data:`LAB_ESTIMATORS`.
    :param warmup: estimates drawn (not recorded) before measuring, so that a decaying-average
        baseline has settled on this minibatch.
    :param elbo: an ELBO object to use instead of the default (``Trace_ELBO``, or
        :class:`DifferentiableTraceGraph_ELBO` with a baseline), e.g. to test a biased one.
    """
    if estimator not in LAB_ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; choose from {', '.join(LAB_ESTIMATORS)}")
    if repeats < 2:
        raise ConfigError(f"repeats must be at least 2 (a variance needs two estimates); got {repeats}")
    if num_particles < 1:
        raise ConfigError(f"num_particles must be a positive integer; got {num_particles}")
    kind, baseline = LAB_ESTIMATORS[estimator]
    elbo = elbo if elbo is not None else _lab_elbo(baseline, num_particles)
    groups = parameter_groups(vae)
    params = [p for ps in groups.values() for p in ps]
    slices, start = {}, 0
    for name, ps in groups.items():
        size = sum(p.numel() for p in ps)
        slices[name] = slice(start, start + size)
        start += size
    batch = x.shape[0]
    acc = _Welford(start, x.device)
    elbo_sum = 0.0
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), estimator_mode(vae.inference, kind, baseline), fresh_averages():
        if seed is not None:
            torch.manual_seed(seed)
        with torch.enable_grad():  # the guide is non-reparameterized only where gradients are on
            for _ in range(warmup if baseline != "none" else 0):
                elbo.differentiable_loss(vae.model, vae.guide, x)  # moves the running averages
            for _ in range(repeats):
                loss = elbo.differentiable_loss(vae.model, vae.guide, x) / batch  # -ELBO per image
                grads = torch.autograd.grad(-loss, params, allow_unused=True)
                flat = [
                    (torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g).reshape(-1)
                    for p, g in zip(params, grads)
                ]
                acc.update(torch.cat(flat).double())
                elbo_sum -= loss.item()
    return GradientMoments(estimator, num_particles, repeats, acc.mean, acc.var(), slices, elbo_sum / repeats)


GROUPS = ("encoder", "decoder", "total")


def gradient_variance(
    run_or_vae,
    x: torch.Tensor,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    *,
    repeats: int = REPEATS,
    num_particles: int = 1,
    sweep: Iterable[int] = SWEEP,
    warmup: int = WARMUP,
    seed: int = 0,
) -> dict:
    """Compare gradient estimators on the fixed minibatch ``x``: for each, the norm of the mean
    gradient, the total variance, the signal-to-noise ratio and the variance as a ratio to the
    reparameterization estimator's, for the encoder, the decoder and all parameters (at
    ``num_particles``), and the total variances at each particle count of ``sweep``.

    Every estimator draws its z from the same seeded random stream (common random numbers): the
    reparameterized and the score-function estimates then share their z draws, so their decoder
    gradients coincide and the comparison isolates how each treats the encoder.

    Returns a JSON-ready dict (:func:`format_table`, :func:`plot_grad_variance` read it).
    """
    vae = getattr(run_or_vae, "vae", run_or_vae)
    estimators = list(dict.fromkeys(estimators))
    if not estimators:
        raise ConfigError("name at least one estimator")
    for name in estimators:
        if name not in LAB_ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from {', '.join(LAB_ESTIMATORS)}")
    if not getattr(vae.inference, "amortized", True):
        raise ConfigError("grad-variance needs a guide with an encoder (amortized or semi-amortized)")
    sweep = sorted({int(p) for p in sweep})
    if sweep and sweep[0] < 1:
        raise ConfigError(f"particle counts must be positive; got {sweep}")
    x = x.to(next(vae.parameters()).device)

    def measure(name, particles):
        return gradient_moments(
            vae, x, name, repeats=repeats, num_particles=particles, warmup=warmup, seed=seed
        )

    table, elbo = {}, None
    for name in estimators:
        m = measure(name, num_particles)
        elbo = m.elbo if elbo is None else elbo
        table[name] = {g: m.summary(None if g == "total" else g) for g in GROUPS}
    # all estimators are unbiased for the same gradient: the least noisy one measures its norm best
    precise = min(estimators, key=lambda n: table[n]["total"]["total_variance"])
    for name in estimators:
        for g in GROUPS:
            s, ref = table[name][g], table.get("reparam", {}).get(g)
            ok = ref is not None and ref["total_variance"] > 0
            s["variance_ratio"] = s["total_variance"] / ref["total_variance"] if ok else None
            norm = table[precise][g]["mean_norm"]
            s["snr"] = norm / math.sqrt(s["total_variance"]) if s["total_variance"] > 0 else math.inf
    curves = {name: {g: [] for g in GROUPS} for name in estimators}
    for particles in sweep:
        for name in estimators:
            if particles == num_particles:
                values = {g: table[name][g]["total_variance"] for g in GROUPS}
            else:
                m = measure(name, particles)
                values = {g: m.summary(None if g == "total" else g)["total_variance"] for g in GROUPS}
            for g in GROUPS:
                curves[name][g].append(values[g])
    return {
        "batch_size": int(x.shape[0]),
        "repeats": repeats,
        "num_particles": num_particles,
        "warmup": warmup,
        "seed": seed,
        "elbo": elbo,
        "gradient": "of the minibatch's mean ELBO (nats per image)",
        "snr_norm_from": precise,
        "estimators": table,
        "sweep": {"num_particles": sweep, "total_variance": curves},
    }


# ---------------------------------------------------------------------------- reports


def format_table(result: dict) -> str:
    """The markdown report of a :func:`gradient_variance` result."""
    p = result["num_particles"]
    lines = [
        "| estimator | parameters | ‖mean gradient‖ ± noise | total variance | SNR | variance / reparam |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, groups in result["estimators"].items():
        for g in GROUPS:
            s = groups[g]
            ratio = "" if s["variance_ratio"] is None else f"{s['variance_ratio']:.3g}"
            norm = f"{s['mean_norm']:.4g} ± {s['mean_noise']:.2g}"
            lines.append(f"| {name} | {g} | {norm} | {s['total_variance']:.4g} | {s['snr']:.3g} | {ratio} |")
    text = [
        "# Gradient variance: reparameterization vs score function",
        "",
        f"{result.get('source', 'model')}; one fixed minibatch of {result['batch_size']} images "
        f"(minibatch ELBO {result['elbo']:.2f} nats/image); {result['repeats']} independent estimates "
        f"per estimator, {p} particle{'s' if p > 1 else ''} (samples of z per image) each.",
        "",
        "Gradient of the minibatch's mean ELBO in nats per image. *Total variance*: the trace of the "
        "estimator's covariance, summed over parameters. *‖mean gradient‖*: ‖E ĝ‖ from this estimator's "
        "estimates, corrected for the noise of their average (± sqrt(total variance / R), the size of that "
        "noise). *SNR*: ‖E ĝ‖ / sqrt(total variance), with ‖E ĝ‖ from the least noisy estimator "
        f"({result.get('snr_norm_from', '?')}; all estimate the same gradient).",
        "",
        *lines,
    ]
    sweep = result["sweep"]
    if sweep["num_particles"]:
        head = " | ".join(f"P = {n}" for n in sweep["num_particles"])
        text += ["", "Total variance (encoder parameters) against the number of particles P:", ""]
        text += [f"| estimator | {head} |", "|---|" + "---:|" * len(sweep["num_particles"])]
        for name, curves in sweep["total_variance"].items():
            text.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in curves["encoder"]) + " |")
    return "\n".join(text) + "\n"


def plot_grad_variance(result: dict):
    """Total variance against the number of particles (log-log), one line per estimator, for the
    encoder and the decoder parameters; the dotted line falls as 1/P."""
    from .plots import plt

    sweep = result["sweep"]
    ps = sweep["num_particles"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, g, title in zip(axes, ("encoder", "decoder"), ("encoder (guide) parameters", "decoder parameters")):
        for name, curves in sweep["total_variance"].items():
            ax.plot(ps, curves[g], marker="o", label=name)
        if ps:  # a 1/P line below the lowest curve
            low = min(c[g][0] for c in sweep["total_variance"].values()) / 4
            ax.plot(ps, [low * ps[0] / p for p in ps], ":", color="grey", label="∝ 1/P")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ps, [str(p) for p in ps])
        ax.set_xlabel("particles P (samples of z per image)")
        ax.set_ylabel("total gradient variance")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize="small", loc="upper right")  # empty corner
    axes[1].text(
        0.03, 0.03, "same z draws: the decoder's gradient\nis the same under every estimator",
        transform=axes[1].transAxes, fontsize="small", color="dimgrey",
    )
    fig.suptitle(f"gradient variance on one minibatch of {result['batch_size']} images, {result['repeats']} estimates")
    fig.tight_layout()
    return fig


def write_grad_variance(result: dict, out) -> Dict[str, Path]:
    """Write ``grad_variance.md``, ``grad_variance.json`` and (with a sweep) ``grad_variance.png``."""
    from .plots import DPI, plt
    from .run import _atomic_write, write_json

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    paths = {"md": out / "grad_variance.md", "json": out / "grad_variance.json"}
    _atomic_write(paths["md"], lambda f: f.write(format_table(result).encode()))
    write_json(paths["json"], result)
    if result["sweep"]["num_particles"]:
        paths["png"] = out / "grad_variance.png"
        fig = plot_grad_variance(result)
        fig.savefig(paths["png"], dpi=DPI)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------- command line


def _int_list(text: str) -> List[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16,64, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _names(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in LAB_ESTIMATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(LAB_ESTIMATORS)}, got {text!r}")
    return names


def add_parser(sub) -> None:
    """The ``grad-variance`` subcommand."""
    from .cli import add_data_flags

    p = sub.add_parser(
        "grad-variance",
        help="compare the variance of reparameterization and score-function gradients",
        description="Draw R independent ELBO gradient estimates on one fixed minibatch per estimator and "
        "report their mean norm, total variance, SNR and variance relative to reparameterization; "
        "write grad_variance.md, grad_variance.json and grad_variance.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run folder (optional with --at-init)")
    add_data_flags(p, defaults=False)
    a = p.add_argument_group("measurement")
    a.add_argument("--at-init", action="store_true", help="fresh parameters (the run's config, or the defaults)")
    a.add_argument(
        "--estimators", type=_names, default=list(DEFAULT_ESTIMATORS), metavar="NAME,...",
        help=f"from {', '.join(LAB_ESTIMATORS)} (default {','.join(DEFAULT_ESTIMATORS)})",
    )
    a.add_argument("--repeats", type=int, default=REPEATS, metavar="R", help=f"estimates per estimator ({REPEATS})")
    a.add_argument("--batch-size", type=int, default=BATCH, metavar="B", help=f"images in the minibatch ({BATCH})")
    a.add_argument("--num-particles", type=int, default=1, metavar="P", help="z samples per image per estimate (1)")
    a.add_argument(
        "--sweep", type=_int_list, default=list(SWEEP), metavar="P,...",
        help=f"particle counts of the plot ({','.join(map(str, SWEEP))}); '' for none",
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the minibatch, its binarization and the z draws")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR; with --at-init alone, .)")
    o.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=_grad_variance)


def _grad_variance(args) -> int:
    from .config import VAEConfig
    from .datasets import load_dataset
    from .model import VAE
    from .run import load_run
    from .train import resolve_device

    if args.run_dir is None and not args.at_init:
        raise ConfigError("give a RUN_DIR, or --at-init for a freshly initialised model")
    for name in ("repeats", "batch_size", "num_particles"):
        if getattr(args, name) < (2 if name == "repeats" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {2 if name == 'repeats' else 1}")
    device = resolve_device(args.device)
    run = load_run(args.run_dir, device=device) if args.run_dir is not None else None
    config = run.config if run is not None else VAEConfig()
    data = {k: getattr(args, k) for k in ("dataset", "data_dir", "binarize", "limit") if getattr(args, k) is not None}
    if "dataset" in data and "data_dir" not in data:
        data["data_dir"] = None
    config = config.replace(**data)
    if run is None or args.at_init:
        torch.manual_seed(config.seed)
        vae = VAE(config).to(device)
        source = f"freshly initialised model (seed {config.seed})"
    else:
        vae = run.vae
        source = f"run {run.path} ({len(run.history)} epochs)"
    train = load_dataset(
        config.dataset, "train", data_dir=config.data_dir, val_size=config.val_size,
        split_seed=config.split_seed, limit=config.limit, binarize=config.binarize,
    )
    if args.batch_size > len(train):
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {len(train)} training images")
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(train), generator=g)[: args.batch_size]
    x = train.images[rows]
    if train.binarize == "dynamic":
        x = torch.bernoulli(x, generator=g)  # one fixed binarization of the fixed minibatch
    start = time.perf_counter()
    result = gradient_variance(
        vae, x.to(device), args.estimators, repeats=args.repeats, num_particles=args.num_particles,
        sweep=args.sweep, seed=args.seed,
    )
    result["source"] = source
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out) if args.out else Path(args.run_dir) if args.run_dir else Path(".")
    paths = write_grad_variance(result, out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result), end="")
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({result['seconds']:.0f}s)")
    return 0
