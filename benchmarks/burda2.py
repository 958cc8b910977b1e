"""Burda, Grosse & Salakhutdinov (2016), Table 1, two stochastic layers: ``--model vae2`` with pyro-vae.

    python benchmarks/burda2.py --data-dir ../shared/data/mnist --out DIR [--minutes M | --epochs E | --speed-only]
        [--models vae2,iwae2-5,iwae2-50] [--eval-limit 1000] [--batch-size 20] [--lr-schedule cosine]
        [--kl-warmup E] [--bias-init zero|mean] [--lr 1e-3] [--resume] [--speed-images 5000]

The model is :class:`pyro_vae.program.vae2.TwoLayerVAE` (what ``--model vae2`` builds), passed to
``fit`` as ``program=`` as a user would; it is written on the program contract alone: z2 (50) ~ N(0, I);
z1 (100) | z2 through two tanh layers of 100; x | z1 Bernoulli through two tanh layers of 200;
q(z1 | x) (tanh 200, 200) q(z2 | z1) (tanh 100, 100). ``vae2`` trains
its ELBO, ``iwae2-K`` the IWAE bound with K particles; both on Pyro's traced path (no closed form
for the fused one). Everything else is ``benchmarks/burda.py``'s (imported, not copied): the flags,
the split (the 60,000-image MNIST training file, ``val_size=10000``, ``split_seed=0``: 50,000 trained
on, dynamically binarized, 10,000 held out as the test images), ``--minutes`` (one timed epoch plans
the epochs, a hard cap stops a slowed run, checkpointed) and ``--resume``. Evaluation: the IWAE bound
with k = ``--eval-k`` (5000: their test NLL) over both latent layers, the ELBO and the active units of
each layer, on the first ``--eval-limit`` held-out images (one fixed binarization, seed 0).

``--out/results.json`` is rewritten after every epoch (each model's history so far) and after each
model's evaluation; ``--out/results.md`` holds the tables, beside the paper's two-layer rows and
the one-layer rows of ``benchmarks/README.md``.

Speed (``--speed-only``, or before training unless ``--speed-images 0``): ``fit`` on the program
against a hand-written PyTorch twin (:class:`HandWrittenVAE2`: the same networks, the reparameterized
bound in plain tensor code, one ``torch.optim.Adam`` with torch's defaults; a second twin uses ``fit``'s
multi-tensor Adam, ``foreach=True``), interleaved in this process on
``--speed-images`` images per timed epoch, scaled to 50,000, wall and CPU seconds (the CPU ratio is
the steadier on a shared machine); a third column, a plain loop of Pyro's ELBO on the program
(:class:`PyroLoop`), splits the difference into Pyro's tracing and ``fit``'s loop. First the twin's
bound is checked against Pyro's ``Trace_ELBO`` on the program at the same weights and the same draw.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn
from torch.nn import functional as F

from burda import arguments, hand_written_epoch, speed, speed_table, test_slice, train_one
from pyro_vae import IWAE_ELBO, Callback, VAEConfig
from pyro_vae.core.data import load_splits
from pyro_vae.infer.evaluate import evaluate
from pyro_vae.program.vae2 import TwoLayerVAE

MODELS = {  # name -> (objective, K)
    "vae2": ("elbo", 1),
    "iwae2-5": ("iwae", 5),
    "iwae2-50": ("iwae", 50),
}
PAPER = {"vae2": 85.33, "iwae2-5": 83.89, "iwae2-50": 82.90}  # Burda et al. Table 1, 2 stochastic layers, test NLL
#: benchmarks/README.md, one layer, test NLL on the same first 1,000 held-out images, batch 100, cosine schedule:
#: (second pair: 26 min each, 450 / 190 epochs; third round: 60 CPU-min, KL warm-up, bias init mean)
ONE_LAYER = {"vae2": (89.92, 87.49), "iwae2-5": (89.44, 87.22)}
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def tanh_net(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def gaussian(out: torch.Tensor):
    loc, raw_scale = out.chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + 1e-5


def log_normal(z, loc, scale) -> torch.Tensor:
    return (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - HALF_LOG_2PI).sum(-1)


class HandWrittenVAE2(nn.Module):
    """The twin: the two-layer model and its bound with ``k`` particles (1: the ELBO) in plain PyTorch.
    Its parameters come in the order of :class:`TwoLayerVAE`'s (:meth:`copy_from`)."""

    def __init__(self, k: int, num_data: int, lr: float, x_dim: int = 784, foreach: bool = False):
        super().__init__()
        self.p_x, self.p_z1 = tanh_net(100, 200, x_dim), tanh_net(50, 100, 200)
        self.q_z1, self.q_z2 = tanh_net(x_dim, 200, 200), tanh_net(100, 100, 100)
        self.k, self.num_data = k, num_data
        # foreach=False: torch's default Adam on CPU, what a hand-written loop gets; True: fit's
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, foreach=foreach)

    @torch.no_grad()
    def copy_from(self, program: TwoLayerVAE) -> "HandWrittenVAE2":
        for mine, theirs in zip(self.parameters(), program.parameters(), strict=True):
            mine.copy_(theirs)
        return self

    def log_weights(self, x, eps1, eps2) -> torch.Tensor:
        """``log p(x, z1, z2) - log q(z1, z2 | x)``, ``[K, B]``, at ``z = loc + scale * eps`` (``eps [K, B, d]``)."""
        loc1, scale1 = gaussian(self.q_z1(x))
        z1 = loc1 + scale1 * eps1
        loc2, scale2 = gaussian(self.q_z2(z1))
        z2 = loc2 + scale2 * eps2
        logits = self.p_x(z1)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_p = log_px + log_normal(z1, *gaussian(self.p_z1(z2))) + (-0.5 * z2.pow(2) - HALF_LOG_2PI).sum(-1)
        return log_p - log_normal(z1, loc1, scale1) - log_normal(z2, loc2, scale2)

    def loss(self, x) -> torch.Tensor:
        eps1, eps2 = torch.randn(self.k, x.shape[0], 100), torch.randn(self.k, x.shape[0], 50)
        bound = torch.logsumexp(self.log_weights(x, eps1, eps2), 0) - math.log(self.k)  # [B]
        return -bound.sum() * (self.num_data / x.shape[0])

    def epoch(self, images, batch_size: int) -> float:
        return hand_written_epoch(self, images, batch_size)


@torch.no_grad()
def twin_gap(x: torch.Tensor, seed: int = 0) -> tuple:
    """``(Pyro's -ELBO, the twin's)`` on the program's ``Trace_ELBO`` draw: the same weights, the
    same z1, z2 (the twin gets the draw's epsilons from the guide's trace), one particle, summed over ``x``."""
    torch.manual_seed(seed)
    program = TwoLayerVAE((x.shape[-1],))
    twin = HandWrittenVAE2(1, len(x), 1e-3, x_dim=x.shape[-1]).copy_from(program)
    pyro.set_rng_seed(seed + 1)
    ours = Trace_ELBO().loss(program.model, program.guide, x)
    pyro.set_rng_seed(seed + 1)
    trace = poutine.trace(program.guide).get_trace(x)
    eps = [(trace.nodes[s]["value"] - trace.nodes[s]["fn"].base_dist.loc) / trace.nodes[s]["fn"].base_dist.scale
           for s in ("z1", "z2")]
    return ours, -twin.log_weights(x, eps[0][None], eps[1][None]).sum().item()


def model_config(name: str, args, epochs: int) -> VAEConfig:
    """The training settings; the model is the ``program=`` of :func:`program`."""
    objective, k = MODELS[name]
    return VAEConfig(dataset="mnist", data_dir=args.data_dir, val_size=10000, objective=objective,
                     num_particles=k, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule,
                     kl_warmup=args.kl_warmup, epochs=epochs, seed=args.seed)


def start_at_mean(net: nn.Module, args, train) -> None:
    """``--bias-init mean``: the last layer's bias (the logits of x) at the logit of the mean training pixel."""
    if args.bias_init == "mean":
        with torch.no_grad():
            net[-1].bias.copy_(torch.logit(train.images.mean(0).clamp(1e-3, 1 - 1e-3)))


def program(args, train) -> dict:
    """``fit``'s and ``load_run``'s ``program=``: a :class:`TwoLayerVAE` initialised from ``--seed``
    (``--bias-init mean``: its logits start at the mean training image), as a user would pass it."""
    torch.manual_seed(args.seed)
    two_layer = TwoLayerVAE(train.event_shape)
    start_at_mean(two_layer.p_x, args, train)
    return {"program": two_layer}


def two_layer_twin(name: str, args, train, num_data: int, foreach: bool = False) -> HandWrittenVAE2:
    twin = HandWrittenVAE2(MODELS[name][1], num_data, args.lr, foreach=foreach)
    start_at_mean(twin.p_x, args, train)
    return twin


class PyroLoop:
    """The program trained without ``fit``: a plain loop of Pyro's ``Trace_ELBO`` (``IWAE_ELBO``
    for K > 1) and ``fit``'s ``torch.optim.Adam`` (``foreach=True``), validation off as in ``fit``;
    what separates the cost of Pyro's tracing (this against the ``foreach`` twin) from that of
    ``fit``'s loop (``fit`` against this)."""

    def __init__(self, name: str, args, train, num_data: int):
        self.program = program(args, train)["program"]
        k = MODELS[name][1]
        self.elbo = Trace_ELBO() if MODELS[name][0] == "elbo" else IWAE_ELBO(num_particles=k)
        self.optimizer = torch.optim.Adam(self.program.parameters(), lr=args.lr, foreach=True)
        self.num_data = num_data

    def epoch(self, images, batch_size: int) -> float:
        start = time.perf_counter()
        with pyro.validation_enabled(False):
            for idx in torch.randperm(len(images)).split(batch_size):
                loss = self.elbo.differentiable_loss(self.program.model, self.program.guide, torch.bernoulli(images[idx]),
                                                     idx, num_data=self.num_data)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return time.perf_counter() - start


class WriteJSON(Callback):
    """After every epoch: ``report`` with model ``name``'s history so far, to ``path``."""

    def __init__(self, path: Path, report: dict, name: str):
        self.path, self.report, self.name = path, report, name

    def on_epoch_end(self, trainer, record: dict) -> None:
        self.report["models"].setdefault(self.name, {})["history"] = list(trainer.run.history)
        write_report(self.path, self.report)


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def main(argv=None) -> int:
    args = arguments(__doc__.split("\n")[0], MODELS).parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",")]
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_splits(model_config(args.models[0], args, 1))
    print(f"# torch {torch.__version__}, 1 thread; MNIST training file, {len(train)} trained on, {len(test)} held out "
          f"(split_seed 0); batch {args.batch_size}, schedule {args.lr_schedule}", flush=True)
    ours, twin = twin_gap(torch.bernoulli(test.images[:100], generator=torch.Generator().manual_seed(0)))
    print(f"twin check (100 held-out images, one draw): Pyro's -ELBO {ours:.4f}, the twin's {twin:.4f}", flush=True)
    report = {"settings": vars(args), "paper": PAPER, "one_layer": ONE_LAYER, "twin_check": [ours, twin],
              "speed": [], "models": {}}
    if args.speed_images:
        twins = {"hand-written": two_layer_twin,  # torch's default Adam, what a hand-written loop gets
                 "hand-written, foreach Adam": functools.partial(two_layer_twin, foreach=True),  # fit's optimizer
                 "Pyro loop": PyroLoop}
        report["speed"] = speed(args, train, twins=twins, config=model_config, modules=program)
        write_report(out / "results.json", report)
    if args.speed_only:
        print(speed_table(report["speed"]))
        return 0
    for name in args.models:
        r = train_one(name, args, train, log=lambda s: print(f"  {name}: {s}", flush=True), config=model_config,
                      modules=program, callbacks=[WriteJSON(out / "results.json", report, name)])
        ev = evaluate(r.pop("run"), test_slice(test, args.eval_limit), iwae_k=args.eval_k, seed=0)
        r.update(model=name, iwae=ev.iwae, iwae_se=ev.iwae_se, elbo=ev.elbo, active_units=ev.active_units_by_site,
                 eval_n=ev.n, eval_seconds=ev.seconds)
        report["models"].setdefault(name, {}).update(r)
        write_report(out / "results.json", report)
        print(json.dumps(r), flush=True)
        write_results(args, report)
    return 0


def write_results(args, report) -> None:
    budget = f"{args.minutes} min" if args.minutes else f"{args.epochs} epochs"
    done = [r for r in report["models"].values() if "iwae" in r]
    lines = [f"Two stochastic layers (--model vae2). Budget {budget} of training per model (1 CPU thread), batch "
             f"{args.batch_size}, Adam {args.lr:g}, schedule {args.lr_schedule}, KL warm-up {args.kl_warmup} epochs, "
             f"output bias init {args.bias_init}. "
             f"Test NLL = -IWAE bound (k = {args.eval_k}, over z1 and z2) on the first {done[0]['eval_n']} of the "
             "10,000 images held out of the 60,000 MNIST training images (seeded split), one fixed binarization.", "",
             f"| model | K | epochs (planned) | train min | CPU min | -IWAE k={args.eval_k} (nats) | SE | -ELBO | "
             "active units (of 100, 50) | paper (2 layers) | ours, 1 layer (26 min; 60 CPU-min) |", "|---" * 11 + "|"]
    for r in done:
        objective, k = MODELS[r["model"]]
        units = ", ".join(f"{site} {n}" for site, n in r["active_units"].items())
        lines.append(f"| {objective} | {k} | {r['epochs']} ({r['planned_epochs']}) | {r['train_seconds'] / 60:.1f} | "
                     f"{r['train_cpu_seconds'] / 60:.1f} | {-r['iwae']:.2f} | {r['iwae_se']:.2f} | {-r['elbo']:.2f} | "
                     f"{units} | {PAPER.get(r['model'], '')} | {'; '.join(map(str, ONE_LAYER.get(r['model'], ())))} |")
    if report["speed"]:
        lines += ["", speed_table(report["speed"])]
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "results.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
