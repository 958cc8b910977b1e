"""``pyro-vae explore``: an offline web page where the decoder of a run runs in the browser."""

from __future__ import annotations

from pathlib import Path

from ..experiments.explorer import MAX_IMAGES, explore


def add_parser(sub) -> None:
    """The ``pyro-vae explore`` subcommand (``sub``: the CLI's subparsers)."""
    p = sub.add_parser(
        "explore",
        help="write an offline web page to move through the latent space of a run (the decoder runs in the browser)",
        description="Write a static page (index.html, explorer.js, explorer.css, weights.js) that works opened by "
        "double click, with no server and no network: the latent map of held-out images, click or drag to "
        "decode any z, sliders for the first 10 coordinates, an image's reconstruction and q(z|x), and for M2 "
        "runs a class picker. Runs with the built-in mlp decoders and the normal prior (VAE or M2).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by pyro-vae train")
    p.add_argument("--out", metavar="DIR", help="folder for the page (default: RUN_DIR/explorer)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")
    p.add_argument("--images", type=int, default=MAX_IMAGES, metavar="N",
                   help=f"held-out images on the map (default {MAX_IMAGES}; 500 for the mean-field guide)")
    p.set_defaults(func=_explore)


def _explore(args) -> int:
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "explorer"
    page = explore(args.run_dir, out, overwrite=args.overwrite, images=args.images)
    print(f"written: {page} (open it in a browser; it works offline)")
    return 0
