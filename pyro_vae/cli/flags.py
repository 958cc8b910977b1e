"""Flags shared by several commands, and the parser that makes usage errors one line."""

from __future__ import annotations

import argparse
import json

from ..core.config import ARCHS, BINARIZATIONS, DATASETS, VAEConfig
from ..core.errors import ConfigError
from ..program.files import ProgramFile

__all__ = ["Parser", "add_data_flags", "add_arch_flag", "add_program_flags", "program_from_args", "config_from_args",
           "hidden_widths"]

def hidden_widths(text: str):
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 400 or 500,500, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 400 or 500,500, got {text!r}")
    return sizes


def add_data_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--dataset``, ``--data-dir``, ``--data``, ``--labels-file``, ``--image-size``, ``--binarize``,
    ``--limit`` (shared by every command).

    With ``defaults=False`` unset flags stay ``None`` (commands on a run folder fall back to the
    run's own data settings)."""
    d = VAEConfig() if defaults else None
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d and d.dataset, help="data set (default: the embedded mnist-5k)")
    g.add_argument("--data-dir", metavar="DIR",
                   help="folder of MNIST-format IDX files (train-*/t10k-*, any HxW) or of PNG/JPEG images (flat, or "
                   "one subfolder per class; train/ and test/ subfolders give a test split); replaces --dataset")
    g.add_argument("--data", metavar="FILE",
                   help=".npy or .pt tensor: [N, D] vectors or [N, C, H, W] images, floats in [0, 1] or uint8; "
                   "replaces --dataset (its test split is the whole file)")
    g.add_argument("--labels-file", metavar="FILE", help="with --data: one integer label per row (.npy, .pt or text)")
    g.add_argument("--image-size", type=int, metavar="S",
                   help="image folders: resize every image to S x S (default: all must have the first image's size)")
    g.add_argument("--binarize", choices=BINARIZATIONS, default=d and d.binarize, help="dynamic (default) | static | none")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N images")


def add_arch_flag(p: argparse.ArgumentParser) -> None:
    """``--arch mlp|conv``: the built-in encoder and decoder networks."""
    p.add_argument("--arch", choices=ARCHS, default=VAEConfig().arch,
                   help="networks: mlp (default; fully connected, --hidden) | conv (strided convolutions down, "
                   "transposed convolutions up, sized from the images)")


def json_object(text: str) -> dict:
    """``--program-args``: a JSON object, e.g. ``'{"z_dim": 20}'``."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"z_dim\": 20}}', got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"z_dim\": 20}}', got {text!r}")
    return value


def add_program_flags(p: argparse.ArgumentParser, training: bool = True) -> None:
    """``--program FILE.py:CLASS`` and ``--program-args JSON``: your own program from a file
    (:class:`~pyro_vae.program.files.ProgramFile`); Lightning's ``--model module.Class``, with a file."""
    what = ("train your own program instead of the built-in model: an nn.Module CLASS in FILE.py with model and guide "
            "(model(x)/guide(x) as in Pyro's VAE tutorial, or the program contract); the run records the file") if training \
        else "the program file of a run that was trained with --program, to use the file as it is now (it changed since)"
    p.add_argument("--program", dest="program_spec", metavar="FILE.py:CLASS", help=what)
    p.add_argument("--program-args", dest="program_json", type=json_object, metavar="JSON",
                   help="keyword arguments of CLASS as a JSON object, e.g. '{\"z_dim\": 20}'"
                   + (" (default: none)" if training else " (default: the recorded ones)"))


def program_from_args(args):
    """The :class:`~pyro_vae.program.files.ProgramFile` that ``--program``/``--program-args`` name, or ``None``."""
    if args.program_spec is None:
        if args.program_json is not None:
            raise ConfigError("--program-args are the arguments of --program FILE.py:CLASS; give --program too")
        return None
    return ProgramFile.parse(args.program_spec, args.program_json)


def config_from_args(args, **overrides) -> VAEConfig:
    fields = VAEConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(overrides)
    return VAEConfig(**values)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
