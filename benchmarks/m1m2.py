"""Stacked M1+M2 on MNIST (Kingma et al. 2014, section 3.2): test accuracy of q(y|z1) through a
trained VAE's encoder, with few labels, beside the same classifier trained on the labelled images
alone (on their pixels, and on M1's codes of them).

Data: the 60,000-image MNIST training file (``--data-dir``); ``val_size=10000`` holds out the last
10,000 of a seeded shuffle (``split_seed=0``) as the test images (this machine has no t10k file),
leaving N = 50,000 training images, of which ``--labels`` are labelled (balanced over the classes,
chosen with the seed): the split of ``benchmarks/m2.py``. Dynamic binarization in training; the
test accuracy reads one seeded binarization of the 10,000 held-out images (x -> mean of q(z1|x)
on M1's active units -> argmax q(y|z1)); ``accuracy_grey`` feeds the encoder the grey values
instead (as Kingma et al.'s code does).

M1 is an existing VAE run (``--m1``, e.g. ``pyro-vae train --dataset mnist --data-dir ... --val-size
10000 --hidden 600,600 --z-dim 50 --kl-warmup 0``) trained on the same 50,000 images; its training
minutes are counted from its history (the seconds of its epochs). M2 has Kingma et al.'s sizes
(one hidden layer of 500 softplus units, z2 of 50), the closed-form KL of z2 (``elbo=meanfield``),
Adam; each step reads ``--batch-size`` shuffled training images and ``--labelled-batch`` labelled
ones, a fresh z1 ~ q(z1|x) for each.

Each label count trains into ``--out/labels-N`` (a pyro-vae run folder, checkpointed every epoch)
until ``--minutes`` of M2 training (CPU minutes of its epochs, or wall with ``--clock wall``) or
``--epochs`` are done, and writes ``--json`` after every epoch: the accuracy curve, s/epoch (wall and
CPU), both baselines, M1's and M2's minutes. M1's minutes are the wall seconds of its history, an
upper bound of its CPU minutes; ``total_minutes`` adds M2's CPU minutes. Run one process per
``--json`` file (each rewrites its file whole). Run the same command again to continue a run that
was stopped (its folder holds a checkpoint; the curve so far is read back from ``--json``).

    OMP_NUM_THREADS=1 python benchmarks/m1m2.py --m1 /work/runs/m1 --data-dir ../shared/data/mnist \\
        --labels 100 600 3000 --minutes 45 45 45 [--clock cpu|wall] [--max-wall-minutes 50] \\
        [--epochs 1000] [--labelled-weight data|step|W] \\
        [--alpha 0.1] [--lr 1e-3] [--batch-size 100] [--labelled-batch 100] \\
        --out /work/runs/m1m2 --json /work/runs/m1m2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_vae.core.config import VAEConfig
from pyro_vae.core.data import eval_binarized, load_splits
from pyro_vae.core.rundir import load_checkpoint
from pyro_vae.experiments.m2_lab import accuracy, codes_classifier, labelled_only_classifier
from pyro_vae.infer.callbacks import Callback
from pyro_vae.infer.svi import fit
from pyro_vae.program.m1m2 import file_sha256

SPLIT_KEYS = ("val_size", "split_seed", "limit")  # with the data source: M1 must not have seen the test images


class BudgetSpent(Exception):
    """Raised after the epoch (already checkpointed) that used up ``--minutes``."""


class Progress(Callback):
    """Baselines before the first epoch; after each epoch the test accuracy, the seconds, and the JSON file."""

    def __init__(self, report: "Report", entry: dict, test, train, args, minutes: float):
        self.report, self.entry, self.train = report, entry, train
        self.x_test, self.y_test, self.x_grey = eval_binarized(test), test.labels, test.images
        self.args, self.minutes = args, minutes
        self.cpu = time.process_time()

    def on_train_begin(self, trainer) -> None:
        if "baselines" not in self.entry:
            self.entry["baselines"] = baselines(trainer.vae, self.train, self.x_test, self.y_test, self.args)
            self.report.write()
        self.cpu = time.process_time()

    def on_epoch_end(self, trainer, record: dict) -> None:
        cpu = time.process_time() - self.cpu  # CPU seconds of the epoch (the accuracy below is not counted)
        acc = accuracy(trainer.vae.classify, self.x_test, self.y_test)
        grey = accuracy(trainer.vae.classify, self.x_grey, self.y_test)  # the encoder read grey values (Kingma et al.)
        self.entry["curve"].append({"epoch": record["epoch"], "accuracy": round(acc, 4), "accuracy_grey": round(grey, 4),
                                    "seconds": round(record["seconds"], 2), "cpu_s": round(cpu, 2),
                                    "train_objective": round(record["train_elbo"], 3)})
        self.entry.update(summary(self.entry["curve"], self.report.m1_minutes))
        self.report.write()
        print(f"  {self.entry['labels']} labels, epoch {record['epoch']}: test accuracy {acc:.4f}, "
              f"{record['seconds']:.1f} s ({cpu:.1f} CPU s), M2 {self.entry['m2_wall_minutes']:.1f} min "
              f"({self.entry['m2_cpu_minutes']:.1f} CPU)", flush=True)
        self.cpu = time.process_time()
        spent = [f"--minutes {self.minutes:g} ({self.args.clock})"] if \
            self.entry[f"m2_{self.args.clock}_minutes"] >= self.minutes else []
        spent += [f"--max-wall-minutes {self.args.max_wall_minutes:g}"] if \
            self.entry["m2_wall_minutes"] >= self.args.max_wall_minutes else []
        if spent:
            self.entry["stopped"] = " and ".join(spent) + " spent"
            self.report.write()
            raise BudgetSpent()


def summary(curve: list, m1_minutes: float) -> dict:
    """Totals of the curve so far. M1's minutes are wall seconds of its history (an upper bound of
    its CPU minutes); ``total_minutes``: M1's plus M2's CPU minutes."""
    seconds, cpu = [c["seconds"] for c in curve], [c["cpu_s"] for c in curve]
    return {"epochs": len(curve), "final_accuracy": curve[-1]["accuracy"],
            "best_accuracy": max(c["accuracy"] for c in curve), "s_per_epoch": round(sum(seconds) / len(seconds), 2),
            "cpu_s_per_epoch": round(sum(cpu) / len(cpu), 2), "m2_wall_minutes": round(sum(seconds) / 60, 2),
            "m2_cpu_minutes": round(sum(cpu) / 60, 2), "total_minutes": round(m1_minutes + sum(cpu) / 60, 2)}


def baselines(program, train, x_test, y_test, args) -> dict:
    """The classifier network trained on the labelled images alone: on their pixels, on M1's codes."""
    rows = program.labelled_rows.cpu()
    images, labels = train.images[rows], train.labels[rows]
    start = time.perf_counter()
    pixels = labelled_only_classifier(program.config.replace(event_shape=tuple(train.event_shape)), images, labels,
                                      steps=args.baseline_steps)
    codes = codes_classifier(program, images, labels, steps=args.baseline_steps)
    return {"pixels_accuracy": round(accuracy(pixels, x_test, y_test), 4),
            "codes_accuracy": round(accuracy(lambda x: codes(program.read(x)), x_test, y_test), 4),
            "steps": args.baseline_steps, "seconds": round(time.perf_counter() - start, 1)}


class Report:
    """The JSON file: M1, the data, one entry per label count; rewritten whole each time."""

    def __init__(self, path, m1: dict, data: dict):
        self.path, self.m1, self.data = Path(path), m1, data
        self.m1_minutes = m1["minutes"]
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.entries = {e["labels"]: e for e in old.get("results", [])}

    def entry(self, labels: int, epochs_done: int, settings: dict) -> dict:
        """The entry of a label count; its curve cut to the epochs its checkpoint holds."""
        entry = self.entries.get(labels) if epochs_done else None
        if entry is None or entry.get("settings") != settings:
            entry = {"labels": labels, "settings": settings, "curve": []}
        entry["curve"] = entry["curve"][:epochs_done]
        self.entries[labels] = entry
        return entry

    def write(self) -> None:
        results = [self.entries[n] for n in sorted(self.entries)]
        text = json.dumps({"m1": self.m1, "data": self.data, "results": results}, indent=1) + "\n"
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


def describe_m1(path: Path, config: VAEConfig) -> dict:
    """M1's run: where, its checkpoint's SHA-256, epochs and minutes (from its history), refusing
    one trained on another split (it would have seen the test images)."""
    state = load_checkpoint(path / "checkpoint.pt")
    m1 = VAEConfig.from_dict(state["config"])
    differ = [k for k in SPLIT_KEYS if getattr(m1, k) != getattr(config, k)]
    differ += ["data source"] if data_source(m1) != data_source(config) else []
    if differ:
        raise SystemExit(f"--m1 {path}: trained on another split (other {', '.join(differ)}); it must hold out the "
                         f"same {config.val_size} test images")
    history = state["history"]
    return {"run": str(path), "sha256": file_sha256(path / "checkpoint.pt"), "epochs": len(history),
            "minutes": round(sum(h["seconds"] for h in history) / 60, 2), "z_dim": m1.z_dim,
            "hidden": list(m1.hidden), "val_elbo": history[-1].get("val_elbo") if history else None}


def data_source(config: VAEConfig) -> str:
    """The data a config reads: a folder or file (resolved), else the data set's name."""
    path = config.data_dir or config.data
    return str(Path(path).resolve()) if path else config.dataset


def m2_config(args, labels: int, epochs: int) -> VAEConfig:
    return VAEConfig(model="m2", features=str(Path(args.m1).resolve()), data_dir=args.data_dir, val_size=args.val_size,
                     split_seed=0, num_labels=labels, alpha=args.alpha, labelled_weight=args.labelled_weight,
                     z_dim=50, hidden=(500,), elbo="meanfield", batch_size=args.batch_size,
                     labelled_batch=args.labelled_batch, lr=args.lr, epochs=epochs, kl_warmup=0, seed=args.seed)


def run_labels(args, report: Report, labels: int, epochs: int, minutes: float, train, test) -> None:
    config = m2_config(args, labels, epochs)
    out = Path(args.out) / f"labels-{labels}"
    resume = (out / "checkpoint.pt").is_file()
    done = len(load_checkpoint(out / "checkpoint.pt")["history"]) if resume else 0
    settings = {k: v for k, v in config.to_dict().items() if k in ("alpha", "labelled_weight", "z_dim", "hidden", "elbo",
                                                                   "batch_size", "labelled_batch", "lr", "seed")}
    entry = report.entry(labels, done, settings)
    if done and len(entry["curve"]) < done:
        raise SystemExit(f"{out} holds {done} epochs but {args.json} has {len(entry['curve'])}: start again without it")
    callback = Progress(report, entry, test, train, args, minutes)
    try:
        run = fit(config, out, train_data=train, val_data=None, resume=resume, overwrite=not resume, progress=False,
                  callbacks=[callback], log=lambda s: None)
        entry["stopped"] = f"--epochs {len(run.history)} done"
    except BudgetSpent:
        pass
    entry["active_units"] = len(json.loads((out / "config.json").read_text())["feature_units"])
    report.write()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m1", required=True, help="a VAE run folder trained on the same 50,000 images")
    p.add_argument("--data-dir", default="../shared/data/mnist")
    p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 3000])
    p.add_argument("--minutes", type=float, nargs="+", default=None, help="M2 training minutes per label count")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what --minutes counts: CPU time of the process (default; fair on a shared machine) or wall time")
    p.add_argument("--max-wall-minutes", type=float, default=float("inf"),
                   help="also stop when M2's epochs have taken this many wall minutes (a session's limit)")
    p.add_argument("--epochs", type=int, nargs="+", default=[1000], help="epochs per label count (the most, with --minutes)")
    p.add_argument("--val-size", type=int, default=10000, help="held-out test images (default 10000)")
    p.add_argument("--labelled-weight", default="data", help="data | step | a number (pyro_vae.program.m2)")
    p.add_argument("--alpha", type=float, default=0.1, help="classification weight (Kingma et al.: 0.1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100, help="shuffled training images per step")
    p.add_argument("--labelled-batch", type=int, default=100, help="labelled images added to every step")
    p.add_argument("--baseline-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/m1m2-bench")
    p.add_argument("--json", default="/tmp/m1m2.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    per_label = lambda values: values * len(args.labels) if len(values) == 1 else values  # noqa: E731
    epochs = per_label(args.epochs)
    minutes = per_label(args.minutes) if args.minutes else [float("inf")] * len(args.labels)
    config = m2_config(args, args.labels[0], epochs[0])
    train, test = load_splits(config)
    report = Report(args.json, describe_m1(Path(args.m1).resolve(), config),
                    {"data_dir": args.data_dir, "val_size": args.val_size, "split_seed": 0, "train_images": len(train),
                     "test_images": len(test), "binarize": "dynamic (test: one binarization, seed 0)"})
    for n, e, m in zip(args.labels, epochs, minutes):
        run_labels(args, report, n, e, m, train, test)


if __name__ == "__main__":
    main()
