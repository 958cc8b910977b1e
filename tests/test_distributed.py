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


def _env(signal_at=None):
    """The environment of a run; ``signal_at``: ``PYRO_VAE_SIGNAL_AT`` (pyro_vae.infer.interrupts),
    a signal delivered at a chosen point of the loop instead of at a wall-clock moment."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYRO_VAE_SIGNAL_AT"):
        env.pop(k, None)
    if signal_at is not None:
        env["PYRO_VAE_SIGNAL_AT"] = signal_at
    return env


def _train(cwd, args, nproc=None, signal_at=None):
    if nproc is None:
        cmd = [sys.executable, "-m", "pyro_vae", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "pyro_vae", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(signal_at), capture_output=True, text=True, timeout=TIMEOUT)


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted TINY runs, trained once: ``one`` (1 process, batch 40) and ``two`` (2 ranks x
    batch 20), with the two commands' output."""
    tmp_path = tmp_path_factory.mktemp("reference")
    one = _train(tmp_path, [*TINY, "--batch-size", "40", "--out", "one"])
    two = _train(tmp_path, [*TINY, "--batch-size", "20", "--out", "two"], nproc=2)
    return tmp_path, one, two


def test_two_processes_equal_one_process_with_twice_the_batch(reference):
    """2 ranks x batch 20 == 1 process x batch 40: same data order, binarization draws and noise;
    210 images, so each epoch ends with a short global batch of 10 (5 rows per rank)."""
    tmp_path, one, two = reference
    assert one.returncode == 0, one.stderr
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
    resumed 2-process run ends with the parameters of an uninterrupted 1-process run (batch 2B).

    The signal is sent to torchrun (which forwards it to every rank, as a user or a scheduler
    does) by rank 0 itself at step 3 of epoch 2 (``PYRO_VAE_SIGNAL_AT=2:3:0:parent``), not after
    a wall-clock wait: the ranks still receive it at moments of their own, but always in epoch 2."""
    args = ["--limit", "2000", "--val-size", "50", "--hidden", "32", "--z-dim", "2", "--quiet"]
    stopped = _train(tmp_path, [*args, "--batch-size", "20", "--epochs", "100", "--out", "two"], nproc=2,
                     signal_at="2:3:0:parent")
    output = stopped.stdout + stopped.stderr
    assert "interrupted by SIGTERM in epoch 2/100 after step" in output and "torchrun" in output, output
    saved = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    done = len(saved["history"]) + 1  # finish the epoch it stopped in
    assert done == 2 and saved["progress"]["epoch"] == 1
    resumed = _train(tmp_path, [*args, "--batch-size", "20", "--epochs", str(done), "--out", "two", "--resume"], nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    one = _train(tmp_path, [*args, "--batch-size", "40", "--epochs", str(done), "--out", "one"])
    assert one.returncode == 0, one.stderr
    a, b = _params(tmp_path / "one"), _params(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


#: (PYRO_VAE_SIGNAL_AT, where the run says it stopped): TINY has 6 steps per epoch, 2 epochs
SIGNAL_POINTS = [
    ("1:4+:1", "in epoch 1/2 after step 5/6;"),  # rank 1 alone, after its step 4 read the flag: stops after 5
    ("1:end:0", "in epoch 2/2;"),  # rank 0 alone, in the epoch's bookkeeping (after validation)
    ("2:start:1", "in epoch 2/2;"),  # rank 1 alone, at the start of an epoch (right after a resume)
    ("2:6", "after the last epoch;"),  # the last step of the last epoch: the check after the loop
]


def test_a_signal_at_any_point_resumes_exactly(tmp_path, reference):
    """One run stopped four times at chosen points (a signal on one rank or on every rank; after a
    step read the stop flag; in the bookkeeping; at an epoch's start; in the last step), resumed
    after each: every stop is where the signal asked, both ranks stop at that same place, and the
    trained run equals the uninterrupted 2-process run bit for bit. (Mid-epoch stops with the
    signal on every rank: the test above.)"""
    argv = [*TINY, "--batch-size", "20", "--out", "run"]
    for i, (point, where) in enumerate(SIGNAL_POINTS):
        stopped = _train(tmp_path, [*argv, *(["--resume"] if i else [])], nproc=2, signal_at=point)
        output = stopped.stdout + stopped.stderr
        assert stopped.returncode != 0, (point, output)
        assert output.count(f"pyro-vae: interrupted by SIGTERM {where}") == 2, (point, output)  # both ranks
    ref, _, _ = reference  # the last stop came after the last epoch: the training is complete
    a, b = _params(ref / "two"), _params(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in h.items() if k != "seconds"}  # noqa: E731
                          for h in json.loads((path / "history.json").read_text())]
    assert strip(tmp_path / "run") == strip(ref / "two")
