"""Burda et al.'s two-stochastic-layer program (``--model vae2``, pyro_vae.program.vae2): its sites,
its ELBO against a hand-written PyTorch twin, training through ``fit`` and scoring with ``evaluate``."""

import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.nn import functional as F

from pyro_vae import VAEConfig, fit, load_run
from pyro_vae.cli import main
from pyro_vae.infer.evaluate import evaluate
from pyro_vae.program.contract import check_program
from pyro_vae.program.vae2 import TwoLayerVAE

D = 12  # pixels of the synthetic images


def _images(n, seed=0):
    """``n`` binary images of ``D`` pixels: two prototypes with 10% of the pixels flipped."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.bernoulli(torch.full((2, D), 0.5), generator=g)
    flips = torch.bernoulli(torch.full((n, D), 0.1), generator=g)
    return (prototypes[torch.arange(n) % 2] + flips) % 2


def _config(**kw):
    settings = dict(model="vae2", epochs=3, batch_size=16, lr=3e-3, kl_warmup=0, seed=0, val_size=0)
    return VAEConfig(**{**settings, **kw})


def test_sites_z2_z1_x_in_the_data_plate():
    program, x = TwoLayerVAE((D,)), _images(5)
    check_program(program, x, reparameterized=True)
    guide = poutine.trace(program.guide).get_trace(x)
    model = poutine.trace(poutine.replay(program.model, trace=guide)).get_trace(x)
    latent = lambda trace: [n for n, s in trace.nodes.items()  # noqa: E731
                            if s["type"] == "sample" and not s["is_observed"] and n in ("z1", "z2", "x")]
    assert latent(guide) == ["z1", "z2"] and latent(model) == ["z2", "z1"]
    assert model.nodes["x"]["is_observed"] and program.latent_sites == ("z1", "z2")
    for trace, names in ((guide, ("z1", "z2")), (model, ("z2", "z1", "x"))):
        for name in names:
            site = trace.nodes[name]
            assert [f.name for f in site["cond_indep_stack"]] == ["data"]
            assert site["fn"].batch_shape == (5,)
    assert model.nodes["z1"]["value"].shape == (5, 100) and model.nodes["z2"]["value"].shape == (5, 50)


def _twin_log_weights(program, x, eps1, eps2):
    """log p(x, z1, z2) - log q(z1, z2 | x) per image, by hand with the program's weights,
    at z1 = loc + scale * eps1 (q(z1|x)), z2 = loc + scale * eps2 (q(z2|z1))."""
    def gaussian(layer, h):
        loc, raw = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(h, *w(layer.body[0]))), *w(layer.body[2]))),
                            *w(layer.head)).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-5

    def w(linear):
        return linear.weight, linear.bias

    def log_normal(z, loc, scale):
        return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    loc1, scale1 = gaussian(program.q_z1, x)
    z1 = loc1 + scale1 * eps1
    loc2, scale2 = gaussian(program.q_z2, z1)
    z2 = loc2 + scale2 * eps2
    body = program.p_x[0]
    logits = F.linear(torch.tanh(F.linear(torch.tanh(F.linear(z1, *w(body[0]))), *w(body[2]))), *w(program.p_x[1]))
    log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    log_pz2 = log_normal(z2, torch.zeros_like(z2), torch.ones_like(z2))
    return log_px + log_normal(z1, *gaussian(program.p_z1, z2)) + log_pz2 - log_normal(z1, loc1, scale1) \
        - log_normal(z2, loc2, scale2)


def test_elbo_equals_a_hand_written_twin_on_the_same_draw():
    """Pyro's Trace_ELBO on model/guide and the ELBO written out in tensor code agree, value and
    gradient, at the same weights and the same epsilon (double precision)."""
    torch.manual_seed(0)
    program, x = TwoLayerVAE((D,)).double(), _images(6).double()
    torch.manual_seed(1)
    loss = Trace_ELBO().differentiable_loss(program.model, program.guide, x, None, num_data=30)
    grads = torch.autograd.grad(loss, list(program.parameters()))
    torch.manual_seed(1)
    trace = poutine.trace(program.guide).get_trace(x, None, num_data=30)
    eps1, eps2 = [((trace.nodes[s]["value"] - trace.nodes[s]["fn"].base_dist.loc) / trace.nodes[s]["fn"].base_dist.scale)
                  .detach() for s in ("z1", "z2")]
    twin = -_twin_log_weights(program, x, eps1, eps2).sum() * (30 / 6)  # the plate's N / B
    assert abs(loss.item() - twin.item()) < 1e-4
    for g, h in zip(grads, torch.autograd.grad(twin, list(program.parameters()))):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-8)


def test_fit_trains_resumes_and_evaluate_scores_both_layers(tmp_path):
    x = _images(64)
    run = fit(_config(epochs=4), tmp_path / "run", train_data=x, progress=False, log=lambda s: None)
    elbos = [h["train_elbo"] for h in run.history]
    assert elbos[-1] > elbos[0] + 1.0, elbos
    assert isinstance(run.vae, TwoLayerVAE)
    first = fit(_config(epochs=2), tmp_path / "resumed", train_data=x, progress=False, log=lambda s: None)
    resumed = fit(_config(epochs=4), tmp_path / "resumed", train_data=x, progress=False, log=lambda s: None,
                  resume=True)
    assert len(first.history) == 2
    for a, b in zip(run.vae.parameters(), resumed.vae.parameters()):
        assert torch.equal(a, b)
    ev = evaluate(load_run(tmp_path / "run"), _images(20, seed=1), iwae_k=64, elbo_samples=16, seed=0)
    assert math.isfinite(ev.elbo) and ev.iwae >= ev.elbo
    assert set(ev.active_units_by_site) == {"z1", "z2"}


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_importance_weighted_objectives_train(objective):
    run = fit(_config(objective=objective, num_particles=3), train_data=_images(64), progress=False,
              log=lambda s: None)
    elbos = [h["train_elbo"] for h in run.history]
    assert all(math.isfinite(e) for e in elbos) and elbos[-1] > elbos[0], elbos


def test_cli_trains_and_evaluates_model_vae2(tmp_path, capsys):
    """``pyro-vae train --model vae2`` draws the generic figures; ``evaluate`` reports both layers."""
    out = str(tmp_path / "r")
    assert main(["train", "--model", "vae2", "--limit", "100", "--val-size", "50", "--epochs", "1",
                 "--batch-size", "50", "--out", out, "--quiet"]) == 0
    assert {"samples.png", "reconstructions.png", "elbo.png"} <= {p.name for p in (tmp_path / "r").iterdir()}
    capsys.readouterr()
    assert main(["evaluate", out, "--iwae-k", "20", "--limit", "20"]) == 0
    text = capsys.readouterr().out
    assert "site z1" in text and "site z2" in text and "of 150" in text
