r"""The gradient-variance lab behind ``pyro-vae grad-variance``: independent ELBO gradient
estimates on one fixed minibatch, per estimator (reparameterization, score function, with
baselines; the importance-weighted bound's IWAE and DReG gradients), their mean, total variance
and signal-to-noise ratio, and how they change with the number of particles K (Kucukelbir et al.
2017, figure 8; for ``iwae`` the encoder's SNR falls like :math:`1/\sqrt{K}`, Rainforth et al. 2018,
for ``dreg`` it does not, Tucker et al. 2019).

The SNR of an estimator is :math:`\|\mathbb{E}\hat g\| / \sqrt{\mathrm{tr}\,\mathrm{Cov}[\hat g]}`,
with :math:`\|\mathbb{E}\hat g\|` taken from the least noisy estimator of the *same* target: the
ELBO's gradient (``reparam``, ``score``...) or, at each K, the IWAE bound's (``iwae``, ``dreg``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from pyro.infer import Trace_ELBO

from ..core.errors import ConfigError
from ..core.rundir import atomic_write, write_json
from ..infer.cache import digest, remember
from ..infer.estimators import baseline_elbo, estimator_mode, fresh_averages
from ..infer.iwae import DReG_ELBO, IWAE_ELBO
from ..program.sites import baseline_net
from .plots import DPI, plt

__all__ = [
    "LAB_ESTIMATORS", "DEFAULT_ESTIMATORS", "GradientMoments", "gradient_moments", "gradient_variance",
    "parameter_groups", "format_table", "plot_grad_variance", "write_grad_variance",
]

#: the estimators the variance lab compares: name -> (estimator, baseline)
LAB_ESTIMATORS = {
    "reparam": ("reparam", "none"),
    "score": ("score", "none"),
    "score+baseline": ("score", "decaying-avg"),
    "score+neural": ("score", "neural"),  # needs a run trained with --baseline neural
    "iwae": ("reparam", "none"),  # the importance-weighted bound's gradient, K = the particles
    "dreg": ("reparam", "none"),  # the same bound's doubly reparameterized gradient
}

#: estimators of another objective than the ELBO: name -> its Pyro ELBO class (K particles)
LAB_OBJECTIVES = {"iwae": IWAE_ELBO, "dreg": DReG_ELBO}


WARMUP = 30  # lab: estimates drawn before measuring, so a running-average baseline has settled


SWEEP = (1, 4, 16, 64)  # lab: numbers of particles of the variance plot


DEFAULT_ESTIMATORS = ("reparam", "score", "score+baseline")


REPEATS = 50  # lab: independent estimates per estimator


BATCH = 64  # lab: images in the fixed minibatch


def parameter_groups(vae) -> Dict[str, List[torch.Tensor]]:
    """``{"encoder": guide parameters (not a baseline network's), "decoder": decoder parameters}``."""
    net = baseline_net(vae.inference)
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


def _lab_elbo(estimator: str, baseline: str, num_particles: int):
    if estimator in LAB_OBJECTIVES:
        return LAB_OBJECTIVES[estimator](num_particles=num_particles)
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
    elbo = elbo if elbo is not None else _lab_elbo(estimator, baseline, num_particles)
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
    cache=False,
) -> dict:
    """Compare gradient estimators on the fixed minibatch ``x``: for each, the norm of the mean
    gradient, the total variance, the signal-to-noise ratio and the variance as a ratio to the
    reparameterization estimator's, for the encoder, the decoder and all parameters (at
    ``num_particles``), and the total variances at each particle count of ``sweep``.

    Every estimator draws its z from the same seeded random stream (common random numbers): the
    reparameterized and the score-function estimates then share their z draws, so their decoder
    gradients coincide and the comparison isolates how each treats the encoder.

    Returns a JSON-ready dict (:func:`format_table`, :func:`plot_grad_variance` read it). With
    ``cache`` (``True`` or a cache folder) the dict is computed once and kept in the run cache
    (:func:`pyro_vae.infer.cache.remember`), keyed by the parameters, ``x`` and every setting.
    """
    vae = getattr(run_or_vae, "vae", run_or_vae)
    estimators = list(dict.fromkeys(estimators))
    if not estimators:
        raise ConfigError("name at least one estimator")
    for name in estimators:
        if name not in LAB_ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from {', '.join(LAB_ESTIMATORS)}")
    if not getattr(vae.inference, "amortized", True):
        raise ConfigError("grad-variance needs a guide with an encoder (amortized, semi-amortized, iaf or full-rank)")
    sweep = sorted({int(p) for p in sweep})
    if sweep and sweep[0] < 1:
        raise ConfigError(f"particle counts must be positive; got {sweep}")
    x = x.to(next(vae.parameters()).device)
    settings = dict(estimators=estimators, repeats=repeats, num_particles=num_particles, sweep=sweep,
                    warmup=warmup, seed=seed)
    if not cache:
        return _lab(vae, x, **settings)
    key = dict(settings, parameters=digest(vae), images=digest(x))  # the parameters: every network's
    return remember("grad-variance", key, lambda: _lab(vae, x, **settings), root=cache, log=lambda s: None)


def _lab(vae, x, *, estimators, repeats, num_particles, sweep, warmup, seed) -> dict:
    """:func:`gradient_variance`'s measurements (arguments checked)."""

    def measure(name, particles):
        return gradient_moments(
            vae, x, name, repeats=repeats, num_particles=particles, warmup=warmup, seed=seed
        )

    table, values = {}, {}
    for name in estimators:
        m = measure(name, num_particles)
        values[name] = m.elbo  # the objective's mean estimate: the ELBO, or the IWAE bound
        table[name] = {g: m.summary(None if g == "total" else g) for g in GROUPS}
    elbo = next((values[n] for n in estimators if n not in LAB_OBJECTIVES), None)
    precise = _set_snr(table)
    for name in estimators:
        for g in GROUPS:
            s, ref = table[name][g], table.get("reparam", {}).get(g)
            ok = ref is not None and ref["total_variance"] > 0
            s["variance_ratio"] = s["total_variance"] / ref["total_variance"] if ok else None
    curves = {name: {g: [] for g in GROUPS} for name in estimators}
    snr = {name: {g: [] for g in GROUPS} for name in estimators}
    for particles in sweep:
        at = {name: table[name] if particles == num_particles else
              {g: m.summary(None if g == "total" else g) for m in [measure(name, particles)] for g in GROUPS}
              for name in estimators}
        _set_snr(at)
        for name in estimators:
            for g in GROUPS:
                curves[name][g].append(at[name][g]["total_variance"])
                snr[name][g].append(at[name][g]["snr"])
    return {
        "batch_size": int(x.shape[0]),
        "repeats": repeats,
        "num_particles": num_particles,
        "warmup": warmup,
        "seed": seed,
        "elbo": elbo,
        "iwae_bound": next((values[n] for n in estimators if n in LAB_OBJECTIVES), None),
        "gradient": "of the minibatch's mean ELBO, or IWAE bound for iwae/dreg (nats per image)",
        "snr_norm_from": precise,
        "estimators": table,
        "sweep": {"num_particles": sweep, "total_variance": curves, "snr": snr},
    }


def _target(name: str) -> str:
    """The gradient an estimator is unbiased for: the IWAE bound's (iwae, dreg) or the ELBO's."""
    return "iwae" if name in LAB_OBJECTIVES else "elbo"


def _set_snr(table: dict) -> dict:
    """Set each entry's ``snr`` from the mean-gradient norm of the least noisy estimator of the
    same target (it measures that norm best); return ``{target: that estimator}``."""
    precise = {}
    for name in table:
        best = precise.get(_target(name))
        if best is None or table[name]["total"]["total_variance"] < table[best]["total"]["total_variance"]:
            precise[_target(name)] = name
    for name, groups in table.items():
        for g, s in groups.items():
            norm = table[precise[_target(name)]][g]["mean_norm"]
            s["snr"] = norm / math.sqrt(s["total_variance"]) if s["total_variance"] > 0 else math.inf
    return precise


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
        "# Gradient variance: " + ", ".join(result["estimators"]),
        "",
        f"{result.get('source', 'model')}; one fixed minibatch of {result['batch_size']} images "
        f"({_values(result)}); {result['repeats']} independent estimates "
        f"per estimator, {p} particle{'s' if p > 1 else ''} (samples of z per image) each.",
        "",
        "Gradient of the minibatch's mean ELBO (iwae, dreg: of its IWAE bound) in nats per image. *Total variance*: the trace of the "
        "estimator's covariance, summed over parameters. *‖mean gradient‖*: ‖E ĝ‖ from this estimator's "
        "estimates, corrected for the noise of their average (± sqrt(total variance / R), the size of that "
        "noise). *SNR*: ‖E ĝ‖ / sqrt(total variance), with ‖E ĝ‖ from the least noisy estimator "
        f"of the same target ({_names(result.get('snr_norm_from', '?'))}).",
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
        if "snr" in sweep:
            text += ["", "SNR of the encoder's gradient against the number of particles P (= K for iwae, dreg):", ""]
            text += [f"| estimator | {head} |", "|---|" + "---:|" * len(sweep["num_particles"])]
            for name, curves in sweep["snr"].items():
                text.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in curves["encoder"]) + " |")
    return "\n".join(text) + "\n"


def _values(result: dict) -> str:
    """The minibatch's ELBO and IWAE bound (K = the particles), where measured."""
    parts = [f"minibatch ELBO {result['elbo']:.2f}" if result.get("elbo") is not None else "",
             f"IWAE bound {result['iwae_bound']:.2f}" if result.get("iwae_bound") is not None else ""]
    return ", ".join(p for p in parts if p) + " nats/image"


def _names(precise) -> str:
    if isinstance(precise, dict):
        return ", ".join(f"{name} for the {target} gradient" for target, name in precise.items())
    return str(precise)


def plot_grad_variance(result: dict):
    """Total variance against the number of particles (log-log), one line per estimator, for the
    encoder and the decoder parameters; the dotted line falls as 1/P."""
    sweep = result["sweep"]
    ps = sweep["num_particles"]
    with_snr = "snr" in sweep
    fig, axes = plt.subplots(1, 3 if with_snr else 2, figsize=(13.5 if with_snr else 9, 3.8))
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
    if with_snr:
        _plot_snr(axes[2], ps, sweep["snr"])
    fig.suptitle(f"gradient variance on one minibatch of {result['batch_size']} images, {result['repeats']} estimates")
    fig.tight_layout()
    return fig


def _plot_snr(ax, ps, snr: dict) -> None:
    """The encoder gradient's SNR against P (log-log); the dotted lines rise and fall as sqrt(P)."""
    for name, curves in snr.items():
        ax.plot(ps, curves["encoder"], marker="o", label=name)
    finite = [v for c in snr.values() for v in c["encoder"] if 0 < v < math.inf]
    if ps and finite:
        mid = math.exp(sum(math.log(v) for v in finite) / len(finite))
        ax.plot(ps, [mid * math.sqrt(p / ps[0]) for p in ps], ":", color="grey", label="∝ √P")
        ax.plot(ps, [mid * math.sqrt(ps[0] / p) for p in ps], "--", color="grey", lw=0.8, label="∝ 1/√P")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ps, [str(p) for p in ps])
    ax.set_xlabel("particles P (K of iwae, dreg)")
    ax.set_ylabel("SNR = ‖E ĝ‖ / √tr Cov ĝ")
    ax.set_title("encoder gradient's SNR")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, which="both")


def write_grad_variance(result: dict, out) -> Dict[str, Path]:
    """Write ``grad_variance.md``, ``grad_variance.json`` and (with a sweep) ``grad_variance.png``."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    paths = {"md": out / "grad_variance.md", "json": out / "grad_variance.json"}
    atomic_write(paths["md"], lambda f: f.write(format_table(result).encode()))
    write_json(paths["json"], result)
    if result["sweep"]["num_particles"]:
        paths["png"] = out / "grad_variance.png"
        fig = plot_grad_variance(result)
        atomic_write(paths["png"], lambda f: fig.savefig(f, format="png", dpi=DPI))
        plt.close(fig)
    return paths
