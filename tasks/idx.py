"""Reader and writer for the IDX file format used by MNIST, Fashion-MNIST, KMNIST and EMNIST.

Format (all integers big-endian)::

    byte 0-1  : 0x00 0x00
    byte 2    : data type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64)
    byte 3    : number of dimensions n
    4 .. 4+4n : n dimension sizes, each an unsigned 32-bit big-endian integer
    rest      : the payload, row-major (C order), big-endian values

So the "magic number" read as one big-endian uint32 is ``type_code << 8 | n``: 2051 (0x0803) for uint8
images [N, H, W] and 2049 (0x0801) for uint8 labels [N].

Both functions are gzip aware: a file whose first two bytes are the gzip signature 0x1f 0x8b is
decompressed (and its CRC checked by :mod:`gzip`); ``write_idx`` compresses when the path ends in ``.gz``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import IDXFormatError

__all__ = ["IDX_DTYPES", "MAGIC_IMAGES", "MAGIC_LABELS", "encode_idx", "parse_idx", "read_idx", "write_idx"]

#: IDX data type code -> numpy big-endian dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_BY_KIND: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}

#: Magic number of a uint8 image file [N, H, W].
MAGIC_IMAGES = 0x00000803  # 2051
#: Magic number of a uint8 label file [N].
MAGIC_LABELS = 0x00000801  # 2049

_GZIP_SIGNATURE = b"\x1f\x8b"


def parse_idx(data: bytes, *, source: str = "<bytes>", expected_magic: int | None = None) -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian numpy array.

    Args:
        data: the raw IDX bytes (already gunzipped).
        source: a name for error messages (usually the file path).
        expected_magic: if given, the 4-byte magic number must equal it (e.g. :data:`MAGIC_IMAGES`).

    Raises:
        IDXFormatError: wrong magic, unknown type code, header or payload shorter / longer than declared.
    """
    if len(data) < 4:
        raise IDXFormatError(f"{source}: only {len(data)} bytes, too short for an IDX header (4 bytes minimum).")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    magic = (code << 8) | ndim
    if zero != 0 or code not in IDX_DTYPES:
        raise IDXFormatError(
            f"{source}: bad IDX magic number 0x{struct.unpack('>I', data[:4])[0]:08x}; an IDX file starts with "
            f"two zero bytes, a type code in {{{', '.join(hex(c) for c in IDX_DTYPES)}}} and the number of "
            "dimensions (2051 = 0x00000803 for uint8 images, 2049 = 0x00000801 for uint8 labels). "
            "The file is not an IDX file or is corrupt; delete it and fetch it again."
        )
    if expected_magic is not None and magic != expected_magic:
        raise IDXFormatError(
            f"{source}: IDX magic number is {magic} (0x{magic:08x}) but {expected_magic} "
            f"(0x{expected_magic:08x}) was expected (2051 = images, 2049 = labels); images and labels "
            "files swapped, or a wrong file."
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(f"{source}: truncated IDX header ({len(data)} of {header_len} bytes).")
    dims = struct.unpack(f">{ndim}I", data[4:header_len]) if ndim else ()
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload < expected:
        raise IDXFormatError(
            f"{source}: truncated IDX payload: the header declares shape {tuple(dims)} ({expected} bytes) but "
            f"only {payload} bytes follow. The file is incomplete; delete it and fetch it again."
        )
    if payload > expected:
        raise IDXFormatError(
            f"{source}: {payload - expected} unexpected trailing bytes after the IDX payload of shape "
            f"{tuple(dims)}; the file is corrupt or not what its header says."
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str], *, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, detected from its first two bytes) into a numpy array.

    Args:
        path: the file.
        expected_magic: optional magic number to enforce (:data:`MAGIC_IMAGES` / :data:`MAGIC_LABELS`).

    Returns:
        A native-endian array whose dtype follows the IDX type code (uint8 for MNIST-style files) and whose
        shape is the header's dimensions, e.g. [60000, 28, 28].

    Raises:
        IDXFormatError: bad header or payload (see :func:`parse_idx`), or a truncated / corrupt gzip stream.
        FileNotFoundError: the path does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_SIGNATURE:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise IDXFormatError(
                f"{path}: the gzip stream is truncated or corrupt ({type(exc).__name__}: {exc}). "
                "Delete the file and fetch it again."
            ) from exc
    return parse_idx(raw, source=str(path), expected_magic=expected_magic)


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a numpy array as IDX bytes (uncompressed). Supported dtypes: uint8, int8, int16, int32,
    float32, float64 (others raise ``ValueError``); at most 255 dimensions, each below 2**32."""
    arr = np.asarray(array)
    code = _CODE_BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"write_idx: dtype {arr.dtype} has no IDX type code; use one of uint8, int8, int16, int32, "
            "float32, float64."
        )
    if arr.ndim > 255 or any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"write_idx: shape {arr.shape} cannot be stored in an IDX header.")
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``. Returns the path.

    Meant for tests and for converting data; the round trip ``read_idx(write_idx(p, a))`` gives ``a`` back
    exactly (values, dtype kind and shape).
    """
    path = Path(path)
    data = encode_idx(array)
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
