"""Sphinx configuration of the pyro-vae documentation site.

Built offline with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors): MathJax
comes from the ``sphinx-mathjax-offline`` package, the notebooks are rendered from their committed
outputs (never executed), and no page loads anything from another host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import pyro_vae  # noqa: E402

project = "pyro-vae"
author = "the pyro-vae authors"
copyright = "the pyro-vae authors, Apache-2.0"
release = version = pyro_vae.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
    "sphinx-mathjax-offline",  # ships MathJax 3 and copies it into _static/mathjax
]

# --- pages -----------------------------------------------------------------------------------------
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
html_theme = "sphinx_rtd_theme"
html_title = f"pyro-vae {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_extra_path = ["_generated"]  # copied as they are to the site's root: explorer/ (assemble_explorer)
html_show_sourcelink = False

# --- math: the local MathJax copy, never a CDN -----------------------------------------------------
mathjax_path = "mathjax/tex-chtml.js"

# --- API reference ---------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
add_module_names = False

# --- Markdown and notebooks (MyST, myst-nb) --------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the committed outputs; never execute at build time
nb_ipywidgets_js: dict = {}  # no require.js / widget manager from a CDN
nb_merge_streams = True


def copy_notebooks() -> None:
    """``notebooks/*.ipynb`` -> ``docs/tutorials/notebooks/`` (git-ignored), rewritten only when changed.

    The copies say that their code cells are IPython (``!`` shell lines, ``%`` magics), which is what
    Jupyter runs, so that they are highlighted as such; their cells and outputs are the committed ones."""
    target = DOCS / "tutorials" / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    sources = {p.name: p for p in (ROOT / "notebooks").glob("*.ipynb")}
    for stale in set(p.name for p in target.glob("*.ipynb")) - set(sources):
        (target / stale).unlink()
    for name, src in sources.items():
        notebook = json.loads(src.read_text())
        notebook.setdefault("metadata", {}).setdefault("language_info", {})["pygments_lexer"] = "ipython3"
        text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        dst = target / name
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)


def assemble_explorer() -> None:
    """``docs/_generated/explorer/`` (git-ignored): the package's explorer page files and the
    committed ``docs/explorer_run/weights.js`` of the docs' run, i.e. what ``pyro-vae explore`` writes."""
    from pyro_vae.experiments.explorer import DATA_FILE, PAGE_DIR, PAGE_FILES

    target = DOCS / "_generated" / "explorer"
    target.mkdir(parents=True, exist_ok=True)
    sources = [PAGE_DIR / name for name in PAGE_FILES] + [DOCS / "explorer_run" / DATA_FILE]
    for src in sources:
        dst = target / src.name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            dst.write_bytes(src.read_bytes())


def subcommands(parser) -> dict:
    """``{name: subparser}`` of an argparse parser's sub-commands (empty when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def rst_text(text: str) -> str:
    """Plain text (a help string) as reST that shows it as written: no emphasis, no references."""
    return re.sub(r"([\\*`|_<>\[\]])", r"\\\1", " ".join(text.split()))


def options_rst(parser) -> list:
    """reST for a parser's usage and its arguments, group by group, each with its help and default."""
    formatter = parser._get_formatter()
    lines = [".. code-block:: text", ""] + ["   " + line for line in parser.format_usage().splitlines()] + [""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        lines += [f".. rubric:: {rst_text(group.title)}", ""]
        for action in actions:
            text = rst_text(formatter._expand_help(action)) if action.help else ""
            if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
                text += f" (default: ``{action.default}``)"
            lines += [f"``{formatter._format_action_invocation(action)}``", f"   {text.strip() or '(no help)'}", ""]
    return lines


def command_rst(path: list, parser, level: int) -> list:
    """reST for one command: a label ``cli-NAME`` (``cli-cache-list`` for nested ones), a title, its
    description, usage and arguments, then its own sub-commands one level down."""
    title = f"``pyro-vae {' '.join(path)}``"
    lines = [f".. _cli-{'-'.join(path)}:", "", title, "-~^"[level] * len(title), ""]
    if parser.description:
        lines += [rst_text(parser.description), ""]
    lines += options_rst(parser)
    for name, sub in subcommands(parser).items():
        lines += command_rst(path + [name], sub, level + 1)
    return lines


def write_cli_reference() -> None:
    """``docs/cli.rst`` (git-ignored) from :func:`pyro_vae.cli.build_parser`: one section per command."""
    from pyro_vae.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines to the terminal: the same width everywhere
    parser = build_parser()
    lines = [
        "Command line reference", "=" * 22, "",
        "Generated from the ``argparse`` parser (:func:`pyro_vae.cli.build_parser`) when the site is built, so",
        "it says what ``pyro-vae COMMAND --help`` says. ``python -m pyro_vae ...`` is the same as ``pyro-vae ...``.",
        "", *options_rst(parser),
    ]
    for name, sub in subcommands(parser).items():
        lines += command_rst([name], sub, 0)
    text = "\n".join(lines) + "\n"
    target = DOCS / "cli.rst"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


smartquotes = False  # "--flag" stays two hyphens, quotes stay as typed

copy_notebooks()
assemble_explorer()
write_cli_reference()
