"""Where shards are read from: a local folder, or a URL that fsspec opens.

A location is a string: a local path, or a URL such as ``https://host/data/healthy``,
``s3://bucket/prefix/healthy`` or ``gs://bucket/prefix/healthy``. URLs go through fsspec and the
protocol's own package (aiohttp for http(s), s3fs, gcsfs: the extras ``[http]``, ``[s3]``,
``[gcs]``). Local paths are read as plain files, exactly as before URLs were accepted.

For a URL every request has a bounded timeout (``timeout_s``, while connecting and between bytes);
a transient failure (no answer in time, a dropped connection, HTTP 408, 429 or 5xx) is retried
``retries`` times with exponential backoff; a permanent one (404, 403) fails at once. Either way
the error is a DataError naming the URL and what came back, never a hang.

Credentials come from where each library already looks: the environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS), the provider's config files (~/.aws, gcloud),
instance roles, ~/.netrc for HTTP. A URL that carries them (``user:password@host``, a signed
query string) is refused, so they never reach a config, a run folder, a checkpoint or a log.

With ``cache_dir`` (one per node, on local disk) streamed shards are kept: a shard is hashed
(sha256) while it downloads to a temporary name, and renamed to ``verified/<sha256>.tar`` only when
its size and hash are the manifest's; only a file under that name is ever read from the cache, so a
server that once sent other bytes of the same size cannot poison it (the download is an error
naming the URL and both hashes, and nothing stays in the cache). Files of older versions of the
cache (``<sha256>.tar``, checked by size only) are never read, and removed. The least recently
used shards are evicted to stay under ``cache_bytes``. A half-downloaded shard never enters the
cache, and processes of one node download each shard once (a per-shard lock). A fault of the
cache folder itself (a file in its place, no write permission, a full disk) is a CacheError
naming ``data.cache_dir`` at once: it is not retried and not blamed on the server's credentials.

Uploads (``upload``, ``write_bytes``, ``remove``) go through the same retries.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import string
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, TypeVar
from urllib.parse import parse_qsl, urlsplit

from a2b_dist.errors import UserError

T = TypeVar("T")


class DataError(UserError, ValueError):
    """A data problem a user has to fix; the message names the file, URL or field and what differs."""


class FieldError(DataError):
    """A bad argument of a library call; the message names the argument, never a command-line flag.

    ``template`` is a ``str.format`` string (constant: what varies comes in ``values``) in which
    ``{name=}`` is the argument ``name`` with its value from ``values`` (``{name=!r}``: its repr),
    ``{name=TEXT}`` the argument with the placeholder TEXT, ``{@name}`` the argument alone, and
    ``{key}`` a plain value. ``field`` is the first argument named. ``str()`` is the library's
    wording (``images_dir=scans: no such folder``); ``render(name)`` names each argument through
    ``name(argument, value or None)``: that is how a command line says its own flags, in one place
    (``--images scans: no such folder``, a2b_dist/build.py).
    """

    def __init__(self, template: str, **values: object):
        self.template, self.values = template, values
        named = [_argument(f) for _, f, _, _ in string.Formatter().parse(template) if f]
        fields = [found[0] for found in named if found]
        if not fields:
            raise ValueError(f"FieldError template names no argument: {template!r}")
        self.field = fields[0]
        super().__init__(self.render())

    def render(self, name: Optional[Callable[[str, Optional[str]], str]] = None) -> str:
        """The message with each argument named by ``name(argument, value)`` (default: the
        library's ``argument`` alone, ``argument=value`` with a value)."""
        return _FieldFormatter(name or _library_name).format(self.template, **self.values)


def _library_name(argument: str, value: Optional[str]) -> str:
    return argument if value is None else f"{argument}={value}"


def _argument(field: str) -> Optional[tuple[str, Optional[str]]]:
    """'@name' -> (name, None); 'name=' -> (name, ''); 'name=TEXT' -> (name, 'TEXT'); else None."""
    if field.startswith("@"):
        return field[1:], None
    argument, eq, literal = field.partition("=")
    return (argument, literal) if eq else None


@dataclass(frozen=True)
class _Named:
    """An argument met in a FieldError template, with its value (None: the argument alone)."""
    argument: str
    value: object


class _FieldFormatter(string.Formatter):
    def __init__(self, name: Callable[[str, Optional[str]], str]):
        self.name = name

    def get_value(self, key, args, kwargs):
        found = _argument(key) if isinstance(key, str) else None
        if found is None:
            return super().get_value(key, args, kwargs)
        argument, literal = found
        return _Named(argument, kwargs[argument] if literal == "" else literal)

    def convert_field(self, value, conversion):
        if isinstance(value, _Named):
            converted = value.value if value.value is None or not conversion else super().convert_field(
                value.value, conversion)
            return _Named(value.argument, converted)
        return super().convert_field(value, conversion)

    def format_field(self, value, format_spec):
        if isinstance(value, _Named):
            return self.name(value.argument, None if value.value is None else str(value.value))
        return super().format_field(value, format_spec)


class CacheError(DataError):
    """A fault of the node's cache folder (data.cache_dir), not of the server: never retried."""


class HashMismatch(DataError):
    """A download whose bytes are not the ones the manifest lists (their sha256 differs)."""


# The protocols a location may name (an allow-list), with the extra that installs each one's
# fsspec implementation.
EXTRAS = {"http": "http", "https": "http", "s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
# The cache's subfolder of verified shards: the only files it reads.
VERIFIED = "verified"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query parameters that carry credentials: AWS and GCS signed URLs, Azure SAS, tokens, API keys.
_SECRET_PARAM = re.compile(r"(signature|credential|token|secret|password|^sig$|^key$|api_?key)", re.IGNORECASE)


# Locations.

def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def _local(location: str | os.PathLike) -> str:
    text = str(location)
    return text[len("file://"):] if text.lower().startswith("file://") else text


def join(location: str | os.PathLike, *names: str) -> str:
    """``location/name/...`` for a URL or a path."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *names])
    return str(Path(_local(location), *names))


def parent(location: str | os.PathLike) -> str:
    """The folder holding ``location`` (a role folder's data root)."""
    if is_url(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(_local(location)).parent)


def absolute(location: str | os.PathLike) -> str:
    """A path made absolute (a job may start in another folder); a URL as it is."""
    return str(location) if is_url(location) else str(Path(_local(location)).expanduser().resolve())


def check_location(location: str | os.PathLike, what: str, *, local: Optional[str] = None) -> str:
    """The one check of every location a user gives (data.root, --shards, --out, verify and upload
    arguments, checkpoints, image folders): a URL that carries credentials (user:password@, a
    signed query string) is refused without echoing them, and so is a scheme outside the allow-list
    (http, https, s3, s3a, gs, gcs). With ``local`` (why, in words) the location must be a local
    path and a URL is refused. ``what`` names the field or argument. Returns it as a string."""
    text = str(location)
    if not is_url(text):
        return text
    scheme = _SCHEME.match(text).group(1).lower()
    parts = urlsplit(text)
    said = f"{what}: " if what else ""   # argparse's type= checks get the argument's name from argparse
    if "@" in parts.netloc:
        raise DataError(f"{said}a URL with user:password@ would put the credentials into configs, run "
                        "folders and logs; give them through the environment or the provider's config files "
                        "(~/.aws, gcloud, ~/.netrc for HTTP) and pass the URL without them")
    if any(_SECRET_PARAM.search(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise DataError(f"{said}a URL whose query string carries a signature or token would put it into "
                        "configs, run folders and logs; give credentials through the environment or the "
                        "provider's config files and pass the plain URL")
    if local is not None:
        raise DataError(f"{what + '=' if what else ''}{text}: {local}, not a URL")
    if scheme not in EXTRAS:
        raise DataError(f"{said}{scheme}:// is not a supported protocol; use a local path, "
                        "http(s)://, s3:// or gs://")
    return text


def redact(text: str) -> str:
    """A message with any user:password@ in a URL hidden (for errors raised by libraries)."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


# Failures.

class TransferError(DataError):
    """A read from a URL that failed for good: the message names the URL and what came back;
    ``missing`` when the server says there is no such object."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class _Failed(Exception):
    """A remote read that raised, carried through tarfile unchanged (tarfile treats OSError as a
    damaged archive, and most network errors are OSErrors)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _Failed):
            exc = exc.cause
            continue
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc: BaseException) -> Optional[int]:
    """The HTTP status a library attached to an error (aiohttp's ``status``, botocore's response)."""
    for e in _chain(exc):
        status = getattr(e, "status", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def _timeout_types() -> tuple[type, ...]:
    types: list[type] = [TimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
        types += [ConnectTimeoutError, ReadTimeoutError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError
        types.append(FSTimeoutError)
    return tuple(types)


def _connection_types() -> tuple[type, ...]:
    types: list[type] = [ConnectionError]
    with contextlib.suppress(ImportError):
        import aiohttp
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError
        types += [ConnectionClosedError, EndpointConnectionError]
    return tuple(types)


def explain(exc: BaseException, timeout_s: float) -> tuple[bool, str]:
    """(transient, what came back, in words) for an error raised while reading a URL."""
    status = _status(exc)
    chain = list(_chain(exc))
    if any(isinstance(e, _timeout_types()) for e in chain):
        return True, f"no answer within data.timeout_s={timeout_s:g} s"
    if status is not None:
        words = {401: "unauthorized", 403: "access denied", 404: "not found", 408: "request timeout",
                 429: "too many requests"}.get(status, "server error" if status >= 500 else "refused")
        hint = "; check the credentials (environment, ~/.aws, gcloud, ~/.netrc)" if status in (401, 403) else ""
        return status in (408, 429) or status >= 500, f"{words} (HTTP {status}){hint}"
    if any(isinstance(e, PermissionError) for e in chain):
        return False, "access denied; check the credentials (environment, ~/.aws, gcloud, ~/.netrc)"
    if any(isinstance(e, _connection_types()) for e in chain):
        return True, f"connection failed ({redact(str(chain[-1]) or type(chain[-1]).__name__)})"
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return False, "not found"
    last = chain[-1]
    return isinstance(last, OSError), redact(f"{type(last).__name__}: {last}")


# Reading.

class _Guarded:
    """A remote file whose read errors arrive as _Failed (see there)."""

    def __init__(self, file: IO[bytes]):
        self.file = file

    def read(self, n: int = -1) -> bytes:
        try:
            return self.file.read(n)
        except Exception as exc:
            raise _Failed(exc) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()


@dataclass(frozen=True)
class Storage:
    """How locations are read: timeouts, retries and the node's shard cache (picklable: it travels
    to DataLoader workers with the reading plan)."""
    timeout_s: float = 60.0
    retries: int = 4
    cache_dir: Optional[str] = None
    cache_bytes: int = 50 * 2**30
    backoff_s: float = 1.0   # the first wait before a retry; it doubles, up to 30 s

    @classmethod
    def from_config(cls, data) -> "Storage":
        """data.timeout_s, data.retries, data.cache_dir ("" for none) and data.cache_gb."""
        return cls(timeout_s=float(data.timeout_s), retries=int(data.retries), cache_dir=data.cache_dir or None,
                   cache_bytes=int(float(data.cache_gb) * 2**30))

    # Requests with retries.

    def call(self, location: str, action: str, fn: Callable[[], T]) -> T:
        """``fn()``; a transient failure is retried after 1, 2, 4, ... s; the last failure, or a
        permanent one, raises TransferError naming ``location``."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except DataError:
                raise
            except Exception as exc:   # every library has its own error types; explain() sorts them
                self.failed(location, action, exc, attempt)
        raise AssertionError("unreachable")

    def failed(self, location: str, action: str, exc: BaseException, attempt: int) -> None:
        """Wait before the next attempt, or raise TransferError when there is none."""
        transient, what = explain(exc, self.timeout_s)
        if not transient or attempt >= self.retries:
            tries = f" after {attempt + 1} attempts" if attempt else ""
            raise TransferError(f"{location}: {action} failed{tries}: {what}",
                                missing=what.startswith("not found")) from None
        time.sleep(min(30.0, self.backoff_s * 2 ** attempt))

    def filesystem(self, url: str):
        """(fsspec filesystem, path) for a URL, with this storage's timeouts."""
        import fsspec

        scheme = _SCHEME.match(url).group(1).lower()
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError:
            extra = EXTRAS.get(scheme)
            hint = f"pip install 'a2b_dist[{extra}]'" if extra else "install the fsspec package for it"
            raise DataError(f"{url}: reading {scheme}:// needs a package that is not installed; {hint}") from None
        except ValueError:
            raise DataError(f"{url}: {scheme}:// is not a protocol fsspec knows") from None
        fs, path = fsspec.core.url_to_fs(url, **self._options(scheme))
        if scheme in ("s3", "s3a"):
            # s3fs retries failed calls itself (S3FileSystem.retries, 5 by default); one attempt
            # each, so that data.retries and data.timeout_s alone bound how long a read may take.
            fs.retries = 1
        return fs, path

    def _options(self, scheme: str) -> dict:
        t = self.timeout_s
        if scheme in ("http", "https"):
            import aiohttp
            # trust_env: proxies from HTTP(S)_PROXY and credentials from ~/.netrc.
            return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
                                      "trust_env": True}}
        if scheme in ("s3", "s3a"):
            return {"config_kwargs": {"connect_timeout": t, "read_timeout": t,
                                      "retries": {"total_max_attempts": 1}}}
        if scheme in ("gs", "gcs"):
            return {"requests_timeout": t}
        return {}

    def read_bytes(self, location: str) -> bytes:
        """A whole (small) file: a manifest."""
        if not is_url(location):
            return Path(_local(location)).read_bytes()
        fs, path = self.filesystem(location)
        return self.call(location, "reading", lambda: fs.cat_file(path))

    def _info(self, location: str) -> Optional[dict]:
        """The server's metadata of one object (size, ...), None when there is no such object."""
        fs, path = self.filesystem(location)

        def lookup() -> Optional[dict]:
            try:
                return fs.info(path)
            except FileNotFoundError as exc:   # fsspec's http also says so for a timeout: see the cause
                if explain(exc, self.timeout_s)[1].startswith("not found"):
                    return None
                raise
        return self.call(location, "looking up", lookup)

    def exists(self, location: str) -> bool:
        """Whether a file is there; for a URL a missing object is False, any other failure raises."""
        if not is_url(location):
            return Path(_local(location)).is_file()
        return self._info(location) is not None

    def sizes(self, urls: list[str]) -> list[Optional[int]]:
        """Byte sizes from the servers' metadata, 16 requests at a time (None: missing)."""
        def size(url: str) -> Optional[int]:
            info = self._info(url)
            if info is not None and info.get("size") is None:
                raise DataError(f"{url}: the server gives no size (no Content-Length); "
                                "the shard cannot be checked against its manifest")
            return None if info is None else int(info["size"])

        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(size, urls))

    # Writing (uploads to object storage).

    def upload(self, local: str | os.PathLike, url: str) -> None:
        fs, path = self.filesystem(url)
        self.call(url, "uploading", lambda: fs.put_file(str(local), path))

    def write_bytes(self, url: str, blob: bytes) -> None:
        fs, path = self.filesystem(url)
        self.call(url, "uploading", lambda: fs.pipe_file(path, blob))

    def remove(self, url: str) -> None:
        fs, path = self.filesystem(url)
        self.call(url, "removing", lambda: fs.rm_file(path))

    @contextlib.contextmanager
    def open_shard(self, location: str, *, size: Optional[int] = None, sha256: Optional[str] = None
                   ) -> Iterator[IO[bytes]]:
        """A shard to read from start to end: a local file, the cached copy of a remote shard
        (downloaded first when the cache is on), or a stream from the server. Read errors of a
        stream arrive as exceptions that ``failed`` sorts (retry or TransferError)."""
        if not is_url(location):
            with open(_local(location), "rb") as f:
                yield f
            return
        cached = self.cached(location, size, sha256) if self.cache_dir and size is not None and sha256 else None
        if cached is not None:
            with open(cached, "rb") as f:
                yield f
            return
        stream = self._stream(location, size)
        try:
            yield stream
        finally:
            stream.close()

    def _stream(self, location: str, size: Optional[int]) -> _Guarded:
        fs, path = self.filesystem(location)
        scheme = _SCHEME.match(location).group(1).lower()
        if scheme in ("http", "https"):   # one GET read as it arrives: no Range requests needed
            kwargs = {"block_size": 0, **({"size": size} if size else {})}
        else:
            kwargs = {"block_size": 8 * 2**20, "cache_type": "readahead"}
        return _Guarded(self.call(location, "opening", lambda: fs.open(path, "rb", **kwargs)))

    # The node's cache.

    def _cache_fault(self, exc: OSError) -> CacheError:
        """A local fault of the cache folder, in one line naming data.cache_dir."""
        what = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if exc.filename else ""
        return CacheError(f"data.cache_dir={self.cache_dir}: the node's shard cache cannot be written ({what}{where}); "
                          "point data.cache_dir at a writable folder on local disk with free space, or set "
                          "data.cache_dir='' to stream without a cache")

    def prepare_cache(self) -> None:
        """Create the cache folder and write a probe file in it, so that a folder that cannot hold the
        cache (a file in its place or above it, no write permission, a full disk) is a CacheError
        before anything is read or written; nothing when there is no cache."""
        if not self.cache_dir:
            return
        try:
            (Path(self.cache_dir) / VERIFIED).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.cache_dir) as probe:
                probe.write(b"\0")
                probe.flush()
                os.fsync(probe.fileno())
        except OSError as exc:
            raise self._cache_fault(exc) from None

    def cached(self, location: str, size: int, sha256: str) -> Optional[Path]:
        """The cache's verified copy of a shard, downloaded (and its sha256 checked) if missing;
        None when it cannot fit the cache."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        cache = Path(self.cache_dir)
        final = cache / VERIFIED / f"{sha256}.tar"
        if self._hit(final, size):
            return final
        if size > self.cache_bytes:
            warnings.warn(f"{location}: {size} bytes do not fit data.cache_gb; streamed without caching", stacklevel=3)
            return None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            lock = open(cache / f"{sha256}.lock", "a")
        except OSError as exc:
            raise self._cache_fault(exc) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # another process of this node may be downloading it
            if self._hit(final, size):
                return final
            tmp = cache / f"{sha256}.tar.part-{uuid.uuid4().hex[:8]}"
            try:
                self.call(location, "downloading", lambda: self._download(location, size, sha256, tmp))
                try:
                    os.replace(tmp, final)   # the verified name: only now may readers trust it
                except OSError as exc:
                    raise self._cache_fault(exc) from None
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        self._evict(keep=final)
        return final

    def _download(self, location: str, size: int, sha256: str, tmp: Path) -> None:
        """One download of a shard to ``tmp``, hashed as it arrives; an error unless its size and
        sha256 are the manifest's. Remote read errors arrive as _Failed (``call`` sorts them), a
        local write error is a CacheError (not retried)."""
        stream = self._stream(location, size)
        digest, got = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while True:
                    block = stream.read(1 << 20)   # a failed remote read is _Failed, never an OSError
                    if not block:
                        break
                    digest.update(block)
                    got += len(block)
                    out.write(block)
        except OSError as exc:
            raise self._cache_fault(exc) from None
        finally:
            stream.close()
        if got != size:
            raise DataError(f"{location}: downloaded {got} bytes, the manifest lists {size}")
        received = digest.hexdigest()
        if received != sha256:
            raise HashMismatch(f"{location}: the server sent bytes with sha256 {received}, the manifest lists "
                               f"{sha256} (the shard changed after the build; rebuild or re-upload the role); "
                               "nothing was cached")

    @staticmethod
    def _hit(path: Path, size: int) -> bool:
        """Whether the verified copy is there (its size as a sanity check); marks it recently used."""
        try:
            if path.stat().st_size != size:
                return False
        except OSError:   # not there, or the cache folder is unusable (cached() then says why)
            return False
        with contextlib.suppress(OSError):
            os.utime(path)   # recently used: evicted last
        return True

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used shards until the cache holds at most cache_bytes, partial
        downloads left by processes that died (their shard's lock is free), and shards cached by
        older versions under ``<sha256>.tar`` (checked by size only: never read)."""
        cache = keep.parent.parent
        for part in cache.glob("*.tar.part-*"):
            with open(cache / f"{part.name.split('.', 1)[0]}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue   # being downloaded now
                part.unlink(missing_ok=True)
        for old in cache.glob("*.tar"):
            if re.fullmatch(r"[0-9a-f]{64}\.tar", old.name):
                old.unlink(missing_ok=True)
        entries = []
        for path in (cache / VERIFIED).glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime, path, st.st_size))
        total = sum(size for _, _, size in entries)
        for _, path, size in sorted(entries):
            if total <= self.cache_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)   # a reader that has it open keeps reading it
                total -= size
