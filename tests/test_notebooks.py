"""Every teaching notebook executes top to bottom in a fresh kernel, in smoke mode (``CI`` set)."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = [  # a notebook added to or removed from notebooks/ must be added here or removed too
    "01_two_perspectives.ipynb",
    "02_mean_field_vs_amortized.ipynb",
    "03_reparameterization_vs_score_function.ipynb",
    "04_latent_space.ipynb",
    "05_semi_supervised_m2.ipynb",
    "06_flows_and_priors.ipynb",
    "07_your_own_program.ipynb",
]
KERNEL = "pyro-vae-test"


def test_every_notebook_is_executed():
    assert set(NOTEBOOKS) == {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")}


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """A folder holding a kernelspec that starts the Python running pytest (whatever ``python3``
    kernel a machine has installed may be another interpreter, without this package)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return root


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, jupyter_path, tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CI", "1")  # the kernel inherits the environment: smoke mode, small and fast
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    cache = tmp_path_factory.mktemp("run-cache")  # outside the working directory below
    monkeypatch.setenv("PYRO_VAE_CACHE", str(cache))  # never the user's run cache
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    # working directory: an empty temporary folder, so nothing a notebook writes lands in the repository
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    assert not list(tmp_path.iterdir()), "a notebook wrote files into its working directory"
    assert list(cache.iterdir()), "the notebook trained nothing through the run cache ($PYRO_VAE_CACHE)"
