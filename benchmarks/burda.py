"""Burda, Grosse & Salakhutdinov (2016), Table 1, one stochastic layer, with pyro-vae.

    python benchmarks/burda.py --data-dir ../shared/data/mnist --out DIR [--minutes M | --epochs E]
        [--models vae1,iwae5,iwae50,dreg5,dreg50] [--eval-limit 1000] [--batch-size 20] [--lr-schedule cosine]
        [--kl-warmup E] [--bias-init zero|mean] [--lr 1e-3] [--resume]

Their architecture: 784-200-200-50 (encoder) and 50-200-200-784 (decoder), tanh, Bernoulli pixels,
a diagonal Gaussian q(z|x); batch 20, Adam (lr 1e-3). Their schedule, 3^i epochs at
lr 1e-3 * 10^(-i/7) for i = 0..7 (3280 epochs), is ``--epochs 3280 --lr-schedule burda`` (a GPU's
job: the full command is in benchmarks/README.md). ``--minutes M`` trains each model for about
M minutes of this machine: one epoch is timed, the number of epochs E is set from it, and the run
continues (``fit(..., resume=True)``, exact) for E epochs in all, the schedule spread over E.

Data: the official MNIST training file (60,000 images); the package's seeded split
(``split_seed=0``) holds out 10,000 as the test images (``val_size=10000``); 50,000 are trained on,
dynamically binarized. Evaluation: each run's IWAE bound with k = 5000 (their test NLL), the ELBO,
and active units, on the first ``--eval-limit`` held-out images (one fixed binarization, seed 0).

Speed: each objective's training against a hand-written PyTorch twin (the same networks, the same
loss in plain tensor code, one ``torch.optim.Adam``), interleaved in this process, on
``--speed-images`` images per timed epoch; the table gives s/epoch for 50,000 images and the ratio.
Every run folder is kept in ``--out``; the tables go to ``--out/results.md`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pyro_vae import Callback, VAEConfig, fit, load_run
from pyro_vae.core.errors import TrainingInterrupted
from pyro_vae.core.data import load_splits
from pyro_vae.infer.evaluate import evaluate

MODELS = {  # name -> (objective, K)
    "vae1": ("elbo", 1),
    "iwae5": ("iwae", 5),
    "iwae50": ("iwae", 50),
    "dreg5": ("dreg", 5),  # the IWAE K=5 bound, trained with DReG's gradient
    "dreg50": ("dreg", 50),
}
PAPER = {"vae1": 86.76, "iwae5": 85.54, "iwae50": 84.78}  # Burda et al. Table 1, 1 stochastic layer, test NLL


class TanhEncoder(nn.Module):
    """784-200-200-(50 + 50), tanh: ``x [B, 784] -> (loc, scale)`` of q(z|x)."""

    def __init__(self, x_dim: int = 784, hidden: int = 200, z_dim: int = 50):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 2 * z_dim)

    def forward(self, x):
        loc, raw_scale = self.head(self.body(x)).chunk(2, dim=-1)  # [B, z_dim] each
        return loc, F.softplus(raw_scale) + 1e-5


class TanhDecoder(nn.Module):
    """50-200-200-784, tanh: ``z [B, 50] -> logits [B, 784]``."""

    def __init__(self, z_dim: int = 50, hidden: int = 200, x_dim: int = 784, mean_image=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, x_dim))
        if mean_image is not None:  # start at the marginal: logits = logit(mean training pixel)
            with torch.no_grad():
                self.net[-1].bias.copy_(torch.logit(mean_image.reshape(-1).clamp(1e-3, 1 - 1e-3)))

    def forward(self, z):
        return self.net(z)


def hand_written_epoch(twin, images, batch_size: int) -> float:
    """One pass of a hand-written twin (``twin.loss``, ``twin.optimizer``) over ``images`` in shuffled
    minibatches, a fresh binarization each; its wall seconds."""
    start = time.perf_counter()
    for idx in torch.randperm(len(images)).split(batch_size):
        loss = twin.loss(torch.bernoulli(images[idx]))
        twin.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        twin.optimizer.step()
    return time.perf_counter() - start


class HandWrittenIWAE(nn.Module):
    """The twin: the same networks and objective (``elbo``: K = 1; ``iwae``; ``dreg``) in plain PyTorch."""

    def __init__(self, objective: str, k: int, num_data: int, lr: float, mean_image=None):
        super().__init__()
        self.encoder, self.decoder = TanhEncoder(), TanhDecoder(mean_image=mean_image)
        self.objective, self.k, self.num_data = objective, k, num_data
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr)

    def loss(self, x):
        loc, scale = self.encoder(x)  # [B, z] each
        eps = torch.randn((self.k,) + loc.shape)  # [K, B, z]
        z = loc + scale * eps
        logits = self.decoder(z.reshape(-1, z.shape[-1])).reshape(self.k, x.shape[0], -1)  # [K, B, D]
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        q_loc, q_scale = (loc.detach(), scale.detach()) if self.objective == "dreg" else (loc, scale)
        log_qz = (-0.5 * ((z - q_loc) / q_scale).pow(2) - q_scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_px + log_pz - log_qz  # [K, B]
        n_over_b = self.num_data / x.shape[0]
        bound = torch.logsumexp(log_w, 0) - math.log(self.k)  # [B]
        if self.objective != "dreg":
            return -bound.sum() * n_over_b
        w = torch.softmax(log_w.detach(), 0)  # [K, B]
        z.register_hook(lambda g: g * w.unsqueeze(-1))  # w~^2 on the path to the encoder
        surrogate = (w * log_w).sum() * n_over_b
        return -bound.detach().sum() * n_over_b - (surrogate - surrogate.detach())

    def epoch(self, images, batch_size: int) -> float:
        return hand_written_epoch(self, images, batch_size)


def model_config(name: str, args, epochs: int) -> VAEConfig:
    objective, k = MODELS[name]
    return VAEConfig(dataset="mnist", data_dir=args.data_dir, val_size=10000, z_dim=50, hidden=(200, 200),
                     objective=objective, num_particles=k, batch_size=args.batch_size, lr=args.lr,
                     lr_schedule=args.lr_schedule, kl_warmup=args.kl_warmup, epochs=epochs, seed=args.seed)


def mean_image(args, train):
    """``--bias-init mean``: the training images' mean pixel values (the decoder starts there); else ``None``."""
    return train.images.mean(0) if args.bias_init == "mean" else None


def decoder(args, train) -> TanhDecoder:
    return TanhDecoder(mean_image=mean_image(args, train))


def own_modules(args, train) -> dict:
    """The networks ``fit`` and ``load_run`` get for the one-layer models: the tanh encoder and decoder."""
    return {"encoder": TanhEncoder(), "decoder": decoder(args, train)}


def one_layer_twin(name: str, args, train, num_data: int) -> HandWrittenIWAE:
    """The hand-written twin of the one-layer model ``name``."""
    objective, k = MODELS[name]
    return HandWrittenIWAE(objective, k, num_data, args.lr, mean_image=mean_image(args, train))


class CPUClock(Callback):
    """CPU seconds of this process from ``fit``'s first step to the end of its (one) epoch."""

    def on_train_begin(self, trainer) -> None:
        self.start = time.process_time()

    def on_epoch_end(self, trainer, record: dict) -> None:
        self.seconds = time.process_time() - self.start


def timed(epoch) -> tuple:
    """``(wall, cpu)`` seconds of ``epoch()``, which returns its wall seconds."""
    start = time.process_time()
    return epoch(), time.process_time() - start


def speed(args, train, twins=None, config=model_config, modules=own_modules) -> list:
    """s/epoch (for 50,000 images), wall and CPU, of each model: ours (``fit`` with ``config``,
    ``modules``) against each of ``twins`` (label -> ``twin(name, args, train, num_data)``, whose
    ``epoch(images, batch_size)`` returns its wall seconds; the first is the reference of the
    ratios), interleaved, medians over ``--speed-rounds``."""
    twins = twins or {"hand-written": one_layer_twin}
    images = train.images[: args.speed_images]
    sub = train.subset(args.speed_images)
    scale, rows = 50000 / len(images), []
    for name in args.models:
        times = {label: [] for label in ("ours", *twins)}  # (wall, cpu) per round
        for _ in range(args.speed_rounds):
            for label, twin in twins.items():
                torch.manual_seed(args.seed)
                made = twin(name, args, train, len(images))
                times[label].append(timed(lambda: made.epoch(images, args.batch_size)))
            clock = CPUClock()
            run = fit(config(name, args, 1), train_data=sub, val_data=None, progress=False,
                      log=lambda s: None, callbacks=[clock], **modules(args, train))
            times["ours"].append((run.history[0]["seconds"], clock.seconds))
        row = {"model": name}
        for label, pairs in times.items():
            row[label] = [statistics.median(p[i] for p in pairs) * scale for i in (0, 1)]  # wall, cpu
        reference = row[next(iter(twins))]
        row["ratio"], row["cpu_ratio"] = (row["ours"][i] / reference[i] for i in (0, 1))
        rows.append(row)
        print(f"speed {name}: " + ", ".join(f"{label} {row[label][0]:.1f} s/epoch (CPU {row[label][1]:.1f})"
                                            for label in times) + f"; ratio {row['ratio']:.3f} (CPU {row['cpu_ratio']:.3f})",
              flush=True)
    return rows


def speed_table(rows) -> str:
    """The markdown table of :func:`speed`'s rows: s/epoch, wall (CPU)."""
    labels = [k for k in rows[0] if k not in ("model", "ratio", "cpu_ratio")]
    lines = ["| model | " + " | ".join(f"{label} s/epoch, wall (CPU)" for label in labels) + " | ratio, wall (CPU) |",
             "|---" * (len(labels) + 2) + "|"]
    return "\n".join(lines + [f"| {r['model']} | " + " | ".join(f"{r[k][0]:.1f} ({r[k][1]:.1f})" for k in labels)
                              + f" | {r['ratio']:.3f} ({r['cpu_ratio']:.3f}) |" for r in rows])


def train_one(name: str, args, train, log, config=model_config, modules=own_modules, callbacks=()) -> dict:
    """Train one model into ``args.out/name``: ``--epochs``, or one timed epoch then ``--minutes``
    (E epochs planned from it). On a shared machine an epoch may slow down: at ``--hard-cap`` times
    the budget a SIGTERM stops the run after its current step (checkpointed) and it is scored as it is.
    ``--resume`` continues a run folder that has a checkpoint. ``config(name, args, epochs)`` is the
    run's config, ``modules(args, train)`` its own networks (``fit``'s and ``load_run``'s keywords),
    ``callbacks`` go to ``fit``."""
    out = Path(args.out) / name
    start, cpu_start = time.perf_counter(), time.process_time()
    resuming = args.resume and (out / "checkpoint.pt").exists()
    planned, timer = args.epochs, None
    if resuming and not args.epochs:  # the epochs planned before the restart
        planned = json.loads((out / "config.json").read_text())["epochs"]
    elif not args.epochs:
        run = fit(config(name, args, 1), out, train_data=train, val_data=None, progress=False,
                  overwrite=True, log=log, callbacks=callbacks, **modules(args, train))
        planned = max(1, int(args.minutes * 60 / run.history[0]["seconds"]))
    if not args.epochs:
        timer = threading.Timer(args.hard_cap * args.minutes * 60 - (time.perf_counter() - start),
                                lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.start()
    try:
        run = fit(config(name, args, planned), out, train_data=train, val_data=None, progress=False,
                  resume=resuming or not args.epochs, overwrite=bool(args.epochs) and not resuming, log=log,
                  callbacks=callbacks, **modules(args, train))
    except TrainingInterrupted as e:
        log(f"stopped (the hard cap, or a signal): {e}")
        run = load_run(out, **modules(args, train))
    finally:
        if timer is not None:
            timer.cancel()
    seconds = time.perf_counter() - start
    return {"run": run, "epochs": len(run.history), "planned_epochs": planned, "train_seconds": seconds,
            "train_cpu_seconds": time.process_time() - cpu_start,
            "s_epoch": statistics.median(h["seconds"] for h in run.history),
            "final_train_bound": run.history[-1]["train_elbo"]}


def arguments(description: str, models) -> argparse.ArgumentParser:
    """The command line of this benchmark (and of ``burda2.py``), ``--models`` of ``models``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", required=True, help="folder with the MNIST training IDX file (60,000 images)")
    p.add_argument("--out", required=True, help="folder for the run folders and results.md")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--minutes", type=float, help="training minutes per model (this machine)")
    g.add_argument("--epochs", type=int, help="epochs per model (Burda et al.: 3280 with --lr-schedule burda)")
    g.add_argument("--speed-only", action="store_true", help="only the speed table (ours against the twin)")
    p.add_argument("--models", default=",".join(models), help=f"comma-separated, of {', '.join(models)}")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's (peak) learning rate")
    p.add_argument("--kl-warmup", type=int, default=0, help="epochs of linear KL warm-up (beta 1/E ... 1)")
    p.add_argument("--bias-init", default="zero", choices=("zero", "mean"),
                   help="decoder output bias: zero (PyTorch's init) | mean (logit of the mean training pixel)")
    p.add_argument("--lr-schedule", default="cosine", help="constant | cosine | burda (their schedule, spread over the epochs)")
    p.add_argument("--eval-limit", type=int, default=1000, help="score the first N of the 10,000 held-out images")
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--speed-images", type=int, default=5000, help="images per timed epoch (0: no speed table)")
    p.add_argument("--speed-rounds", type=int, default=3, help="interleaved rounds (median; the first warms up)")
    p.add_argument("--hard-cap", type=float, default=1.3, help="with --minutes: stop a model at this times its budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the run folders in --out from their checkpoints (--minutes: to the epochs planned "
                        "before, the hard cap counted from the restart)")
    return p


def main(argv=None) -> int:
    args = arguments(__doc__.split("\n")[0], MODELS).parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",")]
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train, test = load_splits(model_config(args.models[0], args, 1))
    print(f"# torch {torch.__version__}, 1 thread; MNIST training file, {len(train)} trained on, {len(test)} held out "
          f"(split_seed 0); batch {args.batch_size}, schedule {args.lr_schedule}", flush=True)
    speed_rows = speed(args, train) if args.speed_images else []
    if args.speed_only:
        print(speed_table(speed_rows))
        return 0
    results = []
    for name in args.models:
        r = train_one(name, args, train, log=lambda s: print(f"  {name}: {s}", flush=True))
        ev = evaluate(r.pop("run"), test_slice(test, args.eval_limit), iwae_k=args.eval_k, seed=0)
        r.update(model=name, iwae=ev.iwae, iwae_se=ev.iwae_se, elbo=ev.elbo, active_units=ev.active_units,
                 eval_n=ev.n, eval_seconds=ev.seconds)
        results.append(r)
        print(json.dumps(r), flush=True)
        write_results(args, speed_rows, results)
    return 0


def test_slice(test, limit: int):
    """The first ``limit`` held-out images (all if ``limit`` is 0)."""
    return test if not limit else test.subset(min(limit, len(test)))


def write_results(args, speed_rows, results) -> None:
    budget = f"{args.minutes} min" if args.minutes else f"{args.epochs} epochs"
    lines = [f"Budget {budget} of training per model (1 CPU thread), batch {args.batch_size}, Adam {args.lr:g}, "
             f"schedule {args.lr_schedule}, KL warm-up {args.kl_warmup} epochs, decoder bias init {args.bias_init}. "
             f"Test NLL = -IWAE bound (k = {args.eval_k}) on the first "
             f"{results[0]['eval_n']} of the 10,000 images held out of the 60,000 MNIST training images "
             "(seeded split), one fixed binarization.", "",
             f"| model | K | epochs (planned) | train min | CPU min | -IWAE k={args.eval_k} (nats) | SE | -ELBO | active units | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        objective, k = MODELS[r["model"]]
        lines.append(f"| {objective} | {k} | {r['epochs']} ({r['planned_epochs']}) | {r['train_seconds'] / 60:.1f} | "
                     f"{r['train_cpu_seconds'] / 60:.1f} | {-r['iwae']:.2f} | "
                     f"{r['iwae_se']:.2f} | {-r['elbo']:.2f} | {r['active_units']} | {PAPER.get(r['model'], '')} |")
    if speed_rows and results:
        lines += ["", speed_table(speed_rows)]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "results.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
