"""Architecture benchmark: ``--arch conv`` against ``--arch mlp`` at equal epochs, and the conv
path's speed against a hand-written PyTorch twin (benchmarks/references.py).

    python benchmarks/arch.py [--data-dir /usr/share/datasets/fashion-mnist] [--epochs 5]
        [--twin-epochs 2] [--iwae-k 1000] [--test-images 2000] [--threads 2]
    python benchmarks/arch.py --speed-rounds 3 [--twin-epochs 1]     # the twin comparison alone

Each job runs in its own subprocess (peak memory = its max RSS), in this order, so that the
hand-written twin's epochs come before and after pyro-vae's conv epochs (drift affects both):

1. ``ours-mlp``: ``pyro_vae.fit`` with ``arch="mlp"`` (784-400-20 MLP), ``epochs`` epochs, then
   ``pyro_vae.evaluate`` on the first ``test_images`` images of the t10k file;
2. ``hand-conv``: the hand-written conv VAE, ``twin_epochs`` epochs (timing only);
3. ``ours-conv``: ``pyro_vae.fit`` with ``arch="conv"``, ``epochs`` epochs, then the same evaluation;
4. ``hand-conv`` again.

Training uses the package's own split (60,000 training images shuffled with ``split_seed`` 0, the
last 500 held out for validation), dynamic binarization, batch 128, Adam 1e-3, z_dim 20, seed 0;
the test images are binarized once (seed 0, as ``pyro-vae evaluate`` does). The hand-written twin
trains on the same 59,500 images, same batch size and binarization. Seconds per epoch: pyro-vae's
from the run history (training plus the validation ELBO), the twin's around its loop.

``--speed-rounds R`` runs the speed comparison alone, R rounds of ``hand-conv`` then
``ours-conv-speed`` (``fit`` with ``arch="conv"``, no evaluation), ``twin_epochs`` epochs each, and
reports the ratio of each round's pair (adjacent runs see the same load on a shared machine) and
their median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
JOBS = ["ours-mlp", "hand-conv", "ours-conv", "hand-conv"]


def _config(args, arch: str):
    from pyro_vae import VAEConfig

    return VAEConfig(data_dir=args.data_dir, arch=arch, z_dim=20, hidden=(400,), batch_size=args.batch_size,
                     epochs=args.epochs, lr=1e-3, kl_warmup=0, seed=0, device="cpu", limit=args.limit)


def ours(args, arch: str) -> dict:
    """Train with pyro_vae.fit, then evaluate on the test images."""
    from pyro_vae import evaluate, fit, load_dataset

    config = _config(args, arch)
    if args.worker == "ours-conv-speed":
        run = fit(config.replace(epochs=args.twin_epochs), progress=False, log=lambda s: None)
        return {"seconds": [h["seconds"] for h in run.history], "train_elbo": run.history[-1]["train_elbo"]}
    run = fit(config, progress=False, log=lambda s: None)
    test = load_dataset("fashion-mnist", "test", data_dir=args.data_dir, binarize=config.binarize,
                        limit=args.test_images)
    start = time.perf_counter()
    result = evaluate(run, test, iwae_k=args.iwae_k, elbo_samples=100, batch_size=100, seed=0)
    return {"seconds": [h["seconds"] for h in run.history], "train_elbo": run.history[-1]["train_elbo"],
            "val_elbo": run.history[-1]["val_elbo"], "test_elbo": result.elbo, "test_elbo_se": result.elbo_se,
            "test_iwae": result.iwae, "test_iwae_se": result.iwae_se, "eval_seconds": time.perf_counter() - start,
            "n_train": len(load_dataset("fashion-mnist", "train", data_dir=args.data_dir, limit=args.limit)),
            "n_test": result.n, "parameters": sum(p.numel() for p in run.vae.parameters())}


def hand(args) -> dict:
    """The hand-written conv twin on the same training images (timing only)."""
    import pyro
    import torch

    sys.path.insert(0, str(HERE))
    from references import HandWrittenConvVAE

    from pyro_vae import load_dataset

    config = _config(args, "conv")
    images = load_dataset("fashion-mnist", "train", data_dir=args.data_dir, limit=args.limit).images
    n = len(images)
    pyro.set_rng_seed(0)
    ref = HandWrittenConvVAE(config.replace(epochs=args.twin_epochs), n)
    seconds = []
    for _ in range(args.twin_epochs):
        start = time.perf_counter()
        total = torch.zeros(())
        for idx in torch.randperm(n).split(args.batch_size):
            total += ref.step(torch.bernoulli(images[idx]), idx) * (len(idx) / n)
        final = -total.item() / n
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "train_elbo": final, "parameters": sum(p.numel() for p in ref.parameters())}


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    result = hand(args) if args.worker == "hand-conv" else ours(args, args.worker.split("-")[1])
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["job"] = args.worker
    return result


def _run_worker(args, job: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", job]
    for name in ("data_dir", "epochs", "twin_epochs", "iwae_k", "test_images", "batch_size", "threads", "limit"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_report(results) -> str:
    pairs = [(h, o) for h, o in zip(results[::2], results[1::2])]
    lines = ["| round | hand-written twin s/epoch | pyro-vae `--arch conv` s/epoch | ratio |", "|---|---|---|---|"]
    ratios = []
    for i, (h, o) in enumerate(pairs, 1):
        hs, os_ = statistics.median(h["seconds"]), statistics.median(o["seconds"])
        ratios.append(os_ / hs)
        lines.append(f"| {i} | {hs:.1f} | {os_:.1f} | {ratios[-1]:.2f} |")
    hand_all = statistics.median([s for h, _ in pairs for s in h["seconds"]])
    ours_all = statistics.median([s for _, o in pairs for s in o["seconds"]])
    lines.append(f"| median | {hand_all:.1f} | {ours_all:.1f} | {statistics.median(ratios):.2f} (of the rounds) |")
    return "\n".join(lines)


def report(args, results) -> str:
    by_job = {}
    for r in results:
        by_job.setdefault(r["job"], []).append(r)
    med = {job: statistics.median([s for r in rs for s in r["seconds"]]) for job, rs in by_job.items()}
    lines = ["| arch | parameters | s/epoch median (min-max) | peak MB | train ELBO | test ELBO | test IWAE (k=%d) |"
             " eval s |" % args.iwae_k, "|---|---|---|---|---|---|---|---|"]
    for job in ("ours-mlp", "ours-conv"):
        r = by_job[job][0]
        lines.append(f"| {job[5:]} | {r['parameters']:,} | {med[job]:.1f} ({min(r['seconds']):.1f}-{max(r['seconds']):.1f})"
                     f" | {r['peak_mb']:.0f} | {r['train_elbo']:.2f} | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f}"
                     f" | {r['test_iwae']:.2f} ± {r['test_iwae_se']:.2f} | {r['eval_seconds']:.0f} |")
    hand_secs = [s for r in by_job["hand-conv"] for s in r["seconds"]]
    lines += ["", "| conv implementation | s/epoch median | min | max | peak MB | ratio |", "|---|---|---|---|---|---|",
              f"| hand-written PyTorch twin | {med['hand-conv']:.1f} | {min(hand_secs):.1f} | {max(hand_secs):.1f} "
              f"| {max(r['peak_mb'] for r in by_job['hand-conv']):.0f} | 1.00 |",
              f"| pyro-vae `fit`, `--arch conv` | {med['ours-conv']:.1f} | {min(by_job['ours-conv'][0]['seconds']):.1f} "
              f"| {max(by_job['ours-conv'][0]['seconds']):.1f} | {by_job['ours-conv'][0]['peak_mb']:.0f} "
              f"| {med['ours-conv'] / med['hand-conv']:.2f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA, help=f"Fashion-MNIST IDX folder (default {DEFAULT_DATA})")
    p.add_argument("--epochs", type=int, default=5, help="training epochs of ours-mlp and ours-conv")
    p.add_argument("--twin-epochs", type=int, default=2, help="epochs of each hand-conv run (timing)")
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="training images (smoke runs; default: all)")
    p.add_argument("--speed-rounds", type=int, help="only the twin speed comparison, this many rounds")
    p.add_argument("--json", help="also write every job's raw result to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads; "
          f"{args.data_dir}; batch {args.batch_size}, "
          + (f"{args.speed_rounds} rounds of {args.twin_epochs} epoch(s) each" if args.speed_rounds
             else f"{args.epochs} epochs (twin: {args.twin_epochs} per run)"))
    results = []
    jobs = ["hand-conv", "ours-conv-speed"] * args.speed_rounds if args.speed_rounds else JOBS
    for job in jobs:
        results.append(_run_worker(args, job))
        results[-1]["job"] = job
        print(f"{job}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(speed_report(results) if args.speed_rounds else report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
