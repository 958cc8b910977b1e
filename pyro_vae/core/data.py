"""Images for the VAE: the embedded MNIST-5k subset, torchvision's MNIST/Fashion-MNIST, a folder
of MNIST-format IDX files (any H x W) or of PNG/JPEG images (:mod:`pyro_vae.core.sources`), a
``.npy``/``.pt`` tensor file, or a tensor or ``Dataset`` handed over in Python
(:func:`as_image_data`); train/validation/test splits and binarization, the same for every source.

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

from .config import BINARIZATIONS, VAEConfig
from .errors import ConfigError, DataError, IDXError
from .sources import (
    folder_classes,
    image_folder_parts,
    images_from_tensor,
    is_image_folder,
    read_image_folder,
    read_labels,
    read_tensor_file,
    tensor_from_dataset,
)

__all__ = [
    "ImageData",
    "load_splits",
    "eval_binarized",
    "check_images",
    "check_shape_matches",
    "load_dataset",
    "as_image_data",
    "source_options",
    "kind_of_test_split",
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
    data=None,
    labels_file=None,
    image_size: Optional[int] = None,
    val_size: int = 500,
    split_seed: int = 0,
    limit: Optional[int] = None,
    binarize: str = "dynamic",
    need_labels: bool = False,
) -> ImageData:
    """Load one split of a data set as an :class:`ImageData`.

    Sources: ``dataset`` (a name), or ``data_dir`` (a folder of IDX files of any H x W, or of
    PNG/JPEG images, flat or in class subfolders, resized to ``image_size`` if given), or ``data``
    (a ``.npy``/``.pt`` file, or in Python a tensor, array or ``Dataset``: ``[N, D]`` vectors or
    ``[N, C, H, W]`` images, floats or uint8), with ``labels_file`` (one integer per row).

    ``train`` and ``val`` come from the training part: its rows are shuffled with ``split_seed``
    (MNIST-5k is sorted by class) and the last ``val_size`` rows are held out. ``test`` is the
    ``t10k`` IDX file, the ``test/`` subfolder of an image folder with ``train/`` and ``test/``, and
    otherwise (an image folder, a tensor) all of it. A ``data_dir`` holding only the ``t10k`` pair
    serves the ``test`` split. ``limit`` keeps the first rows of the (shuffled) split.

    With ``binarize="static"`` the pixels are replaced, once, by a Bernoulli draw seeded by
    ``split_seed``; ``dynamic`` and ``none`` return grey values (the training loop draws dynamic
    binarizations per minibatch).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if binarize not in BINARIZATIONS:
        raise ConfigError(f"binarize must be dynamic, static or none; got {binarize!r}")
    images, labels, event_shape, name = _read_source(dataset, split, data_dir, data, labels_file, image_size,
                                                     need_labels)
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
    return _finish(images, labels, name, split, binarize, event_shape, split_seed)


def _finish(images, labels, name, split, binarize, event_shape, seed) -> ImageData:
    """An :class:`ImageData`, binarized once (seeded by ``seed + 1``) when ``binarize="static"``."""
    if binarize == "static":
        _check_probabilities(images, f"{name} {split}")
        images = torch.bernoulli(images, generator=torch.Generator().manual_seed(seed + 1))
    return ImageData(images.contiguous(), labels, name, split, binarize, tuple(event_shape))


def _check_probabilities(x: torch.Tensor, what: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{what}: pixel values must lie in [0, 1] (probabilities of ink); found [{lo:g}, {hi:g}]")


def _read_source(dataset, split, data_dir, data, labels_file, image_size, need_labels):
    """``(images [N, D], labels, event_shape, name)``: all rows of the part of the source that
    serves ``split`` (the training part for train/val)."""
    if data is not None and data_dir is not None:
        raise ConfigError("give either data (a tensor file) or data_dir (a folder), not both")
    if labels_file is not None and data is None:
        raise ConfigError("labels_file labels the rows of a data tensor file; give data too")
    folder = None if data_dir is None else Path(data_dir)
    if folder is not None and not folder.is_dir():
        raise DataError(f"--data-dir {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    images_folder = folder is not None and _holds_images(folder)
    if image_size is not None and not images_folder:
        raise ConfigError("image_size (--image-size) resizes the images of an image folder (--data-dir); "
                          "this source is not one")
    if data is not None:
        images, labels, event_shape, name = _read_tensor_source(data, labels_file)
    elif folder is not None:
        name = str(data_dir)
        reader = _read_image_split if images_folder else _read_idx_split
        images, labels, event_shape = reader(folder, split, need_labels, image_size)
    else:
        folder, name = _named_folder(dataset, split)
        images, labels, event_shape = _read_idx_split(folder, split, need_labels)
    if need_labels and labels is None:
        raise DataError(f"{name}: no labels (a flat image folder, or a tensor without --labels-file)")
    return images, labels, event_shape, name


def _named_folder(dataset: str, split: str) -> Tuple[Path, str]:
    if dataset == "mnist-5k":
        if split == "test":
            raise DataError(
                "mnist-5k has no test split (it is a subset of MNIST's training file); "
                "use --split val, or --data-dir with a folder holding t10k-* IDX files"
            )
        return EMBEDDED_DIR, "mnist-5k"
    if dataset in ("mnist", "fashion-mnist"):
        return _torchvision_folder(dataset, train=split != "test"), dataset
    raise ConfigError(f"unknown dataset {dataset!r}; choose mnist-5k, mnist or fashion-mnist, or use --data-dir/--data")


def _is_idx_folder(folder: Path) -> bool:
    return any(_find(folder, f"{prefix}-images-idx3-ubyte") for prefix in ("train", "t10k"))


def _holds_images(folder: Path) -> bool:
    """A folder read as PNG/JPEG images: it has images and no IDX files (those come first)."""
    return not _is_idx_folder(folder) and is_image_folder(folder)


def _read_idx_split(folder: Path, split: str, need_labels: bool, image_size=None):
    prefix = "t10k" if split == "test" else "train"
    pair = _read_pair(folder, prefix, need_labels)
    if pair is None:
        images = "no PNG/JPEG images and no " if not _is_idx_folder(folder) else "no "
        raise DataError(
            f"{folder}: {images}{prefix}-images-idx3-ubyte[.gz] file "
            f"(needed for the {split} split; the folder holds {_listing(folder)})"
        )
    return pair


def _read_image_split(folder: Path, split: str, need_labels: bool, image_size=None):
    """The part of an image folder that serves ``split`` (labels: the training part's classes)."""
    train, test = image_folder_parts(folder)
    if split == "test" and test is not None:
        images, labels, event_shape, _ = read_image_folder(test, image_size, folder_classes(train))
    else:
        images, labels, event_shape, _ = read_image_folder(train, image_size)
    return images, labels, event_shape


def _read_tensor_source(data, labels_file):
    """A tensor file (path) or, in Python, a tensor/array/Dataset."""
    if isinstance(data, (str, os.PathLike)):
        name = str(data)
        raw, labels = read_tensor_file(data), None
    else:
        name = type(data).__name__
        raw, labels = _raw_from_object(data)
    images, event_shape = images_from_tensor(raw, f"--data {name}" if isinstance(data, (str, os.PathLike)) else name)
    if labels_file is not None:
        labels = read_labels(labels_file, len(images))
    return images, labels, event_shape, name


def _raw_from_object(obj):
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(obj), None
    if isinstance(obj, torch.utils.data.Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        return tensor_from_dataset(obj)
    raise DataError(f"cannot use a {type(obj).__name__} as data: give an ImageData, a tensor or array "
                    "([N, D] vectors or [N, C, H, W] images) or a torch Dataset of images")


def as_image_data(obj, *, split: str = "train", binarize: str = "dynamic", name: Optional[str] = None,
                  seed: int = 0) -> ImageData:
    """Data handed over in Python as an :class:`ImageData` (all of it, no hold-out): an
    ``ImageData`` (returned as it is), a tensor or numpy array (``[N, D]`` vectors or ``[N, C, H, W]``
    images, floats or uint8), or a map-style ``torch.utils.data.Dataset`` whose items are an image
    (tensor, array or PIL image) or ``(image, label)``. ``binarize="static"`` draws one
    binarization seeded by ``seed + 1``. :func:`~pyro_vae.infer.svi.fit` calls it on ``train_data``."""
    if isinstance(obj, ImageData):
        return obj
    if binarize not in BINARIZATIONS:
        raise ConfigError(f"binarize must be dynamic, static or none; got {binarize!r}")
    raw, labels = _raw_from_object(obj)
    name = name or type(obj).__name__
    images, event_shape = images_from_tensor(raw, name)
    return _finish(images, labels, name, split, binarize, event_shape, seed)


def kind_of_test_split(dataset: Optional[str], data_dir=None, data=None) -> str:
    """How a source serves the ``test`` split: ``separate`` (a ``t10k`` file, a ``test/`` image
    folder, torchvision's test set), ``whole`` (the source itself: a tensor, an image folder
    without ``train/`` and ``test/``) or ``none`` (MNIST-5k, an IDX folder without ``t10k``)."""
    if data is not None:
        return "whole"
    if data_dir is None:
        return "none" if dataset == "mnist-5k" else "separate"
    folder = Path(data_dir)
    if not _holds_images(folder):
        return "separate" if _find(folder, "t10k-images-idx3-ubyte") else "none"
    return "separate" if image_folder_parts(folder)[1] is not None else "whole"


def source_options(config: VAEConfig) -> dict:
    """The keyword arguments of :func:`load_dataset` that ``config``'s data settings give."""
    return dict(data_dir=config.data_dir, data=config.data, labels_file=config.labels_file,
                image_size=config.image_size, val_size=config.val_size, split_seed=config.split_seed,
                binarize=config.binarize)


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
    common = source_options(config)
    train = load_dataset(config.dataset, "train", limit=config.limit, **common)
    val = load_dataset(config.dataset, "val", **common) if config.val_size > 0 else None
    return train, val


def eval_binarized(data: ImageData, seed: int = 0) -> torch.Tensor:
    """The images as evaluation scores them: one fixed, seeded binarization (or grey if none)."""
    if data.binarize != "dynamic":
        return data.images
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(data.images.cpu(), generator=g).to(data.images.device)


def check_shape_matches(data: ImageData, event_shape, what: str = "the run") -> None:
    """:class:`DataError` unless one datum of ``data`` has the shape ``what`` was trained on."""
    if tuple(data.event_shape) != tuple(event_shape):
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        raise DataError(f"{what} was trained on data of shape {shape(event_shape)}; {data.describe()} has shape "
                        f"{shape(data.event_shape)} (image folders: --image-size resizes)")


def check_images(data: ImageData, config: VAEConfig) -> None:
    """:class:`DataError` unless ``data`` is ``[N, D]`` with ``D`` the size of its ``event_shape``,
    finite and, where pixels are read as probabilities of ink or grey values (Bernoulli or
    continuous Bernoulli likelihood, or any binarization), within ``[0, 1]``. For your own program
    (``config.program``) only a binarization decides: its likelihood is its own business.

    Out-of-range values are rejected, not clipped: they mean the data was scaled wrongly.
    """
    x, size = data.images, math.prod(data.event_shape)
    if x.ndim != 2 or x.shape[1] != size:
        shape = "x".join(map(str, data.event_shape))
        raise DataError(f"{data.describe()}: images must be flattened {shape}, [N, {size}]; got {list(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{data.describe()}: images contain NaN or infinite values")
    built_in_reads_probabilities = config.program is None and config.likelihood in ("bernoulli", "continuous-bernoulli")
    if built_in_reads_probabilities or data.binarize != "none":
        _check_probabilities(x, data.describe())
