"""Reparameterization vs score-function gradients: both unbiased (checked against the gradient of
an exact ELBO), the score function far noisier, variance ~ 1/P; training with either; the lab."""

import json
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_vae import VAE, VAEConfig, fit, load_run
from pyro_vae.cli import main
from pyro_vae.core.errors import ConfigError
from pyro_vae.experiments.variance_lab import gradient_moments, gradient_variance, parameter_groups
from pyro_vae.infer.estimators import DifferentiableTraceGraph_ELBO, estimator_mode
from pyro_vae.program.sites import set_estimator
from pyro_vae.infer.objectives import elbo_per_image, make_elbo

X_DIM, Z_DIM = 10, 2


class LinearGaussianDecoder(nn.Module):
    """p(x|z) = N(W z + b, diag sigma^2): E_q[log p(x|z)] is closed-form for a Gaussian q."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(Z_DIM, X_DIM)
        self.log_scale = nn.Parameter(torch.full((X_DIM,), -0.3))

    def forward(self, z):
        loc = self.linear(z)
        return loc, self.log_scale.exp().expand_as(loc)


def exact_elbo(vae, x):
    """Mean ELBO per image, with no Monte Carlo: expected log-likelihood + analytic KL."""
    loc, scale = vae.inference.posterior(x)  # [B, d]
    w, b = vae.decoder.linear.weight, vae.decoder.linear.bias  # [D, d], [D]
    sigma2 = (2 * vae.decoder.log_scale).exp()  # [D]
    mean_sq = (x - loc @ w.T - b) ** 2 + scale.square() @ w.square().T  # E_q[(x - W z - b)^2], [B, D]
    loglik = -0.5 * (mean_sq / sigma2 + sigma2.log() + math.log(2 * math.pi)).sum(-1)
    kl = 0.5 * (loc.square() + scale.square() - 1 - 2 * scale.log()).sum(-1)
    return (loglik - kl).mean()


@pytest.fixture
def linear_vae():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(z_dim=Z_DIM, hidden=(8,), likelihood="normal", event_shape=(X_DIM,)))
    vae.decoder = LinearGaussianDecoder()
    w = torch.randn(X_DIM, Z_DIM, generator=torch.Generator().manual_seed(1))
    x = torch.randn(12, Z_DIM, generator=torch.Generator().manual_seed(2)) @ w.T
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # [12, 10]
    set_estimator(vae.inference, "score", "neural", x_dim=X_DIM)  # adds a baseline network...
    with torch.no_grad():
        vae.inference.baseline_net.net[-1].bias.fill_(-30.0)  # ...deliberately a poor one
    set_estimator(vae.inference, "reparam")
    return vae, x


def _exact_gradient(vae, x):
    params = [p for ps in parameter_groups(vae).values() for p in ps]
    grads = torch.autograd.grad(exact_elbo(vae, x), params)
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _z(m, exact):
    """|mean - exact| in standard errors, per parameter (a deterministic estimator: se = 0)."""
    return (m.mean - exact).abs() / m.standard_error().clamp_min(1e-9)


def test_both_estimators_are_unbiased_against_an_exact_elbo(linear_vae):
    vae, x = linear_vae
    exact = _exact_gradient(vae, x)
    names = ["reparam", "score", "score+baseline", "score+neural"]
    moments = {n: gradient_moments(vae, x, n, repeats=200, num_particles=8, warmup=20, seed=1) for n in names}
    for name, m in moments.items():
        assert m.mean.shape == exact.shape
        # one test per parameter (~170): under unbiasedness max |z| is ~3.5; 5 is a 1-in-3000 event
        assert _z(m, exact).max() < 5, name
    assert moments["reparam"].elbo == pytest.approx(exact_elbo(vae, x).item(), abs=0.5)
    for name in names[1:]:  # the estimators agree with each other
        a, b = moments["reparam"], moments[name]
        z = (a.mean - b.mean).abs() / (a.var / a.repeats + b.var / b.repeats).sqrt()
        assert z.max() < 5, name
    # the same check catches a biased estimator: TraceMeanField_ELBO on a score-function site has
    # no score term for the reconstruction, so the encoder gets only the analytic KL's gradient
    biased = TraceMeanField_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    with pyro.validation_enabled(False):  # (validation refuses exactly this)
        m = gradient_moments(vae, x, "score", repeats=50, num_particles=8, elbo=biased)
    assert _z(m, exact)[m.groups["encoder"]].max() > 20
    assert _z(m, exact)[m.groups["decoder"]].max() < 5  # the decoder's gradient is still right


def test_score_variance_exceeds_reparam_on_a_trained_model(small_train):
    run = fit(VAEConfig(z_dim=4, hidden=(64,), epochs=3, limit=500, val_size=100), progress=False, log=lambda s: None)
    x = torch.bernoulli(small_train.images[:32], generator=torch.Generator().manual_seed(0))
    result = gradient_variance(run, x, ("reparam", "score", "score+baseline"), repeats=20, sweep=(), warmup=30)
    table = result["estimators"]
    assert table["reparam"]["encoder"]["variance_ratio"] == 1.0
    assert table["score"]["encoder"]["variance_ratio"] > 1000  # orders of magnitude
    assert 1 < table["score+baseline"]["encoder"]["variance_ratio"] < table["score"]["encoder"]["variance_ratio"] / 100
    for name in ("score", "score+baseline"):  # the decoder's gradient does not depend on the estimator
        assert 0.5 < table[name]["decoder"]["variance_ratio"] < 2
    assert table["reparam"]["encoder"]["snr"] > 10 * table["score"]["encoder"]["snr"]
    total = table["score"]["total"]["total_variance"]
    parts = table["score"]["encoder"]["total_variance"] + table["score"]["decoder"]["total_variance"]
    assert total == pytest.approx(parts)


def test_variance_falls_as_one_over_particles(binary_batch):
    vae = VAE(VAEConfig(z_dim=4, hidden=(32,)))
    result = gradient_variance(vae, binary_batch[:16], ("reparam", "score"), repeats=30, sweep=(1, 4, 16))
    ps = torch.tensor(result["sweep"]["num_particles"], dtype=torch.float64).log()
    for name, curves in result["sweep"]["total_variance"].items():
        for group in ("encoder", "decoder"):
            v = torch.tensor(curves[group], dtype=torch.float64).log()
            slope = ((ps - ps.mean()) * (v - v.mean())).sum() / (ps - ps.mean()).square().sum()
            assert -1.3 < slope < -0.7, (name, group, curves[group])


def test_score_guide_site_is_not_reparameterized_where_gradients_are_on(binary_batch):
    vae = VAE(VAEConfig(z_dim=3, hidden=(16,), estimator="score", baseline="decaying-avg"))
    x = binary_batch[:5]
    tr = pyro.poutine.trace(vae.guide).get_trace(x)
    site = tr.nodes["z"]
    assert not site["fn"].has_rsample and not site["value"].requires_grad
    assert site["infer"]["baseline"]["use_decaying_avg_baseline"]
    with torch.no_grad():  # evaluation: no gradient, so nothing to estimate (validation passes)
        assert pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["fn"].has_rsample
    assert math.isfinite(elbo_per_image(vae, x))
    with estimator_mode(vae.inference, "reparam"):
        assert pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].requires_grad
    assert vae.inference.estimator == "score"
    # vectorised particles expand the site; it stays a score-function site
    loss = make_elbo(vae.config.replace(num_particles=3)).differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and loss.requires_grad


def test_tracegraph_loss_is_the_elbo_and_keeps_one_average_per_batch_size(binary_batch):
    vae = VAE(VAEConfig(z_dim=3, hidden=(16,), estimator="score", baseline="decaying-avg"))
    elbo = DifferentiableTraceGraph_ELBO(max_plate_nesting=1)
    x = binary_batch
    pyro.set_rng_seed(4)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    assert loss.item() == pytest.approx(Trace_ELBO().loss(vae.model, vae.guide, x), rel=1e-6)
    store = pyro.get_param_store()
    assert store["__baseline_avg_downstream_cost_z"].shape == (32,)
    elbo.differentiable_loss(vae.model, vae.guide, x[:7])  # a last, smaller minibatch
    assert store["__baseline_avg_downstream_cost_z"].shape == (7,)
    parked = store["__baseline_avg_downstream_cost_z@32"].clone()
    assert parked.abs().sum() > 0
    elbo.differentiable_loss(vae.model, vae.guide, x)
    assert store["__baseline_avg_downstream_cost_z"].shape == (32,)
    assert "__baseline_avg_downstream_cost_z@7" in store


@pytest.mark.parametrize("baseline", ["none", "decaying-avg", "neural"])
def test_score_function_training_learns(baseline, tmp_path):
    config = VAEConfig(
        z_dim=4, hidden=(64,), epochs=2, limit=500, val_size=100, estimator="score", baseline=baseline, validate=True
    )
    pyro.set_rng_seed(config.seed)
    init = VAE(config)  # the parameters fit starts from
    run = fit(config, out=tmp_path / "run", progress=False, log=lambda s: None)  # 500 = 3 x 128 + 116
    vals = [h["val_elbo"] for h in run.history]
    assert all(math.isfinite(v) for v in vals) and vals[-1] > vals[0] + 20
    loaded = load_run(tmp_path / "run")
    assert (loaded.vae.inference.estimator, loaded.vae.inference.baseline) == ("score", baseline)
    encoder = run.vae.inference.encoder.head.weight
    assert not torch.equal(encoder, init.inference.encoder.head.weight)
    if baseline == "neural":  # trained by its own loss, saved and loaded with the guide
        net = run.vae.inference.baseline_net
        assert not torch.equal(net.net[-1].weight, init.inference.baseline_net.net[-1].weight)
        assert torch.equal(loaded.vae.inference.baseline_net.net[-1].weight, net.net[-1].weight)


def test_config_refuses_impossible_combinations():
    with pytest.raises(ConfigError, match="estimator must be one of"):
        VAEConfig(estimator="pathwise")
    with pytest.raises(ConfigError, match="baseline must be one of"):
        VAEConfig(estimator="score", baseline="average")
    with pytest.raises(ConfigError, match="score-function estimator only"):
        VAEConfig(baseline="decaying-avg")
    with pytest.raises(ConfigError, match="TraceMeanField_ELBO"):
        VAEConfig(estimator="score", elbo="meanfield")
    with pytest.raises(ConfigError, match="jit"):
        VAEConfig(estimator="score", baseline="neural", elbo="jit")
    assert isinstance(make_elbo(VAEConfig(estimator="score", baseline="neural")), DifferentiableTraceGraph_ELBO)
    assert type(make_elbo(VAEConfig(estimator="score"))) is Trace_ELBO


def test_grad_variance_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    fit(VAEConfig(z_dim=3, hidden=(32,), epochs=1, limit=200, val_size=100, batch_size=50), out=run_dir, progress=False,
        log=lambda s: None)
    common = ["--repeats", "3", "--batch-size", "8", "--sweep", "1,2", "--limit", "200"]
    assert main(["grad-variance", str(run_dir), *common]) == 0
    out = capsys.readouterr().out
    assert "| score | encoder |" in out and "variance / reparam" in out
    for name in ("grad_variance.md", "grad_variance.json", "grad_variance.png"):
        assert (run_dir / name).is_file(), name
    result = json.loads((run_dir / "grad_variance.json").read_text())
    assert set(result["estimators"]) == {"reparam", "score", "score+baseline"}
    assert result["sweep"]["num_particles"] == [1, 2] and result["batch_size"] == 8

    out_dir = tmp_path / "init"
    args = ["grad-variance", "--at-init", "--estimators", "reparam,score", "--out", str(out_dir), "--json", *common]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"].startswith("freshly initialised") and (out_dir / "grad_variance.md").is_file()

    assert main(["grad-variance"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    assert main(["grad-variance", str(run_dir), *common, "--estimators", "score+neural"]) == 2
    assert "--baseline neural" in capsys.readouterr().err
    assert main(["grad-variance", str(tmp_path / "nothing"), *common]) != 0
    with pytest.raises(SystemExit):
        main(["grad-variance", str(run_dir), "--estimators", "magic"])


def test_neural_baseline_is_part_of_the_guide_and_switches_with_it():
    vae = VAE(VAEConfig(z_dim=3, hidden=(16,), estimator="score", baseline="neural"))
    names = {n for n, _ in vae.named_parameters()}
    assert any(n.startswith("inference.baseline_net.") for n in names)
    groups = parameter_groups(vae)
    baseline = {id(p) for p in vae.inference.baseline_net.parameters()}
    assert not baseline & {id(p) for ps in groups.values() for p in ps}
    plain = VAE(VAEConfig(z_dim=3, hidden=(16,)))
    with pytest.raises(ConfigError, match="--baseline neural"):
        with estimator_mode(plain.inference, "score", "neural"):
            pass
