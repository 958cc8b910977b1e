"""``pyro-vae compare-guides``: one model per guide, and the gaps each leaves."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.config import GUIDES, PRIORS, VAEConfig
from ..core.errors import ConfigError
from ..experiments.compare import DEFAULT_GUIDES, QUICK, compare_guides, to_markdown
from .flags import add_arch_flag, add_data_flags


def add_parser(sub) -> None:

    p = sub.add_parser("compare-guides", help="train one VAE per guide and measure the inference gaps")
    add_data_flags(p)
    add_arch_flag(p)
    p.add_argument("--epochs", type=int, help="training epochs per guide (default 100; --quick 5)")
    p.add_argument("--guides", default=",".join(DEFAULT_GUIDES),
                   help=f"comma-separated, of {', '.join(GUIDES)} (default: {','.join(DEFAULT_GUIDES)})")
    p.add_argument("--local-flow", action="store_true", default=None,
                   help="also fit a flow per image (q*_flow) and print Cremer et al.'s Table 2 (on with iaf, full-rank)")
    p.add_argument("--flow-steps", type=int, help="IAF steps of the iaf guide and of q*_flow (default 2)")
    p.add_argument("--prior", choices=PRIORS, help="p(z) of every model: normal (default) | mog | vamp")
    p.add_argument("--prior-components", type=int, metavar="K", help="mog, vamp: mixture components (default 10)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="compare existing run folders instead of training")
    p.add_argument("--refine-steps", type=int, help="semi-amortized refinement steps (default 5)")
    p.add_argument("--local-steps", type=int, help="mean-field's own local fit on new images (default 300)")
    p.add_argument("--star-steps", type=int, help="local fit steps for q* (default 1000)")
    p.add_argument("--iwae-k", type=int, help="IWAE samples for log p(x) (default 1000)")
    p.add_argument("--eval-limit", type=int, dest="eval_limit", help="held-out images evaluated (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes for tests and notebooks")
    p.add_argument("--out", default="runs/compare-guides", help="output folder (default runs/compare-guides)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--cache", action="store_true",
                   help="train and evaluate through the run cache ($PYRO_VAE_CACHE, see pyro-vae cache): "
                   "a comparison made before is loaded, not recomputed (notebook 02 uses it)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    quick = QUICK if args.quick else {}
    pick = lambda value, key, default: value if value is not None else quick.get(key, default)  # noqa: E731
    settings = dict(
        epochs=pick(args.epochs, "epochs", 100),
        seed=args.seed,
        limit=pick(args.limit, "train_limit", None),
        dataset=args.dataset,
        data_dir=args.data_dir,
        data=args.data,
        labels_file=args.labels_file,
        image_size=args.image_size,
        arch=args.arch,
        binarize=args.binarize,
    )
    for name in ("refine_steps", "flow_steps", "prior", "prior_components"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    config = VAEConfig(**settings)
    for name in ("epochs", "local_steps", "star_steps", "iwae_k", "eval_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    guides = [g.strip() for g in args.guides.split(",") if g.strip()]
    log = (lambda s: None) if args.json else print
    result = compare_guides(
        config,
        guides,
        runs=args.runs,
        limit=pick(args.eval_limit, "limit", 500),
        iwae_k=pick(args.iwae_k, "iwae_k", 1000),
        local_steps=pick(args.local_steps, "local_steps", 300),
        star_steps=pick(args.star_steps, "star_steps", 1000),
        out=args.out,
        log=log,
        cache=args.cache,
        local_flow=args.local_flow,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(to_markdown(result))
        print(f"written: {Path(args.out) / 'comparison.md'}, comparison.json, local_fit.png")
    return 0
