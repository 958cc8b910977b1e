"""Programs as Pyro users write them, ``model(x)`` and ``guide(x)`` (Pyro's VAE tutorial): trained,
resumed, scored and tracked unchanged (pyro_vae.program.pyro_style), from Python and from
``pyro-vae train --program FILE:CLASS`` (pyro_vae.program.files)."""

import json
import shutil
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vae import VAEConfig, compare_runs, evaluate, fit, load_dataset, load_run
from pyro_vae.cli import main
from pyro_vae.core.errors import CheckpointError, ConfigError
from pyro_vae.program.files import ProgramFile, file_digest
from pyro_vae.program.model import VAE as BuiltInVAE
from pyro_vae.program.pyro_style import as_program, takes_data_only

SMALL = ["--limit", "200", "--val-size", "100", "--epochs", "1", "--batch-size", "50", "--quiet", "--kl-warmup", "2"]


# ----------------------------------------------------------------------------- Pyro's tutorial program (smaller)


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    def __init__(self, z_dim=2, hidden_dim=16):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder.forward(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))
            return loc_img

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder.forward(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


class NoPlateVAE(TutorialVAE):
    def guide(self, x):
        pyro.module("encoder", self.encoder)
        z_loc, z_scale = self.encoder.forward(x)
        pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(2))


class BatchPlateVAE(TutorialVAE):
    """The tutorial with its plate called ``batch``, named for the package by ``data_plate``."""

    data_plate = "batch"

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decoder(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("latent", dist.Normal(*self.encoder(x)).to_event(1))


def tutorial(seed=0, **kwargs) -> TutorialVAE:
    torch.manual_seed(seed)
    return TutorialVAE(**kwargs)


@pytest.fixture
def config():
    return VAEConfig(epochs=1, batch_size=50, limit=200, val_size=100, kl_warmup=2, validate=True)


@pytest.fixture
def program_file(tmp_path):
    """A copy of this file: a program file of its own, for the command line."""
    path = tmp_path / "prog.py"
    shutil.copy(__file__, path)
    return path


def _batch(n=8, seed=1):
    return torch.bernoulli(torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)))


def _state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ----------------------------------------------------------------------------- the handlers


def test_signatures_are_read_with_inspect():
    assert takes_data_only(TutorialVAE())
    assert not takes_data_only(BuiltInVAE(VAEConfig(z_dim=2, hidden=(8,))))


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_handlers_scale_the_data_plate_and_beta_as_by_hand(beta):
    """On one fixed draw: -loss = N/B [log p(x|z) + beta (log p(z) - log q(z|x))], observed site unscaled by beta."""
    program, x, num_data = tutorial(), _batch(), 100
    wrapped = as_program(program, (1, 28, 28))
    pyro.set_rng_seed(3)
    loss = Trace_ELBO().loss(wrapped.model, wrapped.guide, x, None, num_data, beta)
    pyro.set_rng_seed(3)
    guide = poutine.trace(program.guide).get_trace(x)
    model = poutine.trace(poutine.replay(program.model, trace=guide)).get_trace(x)
    guide.compute_log_prob()
    model.compute_log_prob()
    site = lambda trace, name: trace.nodes[name]["log_prob_sum"].item()  # noqa: E731
    by_hand = num_data / len(x) * (site(model, "obs") + beta * (site(model, "latent") - site(guide, "latent")))
    assert loss == pytest.approx(-by_hand, rel=1e-6)


def test_a_program_without_the_data_plate_is_refused_in_one_line(config):
    with pytest.raises(ConfigError) as caught:
        as_program(NoPlateVAE(), (1, 28, 28))
    message = str(caught.value)
    assert "\n" not in message and "NoPlateVAE.guide opens no plate named 'data'" in message
    assert "with pyro.plate('data', x.shape[0]):" in message
    with pytest.raises(ConfigError, match="opens no plate"):
        fit(config, program=NoPlateVAE(), progress=False)


def test_the_plate_the_program_names_is_the_data_plate(config):
    wrapped, x = as_program(BatchPlateVAE(), (1, 28, 28)), _batch()
    trace = poutine.trace(wrapped.model).get_trace(x, None, 100, 1.0)
    site = trace.nodes["obs"]
    assert [f.name for f in site["cond_indep_stack"]] == ["data"] and site["scale"] == pytest.approx(100 / 8)
    run = fit(config, program=BatchPlateVAE(), progress=False)
    result = evaluate(run, x, iwae_k=4, elbo_samples=2)
    assert result.per_image["elbo"].shape == (8,)


# ----------------------------------------------------------------------------- fit, resume, evaluate


def test_trains_resumes_bit_exactly_and_is_scored(tmp_path, config):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    two = config.replace(epochs=2)
    fit(two, whole, program=tutorial(), progress=False)
    fit(config, parts, program=tutorial(), progress=False)
    run = fit(two, parts, program=tutorial(seed=5), resume=True, progress=False)  # fresh weights, restored
    a, b = _state(whole), _state(parts)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _without_times(a["history"]) == _without_times(b["history"])
    assert run.config.program.endswith("TutorialVAE") and run.history[0]["beta"] == 0.5
    with pytest.raises(CheckpointError, match="program=TutorialVAE"):
        load_run(whole)
    loaded = load_run(whole, program=TutorialVAE())
    val = load_dataset("mnist-5k", "val", limit=20)
    result = evaluate(loaded, val, iwae_k=20, elbo_samples=10)
    assert result.n == 20 and result.program.endswith("TutorialVAE") and result.z_dim == 2
    assert torch.isfinite(result.per_image["iwae"]).all() and result.iwae >= result.elbo - 1.0
    assert loaded.sample(3).shape == (3, 784) and loaded.reconstruct(val.images[:2]).shape == (2, 784)


def test_the_training_elbo_is_per_image(config):
    """An epoch that barely moves the weights reports the ELBO of all images per image (about -543
    nats for 784 pixels at p = 1/2), not a minibatch's share (B/N of it)."""
    run = fit(config.replace(lr=1e-9, kl_warmup=0), program=tutorial(), progress=False)
    x = torch.bernoulli(load_dataset("mnist-5k", "train", limit=200).images,
                        generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    reference = -Trace_ELBO().loss(run.program.model, run.program.guide, x) / len(x)
    assert run.history[0]["train_elbo"] == pytest.approx(reference, abs=3.0)
    assert reference < -400


# ----------------------------------------------------------------------------- pyro-vae train --program


def test_cli_trains_resumes_evaluates_and_tracks_a_program_file(tmp_path, program_file, capsys):
    spec, args = f"{program_file}:TutorialVAE", '{"z_dim": 3}'
    parts, whole, builtin = tmp_path / "parts", tmp_path / "whole", tmp_path / "builtin"
    assert main(["train", *SMALL, "--program", spec, "--program-args", args, "--out", str(parts)]) == 0
    assert "take the data alone" in capsys.readouterr().out  # said once in the run's log
    saved = json.loads((parts / "config.json").read_text())
    assert saved["program_file"] == f"{program_file.resolve()}:TutorialVAE" and saved["program_args"] == {"z_dim": 3}
    assert saved["program_sha256"] == file_digest(program_file)
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(parts), "--resume"]) == 0  # the record finds it
    assert main(["train", *SMALL, "--epochs", "2", "--program", spec, "--program-args", args, "--out", str(whole)]) == 0
    a, b = _state(whole), _state(parts)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    capsys.readouterr()
    assert main(["evaluate", str(parts), "--iwae-k", "8", "--elbo-samples", "4", "--limit", "10", "--quiet",
                 "--json", "--save"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["program"] == "pyro_vae_program_prog.TutorialVAE" and result["z_dim"] == 3
    assert load_run(parts).program.program.z_dim == 3  # no program= needed
    assert main(["train", *SMALL, "--z-dim", "2", "--hidden", "16", "--out", str(builtin)]) == 0
    capsys.readouterr()
    assert main(["runs", str(parts), str(builtin), "--json", "--out", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["program_file"].endswith("prog.py:TutorialVAE") and rows[1]["program_file"] is None
    assert rows[0]["epochs"] == 2 and rows[0]["eval_iwae"] is not None


def test_a_changed_or_missing_program_file_is_refused(tmp_path, program_file, capsys):
    out, spec = tmp_path / "run", f"{program_file}:TutorialVAE"
    assert main(["train", *SMALL, "--program", spec, "--out", str(out)]) == 0
    with program_file.open("a") as f:
        f.write("\n# changed\n")
    with pytest.raises(CheckpointError, match="has changed since"):
        load_run(out)
    notes = []
    compare_runs([out], show=False, log=notes.append)  # the runs table still reads it, and says so
    assert len(notes) == 1 and "has changed since" in notes[0]
    capsys.readouterr()
    evaluate_args = ["evaluate", str(out), "--iwae-k", "4", "--elbo-samples", "2", "--limit", "5", "--quiet"]
    for argv in (evaluate_args, ["train", *SMALL, "--epochs", "2", "--out", str(out), "--resume"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has changed since" in err and f"--program {program_file.resolve()}:" in err
    assert main([*evaluate_args, "--program", spec]) == 0  # told again: the file as it is now
    program_file.unlink()
    with pytest.raises(CheckpointError, match="is gone since"):
        load_run(out)


def test_a_program_file_is_keyed_by_its_digest_in_the_run_cache(tmp_path, program_file, config):
    program, cache, lines = ProgramFile(str(program_file), "TutorialVAE", {"z_dim": 3}), tmp_path / "cache", []
    first = fit(config, program=program, cache=cache, progress=False, log=lines.append)
    again = fit(config, program=program, cache=cache, progress=False, log=lines.append)
    assert any(line.startswith("run cache: loaded") for line in lines) and again.path == first.path
    assert torch.equal(again.program.program.decoder.fc21.weight, first.program.program.decoder.fc21.weight)
    with program_file.open("a") as f:
        f.write("\n# changed\n")
    lines.clear()
    changed = fit(config, program=program, cache=cache, progress=False, log=lines.append)
    assert changed.path != first.path and any(line.startswith("run cache: training into") for line in lines)
    with pytest.raises(ConfigError, match="cannot key a run on your program's code"):
        fit(config, program=tutorial(), cache=cache, progress=False)


@pytest.mark.parametrize("program, args, message", [
    ("missing.py:TutorialVAE", None, "no such file"),
    ("{file}:NoSuchClass", None, "has no class NoSuchClass (its classes with model and guide: TutorialVAE, NoPlateVAE"),
    ("{file}:Encoder", None, "Encoder has no model and no guide method"),
    ("{file}:TutorialVAE", '{"zdim": 3}', "do not fit TutorialVAE(z_dim=2, hidden_dim=16)"),
    ("{file}", None, "expected FILE.py:CLASS"),
])
def test_a_bad_program_is_one_line_and_writes_nothing(tmp_path, program_file, capsys, program, args, message):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--program", program.format(file=program_file), "--out", str(out)]
    assert main(argv + (["--program-args", args] if args else [])) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("pyro-vae: error:")
    assert not out.exists()


def test_bad_program_arguments_are_a_usage_error_without_traceback(tmp_path, program_file):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", "train", *SMALL, "--program", f"{program_file}:TutorialVAE",
                           "--program-args", "{z_dim: 3}", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "expected a JSON object" in proc.stderr
    assert not out.exists()
