"""Data that is not MNIST-format IDX: folders of PNG/JPEG images, ``.npy``/``.pt`` tensor files,
tensors and ``torch.utils.data.Dataset`` objects, each read into flat float images ``[N, D]`` with
the shape of one datum (``[C, H, W]`` or ``[D]``). :mod:`pyro_vae.core.data` splits, binarizes and
wraps them in an ``ImageData``; every problem is a one-line :class:`DataError`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "IMAGE_SUFFIXES", "image_folder_parts", "is_image_folder", "folder_classes", "read_image_folder", "read_tensor_file",
    "images_from_tensor", "tensor_from_dataset", "read_labels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torchvision.io.decode_image reads here
TENSOR_SUFFIXES = (".npy", ".pt")

Images = Tuple[torch.Tensor, Tuple[int, ...]]  # flat float32 [N, D], and the shape of one datum


# ----------------------------------------------------------------------------- image folders


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _subfolders(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_folder_parts(folder: Path) -> Tuple[Path, Optional[Path]]:
    """``(train part, test part or None)``: a folder with ``train/`` and ``test/`` subfolders holds
    both; any other image folder is one part (its ``test`` split is the whole folder)."""
    train, test = folder / "train", folder / "test"
    if train.is_dir() and test.is_dir():
        return train, test
    return folder, None


def is_image_folder(folder: Path) -> bool:
    """Whether ``folder`` (or its ``train/``, or a class subfolder) holds PNG/JPEG files."""
    try:
        part = image_folder_parts(folder)[0]
        return bool(_images_in(part)) or any(_images_in(d) for d in _subfolders(part))
    except OSError:
        return False


def folder_classes(folder: Path) -> Optional[List[str]]:
    """The class names of an image folder (its sorted subfolders that hold images), ``None`` if flat."""
    return [d.name for d in _subfolders(folder) if _images_in(d)] or None


def _image_files(folder: Path, classes: Optional[Sequence[str]]):
    """``(files, labels or None, class names)``: flat, or the ImageFolder layout (one subfolder of
    images per class; sorted names become labels 0, 1, ...)."""
    top = _images_in(folder)
    groups = [(d.name, _images_in(d)) for d in _subfolders(folder)]
    groups = [(name, files) for name, files in groups if files]
    if top and groups:
        raise DataError(f"{folder}: holds images both at the top ({top[0].name}) and in class subfolders "
                        f"({groups[0][0]}/); use one layout")
    if not groups:
        return top, None, None
    names = list(classes) if classes is not None else [name for name, _ in groups]
    unknown = [name for name, _ in groups if name not in names]
    if unknown:
        raise DataError(f"{folder}: class subfolder {unknown[0]}/ is not a class of the training images ({', '.join(names)})")
    files = [f for _, fs in groups for f in fs]
    labels = torch.tensor([names.index(name) for name, fs in groups for _ in fs], dtype=torch.int64)
    return files, labels, names


def _decode(path: Path) -> torch.Tensor:
    """One image as float ``[C, H, W]`` in ``[0, 1]``: grey (C = 1) or colour (C = 3), alpha dropped."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; its decoders still work
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(str(path), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, OSError, ValueError) as e:
        reason = re.sub(r"^.*\.(cpp|h):\d+,\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise DataError(f"{path}: cannot read the image ({reason}); a truncated or corrupt PNG/JPEG?") from None
    image = to_dtype(image, torch.float32, scale=True)  # uint8 or 16-bit PNG -> [0, 1]
    return image[:3] if image.shape[0] >= 3 else image[:1]


def read_image_folder(folder: Path, image_size: Optional[int] = None, classes: Optional[Sequence[str]] = None):
    """A folder of PNG/JPEG images -> ``(images [N, C*S*S], labels or None, (C, S, S), class names)``.

    Every image is resized to ``image_size`` x ``image_size`` when given; otherwise all must have
    the first image's size (:class:`DataError` naming two that differ). Colour if any image has
    colour (grey images are repeated into 3 channels), else grey."""
    from torchvision.transforms.v2.functional import resize

    files, labels, names = _image_files(folder, classes)
    if not files:
        raise DataError(f"{folder}: no PNG/JPEG images")
    decoded = [_decode(f) for f in files]
    if image_size is not None:
        decoded = [resize(im, [image_size, image_size], antialias=True).clamp(0, 1) for im in decoded]
    size = decoded[0].shape[1:]
    for f, im in zip(files, decoded):
        if im.shape[1:] != size:
            raise DataError(f"{folder}: images differ in size: {files[0].name} is {size[0]}x{size[1]}, "
                            f"{f.relative_to(folder)} is {im.shape[1]}x{im.shape[2]}; pass --image-size S "
                            "(image_size=S) to resize them all to S x S")
    channels = 3 if any(im.shape[0] == 3 for im in decoded) else 1
    images = torch.stack([im.expand(channels, -1, -1) for im in decoded])  # [N, C, H, W]
    return images.reshape(len(images), -1), labels, tuple(images.shape[1:]), names


# ----------------------------------------------------------------------------- tensors


def read_tensor_file(path, flag: str = "--data") -> torch.Tensor:
    """The tensor in a ``.npy`` (no pickles) or ``.pt`` (``weights_only``) file (``flag``: for messages)."""
    path = Path(path)
    if path.suffix.lower() not in TENSOR_SUFFIXES:
        raise DataError(f"{flag} {path}: expected a .npy or .pt file holding one tensor")
    if not path.is_file():
        raise DataError(f"{flag} {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        if path.suffix.lower() == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy and torch raise many types for bad files; all mean the same here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{flag} {path}: cannot read the tensor ({reason})") from None
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{flag} {path}: holds a {type(obj).__name__}, not a tensor")
    return obj


def images_from_tensor(t: torch.Tensor, what: str) -> Images:
    """``[N, D]`` vectors or ``[N, C, H, W]`` images (C = 1 or 3), floats or uint8 (0-255) ->
    flat float32 ``[N, D]`` and the datum's shape; NaN and infinite values are refused."""
    t = torch.as_tensor(t)
    shape = list(t.shape)
    if t.dim() not in (2, 4):
        hint = "; for grey images add a channel dimension, [N, 1, H, W]" if t.dim() == 3 else ""
        raise DataError(f"{what}: a tensor of shape {shape} (rank {t.dim()}); expected [N, D] vectors or "
                        f"[N, C, H, W] images{hint}")
    if t.dim() == 4 and t.shape[1] not in (1, 3):
        raise DataError(f"{what}: images [N, C, H, W] with C = {t.shape[1]}; expected 1 (grey) or 3 (RGB) channels "
                        "(pass other data as [N, D] vectors)")
    if t.shape[0] == 0 or t.numel() == 0:
        raise DataError(f"{what}: the tensor of shape {shape} holds no data")
    if t.dtype == torch.uint8:
        x = t.to(torch.float32) / 255.0
    elif t.dtype == torch.bool or t.is_floating_point():
        x = t.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{what}: contains NaN or infinite values")
    else:  # int8/16/32/64: no agreed scale (0-255? 0-1?), so refuse rather than guess
        raise DataError(f"{what}: values are {str(t.dtype).replace('torch.', '')}; pyro-vae reads floats "
                        "(in [0, 1] for Bernoulli likelihoods and binarization) or uint8 (0-255)")
    return x.reshape(len(x), -1).contiguous(), tuple(shape[1:])


def tensor_from_dataset(dataset) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stack the items of a map-style dataset: ``x`` or ``(x, label, ...)``, ``x`` a tensor, array
    or PIL image -> ``(data [N, ...], labels [N] or None)``."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    xs, ys = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        x = pil_to_tensor(x) if hasattr(x, "getbands") else torch.as_tensor(x)  # a PIL image, or a tensor/array
        if xs and x.shape != xs[0].shape:
            raise DataError(f"{type(dataset).__name__}: item {i} has shape {list(x.shape)}, item 0 {list(xs[0].shape)}; "
                            "all items must have one shape")
        xs.append(x)
        ys.append(y)
    if not xs:
        raise DataError(f"{type(dataset).__name__}: the dataset is empty")
    labels = None if any(y is None for y in ys) else torch.as_tensor([int(y) for y in ys], dtype=torch.int64)
    return torch.stack(xs), labels


def read_labels(path, n: int) -> torch.Tensor:
    """``n`` integer labels from a ``.npy``/``.pt`` file (a 1-d integer tensor) or a text file (one
    integer per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--labels-file {path}: {'not a file' if path.exists() else 'no such file'}")
    if path.suffix.lower() in TENSOR_SUFFIXES:
        labels = read_tensor_file(path, "--labels-file")
    else:
        values = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    values.append(int(line))
                except ValueError:
                    raise DataError(f"--labels-file {path}: line {number}, {line.strip()[:20]!r}, is not an integer") from None
        labels = torch.tensor(values, dtype=torch.int64)
    labels = labels.reshape(-1) if labels.dim() == 2 and labels.shape[1] == 1 else labels
    if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise DataError(f"--labels-file {path}: expected one integer per row, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != n:
        raise DataError(f"--labels-file {path}: {len(labels)} labels for {n} rows")
    return labels.to(torch.int64)
