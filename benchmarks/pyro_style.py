"""Pyro's VAE tutorial program, unchanged, against the same networks on the program contract.

    python benchmarks/pyro_style.py --data-dir ../shared/data/mnist --out DIR
        [--epochs 4] [--limit 50000] [--eval-limit 1000] [--eval-k 1000] [--batch-size 256]

Two programs with the very same networks (the tutorial's 784-400-50 softplus encoder and decoder,
Bernoulli pixels through a sigmoid, ``--z-dim``/``--hidden``):

* ``tutorial``: the tutorial's ``VAE`` as Pyro users write it, ``model(x)``/``guide(x)``, a plain
  ``pyro.plate("data", x.shape[0])``; ``fit`` wraps it (:mod:`pyro_vae.program.pyro_style`), the
  plate's N/B and beta applied by effect handlers;
* ``contract``: the same model and guide written on the contract
  (:class:`pyro_vae.program.contract.Program`), ``model(x, idx, num_data, beta)`` with the package's
  ``data_plate`` and ``poutine.scale(beta)``.

Both are built after the same seed (the same initial weights) and trained by ``fit`` with the same
settings: the MNIST training file of ``--data-dir``, 10,000 held out (``val_size=10000``,
``split_seed=0``), the first ``--limit`` of the other 50,000 trained on, dynamic binarization, Adam,
no KL warm-up. The epochs are interleaved in this one process (tutorial, contract; then contract,
tutorial; ...), each continued with ``fit(..., resume=True)``; s/epoch is the training time of
each epoch (``history.json``, wall clock, no validation pass), and CPU s/epoch the CPU time of each
``fit`` call (this process alone: steadier than the wall clock on a shared machine). Then ``evaluate`` scores both on the first
``--eval-limit`` held-out images (one fixed binarization): the ELBO (100 draws per image) and the
IWAE bound (``--eval-k`` samples), and the per-image differences (paired standard error).
The table goes to ``--out/results.md`` and stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae import VAEConfig, evaluate, fit
from pyro_vae.core.data import load_splits
from pyro_vae.program.contract import Program
from pyro_vae.program.plates import data_plate


# ----------------------------------------------------------------------------- Pyro's VAE tutorial, unchanged


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        # setup the three linear transformations used
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        # setup the non-linearities
        self.softplus = nn.Softplus()

    def forward(self, x):
        # define the forward computation on the image x
        # first shape the mini-batch to have pixels in the rightmost dimension
        x = x.reshape(-1, 784)
        # then compute the hidden units
        hidden = self.softplus(self.fc1(x))
        # then return a mean vector and a (positive) square root covariance
        # each of size batch_size x z_dim
        z_loc = self.fc21(hidden)
        z_scale = torch.exp(self.fc22(hidden))
        return z_loc, z_scale


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        # setup the two linear transformations used
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        # setup the non-linearities
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        # define the forward computation on the latent z
        # first compute the hidden units
        hidden = self.softplus(self.fc1(z))
        # return the parameter for the output Bernoulli
        # each is of size batch_size x 784
        loc_img = self.sigmoid(self.fc21(hidden))
        return loc_img


class VAE(nn.Module):
    # by default our latent space is 50-dimensional
    # and we use 400 hidden units
    def __init__(self, z_dim=50, hidden_dim=400, use_cuda=False):
        super().__init__()
        # create the encoder and decoder networks
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)

        if use_cuda:
            # calling cuda() here will put all the parameters of
            # the encoder and decoder networks into gpu memory
            self.cuda()
        self.use_cuda = use_cuda
        self.z_dim = z_dim

    # define the model p(x|z)p(z)
    def model(self, x):
        # register PyTorch module `decoder` with Pyro
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            # setup hyperparameters for prior p(z)
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            # sample from prior (value will be sampled by guide when computing the ELBO)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            # decode the latent code z
            loc_img = self.decoder.forward(z)
            # score against actual images (with relaxed Bernoulli values)
            pyro.sample(
                "obs",
                dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                obs=x.reshape(-1, 784),
            )
            # return the loc so we can visualize it later
            return loc_img

    # define the guide (i.e. variational distribution) q(z|x)
    def guide(self, x):
        # register PyTorch module `encoder` with Pyro
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            # use the encoder to get the parameters used to define q(z|x)
            z_loc, z_scale = self.encoder.forward(x)
            # sample the latent code z
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


# ----------------------------------------------------------------------------- the same networks on the contract


class ContractVAE(Program):
    """The tutorial's model and guide with the contract's ``(x, idx, num_data, beta)``: the
    package's ``data`` plate (N/B) and ``poutine.scale(beta)`` on the latent site."""

    latent_sites = ("latent",)
    data_site = "obs"

    def __init__(self, z_dim=50, hidden_dim=400):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim)
        self.decoder = Decoder(z_dim, hidden_dim)
        self.z_dim = z_dim
        self.event_shape = (1, 28, 28)

    def model(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, num_data):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            with poutine.scale(scale=beta):
                z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x, idx=None, num_data=None, beta=1.0):
        pyro.module("encoder", self.encoder)
        with data_plate(x, idx, num_data), poutine.scale(scale=beta):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


PROGRAMS = {"tutorial": VAE, "contract": ContractVAE}


# ----------------------------------------------------------------------------- the comparison


def build(name: str, args):
    """The program ``name``, its weights drawn from the seed ``args.seed`` (the same for both)."""
    torch.manual_seed(args.seed)
    return PROGRAMS[name](z_dim=args.z_dim, hidden_dim=args.hidden)


def train(args, config: VAEConfig, train_data) -> dict:
    """Both programs trained epoch by epoch, interleaved; ``{name: {"run": Run, "seconds": [...], "cpu": [...]}}``
    (``seconds``: the epoch's training, wall clock; ``cpu``: CPU seconds of the whole ``fit`` call)."""
    out = {name: {"seconds": [], "cpu": []} for name in PROGRAMS}
    for epoch in range(1, args.epochs + 1):
        order = list(PROGRAMS) if epoch % 2 else list(reversed(PROGRAMS))
        for name in order:
            cpu = time.process_time()
            run = fit(config.replace(epochs=epoch), Path(args.out) / name, train_data=train_data, val_data=None,
                      program=build(name, args), resume=epoch > 1, overwrite=epoch == 1, progress=False,
                      log=lambda s: None)
            out[name]["cpu"].append(time.process_time() - cpu)
            out[name]["run"] = run
            out[name]["seconds"].append(run.history[-1]["seconds"])
            print(f"epoch {epoch}/{args.epochs} {name:<8} train ELBO {run.history[-1]['train_elbo']:9.3f}  "
                  f"{run.history[-1]['seconds']:.1f}s  ({out[name]['cpu'][-1]:.1f} CPU s)", flush=True)
    return out


def paired(a: torch.Tensor, b: torch.Tensor):
    """Mean and standard error of the per-image differences ``a - b``."""
    d = (a - b).double()
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else float("nan")


def compare(args, runs: dict, test) -> dict:
    """Held-out ELBO and IWAE bound of both, and the per-image differences."""
    scores = {}
    for name in PROGRAMS:
        scores[name] = evaluate(runs[name]["run"], test, iwae_k=args.eval_k, elbo_samples=100, batch_size=100, seed=0)
        print(f"{name}: ELBO {scores[name].elbo:.3f} ± {scores[name].elbo_se:.3f}, IWAE (k={args.eval_k}) "
              f"{scores[name].iwae:.3f} ± {scores[name].iwae_se:.3f} ({scores[name].seconds:.0f}s)", flush=True)
    t, c = scores["tutorial"].per_image, scores["contract"].per_image
    weights = [runs[name]["run"].program.state_dict() for name in PROGRAMS]
    return {"scores": scores, "elbo_diff": paired(t["elbo"], c["elbo"]), "iwae_diff": paired(t["iwae"], c["iwae"]),
            "max_weight_diff": max((weights[0][k] - w).abs().max().item()
                                   for k, w in zip(weights[0], weights[1].values()))}


def table(args, runs: dict, result: dict, n_train: int) -> str:
    s = {name: runs[name]["seconds"] for name in PROGRAMS}
    cpu = {name: runs[name]["cpu"] for name in PROGRAMS}
    ratios = [a / b for a, b in zip(s["tutorial"], s["contract"])]
    cpu_ratios = [a / b for a, b in zip(cpu["tutorial"], cpu["contract"])]
    lines = [f"MNIST training file of {args.data_dir}: 10,000 held out (val_size=10000, split_seed=0), {n_train} "
             f"trained on, dynamic binarization; z_dim {args.z_dim}, hidden {args.hidden}, batch {args.batch_size}, "
             f"Adam {args.lr:g}, no KL warm-up, {args.epochs} epochs, seed {args.seed}, torch "
             f"{torch.__version__} on 1 thread. Scored on the first {result['scores']['tutorial'].n} held-out images, "
             f"one fixed binarization: ELBO from 100 draws, IWAE bound k = {args.eval_k} (nats per image).", "",
             "| program | s/epoch (median) | CPU s/epoch (median) | held-out ELBO | SE | IWAE k=" + str(args.eval_k)
             + " | SE | active units |", "|---|---|---|---|---|---|---|---|"]
    for name in PROGRAMS:
        r = result["scores"][name]
        lines.append(f"| {name} | {statistics.median(s[name]):.2f} | {statistics.median(cpu[name]):.2f} | "
                     f"{r.elbo:.3f} | {r.elbo_se:.3f} | {r.iwae:.3f} | "
                     f"{r.iwae_se:.3f} | {r.active_units} |")
    (de, de_se), (di, di_se) = result["elbo_diff"], result["iwae_diff"]
    lines += ["", f"tutorial - contract, per image: ELBO {de:+.4f} ± {de_se:.4f}, IWAE {di:+.4f} ± {di_se:.4f} "
              f"(paired SE); largest difference of the trained weights {result['max_weight_diff']:.3g}.",
              f"s/epoch tutorial / contract, epoch by epoch: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.3f}, total {sum(s['tutorial']) / sum(s['contract']):.3f}; "
              f"in CPU seconds of each fit call: {', '.join(f'{r:.3f}' for r in cpu_ratios)}; median "
              f"{statistics.median(cpu_ratios):.3f}, total {sum(cpu['tutorial']) / sum(cpu['contract']):.3f}."]
    return "\n".join(lines) + "\n"


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the MNIST training IDX file (60,000 images)")
    p.add_argument("--out", required=True, help="folder for the two run folders and results.md")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="train on the first N of the 50,000 (default: all)")
    p.add_argument("--eval-limit", type=int, default=1000, help="score the first N of the 10,000 held-out images")
    p.add_argument("--eval-k", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="256: the tutorial's")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    config = VAEConfig(dataset="mnist", data_dir=args.data_dir, val_size=10000, split_seed=0, limit=args.limit,
                       batch_size=args.batch_size, lr=args.lr, kl_warmup=0, seed=args.seed, device="cpu")
    train_data, test = load_splits(config)
    start = time.perf_counter()
    runs = train(args, config, train_data)
    result = compare(args, runs, test.subset(min(args.eval_limit, len(test))))
    text = table(args, runs, result, len(train_data))
    (Path(args.out) / "results.md").write_text(text)
    print(text + f"\n({(time.perf_counter() - start) / 60:.1f} min in all)", flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps({
        "seconds": {name: runs[name]["seconds"] for name in PROGRAMS},
        "cpu_seconds": {name: runs[name]["cpu"] for name in PROGRAMS},
        "scores": {name: result["scores"][name].to_dict() for name in PROGRAMS},
        "elbo_diff": result["elbo_diff"], "iwae_diff": result["iwae_diff"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
