"""Files that readers never see half-written: write to a temporary name in the same folder, then
rename into place (``os.replace`` is atomic on one file system). A failed write removes its
temporary file and leaves the previous version, if any, untouched."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from a2b_dist.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (by any library: torch.save, savefig,
    np.savez); on success it is renamed to ``path``, on an exception it is removed.

    ``suffix`` ends the temporary name where a writer picks the format from it (".png", ".npz").
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically; ``fsync`` flushes it to disk
    before the rename (for files a crash must not lose, such as a checkpoint's meta.json)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (shards, checkpoint files, FID weights)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# One writer per run folder

RUN_LOCK = ".a2b-run.lock"
_HELD: dict[str, tuple[int, int, int]] = {}   # resolved folder -> (fd, depth, thread id) in this process


class FolderInUse(UserError):
    """Another process (or another thread of this one) holds the folder's lock."""


def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "host and pid not recorded yet"
    return f"host {info.get('host')}, pid {info.get('pid')}, since {info.get('since')}"


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, name: str = "train.run_dir") -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this process: an exclusive ``fcntl.flock`` on
    ``folder/.a2b-run.lock`` (the holder's host, pid and start time are written into it), released
    on exit. The kernel drops the lock when its process dies, however it dies, so a lock left by a
    dead process is never in the way (a SLURM requeue, a crash). Another holder raises FolderInUse,
    one line naming it; a nested hold by the same thread (a sweep trial around train()) is allowed.

    The lock file stays (it names the last holder); only the flock on it means anything."""
    import fcntl
    import socket
    import threading
    import time

    folder = Path(folder)
    key = str(folder.resolve())
    me = threading.get_ident()
    if key in _HELD:
        fd, depth, thread = _HELD[key]
        if thread != me:
            raise FolderInUse(f"{name} {folder} is in use by another training in this process (pid {os.getpid()})")
        _HELD[key] = (fd, depth + 1, thread)
        try:
            yield folder
        finally:
            fd, depth, thread = _HELD[key]
            _HELD[key] = (fd, depth - 1, thread)
        return
    lock_file = folder / RUN_LOCK
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"{name} {folder}: cannot create its lock file {lock_file}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(f"{name} {folder} is in use by another training ({_holder(lock_file)}); wait for it "
                          f"to end or stop it, or choose another {name}") from None
    except OSError as e:
        os.close(fd)
        raise UserError(f"{name} {folder}: cannot lock {lock_file}: {e.strerror or e}") from None
    try:
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        _HELD[key] = (fd, 1, me)
        yield folder
    finally:
        _HELD.pop(key, None)
        os.close(fd)   # releases the flock
