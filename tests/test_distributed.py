"""Data-parallel training under torchrun (gloo, loopback, this CPU): the scaling is exact.

Every test that starts processes runs them with a bounded ``timeout`` so a hang fails instead of
blocking CI; the process group itself has a timeout too (``pyro_vae.distributed.init``).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from pyro_vae import VAEConfig
from pyro_vae.infer.distributed import DataParallel, shard, under_torchrun
from pyro_vae.infer.fused import fused_elbo_loss
from pyro_vae.program.model import VAE

TIMEOUT = 240  # seconds for any command here; a hang fails the test
TINY = ["--limit", "210", "--val-size", "50", "--hidden", "32", "--z-dim", "2", "--epochs", "2", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(cwd, args, nproc=None):
    if nproc is None:
        cmd = [sys.executable, "-m", "pyro_vae", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "pyro_vae", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def test_shard_covers_each_row_once():
    for n in (1, 2, 5, 40, 41, 79):
        for w in (1, 2, 3, 8):
            parts = [shard(n, r, w) for r in range(w)]
            rows = [i for p in parts for i in range(n)[p]]
            assert rows == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1
    assert shard(40, 1, 2) == slice(20, 40)  # n = W * B: rank r takes rows [r B, (r + 1) B)


def test_no_process_group_no_data_parallel():
    assert not under_torchrun()
    assert DataParallel.current(torch.device("cpu")) is None  # fit() runs the single-process loop


def test_weighted_shard_losses_and_grads_equal_the_global_batch(binary_batch):
    """sum_r (n_r / n) * loss_r, with each rank's noise sliced from the global draw, is the
    single-process loss on the global batch, value and gradient (uneven shards included)."""
    config = VAEConfig(z_dim=3, hidden=(16,), limit=200)
    vae = VAE(config)
    x, idx, n, num_data = binary_batch[:11], torch.arange(11), 11, 200
    torch.manual_seed(5)
    full = fused_elbo_loss(vae, x, idx, num_data)
    g_full = torch.autograd.grad(full, list(vae.parameters()))
    for w in (2, 3):
        total, grads = 0.0, [torch.zeros_like(p) for p in vae.parameters()]
        for r in range(w):
            rows = shard(n, r, w)
            torch.manual_seed(5)  # every rank's stream is in the same state
            part = fused_elbo_loss(vae, x[rows], idx[rows], num_data, noise_rows=(rows.start, n))
            weight = (rows.stop - rows.start) / n
            total = total + weight * part.detach()
            for acc, g in zip(grads, torch.autograd.grad(part, list(vae.parameters()))):
                acc += weight * g
        assert torch.allclose(total, full.detach(), rtol=1e-5)
        for a, b in zip(grads, g_full):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _params(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["model"]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """2 ranks x batch 20 == 1 process x batch 40: same data order, binarization draws and noise;
    210 images, so each epoch ends with a short global batch of 10 (5 rows per rank)."""
    one = _train(tmp_path, [*TINY, "--batch-size", "40", "--out", "one"])
    assert one.returncode == 0, one.stderr
    two = _train(tmp_path, [*TINY, "--batch-size", "20", "--out", "two"], nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["epoch"] for h in h2] == [1, 2]
    for r1, r2 in zip(h1, h2):
        assert r2["train_elbo"] == pytest.approx(r1["train_elbo"], rel=1e-5)
        assert r2["val_elbo"] == pytest.approx(r1["val_elbo"], abs=5.0)  # sharded one-sample estimate
    # exactly one run folder, written once (rank 0), with everything in it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    files = {p.name for p in (tmp_path / "two").iterdir()}
    assert {"config.json", "history.json", "checkpoint.pt", "elbo.png", "samples.png"} <= files
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")]
    assert two.stdout.count("run folder:") == 1 and two.stdout.count("epoch   2/2") == 1


def test_default_run_folder_is_shared_and_mean_field_is_refused(tmp_path):
    ok = _train(tmp_path, [*TINY[:-3], "--epochs", "1", "--batch-size", "20", "--guide", "semi-amortized",
                           "--refine-steps", "1", "--quiet"], nproc=2)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "history.json").read_text())[0]["epoch"] == 1
    bad = _train(tmp_path, [*TINY, "--batch-size", "20", "--guide", "mean-field", "--out", "mf"], nproc=2)
    assert bad.returncode != 0
    assert "mean-field guide" in bad.stdout + bad.stderr and "torchrun" in bad.stdout + bad.stderr
    assert not (tmp_path / "mf").exists() or not (tmp_path / "mf" / "checkpoint.pt").exists()


def test_sigterm_stops_every_rank_at_the_same_step_and_resume_is_exact(tmp_path):
    """SIGTERM to torchrun: every rank finishes the same step, rank 0 checkpoints, no hang; the
    resumed 2-process run ends with the parameters of an uninterrupted 1-process run (batch 2B)."""
    import signal
    import time

    args = ["--limit", "2000", "--val-size", "50", "--hidden", "32", "--z-dim", "2", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "pyro_vae", "train", *args, "--batch-size", "20",
           "--epochs", "100", "--out", "two"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "two" / "history.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted by SIGTERM" in output and "torchrun" in output, output
    saved = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    done = len(saved["history"]) + 1  # finish the epoch it stopped in
    resumed = _train(tmp_path, [*args, "--batch-size", "20", "--epochs", str(done), "--out", "two", "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    one = _train(tmp_path, [*args, "--batch-size", "40", "--epochs", str(done), "--out", "one"])
    assert one.returncode == 0, one.stderr
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
