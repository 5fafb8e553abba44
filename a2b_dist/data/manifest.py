"""The shard format's manifest: what a role folder must hold, and the checks made on open.

A role folder (healthy/, mixed/, val/, test/) holds ``<role>-000000.tar``, ... and
``manifest.json``; shards/README.md documents every field.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

from a2b_dist.files import sha256_file

from .storage import DataError, HashMismatch, Storage, TransferError, is_url, join, parent

FORMAT = "a2b-shards/1"
MANIFEST = "manifest.json"
ROLES = ("healthy", "mixed", "val", "test")
VERIFY_LEVELS = ("size", "count", "sha256")

# Fields every manifest carries, with the type a reader relies on.
_REQUIRED = {
    "format": str,
    "role": str,
    "samples": int,
    "labels": dict,
    "image_size": int,
    "channels": int,
    "bit_depth": int,
    "shards": list,
}
_SHARD_REQUIRED = {"name": str, "samples": int, "bytes": int, "sha256": str}
# A shard name: a plain file name in its role folder (the builder writes <role>-000000.tar).
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")


def check_shard_name(path: str | os.PathLike, index: int, name: str) -> str:
    """The one check of a shard name read from a manifest (every reader and ``verify`` go through
    it; a served manifest is untrusted input): after percent-decoding, repeated until nothing
    changes (a server decodes ``..%2F``, some twice), the name and its decoded form must be made
    of letters, digits, ``.``, ``_`` and ``-``, not start with a dot and hold no ``..``, so that no
    reader opens anything outside the role folder. Raises DataError naming the manifest."""
    decoded = name
    for _ in range(16):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    if all(_SHARD_NAME.fullmatch(n) and ".." not in n for n in (name, decoded)):
        return name
    shown = repr(name) if decoded == name else f"{name!r} (decoded {decoded!r})"
    raise DataError(f"{path}: shards[{index}].name {shown} must be a file name in the role folder: letters, "
                    "digits, '.', '_' and '-', not starting with a dot, no '..'")


def shard_name(role: str, index: int) -> str:
    return f"{role}-{index:06d}.tar"


def split_member(name: str) -> tuple[str, str]:
    """'key.mask.png' -> ('key', 'mask.png'): the key ends at the first dot, as in WebDataset."""
    base = os.path.basename(name)
    key, dot, ext = base.partition(".")
    return key, ext if dot else ""


def role_exists(root: str, role: str, storage: Storage) -> bool:
    """Whether ``root/role`` holds a manifest (a local folder or a URL)."""
    return storage.exists(join(root, role, MANIFEST))


def build_hint(root: str, image_size: int) -> str:
    """How to make the shards a data root names: build them, build and upload them, or serve them."""
    example = f"python shards/build.py simulated --source mnist5k --size {image_size} --out"
    if root.lower().startswith(("http://", "https://")):
        return f"Build the shards first into a folder the server serves at {root}, for example: {example} DATA"
    if is_url(root):
        return (f"Build the shards first and upload them, for example: {example} {root} (it uploads when --out "
                f"is a URL), or python shards/build.py upload DATA {root}")
    return f"Build the shards first, for example: {example} {root}"


def count_samples(path: Path) -> int:
    """Number of samples in a shard, from its tar headers only (member data is seeked over)."""
    with tarfile.open(path, mode="r:") as tar:
        return _count_keys(tar)


def hash_and_count(stream) -> tuple[str, Optional[int], Optional[BaseException]]:
    """(sha256, samples, tar error) of a shard read once, start to end, from a stream (a remote
    shard): the tar headers are parsed from a reader that hashes what passes through it, and the
    rest is read to the end; a damaged tar gives no count and its error, the hash still."""
    digest = hashlib.sha256()

    class Hashing:
        def read(self, n: int = -1) -> bytes:
            block = stream.read(n)
            digest.update(block)
            return block

    reader = Hashing()
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            samples, error = _count_keys(tar), None
    except (tarfile.TarError, EOFError) as exc:
        samples, error = None, exc
    while reader.read(1 << 20):
        pass
    return digest.hexdigest(), samples, error


def _count_keys(tar: tarfile.TarFile) -> int:
    keys = 0
    previous = None
    for member in tar:
        if not member.isreg():
            continue
        key, _ = split_member(member.name)
        if key != previous:
            keys += 1
            previous = key
    return keys


def shared_groups(groups_by_role: dict[str, list[str]], show: int = 5) -> list[str]:
    """One sentence per pair of roles that share groups (patients, volumes), naming a few of them."""
    found = []
    roles = [r for r in ROLES if groups_by_role.get(r)]
    for i, a in enumerate(roles):
        for b in roles[i + 1 :]:
            common = sorted(set(groups_by_role[a]) & set(groups_by_role[b]))
            if common:
                more = f" and {len(common) - show} more" if len(common) > show else ""
                found.append(f"roles {a} and {b} share {len(common)} groups "
                             f"({', '.join(map(repr, common[:show]))}{more})")
    return found


def _warn_shared_groups(role_dir: str, manifest: dict, storage: Storage) -> None:
    """Warn when a sibling role folder shares a group (patient, volume) with this one: leakage."""
    if not manifest.get("groups"):
        return
    root = parent(role_dir)
    for role in ROLES:
        if role == manifest["role"]:
            continue
        try:
            other = list(json.loads(storage.read_bytes(join(root, role, MANIFEST))).get("groups") or [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, DataError):
            continue  # no such role, or that role's own open reports its manifest
        for problem in shared_groups({manifest["role"]: manifest["groups"], role: other}):
            warnings.warn(f"LEAKAGE in {root}: {problem}; the same patient or volume in training "
                          "and evaluation inflates every metric. Rebuild the roles in one call with --split, "
                          "which assigns whole groups to roles", stacklevel=4)


def sample_origins(role_dir: str | os.PathLike, storage: Optional[Storage] = None) -> dict[str, dict]:
    """key -> the sample's json field (its origin, with ``group`` where the builder gave one)."""
    storage = storage or Storage()
    role_dir = str(role_dir)
    path = join(role_dir, MANIFEST)
    manifest = _parse_manifest(path, storage.read_bytes(path).decode("utf-8", "replace"))
    out: dict[str, dict] = {}
    for shard in manifest["shards"]:
        location = join(role_dir, shard["name"])

        def read() -> None:
            with storage.open_shard(location, size=shard["bytes"], sha256=shard["sha256"]) as stream:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        key, ext = split_member(member.name)
                        if ext == "json" and member.isreg():
                            try:
                                out[key] = json.loads(tar.extractfile(member).read().decode("utf-8"))
                            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                                raise DataError(f"{location}: sample {key!r}: unreadable json ({exc})") from None
        storage.call(location, "reading", read)
    return out


def _intact_prefix(path: Path) -> str:
    """Where a damaged shard stops being readable, in words, naming the key where the data ends."""
    keys: list[str] = []
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                key, _ = split_member(member.name)
                if not keys or keys[-1] != key:
                    keys.append(key)
                tar.extractfile(member).read()
        return f"all {len(keys)} samples readable, last key {keys[-1]!r}" if keys else "no samples"
    except (tarfile.TarError, OSError, EOFError) as exc:
        where = f"the data ends in or after key {keys[-1]!r}" if keys else "no sample is readable"
        return f"{where}: {exc}"


def read_manifest(
    role_dir: str | os.PathLike,
    *,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    verify: str = "count",
    storage: Optional[Storage] = None,
) -> dict:
    """Read ``role_dir/manifest.json`` and check the shards against it.

    Checks: the manifest exists and is well formed; every listed shard exists with the listed byte
    size; with ``verify="count"`` (default) also its sample count (tar headers only), with
    ``verify="sha256"`` also its hash; the image size and channels equal the ones given.
    Raises DataError naming the file and what differs.

    ``role_dir`` may be a URL (read through ``storage``): sizes then come from the server's
    metadata, ``count`` is checked as each shard streams (its tar headers cannot be read without
    reading the shard), and ``sha256`` reads every shard once, in parallel.
    """
    manifest, damaged = _open_role(role_dir, image_size=image_size, channels=channels, verify=verify,
                                   storage=storage)
    if damaged:
        raise DataError(damaged[0])
    return manifest


def open_role(
    role_dir: str | os.PathLike,
    *,
    image_size: Optional[int],
    channels: Optional[int],
    skip_corrupt: bool,
    verify: str = "count",
    storage: Optional[Storage] = None,
) -> dict:
    """read_manifest for the readers: with skip_corrupt a damaged shard (wrong size, count or
    hash) is a warning, and its missing samples are counted as skipped when read."""
    manifest, damaged = _open_role(role_dir, image_size=image_size, channels=channels, verify=verify,
                                   storage=storage)
    if damaged and not skip_corrupt:
        raise DataError(damaged[0] + " (skip_corrupt=True reads what is left and counts the rest as skipped)")
    for problem in damaged:
        warnings.warn(problem + "; skip_corrupt is on: its unreadable samples will be skipped and counted", stacklevel=3)
    return manifest


def _open_role(role_dir, *, image_size, channels, verify, storage: Optional[Storage] = None
               ) -> tuple[dict, list[str]]:
    if verify not in VERIFY_LEVELS:
        raise DataError(f"verify={verify!r} is not one of {', '.join(VERIFY_LEVELS)}")
    storage = storage or Storage()
    remote = is_url(role_dir)
    role_dir = str(role_dir) if remote else Path(role_dir)
    path = join(role_dir, MANIFEST)
    if remote:
        try:
            text = storage.read_bytes(path).decode("utf-8")
        except TransferError as exc:
            if not exc.missing:
                raise
            raise DataError(f"{path} not found: {role_dir} is not a shard folder written by "
                            "`python shards/build.py` (or uploaded with its upload command)") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not readable JSON: {exc}") from None
    else:
        if not role_dir.is_dir():
            raise DataError(f"{role_dir}: no such shard folder; build it with `python shards/build.py`")
        if not Path(path).is_file():
            raise DataError(f"{path} not found: {role_dir} is not a shard folder written by `python shards/build.py`")
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not readable JSON: {exc}") from None
    manifest = _parse_manifest(path, text)
    listed = sum(s["samples"] for s in manifest["shards"])
    if listed != manifest["samples"]:
        raise DataError(f"{path}: samples is {manifest['samples']} but the shards list {listed}")
    if image_size is not None and manifest["image_size"] != image_size:
        raise DataError(
            f"{path}: the shards hold {manifest['image_size']}x{manifest['image_size']} images, "
            f"but image_size={image_size} was asked for; rebuild with --size {image_size} "
            f"or use image_size={manifest['image_size']}"
        )
    if channels is not None and manifest["channels"] != channels:
        raise DataError(
            f"{path}: the shards hold {manifest['channels']}-channel images, but channels={channels} "
            f"was asked for; rebuild with --channels {channels} or use channels={manifest['channels']}"
        )

    _warn_shared_groups(str(role_dir), manifest, storage)
    if remote:
        storage.prepare_cache()   # a cache folder that cannot be written fails here, before any download
        return manifest, _remote_problems(role_dir, manifest, path, verify, storage)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:   # hashing releases the GIL
        problems = list(pool.map(lambda shard: _shard_problem(role_dir / shard["name"], shard, path, verify),
                                 manifest["shards"]))
    return manifest, [p for p in problems if p is not None]


def _shard_problem(file: Path, shard: dict, path: Path, verify: str) -> Optional[str]:
    """What is wrong with one listed shard at this verify level (None: nothing found)."""
    if not file.is_file():
        raise DataError(f"{file}: shard listed in {path} is missing")
    size = file.stat().st_size
    if size != shard["bytes"]:
        return f"{file}: {size} bytes, {path} lists {shard['bytes']} (truncated or rewritten; {_intact_prefix(file)})"
    if verify in ("count", "sha256"):
        try:
            found = count_samples(file)
        except (tarfile.TarError, OSError, EOFError) as exc:
            return f"{file}: unreadable tar ({exc})"
        if found != shard["samples"]:
            return f"{file}: holds {found} samples, {path} lists {shard['samples']}"
    if verify == "sha256" and sha256_file(file) != shard["sha256"]:
        return f"{file}: sha256 differs from the one in {path} (the bytes changed after the build)"
    return None


def _remote_problems(role_dir: str, manifest: dict, path: str, verify: str, storage: Storage) -> list[str]:
    """The checks of _shard_problem for shards behind a URL: sizes from the server's metadata
    (one request per shard, in parallel); with sha256 every shard is read once, in parallel, and
    its hash and sample count compared (through the node's cache when there is one)."""
    urls = [join(role_dir, s["name"]) for s in manifest["shards"]]
    problems: list[Optional[str]] = []
    for url, shard, size in zip(urls, manifest["shards"], storage.sizes(urls)):
        if size is None:
            raise DataError(f"{url}: shard listed in {path} is missing (the server answers: not found)")
        problems.append(None if size == shard["bytes"] else
                        f"{url}: {size} bytes on the server, {path} lists {shard['bytes']} (truncated or rewritten)")
    if verify == "sha256":
        def check(url: str, shard: dict) -> Optional[str]:
            def read() -> tuple[str, Optional[int], Optional[BaseException]]:
                with storage.open_shard(url, size=shard["bytes"], sha256=shard["sha256"]) as stream:
                    return hash_and_count(stream)
            try:
                digest, found, error = storage.call(url, "verifying", read)
            except HashMismatch as exc:   # the node's cache refused the download: the same finding
                return str(exc)
            if error is not None:
                return f"{url}: unreadable tar ({error})"
            if found != shard["samples"]:
                return f"{url}: holds {found} samples, {path} lists {shard['samples']}"
            if digest != shard["sha256"]:
                return f"{url}: sha256 differs from the one in {path} (the bytes changed after the build)"
            return None
        todo = [(u, s) for u, s, p in zip(urls, manifest["shards"], problems) if p is None]
        with ThreadPoolExecutor(max_workers=8) as pool:
            found = dict(zip([u for u, _ in todo], pool.map(lambda item: check(*item), todo)))
        problems = [p if p is not None else found.get(u) for u, p in zip(urls, problems)]
    return [p for p in problems if p is not None]


def _parse_manifest(path, text: str) -> dict:
    """A manifest's JSON with its fields, types, format and shard names checked (every reader's first step)."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    _check_fields(path, manifest, _REQUIRED)
    if manifest["format"] != FORMAT:
        raise DataError(f"{path}: format is {manifest['format']!r}, this reader understands {FORMAT!r}")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise DataError(f"{path}: shards[{i}] is not an object")
        _check_fields(path, shard, _SHARD_REQUIRED, prefix=f"shards[{i}].")
        check_shard_name(path, i, shard["name"])
    return manifest


def _check_fields(path: Path, obj: dict, required: dict[str, Any], prefix: str = "") -> None:
    for name, kind in required.items():
        if name not in obj:
            raise DataError(f"{path}: field {prefix}{name} is missing")
        value = obj[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{path}: field {prefix}{name} should be {kind.__name__}, found {value!r}")


def verify_roles(folder: str | os.PathLike, storage: Optional[Storage] = None
                 ) -> list[tuple[str, Optional[dict], list[str]]]:
    """Check every shard of a role folder, or of each role under a data root, at verify="sha256":
    [(role folder, manifest or None, problems)], one entry per role found. ``folder`` may be a URL."""
    storage = storage or Storage()
    folder = str(folder)
    if storage.exists(join(folder, MANIFEST)):
        role_dirs = [folder]
    else:
        role_dirs = [join(folder, r) for r in ROLES if storage.exists(join(folder, r, MANIFEST))]
        if not role_dirs:
            raise DataError(f"{folder}: neither a role folder (no {MANIFEST}) nor a data root with any of "
                            f"{', '.join(ROLES)} in it")
    out = []
    for role_dir in role_dirs:
        try:
            manifest, damaged = _open_role(role_dir, image_size=None, channels=None, verify="sha256",
                                           storage=storage)
        except DataError as exc:   # unreadable manifest, missing shard: reported per role, the others go on
            out.append((role_dir, None, [str(exc)]))
            continue
        out.append((role_dir, manifest, damaged))
    return out
