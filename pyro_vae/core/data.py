"""Images for the VAE: the embedded MNIST-5k subset, torchvision's MNIST/Fashion-MNIST, or any
folder of MNIST-format IDX files; train/validation/test splits and binarization.

Images are returned flattened, as one float tensor ``[N, D]`` with values in ``[0, 1]``, with the
shape of one image (``event_shape``, ``[C, H, W]``; ``[D]`` for plain vectors) beside it: the whole
data set lives in memory (on the training device) and minibatches are rows picked by index.
Networks, plots, evaluation and the fused loss take the shape from the data (through
``VAEConfig.event_shape``, which :func:`~pyro_vae.infer.svi.fit` sets from the training data).
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from .config import VAEConfig
from .errors import ConfigError, DataError, IDXError

__all__ = [
    "ImageData",
    "load_splits",
    "eval_binarized",
    "check_images",
    "load_dataset",
    "read_idx",
    "write_idx",
    "EMBEDDED_DIR",
]

EMBEDDED_DIR = Path(str(resources.files("pyro_vae") / "data" / "mnist_5k"))
CACHE_DIR = Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae"))
SPLITS = ("train", "val", "test")

# IDX type codes -> numpy big-endian dtypes (http://yann.lecun.com/exdb/mnist/)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_TYPES.items()}
MAX_IDX_BYTES = 1 << 31  # largest data one IDX file may promise (full MNIST images: 47 MB)
MAX_IDX_DIMS = 32  # numpy's limit on array dimensions (IDX itself allows 255)


@dataclass
class ImageData:
    """A split of an image data set, flattened: ``images`` is ``[N, D]`` in ``[0, 1]``, where
    ``D`` is the product of ``event_shape``."""

    images: torch.Tensor  # [N, D] float32 in [0, 1]
    labels: Optional[torch.Tensor]  # [N] int64, or None when the folder has no labels
    name: str  # data set name or folder, for reports
    split: str  # train | val | test
    binarize: str  # how pixels become {0, 1}: dynamic | static | none
    event_shape: Tuple[int, ...] = (1, 28, 28)  # one datum: [C, H, W] image or [D] vector

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageData":
        labels = None if self.labels is None else self.labels.to(device)
        return ImageData(self.images.to(device), labels, self.name, self.split, self.binarize, self.event_shape)

    def subset(self, n: int) -> "ImageData":
        labels = None if self.labels is None else self.labels[:n]
        return ImageData(self.images[:n], labels, self.name, self.split, self.binarize, self.event_shape)

    def describe(self) -> str:
        return f"{self.name} {self.split} ({len(self)} images, binarize={self.binarize})"


# ----------------------------------------------------------------------------- IDX files


def read_idx(path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array; :class:`IDXError` if malformed.

    Memory is bounded by what the file really holds: the header's promise is checked against
    :data:`MAX_IDX_BYTES` and against the data before any large buffer is allocated (a corrupt
    header or a gzip bomb cannot exhaust memory).
    """
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device could block or never end
            raise IDXError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open if compressed else open)(path, "rb") as f:
            head = _read_upto(f, 4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise IDXError(f"{path}: not an IDX file (bad magic number {head.hex() or 'empty'})")
            dtype, ndim = np.dtype(_IDX_TYPES[head[2]]), head[3]
            if ndim == 0 or ndim > MAX_IDX_DIMS:
                raise IDXError(f"{path}: IDX header declares {ndim} dimensions (1 to {MAX_IDX_DIMS} supported)")
            raw_dims = _read_upto(f, 4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise IDXError(f"{path}: truncated IDX header")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
            shape = "x".join(map(str, dims))
            if expected > MAX_IDX_BYTES:
                raise IDXError(
                    f"{path}: IDX header promises {shape} values ({expected} bytes), more than pyro-vae reads"
                )
            held = None if compressed else os.fstat(f.fileno()).st_size - 4 - 4 * ndim
            if held is None or held == expected:
                body = _read_upto(f, expected + 1)  # one byte more tells trailing data apart
                held = len(body)
    except (OSError, EOFError, zlib.error) as e:  # missing, unreadable, bad or truncated gzip
        raise IDXError(f"{path}: cannot read IDX file ({e or type(e).__name__})") from None
    if held != expected:
        held = f"more than {expected}" if compressed and held > expected else held
        raise IDXError(
            f"{path}: IDX header promises {shape} values ({expected} bytes) "
            f"but the file holds {held} bytes (truncated or corrupt)"
        )
    try:
        array = np.frombuffer(body, dtype=dtype).reshape(dims)
    except ValueError:  # numpy cannot shape even 0 values so (say 0x2**32x2**32x2**32)
        raise IDXError(f"{path}: IDX dimensions {shape} are too large for an array") from None
    return array.astype(dtype.newbyteorder("="))


def _read_upto(f, n: int) -> bytes:
    """Read at most ``n`` bytes in bounded chunks (memory grows only with what is really there)."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_idx(path, array: np.ndarray) -> None:
    """Write a numpy array as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_pair(folder: Path, prefix: str, need_labels: bool):
    """Read ``{prefix}-images-idx3-ubyte[.gz]`` and, if present, the matching labels file."""
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    if images_path is None:
        return None
    images = read_idx(images_path)
    if images.ndim != 3:
        raise IDXError(f"{images_path}: expected a 3-d array of images, got shape {images.shape}")
    if images.shape[1:] != (28, 28):
        raise IDXError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}; "
            "pyro-vae supports 28x28 MNIST-format images only"
        )
    if images.shape[0] == 0:
        raise IDXError(f"{images_path}: holds no images")
    if images.dtype == np.uint8:
        pixels = torch.as_tensor(images, dtype=torch.float32) / 255.0
    elif images.dtype.kind == "f":  # grey values must already be probabilities of ink
        images = images.astype(np.float64)
        if not np.isfinite(images).all():
            raise IDXError(f"{images_path}: images contain NaN or infinite values")
        lo, hi = images.min(), images.max()
        if lo < 0 or hi > 1:
            raise IDXError(f"{images_path}: float pixel values must lie in [0, 1], found [{lo:g}, {hi:g}]")
        pixels = torch.as_tensor(images, dtype=torch.float32)
    else:  # int8/16/32: no agreed scale (0-255? 0-1?), so refuse rather than guess
        raise IDXError(
            f"{images_path}: pixels are {images.dtype}; pyro-vae reads unsigned bytes (0-255) "
            "or floats in [0, 1]"
        )
    labels = None
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    if labels_path is not None:
        raw = read_idx(labels_path)
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise IDXError(f"{labels_path}: expected a 1-d array of integer labels, got {raw.dtype} {raw.shape}")
        if raw.shape[0] != images.shape[0]:
            raise IDXError(f"{labels_path}: {raw.shape[0]} labels for {images.shape[0]} images")
        labels = torch.as_tensor(raw.astype(np.int64))
    elif need_labels:
        raise DataError(f"{folder}: no {prefix}-labels-idx1-ubyte[.gz] file")
    return pixels.reshape(len(pixels), -1), labels, (1, *images.shape[1:])


def _torchvision_folder(name: str, train: bool) -> Path:
    """Download (once) a torchvision data set into the cache; return its raw IDX folder."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    root = CACHE_DIR / "torchvision"
    try:
        ds = cls(root=str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types; all mean the same here
        raise DataError(
            f"cannot download {name} ({type(e).__name__}); work offline with the embedded "
            "--dataset mnist-5k, or point --data-dir at a folder of MNIST-format IDX files"
        ) from None
    return Path(ds.raw_folder)


# ----------------------------------------------------------------------------- splits


def load_dataset(
    dataset: str = "mnist-5k",
    split: str = "train",
    *,
    data_dir=None,
    val_size: int = 500,
    split_seed: int = 0,
    limit: Optional[int] = None,
    binarize: str = "dynamic",
    need_labels: bool = False,
) -> ImageData:
    """Load one split of a data set as an :class:`ImageData`.

    ``train`` and ``val`` come from the training file: its rows are shuffled with ``split_seed``
    (MNIST-5k is sorted by class) and the last ``val_size`` rows are held out. ``test`` is the
    ``t10k`` file. A ``data_dir`` holding only the ``t10k`` pair serves the ``test`` split.
    ``limit`` keeps the first rows of the (shuffled) split.

    With ``binarize="static"`` the pixels are replaced, once, by a Bernoulli draw seeded by
    ``split_seed``; ``dynamic`` and ``none`` return grey values (the training loop draws dynamic
    binarizations per minibatch).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data_dir is not None:
        folder, name = Path(data_dir), str(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    elif dataset == "mnist-5k":
        folder, name = EMBEDDED_DIR, "mnist-5k"
        if split == "test":
            raise DataError(
                "mnist-5k has no test split (it is a subset of MNIST's training file); "
                "use --split val, or --data-dir with a folder holding t10k-* IDX files"
            )
    elif dataset in ("mnist", "fashion-mnist"):
        folder, name = _torchvision_folder(dataset, train=split != "test"), dataset
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; choose mnist-5k, mnist or fashion-mnist, or use --data-dir")

    prefix = "t10k" if split == "test" else "train"
    pair = _read_pair(folder, prefix, need_labels)
    if pair is None:
        raise DataError(
            f"{folder}: no {prefix}-images-idx3-ubyte[.gz] file "
            f"(needed for the {split} split; the folder holds {_listing(folder)})"
        )
    images, labels, event_shape = pair
    if split != "test":
        n = len(images)
        if val_size >= n:
            raise ConfigError(f"val_size={val_size} leaves no training images out of {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        rows = order[: n - val_size] if split == "train" else order[n - val_size :]
        images = images[rows]
        labels = None if labels is None else labels[rows]
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    if len(images) == 0:
        raise DataError(f"the {split} split of {name} is empty")
    if binarize not in ("dynamic", "static", "none"):
        raise ConfigError(f"binarize must be dynamic, static or none; got {binarize!r}")
    if binarize == "static":
        images = torch.bernoulli(images, generator=torch.Generator().manual_seed(split_seed + 1))
    return ImageData(images.contiguous(), labels, name, split, binarize, event_shape)


def _listing(folder: Path) -> str:
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "no files"
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def load_splits(config: VAEConfig):
    """``(train, val)`` :class:`ImageData` as the config describes (val is ``None`` if val_size=0)."""
    common = dict(
        data_dir=config.data_dir,
        val_size=config.val_size,
        split_seed=config.split_seed,
        binarize=config.binarize,
    )
    train = load_dataset(config.dataset, "train", limit=config.limit, **common)
    val = load_dataset(config.dataset, "val", **common) if config.val_size > 0 else None
    return train, val


def eval_binarized(data: ImageData, seed: int = 0) -> torch.Tensor:
    """The images as evaluation scores them: one fixed, seeded binarization (or grey if none)."""
    if data.binarize != "dynamic":
        return data.images
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(data.images.cpu(), generator=g).to(data.images.device)


def check_images(data: ImageData, config: VAEConfig) -> None:
    """:class:`DataError` unless ``data`` is ``[N, D]`` with ``D`` the size of its ``event_shape``,
    finite and, where pixels are read as probabilities of ink (Bernoulli likelihood or any
    binarization), within ``[0, 1]``.

    Out-of-range values are rejected, not clipped: they mean the data was scaled wrongly.
    """
    x, size = data.images, math.prod(data.event_shape)
    if x.ndim != 2 or x.shape[1] != size:
        shape = "x".join(map(str, data.event_shape))
        raise DataError(f"{data.describe()}: images must be flattened {shape}, [N, {size}]; got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{data.describe()}: images contain NaN or infinite values")
    if config.likelihood == "bernoulli" or data.binarize != "none":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise DataError(
                f"{data.describe()}: pixel values must lie in [0, 1] (probabilities of ink); found [{lo:g}, {hi:g}]"
            )
