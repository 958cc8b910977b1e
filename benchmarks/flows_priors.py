"""Flow and full-rank guides, learned priors (issue 14): speed, Cremer et al.'s gaps, the VampPrior.

    python benchmarks/flows_priors.py speed --data-dir /usr/share/datasets/fashion-mnist [--rounds 2]
    python benchmarks/flows_priors.py gaps  --data-dir /usr/share/datasets/fashion-mnist --epochs 30 --images 500
    python benchmarks/flows_priors.py vamp  --data-dir /work/shared/data/mnist --epochs 30 --images 1000 --iwae-k 5000

- ``speed``: one epoch of each guide and prior on the training images (``--limit`` of them), each
  right after one epoch of ``amortized``/``normal`` (adjacent pairs, round by round, in this
  process); seconds per epoch and the median over rounds of each pair's ratio.
- ``gaps``: ``amortized`` and ``iaf`` guides, the same networks, seed and epochs, trained on all
  60,000 training images (``val_size=0``), then Cremer, Li & Duvenaud (2018)'s Table 2 on the first
  ``--images`` images of the official test set (one seeded binarization): log p(x) (IWAE, k samples
  from q*_flow), L[q*_flow], L[q*_FFG], L[q] and both gaps with paired standard errors.
- ``vamp``: ``prior=normal`` and ``prior=vamp``, the same networks, seed and epochs, on the 50,000
  images left after holding out the last/seeded 10,000 of the 60,000 (``val_size=10000``); the
  IWAE bound (k = ``--iwae-k``) on the first ``--images`` held-out images and the paired gain.

Every number is nats per image, single-threaded by default (``--threads``). Results go to ``--out``
as JSON and are printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from pyro_vae import VAEConfig, evaluate, fit, load_eval_data
from pyro_vae.core.data import eval_binarized
from pyro_vae.experiments.compare import gap_report, table2_markdown

VARIANTS = [("amortized", "normal"), ("iaf", "normal"), ("full-rank", "normal"), ("amortized", "mog"),
            ("amortized", "vamp")]


def base_config(args, **changes) -> VAEConfig:
    return VAEConfig(data_dir=args.data_dir, z_dim=args.z_dim, hidden=(args.hidden,), batch_size=args.batch_size,
                     epochs=args.epochs, kl_warmup=0, seed=args.seed, prior_components=args.components, limit=args.limit,
                     **changes)


def _epoch_seconds(args, guide: str, prior: str) -> float:
    config = base_config(args, guide=guide, prior=prior, val_size=0).replace(epochs=1)
    return fit(config, progress=False, log=lambda s: None).history[-1]["seconds"]


def speed(args) -> dict:
    """Adjacent pairs: in each round, for each variant, one epoch of ``amortized``/``normal`` and
    then one of the variant; the ratio of each pair (the load of a shared machine drifts by minutes,
    not seconds), the median over rounds."""
    pairs = {f"{g}/{p}": [] for g, p in VARIANTS[1:]}
    for _ in range(args.rounds):
        for guide, prior in VARIANTS[1:]:
            ref = _epoch_seconds(args, *VARIANTS[0])
            pairs[f"{guide}/{prior}"].append((ref, _epoch_seconds(args, guide, prior)))
    rows = {k: {"pairs_s": v, "ratios": [b / a for a, b in v], "ratio": statistics.median(b / a for a, b in v),
                "median_s": statistics.median(b for _, b in v), "reference_median_s": statistics.median(a for a, _ in v)}
            for k, v in pairs.items()}
    return {"rounds": args.rounds, "components": args.components, "epochs_timed": 1, "reference": "amortized/normal",
            "variants": rows}


def gaps(args) -> dict:
    test = load_eval_data(base_config(args, val_size=0), "test", limit=args.images)
    x = eval_binarized(test)
    reports, train = [], {}
    for guide in ("amortized", "iaf"):
        start = time.perf_counter()
        run = fit(base_config(args, guide=guide, val_size=0), progress=False, log=lambda s: None)
        train[guide] = time.perf_counter() - start
        report, _ = gap_report(run, x, iwae_k=args.iwae_k, local_steps=300, star_steps=args.star_steps,
                               train_seconds=train[guide], flow_steps=2)
        reports.append(report.to_dict())
        print(json.dumps(reports[-1]), flush=True)
    return {"dataset": test.name, "split": test.split, "binarize": test.binarize, "n": len(x), "iwae_k": args.iwae_k,
            "star_steps": args.star_steps, "flow_steps": 2, "epochs": args.epochs, "guides": reports,
            "wall_seconds": time.perf_counter() - args.t0}


def vamp(args) -> dict:
    out, per_image = {}, {}
    for prior in ("normal", "vamp"):
        config = base_config(args, prior=prior, val_size=10000)
        start = time.perf_counter()
        run = fit(config, progress=False, log=lambda s: None)
        seconds = time.perf_counter() - start
        val = load_eval_data(run.config, "val", limit=args.images)
        result = evaluate(run, val, iwae_k=args.iwae_k, elbo_samples=100)
        per_image[prior] = result.per_image["iwae"]
        out[prior] = dict(result.to_dict(), train_seconds=seconds,
                          s_per_epoch=statistics.median(h["seconds"] for h in run.history))
        print(json.dumps({prior: out[prior]}), flush=True)
    d = (per_image["vamp"] - per_image["normal"]).double()
    out["gain"] = d.mean().item()
    out["gain_se"] = (d.std() / math.sqrt(len(d))).item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["speed", "gaps", "vamp"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--components", type=int, default=100, help="mog, vamp: K")
    p.add_argument("--images", type=int, default=500, help="test/held-out images evaluated")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--star-steps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="training images (smoke tests; default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.t0 = time.perf_counter()
    result = {"speed": speed, "gaps": gaps, "vamp": vamp}[args.mode](args)
    result["args"] = {k: v for k, v in vars(args).items() if k != "t0"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"flows_priors_{args.mode}.json"
    path.write_text(json.dumps(result, indent=1))
    if args.mode == "gaps":
        print(table2_markdown(result))
    print(f"written {path} after {time.perf_counter() - args.t0:.0f}s")


if __name__ == "__main__":
    main()
