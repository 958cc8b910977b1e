"""Configuration of a VAE run: one dataclass, built by the CLI, used directly by notebooks."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .errors import ConfigError

__all__ = [
    "VAEConfig", "DATASETS", "LIKELIHOODS", "BINARIZATIONS", "ELBOS", "GUIDES", "DEVICES", "NONFINITE",
    "ESTIMATORS", "BASELINES", "ARCHS", "MODULES", "OBJECTIVES", "LR_SCHEDULES", "PRIORS",
]

DATASETS = ("mnist-5k", "mnist", "fashion-mnist")
LIKELIHOODS = ("bernoulli", "normal", "continuous-bernoulli")
ARCHS = ("mlp", "conv")  # built-in encoder/decoder networks (pyro_vae.program.networks)
MODULES = ("encoder", "decoder")  # the networks a user may supply as their own nn.Module
BINARIZATIONS = ("dynamic", "static", "none")
ELBOS = ("trace", "meanfield", "jit")
GUIDES = ("amortized", "mean-field", "semi-amortized", "iaf", "full-rank")
PRIORS = ("normal", "mog", "vamp")  # p(z): N(0, I) | learned mixture of Gaussians | VampPrior (pyro_vae.program.priors)
DEVICES = ("auto", "cpu", "cuda")
NONFINITE = ("stop", "skip")
ESTIMATORS = ("reparam", "score")
BASELINES = ("none", "decaying-avg", "neural")
MODELS = ("vae", "m2", "vae2")  # vae: p(z) p(x|z) | m2: Kingma's p(y) p(z) p(x|y, z) | vae2: Burda's p(z2) p(z1|z2) p(x|z1)
LABELLED_WEIGHTS = ("data", "step")  # m2: the labelled ELBO weighs 1, or once per step (pyro_vae.program.m2)
OBJECTIVES = ("elbo", "iwae", "dreg")  # what SVI maximises (pyro_vae.infer.iwae for iwae, dreg)
LR_SCHEDULES = ("constant", "cosine", "burda")  # learning rate as a function of the epoch


@dataclass
class VAEConfig:
    # --- data ---
    dataset: str = "mnist-5k"  # mnist-5k (embedded, offline) | mnist | fashion-mnist
    data_dir: Optional[str] = None  # folder of IDX files (any HxW) or of PNG/JPEG images; replaces `dataset`
    data: Optional[str] = None  # a .npy/.pt tensor file, [N, D] vectors or [N, C, H, W] images; replaces `dataset`
    labels_file: Optional[str] = None  # with `data`: one integer label per row (.npy, .pt or text, one per line)
    image_size: Optional[int] = None  # image folders: resize every image to S x S (default: the first image's size)
    binarize: str = "dynamic"  # dynamic: fresh Bernoulli draw per minibatch | static | none
    val_size: int = 500  # images held out of the training file for validation
    split_seed: int = 0  # seed of the shuffle that splits train/validation (fixed across runs)
    limit: Optional[int] = None  # keep only this many training images (quick runs)
    event_shape: Tuple[int, ...] = (1, 28, 28)  # one datum: [C, H, W] image or [D] vector; fit sets it from the data
    # --- model p(x, z) = p(z) p(x|z) ---
    model: str = "vae"  # vae | m2: semi-supervised, a label y (pyro_vae.program.m2) | vae2: two latent layers (program.vae2)
    num_labels: int = 100  # m2: training images whose label is observed (balanced over classes, chosen with `seed`)
    alpha: float = 0.1  # m2: weight of the classification term alpha * N * mean log q(y|x) (Kingma et al.: 0.1)
    labelled_batch: int = 100  # m2: labelled images in every step, beside the batch_size images (all if fewer)
    labelled_weight: str = "data"  # m2: weight w of the labelled ELBO: data (1) | step (steps per epoch) | a number
    features: Optional[str] = None  # m2: a VAE run folder (M1): M2 models its codes z1 ~ q(z1|x) (Kingma's M1+M2)
    features_sha256: Optional[str] = None  # m2 with features: SHA-256 of that run's checkpoint.pt (fit records it)
    feature_units: Tuple[int, ...] = ()  # m2 with features: the active units of M1 that M2 models (fit picks them)
    num_classes: int = 10  # m2: values of the label y; fit sets it from the data's labels (largest + 1)
    z_dim: int = 50  # dimension of the latent z (50: Burda et al.; better held-out IWAE than 20 on MNIST-5k, benchmarks/README.md)
    arch: str = "mlp"  # built-in networks: mlp (fully connected) | conv (strided convs down, transposed convs up)
    hidden: Tuple[int, ...] = (400,)  # mlp hidden layer widths; encoder uses them, decoder reversed (conv: unused)
    custom_modules: Tuple[str, ...] = ()  # networks the user supplied (encoder, decoder): load_run needs them again
    program: Optional[str] = None  # fit(program=...): your own program's class (module.QualName); load_run needs it again
    program_file: Optional[str] = None  # --program FILE:CLASS: the file (absolute) and class it was built from
    program_args: Optional[dict] = None  # --program-args: its constructor's keyword arguments (JSON values)
    program_sha256: Optional[str] = None  # the file's SHA-256 when trained: a changed file is refused, never loaded
    likelihood: str = "bernoulli"  # bernoulli: Bernoulli(logits) per pixel | normal: N(mu(z), sigma(z)^2) | continuous-bernoulli
    min_scale: float = 1e-2  # lower bound on the Normal decoder's sigma (density cannot blow up)
    # --- variational family q(z|x) ---
    guide: str = "amortized"  # amortized (one shared encoder) | mean-field (free local params) | semi-amortized
    local_lr: float = 0.1  # mean-field: SparseAdam learning rate of the per-datapoint parameters
    refine_steps: int = 5  # semi-amortized: gradient steps on each image's ELBO from the encoder's output
    refine_lr: float = 1e-2  # semi-amortized: step size of those refinement steps
    flow_steps: int = 2  # iaf: conditional affine autoregressive transforms after the base Gaussian
    prior: str = "normal"  # p(z): normal N(0, I) | mog (learned mixture) | vamp (VampPrior, learned pseudo-inputs)
    prior_components: int = 10  # mog, vamp: mixture components K (vamp: pseudo-inputs)
    # --- inference ---
    elbo: str = "trace"  # trace: Trace_ELBO | meanfield: TraceMeanField_ELBO (analytic KL) | jit
    num_particles: int = 1  # samples of z per datapoint in each ELBO estimate (K of iwae/dreg)
    objective: str = "elbo"  # elbo | iwae: importance-weighted bound, K = num_particles | dreg: same bound, DReG gradient
    estimator: str = "reparam"  # reparam: z = mu + sigma*eps, pathwise gradient | score: REINFORCE / BBVI
    baseline: str = "none"  # score only: none | decaying-avg | neural (variance reduction)
    kl_warmup: int = 20  # epochs of linear KL warm-up: beta goes 1/E, 2/E, ..., 1 (0 = off; 20: +0.4 nats IWAE on MNIST-5k)
    beta: float = 1.0  # weight of the KL term after warm-up (1 = the ELBO)
    lr: float = 1e-3  # Adam learning rate
    adam_beta1: float = 0.9  # Adam's decay rate of its running mean gradient (Pyro's SS-VAE example: 0.95)
    lr_schedule: str = "constant"  # constant | cosine: lr (1 + cos(pi e / E)) / 2 | burda: lr 10^(-i/7), 8 stages of 3^i epochs scaled to E
    batch_size: int = 128  # images per minibatch
    epochs: int = 200  # passes over the training images
    seed: int = 0  # seed of parameter init, minibatch order, binarization and z draws
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    fused: bool = True  # plain cases: the same ELBO estimate without Pyro's tracing (pyro_vae.fused)
    validate: bool = False  # Pyro argument validation in the training loop (slower; on in tests)
    on_nonfinite: str = "stop"  # non-finite loss: stop (last good checkpoint kept) | skip the step

    def __post_init__(self):
        self.hidden = tuple(int(h) for h in self.hidden)
        self.event_shape = tuple(int(d) for d in self.event_shape)
        self.custom_modules = tuple(str(m) for m in self.custom_modules)
        self.feature_units = tuple(int(u) for u in self.feature_units)
        self.check()

    def check(self) -> "VAEConfig":
        """Raise :class:`ConfigError` with a one-line message for any impossible setting."""
        choices = {
            "dataset": DATASETS,
            "binarize": BINARIZATIONS,
            "likelihood": LIKELIHOODS,
            "guide": GUIDES,
            "elbo": ELBOS,
            "device": DEVICES,
            "on_nonfinite": NONFINITE,
            "estimator": ESTIMATORS,
            "baseline": BASELINES,
            "arch": ARCHS,
            "objective": OBJECTIVES,
            "lr_schedule": LR_SCHEDULES,
        }
        for name, allowed in choices.items():
            if name == "dataset" and (self.data_dir is not None or self.data is not None):
                continue
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        for name in ("z_dim", "batch_size", "epochs", "num_particles"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if not self.event_shape or min(self.event_shape) < 1 or len(self.event_shape) not in (1, 3):
            raise ConfigError(f"event_shape must be [C, H, W] or [D] with positive sizes; got {list(self.event_shape)}")
        self._check_sources()
        self._check_networks()
        self._check_flows_priors()
        self._check_m2()
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"hidden must be positive layer widths, e.g. 400 or 500,500; got {self.hidden}")
        if self.refine_steps < 0:
            raise ConfigError(f"refine_steps must be >= 0; got {self.refine_steps}")
        if not (self.local_lr > 0 and self.refine_lr > 0):
            raise ConfigError("local_lr and refine_lr must be positive")
        for name in ("lr", "beta", "min_scale"):  # NaN and inf fail too
            if not (0 < getattr(self, name) < math.inf):
                raise ConfigError(f"{name} must be positive and finite; got {getattr(self, name)}")
        if self.baseline != "none" and self.estimator != "score":
            raise ConfigError("a baseline reduces the variance of the score-function estimator only; use estimator=score")
        if self.estimator == "score" and self.elbo == "meanfield":
            # its analytic KL is fine, but its reconstruction term would get no score-function gradient
            raise ConfigError("estimator=score needs elbo=trace: TraceMeanField_ELBO assumes reparameterized sites")
        if self.baseline != "none" and self.elbo == "jit":
            raise ConfigError("baselines need elbo=trace (TraceGraph_ELBO); the jit ELBO ignores them")
        if self.objective != "elbo" and (self.estimator != "reparam" or self.elbo == "meanfield"):
            raise ConfigError(f"objective={self.objective} needs estimator=reparam and elbo=trace (sampled log weights, "
                              "reparameterized z)")
        if not (0 <= self.adam_beta1 < 1):
            raise ConfigError(f"adam_beta1 must be in [0, 1); got {self.adam_beta1}")
        if self.kl_warmup < 0:
            raise ConfigError(f"kl_warmup must be >= 0; got {self.kl_warmup}")
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0; got {self.val_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive integer; got {self.limit}")
        return self

    def _check_sources(self) -> None:
        if self.data is not None and self.data_dir is not None:
            raise ConfigError("give either data (a tensor file) or data_dir (a folder), not both")
        if self.labels_file is not None and self.data is None:
            raise ConfigError("labels_file labels the rows of a data tensor file; give data too (folders have their own labels)")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer; got {self.image_size}")

    def _check_flows_priors(self) -> None:
        """Guides and priors beyond the diagonal Gaussian and N(0, I) (pyro_vae.program.priors)."""
        if self.guide == "iaf" and self.flow_steps < 1:
            raise ConfigError(f"flow_steps must be >= 1 for guide=iaf; got {self.flow_steps}")
        if self.prior_components < 1:
            raise ConfigError(f"prior_components must be a positive integer; got {self.prior_components}")
        if self.prior == "vamp" and self.guide == "mean-field":
            raise ConfigError("prior=vamp mixes the encoder's q(z|u_k) over pseudo-inputs; the mean-field guide has no "
                              "encoder (use an amortized guide)")
        closed_form = self.guide in ("amortized", "mean-field", "semi-amortized") and self.prior == "normal"
        if self.elbo == "meanfield" and not closed_form:
            raise ConfigError(f"elbo=meanfield needs KL(q || p) in closed form (a diagonal Gaussian guide and prior=normal); "
                              f"guide={self.guide}, prior={self.prior}: use elbo=trace")
        if self.guide == "semi-amortized" and self.prior != "normal" and self.refine_steps > 0:
            raise ConfigError("the semi-amortized refinement uses the analytic KL against N(0, I): use prior=normal "
                              "(or refine_steps=0)")

    def _check_networks(self) -> None:
        unknown = [m for m in self.custom_modules if m not in MODULES]
        if unknown or len(set(self.custom_modules)) != len(self.custom_modules):
            raise ConfigError(f"custom_modules must name each of {', '.join(MODULES)} at most once; got {list(self.custom_modules)}")
        if self.arch == "conv" and set(MODULES) - set(self.custom_modules):
            if len(self.event_shape) != 3:
                raise ConfigError(f"arch=conv needs images [C, H, W]; the data are vectors of {self.event_shape[0]} numbers "
                                  "(use arch=mlp)")
            if min(self.event_shape[1:]) < 4:
                raise ConfigError(f"arch=conv needs images of at least 4x4 pixels; got {self.event_shape[1]}x{self.event_shape[2]}")

    def _check_m2(self) -> None:
        for name in ("num_labels", "labelled_batch", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if not (0 <= self.alpha < math.inf):
            raise ConfigError(f"alpha must be >= 0 and finite; got {self.alpha}")
        if self.labelled_weight not in LABELLED_WEIGHTS and not _positive_number(self.labelled_weight):
            raise ConfigError(f"labelled_weight must be data, step or a positive number; got {self.labelled_weight!r}")
        if self.features is not None and self.model != "m2":
            raise ConfigError("features (an M1 run whose codes z1 the model reads) needs model=m2")
        if self.model != "m2":
            return
        needs = {"guide": "amortized", "arch": "mlp", "estimator": "reparam", "num_particles": 1,
                 "custom_modules": (), "objective": "elbo"}  # what the M2 program is built for (TraceEnum_ELBO, one z per class)
        wrong = [f"{k}={getattr(self, k)!r}" for k, v in needs.items() if getattr(self, k) != v]
        wrong += [f"elbo={self.elbo!r}"] if self.elbo not in ("trace", "meanfield") else []  # meanfield: closed-form KL of z
        if wrong:
            raise ConfigError(f"model=m2 supports the amortized mlp networks, reparam, elbo=trace or meanfield, one "
                              f"particle; got {', '.join(wrong)}")

    @property
    def x_dim(self) -> int:
        """Numbers in one datum (pixels times channels, or the vector's length)."""
        return math.prod(self.event_shape)

    def lr_at(self, epoch: int) -> float:
        """Learning-rate factor for a (0-based) epoch, from ``lr_schedule`` (a function of the epoch
        alone, so a resumed run continues the same schedule)."""
        return LR_FACTORS[self.lr_schedule](epoch, self.epochs)

    def beta_at(self, epoch: int) -> float:
        """KL weight for a (0-based) epoch: linear warm-up over ``kl_warmup`` epochs, then ``beta``."""
        if self.kl_warmup <= 0:
            return self.beta
        return self.beta * min(1.0, (epoch + 1) / self.kl_warmup)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["event_shape"] = list(self.event_shape)
        d["custom_modules"] = list(self.custom_modules)
        d["feature_units"] = list(self.feature_units)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a mapping; got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():  # a dict from a file: check types before anything uses them
            if not _type_ok(value, hints[name]):
                raise ConfigError(f"config value {name}={value!r} has the wrong type ({type(value).__name__})")
        return cls(**d)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)


def _burda_factor(epoch: int, epochs: int) -> float:
    """Burda et al.'s schedule, 3^i epochs at 10^(-i/7), i = 0..7 (3280 epochs), compressed into
    ``epochs``: the stage where the epoch starts (``epochs=3280``: exactly theirs)."""
    done, total = 0, sum(3**i for i in range(8))  # 3280
    for i in range(8):
        done += 3**i
        if epoch * total < epochs * done:
            return 10 ** (-i / 7)
    return 10 ** (-7 / 7)


def _positive_number(text: str) -> bool:
    """Whether ``text`` reads as a positive finite number (a ``labelled_weight`` like ``"50"``)."""
    try:
        return 0 < float(text) < math.inf
    except ValueError:
        return False


LR_FACTORS = {  # lr_schedule -> factor(epoch, epochs) multiplying lr
    "constant": lambda epoch, epochs: 1.0,
    "cosine": lambda epoch, epochs: 0.5 * (1 + math.cos(math.pi * epoch / epochs)),
    "burda": _burda_factor,
}


def _type_ok(value, hint) -> bool:
    """Whether a plain value (from JSON or a checkpoint) fits a field's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    try:
        return isinstance(value, hint)
    except TypeError:  # an annotation isinstance cannot check
        return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    return torch.device(name)
