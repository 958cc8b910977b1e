"""Semi-supervised M2 on MNIST: test accuracy of q(y|x) with few labels, against the same
classifier network trained on the labelled images alone.

Data: the 60,000-image MNIST training file (``--data-dir``); ``val_size=10000`` holds out the
last 10,000 of a seeded shuffle (``split_seed=0``) as the test images (this machine has no t10k
file), leaving N = 50,000 training images, of which ``--labels`` are labelled (balanced over the
classes, chosen with the seed). Dynamic binarization in training; the evaluation scores one
seeded binarization.

Each M2 run trains one epoch, measures it, and resumes from its checkpoint for as many epochs as
its wall-clock budget (``--minutes``, one per label count) allows; the accuracy is measured on
all 10,000 held-out images, the ELBO (y summed out, 10 z per label) and the IWAE bound (k = 100
z per label, exact sum over y) on the first 1,000 of them.

    OMP_NUM_THREADS=1 python benchmarks/m2.py --data-dir ../shared/data/mnist --labels 100 600 3000 \\
        --minutes 20 7 7 --out /tmp/m2-bench --json benchmarks/m2.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pyro_vae.core.config import VAEConfig
from pyro_vae.core.data import eval_binarized, load_splits
from pyro_vae.experiments.m2_lab import accuracy, labelled_only_classifier
from pyro_vae.infer.evaluate_m2 import evaluate_m2
from pyro_vae.infer.svi import fit


def run_m2(config: VAEConfig, out: Path, minutes: float) -> dict:
    """Train with a wall-clock budget (one measured epoch, then resume); return timings and the run."""
    start = time.perf_counter()
    run = fit(config.replace(epochs=1), out, overwrite=True, progress=False)
    first = time.perf_counter() - start
    epochs = max(1, math.floor(minutes * 60 / first))
    if epochs > 1:
        run = fit(config.replace(epochs=epochs), out, resume=True, progress=False)
    wall = time.perf_counter() - start
    seconds = [h["seconds"] for h in run.history]
    return {"run": run, "epochs": epochs, "wall_s": wall, "s_per_epoch": sum(seconds) / len(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 3000])
    p.add_argument("--minutes", type=float, nargs="+", default=[20, 7, 7], help="training budget per label count")
    p.add_argument("--val-size", type=int, default=10000, help="held-out test images (default 10000)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--baseline-steps", type=int, default=2000)
    p.add_argument("--out", default="/tmp/m2-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = []
    for n, minutes in zip(args.labels, args.minutes):
        config = VAEConfig(model="m2", data_dir=args.data_dir, val_size=args.val_size, num_labels=n, alpha=args.alpha,
                           z_dim=50, hidden=(500,), batch_size=100, labelled_batch=100, lr=1e-3, seed=0)
        trained = run_m2(config, Path(args.out) / f"labels-{n}", minutes)
        run = trained.pop("run")
        train, test = load_splits(run.config)
        x_test = eval_binarized(test)
        m2_acc = accuracy(run.vae.classify, x_test, test.labels)
        scores = evaluate_m2(run, x_test[:1000], iwae_k=100, elbo_samples=10)
        start = time.perf_counter()
        rows = run.vae.labelled_rows.cpu()
        net = labelled_only_classifier(run.config, train.images[rows], train.labels[rows], steps=args.baseline_steps)
        base_s = time.perf_counter() - start
        result = {"labels": n, "m2_accuracy": m2_acc, "baseline_accuracy": accuracy(net, x_test, test.labels),
                  "baseline_steps": args.baseline_steps, "baseline_s": base_s,
                  "test_elbo_1000": scores.elbo, "test_iwae_1000_k100": scores.iwae, **trained,
                  "final_train_objective": run.history[-1]["train_elbo"], "final_val_elbo": run.history[-1]["val_elbo"],
                  "config": {k: v for k, v in run.config.to_dict().items()
                             if k in ("alpha", "z_dim", "hidden", "batch_size", "labelled_batch", "lr", "seed")}}
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
