"""Issue 14: the flow (iaf) and full-rank guides, the learned priors (mog, vamp), q*_flow."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, VAEConfig, evaluate, fit, load_run
from pyro_vae.cli import main
from pyro_vae.core.errors import ConfigError
from pyro_vae.experiments.compare import compare_guides, table2_markdown
from pyro_vae.infer.fused import fused_available, fused_elbo_loss
from pyro_vae.infer.local import fit_local, fit_local_flow
from pyro_vae.program.guides import encode_with_context, reparameterize
from pyro_vae.program.local_flows import PerImageMADE

GUIDES = ["amortized", "iaf", "full-rank", "semi-amortized", "mean-field"]
PRIORS = ["normal", "mog", "vamp"]


def _vae(guide="iaf", prior="normal", z_dim=3, **kw):
    config = VAEConfig(guide=guide, prior=prior, z_dim=z_dim, hidden=(32,), prior_components=4, refine_steps=0, **kw)
    return VAE(config, num_data=100)


def _scramble(module, std=0.3):
    """Non-trivial flows and off-diagonals (Pyro's MADE and our full-rank head start near identity/zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def test_iaf_log_density_is_pyros_and_the_jacobians(binary_batch):
    """log q(z) from the forward pass (what training and evaluation use) equals Pyro's
    TransformedDistribution.log_prob at z (which inverts the flow), and the change of variables by
    hand: log N(z0; mu, sigma) - log |det dz/dz0| with the Jacobian from autograd."""
    vae = _vae("iaf", z_dim=3)
    _scramble(vae.inference.flows)
    x = binary_batch[:5]
    q = vae.inference.q(x)
    assert isinstance(q, dist.TransformedDistribution) and q.event_shape == (3,) and q.batch_shape == (5,)
    eps = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    z, log_q = reparameterize(q, eps)  # [4, 5, 3], [4, 5]
    fresh = vae.inference.q(x)  # new transforms: nothing cached, log_prob inverts the flow
    assert torch.allclose(log_q, fresh.log_prob(z), atol=1e-4)
    loc, scale, _ = encode_with_context(vae.inference.encoder, x)
    for i in range(5):
        def flow(e):  # base draw -> z for image i
            return reparameterize(vae.inference.q(x[i:i + 1]), e.reshape(1, 3))[0].reshape(3)

        jac = torch.autograd.functional.jacobian(flow, eps[0, i])  # dz/deps, [3, 3]
        log_det = torch.linalg.slogdet(jac)[1] - scale[i].log().sum()  # dz/dz0 = dz/deps / sigma
        base = dist.Normal(loc[i], scale[i]).log_prob(loc[i] + scale[i] * eps[0, i]).sum()
        assert log_q[0, i].item() == pytest.approx((base - log_det).item(), abs=1e-4)


def test_one_iaf_step_is_autoregressive(binary_batch):
    vae = _vae("iaf", z_dim=4, flow_steps=1)
    _scramble(vae.inference.flows)
    x = binary_batch[:1]
    jac = torch.autograd.functional.jacobian(
        lambda e: reparameterize(vae.inference.q(x), e.reshape(1, 4))[0].reshape(4), torch.randn(4))
    assert torch.allclose(jac.triu(1), torch.zeros(4, 4))  # z_j depends on eps_{<=j} only
    assert (jac.diagonal() > 0).all()


def test_full_rank_with_diagonal_scale_tril_is_the_amortized_guide(binary_batch):
    """Zero off-diagonal (its start): the same q, the same Trace_ELBO loss and encoder gradients."""
    full, diag = _vae("full-rank", z_dim=4), _vae("amortized", z_dim=4)
    diag.load_state_dict({k: v for k, v in full.state_dict().items() if "off_diagonal" not in k})
    x = binary_batch[:8]
    q_full, q_diag = full.inference.q(x), diag.inference.q(x)
    z = torch.randn(6, 8, 4)
    assert torch.allclose(q_full.log_prob(z), q_diag.log_prob(z), atol=1e-5)
    assert torch.allclose(full.inference.posterior(x)[1], diag.inference.posterior(x)[1])
    losses = []
    for vae in (full, diag):
        pyro.set_rng_seed(5)
        loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        losses.append((loss.item(), vae.inference.encoder.head.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-4)
    _scramble(full.inference.off_diagonal)  # and a real full covariance is not diagonal
    assert not torch.allclose(full.inference.q(x).log_prob(z), q_diag.log_prob(z))


def test_vamp_prior_is_the_mixture_of_the_encoders_posteriors():
    """log p(z) = logsumexp_k log q(z | u_k) - log K, by hand."""
    vae = _vae("amortized", "vamp", z_dim=3)
    z = torch.randn(7, 5, 3)  # [S, B, z_dim]
    u = vae.latent_prior.pseudo_inputs()  # [K, D]
    assert u.shape == (4, 784) and ((u > 0) & (u < 1)).all()
    loc, scale = vae.inference.encoder(u)  # [K, z_dim]
    by_hand = torch.logsumexp(
        dist.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1), dim=-1) - math.log(4)  # [S, B]
    assert torch.allclose(vae.prior(5).log_prob(z), by_hand, atol=1e-5)


def test_mog_prior_is_a_learned_mixture():
    vae = _vae("amortized", "mog", z_dim=2)
    _scramble(vae.latent_prior)
    z = torch.randn(6, 2)
    p = vae.latent_prior
    w = torch.log_softmax(p.logits, 0)
    comp = dist.Normal(p.loc, torch.nn.functional.softplus(p.raw_scale) + 1e-5).log_prob(z.unsqueeze(-2)).sum(-1)
    assert torch.allclose(vae.prior(6).log_prob(z), torch.logsumexp(w + comp, -1), atol=1e-5)
    assert {n for n, _ in vae.named_parameters() if n.startswith("latent_prior")} == {
        "latent_prior.logits", "latent_prior.loc", "latent_prior.raw_scale"}


@pytest.mark.parametrize("guide", ["iaf", "full-rank", "amortized"])
@pytest.mark.parametrize("prior", PRIORS)
def test_fused_path_equals_pyro(guide, prior, binary_batch):
    config = VAEConfig(guide=guide, prior=prior, z_dim=3, hidden=(32,), prior_components=4)
    assert fused_available(config)
    vae = VAE(config, num_data=100)
    _scramble(vae.inference)
    x, idx = binary_batch[:16], torch.arange(16)
    results = []
    for fused in (False, True):
        pyro.set_rng_seed(7)
        loss = (fused_elbo_loss(vae, x, idx, 100, beta=0.5) if fused else
                Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, idx, num_data=100, beta=0.5))
        vae.zero_grad()
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in vae.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=1e-5)
    assert len(ga) == len(gb) == len(list(vae.parameters()))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-4, atol=1e-5 * u.abs().max().item() + 1e-5)


# every pair but mean-field x vamp: the VampPrior needs an encoder (a one-line error, tested below)
@pytest.mark.parametrize("guide,prior", [(g, p) for g in GUIDES for p in PRIORS if (g, p) != ("mean-field", "vamp")])
def test_every_guide_and_prior_trains_and_evaluates(guide, prior, tmp_path):
    config = VAEConfig(guide=guide, prior=prior, z_dim=2, hidden=(16,), epochs=2, batch_size=50, limit=100,
                       val_size=20, prior_components=3, refine_steps=0)
    run = fit(config, tmp_path / "r", progress=False, log=lambda s: None)
    assert all(math.isfinite(h["train_elbo"]) for h in run.history)
    again = load_run(tmp_path / "r")
    x = torch.bernoulli(torch.full((4, 784), 0.2), generator=torch.Generator().manual_seed(0))
    a = evaluate(run, x, iwae_k=8, elbo_samples=4)
    b = evaluate(again, x, iwae_k=8, elbo_samples=4)
    assert a.iwae == b.iwae and math.isfinite(a.elbo) and a.iwae >= a.elbo - 5


def test_evaluation_of_a_flow_bounds_its_elbo(binary_batch):
    """IWAE_k with samples from the flow grows with k, above the flow's ELBO."""
    vae = _vae("iaf", z_dim=3)
    _scramble(vae.inference.flows, 0.1)
    x = binary_batch[:20]
    low, high = evaluate(vae, x, iwae_k=1, elbo_samples=200), evaluate(vae, x, iwae_k=200, elbo_samples=10)
    assert high.iwae > low.iwae and high.iwae > low.elbo
    assert (high.per_image["iwae"] > low.per_image["elbo"]).float().mean() > 0.9


def test_per_image_made_is_autoregressive_and_local_flow_fit_improves():
    made = PerImageMADE(3, 4)
    with torch.no_grad():
        made.w_out.normal_()
    x = torch.randn(3, 4)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: made(torch.cat([x[:b], v[None], x[b + 1:]]))[0][b], x[b])
        assert torch.allclose(jac.triu(), torch.zeros(4, 4)) and jac.abs().sum() > 0  # mean_j: x_{<j} only
    vae = _vae("amortized", z_dim=2)
    data = torch.bernoulli(torch.full((6, 784), 0.3), generator=torch.Generator().manual_seed(1))
    star = fit_local(vae, data, steps=30)
    flow = fit_local_flow(vae, data, star.loc, star.scale, steps=60)
    assert flow.elbo[-1] > flow.elbo[0]
    assert evaluate(vae, data, iwae_k=4, elbo_samples=4, posterior=flow.posterior, batch_size=4).n == 6


def test_compare_guides_prints_cremers_table(tmp_path):
    config = VAEConfig(z_dim=2, hidden=(32,), epochs=1, limit=200, val_size=30)
    result = compare_guides(config, ["amortized", "iaf"], limit=10, iwae_k=8, local_steps=10, star_steps=20,
                            out=tmp_path, log=lambda s: None)
    assert result["flow_steps"] == 2 and [r["family"] for r in result["guides"]] == ["FFG", "flow"]
    table = table2_markdown(result)
    for row in ("log p(x)", "L[q*_flow]", "L[q*_FFG]", "L[q]", "approximation gap", "amortization gap"):
        assert f"| {row} |" in table
    for r in result["guides"]:
        star = r["elbo_flow"] if r["family"] == "flow" else r["elbo_star"]
        assert r["approximation_gap"] == pytest.approx(r["iwae"] - star, abs=1e-6)
        assert r["amortization_gap"] == pytest.approx(star - r["elbo"], abs=1e-6)
    assert "L[q*_flow]" in (tmp_path / "comparison.md").read_text()


@pytest.mark.parametrize("settings, message", [
    (dict(guide="iaf", flow_steps=0), "flow_steps must be >= 1"),
    (dict(prior="mog", prior_components=0), "prior_components must be a positive integer"),
    (dict(prior="vamp", guide="mean-field"), "the mean-field guide has no encoder"),
    (dict(prior="mog", elbo="meanfield"), "elbo=meanfield needs KL(q || p) in closed form"),
    (dict(guide="iaf", elbo="meanfield"), "elbo=meanfield needs KL(q || p) in closed form"),
    (dict(guide="semi-amortized", prior="vamp"), "semi-amortized refinement uses the analytic KL"),
])
def test_bad_settings_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        VAEConfig(**settings)


@pytest.mark.parametrize("args, message", [
    (["--guide", "iaf", "--flow-steps", "0"], "flow_steps must be >= 1"),
    (["--prior", "mog", "--prior-components", "0"], "prior_components must be a positive integer"),
    (["--prior", "vamp", "--guide", "mean-field"], "the mean-field guide has no encoder"),
])
def test_bad_settings_give_one_line_cli_errors(args, message, tmp_path, capsys):
    code = main(["train", "--limit", "50", "--val-size", "10", "--epochs", "1", "--quiet", "--out",
                 str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("pyro-vae: error:") and message in err and err.count("\n") == 1


def test_resume_with_a_flow_and_a_learned_prior_equals_uninterrupted(tmp_path):
    config = VAEConfig(guide="iaf", prior="vamp", prior_components=3, z_dim=2, hidden=(16,), epochs=2, batch_size=50,
                       limit=150, val_size=20)
    straight = fit(config, tmp_path / "a", progress=False, log=lambda s: None)
    fit(config.replace(epochs=1), tmp_path / "b", progress=False, log=lambda s: None)
    resumed = fit(config, tmp_path / "b", progress=False, resume=True, log=lambda s: None)
    a, b = straight.vae.state_dict(), resumed.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_elbo"] for h in straight.history] == [h["train_elbo"] for h in resumed.history]


def test_torchrun_two_processes_equal_one_with_twice_the_batch(tmp_path):
    """The flow guide with a learned prior under torchrun: each rank pushes its rows of the global
    batch's noise through its flows (``noise_rows``), so 2 x 20 images == 1 x 40."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1")
    args = ["train", "--limit", "120", "--val-size", "30", "--hidden", "16", "--z-dim", "2", "--epochs", "1", "--quiet",
            "--guide", "iaf", "--refine-steps", "0", "--prior", "mog", "--prior-components", "3"]
    one = subprocess.run([sys.executable, "-m", "pyro_vae", *args, "--batch-size", "40", "--out", "one"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "pyro_vae", *args, "--batch-size", "20",
                          "--out", "two"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stdout + two.stderr
    a = load_run(tmp_path / "one").vae.state_dict()
    b = load_run(tmp_path / "two").vae.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4) for k in a), "parameters differ"
    h1, h2 = (json.loads((tmp_path / n / "history.json").read_text()) for n in ("one", "two"))
    assert h2[0]["train_elbo"] == pytest.approx(h1[0]["train_elbo"], rel=1e-5)


def test_a_per_image_copy_of_the_iaf_guide_is_its_q(binary_batch):
    """q*_flow of an iaf guide starts at the guide's own q: the per-image networks with the context
    folded into the biases give the same samples and log-densities."""
    from pyro_vae.infer.local import encoder_gaussian
    from pyro_vae.program.local_flows import LocalFlowGuide

    vae = _vae("iaf", z_dim=3)
    _scramble(vae.inference.flows)
    x = binary_batch[:6]
    copy = LocalFlowGuide.from_guide(vae.inference, x)
    eps = torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z, log_q = reparameterize(vae.inference.q(x), eps)
        z2, log_q2 = reparameterize(copy.q(x), eps)
        z3, _ = reparameterize(copy.q(x, torch.tensor([1, 4])), eps[:, [1, 4]])
    assert torch.allclose(z, z2, atol=1e-4) and torch.allclose(log_q, log_q2, atol=1e-3)
    assert torch.allclose(z3, z[:, [1, 4]], atol=1e-4)
    loc, scale = encoder_gaussian(vae, x, samples=4000)  # a Gaussian with q's moments, not the base's
    draws = vae.inference.q(x).sample((4000,))
    assert torch.allclose(loc, draws.mean(0), atol=0.1) and torch.allclose(scale, draws.std(0), rtol=0.1)
