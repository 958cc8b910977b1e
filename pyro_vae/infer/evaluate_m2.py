r"""Held-out evaluation of a trained M2 (:mod:`pyro_vae.program.m2`): the classifier's accuracy,
the ELBO with the label summed out, and the importance-weighted bound of :math:`\log p(x)`.

For an image :math:`x`, each label value :math:`y` gets its own proposal
:math:`q(z \mid x, y)` and importance weights
:math:`w_{y,j} = p(x \mid y, z_{y,j})\, p(z_{y,j}) / q(z_{y,j} \mid x, y)`,
:math:`z_{y,j} \sim q(z \mid x, y)`. Then, summing over :math:`y` exactly,

.. math::

    \mathrm{ELBO}(x) &= \sum_{y} q(y \mid x)\Big[\log p(y) - \log q(y \mid x)
        + \frac{1}{S} \sum_{j=1}^{S} \log w_{y,j}\Big], \\
    \log p(x) = \log \sum_y p(y)\, p(x \mid y) \;\ge\; \mathcal{L}_k(x)
        &= \mathbb{E}\Big[\log \sum_{y} p(y)\, \frac{1}{k} \sum_{j=1}^{k} w_{y,j}\Big]
        \;\ge\; \mathrm{ELBO}(x),

the second because each :math:`\frac{1}{k}\sum_j w_{y,j}` is an unbiased estimate of
:math:`p(x \mid y)` (Jensen). ``k`` samples per label: :math:`kK` decoder passes per image.
The accuracy is that of :math:`\arg\max_y q(y \mid x)` against the data's labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..core.errors import ConfigError
from ..core.progress import disable, tqdm
from .evaluate import CHUNK_ROWS, _image_normal, _images_to_score, _summary
from .run import Run, load_run

__all__ = ["M2EvalResult", "class_log_weights", "evaluate_m2", "confusion_matrix"]


@dataclass
class M2EvalResult:
    """What :func:`evaluate_m2` measures; nats per image, standard errors over images."""

    accuracy: Optional[float]  # of argmax q(y|x); None when the images have no labels
    elbo: float  # y summed out, elbo_samples z per label
    elbo_se: Optional[float]
    iwae: float  # importance sampling over z (iwae_k per label), exact sum over y
    iwae_se: Optional[float]
    iwae_k: int
    n: int
    elbo_samples: int
    seed: int
    num_labels: int  # labelled training images of the run
    dataset: Optional[str] = None
    split: Optional[str] = None
    binarize: Optional[str] = None
    likelihood: Optional[str] = None
    run: Optional[str] = None
    seconds: float = 0.0
    confusion: List[List[int]] = field(default_factory=list)  # [true][predicted] counts
    per_image: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # [n] each, not in to_dict

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["per_image"]
        return d

    def table(self) -> str:
        where = " ".join(s for s in (self.dataset, self.split) if s)
        acc = "n/a (no labels)" if self.accuracy is None else f"{100 * self.accuracy:.2f}%"
        return "\n".join([
            f"{where or 'images'}: {self.n} images, binarize={self.binarize}, seed {self.seed}, M2 trained with "
            f"{self.num_labels} labels" + (f"  ({self.run})" if self.run else ""),
            f"  {'accuracy of q(y|x)':<34}{acc:>10}",
            f"  {'':<34}{'nats/image':>10}  ± std. error",
            f"  {f'ELBO, y summed ({self.elbo_samples} z per y)':<34}{self.elbo:10.2f}  ± {self.elbo_se or 0:.2f}",
            f"  {f'IWAE bound (k={self.iwae_k} per y)':<34}{self.iwae:10.2f}  ± {self.iwae_se or 0:.2f}",
            f"  {'seconds':<34}{self.seconds:10.1f}",
        ])


def class_log_weights(m2, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    r""":math:`\log w_{y,j}` for every label (:meth:`~pyro_vae.program.m2.M2.class_log_weights`;
    M1+M2 weights its z1 draw too): ``x [B, D]``, ``eps [k, K, B, m2.noise_dim]`` -> ``[k, K, B]``."""
    return m2.class_log_weights(x, eps)


def _chunks(m2, x, idx, k: int, seed: int, stream: int):
    """``log w`` ``[k', K, B]`` in chunks of at most :data:`CHUNK_ROWS` decoder rows; image
    ``row``'s draws depend on ``(seed, stream, row)`` only."""
    num_classes, noise = m2.config.num_classes, m2.noise_dim
    eps = _image_normal(idx, k * num_classes, noise, seed, stream).to(x.device, x.dtype)  # [k K, B, noise]
    eps = eps.reshape(k, num_classes, len(idx), noise)
    step = max(1, CHUNK_ROWS // (num_classes * len(idx)))
    for part in eps.split(step):
        yield class_log_weights(m2, x, part)


@torch.no_grad()
def _score_batch(m2, x, idx, iwae_k: int, elbo_samples: int, seed: int) -> Dict[str, torch.Tensor]:
    """Per-image ``elbo``, ``iwae`` and ``log_qy [B, K]``."""
    log_qy = m2.classify(x)  # [B, K]
    log_py = -math.log(m2.config.num_classes)
    mean_log_w = sum(w.sum(0) for w in _chunks(m2, x, idx, elbo_samples, seed, 0)) / elbo_samples  # [K, B]
    elbo = (log_qy.exp() * (log_py - log_qy + mean_log_w.T)).sum(-1)  # [B]
    total = torch.full((len(x),), -math.inf, device=x.device, dtype=x.dtype)
    for w in _chunks(m2, x, idx, iwae_k, seed, 1):  # log sum_{y, j} w_{y,j}, chunk by chunk
        total = torch.logaddexp(total, torch.logsumexp(w.flatten(0, 1), dim=0))
    return {"elbo": elbo, "iwae": total + log_py - math.log(iwae_k), "log_qy": log_qy}


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K, K]`` counts, rows the true label, columns the predicted one."""
    return torch.bincount(true * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def evaluate_m2(run, images, *, iwae_k: int = 100, elbo_samples: int = 10, batch_size: int = 100, seed: int = 0,
                progress: bool = False) -> M2EvalResult:
    """Accuracy, ELBO and IWAE bound of an M2 run on ``images`` (an
    :class:`~pyro_vae.core.data.ImageData`, scored with one seeded binarization; its labels give
    the accuracy). Same arguments as :func:`~pyro_vae.infer.evaluate.evaluate`; ``iwae_k`` and
    ``elbo_samples`` are per label value (``K`` times as many decoder passes)."""
    for name, value in (("iwae_k", iwae_k), ("elbo_samples", elbo_samples), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value}")
    run = run if isinstance(run, Run) else load_run(run)
    m2, config = run.vae, run.config
    meta, x_all = _images_to_score(images, config, f"run {run.path}")
    device = next(m2.parameters()).device
    start, parts = time.perf_counter(), {"elbo": [], "iwae": [], "log_qy": []}
    bar = tqdm(total=len(x_all), unit="img", desc=f"evaluate M2 (k={iwae_k})", disable=disable(progress), leave=False)
    for idx in torch.arange(len(x_all)).split(batch_size):
        for key, value in _score_batch(m2, x_all[idx].to(device), idx, iwae_k, elbo_samples, seed).items():
            parts[key].append(value.cpu())
        bar.update(len(idx))
    bar.close()
    values = {key: torch.cat(v) for key, v in parts.items()}
    predicted = values["log_qy"].argmax(-1)
    labels = getattr(images, "labels", None)
    accuracy = None if labels is None else float((predicted == labels.cpu()).double().mean())
    confusion = [] if labels is None else confusion_matrix(labels.cpu(), predicted, config.num_classes).tolist()
    (elbo, elbo_se), (iwae, iwae_se) = _summary(values["elbo"]), _summary(values["iwae"])
    return M2EvalResult(accuracy, elbo, elbo_se, iwae, iwae_se, int(iwae_k), len(x_all), int(elbo_samples), int(seed),
                        config.num_labels, likelihood=config.likelihood,
                        run=None if run.path is None else str(run.path), seconds=time.perf_counter() - start,
                        confusion=confusion, per_image=values, **meta)
