"""The runtime's messages: a fixed little-endian header, then the payload in its declared dtype.

Header (36 bytes): magic b"NoNN", format version, kind (input / device / output), dtype code,
device index, the 6-byte bundle id (first 12 hex digits of the manifest's sha256), request id,
rows, scale (int8 transport), flags (output: bitmask of the devices that were filled in).
Every receiver checks the header and the payload length against what it expects and drops
anything else, counting why; ``decode`` never raises anything but ``WireError``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from serve import defaults

MAGIC = b"NoNN"
VERSION = 1
HEADER = struct.Struct("<4sBBBxH6sQIfI")  # magic, version, kind, dtype, pad, device, bundle, request, rows, scale, flags
KIND_INPUT, KIND_DEVICE, KIND_OUTPUT = 1, 2, 3
DTYPES = {0: np.dtype("float32"), 1: np.dtype("float16"), 2: np.dtype("uint8")}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class WireError(ValueError):
    """A message that is malformed, foreign (another bundle) or not what the receiver expects."""


@dataclass(frozen=True)
class Message:
    kind: int
    device: int
    bundle: bytes
    request: int
    scale: float
    flags: int
    payload: np.ndarray  # [rows, ...] in the header's dtype


def bundle_key(bundle_id: str) -> bytes:
    """The header form of a bundle id (12 hex digits -> 6 bytes)."""
    return bytes.fromhex(bundle_id)


def encode(kind: int, bundle: bytes, request: int, payload: np.ndarray, *, device: int = 0, scale: float = 0.0,
           flags: int = 0) -> bytes:
    payload = np.ascontiguousarray(payload)
    header = HEADER.pack(MAGIC, VERSION, kind, DTYPE_CODES[payload.dtype], device, bundle, request,
                         len(payload), scale, flags)
    return header + payload.tobytes()


def decode(data: bytes, bundle: bytes, kind: int, row_shape: tuple[int, ...], dtypes: tuple[np.dtype, ...],
           max_rows: int = defaults.MAX_ROWS) -> Message:
    """Parse ``data`` as a ``kind`` message of this bundle whose rows have ``row_shape`` and one of ``dtypes``."""
    if len(data) < HEADER.size:
        raise WireError("short")
    magic, version, got_kind, code, device, got_bundle, request, rows, scale, flags = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise WireError("malformed")
    if got_bundle != bundle:
        raise WireError("foreign")
    if got_kind != kind or code not in DTYPES or DTYPES[code] not in dtypes or not 0 < rows <= max_rows:
        raise WireError("malformed")
    dtype = DTYPES[code]
    count = rows * int(np.prod(row_shape))
    if len(data) - HEADER.size != count * dtype.itemsize:
        raise WireError("malformed")
    payload = np.frombuffer(data, dtype=dtype, count=count, offset=HEADER.size).reshape(rows, *row_shape)
    return Message(got_kind, device, got_bundle, request, scale, flags, payload)


def peek_device(data: bytes) -> int:
    """The device index of a message, before its payload width (which depends on it) is known."""
    if len(data) < HEADER.size:
        raise WireError("short")
    return HEADER.unpack_from(data)[4]
