"""``pyro-vae evaluate``: held-out ELBO, IWAE bound and active units of a run."""

from __future__ import annotations

import argparse
import json

from ..core.config import DEVICES, resolve_device
from ..core.data import SPLITS
from ..infer.evaluate import evaluate, load_eval_data
from ..infer.run import load_run
from .flags import add_data_flags


def add_parser(sub) -> None:
    """The ``pyro-vae evaluate`` subcommand (``sub``: the CLI's subparsers)."""

    p = sub.add_parser(
        "evaluate",
        help="test ELBO, IWAE bound (log-likelihood) and active units of a trained run",
        description="Evaluate a run: ELBO, importance-weighted bound (k samples) and active units, in nats per "
        "image. Data flags left out are the run's own (its config.json).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by pyro-vae train")
    add_data_flags(p, defaults=False)
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="default: test where the data has one (t10k file), else val (mnist-5k has no test split)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument("--iwae-k", type=int, default=5000, metavar="K", help="importance samples per image (default 5000)")
    e.add_argument("--elbo-samples", type=int, default=100, metavar="S", help="z draws per image for the ELBO (default 100)")
    e.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100; results do not depend on it)")
    e.add_argument("--seed", type=int, default=0, help="seed of the z draws (default 0)")
    e.add_argument("--device", choices=DEVICES, default="auto", help="auto (cuda if available) | cpu | cuda")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate_cli)


def _evaluate_cli(args: argparse.Namespace) -> int:

    run = load_run(args.run_dir, device=resolve_device(args.device))
    data = load_eval_data(
        run.config, args.split, dataset=args.dataset, data_dir=args.data_dir, binarize=args.binarize, limit=args.limit
    )
    result = evaluate(
        run,
        data,
        iwae_k=args.iwae_k,
        elbo_samples=args.elbo_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0
