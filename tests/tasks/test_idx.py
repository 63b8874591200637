"""IDX reader / writer: round trips, and the documented error for each kind of broken file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from tasks.errors import DatasetError, IDXFormatError
from tasks.idx import MAGIC_IMAGES, MAGIC_LABELS, encode_idx, parse_idx, read_idx, write_idx


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([3, 1, 4, 1, 5], dtype=np.uint8),
        np.array([[-1, 2], [3, -128]], dtype=np.int8),
        np.array([[-1000, 2000]], dtype=np.int16),
        np.array([1, -2, 2**31 - 1], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        np.array([np.pi, -np.e], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i16", "i32", "f32", "f64", "empty"],
)
def test_round_trip(tmp_path, array, suffix):
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.shape == array.shape
    assert back.dtype.kind == array.dtype.kind and back.dtype.itemsize == array.dtype.itemsize
    assert back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_mnist_layout(tmp_path):
    images = np.zeros((7, 28, 28), dtype=np.uint8)
    raw = encode_idx(images)
    assert struct.unpack(">IIII", raw[:16]) == (MAGIC_IMAGES, 7, 28, 28)  # 2051, N, H, W
    assert len(raw) == 16 + 7 * 28 * 28
    assert struct.unpack(">II", encode_idx(np.zeros(5, np.uint8))[:8]) == (MAGIC_LABELS, 5)


def test_expected_magic(tmp_path):
    path = write_idx(tmp_path / "labels.gz", np.zeros(4, np.uint8))
    assert read_idx(path, expected_magic=MAGIC_LABELS).shape == (4,)
    with pytest.raises(IDXFormatError, match="2049.*2051"):
        read_idx(path, expected_magic=MAGIC_IMAGES)


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00"))
    with pytest.raises(IDXFormatError, match="bad IDX magic number 0x12340801"):
        read_idx(path)
    # unknown type code
    with pytest.raises(IDXFormatError, match="magic"):
        parse_idx(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")


def test_truncated_gzip(tmp_path):
    good = write_idx(tmp_path / "x.gz", np.arange(5000, dtype=np.int32))
    raw = good.read_bytes()
    bad = tmp_path / "truncated.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IDXFormatError, match="truncated or corrupt") as err:
        read_idx(bad)
    assert str(bad) in str(err.value)
    assert isinstance(err.value, DatasetError) and isinstance(err.value, RuntimeError)


def test_corrupt_gzip_crc(tmp_path):
    raw = bytearray(write_idx(tmp_path / "x.gz", np.arange(100, dtype=np.uint8)).read_bytes())
    raw[-8] ^= 0xFF  # break the CRC32 in the gzip trailer
    bad = tmp_path / "crc.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IDXFormatError, match="gzip"):
        read_idx(bad)


def test_truncated_payload_and_trailing_bytes():
    raw = encode_idx(np.zeros((3, 4), np.uint8))
    with pytest.raises(IDXFormatError, match="truncated IDX payload"):
        parse_idx(raw[:-1])
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        parse_idx(raw + b"\x00")
    with pytest.raises(IDXFormatError, match="truncated IDX header"):
        parse_idx(raw[:6])
    with pytest.raises(IDXFormatError, match="too short"):
        parse_idx(b"\x00\x00")


def test_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="no IDX type code"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint32))
