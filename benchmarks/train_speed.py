"""Speed benchmark: pyro-vae's training (and IWAE evaluation) against hand-written references.

    python benchmarks/train_speed.py [--data-dir DIR] [--epochs 3] [--rounds 2] [--batch-size 256] [--threads 2]
    python benchmarks/train_speed.py --mode eval [--iwae-k 1000] [--images 1000]

Train mode runs, interleaved round by round (A B C D, A B C D, ...) so drift affects all equally,
each in a fresh subprocess (so peak memory is per implementation):

- ``hand``: hand-written PyTorch VAE, analytic KL, one ``torch.optim.Adam`` (benchmarks/references.py);
- ``tutorial``: Pyro tutorial style, ``SVI`` + ``pyro.optim.Adam`` + ``Trace_ELBO``, validation on;
- ``ours-trace``, ``ours-meanfield``: ``pyro_vae.fit`` with ``elbo="trace"`` / ``"meanfield"``;
- ``ours-trace-pyro``: ``pyro_vae.fit`` with ``fused=False`` (every step through Pyro's tracing).

All use the same architecture (784-400-50 MLP, softplus, Bernoulli logits), Adam 1e-3, the same
in-memory data, minibatch order and dynamic binarization, and the same number of threads. It prints
seconds per epoch (median, min, max over all epochs of all rounds), images per second, peak memory
(max RSS of the subprocess), the final train ELBO (a check that all did the same work), and each
median as a ratio to ``hand``. Eval mode times the IWAE bound, pyro-vae's ``iwae_bound`` against a
hand-written batched PyTorch computation, on the same model and images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN_IMPLS = ["hand", "tutorial", "ours-trace", "ours-meanfield", "ours-trace-pyro"]


def load_images(args):
    from pyro_vae import load_dataset

    data = load_dataset("mnist-5k", "train", data_dir=args.data_dir, val_size=0)
    return data


def worker(args) -> dict:
    """Train one implementation for ``args.epochs`` epochs; return timings and the final ELBO."""
    import pyro
    import torch

    sys.path.insert(0, str(HERE))
    from references import HandWrittenVAE, PyroTutorialVAE

    from pyro_vae import VAEConfig, fit

    torch.set_num_threads(args.threads)
    data = load_images(args)
    config = VAEConfig(z_dim=50, hidden=(400,), batch_size=args.batch_size, epochs=args.epochs, lr=1e-3,
                       kl_warmup=0, seed=args.seed, val_size=0)  # the plain ELBO, as the references
    impl = args.worker
    if impl.startswith("ours"):
        elbo = "meanfield" if impl == "ours-meanfield" else "trace"
        run = fit(config.replace(elbo=elbo, fused=impl != "ours-trace-pyro"), train_data=data, val_data=None,
                  progress=False, log=lambda s: None)
        seconds = [h["seconds"] for h in run.history]
        final = run.history[-1]["train_elbo"]
    else:
        pyro.set_rng_seed(args.seed)
        pyro.enable_validation(False)
        images = data.images
        n = len(images)
        ref = HandWrittenVAE(config, n) if impl == "hand" else PyroTutorialVAE(config, n)
        seconds = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            total = torch.zeros(())
            for idx in torch.randperm(n).split(args.batch_size):
                x = torch.bernoulli(images[idx])
                total += ref.step(x, idx) * (len(idx) / n)
            final = -total.item() / n
            seconds.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"impl": impl, "seconds": seconds, "final_train_elbo": final, "peak_mb": peak_mb, "n": len(data)}


def eval_worker(args) -> dict:
    """Time the IWAE bound: pyro-vae's ``iwae_bound`` vs a hand-written batched computation."""
    import torch

    sys.path.insert(0, str(HERE))
    from references import hand_written_iwae

    from pyro_vae import VAE, VAEConfig
    from pyro_vae.infer.evaluate import CHUNK_ROWS, iwae_bound

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.bernoulli(load_images(args).images[: args.images])
    vae = VAE(VAEConfig(z_dim=50, hidden=(400,))).eval()
    results = {"ours": [], "hand": []}
    values = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for impl in results:
                torch.manual_seed(args.seed)
                start = time.perf_counter()
                if impl == "ours":
                    total = []
                    for xb in x.split(args.eval_batch):
                        loc, scale = vae.inference.posterior(xb)
                        total.append(iwae_bound(vae, xb, loc, scale, args.iwae_k))
                    bound = torch.cat(total)
                else:
                    chunk = max(1, CHUNK_ROWS // args.eval_batch)  # the same decoder batch as ours
                    bound = torch.cat([hand_written_iwae(vae.inference.encoder, vae.decoder, xb, args.iwae_k, chunk)
                                       for xb in x.split(args.eval_batch)])
                results[impl].append(time.perf_counter() - start)
                values[impl] = bound.mean().item()
    return {"seconds": results, "iwae": values}


def _run_worker(args, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--data-dir", help="MNIST-format IDX folder (default: the embedded mnist-5k, all 5,000 images)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per implementation per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impls", default=",".join(TRAIN_IMPLS))
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    print(f"# torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; data: "
          f"{args.data_dir or 'mnist-5k (embedded)'}, train split, dynamic binarization")
    if args.mode == "eval":
        r = eval_worker(args)
        ours, hand = statistics.median(r["seconds"]["ours"]), statistics.median(r["seconds"]["hand"])
        print(f"IWAE bound, k = {args.iwae_k}, {args.images} images, batches of {args.eval_batch}, "
              f"{args.rounds} rounds (median seconds)")
        print("| implementation | seconds | mean IWAE (nats/image) | ratio |\n|---|---|---|---|")
        print(f"| hand-written PyTorch | {hand:.2f} | {r['iwae']['hand']:.2f} | 1.00 |")
        print(f"| pyro_vae.evaluate.iwae_bound | {ours:.2f} | {r['iwae']['ours']:.2f} | {ours / hand:.2f} |")
        return 0
    impls = [i.strip() for i in args.impls.split(",")]
    runs = {i: [] for i in impls}
    for r in range(args.rounds):
        for impl in impls:
            runs[impl].append(_run_worker(args, impl))
            print(f"round {r + 1}: {impl} {runs[impl][-1]['seconds']}", file=sys.stderr, flush=True)
    n = runs[impls[0]][0]["n"]
    print(f"{n} images, batch {args.batch_size}, {args.epochs} epochs x {args.rounds} rounds per implementation")
    print("| implementation | s/epoch median | min | max | images/s | peak MB | final train ELBO | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    reference = statistics.median([s for w in runs.get("hand", runs[impls[0]]) for s in w["seconds"]])
    for impl in impls:
        secs = [s for w in runs[impl] for s in w["seconds"]]
        med = statistics.median(secs)
        elbo = statistics.mean(w["final_train_elbo"] for w in runs[impl])
        peak = max(w["peak_mb"] for w in runs[impl])
        print(f"| {impl} | {med:.3f} | {min(secs):.3f} | {max(secs):.3f} | {n / med:,.0f} | {peak:.0f} "
              f"| {elbo:.2f} | {med / reference:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
