import json
import subprocess
import sys

import pytest
import torch

from pyro_vae import load_run
from pyro_vae.cli import main

FILES = ["config.json", "history.json", "checkpoint.pt", "elbo.png", "reconstructions.png", "samples.png", "latent.png"]
SMALL = ["--limit", "300", "--val-size", "100", "--epochs", "1", "--batch-size", "50", "--hidden", "64", "--quiet"]


def _history_without_times(path):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((path / "history.json").read_text())]


def test_train_writes_run_folder_and_is_reproducible(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *SMALL, "--z-dim", "2", "--out", str(a)]) == 0
    assert f"run folder: {a}" in capsys.readouterr().out
    for name in FILES + ["manifold.png"]:
        assert (a / name).is_file(), name
    state = torch.load(a / "checkpoint.pt", weights_only=True)
    assert {"config", "model", "optimizer", "history"} <= set(state)
    assert main(["train", *SMALL, "--z-dim", "2", "--out", str(b)]) == 0
    history = _history_without_times(a)
    assert history == _history_without_times(b)
    assert len(history) == 1 and history[0]["val_elbo"] < 0
    run = load_run(a)
    assert run.sample(3).shape == (3, 784) and run.config.z_dim == 2


def test_python_dash_m_runs_the_same_cli(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", *SMALL, "--z-dim", "3", "--elbo", "meanfield", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert all((out / name).is_file() for name in FILES)
    assert not (out / "manifold.png").exists()  # only for z_dim = 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--z-dim", "-1"], "z_dim must be a positive integer"),
        (["--lr", "0"], "lr must be positive"),
        (["--batch-size", "100000"], "exceeds the"),
        (["--data-dir", "/nonexistent/folder"], "no such folder"),
    ],
)
def test_user_mistakes_give_one_line_and_no_traceback(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", *SMALL, "--out", str(tmp_path / "r"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr and proc.stderr.startswith("pyro-vae: error:")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["train", *SMALL, "--out", out]) == 0
    assert main(["train", *SMALL, "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", *SMALL, "--out", out, "--overwrite"]) == 0
