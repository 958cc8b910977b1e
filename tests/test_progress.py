"""Progress bars come from ``tqdm.auto``: a widget in Jupyter where ipywidgets is installed, text
otherwise, and no "IProgress not found" warning in a notebook kernel without ipywidgets.

Each case runs in a fresh interpreter (the bar is chosen once, at import); ``ipykernel.zmqshell``
in ``sys.modules`` is what makes tqdm believe it runs in a Jupyter kernel. Training draws its bar only
where the output is a terminal: ``pyro-vae train > train.log 2>&1`` writes one line per epoch."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from pyro_vae.core import progress

IN_A_KERNEL = "import ipykernel.zmqshell\n"
NO_IPYWIDGETS = "import sys\nsys.modules['ipywidgets'] = None\n"
FAKE_IPYWIDGETS = """import sys, types
widgets = types.ModuleType("ipywidgets")
widgets.FloatProgress = widgets.HBox = widgets.HTML = type("Widget", (), {})
sys.modules["ipywidgets"] = widgets
"""


def python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_without_ipywidgets_a_kernel_gets_text_bars_and_no_warning():
    control = python(NO_IPYWIDGETS + IN_A_KERNEL + "import tqdm.auto")  # what pyro.infer imports: it warns
    assert "IProgress not found" in control.stderr
    ours = python(NO_IPYWIDGETS + IN_A_KERNEL + "import pyro_vae\nfrom pyro_vae.core.progress import tqdm\n"
                  "import tqdm.notebook as notebook, tqdm.std as std\n"
                  "print(issubclass(tqdm, std.tqdm) and not issubclass(tqdm, notebook.tqdm))")
    assert ours.stdout.strip() == "True" and "IProgress" not in ours.stderr


def test_with_ipywidgets_a_kernel_gets_widget_bars():
    proc = python(FAKE_IPYWIDGETS + IN_A_KERNEL + "import runpy, tqdm.notebook as notebook\n"
                  f"tqdm = runpy.run_path({progress.__file__!r})['tqdm']\n"  # the module alone: quick
                  "print(issubclass(tqdm, notebook.tqdm))")
    assert proc.stdout.strip() == "True", proc.stderr


# ---- logs: one line per epoch where the output is not a terminal, a bar where it is ----------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_train(tmp_path) -> list:
    """``pyro-vae train``, 3 epochs of 4 steps on 200 images."""
    return [sys.executable, "-m", "pyro_vae", "train", "--limit", "200", "--epochs", "3", "--z-dim", "2",
            "--hidden", "16", "--batch-size", "50", "--out", str(tmp_path / "run")]


def test_train_into_a_log_file_writes_one_line_per_epoch(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "wb") as f:  # pyro-vae train ... > train.log 2>&1
        proc = subprocess.run(tiny_train(tmp_path), stdout=f, stderr=subprocess.STDOUT, env=ENV, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert "\r" not in text and "it/s" not in text, text  # no progress-bar frames
    assert [line.split()[:2] for line in lines[:3]] == [["epoch", "1/3"], ["epoch", "2/3"], ["epoch", "3/3"]], text
    assert len(lines) == 3 + 2, text  # the epochs, then "trained ..." and "run folder: ..."
    assert len(text.encode()) / 3 < 200, text  # bytes per epoch


def test_train_in_a_terminal_draws_the_bar(tmp_path):
    """Control: the bar is off because the output is a file, not because bars are off everywhere."""
    leader, follower = pty.openpty()  # the standard error of the command: a terminal, 100 columns wide
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(tiny_train(tmp_path), stdout=subprocess.DEVNULL, stderr=follower, env=ENV)
    os.close(follower)
    frames = b""
    try:
        while True:  # read while it runs, or the terminal's buffer fills up
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command has exited and closed the terminal
                break
            if not chunk:
                break
            frames += chunk
    finally:
        os.close(leader)
        assert proc.wait(timeout=300) == 0, frames[-2000:]
    assert b"\r" in frames and b"epoch 1/3" in frames and b"it/s" in frames, frames[:500]


def test_fit_with_progress_draws_no_bar_into_a_captured_stream(capsys):
    from pyro_vae import VAEConfig, fit

    fit(VAEConfig(epochs=2, z_dim=2, hidden=(16,), batch_size=50, limit=100), progress=True)
    captured = capsys.readouterr()  # pytest's capture: no terminal
    assert "\r" not in captured.err and "it/s" not in captured.err, captured.err
    assert [line.split()[:2] for line in captured.out.splitlines()] == [["epoch", "1/2"], ["epoch", "2/2"]], captured.out
