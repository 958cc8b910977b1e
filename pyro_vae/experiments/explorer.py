r"""The latent-space explorer: a static web page where the decoder runs in the browser.

:func:`explore` writes a folder that works opened by double click (a ``file://`` URL), offline:
``index.html``, ``explorer.js`` and ``explorer.css`` (the same for every run, package data in
``explorer_page/``) and ``weights.js``, which sets ``window.PYRO_VAE_EXPLORER`` to the run's
data: the decoder's weights (float32, base64), the guide's means and standard deviations of up to
2,000 held-out images, their labels, and the images themselves (one PNG). The page never fetches
anything: browsers refuse ``fetch`` of local files, but load a ``<script src>`` beside the page.

**Supported runs**: the built-in MLP decoders (``arch=mlp``; Bernoulli, continuous Bernoulli and
Normal likelihoods) with the standard normal prior :math:`p(z) = \mathcal{N}(0, I)`, in the VAE and
in M2 (a class picker decodes the same style :math:`z` under each label :math:`y`). Any guide:
where :math:`q(z \mid x)` is not Gaussian (``iaf``) its mean and standard deviation per coordinate
are estimated from 256 draws. Convolutional decoders, your own networks, learned priors and
vector data get a one-line :class:`~pyro_vae.core.errors.ConfigError`.

The page computes the decoder's mean :math:`\mathbb{E}[x \mid z]` in plain JavaScript: linear layers
with softplus between them, then the likelihood's mean: :math:`\sigma(\ell)` (Bernoulli logits,
and the Normal's squashed location) or the continuous Bernoulli's
:math:`\frac{1}{2} + \frac{1}{2 \tanh(\ell/2)} - \frac{1}{\ell}`.

For :math:`d > 2` latent dimensions the map is the plane of the first two principal components
:math:`P \in \mathbb{R}^{2 \times d}` of the codes (centre :math:`c`): a point :math:`u` of the map
decodes

.. math::

    z = z_s + P^\top \big(u - P (z_s - c)\big),

the selected image's code :math:`z_s` moved within the plane; its other directions stay as they are.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from ..core.data import as_image_data, check_shape_matches, eval_binarized, load_dataset, source_options
from ..core.errors import ConfigError
from ..core.rundir import atomic_write
from ..infer.evaluate import load_eval_data
from ..infer.run import Run, load_run
from ..program.networks import BernoulliDecoder, NormalDecoder

__all__ = ["explore", "inline_page", "decoder_layers", "latent_moments", "page_data", "PAGE_FILES", "DATA_FILE", "MAX_IMAGES"]

PAGE_DIR = Path(__file__).parent / "explorer_page"
PAGE_FILES = ("index.html", "explorer.js", "explorer.css")  # the same for every run
DATA_FILE = "weights.js"  # this run's weights and codes: sets window.PYRO_VAE_EXPLORER
MAX_IMAGES = 2000  # held-out images on the map
MEAN_DRAWS = 256  # draws estimating q's mean and std where it is not Gaussian (iaf)
SPRITE_COLUMNS = 50  # images per row of the PNG that carries them

EXPLORED_MODELS = ("vae", "m2")  # one latent z (and M2's label y)

#: ``config.likelihood`` -> the name of E[x | z] the page computes from the decoder's first output
LOGIT_MEANS = {"bernoulli": "sigmoid", "continuous-bernoulli": "continuous-bernoulli"}


# ----------------------------------------------------------------------------- the decoder


def _linear_layers(net: nn.Sequential) -> List[dict]:
    """``[{"weight": W [out, in], "bias": b [out], "softplus": bool}]`` of an :func:`~pyro_vae.program.networks.mlp`."""
    modules = list(net)
    layers = []
    for i, m in enumerate(modules):
        if isinstance(m, nn.Linear):
            after = modules[i + 1] if i + 1 < len(modules) else None
            layers.append({"weight": m.weight, "bias": m.bias, "softplus": isinstance(after, nn.Softplus)})
        elif not isinstance(m, nn.Softplus):
            raise ConfigError(f"the explorer runs linear layers and softplus only; the decoder holds {type(m).__name__}")
    return layers


def _bernoulli_layers(decoder: BernoulliDecoder, x_dim: int, likelihood: str):
    return _linear_layers(decoder.net), LOGIT_MEANS[likelihood]


def _normal_layers(decoder: NormalDecoder, x_dim: int, likelihood: str):
    layers = _linear_layers(decoder.body)
    layers[-1]["softplus"] = True  # NormalDecoder applies softplus before its head
    head = {"weight": decoder.head.weight[:x_dim], "bias": decoder.head.bias[:x_dim], "softplus": False}  # loc rows
    return layers + [head], "sigmoid"  # mu = sigmoid(raw loc); the scale rows are not needed for the mean


#: built-in decoder class -> ``(decoder, x_dim, likelihood) -> (layers, name of the mean)``
DECODER_EXPORTS: Dict[type, Callable] = {BernoulliDecoder: _bernoulli_layers, NormalDecoder: _normal_layers}


def decoder_layers(run: Run):
    """The decoder as the page runs it: ``(layers, mean)``, layers as :func:`_linear_layers` gives
    them, ``mean`` the name of the map from the last layer's output to :math:`\\mathbb{E}[x \\mid z]`.
    :class:`ConfigError` (one line) for a run the page cannot run."""
    _check_supported(run)
    decoder = run.vae.decoder
    export = DECODER_EXPORTS.get(type(decoder))
    if export is None:
        raise ConfigError(f"the explorer runs the built-in MLP decoders only; this run's decoder is "
                          f"{type(decoder).__name__}")
    return export(decoder, run.config.x_dim, run.config.likelihood)


def _unsupported(config) -> Optional[str]:
    """Why the page cannot show a run of ``config``, or ``None``."""
    own = getattr(config, "program", None)  # fit(program=...), pyro-vae train --program FILE:CLASS
    reasons = [
        (config.model not in EXPLORED_MODELS,
         f"its model is {config.model} (the page shows {' and '.join(EXPLORED_MODELS)}, one latent layer)"),
        (own is not None, f"it is your own program ({own}), which only torch can run"),
        ("decoder" in config.custom_modules, "it was trained with your own decoder, which only torch can run"),
        (config.arch != "mlp", f"its decoder is arch={config.arch} (the page runs the built-in mlp decoders)"),
        (config.prior != "normal",
         f"its prior is {config.prior} (the page draws the standard normal prior's +-3 sigma)"),
        (len(config.event_shape) != 3, "its data are vectors, not images"),
    ]
    return next((why for bad, why in reasons if bad), None)


def _check_supported(run: Run) -> None:
    why = _unsupported(run.config)
    if why is not None:
        where = f"{run.path}: " if run.path is not None else ""
        raise ConfigError(f"{where}cannot explore this run: {why}")


# ----------------------------------------------------------------------------- the codes


def _gaussian_moments(run: Run, x: torch.Tensor, y: Optional[torch.Tensor]):
    return run.encode(x)


def _sampled_moments(run: Run, x: torch.Tensor, y: Optional[torch.Tensor]):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = run.vae.inference.q(x.to(run.device)).sample((MEAN_DRAWS,))  # [S, B, z_dim]
    return z.mean(0), z.std(0)


def _m2_moments(run: Run, x: torch.Tensor, y: Optional[torch.Tensor]):
    return run.vae.posterior(x.to(run.device), y.to(run.device))


def latent_moments(run: Run, x: torch.Tensor, y: Optional[torch.Tensor] = None):
    """``(mean, std)`` of q(z|x) per coordinate, each ``[B, z_dim]``: the encoder's Gaussian, the
    mean-field guide's local fit (:meth:`Run.encode`), 256 seeded draws for the ``iaf`` guide; for
    M2, q(z | x, y) at the labels ``y``."""
    if run.config.model == "m2":
        moments = _m2_moments
    else:
        moments = {"iaf": _sampled_moments}.get(run.config.guide, _gaussian_moments)
    mean, std = moments(run, x, y)
    return mean.detach().cpu(), std.detach().cpu()


def _projection(mean: torch.Tensor) -> dict:
    """The map's plane: the coordinates themselves for ``z_dim <= 2``, else the codes' first two
    principal components (signs fixed: each axis's largest entry positive)."""
    z_dim = mean.shape[1]
    if z_dim <= 2:
        axes = torch.eye(2, z_dim)
        return {"kind": "plane", "center": [0.0] * z_dim, "axes": axes.tolist(), "variance": None}
    center = mean.mean(0)
    _, s, vh = torch.linalg.svd(mean - center, full_matrices=False)
    axes = vh[:2] * vh[:2].gather(1, vh[:2].abs().argmax(1, keepdim=True)).sign()
    share = (s ** 2 / (s ** 2).sum())[:2]
    return {"kind": "pca", "center": center.tolist(), "axes": axes.tolist(), "variance": share.tolist()}


# ----------------------------------------------------------------------------- the page's data


def _float32(t: torch.Tensor) -> str:
    """Little-endian float32 bytes of ``t``, base64 (the page reads them into a ``Float32Array``)."""
    return base64.b64encode(t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()).decode()


def _sprite(images: torch.Tensor, event_shape: Sequence[int]) -> str:
    """The images ``[B, D]`` in [0, 1] as one PNG data URL, ``SPRITE_COLUMNS`` per row."""
    c, h, w = event_shape
    n = images.shape[0]
    rows = -(-n // SPRITE_COLUMNS)
    pad = torch.zeros(rows * SPRITE_COLUMNS - n, images.shape[1])
    grid = torch.cat([images.cpu().float(), pad]).reshape(rows, SPRITE_COLUMNS, c, h, w)
    grid = grid.permute(2, 0, 3, 1, 4).reshape(c, rows * h, SPRITE_COLUMNS * w)
    pixels = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # [H', W', C]
    png = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if c == 1 else pixels).save(png, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def _held_out(run: Run, n: int, data=None):
    """``(data, split)``: the first ``n`` images of ``data`` (anything
    :func:`~pyro_vae.core.data.as_image_data` takes) or else of the split :func:`load_eval_data`
    picks for the run (the training images when it holds none). A one-line
    :class:`~pyro_vae.core.errors.DataError` when their shape is not the run's (a run trained on
    data handed over in Python: pass its held-out images as ``data``)."""
    if data is not None:
        data, split = as_image_data(data, split="given", binarize=run.config.binarize).subset(n), "given"
    else:
        data = load_eval_data(run.config, limit=n)
        if len(data) == 0:
            data = load_dataset(run.config.dataset, "train", limit=n, **source_options(run.config))
        split = {"val": "validation"}.get(data.split, data.split)
    check_shape_matches(data, run.config.event_shape, "the run" + (f" {run.path}" if run.path is not None else ""))
    return data, split


def _run_summary(run: Run, data, split: str, n: int) -> dict:
    c = run.config
    source = data.name if split == "given" else c.data_dir or c.data or c.dataset
    return {
        "name": Path(run.path).name if run.path is not None else "run",
        "model": c.model, "likelihood": c.likelihood, "guide": c.guide, "hidden": list(c.hidden),
        "epochs": len(run.history), "data": str(source), "binarize": c.binarize,
        "images": (f"{n} images given to explore ({source})" if split == "given" else f"{n} {split} images of {source}")
        + (" (binarized with seed 0, as evaluation does)" if c.binarize == "dynamic" else ""),
        "valElbo": run.history[-1].get("val_elbo") if run.history else None,
    }


@torch.no_grad()
def page_data(run: Run, images: int = MAX_IMAGES, data=None) -> dict:
    """Everything the page shows of ``run`` (JSON-ready): the decoder's layers, the codes of up to
    ``images`` held-out images (of ``data``, else the run's own, :func:`_held_out`) and their
    projection onto the map, labels and the images."""
    layers, mean_name = decoder_layers(run)
    is_m2 = run.config.model == "m2"
    data, split = _held_out(run, images if is_m2 or run.vae.inference.amortized else min(images, 500), data)
    x = eval_binarized(data).cpu()
    y_hat = run.vae.classify(x.to(run.device)).argmax(-1).cpu() if is_m2 else None
    mean, std = latent_moments(run, x, y_hat)
    return {
        "format": 1,
        "run": _run_summary(run, data, split, len(x)),
        "shape": list(run.config.event_shape),
        "zDim": run.config.z_dim,
        "numClasses": run.config.num_classes if is_m2 else 0,
        "decoder": {"mean": mean_name, "layers": [
            {"in": layer["weight"].shape[1], "out": layer["weight"].shape[0], "weight": _float32(layer["weight"]),
             "bias": _float32(layer["bias"]), "softplus": layer["softplus"]} for layer in layers]},
        "prior": {"loc": 0.0, "scale": 1.0},
        "points": {"count": len(x), "mean": _float32(mean), "std": _float32(std),
                   "labels": None if data.labels is None else data.labels[: len(x)].tolist(),
                   "classes": None if y_hat is None else y_hat.tolist()},
        "projection": _projection(mean),
        "images": {"png": _sprite(x, run.config.event_shape), "columns": SPRITE_COLUMNS},
    }


# ----------------------------------------------------------------------------- the folder


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, and a folder holding anything unless ``overwrite`` (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: already exists and is not empty; pass --overwrite to replace the explorer "
                          "there, or choose another --out")


def explore(run, out, *, overwrite: bool = False, images: int = MAX_IMAGES, data=None) -> Path:
    """Write the explorer of ``run`` (a :class:`~pyro_vae.infer.run.Run` or a run folder) into the
    folder ``out`` and return the path of its ``index.html``; open it in any browser, offline.

    :param overwrite: write into a folder that holds files already (the page's four files are
        replaced; nothing else there is touched).
    :param images: held-out images on the map (at most; 500 for guides without an encoder, which
        fit each image).
    :param data: the images for the map (an :class:`~pyro_vae.core.data.ImageData`, a tensor, an
        array or a ``Dataset``, as :func:`~pyro_vae.fit` takes them); by default the run's own held-out
        split (the validation images, or the test split where its data has one).

    A missing run, a run the page cannot show (see the module's docstring) and a folder that holds
    files already, without ``overwrite``, raise a one-line :class:`~pyro_vae.core.errors.PyroVAEError`
    before anything is written (an empty folder is used as it is).
    """
    out = Path(out)
    if not isinstance(run, Run):
        run = load_run(run)
    _check_supported(run)
    _check_out(out, overwrite)
    if images < 1:
        raise ConfigError(f"images must be a positive integer; got {images}")
    text = "window.PYRO_VAE_EXPLORER = " + json.dumps(page_data(run, images, data), separators=(",", ":")) + ";\n"
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGE_FILES:
        atomic_write(out / name, lambda f, name=name: f.write((PAGE_DIR / name).read_bytes()))
    atomic_write(out / DATA_FILE, lambda f: f.write(text.encode()))
    for name in (*PAGE_FILES, DATA_FILE):
        os.chmod(out / name, 0o644)  # a web page: readable by a web server (temporary files start private)
    return out / "index.html"


def inline_page(folder) -> str:
    """The explorer written in ``folder`` as one HTML document, its script and style files inlined
    (for an ``<iframe srcdoc=...>``: notebooks, pages that cannot ship a folder)."""
    folder = Path(folder)
    page = (folder / "index.html").read_text()
    style = (folder / "explorer.css").read_text()
    page = page.replace('<link rel="stylesheet" href="explorer.css">', f"<style>\n{style}</style>")
    for name in (DATA_FILE, "explorer.js"):
        script = (folder / name).read_text().replace("</script", "<\\/script")
        page = page.replace(f'<script src="{name}"></script>', f"<script>\n{script}</script>")
    return page
