"""``pyro-vae runs``: run folders side by side, as a table and a figure."""

from __future__ import annotations

import json
from pathlib import Path

from ..experiments.runs import FIGURE_FILE, TABLE_FILE, compare_runs, to_markdown


def add_parser(sub) -> None:
    """The ``pyro-vae runs`` subcommand (``sub``: the CLI's subparsers)."""
    p = sub.add_parser(
        "runs",
        help="compare run folders: their differing settings, final ELBOs and validation curves",
        description="Compare run folders: a Markdown table of the settings in which they differ and their final "
        "numbers (train/validation ELBO of the last epoch, epochs, seconds, and the evaluation that "
        "'pyro-vae evaluate RUN_DIR --save' stored, if any), and a figure of their validation-ELBO curves.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by pyro-vae train")
    p.add_argument("--out", metavar="DIR", default=".",
                   help=f"folder for {TABLE_FILE} and {FIGURE_FILE} (default: the current folder)")
    p.add_argument("--json", action="store_true", help="print the table as one JSON list on stdout, nothing else")
    p.set_defaults(func=_runs)


def _runs(args) -> int:
    rows = compare_runs(args.run_dirs, out=args.out, show=False)
    if args.json:
        print(json.dumps(rows))
    else:
        print(to_markdown(rows))
        print(f"written: {Path(args.out) / TABLE_FILE}, {Path(args.out) / FIGURE_FILE}")
    return 0
