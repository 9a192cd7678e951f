"""The one file writer: whole files owned by netloom, replaced atomically, read back as bytes."""
from __future__ import annotations

import contextlib
import os
import tempfile


def read_bytes(path: str) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write a uniquely named temp file beside `path` with its final mode, then rename it over.

    Readers see the old file or the new one, never a partial one, and a secret file is never
    readable by others, not even for a moment.
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def remove_file(path: str) -> None:
    """Delete a file; one that is already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
