"""``pyro-vae grad-variance``: the gradient-variance lab on a run or a fresh model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List

import torch

from ..core.config import VAEConfig, resolve_device
from ..core.data import check_shape_matches, load_dataset, source_options
from ..core.errors import ConfigError
from ..experiments.variance_lab import (
    BATCH,
    DEFAULT_ESTIMATORS,
    LAB_ESTIMATORS,
    REPEATS,
    SWEEP,
    format_table,
    gradient_variance,
    write_grad_variance,
)
from ..infer.run import load_run
from ..program.memory import check_memory
from ..program.model import VAE
from .flags import add_data_flags


def _int_list(text: str) -> List[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16,64, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _names(text: str) -> List[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in LAB_ESTIMATORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(LAB_ESTIMATORS)}, got {text!r}")
    return names


def add_parser(sub) -> None:
    """The ``grad-variance`` subcommand."""

    p = sub.add_parser(
        "grad-variance",
        help="compare the variance of gradient estimators (reparameterization, score function, IWAE, DReG)",
        description="Draw R independent gradient estimates on one fixed minibatch per estimator and "
        "report their mean norm, total variance, SNR and variance relative to reparameterization, and "
        "(--sweep) the variance and the encoder's SNR against the number of particles K; "
        "write grad_variance.md, grad_variance.json and grad_variance.png. iwae, dreg: the gradient of "
        "the importance-weighted bound with K = the particles (plain and doubly reparameterized).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="run folder (optional with --at-init)")
    add_data_flags(p, defaults=False)
    a = p.add_argument_group("measurement")
    a.add_argument("--at-init", action="store_true", help="fresh parameters (the run's config, or the defaults)")
    a.add_argument(
        "--estimators", type=_names, default=list(DEFAULT_ESTIMATORS), metavar="NAME,...",
        help=f"from {', '.join(LAB_ESTIMATORS)} (default {','.join(DEFAULT_ESTIMATORS)})",
    )
    a.add_argument("--repeats", type=int, default=REPEATS, metavar="R", help=f"estimates per estimator ({REPEATS})")
    a.add_argument("--batch-size", type=int, default=BATCH, metavar="B", help=f"images in the minibatch ({BATCH})")
    a.add_argument("--num-particles", type=int, default=1, metavar="P", help="z samples per image per estimate (1)")
    a.add_argument(
        "--sweep", type=_int_list, default=list(SWEEP), metavar="P,...",
        help=f"particle counts K of the table and the log-log plots ({','.join(map(str, SWEEP))}); '' for none",
    )
    a.add_argument("--seed", type=int, default=0, help="seed of the minibatch, its binarization and the z draws")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default cpu")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR; with --at-init alone, .)")
    o.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.set_defaults(func=_grad_variance)


def _grad_variance(args) -> int:

    if args.run_dir is None and not args.at_init:
        raise ConfigError("give a RUN_DIR, or --at-init for a freshly initialised model")
    for name in ("repeats", "batch_size", "num_particles"):
        if getattr(args, name) < (2 if name == "repeats" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {2 if name == 'repeats' else 1}")
    device = resolve_device(args.device)
    run = load_run(args.run_dir, device=device) if args.run_dir is not None else None
    config = run.config if run is not None else VAEConfig()
    keys = ("dataset", "data_dir", "data", "labels_file", "image_size", "binarize", "limit")
    data = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if {"dataset", "data_dir", "data"} & set(data):  # another source: none of the run's own
        data = {"data_dir": None, "data": None, "labels_file": None, "image_size": None, **data}
    config = config.replace(**data)
    train = load_dataset(config.dataset, "train", limit=config.limit, **source_options(config))
    if run is not None and not args.at_init:
        check_shape_matches(train, run.config.event_shape, f"run {run.path}")
    config = config.replace(event_shape=train.event_shape)
    largest = max([args.num_particles, *args.sweep])  # refuse sizes beyond memory before allocating
    check_memory(config, device, num_data=getattr(run.vae.inference, "num_data", None) if run else None,
                 rows=args.batch_size * largest, copies=6, what="the gradient-variance lab",
                 rows_from=f"batch_size={args.batch_size}, num_particles={largest} (--num-particles, --sweep)")
    if run is None or args.at_init:
        torch.manual_seed(config.seed)
        vae = VAE(config).to(device)
        source = f"freshly initialised model (seed {config.seed})"
    else:
        vae = run.vae
        source = f"run {run.path} ({len(run.history)} epochs)"
    if args.batch_size > len(train):
        raise ConfigError(f"--batch-size {args.batch_size} exceeds the {len(train)} training images")
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(train), generator=g)[: args.batch_size]
    x = train.images[rows]
    if train.binarize == "dynamic":
        x = torch.bernoulli(x, generator=g)  # one fixed binarization of the fixed minibatch
    start = time.perf_counter()
    result = gradient_variance(
        vae, x.to(device), args.estimators, repeats=args.repeats, num_particles=args.num_particles,
        sweep=args.sweep, seed=args.seed,
    )
    result["source"] = source
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out) if args.out else Path(args.run_dir) if args.run_dir else Path(".")
    paths = write_grad_variance(result, out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result), end="")
        print(f"\nwrote {', '.join(str(p) for p in paths.values())} ({result['seconds']:.0f}s)")
    return 0
