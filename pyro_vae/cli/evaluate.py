"""``pyro-vae evaluate``: held-out ELBO, IWAE bound and active units of a run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.config import DEVICES, resolve_device
from ..core.data import SPLITS
from ..infer.evaluate import EVAL_FILE, evaluate, load_eval_data, save_result
from ..infer.evaluate_m2 import evaluate_m2
from ..infer.run import load_run
from ..program.memory import check_numbers
from .flags import add_data_flags, add_program_flags, program_from_args


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
    add_program_flags(p, training=False)
    p.add_argument(
        "--split",
        choices=SPLITS,
        help="default: test where the data has one (t10k file), else val (mnist-5k has no test split)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument("--iwae-k", type=int, default=5000, metavar="K",
                   help="importance samples per image (default 5000; --model m2 runs: per label value)")
    e.add_argument("--elbo-samples", type=int, default=100, metavar="S", help="z draws per image for the ELBO (default 100)")
    e.add_argument("--batch-size", type=int, default=100, help="images per batch (default 100; results do not depend on it)")
    e.add_argument("--seed", type=int, default=0, help="seed of the z draws (default 0)")
    e.add_argument("--device", choices=DEVICES, default="auto", help="auto (cuda if available) | cpu | cuda")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument("--save", action="store_true",
                   help=f"also write the result into RUN_DIR/{EVAL_FILE}, where pyro-vae runs finds it")
    p.set_defaults(func=_evaluate_cli)


#: ``config.model`` -> its evaluation (m2: accuracy of q(y|x), ELBO and IWAE bound with y summed out)
EVALUATORS = {"vae": evaluate, "m2": evaluate_m2, "vae2": evaluate}


def _evaluate_cli(args: argparse.Namespace) -> int:

    run = load_run(args.run_dir, device=resolve_device(args.device), program=program_from_args(args))
    data = load_eval_data(
        run.config, args.split, dataset=args.dataset, data_dir=args.data_dir, data=args.data,
        labels_file=args.labels_file, image_size=args.image_size, binarize=args.binarize, limit=args.limit
    )
    k = max(("iwae_k", args.iwae_k), ("elbo_samples", args.elbo_samples), key=lambda item: item[1])
    draws = min(args.batch_size, len(data)) * k[1] * run.config.z_dim  # z draws held per batch of images
    check_numbers(draws, "cpu", "evaluating", f"{k[0]}={k[1]}, batch_size={args.batch_size}")  # before allocating
    result = EVALUATORS[run.config.model](
        run,
        data,
        iwae_k=args.iwae_k,
        elbo_samples=args.elbo_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(json.dumps(result.to_dict()) if args.json else result.table())
    if args.save:
        path = Path(args.run_dir)
        saved = save_result(result, path / "checkpoint.pt" if path.is_dir() else path)
        print(f"saved: {saved}", file=sys.stderr if args.json else sys.stdout)
    return 0
