"""The importance-weighted objectives (pyro_vae.infer.iwae): the bound's value against a closed-form
log p(x), K = 1 against Trace_ELBO, DReG against the IWAE gradient, minibatch scaling, every guide,
the fused path, what Pyro's RenyiELBO computes instead, the learning-rate schedule, bad settings."""

import math
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

from pyro_vae import VAE, VAEConfig, fit
from pyro_vae.core.errors import ConfigError
from pyro_vae.infer.evaluate import log_importance_weights
from pyro_vae.infer.fused import fused_available
from pyro_vae.infer.iwae import DReG_ELBO, IWAE_ELBO
from pyro_vae.infer.objectives import fused_loss, make_elbo


def close(a, b, rtol=1e-4):
    """Equal up to float32 rounding, relative to the gradient's largest entry."""
    return (a - b).abs().max() <= rtol * a.abs().max() + 1e-7


# ----------------------------------------------------------------------------- a linear-Gaussian model

A, B_, SIGMA = 1.5, 0.3, 0.7  # x | z ~ N(A z + B_, SIGMA^2), z ~ N(0, 1): p(x) = N(B_, A^2 + SIGMA^2)
X = torch.tensor([-1.0, 0.2, 0.9, 2.5, -0.4, 1.3, 0.0, 3.0])  # N = 8 data points


def model(x, idx=None, num_data=None):
    with pyro.plate("data", num_data or len(x), subsample=idx if idx is not None else torch.arange(len(x))):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(A * z + B_, SIGMA), obs=x)


def exact_posterior(x):
    """p(z | x) = N(A (x - B_) / (A^2 + S^2), S^2 / (A^2 + S^2))."""
    v = A**2 + SIGMA**2
    return A * (x - B_) / v, torch.full_like(x, SIGMA / math.sqrt(v))


def make_guide(shift=0.0, widen=1.0):
    """q(z | x) = N(c x + d, s): the exact posterior with its mean shifted and its scale widened;
    ``c``, ``d`` and ``log s`` are pyro.params (the encoder's parameters)."""
    loc0, scale0 = exact_posterior(torch.tensor([0.0, 1.0]))

    def guide(x, idx=None, num_data=None):
        c = pyro.param("c", (loc0[1] - loc0[0]).clone())
        d = pyro.param("d", loc0[0] + shift)
        log_s = pyro.param("log_s", (scale0[0] * widen).log())
        with pyro.plate("data", num_data or len(x), subsample=idx if idx is not None else torch.arange(len(x))):
            pyro.sample("z", dist.Normal(c * x + d, log_s.exp()))

    return guide


def log_px(x):
    return dist.Normal(B_, math.sqrt(A**2 + SIGMA**2)).log_prob(x)


def test_exact_posterior_makes_every_weight_p_x():
    """With q = p(z|x) every weight is p(x): the bound is log p(x) for any K, to float precision."""
    guide = make_guide()
    for k in (1, 7):
        loss = IWAE_ELBO(num_particles=k).loss(model, guide, X)
        assert loss == pytest.approx(-log_px(X).sum().item(), rel=1e-5)


def test_bound_rises_with_k_to_log_p_x():
    """A poor q: E[L_K] <= log p(x), increasing in K, and within 0.02 nats per point at K = 5000."""
    guide = make_guide(shift=0.8, widen=1.5)
    truth = log_px(X).sum().item()
    means = []
    for k in (1, 10, 100):
        means.append(-sum(IWAE_ELBO(num_particles=k).loss(model, guide, X) for _ in range(200)) / 200)
    assert means[0] < means[1] < means[2] < truth
    assert truth - means[0] > 1.0  # the ELBO is far below
    large = -IWAE_ELBO(num_particles=5000).loss(model, guide, X)
    assert abs(large - truth) < 0.02 * len(X)


def test_minibatch_estimate_is_unbiased_and_renyi_is_not():
    """(N/B) sum over a random minibatch of B = 2 of the 8 points: its mean is the full-data bound
    (within 4 SE). RenyiELBO(alpha=0)'s minibatch estimate is not (N/B inside the exponential)."""
    guide, k, n = make_guide(shift=0.8, widen=1.5), 5, len(X)
    full = [-IWAE_ELBO(num_particles=k).loss(model, guide, X) for _ in range(400)]
    ours, renyi = [], []
    renyi_elbo = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    for _ in range(1500):
        idx = torch.randperm(n)[:2]
        ours.append(-IWAE_ELBO(num_particles=k).loss(model, guide, X[idx], idx, n))
        renyi.append(-renyi_elbo.loss(model, guide, X[idx], idx, n))
    t = torch.tensor
    mean_full, se_full = t(full).mean(), t(full).std() / math.sqrt(len(full))
    mean_ours, se_ours = t(ours).mean(), t(ours).std() / math.sqrt(len(ours))
    mean_renyi, se_renyi = t(renyi).mean(), t(renyi).std() / math.sqrt(len(renyi))
    assert abs(mean_ours - mean_full) < 4 * math.hypot(se_full, se_ours)
    assert abs(mean_renyi - mean_full) > 8 * math.hypot(se_full, se_renyi)


def _grads(elbo, guide, seed, x=X):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, x)
    params = [pyro.param(name).unconstrained() for name in ("c", "d", "log_s")]
    return torch.stack(torch.autograd.grad(loss, params))  # [3]


def test_dreg_gradient_is_unbiased_with_lower_encoder_variance():
    """Over 600 draws: DReG's mean gradient for the guide's (c, d, log s) equals the IWAE
    gradient's within 4 SE, and its variance is lower (Tucker et al. 2019)."""
    guide, k = make_guide(shift=0.8, widen=1.5), 10
    _grads(Trace_ELBO(), guide, 0)  # create the params
    iwae = torch.stack([_grads(IWAE_ELBO(num_particles=k), guide, s) for s in range(600)])  # [600, 3]
    dreg = torch.stack([_grads(DReG_ELBO(num_particles=k), guide, s) for s in range(600)])
    se = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()
    assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4 * se).all()
    assert (dreg.var(0) < 0.5 * iwae.var(0)).all()


def test_dreg_has_the_iwae_value_and_decoder_gradient():
    """Same draws: the same loss, and the same gradient for the model's (decoder's) parameters."""
    config = VAEConfig(z_dim=3, hidden=(16,))
    vae = VAE(config, num_data=100)
    x, idx = torch.bernoulli(torch.rand(8, 784, generator=torch.Generator().manual_seed(0))), torch.arange(8)
    out = []
    for cls in (IWAE_ELBO, DReG_ELBO):
        pyro.set_rng_seed(1)
        loss = cls(num_particles=6).differentiable_loss(vae.model, vae.guide, x, idx, num_data=100)
        vae.zero_grad()
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in vae.decoder.parameters()],
                    [p.grad.clone() for p in vae.inference.parameters()]))
    (l1, dec1, enc1), (l2, dec2, enc2) = out
    assert l1 == l2
    assert all(close(a, b) for a, b in zip(dec1, dec2))
    assert not all(torch.allclose(a, b) for a, b in zip(enc1, enc2))  # the encoder's differs


# ----------------------------------------------------------------------------- on VAE.model / VAE.guide


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.bernoulli(torch.rand(12, 784, generator=g)), torch.arange(20, 32)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_k1_iwae_equals_trace_elbo(batch, beta):
    """K = 1: the loss and every gradient of Trace_ELBO (same draw), subsampled plate, beta."""
    x, idx = batch
    vae = VAE(VAEConfig(z_dim=4, hidden=(16,)), num_data=100)
    out = []
    for elbo in (Trace_ELBO(), IWAE_ELBO(num_particles=1)):
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, idx, num_data=100, beta=beta)
        vae.zero_grad()
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in vae.parameters()]))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    assert all(close(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_renyi_elbo_scales_the_log_weights_inside_the_log_sum_exp(batch):
    """What RenyiELBO(alpha=0) computes on VAE.model/guide with a subsampled plate: the
    log-mean-exp per image of (N/B) log w (not of the minibatch's summed weight); equal to IWAE
    only when B = N."""
    x, idx = batch
    k, n = 5, 100
    vae = VAE(VAEConfig(z_dim=4, hidden=(16,)), num_data=n)
    pyro.set_rng_seed(2)
    eps = torch.randn(k, len(x), 4)  # the draws the guide's rsample makes after this seed
    with torch.no_grad():
        log_w = log_importance_weights(vae, x, *vae.inference.posterior(x), eps=eps)  # [K, B]
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    lme = lambda a: (a.logsumexp(0) - math.log(k)).sum().item()  # noqa: E731
    scale = n / len(x)
    pyro.set_rng_seed(2)
    assert -IWAE_ELBO(num_particles=k).loss(vae.model, vae.guide, x, idx, num_data=n) == pytest.approx(
        scale * lme(log_w), rel=1e-5)
    pyro.set_rng_seed(2)
    value = -renyi.loss(vae.model, vae.guide, x, idx, num_data=n)
    assert value == pytest.approx(lme(scale * log_w), rel=1e-5)
    assert abs(value - scale * lme(log_w)) > 1.0  # differs from the IWAE bound
    assert abs(value - (log_w.sum(1).logsumexp(0) - math.log(k)).item() * scale) > 1.0  # nor the whole minibatch's
    pyro.set_rng_seed(2)
    no_subsampling = -renyi.loss(vae.model, vae.guide, x, None, num_data=len(x))
    assert no_subsampling == pytest.approx(lme(log_w), rel=1e-5)


@pytest.mark.parametrize("guide", ["amortized", "mean-field", "semi-amortized"])
@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_every_guide_trains(guide, objective, batch):
    """Each guide: a finite loss and a gradient for every parameter, and two SVI epochs run."""
    x, idx = batch
    config = VAEConfig(z_dim=3, hidden=(16,), guide=guide, objective=objective, num_particles=4, refine_steps=2)
    vae = VAE(config, num_data=100)
    loss = make_elbo(config).differentiable_loss(vae.model, vae.guide, x, idx, num_data=100)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.to_dense().abs().sum() > 0 for p in vae.parameters())
    run = fit(config.replace(epochs=2, batch_size=20, limit=60, val_size=50), progress=False, log=lambda s: None)
    assert all(math.isfinite(h["train_elbo"]) for h in run.history)


@pytest.mark.parametrize("guide", ["amortized", "mean-field", "semi-amortized"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "normal"])
@pytest.mark.parametrize("objective, k", [("iwae", 1), ("iwae", 5), ("dreg", 5)])
def test_fused_equals_pyro(guide, likelihood, objective, k, batch):
    """The fused iwae/dreg loss: Pyro's loss and every gradient, same seed, subsampled, beta 0.5."""
    x, idx = batch
    config = VAEConfig(z_dim=4, hidden=(16,), guide=guide, likelihood=likelihood, objective=objective,
                       num_particles=k, refine_steps=2)
    assert fused_available(config)
    vae = VAE(config, num_data=100)
    out = []
    for fused in (False, True):
        pyro.set_rng_seed(7)
        if fused:
            loss = fused_loss(vae, config, x, idx, 100, 0.5)
        else:
            loss = make_elbo(config).differentiable_loss(vae.model, vae.guide, x, idx, num_data=100, beta=0.5)
        vae.zero_grad()
        loss.backward()
        out.append((loss.item(), [p.grad.to_dense().clone() for p in vae.parameters()]))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-5)
    assert all(close(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_the_objectives_are_pyro_elbos():
    assert type(make_elbo(VAEConfig(objective="iwae", num_particles=5))) is IWAE_ELBO
    assert type(make_elbo(VAEConfig(objective="dreg", num_particles=5))) is DReG_ELBO
    assert type(make_elbo(VAEConfig())) is Trace_ELBO
    for cls in (IWAE_ELBO, DReG_ELBO):
        assert issubclass(cls, pyro.infer.ELBO) and "differentiable_loss" in vars(cls) or cls is DReG_ELBO
    assert "loss" in vars(IWAE_ELBO) and "differentiable_loss" in vars(DReG_ELBO)


# ----------------------------------------------------------------------------- schedule, settings


def test_lr_schedules():
    cosine = VAEConfig(lr_schedule="cosine", epochs=4)
    assert [cosine.lr_at(e) for e in range(4)] == pytest.approx([1, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                                 (1 + math.cos(3 * math.pi / 4)) / 2])
    burda = VAEConfig(lr_schedule="burda", epochs=3280)
    factors = [burda.lr_at(e) for e in range(3280)]
    for i in range(8):  # 3^i epochs at 10^(-i/7)
        assert sum(1 for f in factors if f == pytest.approx(10 ** (-i / 7))) == 3**i
    assert VAEConfig().lr_at(7) == 1.0


def test_schedule_is_applied_and_resume_is_exact(tmp_path):
    """The optimizer runs at lr * lr_at(epoch); one epoch then --resume to two equals two straight."""
    tiny = dict(z_dim=2, hidden=(16,), batch_size=20, limit=60, val_size=50, objective="iwae", num_particles=3,
                lr_schedule="cosine", lr=3e-3)
    straight = fit(VAEConfig(epochs=2, **tiny), progress=False, log=lambda s: None)
    fit(VAEConfig(epochs=1, **tiny), tmp_path / "r", progress=False, log=lambda s: None)
    resumed = fit(VAEConfig(epochs=2, **tiny), tmp_path / "r", resume=True, progress=False, log=lambda s: None)
    a, b = straight.vae.state_dict(), resumed.vae.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    from pyro_vae.infer.svi import Trainer

    trainer = Trainer(VAEConfig(epochs=4, **tiny), progress=False, log=lambda s: None)
    trainer._schedule_lr(2)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5)


@pytest.mark.parametrize("changes, message", [
    (dict(objective="iwae", estimator="score"), "objective=iwae needs estimator=reparam"),
    (dict(objective="dreg", elbo="meanfield"), "objective=dreg needs estimator=reparam and elbo=trace"),
    (dict(objective="renyi"), "objective must be one of elbo, iwae, dreg"),
    (dict(lr_schedule="step"), "lr_schedule must be one of constant, cosine, burda"),
])
def test_bad_settings_are_one_line_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message) as e:
        VAEConfig(**changes)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--objective", "iwae", "--estimator", "score"], "objective=iwae needs estimator=reparam"),
    (["--objective", "renyi"], "invalid choice: 'renyi'"),
    (["--lr-schedule", "step"], "invalid choice: 'step'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--limit", "60", "--epochs", "1", "--quiet",
                           "--out", str(tmp_path / "r"), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_variance_lab_measures_iwae_and_dreg():
    """The lab's iwae and dreg estimators: the same decoder variance, lower encoder variance for
    DReG, and an SNR per K for the sweep's table and plot."""
    from pyro_vae.experiments.variance_lab import format_table, gradient_variance

    vae = VAE(VAEConfig(z_dim=3, hidden=(16,)))
    x = torch.bernoulli(torch.rand(8, 784, generator=torch.Generator().manual_seed(0)))
    result = gradient_variance(vae, x, ("iwae", "dreg"), repeats=20, num_particles=4, sweep=(1, 4))
    table = result["estimators"]
    assert table["dreg"]["decoder"]["total_variance"] == pytest.approx(table["iwae"]["decoder"]["total_variance"],
                                                                        rel=1e-4)
    assert table["dreg"]["encoder"]["total_variance"] < table["iwae"]["encoder"]["total_variance"]
    assert len(result["sweep"]["snr"]["iwae"]["encoder"]) == 2 and result["iwae_bound"] < 0
    assert "SNR of the encoder's gradient" in format_table(result)
