"""File contents by sha256 under DIR/blobs, shared by every repo; uploads staged in DIR/tmp."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO


class Blobs:
    """A content-addressed directory: DIR/blobs/ab/abcdef... (regular and LFS files alike)."""

    def __init__(self, root: Path):
        self.dir = root / "blobs"
        self.tmp = root / "tmp"
        self.dir.mkdir(exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where a blob lives (whether or not it exists)."""
        return self.dir / sha256[:2] / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        """Whether a blob is stored (with that size, when given)."""
        path = self.path(sha256)
        return path.exists() and (size is None or path.stat().st_size == size)

    def put(self, data: bytes) -> str:
        """Store bytes; return their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            fd, tmp = tempfile.mkstemp(dir=self.tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._adopt(tmp, sha)
        return sha

    def new_upload(self) -> tuple[IO[bytes], str]:
        """An open temporary file for a streamed upload, and its path."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        return os.fdopen(fd, "wb"), tmp

    def finish_upload(self, tmp: str, sha256: str) -> None:
        """Move a verified upload into the blob store."""
        if self.has(sha256):
            os.unlink(tmp)
        else:
            self._adopt(tmp, sha256)

    def _adopt(self, tmp: str, sha: str) -> None:
        path = self.path(sha)
        path.parent.mkdir(exist_ok=True)
        os.replace(tmp, path)

    def read(self, sha256: str) -> bytes:
        """A blob's bytes."""
        return self.path(sha256).read_bytes()

    def read_head(self, sha256: str, n: int) -> bytes:
        """A blob's first n bytes."""
        with open(self.path(sha256), "rb") as f:
            return f.read(n)
