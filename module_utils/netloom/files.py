"""The one file writer: whole files owned by netloom, swapped in with Ansible's `atomic_move`.

Every module writes its files through `write_file`: a uniquely named temp file beside the
target (never a fixed name, so two runs cannot trip over each other's leftovers), optionally
checked (`haproxy -c`, `wg-quick strip`) while it is still private, then renamed over the
target by `module.atomic_move`, which also keeps SELinux contexts right. Readers see the old
file or the new one, never a partial one, and a secret is never readable by others.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

SECRET_MODE = 0o600


def read_bytes(path: str) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def read_text(path: str) -> str | None:
    """A file's text (undecodable bytes replaced), or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else data.decode("utf-8", "replace")


def file_mode(path: str) -> int | None:
    """Permission bits of a file, None when it does not exist."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


def write_file(module: Any, path: str, data: bytes | str, mode: int = 0o644, keep_attrs: bool = False,
               check: Callable[[str], None] | None = None, backup: str | None = None,
               dir_mode: int = 0o755) -> None:
    """Make `data` the content of `path`.

    mode: the file's permission bits; with `keep_attrs` an existing file keeps its owner and
    mode (an operator's choice) and `mode` only applies to a new file. mode 0600 is the
    secret case: the temp file is 0600 from its first byte and the new file never exists with
    wider bits. check: called with the temp path before anything is swapped (raise to stop:
    the live file is then unchanged). backup: copy the live file there first (atomically).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=dir_mode, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".netloom", dir=folder)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if check is not None:
            check(temp)
        if backup is not None and os.path.exists(path):
            copy_file(module, path, backup)
        exists = os.path.exists(path)
        keep = keep_attrs and exists and mode != SECRET_MODE
        if exists and not keep:
            os.chmod(path, mode)  # atomic_move copies the live file's bits; never widen a secret
        # A new file gets 0666 & ~umask from atomic_move: the umask keeps it within `mode`.
        old_umask = os.umask(0o777 & ~mode)
        try:
            module.atomic_move(temp, path)
        finally:
            os.umask(old_umask)
        if not keep:
            os.chmod(path, mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def copy_file(module: Any, source: str, target: str) -> None:
    """Copy `source` to `target` atomically with the source's mode (a backup such as PATH.prev)."""
    folder = os.path.dirname(target) or "."
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".netloom", dir=folder)
    os.close(handle)
    mode = os.stat(source).st_mode & 0o7777
    try:
        shutil.copy2(source, temp)
        old_umask = os.umask(0o777 & ~mode)
        try:
            module.atomic_move(temp, target, keep_dest_attrs=False)
        finally:
            os.umask(old_umask)
        os.chmod(target, mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def remove_file(path: str, backup: str | None = None) -> None:
    """Delete a file (with `backup`, rename it there in one step); one already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        if backup is not None:
            os.replace(path, backup)
        else:
            os.unlink(path)


def remove_dropin(path: str) -> None:
    """Delete a unit drop-in and its `.d` directory when nothing else is left in it."""
    remove_file(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing): one read-allocate-write at a time."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
