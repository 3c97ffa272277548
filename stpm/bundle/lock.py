"""The per-name lock of the model store (flock on `models/<name>/.lock`, across threads and processes) and
the check that the store can be written at all.

Every change of a name's state (publish, activate, delete, an evaluation record) runs under its lock, and
so does every check the change depends on (is the version active? in use?): a check outside the lock can
be stale by the time the change is made. A store that cannot be written (a read-only mount, missing
permissions) raises StoreNotWritableError naming the model, never an OSError with the store's path.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stpm.bundle.errors import StoreNotWritableError

LOCK = ".lock"
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EISDIR)


def not_writable(e: OSError, consequence: str) -> StoreNotWritableError:
    """An OSError of a write into the store -> StoreNotWritableError saying why and what it means."""
    reason = "it is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or type(e).__name__).lower()
    return StoreNotWritableError(f"the model store cannot be written ({reason}): {consequence}")


@contextmanager
def name_lock(name_dir: Path) -> Iterator[None]:
    """Exclusive per-name lock. Raises StoreNotWritableError when the lock file cannot be opened for writing."""
    import fcntl

    try:
        fd = os.open(name_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in NOT_WRITABLE:
            raise not_writable(e, f"model {name_dir.name} was not changed") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_writable(models_dir: str | Path, consequence: str = "nothing can be published") -> None:
    """Raise StoreNotWritableError unless a file can be created in the store (or, before the store exists,
    in the nearest folder above it that does): what a publish will need, asked before hours of training."""
    d = Path(models_dir).resolve()
    while not d.is_dir() and d != d.parent:
        d = d.parent
    probe = d / f".write-probe-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        if e.errno in NOT_WRITABLE:
            raise not_writable(e, consequence) from None
        raise
    os.close(fd)
    os.unlink(probe)


__all__ = ["LOCK", "check_writable", "name_lock", "not_writable"]
