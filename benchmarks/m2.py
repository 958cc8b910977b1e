"""Semi-supervised M2 on MNIST: test accuracy of q(y|x) with few labels, against the same
classifier network trained on the labelled images alone.

Data: the 60,000-image MNIST training file (``--data-dir``); ``val_size=10000`` holds out the
last 10,000 of a seeded shuffle (``split_seed=0``) as the test images (this machine has no t10k
file), leaving N = 50,000 training images, of which ``--labels`` are labelled (balanced over the
classes, chosen with the seed). Dynamic binarization in training (``--binarize none``: the grey
values as Bernoulli targets, as Pyro's SS-VAE example); the evaluation scores one seeded
binarization (or the grey values).

Each M2 run trains ``--epochs`` epochs (one number per label count) and prints the test accuracy
of q(y|x) after every epoch (``accuracy_curve`` in the JSON), its wall and CPU seconds; then the
ELBO (y summed out, 10 z per label) and the IWAE bound (k = 100 z per label, exact sum over y) on
the first 1,000 held-out images, and the same classifier network trained on the labelled images
alone.

    python benchmarks/m2.py --data-dir ../shared/data/mnist --labels 100 600 3000 --epochs 60 20 20 \\
        [--alpha 0.1] [--lr 1e-3] [--adam-beta1 0.9] [--batch-size 100] [--binarize dynamic|none] \\
        --out /tmp/m2-bench --json /tmp/m2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_vae.core.config import VAEConfig
from pyro_vae.core.data import eval_binarized, load_splits
from pyro_vae.experiments.m2_lab import accuracy, labelled_only_classifier
from pyro_vae.infer.evaluate_m2 import evaluate_m2
from pyro_vae.infer.callbacks import Callback
from pyro_vae.infer.svi import fit


class AccuracyCurve(Callback):
    """Test accuracy of q(y|x) after every epoch (the held-out images, one fixed binarization)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.curve = images, labels, []

    def on_epoch_end(self, trainer, record: dict) -> None:
        self.curve.append(round(accuracy(trainer.vae.classify, self.images, self.labels), 4))
        print(f"  epoch {record['epoch']}: objective {record['train_elbo']:.2f}, test accuracy {self.curve[-1]:.4f}, "
              f"{record['seconds']:.1f} s", flush=True)


def run_m2(config: VAEConfig, out: Path, train, curve: AccuracyCurve) -> dict:
    """Train ``config.epochs`` epochs into ``out``; wall and CPU seconds, s/epoch and the run."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run = fit(config, out, train_data=train, val_data=None, overwrite=True, progress=False, callbacks=[curve],
              log=lambda s: None)
    seconds = [h["seconds"] for h in run.history]
    return {"run": run, "epochs": len(seconds), "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start, "s_per_epoch": sum(seconds) / len(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 3000])
    p.add_argument("--epochs", type=int, nargs="+", default=[60, 20, 20], help="epochs per label count")
    p.add_argument("--val-size", type=int, default=10000, help="held-out test images (default 10000)")
    p.add_argument("--alpha", type=float, default=0.1, help="classification weight (Kingma et al.: 0.1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("--batch-size", type=int, default=100, help="shuffled training images per step")
    p.add_argument("--labelled-batch", type=int, default=100, help="labelled images added to every step")
    p.add_argument("--binarize", default="dynamic", help="dynamic | none (grey values as Bernoulli targets, as Pyro's example)")
    p.add_argument("--kl-warmup", type=int, default=0, help="epochs of KL warm-up on z (default 0)")
    p.add_argument("--baseline-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/m2-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = []
    for n, epochs in zip(args.labels, args.epochs):
        config = VAEConfig(model="m2", data_dir=args.data_dir, val_size=args.val_size, num_labels=n, alpha=args.alpha,
                           z_dim=50, hidden=(500,), batch_size=args.batch_size, labelled_batch=args.labelled_batch,
                           lr=args.lr, adam_beta1=args.adam_beta1, lr_schedule=args.lr_schedule, binarize=args.binarize,
                           epochs=epochs, kl_warmup=args.kl_warmup, seed=args.seed)
        train, test = load_splits(config)
        x_test = eval_binarized(test)
        curve = AccuracyCurve(x_test, test.labels)
        trained = run_m2(config, Path(args.out) / f"labels-{n}", train, curve)
        run = trained.pop("run")
        scores = evaluate_m2(run, x_test[:1000], iwae_k=100, elbo_samples=10)
        start = time.perf_counter()
        rows = run.vae.labelled_rows.cpu()
        net = labelled_only_classifier(run.config, train.images[rows], train.labels[rows], steps=args.baseline_steps,
                                       dynamic=args.binarize == "dynamic")
        base_s = time.perf_counter() - start
        result = {"labels": n, "m2_accuracy": curve.curve[-1], "accuracy_curve": curve.curve,
                  "baseline_accuracy": accuracy(net, x_test, test.labels),
                  "baseline_steps": args.baseline_steps, "baseline_s": base_s,
                  "test_elbo_1000": scores.elbo, "test_iwae_1000_k100": scores.iwae, **trained,
                  "final_train_objective": run.history[-1]["train_elbo"],
                  "config": {k: v for k, v in run.config.to_dict().items()
                             if k in ("alpha", "z_dim", "hidden", "batch_size", "labelled_batch", "lr", "adam_beta1",
                                      "lr_schedule", "binarize", "seed")}}
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
