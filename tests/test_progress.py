"""Progress bars come from ``tqdm.auto``: a widget in Jupyter where ipywidgets is installed, text
otherwise, and no "IProgress not found" warning in a notebook kernel without ipywidgets.

Each case runs in a fresh interpreter (the bar is chosen once, at import); ``ipykernel.zmqshell``
in ``sys.modules`` is what makes tqdm believe it runs in a Jupyter kernel."""

import subprocess
import sys

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
