"""Property tests of the IDX reader: on any bytes, plain or gzip-compressed, ``read_idx`` returns
exactly the array the bytes describe or raises :class:`IDXError`, never anything else."""

import gzip
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyro_vae import IDXError, read_idx, write_idx
from pyro_vae.core.data import MAX_IDX_BYTES, MAX_IDX_DIMS

TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(raw: bytes):
    """An independent reading of the IDX format: the array, or None if ``raw`` is not valid."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in TYPES or not 1 <= raw[3] <= MAX_IDX_DIMS:
        return None
    ndim, dtype = raw[3], np.dtype(TYPES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        return None
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if math.prod(dims) * dtype.itemsize > MAX_IDX_BYTES or len(body) != math.prod(dims) * dtype.itemsize:
        return None
    try:
        return np.frombuffer(body, dtype=dtype).reshape(dims)
    except ValueError:  # a shape numpy cannot hold, even with 0 values
        return None


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tmp_path_factory.mktemp("idx") / "file"


def check(path, raw: bytes, compress: bool):
    path.write_bytes(gzip.compress(raw) if compress else raw)
    expected = reference(raw)
    try:
        got = read_idx(path)
    except IDXError:
        assert expected is None, "a valid IDX file was rejected"
        return
    assert expected is not None, "an invalid IDX file was accepted"
    assert got.shape == expected.shape and got.dtype == expected.dtype.newbyteorder("=")
    assert np.array_equal(got, expected, equal_nan=got.dtype.kind == "f")


def idx_header(code, dims):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@SETTINGS
@given(raw=st.binary(max_size=200), compress=st.booleans())
def test_random_bytes_give_an_array_or_idx_error(path, raw, compress):
    check(path, raw, compress)


@SETTINGS
@given(
    code=st.sampled_from(sorted(TYPES)),
    dims=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    data=st.data(),
    compress=st.booleans(),
)
def test_valid_files_and_their_mutations(path, code, dims, data, compress):
    """Well-formed files (read back exactly), then truncated, extended or bit-flipped copies."""
    body = data.draw(st.binary(min_size=math.prod(dims) * np.dtype(TYPES[code]).itemsize,
                               max_size=math.prod(dims) * np.dtype(TYPES[code]).itemsize))
    raw = idx_header(code, dims) + body
    check(path, raw, compress)
    cut = data.draw(st.integers(0, len(raw)))
    check(path, raw[:cut], compress)
    check(path, raw + data.draw(st.binary(min_size=1, max_size=8)), compress)
    i = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[i] ^= 1 << data.draw(st.integers(0, 7))
    check(path, bytes(flipped), compress)


@SETTINGS
@given(
    code=st.sampled_from(sorted(TYPES)),
    dims=st.one_of(
        st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=80),  # huge: products overflow int64
        st.lists(st.sampled_from([1, 1, 1, 2]), min_size=1, max_size=80),  # many small dims, few values
    ),
    extra=st.integers(-1, 1),
)
@example(code=0x08, dims=[65536] * 4, extra=0)  # 2**64 values: 0 in wrapping int64 arithmetic
@example(code=0x08, dims=[1] * 70, extra=0)  # one value in more dimensions than numpy allows (64)
def test_headers_promising_anything_never_exhaust_memory(path, code, dims, extra):
    """Any dimensions, up to 80 of them, with a body of about the promised size: the array or
    an IDXError, never a MemoryError or numpy's ValueError."""
    promised = math.prod(dims) * np.dtype(TYPES[code]).itemsize
    size = promised + extra if promised <= 4096 else promised % 2**64  # as int64 arithmetic would wrap
    check(path, idx_header(code, dims) + b"\x00" * max(min(size, 4096), 0), compress=False)


@SETTINGS
@given(
    array=st.sampled_from(["u1", "i1", "i2", "i4", "f4", "f8"]).flatmap(
        lambda kind: st.lists(st.integers(0, 3), min_size=1, max_size=3).flatmap(
            lambda shape: st.builds(
                lambda values: np.asarray(values, dtype=kind).reshape(shape),
                st.lists(st.integers(-128, 127) if kind != "u1" else st.integers(0, 255),
                         min_size=math.prod(shape), max_size=math.prod(shape)),
            )
        )
    ),
    suffix=st.sampled_from(["", ".gz"]),
)
def test_write_then_read_round_trips(tmp_path_factory, array, suffix):
    path = tmp_path_factory.getbasetemp() / f"round-trip{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_a_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    """A 4 GiB promise in a tiny .gz file: refused from the header."""
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, [65536, 65536]) + b"\x00" * (1 << 20)))
    with pytest.raises(IDXError, match="more than pyro-vae reads"):
        read_idx(path)


def test_a_fifo_is_not_read(tmp_path):
    """A named pipe in place of a data file would block forever: refused up front."""
    import os

    fifo = tmp_path / "train-images-idx3-ubyte"
    os.mkfifo(fifo)
    with pytest.raises(IDXError, match="not a regular file"):
        read_idx(fifo)
