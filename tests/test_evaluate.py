import json
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_vae import VAE, VAEConfig, fit, load_dataset, write_idx
from pyro_vae.cli import main
from pyro_vae.infer.evaluate import active_units, elbo_terms, evaluate, iwae_bound, log_importance_weights

JSON_KEYS = {"elbo", "elbo_se", "iwae", "iwae_se", "iwae_k", "kl", "reconstruction", "active_units", "n", "dataset", "split", "binarize"}
QUICK = ["--iwae-k", "10", "--elbo-samples", "4", "--limit", "40", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "run"
    config = VAEConfig(z_dim=4, hidden=(64,), epochs=4, limit=500, val_size=100)
    fit(config, out, progress=False, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def run(run_dir):
    from pyro_vae import load_run

    return load_run(run_dir)


@pytest.fixture(scope="module")
def val():
    return load_dataset("mnist-5k", "val", val_size=100)


# ----------------------------------------------------------------------------- linear-Gaussian model


class LinearGaussian(nn.Module):
    r"""p(z) = N(0, I_d), p(x|z) = N(Wz + b, sigma^2 I_D): log p(x) = log N(x; b, W W^T + sigma^2 I).

    W has orthogonal columns, so the exact posterior N(mu, Sigma) has a diagonal Sigma."""

    def __init__(self, x_dim=6, z_dim=3, sigma=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(x_dim, z_dim, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)[:z_dim])  # [D, d]
        self.b = nn.Parameter(torch.randn(x_dim, generator=g, dtype=torch.float64))
        self.sigma = sigma

    def likelihood(self, z):
        return dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1)

    def prior(self, batch):
        zeros = self.W.new_zeros(batch, self.W.shape[1])
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], dtype=x.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)  # [B]

    def exact_posterior(self, x):
        precision = 1 + (self.W**2).sum(0) / self.sigma**2  # [d]: I + W^T W / sigma^2 is diagonal
        loc = (x - self.b) @ self.W / self.sigma**2 / precision  # [B, d]
        return loc, precision.rsqrt().expand_as(loc)

    def sample(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.W.shape[1], generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + self.sigma * torch.randn(n, self.W.shape[0], generator=g, dtype=torch.float64)


@torch.no_grad()
def test_iwae_is_exact_with_the_exact_posterior():
    # every weight equals p(x): the bound is log p(x) for any k, and only if the log k is subtracted
    model = LinearGaussian()
    x = model.sample(5)
    loc, scale = model.exact_posterior(x)
    exact = model.log_marginal(x)
    for k in (1, 64):
        bound = iwae_bound(model, x, loc, scale, k, chunk_k=10, generator=torch.Generator().manual_seed(k))
        assert torch.allclose(bound, exact, atol=1e-8), (k, bound - exact)


@torch.no_grad()
def test_iwae_converges_to_the_exact_log_likelihood_with_a_poor_q():
    model = LinearGaussian()
    x = model.sample(5)
    loc, scale = model.exact_posterior(x)
    loc, scale = loc + 0.3, 1.6 * scale  # a poor but overlapping q
    exact = model.log_marginal(x)
    gaps = {}
    for k in (1, 10, 100, 20000):
        bound = iwae_bound(model, x, loc, scale, k, generator=torch.Generator().manual_seed(0))
        gaps[k] = (exact - bound).mean().item()
    elbo = elbo_terms(model, x, loc, scale, 20000, generator=torch.Generator().manual_seed(1))["elbo"]
    assert (exact - elbo).mean().item() > 0.3  # q is really off: the ELBO is far below log p(x)
    assert abs(gaps[1] - (exact - elbo).mean().item()) < 0.3  # L_1 is a one-sample ELBO
    assert gaps[1] > gaps[10] > gaps[100] > abs(gaps[20000])
    assert abs(gaps[20000]) < 0.03  # log 20000 = 9.9: dropping log k (or any constant) fails here


@torch.no_grad()
def test_evaluate_accepts_any_model_and_a_posterior_function():
    model = LinearGaussian()
    x = model.sample(30)
    result = evaluate(model, x, iwae_k=8, elbo_samples=4, batch_size=7, posterior=lambda xb, idx: model.exact_posterior(xb))
    assert result.n == 30 and result.iwae_k == 8 and result.z_dim == 3
    assert result.iwae == pytest.approx(model.log_marginal(x).mean().item(), abs=1e-6)
    assert result.per_image["iwae"].dtype == torch.float64
    assert result.active_units == 3


def test_log_weights_are_the_pyro_programs_densities():
    # log w = log p(x, z) - log q(z) as Pyro's traces of VAE.model and VAE.guide score them
    vae = VAE(VAEConfig(z_dim=3, hidden=(16,)))
    x = torch.bernoulli(torch.rand(4, 784, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        loc, scale = vae.inference.posterior(x)
        eps = torch.randn(2, 4, 3)
        log_w = log_importance_weights(vae, x, loc, scale, 2, eps=eps)  # [2, 4]
        for i in range(2):
            z = loc + scale * eps[i]
            model = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
            guide = poutine.trace(poutine.condition(vae.guide, data={"z": z})).get_trace(x)
            model.compute_log_prob(), guide.compute_log_prob()
            expected = model.nodes["z"]["log_prob"] + model.nodes["x"]["log_prob"] - guide.nodes["z"]["log_prob"]
            assert torch.allclose(log_w[i], expected, atol=1e-3)


# ----------------------------------------------------------------------------- a trained VAE


def test_iwae_bounds_ELBO_and_grows_with_k(run, val):
    images = val.subset(100)
    results = {k: evaluate(run, images, iwae_k=k, elbo_samples=20) for k in (1, 10, 100)}
    elbo = results[1].per_image["elbo"]
    diff = results[1].per_image["iwae"] - elbo  # L_1 estimates the ELBO without bias
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 1e-3
    assert results[1].iwae < results[10].iwae < results[100].iwae
    assert (results[100].per_image["iwae"] >= elbo - 0.5).float().mean() > 0.95
    assert results[100].elbo == results[1].elbo  # the ELBO's draws do not depend on k
    r = results[100]
    assert r.elbo == pytest.approx(r.reconstruction - r.kl) and r.kl > 0 and r.reconstruction < 0
    assert 0 <= r.active_units <= 4 and len(r.latent_variance) == 4


def test_chunked_unchunked_and_limited_evaluations_agree(run, val):
    images = val.subset(40)
    whole = evaluate(run, images, iwae_k=50, elbo_samples=5, batch_size=40, chunk_k=50)
    chunked = evaluate(run, images, iwae_k=50, elbo_samples=5, batch_size=7, chunk_k=8)
    first = evaluate(run, val.subset(20), iwae_k=50, elbo_samples=5)
    for key in ("iwae", "elbo", "kl", "reconstruction"):
        assert torch.allclose(whole.per_image[key], chunked.per_image[key], atol=1e-3), key
        assert torch.allclose(whole.per_image[key][:20], first.per_image[key], atol=1e-3), key
    other_seed = evaluate(run, images, iwae_k=50, elbo_samples=5, seed=1)
    assert not torch.allclose(whole.per_image["iwae"], other_seed.per_image["iwae"])


@torch.no_grad()
def test_streaming_logsumexp_matches_one_logsumexp(run, val):
    x = val.images[:8].round()
    loc, scale = run.vae.inference.posterior(x)
    log_w = log_importance_weights(run.vae, x, loc, scale, 64, generator=torch.Generator().manual_seed(3))
    direct = log_w.logsumexp(0) - math.log(64)
    for chunk_k in (1, 7, 64):
        bound = iwae_bound(run.vae, x, loc, scale, 64, chunk_k, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(bound, direct, atol=1e-4), chunk_k


def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(1000, 5, generator=g) * torch.tensor([1.0, 0.5, 0.2, 0.05, 0.0])
    count, variances = active_units(means)  # variances 1, 0.25, 0.04, 0.0025, 0
    assert count == 3 and variances.shape == (5,)


def test_guides_without_an_encoder_get_a_local_fit_or_a_given_posterior(run, val):
    vae = VAE(VAEConfig(z_dim=4, hidden=(64,)))
    vae.load_state_dict(run.vae.state_dict())
    vae.inference.amortized = False  # as a per-datapoint guide: no q for new images
    local = evaluate(vae, val.subset(10), iwae_k=2, elbo_samples=2)  # q from fit_local, from the prior
    assert local.elbo > evaluate(vae, val.subset(10), iwae_k=2, elbo_samples=2,
                                 posterior=lambda x, idx: (torch.zeros(len(x), 4), torch.ones(len(x), 4))).elbo
    encoder = run.vae.inference.posterior
    fitted = evaluate(vae, val.subset(10), iwae_k=2, elbo_samples=2, posterior=lambda x, idx: encoder(x))
    assert fitted.iwae == evaluate(run, val.subset(10), iwae_k=2, elbo_samples=2).iwae


# ----------------------------------------------------------------------------- pyro-vae evaluate


def test_cli_json_is_one_object_with_the_python_numbers(run, run_dir, val, capsys):
    assert main(["evaluate", str(run_dir), "--json", *QUICK]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert JSON_KEYS <= set(result) and out.count("\n") == 1
    assert (result["dataset"], result["split"], result["binarize"], result["n"]) == ("mnist-5k", "val", "dynamic", 40)
    same = evaluate(run, val.subset(40), iwae_k=10, elbo_samples=4)
    assert result["iwae"] == same.iwae and result["elbo"] == same.elbo and result["note"] is None


def test_cli_table_and_no_bar_frames_when_stderr_is_no_terminal(run_dir, capsys):
    assert main(["evaluate", str(run_dir), *QUICK[:-1], "--binarize", "none"]) == 0
    captured = capsys.readouterr()
    assert "IWAE bound (k=10)" in captured.out and "active units" in captured.out
    assert "not log-likelihoods" in captured.out
    assert "evaluate (k=10)" not in captured.err and "\r" not in captured.err  # a captured stream: no tqdm frames


def test_cli_on_a_folder_with_only_a_test_file(run_dir, tmp_path, capsys):
    images = load_dataset("mnist-5k", "val", val_size=100).images[:30]
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", (images * 255).round().numpy().astype(np.uint8).reshape(-1, 28, 28))
    assert main(["evaluate", str(run_dir), "--data-dir", str(tmp_path), "--json", *QUICK]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["split"], result["n"], result["dataset"]) == ("test", 30, str(tmp_path))


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--split", "test"], "mnist-5k has no test split", 1),
        (["--iwae-k", "0"], "iwae_k must be a positive integer", 2),
        (["--limit", "0"], "limit must be a positive integer", 2),
    ],
)
def test_cli_mistakes_are_one_line(run_dir, capsys, args, message, code):
    assert main(["evaluate", str(run_dir), "--quiet", *args]) == code
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error:") and message in err and err.count("\n") == 1


def test_cli_missing_run_folder(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error:") and "nothing" in err and err.count("\n") == 1
