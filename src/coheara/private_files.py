"""Small files only this user may read (API keys, the adapter registry, evaluation runs),
written so that a crash or a second writer never leaves half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from coheara.errors import ConfigurationError


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a 0600 temporary file in the same folder, synced, then
    renamed over it (readers see the old file or the new one, never a mix)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:  # mkstemp creates the file 0600
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextlib.contextmanager
def exclusive(lock: Path, *, what: str, hint: str) -> Iterator[None]:
    """One writer at a time, across processes (POSIX `flock`; elsewhere no lock); a lock
    that cannot be made is a ConfigurationError about `what`, with the setting to fix."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {what}: {exc.strerror}", hint=hint) from None
    try:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
