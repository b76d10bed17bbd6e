"""Messages between the trusted harness and the sandboxed workers, over a Unix socket.

A message is a JSON header and zero or more arrays of raw bytes: 4 bytes of header length
(big-endian), the UTF-8 JSON header, then each array's bytes in the order of the header's
`arrays` list ({"dtype", "shape"}). Arrays are the batches going in and the logits coming
back; everything else is JSON.

The trusted side reads what a worker sends as data only: no pickle, a dtype from a short
list, shapes and sizes checked against the caller's limit before a byte is allocated. A
worker that breaks the format, or dies, is a `WireError` for the trusted side. This module
must never execute or unpickle anything it receives.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np

DTYPES = ("int64", "int32", "uint16", "float32")
MAX_HEADER_BYTES = 1 << 20
_LENGTH = struct.Struct("!I")


class WireError(RuntimeError):
    """The other side closed the connection or sent something outside the format."""


def send(sock: socket.socket, header: dict, arrays: tuple | list = ()) -> None:
    """Send one message: `header` (JSON-able) and numpy arrays (C-contiguous copies are made
    where needed)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [{"dtype": a.dtype.name, "shape": list(a.shape)}
                                   for a in arrays]}
    data = json.dumps(header).encode()
    sock.sendall(_LENGTH.pack(len(data)) + data)
    for a in arrays:
        if a.nbytes:
            sock.sendall(memoryview(a).cast("B"))


def recv(sock: socket.socket, max_array_bytes: int = 0) -> tuple[dict, list[np.ndarray]]:
    """One message: its header (without `arrays`) and its arrays. Arrays larger than
    `max_array_bytes` in total are refused before they are read."""
    (length,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
    if length > MAX_HEADER_BYTES:
        raise WireError(f"a header of {length} bytes (the limit is {MAX_HEADER_BYTES})")
    try:
        header = json.loads(_read(sock, length))
    except ValueError as e:
        raise WireError(f"a header that is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError(f"a header that is not a JSON object: {type(header).__name__}")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise WireError("the header's arrays is not a list")
    shapes = [_checked_spec(spec) for spec in specs]
    total = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in shapes)
    if total > max_array_bytes:
        raise WireError(f"arrays of {total:,} bytes (this message may carry {max_array_bytes:,})")
    arrays = []
    for dtype, shape in shapes:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            _read_into(sock, memoryview(out.reshape(-1).view(np.uint8)))
        arrays.append(out)
    return header, arrays


def _checked_spec(spec) -> tuple[str, tuple[int, ...]]:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise WireError(f"an array of dtype {spec!r}: allowed {DTYPES}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 40 for n in shape
    ):
        raise WireError(f"an array of shape {shape!r}")
    return spec["dtype"], tuple(shape)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(sock, memoryview(buf))
    return bytes(buf)


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except OSError as e:
            raise WireError(f"the connection broke: {e}") from None
        if n == 0:
            raise WireError("the other side closed the connection")
        got += n
