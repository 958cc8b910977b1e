"""``pyro-vae`` command line: a thin layer over the Python API.

Every user mistake ends as one line on stderr and a non-zero exit code (2 for usage errors);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from .config import BINARIZATIONS, DATASETS, DEVICES, ELBOS, GUIDES, LIKELIHOODS, VAEConfig
from .errors import PyroVAEError

__all__ = ["main", "build_parser", "add_data_flags", "config_from_args"]


def _hidden(text: str):
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 400 or 500,500, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 400 or 500,500, got {text!r}")
    return sizes


def add_data_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--dataset``, ``--data-dir``, ``--binarize``, ``--limit`` (shared by every command).

    With ``defaults=False`` unset flags stay ``None`` (commands on a run folder fall back to the
    run's own data settings)."""
    d = VAEConfig() if defaults else None
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=d and d.dataset, help="data set (default: the embedded mnist-5k)")
    g.add_argument("--data-dir", metavar="DIR", help="folder of MNIST-format IDX files (train-*/t10k-*), replaces --dataset")
    g.add_argument("--binarize", choices=BINARIZATIONS, default=d and d.binarize, help="dynamic (default) | static | none")
    g.add_argument("--limit", type=int, metavar="N", help="use only the first N images")


def _add_train(sub) -> None:
    d = VAEConfig()
    p = sub.add_parser("train", help="train a VAE by SVI and write a run folder", description="Train a VAE by SVI.")
    add_data_flags(p)
    p.add_argument("--val-size", type=int, default=d.val_size, help=f"validation images held out (default {d.val_size})")
    m = p.add_argument_group("model and guide")
    m.add_argument("--likelihood", choices=LIKELIHOODS, default=d.likelihood, help="p(x|z): bernoulli (default) | normal")
    m.add_argument("--z-dim", type=int, default=d.z_dim, help=f"latent dimension (default {d.z_dim})")
    m.add_argument("--hidden", type=_hidden, default=d.hidden, help="hidden widths, e.g. 400 or 500,500")
    m.add_argument("--guide", choices=GUIDES, default=d.guide, help="variational family (default amortized)")
    o = p.add_argument_group("inference")
    o.add_argument("--elbo", choices=ELBOS, default=d.elbo, help="trace (default) | meanfield (analytic KL) | jit")
    o.add_argument("--num-particles", type=int, default=d.num_particles, help="z samples per image per step")
    o.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    o.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    o.add_argument("--kl-warmup", type=int, default=d.kl_warmup, metavar="E", help="epochs of linear KL warm-up (default 0)")
    o.add_argument("--beta", type=float, default=d.beta, help="KL weight after warm-up (default 1)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--device", choices=DEVICES, default=d.device)
    r = p.add_argument_group("output")
    r.add_argument("--out", metavar="DIR", help="run folder (default runs/<date-time>)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def config_from_args(args, **overrides) -> VAEConfig:
    fields = VAEConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values.update(overrides)
    return VAEConfig(**values)


def _default_out() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def _train(args) -> int:
    from .train import fit

    config = config_from_args(args)
    out = Path(args.out) if args.out else _default_out()
    start = time.perf_counter()
    run = fit(config, out, progress=not args.quiet, overwrite=args.overwrite)
    last = run.history[-1]
    val = "" if last["val_elbo"] is None else f", validation ELBO {last['val_elbo']:.2f} nats/image"
    print(f"trained {config.epochs} epochs in {time.perf_counter() - start:.0f}s{val}")
    print(f"run folder: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-vae", description="The variational autoencoder as a Pyro probabilistic program."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [_add_train]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
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

