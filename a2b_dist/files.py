"""Files that readers never see half-written: write to a temporary name in the same folder, then
rename into place (``os.replace`` is atomic on one file system). A failed write removes its
temporary file and leaves the previous version, if any, untouched."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator


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
