r"""Mean-field vs amortized vs semi-amortized inference, and the gaps each leaves
(``pyro-vae compare-guides``).

For each trained decoder :math:`\theta` and held-out images, Cremer, Li & Duvenaud (2018) split
the distance between the true log-likelihood and the guide's ELBO into two gaps:

.. math::

    \log p_\theta(x) - \mathrm{ELBO}[q]
    = \underbrace{\log p_\theta(x) - \mathrm{ELBO}[q^\star]}_{\text{approximation gap}}
    + \underbrace{\mathrm{ELBO}[q^\star] - \mathrm{ELBO}[q]}_{\text{amortization gap}}

where :math:`q^\star` is the best Gaussian for each image (:func:`~pyro_vae.local.fit_local` run to
convergence) and :math:`\log p_\theta(x)` is estimated by the IWAE bound with many samples drawn
from :math:`q^\star`. The approximation gap is the price of the Gaussian family; the amortization
gap is the price of predicting :math:`\lambda_i` with one network instead of optimising it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..core.config import GUIDES, VAEConfig
from ..infer.fused import NON_DIAGONAL
from ..core.data import eval_binarized, load_splits
from ..core.errors import ConfigError
from ..core.rundir import atomic_write, write_json
from ..infer.cache import digest, remember
from ..infer.evaluate import evaluate
from ..infer.local import LocalFit, fit_local, fit_local_flow
from ..program.guides import IAFGuide
from ..program.local_flows import LocalFlowGuide
from ..infer.run import Run, load_run
from ..infer.svi import fit

__all__ = ["GuideReport", "compare_guides", "QUICK", "DEFAULT_GUIDES", "table2_markdown"]

#: the guides compare-guides trains by default (the diagonal Gaussians; add iaf, full-rank by name)
DEFAULT_GUIDES = ("amortized", "mean-field", "semi-amortized")

# --quick: sizes for tests and notebooks (about a minute on 2 cores)
QUICK = dict(epochs=5, train_limit=1000, limit=100, iwae_k=100, local_steps=200, star_steps=200)


@dataclass
class GuideReport:
    """One row of the comparison (all values in nats per image, on the held-out images)."""

    guide: str
    train_seconds: Optional[float]  # None when an existing run folder was given
    elbo: float  # ELBO[q]: the guide's own posterior
    elbo_se: float
    elbo_star: float  # ELBO[q*]: best Gaussian per image
    elbo_star_se: float
    iwae: float  # log p^(x): IWAE bound, k samples from q*
    iwae_se: float
    approximation_gap: float  # iwae - elbo_star
    approximation_gap_se: float
    amortization_gap: float  # elbo_star - elbo
    amortization_gap_se: float
    n: int
    iwae_k: int
    # with the local flow (Cremer et al.'s full Table 2): L[q*_flow], and which q* the gaps use
    elbo_flow: Optional[float] = None  # ELBO[q*_flow]: best flow per image
    elbo_flow_se: Optional[float] = None
    family: str = "FFG"  # q* of the gaps: FFG (diagonal Gaussian) | flow (iaf and full-rank guides, with flow)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.elbo_flow is None:  # without the local flow: the comparison's original keys only
            for key in ("elbo_flow", "elbo_flow_se", "family"):
                d.pop(key)
        return d


def _posterior_from(fit: LocalFit):
    return lambda x, idx: (fit.loc[idx], fit.scale[idx])


def _paired(a: torch.Tensor, b: torch.Tensor):
    """Mean and standard error of the per-image difference ``a - b``."""
    d = (a - b).double()
    return d.mean().item(), (d.std(unbiased=True) / math.sqrt(len(d))).item() if len(d) > 1 else float("nan")


def gap_report(run: Run, x: torch.Tensor, *, iwae_k: int, local_steps: int, star_steps: int, seed: int = 0,
               train_seconds: Optional[float] = None, progress: bool = False, flow_steps: Optional[int] = None):
    r"""Evaluate one trained run on held-out images ``x``; return ``(GuideReport, curves)``.

    ``flow_steps``: also fit :math:`q^\star_{\text{flow}}` (a flow of ``flow_steps`` IAF steps per
    image, :func:`~pyro_vae.infer.local.fit_local_flow`, ``star_steps`` steps, started at
    :math:`q^\star_{\text{FFG}}`, or for an ``iaf`` guide at its own q copied per image, so that
    :math:`\mathcal{L}[q^\star_{\text{flow}}] \ge \mathcal{L}[q]` up to the fit's noise); then
    log p(x) is the IWAE bound with ``iwae_k`` samples from it, and the gaps of a non-diagonal
    guide (``iaf``, ``full-rank``) are measured with it (Cremer et al.'s flow column)."""
    vae = run.vae
    amortized = vae.inference.amortized
    if amortized:  # the guide's own q: its encoder (semi-amortized: refined) output
        own = evaluate(run, x, iwae_k=1, elbo_samples=20, seed=seed, progress=progress)
    else:  # mean-field on new images: its own recipe, a local fit of `local_steps` from the prior
        q_own = fit_local(run, x, steps=local_steps, init="zero", lr=5e-2, seed=seed)
        own = evaluate(run, x, iwae_k=1, elbo_samples=20, seed=seed, posterior=_posterior_from(q_own))
    star = fit_local(run, x, steps=star_steps, init="encoder" if amortized else "zero",
                     lr=1e-2 if amortized else 5e-2, seed=seed)
    best = evaluate(run, x, iwae_k=iwae_k if flow_steps is None else 1, elbo_samples=20, seed=seed,
                    posterior=_posterior_from(star), progress=progress)
    flow = None
    if flow_steps is not None:  # an iaf guide's q*_flow starts at its own q, any other at q*_FFG
        start = LocalFlowGuide.from_guide(vae.inference, x) if isinstance(vae.inference, IAFGuide) else None
        fitted = fit_local_flow(run, x, star.loc, star.scale, steps=star_steps, flow_steps=flow_steps, seed=seed,
                                start=start)
        flow = evaluate(run, x, iwae_k=iwae_k, elbo_samples=20, seed=seed, posterior=fitted.posterior,
                        progress=progress)
    return _report(run, own, best, flow, train_seconds, len(x), iwae_k), star


def _report(run: Run, own, best, flow, train_seconds, n: int, iwae_k: int) -> GuideReport:
    """The row of one guide from the evaluations of q, q*_FFG and (or None) q*_flow."""
    family = "flow" if flow is not None and not getattr(run.vae.inference, "diagonal", True) else "FFG"
    star = flow if family == "flow" else best  # the q* of this guide's family
    log_p = (flow if flow is not None else best).per_image["iwae"]
    approx, approx_se = _paired(log_p, star.per_image["elbo"])
    amort, amort_se = _paired(star.per_image["elbo"], own.per_image["elbo"])
    extra = {} if flow is None else dict(elbo_flow=flow.elbo, elbo_flow_se=flow.elbo_se, family=family)
    return GuideReport(
        guide=run.config.guide, train_seconds=train_seconds,
        elbo=own.elbo, elbo_se=own.elbo_se, elbo_star=best.elbo, elbo_star_se=best.elbo_se,
        iwae=log_p.double().mean().item(), iwae_se=(flow if flow is not None else best).iwae_se,
        approximation_gap=approx, approximation_gap_se=approx_se,
        amortization_gap=amort, amortization_gap_se=amort_se, n=n, iwae_k=iwae_k, **extra,
    )


def local_fit_curves(run: Run, x: torch.Tensor, steps: int, seed: int = 0) -> Dict[str, LocalFit]:
    """Held-out ELBO vs local optimisation step, from the prior and (if any) from the encoder."""
    curves = {"zero init": fit_local(run, x, steps=steps, init="zero", lr=5e-2, seed=seed)}
    if run.vae.inference.amortized:
        curves["encoder init"] = fit_local(run, x, steps=steps, init="encoder", lr=1e-2, seed=seed)
    return curves


def plot_local_fit(curves: Dict[str, dict], amortized_elbo: Optional[float], title: str):
    """The local-fit curves (``{name: {"steps": [...], "elbo": [...]}}``, as in the result of
    :func:`compare_guides`) with the encoder's ELBO as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot(c["steps"], c["elbo"], label=f"local fit, {name}")
    if amortized_elbo is not None:
        ax.axhline(amortized_elbo, color="k", ls="--", lw=1, label="amortized encoder")
    ax.set_xlabel("local optimisation step (Adam)")
    ax.set_ylabel("held-out ELBO (nats / image)")
    lows = [min(c["elbo"][len(c["elbo"]) // 10:]) for c in curves.values()]  # skip the first, steep steps
    ax.set_ylim(bottom=min(lows + ([amortized_elbo] if amortized_elbo is not None else [])) - 5)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def compare_guides(
    config: VAEConfig,
    guides: Sequence[str] = DEFAULT_GUIDES,
    *,
    runs: Optional[Sequence] = None,
    limit: int = 500,
    iwae_k: int = 1000,
    local_steps: int = 300,
    star_steps: int = 1000,
    out=None,
    progress: bool = False,
    log=print,
    cache=False,
    local_flow: Optional[bool] = None,
) -> dict:
    r"""Train one VAE per guide on the same data, split and seed (or load ``runs``), then report
    ELBO[q], ELBO[q*], IWAE and the two gaps on ``limit`` validation images.

    Writes ``comparison.md``, ``comparison.json`` and ``local_fit.png`` into ``out`` if given.
    With ``cache`` (``True`` or a cache folder, see :mod:`pyro_vae.infer.cache`) each guide's run
    comes from the run cache (``fit(..., cache=True)``; its ``train s`` is the training time its
    history records) and so does the evaluation, keyed by the runs' parameters, the images and
    every setting: a second call with the same settings trains and evaluates nothing.

    ``local_flow`` (default: on when a guide is ``iaf`` or ``full-rank``): also fit a flow of
    ``config.flow_steps`` IAF steps per image, :math:`q^\star_{\text{flow}}`, and report Cremer,
    Li & Duvenaud (2018)'s Table 2: log p(x), L[q*_flow], L[q*_FFG], L[q] and both gaps.
    """
    bad = [g for g in guides if g not in GUIDES]
    if bad:
        raise ConfigError(f"unknown guide(s) {', '.join(bad)}; choose from {', '.join(GUIDES)}")
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    trained = _trained_runs(config, guides, runs, out, progress, log, cache)
    _, val = load_splits(trained[0][0].config)
    if val is None:
        raise ConfigError("compare-guides needs held-out images: use a val_size > 0")
    x = eval_binarized(val)[:limit]
    settings = dict(iwae_k=iwae_k, local_steps=local_steps, star_steps=star_steps)
    if local_flow is None:
        local_flow = any(r.config.guide in NON_DIAGONAL for r, _ in trained)
    if local_flow:  # (only then in the cache key: earlier comparisons keep theirs)
        settings["flow_steps"] = trained[0][0].config.flow_steps
    measure = lambda: _measure(trained, x, val, progress=progress, log=log, **settings)  # noqa: E731
    if cache:
        key = dict(settings, images=digest(x), dataset=val.name, split=val.split, binarize=val.binarize,
                   runs=[[r.config.guide, r.config.epochs, digest(r.vae)] for r, _ in trained])
        result = remember("compare-guides", key, measure, root=cache, log=log)
    else:
        result = measure()
    if out is not None:
        _write_comparison(result, out)
    return result


def _trained_runs(config, guides, runs, out, progress, log, cache) -> List[tuple]:
    """``[(run, training seconds or None)]``: ``runs`` loaded, or one run per guide trained (or
    loaded from the run cache)."""
    if runs:
        return [(load_run(r), None) for r in runs]
    trained = []
    for guide in guides:
        start = time.perf_counter()
        if cache:
            run = fit(config.replace(guide=guide), progress=progress, log=lambda s: None, cache=cache)
            seconds = sum(h.get("seconds", 0.0) for h in run.history)  # the training's, not the loading's
        else:
            run = fit(config.replace(guide=guide), out / guide if out is not None else None,
                      progress=progress, overwrite=True, log=lambda s: None)
            seconds = time.perf_counter() - start
        trained.append((run, seconds))
        log(f"trained {guide} in {seconds:.0f}s" + (f" (run cache: {run.path})" if cache else ""))
    return trained


def _measure(trained, x, val, *, iwae_k, local_steps, star_steps, progress, log, flow_steps=None) -> dict:
    """The gap reports of the trained runs on ``x`` and the local-fit curves, as a JSON-ready dict."""
    reports = []
    for run, seconds in trained:
        report, _ = gap_report(run, x, iwae_k=iwae_k, local_steps=local_steps, star_steps=star_steps,
                               train_seconds=seconds, progress=progress, flow_steps=flow_steps)
        reports.append(report)
        log(f"evaluated {report.guide}: ELBO {report.elbo:.2f}, IWAE {report.iwae:.2f}")
    reference = next((r for r, _ in trained if r.vae.inference.amortized), trained[0][0])
    curves = local_fit_curves(reference, x, steps=star_steps)
    return {
        "dataset": val.name,
        "split": val.split,
        "binarize": val.binarize,
        "n": len(x),
        "iwae_k": iwae_k,
        "local_steps": local_steps,
        "star_steps": star_steps,
        "epochs": trained[0][0].config.epochs,
        "guides": [r.to_dict() for r in reports],
        "local_fit": {name: {"steps": c.steps, "elbo": c.elbo} for name, c in curves.items()},
        "local_fit_decoder": reference.config.guide,
        "local_fit_amortized": bool(reference.vae.inference.amortized),
        **({} if flow_steps is None else {"flow_steps": flow_steps}),
    }


def _write_comparison(result: dict, out: Path) -> None:
    """``comparison.json``, ``comparison.md`` and ``local_fit.png`` into ``out``."""
    write_json(out / "comparison.json", result)
    atomic_write(out / "comparison.md", lambda f: f.write(to_markdown(result).encode()))
    decoder = result["local_fit_decoder"]
    own = next((r["elbo"] for r in result["guides"] if r["guide"] == decoder), None)
    fig = plot_local_fit(result["local_fit"], own if result.get("local_fit_amortized", True) else None,
                         f"held-out local fit, {decoder} decoder")
    atomic_write(out / "local_fit.png", lambda f: fig.savefig(f, format="png", dpi=80))
    import matplotlib.pyplot as plt

    plt.close(fig)


def to_markdown(result: dict) -> str:
    lines = [
        f"Guide comparison on {result['dataset']} {result['split']} ({result['n']} images, "
        f"binarize={result['binarize']}), nats per image ± standard error over images. "
        f"log p(x) is the IWAE bound with k = {result['iwae_k']} samples from q*; q* is a local fit of "
        f"{result['star_steps']} Adam steps; {result['epochs']} training epochs per guide.",
        "",
        "| guide | train s | ELBO[q] | ELBO[q*] | log p(x) (IWAE) | approximation gap | amortization gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["guides"]:
        secs = "—" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        lines.append(
            f"| {r['guide']} | {secs} | {r['elbo']:.2f} ± {r['elbo_se']:.2f} | {r['elbo_star']:.2f} ± {r['elbo_star_se']:.2f} "
            f"| {r['iwae']:.2f} ± {r['iwae_se']:.2f} | {r['approximation_gap']:.2f} ± {r['approximation_gap_se']:.2f} "
            f"| {r['amortization_gap']:.2f} ± {r['amortization_gap_se']:.2f} |"
        )
    if "flow_steps" in result:
        lines += ["", table2_markdown(result)]
    return "\n".join(lines) + "\n"


#: the rows of Cremer, Li & Duvenaud (2018)'s Table 2: (label, value key, standard-error key)
TABLE2_ROWS = (
    ("log p(x)", "iwae", "iwae_se"),
    ("L[q*_flow]", "elbo_flow", "elbo_flow_se"),
    ("L[q*_FFG]", "elbo_star", "elbo_star_se"),
    ("L[q]", "elbo", "elbo_se"),
    ("approximation gap", "approximation_gap", "approximation_gap_se"),
    ("amortization gap", "amortization_gap", "amortization_gap_se"),
)


def table2_markdown(result: dict) -> str:
    """Cremer et al.'s Table 2, one column per guide: log p(x) (IWAE, k samples from q*_flow),
    L[q*_flow], L[q*_FFG], L[q], the gaps (paired standard errors) against the q* of the guide's
    own family (its column header: FFG or flow)."""
    guides = result["guides"]
    head = " | ".join(f"{r['guide']} (q* {r['family']})" for r in guides)
    lines = [
        f"Cremer et al. (2018) Table 2 layout: log p(x) is the IWAE bound with k = {result['iwae_k']} samples "
        f"from q*_flow ({result['flow_steps']} IAF steps per image, {result['star_steps']} Adam steps from q*_FFG, "
        "for an iaf guide from its own q); gaps ± paired standard errors over images.",
        "",
        f"| | {head} |",
        "|---|" + "---|" * len(guides),
    ]
    for label, key, se in TABLE2_ROWS:
        cells = " | ".join(f"{r[key]:.2f} ± {r[se]:.2f}" for r in guides)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


