"""``pyro-vae train``: train a VAE by SVI and write a run folder."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from ..core.config import (BASELINES, DEVICES, ELBOS, ESTIMATORS, GUIDES, LIKELIHOODS, LR_SCHEDULES, NONFINITE,
                           OBJECTIVES, VAEConfig)
from ..core.config import MODELS
from ..core.config import PRIORS
from ..core.errors import TrainingInterrupted
from ..experiments.m2_plots import SaveM2Figures
from ..experiments.plots import SaveFigures
from ..infer import distributed
from ..infer.distributed import under_torchrun
from ..infer.svi import fit
from .flags import add_arch_flag, add_data_flags, add_program_flags, config_from_args, hidden_widths, program_from_args


def add_parser(sub) -> None:
    d = VAEConfig()
    p = sub.add_parser("train", help="train a VAE by SVI and write a run folder", description="Train a VAE by SVI.")
    add_data_flags(p)
    p.add_argument("--val-size", type=int, default=d.val_size, help=f"validation images held out (default {d.val_size})")
    m = p.add_argument_group("model and guide")
    m.add_argument("--model", choices=MODELS, default=d.model,
                   help="vae (default) | m2: semi-supervised, a label y beside z (Kingma et al. 2014; needs labels)")
    m.add_argument("--labels", dest="num_labels", type=int, default=d.num_labels, metavar="N",
                   help=f"m2: training images whose label is used, balanced over classes (default {d.num_labels})")
    m.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"m2: weight of the classification term, alpha * N * mean log q(y|x) (default {d.alpha})")
    m.add_argument("--labelled-batch", type=int, default=d.labelled_batch, metavar="L",
                   help=f"m2: labelled images added to every minibatch (default {d.labelled_batch})")
    m.add_argument("--labelled-weight", default=d.labelled_weight, metavar="W",
                   help="m2: weight w of the labelled ELBO: data (default: a labelled image weighs as one image) | "
                   "step (the labelled minibatch counts once per step: w = steps per epoch) | a number")
    m.add_argument("--features", metavar="RUN", type=lambda path: str(Path(path).resolve()),
                   help="m2: a VAE run folder (M1); M2 models its codes z1 ~ q(z1|x) instead of the pixels "
                   "(Kingma et al.'s M1+M2); the run records it and needs it to load")
    m.add_argument("--likelihood", choices=LIKELIHOODS, default=d.likelihood,
                   help="p(x|z): bernoulli (default) | normal | continuous-bernoulli (grey values in [0, 1])")
    add_arch_flag(m)
    add_program_flags(m)
    m.add_argument("--z-dim", type=int, default=d.z_dim, help=f"latent dimension (default {d.z_dim})")
    m.add_argument("--hidden", type=hidden_widths, default=d.hidden, help="hidden widths, e.g. 400 or 500,500")
    m.add_argument("--guide", choices=GUIDES, default=d.guide,
                   help="variational family (default amortized; iaf: a flow, full-rank: full covariance)")
    m.add_argument("--flow-steps", type=int, default=d.flow_steps, metavar="K",
                   help=f"iaf: conditional IAF transforms (default {d.flow_steps})")
    m.add_argument("--prior", choices=PRIORS, default=d.prior,
                   help="p(z): normal N(0, I) (default) | mog (learned mixture) | vamp (VampPrior)")
    m.add_argument("--prior-components", type=int, default=d.prior_components, metavar="K",
                   help=f"mog, vamp: mixture components / pseudo-inputs (default {d.prior_components})")
    m.add_argument("--refine-steps", type=int, default=d.refine_steps, metavar="K",
                   help=f"semi-amortized: gradient steps refining the encoder's output (default {d.refine_steps})")
    m.add_argument("--refine-lr", type=float, default=d.refine_lr, help=f"semi-amortized step size (default {d.refine_lr})")
    m.add_argument("--local-lr", type=float, default=d.local_lr,
                   help=f"mean-field: learning rate of the per-image parameters (default {d.local_lr})")
    o = p.add_argument_group("inference")
    o.add_argument("--elbo", choices=ELBOS, default=d.elbo, help="trace (default) | meanfield (analytic KL) | jit")
    o.add_argument("--no-fused", dest="fused", action="store_false",
                   help="run every ELBO through Pyro's tracing (same numbers, slower; see pyro_vae/fused.py)")
    o.add_argument("--num-particles", type=int, default=d.num_particles, help="z samples per image per step (K of iwae/dreg)")
    o.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="elbo (default) | iwae: importance-weighted bound log (1/K) sum_k p(x,z_k)/q(z_k|x), "
                   "K = --num-particles | dreg: the same bound, doubly reparameterized encoder gradient")
    o.add_argument("--estimator", choices=ESTIMATORS, default=d.estimator, help="reparam (default) | score (BBVI)")
    o.add_argument("--baseline", choices=BASELINES, default=d.baseline, help="for score: none | decaying-avg | neural")
    o.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    o.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    o.add_argument("--adam-beta1", type=float, default=d.adam_beta1, metavar="B1",
                   help=f"Adam's decay rate of its mean gradient (default {d.adam_beta1})")
    o.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="constant (default) | cosine: lr (1 + cos(pi epoch/epochs))/2 | burda: lr 10^(-i/7) in 8 "
                   "stages of 3^i epochs (Burda et al. 2016), compressed into --epochs")
    o.add_argument("--kl-warmup", type=int, default=d.kl_warmup, metavar="E",
                   help=f"epochs of linear KL warm-up, beta = 1/E ... 1 (default {d.kl_warmup}; 0: off)")
    o.add_argument("--beta", type=float, default=d.beta, help="KL weight after warm-up (default 1)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--device", choices=DEVICES, default=d.device)
    r = p.add_argument_group("output")
    r.add_argument("--out", metavar="DIR", help="run folder (default runs/<date-time>)")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint (same flags; --epochs may grow)"
    )
    o.add_argument("--on-nonfinite", choices=NONFINITE, default=d.on_nonfinite,
                   help="a NaN/inf loss: stop (default; the last good checkpoint is kept) | skip the step")
    r.add_argument("--tensorboard", action="store_true",
                   help='also write TensorBoard event files into --out/tensorboard/ (pip install -e ".[tensorboard]")')
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


FIGURES = {"vae": SaveFigures, "m2": SaveM2Figures, "vae2": SaveFigures}  # config.model -> the callback drawing its figures


def _default_out() -> Path:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def _resume_command(args, out: Path) -> str:
    """The command line that continues an interrupted run: this one, with ``--resume``."""
    argv = [a for a in getattr(args, "argv", None) or ["train"] if a not in ("--overwrite", "--resume")]
    argv = _without_program(argv)  # the run records its program file: --resume finds it, checked unchanged
    if args.out is None:
        argv += ["--out", str(out)]
    command = ["torchrun", "<the same torchrun flags>", "-m", "pyro_vae"] if under_torchrun() else ["pyro-vae"]
    return " ".join(a if a.startswith("<") else shlex.quote(a) for a in [*command, *argv, "--resume"])


def _without_program(argv):
    """``argv`` without ``--program``/``--program-args`` and their values."""
    kept, skip = [], False
    for a in argv:
        if skip or a.split("=", 1)[0] in ("--program", "--program-args"):
            skip = not skip and "=" not in a
            continue
        kept.append(a)
    return kept


def _train(args) -> int:
    config = config_from_args(args)
    program = program_from_args(args)  # --program FILE.py:CLASS: built and checked by fit before it writes anything
    # under torchrun: join the process group (gloo on CPU, NCCL on GPUs); see pyro_vae/infer/distributed.py
    joined = distributed.init(config.device)
    try:
        if joined and not args.out:  # every rank must use rank 0's default folder name
            import torch.distributed as dist

            box = [str(_default_out()) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            out = Path(box[0])
        else:
            out = Path(args.out) if args.out else _default_out()
        start = time.perf_counter()
        try:
            run = fit(config, out, progress=not args.quiet, overwrite=args.overwrite, resume=args.resume,
                      callbacks=[FIGURES[config.model]()], tensorboard=args.tensorboard, program=program)
        except TrainingInterrupted as e:  # say exactly which command continues the run
            raise TrainingInterrupted(f"{e}: {_resume_command(args, out)}", e.signum) from None
    finally:
        if joined:
            distributed.shutdown()
    if joined and int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = run.history[-1]
    val = "" if last["val_elbo"] is None else f", validation ELBO {last['val_elbo']:.2f} nats/image"
    print(f"trained {config.epochs} epochs in {time.perf_counter() - start:.0f}s{val}")
    print(f"run folder: {out}")
    return 0
