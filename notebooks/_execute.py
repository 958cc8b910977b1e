"""Execute notebooks top to bottom and save them with their outputs, as they are committed.

    python notebooks/_execute.py                          # every notebook, full size
    python notebooks/_execute.py --full                   # the same, even where CI is set; minutes per notebook
    python notebooks/_execute.py 04_latent_space.ipynb    # one of them
    CI=1 python notebooks/_execute.py --no-save           # smoke mode (what the tests run), timings only

Each notebook runs in a fresh kernel of the Python running this script, with the notebooks folder
as working directory. At full size the notebooks train through the run cache (``$PYRO_VAE_CACHE``,
default ``~/.cache/pyro-vae/runs``): the first execution trains every model (the minutes are at
the top of each notebook), later ones load them. Smoke mode uses a temporary cache, never the
user's. Saved notebooks keep only what a reader needs: outputs and execution counts,
no execution timestamps, no kernel version details (just the kernelspec's name); figures are
re-encoded as 256-colour PNGs (the same to the eye, about half the bytes).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

HERE = Path(__file__).resolve().parent
KERNEL = "pyro-vae-python"
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def kernelspec_dir(root: Path) -> Path:
    """Write a kernelspec that starts ``sys.executable`` (not whatever ``python3`` resolves to)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec_json = {"argv": argv, "display_name": KERNEL, "language": "python", "metadata": {"supported_encryption": ["curve"]}}
    (spec / "kernel.json").write_text(json.dumps(spec_json))
    return root


def strip(nb) -> None:
    """Drop volatile metadata in place (per-cell execution timings, kernel and Python versions)
    and shrink the figures."""
    nb.metadata = nbformat.from_dict(METADATA)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output.data["image/png"] = palette_png(output.data["image/png"])


def palette_png(data: str) -> str:
    """A base64 PNG re-encoded with a 256-colour palette, if that is smaller."""
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    buffer = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    smaller = base64.b64encode(buffer.getvalue()).decode()
    return smaller if len(smaller) < len(data) else data


def execute(path: Path, timeout: int = 4 * 3600):  # per cell: a first full execution trains inside one cell
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=timeout, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    strip(nb)
    return nb


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="file names in notebooks/ (default: all)")
    parser.add_argument("--no-save", action="store_true", help="execute and time only; leave the files as they are")
    parser.add_argument("--full", action="store_true",
                        help="full size even where CI is set (models from the run cache), and a summary of minutes")
    args = parser.parse_args(argv)
    paths = [HERE / name for name in args.notebooks] or sorted(HERE.glob("*.ipynb"))
    if args.full:
        os.environ.pop("CI", None)  # the kernels inherit the environment
    mode = "smoke" if "CI" in os.environ else "full"
    minutes = {}
    with tempfile.TemporaryDirectory() as jupyter, tempfile.TemporaryDirectory() as cache:
        os.environ["JUPYTER_PATH"] = str(kernelspec_dir(Path(jupyter)))
        if mode == "smoke":  # small runs in a throwaway run cache, never the user's
            os.environ["PYRO_VAE_CACHE"] = cache
        for path in paths:
            start = time.perf_counter()
            nb = execute(path)
            seconds = time.perf_counter() - start
            minutes[path.name] = seconds / 60
            if not args.no_save:
                nbformat.write(nb, path)
            size = f", {path.stat().st_size / 1024:.0f} KiB" if not args.no_save else ""
            print(f"{path.name}: {seconds:.0f} s = {seconds / 60:.1f} min ({mode} mode){size}", flush=True)
    if args.full:
        print(f"{mode} mode, minutes per notebook:")
        for name, m in minutes.items():
            print(f"  {name:<48} {m:5.1f}")
        print(f"  {'total':<48} {sum(minutes.values()):5.1f}")


if __name__ == "__main__":
    main()
