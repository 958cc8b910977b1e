"""``pyro-vae`` command line: a thin layer over the Python API.

Every user mistake ends as one line on stderr and a non-zero exit code (2 for usage errors);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI writes figures to files only (set before pyplot loads)

from ..core.errors import PyroVAEError, TrainingInterrupted  # noqa: E402
from . import cache, compare, evaluate, explore, grad_variance, runs, train  # noqa: E402
from . import faults  # noqa: E402
from .flags import Parser  # noqa: E402

__all__ = ["main", "build_parser", "COMMANDS"]

#: one module per command, each with ``add_parser(subparsers)``
COMMANDS = (train, evaluate, compare, grad_variance, cache, runs, explore)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pyro-vae", description="The variational autoencoder as a Pyro probabilistic program."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser




def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        code = args.func(args)
        faults.flush_stdout()  # a full disk under `> FILE` ends here as one line, not at exit
        return code
    except TrainingInterrupted as e:  # not an error: a clean stop with a way to continue
        if args.debug:
            raise
        print(f"pyro-vae: {e}", file=sys.stderr)
        return e.exit_code
    except PyroVAEError as e:
        if args.debug:
            raise
        print(f"pyro-vae: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the disk filled up, a file vanished, ...: the system's own words
        if args.debug:
            raise
        print(f"pyro-vae: error: {faults.os_error_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # an allocation that failed: CPU or CUDA out of memory
        if args.debug or not faults.is_allocation_error(e):
            raise
        print(f"pyro-vae: error: {faults.out_of_memory_line(e, args)}", file=sys.stderr)
        return 1

