"""What one request may cost the hub: the size of its body, the Content-Length it announces,
and how long its client may stay silent.

A JSON call (repo create, discussions, preupload, paths-info...) carries at most API_BODY
bytes; a commit carries its regular files inline (base64), so it may reach COMMIT_BODY; the
bytes of an LFS object may reach UPLOAD_BODY.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import Message
from typing import IO

from bot.localhub.errors import ApiError

API_BODY = 8 * 1024**2
COMMIT_BODY = 256 * 1024**2
UPLOAD_BODY = 2 * 1024**3
TIMEOUT = 30.0  # seconds a connection may stay silent (mid-request or idle between requests)
CHUNK = 1024 * 1024
MAX_TRAILERS = 64
DIGITS = re.compile(r"[0-9]{1,18}")
HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large: at most {limit} bytes for this request")


def announced(headers: Message) -> int | None:
    """The body length a request announces: None for a chunked body, 0 for none (400 for a
    negative, non-numeric or twice-given Content-Length)."""
    if "chunked" in (headers.get("Transfer-Encoding") or "").lower():
        return None
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        return 0
    if len(set(values)) > 1 or not DIGITS.fullmatch(values[0]):
        raise ApiError(400, f"invalid Content-Length header: {', '.join(values)!r}")
    return int(values[0])


def read_body(rfile: IO[bytes], headers: Message, limit: int,
              sink: Callable[[bytes], object] | None = None) -> bytes:
    """A request's body (Content-Length or chunked), at most `limit` bytes (413 beyond);
    streamed into `sink` when given (then b"" is returned)."""
    parts: list[bytes] = []
    total = 0

    def take(data: bytes) -> None:
        nonlocal total
        total += len(data)
        if total > limit:
            raise too_large(limit)
        if sink is not None:
            sink(data)
        else:
            parts.append(data)

    length = announced(headers)
    if length is None:
        _read_chunked(rfile, limit, take)
    else:
        if length > limit:
            raise too_large(limit)
        _read_exactly(rfile, length, take)
    return b"".join(parts)


def _read_exactly(rfile: IO[bytes], n: int, take: Callable[[bytes], None]) -> None:
    while n:
        data = rfile.read(min(n, CHUNK))
        if not data:
            raise ApiError(400, "truncated body")
        take(data)
        n -= len(data)


def _read_chunked(rfile: IO[bytes], limit: int, take: Callable[[bytes], None]) -> None:
    total = 0
    while True:
        size_text = rfile.readline(1024).split(b";")[0].strip()
        if not HEX.fullmatch(size_text):
            raise ApiError(400, "malformed chunked body: bad chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise too_large(limit)
        _read_exactly(rfile, size, take)
        if rfile.readline(16).strip():
            raise ApiError(400, "malformed chunked body: no line end after a chunk")
    for _ in range(MAX_TRAILERS):
        if not rfile.readline(1024).strip():
            return
    raise ApiError(400, "malformed chunked body: too many trailer lines")
