"""Reliability and security (issue #8): bad input gets one clear line and an exit code, training
survives NaN, Ctrl-C and SIGTERM, resumes exactly, and checkpoints are written atomically and
loaded safely.

The error matrix (:data:`CASES`) runs every row through ``pyro_vae.cli.main`` in-process (the
console script is ``sys.exit(main())``: an exception escaping ``main`` would be a traceback and
fails the test), and a sample of rows as real subprocesses. ``python tests/test_reliability.py``
runs every row as a subprocess and prints the matrix as a markdown table.
"""

from __future__ import annotations

import builtins
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import numpy as np
import pytest
import torch

import pyro_vae.infer.svi as train_module
from pyro_vae import VAE, VAEConfig, fit, load_run, write_idx
from pyro_vae.cli import main
from pyro_vae.core.errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted
from pyro_vae.core.rundir import RUN_FILES, load_checkpoint, prepare_run_dir, save_checkpoint

SMALL = ["--limit", "300", "--val-size", "100", "--epochs", "1", "--batch-size", "50", "--hidden", "64", "--quiet"]
TINY = dict(z_dim=3, hidden=(32,), batch_size=50, limit=300, val_size=100, validate=True)  # 6 steps per epoch


# ----------------------------------------------------------------------------- files to break things with


def images_folder(folder: Path, images=None, labels=None, raw: bytes = None) -> Path:
    """A ``--data-dir`` with ``train-images-idx3-ubyte.gz`` (array or raw bytes) and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (folder / "train-images-idx3-ubyte.gz").write_bytes(raw)
    else:
        write_idx(folder / "train-images-idx3-ubyte.gz", images)
    if labels is not None:
        write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    return folder


def digits(n=20, dtype=np.uint8, shape=(28, 28)):
    return np.random.default_rng(0).integers(0, 256, (n, *shape)).astype(dtype)


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the file appears if the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file that would create ``marker`` when loaded without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "pyro-vae/1", "config": {}, "model": {}, "history": [], "x": Payload(marker)}, path)
    return path


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


# ----------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], List[str]]  # (tmp folder, a trained 2-epoch run) -> argv
    message: str  # must appear in the one line on stderr
    code: int
    env: dict = None  # for the subprocess run


def _train(*args):
    return ["train", *SMALL, *args]


CASES = [
    Case("unknown dataset", lambda t, r: _train("--dataset", "mnist-6k"), "invalid choice: 'mnist-6k'", 2),
    Case("unknown flag", lambda t, r: _train("--frobnicate"), "unrecognized arguments: --frobnicate", 2),
    Case("--data-dir missing", lambda t, r: _train("--data-dir", str(t / "nope")), "no such folder", 1),
    Case("--data-dir is a file", lambda t, r: _train("--data-dir", str(Path(__file__))), "not a folder", 1),
    Case("--data-dir empty", lambda t, r: (t / "e").mkdir() or _train("--data-dir", str(t / "e")), "holds no files", 1),
    Case(
        "wrong magic number",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", raw=b"\x12\x34\x08\x03" + bytes(9)))),
        "bad magic number 12340803",
        1,
    ),
    Case(
        "truncated images file",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", raw=gzip.compress(
            bytes([0, 0, 8, 3]) + np.array([20, 28, 28], ">u4").tobytes() + bytes(5000))))),
        "but the file holds 5000 bytes (truncated or corrupt)",
        1,
    ),
    Case(
        "truncated gzip",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", raw=gzip.compress(
            bytes([0, 0, 8, 3]) + np.array([20, 28, 28], ">u4").tobytes() + bytes(15680))[:-20]))),
        "cannot read IDX file",
        1,
    ),
    Case(
        "image/label counts differ",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", digits(20), np.zeros(19, np.uint8)))),
        "19 labels for 20 images",
        1,
    ),
    Case(
        "evaluate, images of another size",  # any H x W trains; a run scores only its own size
        lambda t, r: (t / "d").mkdir() or write_idx(t / "d" / "t10k-images-idx3-ubyte.gz", digits(20, shape=(32, 32)))
        or ["evaluate", str(r), "--data-dir", str(t / "d")],
        "was trained on data of shape 1x28x28; ",
        1,
    ),
    Case(
        "NaN in the data",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", np.where(digits() > 250, np.nan, 0.5)))),
        "images contain NaN or infinite values",
        1,
    ),
    Case(
        "Inf in the data",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", np.where(digits() > 250, np.inf, 0.5)))),
        "images contain NaN or infinite values",
        1,
    ),
    Case(
        "float pixels outside [0, 1]",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", digits(dtype=np.float32)))),
        "float pixel values must lie in [0, 1], found [0, 255]",
        1,
    ),
    Case(
        "int32 pixels (no agreed scale)",
        lambda t, r: _train("--data-dir", str(images_folder(t / "d", digits(dtype=np.int32)))),
        "pixels are int32",
        1,
    ),
    Case("--epochs 0", lambda t, r: _train("--epochs", "0"), "epochs must be a positive integer", 2),
    Case("--batch-size -5", lambda t, r: _train("--batch-size", "-5"), "batch_size must be a positive integer", 2),
    Case("--z-dim 0", lambda t, r: _train("--z-dim", "0"), "z_dim must be a positive integer", 2),
    Case("--lr -1", lambda t, r: _train("--lr", "-1"), "lr must be positive and finite", 2),
    Case("--lr nan", lambda t, r: _train("--lr", "nan"), "lr must be positive and finite", 2),
    Case("--adam-beta1 1", lambda t, r: _train("--adam-beta1", "1"), "adam_beta1 must be in [0, 1); got 1.0", 2),
    Case("--limit 0", lambda t, r: _train("--limit", "0"), "limit must be a positive integer", 2),
    Case("--hidden 0", lambda t, r: _train("--hidden", "0"), "argument --hidden: expected positive widths", 2),
    Case("--val-size >= data", lambda t, r: _train("--val-size", "5000"), "val_size=5000 leaves no training images", 2),
    Case(
        "batch size > data",
        lambda t, r: _train("--batch-size", "1000", "--out", str(t / "o")),
        "batch_size=1000 exceeds the 300 training images",
        2,
    ),
    Case(
        "--device cuda without CUDA",
        lambda t, r: _train("--device", "cuda"),
        "--device cuda requested but CUDA is not available",
        2,
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    Case("--out is a file", lambda t, r: _train("--out", str(Path(__file__))), "exists and is not a folder", 2),
    Case(
        "--out not writable",
        lambda t, r: _train("--out", str(Path(__file__) / "run")),
        "cannot write there (Not a directory)",
        2,
    ),
    Case(
        "--out holds a run",
        lambda t, r: _train("--out", str(r)),
        "already holds a run (config.json, history.json, checkpoint.pt); pass --resume",
        2,
    ),
    Case("--resume with --overwrite", lambda t, r: _train("--out", str(r), "--resume", "--overwrite"), "contradict", 2),
    Case(
        "--resume, no checkpoint",
        lambda t, r: (t / "empty").mkdir() or _train("--out", str(t / "empty"), "--resume"),
        "holds no checkpoint.pt to resume from",
        1,
    ),
    Case(
        "--resume, other config",
        lambda t, r: _train("--epochs", "3", "--z-dim", "3", "--out", str(copy_run(r, t / "c")), "--resume"),
        "was trained with z_dim=2 (asked: 3)",
        2,
    ),
    Case(
        "--resume, fewer epochs",
        lambda t, r: _train("--z-dim", "2", "--out", str(copy_run(r, t / "c")), "--resume"),
        "already has 2 epoch(s); --epochs 1 cannot continue it",
        2,
    ),
    Case(
        "--resume, truncated checkpoint",
        lambda t, r: _train("--z-dim", "2", "--epochs", "3", "--out", str(truncate(copy_run(r, t / "c"))), "--resume"),
        "refusing to load checkpoint (the file is corrupt or truncated)",
        1,
    ),
    Case(
        "--resume, checkpoint with code",
        lambda t, r: (malicious_checkpoint(t / "m" / "checkpoint.pt", t / "PWNED") and
                      _train("--out", str(t / "m"), "--resume")),
        "holds a pickled object (io.open) that could run code",
        1,
    ),
    Case(
        "non-finite loss (--lr 1e10)",
        lambda t, r: _train("--lr", "1e10", "--epochs", "2", "--out", str(t / "o")),
        "non-finite loss (nan) in epoch 1/2, step 2/6; training stopped",
        1,
    ),
    Case("evaluate, no such folder", lambda t, r: ["evaluate", str(t / "nope")], "no such run folder", 1),
    Case(
        "evaluate, folder without checkpoint",
        lambda t, r: (t / "e").mkdir() or ["evaluate", str(t / "e")],
        "not a run folder (no checkpoint.pt)",
        1,
    ),
    Case(
        "evaluate, config does not match weights",
        lambda t, r: ["evaluate", str(edit_config(copy_run(r, t / "c"), z_dim=5))],
        "checkpoint does not match its config (tensor shapes differ",
        1,
    ),
    Case(
        "evaluate, corrupt checkpoint",
        lambda t, r: ["evaluate", str(garble(copy_run(r, t / "c")))],
        "refusing to load checkpoint (the file is corrupt or truncated)",
        1,
    ),
    Case(
        "evaluate, checkpoint with code",
        lambda t, r: ["evaluate", str(malicious_checkpoint(t / "m" / "checkpoint.pt", t / "PWNED").parent)],
        "could run code when loaded",
        1,
    ),
    Case(
        "grad-variance, checkpoint with code",
        lambda t, r: ["grad-variance", str(malicious_checkpoint(t / "m" / "checkpoint.pt", t / "PWNED").parent)],
        "could run code when loaded",
        1,
    ),
    Case(
        "compare-guides, run folder without checkpoint",
        lambda t, r: (t / "e").mkdir() or ["compare-guides", "--runs", str(t / "e")],
        "not a run folder (no checkpoint.pt)",
        1,
    ),
    Case("compare-guides --epochs 0", lambda t, r: ["compare-guides", "--epochs", "0"], "epochs must be a positive", 2),
    # the machine's limits (issue #19): memory asked for beyond what is free is refused before allocating
    Case(
        "train, --z-dim beyond memory",
        lambda t, r: _train("--z-dim", "1000000000", "--out", str(t / "o")),
        "not enough memory: training with z_dim=1000000000 needs about",
        1,
    ),
    Case(
        "train, --num-particles beyond memory",
        lambda t, r: _train("--num-particles", "100000000000", "--out", str(t / "o")),
        "activations of 5,000,000,000,000 rows through the networks), but only",
        1,
    ),
    Case(
        "evaluate, --iwae-k beyond memory",
        lambda t, r: ["evaluate", str(r), "--iwae-k", "100000000000", "--limit", "20", "--quiet"],
        "not enough memory: evaluating with iwae_k=100000000000, batch_size=100 needs about",
        1,
    ),
    Case(
        "grad-variance, --sweep beyond memory",
        lambda t, r: ["grad-variance", "--at-init", "--limit", "300", "--sweep", "1,100000000000", "--out", str(t)],
        "not enough memory: the gradient-variance lab with batch_size=64, num_particles=100000000000",
        1,
    ),
    Case(
        "compare-guides --out not writable",
        lambda t, r: ["compare-guides", "--runs", str(r), "--out", str(Path(__file__) / "out")],
        "Not a directory: ",
        1,
    ),
    Case(
        "grad-variance --out not writable",
        lambda t, r: ["grad-variance", "--at-init", "--limit", "300", "--repeats", "2", "--sweep", "",
                      "--out", str(Path(__file__) / "out")],
        "cannot write there (Not a directory)",
        2,
    ),
]


def truncate(run_dir: Path) -> Path:
    ckpt = run_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return run_dir


def garble(run_dir: Path) -> Path:
    (run_dir / "checkpoint.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    return run_dir


def edit_config(run_dir: Path, **changes) -> Path:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"].update(changes)
    torch.save(state, run_dir / "checkpoint.pt")
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 2-epoch run (z_dim 2), trained once for the rows that need one."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--z-dim", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_error_matrix(case, tmp_path, trained_run, capsys, monkeypatch):
    if case.env and "CUDA_VISIBLE_DEVICES" in case.env:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = case.argv(tmp_path, trained_run)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("pyro-vae"), err
    assert case.message in lines[0], err
    assert not (tmp_path / "PWNED").exists(), "a checkpoint ran code on load"


SUBPROCESS_SAMPLE = [  # one of each kind: argparse, data, environment, checkpoint security, memory
    "unknown dataset",
    "wrong magic number",
    "--device cuda without CUDA",
    "--resume, checkpoint with code",
    "train, --z-dim beyond memory",
]


def run_cli(argv, env=None, timeout=300) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_error_matrix_sample_as_real_processes(tmp_path, trained_run):
    """The same rows through ``python -m pyro_vae`` (run side by side): exit code, one line, no traceback."""
    cases = [c for c in CASES if c.id in SUBPROCESS_SAMPLE]
    assert len(cases) == len(SUBPROCESS_SAMPLE)
    procs = []
    for i, case in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        procs.append((case, i, run_cli(case.argv(tmp_path / str(i), trained_run), case.env)))
    for case, i, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == case.code, (case.id, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (case.id, err)
        assert case.message in err, (case.id, err)
        assert not (tmp_path / str(i) / "PWNED").exists()


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        main(["--debug", "train", *SMALL, "--epochs", "0"])


def test_disk_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """A full disk at the first checkpoint: one line that says so, where, and that nothing was
    saved yet; exit 1, no temporary file left behind."""

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "checkpoint.pt")

    monkeypatch.setattr("pyro_vae.core.rundir.torch.save", full)
    assert main(["train", *SMALL, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pyro-vae: error: the disk is full: cannot write {tmp_path / 'r' / 'checkpoint.pt'} ("), err
    assert err.endswith("; nothing was written to checkpoint.pt; no checkpoint yet: free some space, then start "
                        "again with --overwrite"), err
    assert len(err.splitlines()) == 1
    assert not list((tmp_path / "r").glob(".*.tmp")), "a temporary file was left behind"


def full_disk_after(monkeypatch, writes: int, how: str = "fsync") -> None:
    """Make every atomic write after the first ``writes`` fail as on a full disk: ``fsync`` raises
    ENOSPC (where a full disk shows with delayed allocation), or ``torch.save`` fails the way it
    does on a full file system, a ``RuntimeError: ... unexpected pos ...`` raised while handling
    the write's ``OSError``."""
    import errno

    import pyro_vae.core.rundir as rundir

    calls = {"n": 0}
    fsync, save = rundir.os.fsync, rundir.torch.save

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    def failing_save(obj, f):
        calls["n"] += 1
        if calls["n"] > writes:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:  # torch's writer reports it so, the OSError as its context
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        save(obj, f)

    if how == "fsync":
        monkeypatch.setattr(rundir.os, "fsync", failing_fsync)
    else:
        monkeypatch.setattr(rundir.torch, "save", failing_save)


@pytest.mark.parametrize("how", ["fsync", "torch.save"])
def test_full_disk_keeps_the_last_good_checkpoint_and_resume_is_exact(tmp_path, capsys, monkeypatch, trained_run,
                                                                    how):
    """The disk fills up while epoch 2's checkpoint is written: one line names the file, says the
    disk is full and that checkpoint.pt is intact with epoch 1; once there is room again,
    ``--resume`` ends exactly where an uninterrupted run does."""
    out = tmp_path / "r"
    argv = ["train", *SMALL, "--epochs", "2", "--z-dim", "2", "--out", str(out)]
    full_disk_after(monkeypatch, 3 if how == "fsync" else 1, how)  # fsync: config.json, checkpoint 1, history 1
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"pyro-vae: error: the disk is full: cannot write {out / 'checkpoint.pt'} ("), err
    assert err.endswith("the previous checkpoint.pt is intact: it keeps the last good state (1 epoch); "
                        "free some space, then continue with --resume"), err
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    assert len(load_checkpoint(out / "checkpoint.pt")["history"]) == 1
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert state_equal(load_run(out), load_run(trained_run))


def test_full_disk_while_writing_history_json(tmp_path, capsys, monkeypatch):
    """checkpoint.pt was written, history.json was not: the line says which file failed and that
    checkpoint.pt holds the epoch."""
    out = tmp_path / "r"
    full_disk_after(monkeypatch, 2)  # config.json, checkpoint 1; history 1 fails
    assert main(["train", *SMALL, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"cannot write {out / 'history.json'} (" in err and "; nothing was written to history.json: " in err, err
    assert err.endswith("checkpoint.pt keeps the last good state (1 epoch); free some space, then continue with "
                        "--resume"), err


@pytest.mark.parametrize("command", ["evaluate --save", "grad-variance", "compare-guides"])
def test_full_disk_for_other_commands_outputs(tmp_path, capsys, monkeypatch, trained_run, command):
    """Each command that writes files says the disk is full and which file, exit 1, no temporary file."""
    run = copy_run(trained_run, tmp_path / "run")
    argv, target = {
        "evaluate --save": (["evaluate", str(run), "--iwae-k", "5", "--elbo-samples", "2", "--limit", "20", "--quiet",
                             "--save"], run / "eval.json"),
        "grad-variance": (["grad-variance", str(run), "--repeats", "2", "--sweep", "", "--batch-size", "8",
                           "--out", str(tmp_path / "gv")], tmp_path / "gv" / "grad_variance.md"),
        "compare-guides": (["compare-guides", "--runs", str(run), "--iwae-k", "5", "--eval-limit", "5",
                            "--local-steps", "2", "--star-steps", "2", "--json", "--out", str(tmp_path / "cg")],
                           tmp_path / "cg" / "comparison.json"),
    }[command]
    if command == "evaluate --save" and "--save" not in build_parser_help("evaluate"):
        pytest.skip("this evaluate has no --save")
    full_disk_after(monkeypatch, 0)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pyro-vae: error: the disk is full: cannot write {target} ("), err
    assert not list(target.parent.glob(".*.tmp"))


def build_parser_help(command: str) -> str:
    from pyro_vae.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_full_standard_output_is_one_line(trained_run, tmp_path):
    """``pyro-vae evaluate --json > FILE`` on a full disk (``/dev/full`` fails every write with
    ENOSPC): one line, exit 1, and no second complaint from Python's flush at exit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    argv = [sys.executable, "-m", "pyro_vae", "evaluate", str(trained_run), "--iwae-k", "5", "--elbo-samples", "2",
            "--limit", "20", "--quiet", "--json"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "pyro-vae: error: the disk is full: cannot write the standard output to /dev/full"


FULL_TMPFS = """
set -e
mount -t tmpfs -o size=3m tmpfs "$1"
set +e
"$2" -m pyro_vae train --limit 300 --val-size 100 --epochs 3 --batch-size 50 --hidden 100 --z-dim 2 --quiet \
    --out "$1/run" > /dev/null 2> "$1/err.txt"
echo "exit code $?"
cat "$1/err.txt"
"$2" -c "import torch; print('epochs', len(torch.load('$1/run/checkpoint.pt', weights_only=True)['history']))"
ls -a "$1/run"
"""


def test_a_real_full_file_system(tmp_path):
    """A real 3 MB tmpfs (mounted in a private mount namespace: ``unshare``, root or not; skipped
    where that is not permitted): the first checkpoint (~2 MB) fits, the second does not."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode(errors='replace').strip()}")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_TMPFS, "sh", str(mnt), sys.executable],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stdout.splitlines()
    assert lines[0] == "exit code 1", proc.stdout + proc.stderr
    err = lines[1]
    assert err.startswith(f"pyro-vae: error: the disk is full: cannot write {mnt / 'run' / 'checkpoint.pt'} ("), err
    assert f"left on the file system at {mnt});" in err, err
    assert err.endswith("the previous checkpoint.pt is intact: it keeps the last good state (1 epoch); "
                        "free some space, then continue with --resume"), err
    assert "epochs 1" in lines, proc.stdout
    assert not [name for name in lines if name.endswith(".tmp")], proc.stdout


@pytest.mark.parametrize("error, shown", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1600000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "the CPU could not allocate 1.5 TiB"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB"),
     "the GPU could not allocate 2.00 GiB"),
    (MemoryError(), "the CPU could not allocate the memory it needed"),
])
def test_a_failed_allocation_is_one_line(tmp_path, capsys, monkeypatch, error, shown):
    """An allocation the estimate did not foresee fails anyway: one line with the amount and the
    sizes this command used, exit 1 (``--debug`` still shows the traceback)."""

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_module, "build_program", fail)  # the Trainer builds the program through it
    argv = ["train", *SMALL, "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"pyro-vae: error: out of memory: {shown} for pyro-vae train with --z-dim 50, --hidden 64, "
                   "--batch-size 50, --num-particles 1; lower these sizes"), err
    with pytest.raises(type(error)):
        main(["--debug", *argv[:-1], str(tmp_path / "r2")])


def test_memory_estimate_counts_the_parameters_exactly_and_names_the_setting(monkeypatch):
    from pyro_vae.core.errors import ResourceError
    from pyro_vae.program import memory

    for config, num_data in [(VAEConfig(), None), (VAEConfig(likelihood="normal", hidden=(32, 16)), None),
                             (VAEConfig(guide="mean-field", z_dim=3), 70), (VAEConfig(guide="semi-amortized"), None)]:
        real = sum(p.numel() for p in VAE(config, num_data=num_data).parameters())
        assert memory.parameter_count(config, num_data) == real
    monkeypatch.setattr(memory, "available_memory", lambda device: 10 * 2**20)  # 10 MiB free
    memory.check_memory(VAEConfig(hidden=(64,)), "cpu", rows=128)  # small enough: nothing happens
    with pytest.raises(ResourceError, match=r"training with hidden=4000 needs about .* MiB \(6,\d{3},\d{3} "
                                            r"parameters, their gradients and Adam's two moments\), but only "
                                            r"10\.0 MiB is free on cpu; lower hidden$"):
        memory.check_memory(VAEConfig(hidden=(4000,)), "cpu", rows=128)
    with pytest.raises(ResourceError, match="with batch_size=128, num_particles=1000 needs .* lower batch_size"):
        memory.check_memory(VAEConfig(hidden=(64,)), "cpu", rows=128_000,
                            rows_from="batch_size=128, num_particles=1000")


def test_checkpoint_that_vanishes_or_cannot_be_opened_says_so(tmp_path, capsys, monkeypatch, trained_run):
    """An OS error while reading a checkpoint (gone between the check and the read, too many open
    files, ...) is named as such, not called a corrupt file."""
    import errno

    def gone(path, *args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr("pyro_vae.core.rundir.torch.load", gone)
    assert main(["evaluate", str(trained_run)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pyro-vae: error: {trained_run / 'checkpoint.pt'}: cannot read the checkpoint (No such file or " \
                  "directory)", err


def test_too_many_open_files_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def emfile(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("pyro_vae.core.rundir.tempfile.mkstemp", emfile)
    assert main(["train", *SMALL, "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.strip() == "pyro-vae: error: Too many open files"


# ----------------------------------------------------------------------------- checkpoints


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    path = malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match=r"pickled object \(\S*open\) that could run code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_run(tmp_path)
    assert not marker.exists()
    # the file really is dangerous: an unsafe load runs its code
    torch.load(path, weights_only=False)["x"].close()
    assert marker.exists()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A crash in the middle of writing leaves the previous checkpoint whole and no stray file."""
    config = VAEConfig(z_dim=2, hidden=(8,))
    vae = VAE(config)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, vae, None, config, [{"epoch": 1}])
    before = path.read_bytes()

    def crash_mid_write(state, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # as if Ctrl-C (or a kill) came mid-write

    monkeypatch.setattr("pyro_vae.core.rundir.torch.save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, vae, None, config, [{"epoch": 1}, {"epoch": 2}])
    assert path.read_bytes() == before and load_checkpoint(path)["history"] == [{"epoch": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_saving_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    """``checkpoint.pt`` pointing outside the run folder: the link is replaced, its target untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").symlink_to(outside)
    config = VAEConfig(z_dim=2, hidden=(8,))
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", VAE(config), None, config, [])
    assert outside.read_text() == "precious"
    assert not (tmp_path / "run" / "checkpoint.pt").is_symlink()


def test_a_crafted_config_cannot_make_loading_allocate(tmp_path):
    """``hidden=[10**9]`` with small weights: refused by comparing shapes before allocating."""
    config = VAEConfig(z_dim=2, hidden=(8,))
    save_checkpoint(tmp_path / "checkpoint.pt", VAE(config), None, config, [])
    edit_config(tmp_path, hidden=[10**9])
    with pytest.raises(CheckpointError, match="tensor shapes differ"):
        load_run(tmp_path)


@pytest.mark.parametrize("key, value", [("z_dim", "2"), ("hidden", [8.5]), ("lr", True), ("dataset", 3)])
def test_config_values_from_files_are_type_checked(key, value):
    with pytest.raises(ConfigError, match=f"config value {key}=.* has the wrong type"):
        VAEConfig.from_dict({**VAEConfig().to_dict(), key: value})


def test_overwrite_replaces_the_whole_previous_run(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name in RUN_FILES + ("manifold.png", "notes.txt"):
        (out / name).write_text("old")
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_run_dir(out)
    from pyro_vae.core.rundir import clear_run_files

    prepare_run_dir(out, overwrite=True)
    clear_run_files(out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # only pyro-vae's own files go


# ----------------------------------------------------------------------------- faults during training


def inject(monkeypatch, actions: dict):
    """Wrap the loss: on loss evaluation number ``n`` (1-based; 6 per epoch with TINY) return
    ``actions[n](loss, vae)`` instead of the loss."""
    calls = {"n": 0}
    make_loss = train_module.make_loss

    def patched(vae, config, *args, **kwargs):
        inner = make_loss(vae, config, *args, **kwargs)

        def loss(*loss_args, **loss_kwargs):
            calls["n"] += 1
            value = inner(*loss_args, **loss_kwargs)
            action = actions.get(calls["n"])
            return value if action is None else action(value, vae)

        loss.fused = inner.fused
        return loss

    monkeypatch.setattr(train_module, "make_loss", patched)


def state_equal(a, b) -> bool:
    sa, sb = a.vae.state_dict(), b.vae.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def straight():
    """The uninterrupted reference: 3 epochs of TINY, seed 0, and the RNG state it ends in."""
    run = fit(VAEConfig(epochs=3, **TINY), progress=False, log=lambda s: None)
    return run, torch.get_rng_state()


def test_resume_after_epoch_1_of_3_equals_uninterrupted(tmp_path, straight):
    """SIGINT right after epoch 1: exit code 130 and a checkpoint; resuming gives the very same
    parameters, history and random stream as the uninterrupted run."""
    config, out = VAEConfig(epochs=3, **TINY), tmp_path / "r"

    def log(line):
        if line.startswith("epoch   1/3"):
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="interrupted by SIGINT in epoch 2/3; saved .* --resume") as e:
        fit(config, out, progress=False, log=log)
    assert e.value.exit_code == 130
    state = load_checkpoint(out / "checkpoint.pt")
    assert len(state["history"]) == 1 and state["progress"] is None
    resumed = fit(config, out, progress=False, resume=True, log=lambda s: None)
    reference, rng = straight
    assert state_equal(resumed, reference)
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    assert torch.equal(load_checkpoint(out / "checkpoint.pt")["rng"]["torch"], rng)  # the random stream too
    assert without_seconds(json.loads((out / "history.json").read_text())) == without_seconds(reference.history)


@pytest.mark.parametrize("at_call", [3, 9], ids=["epoch 1 step 3", "epoch 2 step 3"])
def test_resume_from_the_middle_of_an_epoch_equals_uninterrupted(tmp_path, monkeypatch, straight, at_call):
    """SIGTERM during a step: the step finishes, the checkpoint holds the position in the epoch
    (its order, step, partial loss) and resuming ends exactly where the uninterrupted run does."""
    config, out = VAEConfig(epochs=3, **TINY), tmp_path / "r"
    inject(monkeypatch, {at_call: lambda loss, vae: os.kill(os.getpid(), signal.SIGTERM) or loss})
    epoch, step = divmod(at_call - 1, 6)
    with pytest.raises(TrainingInterrupted, match=f"SIGTERM in epoch {epoch + 1}/3 after step {step + 1}/6") as e:
        fit(config, out, progress=False, log=lambda s: None)
    assert e.value.exit_code == 143
    progress = load_checkpoint(out / "checkpoint.pt")["progress"]
    assert (progress["epoch"], progress["step"]) == (epoch, step + 1)
    monkeypatch.undo()
    resumed = fit(config, out, progress=False, resume=True, log=lambda s: None)
    reference, rng = straight
    assert state_equal(resumed, reference)
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    assert torch.equal(load_checkpoint(out / "checkpoint.pt")["rng"]["torch"], rng)  # the random stream too


@pytest.mark.parametrize("point, where", [
    ("1:start", "in epoch 1/3;"),  # before the first step: nothing trained yet
    ("2:end", "in epoch 3/3;"),  # in an epoch's bookkeeping: that epoch is kept, the stop comes before the next
    ("3:6", "after the last epoch;"),  # in the last step: the training completes
])
def test_a_signal_at_a_chosen_point_resumes_exactly(tmp_path, monkeypatch, straight, point, where):
    """``PYRO_VAE_SIGNAL_AT`` delivers SIGTERM at a chosen point of the loop (the same hook the
    torchrun tests use); each stop resumes to the uninterrupted run exactly."""
    config, out = VAEConfig(epochs=3, **TINY), tmp_path / "r"
    monkeypatch.setenv("PYRO_VAE_SIGNAL_AT", point)
    with pytest.raises(TrainingInterrupted, match=f"interrupted by SIGTERM {where}"):
        fit(config, out, progress=False, log=lambda s: None)
    monkeypatch.delenv("PYRO_VAE_SIGNAL_AT")
    resumed = fit(config, out, progress=False, resume=True, log=lambda s: None)
    reference, rng = straight
    assert state_equal(resumed, reference)
    assert without_seconds(resumed.history) == without_seconds(reference.history)
    assert torch.equal(load_checkpoint(out / "checkpoint.pt")["rng"]["torch"], rng)


def test_a_bad_signal_point_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("PYRO_VAE_SIGNAL_AT", "2:middle")
    with pytest.raises(ConfigError, match="PYRO_VAE_SIGNAL_AT='2:middle': expected EPOCH:POINT"):
        fit(VAEConfig(epochs=1, **TINY), progress=False, log=lambda s: None)


def test_resume_restores_state_kept_in_pyro_param_store(tmp_path, monkeypatch):
    """The score-function estimator's decaying-average baseline lives in Pyro's param store, not
    in the model: it is checkpointed too, so resuming is still exact."""
    config, out = VAEConfig(epochs=1, estimator="score", baseline="decaying-avg", **TINY), tmp_path / "r"
    reference = fit(config, progress=False, log=lambda s: None)
    inject(monkeypatch, {3: lambda loss, vae: os.kill(os.getpid(), signal.SIGINT) or loss})
    with pytest.raises(TrainingInterrupted):
        fit(config, out, progress=False, log=lambda s: None)
    assert load_checkpoint(out / "checkpoint.pt")["param_store"]  # the running averages
    monkeypatch.undo()
    resumed = fit(config, out, progress=False, resume=True, log=lambda s: None)
    assert state_equal(resumed, reference)
    assert without_seconds(resumed.history) == without_seconds(reference.history)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """NaN at epoch 2, step 3: stopped with the place named; checkpoint.pt is byte for byte the
    one written after epoch 1, and loads with finite parameters."""
    config, out, saved = VAEConfig(epochs=3, **TINY), tmp_path / "r", {}

    def snapshot(loss, vae):  # epoch 2, step 1: the epoch-1 checkpoint is on disk
        saved["bytes"] = (out / "checkpoint.pt").read_bytes()
        return loss

    inject(monkeypatch, {7: snapshot, 9: lambda loss, vae: loss * float("nan")})
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) in epoch 2/3, step 3/6; training stopped.*"
                                            r"keeps the last good state \(1 epochs\)"):
        fit(config, out, progress=False, log=lambda s: None)
    assert (out / "checkpoint.pt").read_bytes() == saved["bytes"]
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert all(torch.isfinite(p).all() for p in load_run(out).vae.parameters())


def test_nonfinite_skip_skips_the_step_and_goes_on(monkeypatch):
    lines = []
    inject(monkeypatch, {9: lambda loss, vae: loss * float("inf")})
    run = fit(VAEConfig(epochs=2, on_nonfinite="skip", **TINY), progress=False, log=lines.append)
    assert [h.get("skipped_steps") for h in run.history] == [None, 1]
    assert "non-finite loss (inf) in epoch 2/2, step 3/6: step skipped" in lines
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())


def test_nonfinite_gradients_are_skipped_too(monkeypatch):
    """A finite loss with an infinite gradient (d sqrt(u)/du at u = 0) is caught in skip mode."""

    def infinite_gradient(loss, vae):
        p = next(vae.parameters())
        return loss + torch.sqrt(p - p.detach()).sum()  # adds exactly 0, gradient +inf

    inject(monkeypatch, {2: infinite_gradient})
    lines = []
    run = fit(VAEConfig(epochs=1, on_nonfinite="skip", **TINY), progress=False, log=lines.append)
    assert "non-finite gradients in epoch 1/1, step 2/6: step skipped" in lines
    assert run.history[0]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in run.vae.parameters())


def test_resume_checks_the_data_and_the_checkpoint(tmp_path, trained_run):
    out = copy_run(trained_run, tmp_path / "c")
    config = VAEConfig(z_dim=2, hidden=(64,), epochs=3, batch_size=50, limit=299, val_size=100)
    with pytest.raises(ConfigError, match="limit=300 \\(asked: 299\\)"):
        fit(config, out, resume=True, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    zeros = torch.zeros(300, dtype=torch.long)  # not a permutation
    state["progress"] = dict(epoch=2, step=1, order=zeros, loss_sum=torch.zeros(()), skipped=[], seconds=0.0)
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a permutation"):
        fit(config.replace(limit=300), out, resume=True, progress=False)


def test_a_second_signal_aborts_at_once_and_handlers_are_restored():
    from pyro_vae.infer.interrupts import StopSignals

    before = signal.getsignal(signal.SIGINT)
    notices = []
    with pytest.raises(KeyboardInterrupt):
        with StopSignals(notices.append) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM  # the first one only asks to stop
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the second signal raises
    assert notices == ["SIGTERM received: stopping after this step (send it again to abort now)"]
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- signals, for real


def wait_for(path: Path, proc: subprocess.Popen, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run wrote no history.json in time"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(tmp_path, signum):
    """A real ``pyro-vae train`` gets the signal after its first epoch: it stops cleanly (exit
    128 + signal) with a loadable checkpoint and the exact command to continue; that command,
    run for one epoch more, gives the same parameters as an uninterrupted run of that length."""
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--epochs", "500", "--z-dim", "2", "--out", str(out)]
    proc = run_cli(argv)
    wait_for(out / "history.json", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert "Traceback" not in err and f"pyro-vae: interrupted by {name} in epoch" in err, err
    assert f"pyro-vae train {' '.join(SMALL)} --epochs 500 --z-dim 2 --out {out} --resume" in err, err
    done = len(load_checkpoint(out / "checkpoint.pt")["history"])
    assert 1 <= done < 500 and load_run(out).sample(2).shape == (2, 784)
    if signum == signal.SIGTERM:  # continue it, one epoch further, and compare
        more = ["--epochs", str(done + 1)]
        assert main(["train", *SMALL, "--z-dim", "2", *more, "--out", str(out), "--resume"]) == 0
        config = VAEConfig(z_dim=2, hidden=(64,), epochs=done + 1, batch_size=50, limit=300, val_size=100)
        straight = fit(config, progress=False, log=lambda s: None)  # what those flags mean, uninterrupted
        assert state_equal(load_run(out), straight)
        assert without_seconds(load_run(out).history) == without_seconds(straight.history)


# ----------------------------------------------------------------------------- the table for the docs

if __name__ == "__main__":  # python tests/test_reliability.py: every row as a real process
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "trained"
        subprocess.run([sys.executable, "-m", "pyro_vae", "train", *SMALL, "--epochs", "2", "--z-dim", "2",
                        "--out", str(run_dir)], check=True, capture_output=True)
        print("| case | command | message shown (stderr) | exit code |\n|---|---|---|---|")
        for i, case in enumerate(CASES):
            (tmp / str(i)).mkdir()
            argv = case.argv(tmp / str(i), run_dir)
            proc = run_cli(argv, case.env)
            _, err = proc.communicate()
            shown = " ".join(["pyro-vae", *argv]).replace(str(tmp / str(i)), "T").replace(str(run_dir), "RUN")
            shown = shown.replace(str(Path(__file__)), "FILE").replace(" ".join(SMALL), "…")
            message = err.strip().replace(str(tmp / str(i)), "T").replace(str(run_dir), "RUN")
            message = message.replace(str(Path(__file__)), "FILE").replace("|", "\\|")
            ok = "" if proc.returncode == case.code and case.message in err else " **(unexpected)**"
            print(f"| {case.id} | `{shown}` | {message} | {proc.returncode}{ok} |")
