r"""Your own probabilistic program (issue 28): a program written in this file, on the contract
(:class:`pyro_vae.program.contract.Program`) and nothing else, trains through ``fit``, resumes
bit-exactly, is scored by ``evaluate`` (the IWAE bound over all its latent sites) and tracked by
``pyro-vae runs``; a program that breaks the contract is a one-line error naming what is missing."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

from pyro_vae import CheckpointError, ConfigError, TrainingInterrupted, VAEConfig, compare_runs, evaluate, fit, load_run
from pyro_vae.cli import main
from pyro_vae.infer.evaluate import save_result
from pyro_vae.infer.iwae import IWAE_ELBO, iwae_bound
from pyro_vae.infer.traces import program_log_weights
from pyro_vae.program.contract import Program
from pyro_vae.program.plates import data_plate

QUIET = dict(progress=False, log=lambda line: None)


class StudentTVAE(Program):
    """A VAE whose prior is a Student-t (heavy tails), Bernoulli pixels, linear networks."""

    latent_sites = ("z",)

    def __init__(self, x_dim: int = 16, z_dim: int = 2, df: float = 3.0):
        super().__init__()
        self.event_shape = (x_dim,)
        self.z_dim, self.df = z_dim, df
        self.decoder = nn.Linear(z_dim, x_dim)
        self.encoder = nn.Linear(x_dim, 2 * z_dim)

    def model(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("decoder", self.decoder)
        loc = x.new_zeros(x.shape[0], self.z_dim)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.StudentT(self.df, loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("encoder", self.encoder)
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        with data_plate(x, idx, num_data), poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw_scale) + 1e-3).to_event(1))


class LinearGaussian(Program):
    r"""Two linear-Gaussian latent layers: :math:`z_2 \sim N(0, I)`, :math:`z_1 \mid z_2 \sim
    N(A z_2 + a, s_1^2 I)`, :math:`x \mid z_1 \sim N(B z_1 + b, s_2^2 I)`; the guide
    :math:`q(z_1 \mid x) q(z_2 \mid z_1)` mirrors it. :math:`\log p(x)` is in closed form."""

    latent_sites = ("z1", "z2")

    def __init__(self, x_dim: int = 3, z1_dim: int = 2, z2_dim: int = 1, s1: float = 0.7, s2: float = 0.5):
        super().__init__()
        self.event_shape, self.z2_dim, self.s1, self.s2 = (x_dim,), z2_dim, s1, s2
        self.top, self.bottom = nn.Linear(z2_dim, z1_dim), nn.Linear(z1_dim, x_dim)  # the model's A, a and B, b
        self.q1, self.q2 = nn.Linear(x_dim, 2 * z1_dim), nn.Linear(z1_dim, 2 * z2_dim)  # loc and log scale

    def model(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("top", self.top)
        pyro.module("bottom", self.bottom)
        with data_plate(x, idx, num_data):
            with poutine.scale(scale=beta):
                z2 = pyro.sample("z2", dist.Normal(x.new_zeros(x.shape[0], self.z2_dim), 1.0).to_event(1))
                z1 = pyro.sample("z1", dist.Normal(self.top(z2), self.s1).to_event(1))
            pyro.sample("x", dist.Normal(self.bottom(z1), self.s2).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("q1", self.q1)
        pyro.module("q2", self.q2)
        with data_plate(x, idx, num_data), poutine.scale(scale=beta):
            loc, log_scale = self.q1(x).chunk(2, dim=-1)
            z1 = pyro.sample("z1", dist.Normal(loc, log_scale.exp()).to_event(1))
            loc, log_scale = self.q2(z1).chunk(2, dim=-1)
            pyro.sample("z2", dist.Normal(loc, log_scale.exp()).to_event(1))

    def log_marginal(self, x):
        """:math:`\\log p(x) = \\log N(x; B a + b, B (A A^T + s_1^2 I) B^T + s_2^2 I)`."""
        A, a, B, b = self.top.weight, self.top.bias, self.bottom.weight, self.bottom.bias
        cov = B @ (A @ A.T + self.s1 ** 2 * torch.eye(len(a))) @ B.T + self.s2 ** 2 * torch.eye(len(b))
        return dist.MultivariateNormal(B @ a + b, cov).log_prob(x)

    @torch.no_grad()
    def guide_near_posterior(self, widen: float = 1.5) -> None:
        """q(z1|x): the exact posterior mean, its marginal standard deviations times ``widen``;
        q(z2|z1) = p(z2|z1) (exact for one z2 unit), its standard deviation times ``widen``."""
        A, a, B, b = self.top.weight, self.top.bias, self.bottom.weight, self.bottom.bias
        prec_z1 = torch.linalg.inv(A @ A.T + self.s1 ** 2 * torch.eye(len(a)))
        cov = torch.linalg.inv(prec_z1 + B.T @ B / self.s2 ** 2)
        self.q1.weight.copy_(torch.cat([cov @ B.T / self.s2 ** 2, torch.zeros(len(a), len(b))]))
        self.q1.bias.copy_(torch.cat([cov @ (prec_z1 @ a - B.T @ b / self.s2 ** 2), (widen * cov.diagonal().sqrt()).log()]))
        cov2 = torch.linalg.inv(torch.eye(A.shape[1]) + A.T @ A / self.s1 ** 2)
        gain = cov2 @ A.T / self.s1 ** 2
        self.q2.weight.copy_(torch.cat([gain, torch.zeros(A.shape[1], len(a))]))
        self.q2.bias.copy_(torch.cat([-gain @ a, (widen * cov2.diagonal().sqrt()).log()]))


def student(seed: int = 0) -> StudentTVAE:
    torch.manual_seed(seed)
    return StudentTVAE()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(40, 16, generator=g) < 0.3).float(), (torch.rand(10, 16, generator=g) < 0.3).float()


CONFIG = VAEConfig(epochs=2, batch_size=8, kl_warmup=0, validate=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    """The uninterrupted reference run of the Student-t program, and its log."""
    lines, out = [], tmp_path_factory.mktemp("programs") / "straight"
    run = fit(CONFIG, out, train_data=data[0], val_data=data[1], program=student(), progress=False, log=lines.append)
    return run, lines


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_a_program_trains_and_says_once_that_it_takes_the_traced_path(straight):
    run, lines = straight
    assert [h["epoch"] for h in run.history] == [1, 2]
    assert all(math.isfinite(h["train_elbo"]) and math.isfinite(h["val_elbo"]) for h in run.history)
    notes = [line for line in lines if "traced" in line]
    assert len(notes) == 1 and "StudentTVAE" in notes[0] and "no fused loss" in notes[0] and "no closed-form KL" in notes[0]
    assert run.config.program.endswith("StudentTVAE") and json.loads((run.path / "config.json").read_text())["program"]


@pytest.mark.parametrize("point", ["2:3", "1:end"])
def test_a_program_resumes_bit_exactly(tmp_path, monkeypatch, data, straight, point):
    """A stop inside an epoch (or in its bookkeeping); resuming a freshly constructed program (other
    initial weights) ends with the parameters and history of the uninterrupted run."""
    out = tmp_path / "r"
    monkeypatch.setenv("PYRO_VAE_SIGNAL_AT", point)
    with pytest.raises(TrainingInterrupted):
        fit(CONFIG, out, train_data=data[0], val_data=data[1], program=student(), **QUIET)
    monkeypatch.delenv("PYRO_VAE_SIGNAL_AT")
    resumed = fit(CONFIG, out, train_data=data[0], val_data=data[1], program=student(seed=7), resume=True, **QUIET)
    reference, _ = straight
    assert state_equal(resumed.program, reference.program)
    assert without_seconds(resumed.history) == without_seconds(reference.history)


def test_load_run_needs_the_program_again(straight):
    run, _ = straight
    loaded = load_run(run.path, program=student(seed=3))
    assert state_equal(loaded.program, run.program) and loaded.history == run.history
    assert loaded.sample(4, seed=0).shape == (4, 16) and loaded.reconstruct(torch.zeros(3, 16)).shape == (3, 16)
    with pytest.raises(CheckpointError, match=r"load_run\(.*program=StudentTVAE\(\.\.\.\)\)") as e:
        load_run(run.path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="was trained with .*StudentTVAE; got program=.*LinearGaussian"):
        load_run(run.path, program=LinearGaussian(x_dim=16))


def test_a_program_is_evaluated_over_its_latent_sites_and_tracked(straight, data, tmp_path, capsys):
    """``evaluate`` scores it (IWAE >= ELBO, active units of its site), ``--save`` puts that
    beside the run, and ``pyro-vae runs`` compares it with a built-in VAE on the same images
    (the VAE's own settings shown only for the VAE)."""
    run, _ = straight
    result = evaluate(run, data[1], iwae_k=50, elbo_samples=10)
    assert result.program.endswith("StudentTVAE") and set(result.active_units_by_site) == {"z"}
    assert result.iwae >= result.elbo and result.elbo == pytest.approx(result.reconstruction - result.kl)
    assert len(result.latent_variance) == 2 and "IWAE bound (k=50)" in result.table()
    save_result(result, run.path / "checkpoint.pt")
    vae = fit(VAEConfig(epochs=1, batch_size=8, kl_warmup=0, z_dim=2, hidden=(8,)), tmp_path / "vae",
              train_data=data[0], val_data=data[1], **QUIET)
    rows = compare_runs([run.path, vae.path], show=False)
    assert rows[0]["program"].endswith("StudentTVAE") and rows[1]["program"] is None
    assert rows[0]["z_dim"] is None and rows[1]["z_dim"] == 2  # the VAE's own setting, not the program's
    assert rows[0]["eval_iwae"] == pytest.approx(result.iwae) and rows[1]["eval_iwae"] is None
    assert main(["runs", str(run.path), str(vae.path), "--out", str(tmp_path / "cmp")]) == 0
    assert "StudentTVAE" in capsys.readouterr().out


def test_its_iwae_bound_with_one_sample_is_its_elbo_on_the_same_draw(data):
    """With K = 1 the bound's log-mean-exp is the log weight itself; and the per-image log weights
    that ``evaluate`` sums are ``Trace_ELBO``'s estimate, draw for draw."""
    program, x = student(), data[1]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        log_w = program_log_weights(program, x, 1)["log_w"]  # [1, B]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        trace_elbo = -Trace_ELBO().loss(program.model, program.guide, x)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        iwae_1 = -IWAE_ELBO(num_particles=1).loss(program.model, program.guide, x)
    assert torch.equal(iwae_bound(log_w), log_w[0])
    assert log_w.sum().item() == pytest.approx(trace_elbo, rel=1e-6) and iwae_1 == pytest.approx(trace_elbo, rel=1e-6)


def test_on_a_linear_gaussian_two_layer_model_the_bound_approaches_log_px():
    """IWAE over both latent sites tends to the closed-form log p(x) as k grows."""
    torch.manual_seed(0)
    program = LinearGaussian()
    program.guide_near_posterior()
    x = program.sample(20, seed=1) + 0.5 * torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_px = program.log_marginal(x).mean().item()
    gaps = {k: evaluate(program, x, iwae_k=k, elbo_samples=1).iwae - log_px for k in (1, 10, 1000)}
    assert gaps[1] < -0.3 and abs(gaps[10]) < abs(gaps[1]) / 3 and abs(gaps[1000]) < 0.02, gaps


@pytest.mark.parametrize("objective", ["iwae", "dreg"])
def test_a_program_with_a_reparameterized_guide_trains_with_the_importance_weighted_objectives(objective):
    torch.manual_seed(0)
    x = torch.randn(24, 3)
    config = VAEConfig(epochs=1, batch_size=8, kl_warmup=0, objective=objective, num_particles=4, binarize="none")
    run = fit(config, train_data=x, val_data=x[:6], program=LinearGaussian(), **QUIET)
    assert math.isfinite(run.history[0]["train_elbo"])


class BinaryCode(Program):
    """A discrete latent code: a guide without ``rsample``."""

    latent_sites = ("z",)

    def __init__(self):
        super().__init__()
        self.event_shape = (16,)
        self.encoder, self.decoder = nn.Linear(16, 2), nn.Linear(2, 16)

    def model(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Bernoulli(x.new_full((x.shape[0], 2), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x)).to_event(1))


# ----------------------------------------------------------------------------- broken programs


class DeclaresMore(StudentTVAE):
    latent_sites = ("z", "w")


class NoPlateInGuide(StudentTVAE):
    def guide(self, x, idx=None, num_data=None, beta=1.0):
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        pyro.sample("z", dist.Normal(loc, F.softplus(raw_scale) + 1e-3).to_event(1))


class PixelsNotAnEvent(StudentTVAE):
    def model(self, x, idx=None, num_data=None, beta=1.0):
        with data_plate(x, idx, num_data):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)), obs=x)


class UnguidedSite(StudentTVAE):
    def model(self, x, idx=None, num_data=None, beta=1.0):
        with data_plate(x, idx, num_data):
            pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class LooseParam(StudentTVAE):
    def guide(self, x, idx=None, num_data=None, beta=1.0):
        temperature = pyro.param("temperature", torch.ones(()))
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        with data_plate(x, idx, num_data):
            pyro.sample("z", dist.Normal(loc, temperature * F.softplus(raw_scale) + 1e-3).to_event(1))


class NoObservation(StudentTVAE):
    data_site = "image"


@pytest.mark.parametrize("program, config, message", [
    (DeclaresMore, {}, "DeclaresMore.guide samples no site 'w', which DeclaresMore.latent_sites declares"),
    (NoPlateInGuide, {}, "site 'z' of NoPlateInGuide.guide is not inside the 'data' plate: open it with "
                         "pyro_vae.data_plate"),
    (PixelsNotAnEvent, {}, r"PixelsNotAnEvent.model failed .* at site x .* one number per image: declare the other "
                           r"dims with .to_event"),
    (UnguidedSite, {}, "UnguidedSite.model samples 'w', which UnguidedSite.guide does not sample"),
    (LooseParam, {}, r"LooseParam.guide uses pyro.param\('temperature'\), which is not a parameter of the module"),
    (NoObservation, {}, "NoObservation.model observes no site 'image'"),
    (BinaryCode, {"objective": "iwae", "num_particles": 2}, "site 'z' of BinaryCode.guide has no rsample"),
    (lambda: nn.Linear(2, 2), {}, "program= takes a pyro_vae.Program"),
], ids=["missing site", "no plate", "not an event", "unguided site", "loose param", "no observation",
        "iwae, not reparameterized", "not a program"])
def test_a_program_that_breaks_the_contract_is_a_one_line_error(tmp_path, data, program, config, message):
    with pytest.raises(ConfigError, match=message) as e:
        fit(CONFIG.replace(**config), tmp_path / "r", train_data=data[0], program=program(), **QUIET)
    assert "\n" not in str(e.value)


def test_the_run_cache_is_refused_for_a_program(data):
    with pytest.raises(ConfigError, match="cannot key a run on your program's code"):
        fit(CONFIG, train_data=data[0], program=student(), cache=True, **QUIET)


def test_tensorboard_probes_a_program_from_its_traces(tmp_path, data):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    fit(CONFIG, tmp_path / "tb", train_data=data[0], val_data=data[1], program=student(), tensorboard=True, **QUIET)
    events = accumulator.EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("elbo/train", "elbo/validation", "elbo/reconstruction", "elbo/kl"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag
    assert all(e.value > 0 for e in events.Scalars("elbo/kl"))
