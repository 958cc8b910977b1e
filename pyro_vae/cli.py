"""``pyro-vae`` command line: a thin layer over the Python API.

Every user mistake ends as one line on stderr and a non-zero exit code (2 for usage errors);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI writes figures to files only (set before pyplot loads)

from .config import BINARIZATIONS, DATASETS, DEVICES, ELBOS, GUIDES, LIKELIHOODS, NONFINITE, VAEConfig
from .config import BASELINES, ESTIMATORS
from .errors import PyroVAEError, TrainingInterrupted
from .compare import add_parser as _add_compare_guides
from .estimators import add_parser as _add_grad_variance
from .evaluate import add_parser as _add_evaluate

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
    m.add_argument("--refine-steps", type=int, default=d.refine_steps, metavar="K",
                   help=f"semi-amortized: gradient steps refining the encoder's output (default {d.refine_steps})")
    m.add_argument("--refine-lr", type=float, default=d.refine_lr, help=f"semi-amortized step size (default {d.refine_lr})")
    m.add_argument("--local-lr", type=float, default=d.local_lr,
                   help=f"mean-field: learning rate of the per-image parameters (default {d.local_lr})")
    o = p.add_argument_group("inference")
    o.add_argument("--elbo", choices=ELBOS, default=d.elbo, help="trace (default) | meanfield (analytic KL) | jit")
    o.add_argument("--no-fused", dest="fused", action="store_false",
                   help="run every ELBO through Pyro's tracing (same numbers, slower; see pyro_vae/fused.py)")
    o.add_argument("--num-particles", type=int, default=d.num_particles, help="z samples per image per step")
    o.add_argument("--estimator", choices=ESTIMATORS, default=d.estimator, help="reparam (default) | score (BBVI)")
    o.add_argument("--baseline", choices=BASELINES, default=d.baseline, help="for score: none | decaying-avg | neural")
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
    r.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint (same flags; --epochs may grow)"
    )
    o.add_argument("--on-nonfinite", choices=NONFINITE, default=d.on_nonfinite,
                   help="a NaN/inf loss: stop (default; the last good checkpoint is kept) | skip the step")
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


def _resume_command(args, out: Path) -> str:
    """The command line that continues an interrupted run: this one, with ``--resume``."""
    argv = [a for a in getattr(args, "argv", None) or ["train"] if a not in ("--overwrite", "--resume")]
    if args.out is None:
        argv += ["--out", str(out)]
    from .distributed import under_torchrun

    command = ["torchrun", "<the same torchrun flags>", "-m", "pyro_vae"] if under_torchrun() else ["pyro-vae"]
    return " ".join(a if a.startswith("<") else shlex.quote(a) for a in [*command, *argv, "--resume"])


def _train(args) -> int:
    from . import distributed
    from .train import fit

    config = config_from_args(args)
    # under torchrun: join the process group (gloo on CPU, NCCL on GPUs); see pyro_vae/distributed.py
    joined = distributed.init(config.device)
    try:
        if joined and not args.out:  # every rank must use rank 0's default folder name
            import torch.distributed as dist

            box = [str(_default_out()) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            out = Path(box[0])
        else:
            out = Path(args.out) if args.out else _default_out()
        start = time.perf_counter()
        try:
            run = fit(config, out, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume)
        except TrainingInterrupted as e:  # say exactly which command continues the run
            raise TrainingInterrupted(f"{e}: {_resume_command(args, out)}", e.signum) from None
    finally:
        if joined:
            distributed.shutdown()
    if joined and int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = run.history[-1]
    val = "" if last["val_elbo"] is None else f", validation ELBO {last['val_elbo']:.2f} nats/image"
    print(f"trained {config.epochs} epochs in {time.perf_counter() - start:.0f}s{val}")
    print(f"run folder: {out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-vae", description="The variational autoencoder as a Pyro probabilistic program."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [_add_train, _add_evaluate, _add_compare_guides, _add_grad_variance]


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
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
        where = f": {e.filename}" if e.filename else ""
        print(f"pyro-vae: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1

