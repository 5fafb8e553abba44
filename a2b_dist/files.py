"""Files that readers never see half-written: write to a temporary name in the same folder, then
rename into place (``os.replace`` is atomic on one file system). A failed write removes its
temporary file and leaves the previous version, if any, untouched."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

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


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` to the JSON-lines file ``path`` as one line (``json.dumps`` with its default
    separators, then a newline), flushed to the file when this returns; not fsynced. The one
    appender of the run folder's jobs.jsonl, launches.jsonl and metrics.jsonl and of a sweep
    trial's sweep-reports.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


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


# ---------------------------------------------------------------------------------------------
# Output folders that hold one generation

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()   # our own pid on a leftover: a dead process whose pid came round again


class StagedFolder:
    """A command's output folder (``--out``) that always holds the files of one run.

    ``prepare()``, before any work: checks the folder (a folder or nothing; an existing one holds
    only this command's own outputs, ``ours``, so a mistyped --out never swaps away a foreign folder)
    and creates the staging folder ``.<out>.staging-<pid>`` beside it, which proves that the place is
    writable. The command writes into ``folder``; ``commit()`` swaps it in (the old folder renamed to
    ``.<out>.old-<pid>``, the new one renamed to ``out``, the old removed). ``discard()`` (on any
    failure; a no-op after commit) removes the staging folder. A process killed midway leaves its
    staging folder beside ``out``, never inside it; the next prepare() removes the leftovers of dead
    processes (and renames an ``.old-<pid>`` back when a kill fell between the two renames).
    Every OSError on the way is a UserError naming the path."""

    def __init__(self, out: str | os.PathLike, name: str, command: str, ours: tuple[str, ...]):
        self.given = str(out)
        self.name, self.command, self.ours = name, command, set(ours)
        out = Path(out)
        self.out = Path(os.path.realpath(out)) if out.is_symlink() else out
        self.folder = self.out.parent / f".{self.out.name}.staging-{os.getpid()}"
        self._old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        self.committed = False

    def _error(self, e: OSError, what: str) -> UserError:
        return UserError(f"{self.name} {self.given}: {what} {e.filename or self.out}: {e.strerror or e}")

    def _leftovers(self) -> None:
        parent = self.out.parent
        if not parent.is_dir():
            return
        for kind in ("old", "staging"):   # an old generation back first, then stale staging folders
            for path in parent.glob(f".{self.out.name}.{kind}-*"):
                pid = path.name.rsplit("-", 1)[-1]
                if not pid.isdigit() or _pid_alive(int(pid)):
                    continue
                if kind == "old" and not self.out.exists():
                    os.rename(path, self.out)
                else:
                    shutil.rmtree(path, ignore_errors=True)

    def prepare(self) -> Path:
        out = self.out
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{self.name} {self.given} is a file, not a folder; pass a folder")
            foreign = sorted(p.name for p in out.iterdir()   # (.NAME.tmp-PID: a write an older version left)
                             if p.name not in self.ours and not (p.name.startswith(".") and ".tmp-" in p.name))
            if foreign:
                raise UserError(f"{self.name} {self.given} holds {foreign[0]!r}"
                                + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                                + f", which {self.command} does not write; its outputs replace the whole folder: "
                                "pass a new or empty folder, or the --out of an earlier run")
            if not os.access(out, os.W_OK | os.X_OK):
                raise UserError(f"{self.name} {self.given} is not writable (its outputs replace it); "
                                "pass a folder you can write")
        try:
            self._leftovers()
            out.parent.mkdir(parents=True, exist_ok=True)
            self.folder.mkdir()
        except OSError as e:
            raise self._error(e, "cannot write there:") from None
        return self.folder

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Write into the yielded staging folder; on success it replaces ``out``."""
        try:
            yield self.folder
            if os.environ.get("A2B_FAULT_KILL_BEFORE_SWAP"):   # tests: a kill with every new file written
                os.kill(os.getpid(), 9)
            self.commit()
        except OSError as e:
            raise self._error(e, "could not write") from None

    def commit(self) -> Path:
        try:
            if self.out.exists():
                os.rename(self.out, self._old)
            os.rename(self.folder, self.out)
        except OSError as e:
            if self._old.exists() and not self.out.exists():
                os.rename(self._old, self.out)   # put the previous generation back
            raise self._error(e, "could not put the new outputs in place:") from None
        self.committed = True
        shutil.rmtree(self._old, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.folder, ignore_errors=True)
