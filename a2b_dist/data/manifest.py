"""The shard format's manifest: what a role folder must hold, and the checks made on open.

A role folder (healthy/, mixed/, val/, test/) holds ``<role>-000000.tar``, ... and
``manifest.json``; shards/README.md documents every field.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from a2b_dist.errors import UserError

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


class DataError(UserError, ValueError):
    """A data problem a user has to fix; the message names the file or field and what differs."""


def shard_name(role: str, index: int) -> str:
    return f"{role}-{index:06d}.tar"


def split_member(name: str) -> tuple[str, str]:
    """'key.mask.png' -> ('key', 'mask.png'): the key ends at the first dot, as in WebDataset."""
    base = os.path.basename(name)
    key, dot, ext = base.partition(".")
    return key, ext if dot else ""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def count_samples(path: Path) -> int:
    """Number of samples in a shard, from its tar headers only (member data is seeked over)."""
    keys = 0
    previous = None
    with tarfile.open(path, mode="r:") as tar:
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


def _warn_shared_groups(role_dir: Path, manifest: dict) -> None:
    """Warn when a sibling role folder shares a group (patient, volume) with this one: leakage."""
    if not manifest.get("groups"):
        return
    for role in ROLES:
        sibling = role_dir.parent / role / MANIFEST
        if role == manifest["role"] or not sibling.is_file():
            continue
        try:
            other = list(json.loads(sibling.read_text()).get("groups") or [])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError):
            continue  # that role's own open reports its manifest
        for problem in shared_groups({manifest["role"]: manifest["groups"], role: other}):
            warnings.warn(f"LEAKAGE in {role_dir.parent}: {problem}; the same patient or volume in training "
                          "and evaluation inflates every metric. Rebuild the roles in one call with --split, "
                          "which assigns whole groups to roles", stacklevel=4)


def sample_origins(role_dir: str | os.PathLike) -> dict[str, dict]:
    """key -> the sample's json field (its origin, with ``group`` where the builder gave one)."""
    role_dir = Path(role_dir)
    manifest = json.loads((role_dir / MANIFEST).read_text())
    out: dict[str, dict] = {}
    for shard in manifest["shards"]:
        with tarfile.open(role_dir / shard["name"], mode="r:") as tar:
            for member in tar:
                key, ext = split_member(member.name)
                if ext == "json" and member.isreg():
                    try:
                        out[key] = json.loads(tar.extractfile(member).read().decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise DataError(f"{role_dir / shard['name']}: sample {key!r}: unreadable json ({exc})") from None
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
) -> dict:
    """Read ``role_dir/manifest.json`` and check the shards against it.

    Checks: the manifest exists and is well formed; every listed shard exists with the listed byte
    size; with ``verify="count"`` (default) also its sample count (tar headers only), with
    ``verify="sha256"`` also its hash; the image size and channels equal the ones given.
    Raises DataError naming the file and what differs.
    """
    manifest, damaged = _open_role(role_dir, image_size=image_size, channels=channels, verify=verify)
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
) -> dict:
    """read_manifest for the readers: with skip_corrupt a damaged shard (wrong size, count or
    hash) is a warning, and its missing samples are counted as skipped when read."""
    manifest, damaged = _open_role(role_dir, image_size=image_size, channels=channels, verify=verify)
    if damaged and not skip_corrupt:
        raise DataError(damaged[0] + " (skip_corrupt=True reads what is left and counts the rest as skipped)")
    for problem in damaged:
        warnings.warn(problem + "; skip_corrupt is on: its unreadable samples will be skipped and counted", stacklevel=3)
    return manifest


def _open_role(role_dir, *, image_size, channels, verify) -> tuple[dict, list[str]]:
    if verify not in VERIFY_LEVELS:
        raise DataError(f"verify={verify!r} is not one of {', '.join(VERIFY_LEVELS)}")
    role_dir = Path(role_dir)
    path = role_dir / MANIFEST
    if not role_dir.is_dir():
        raise DataError(f"{role_dir}: no such shard folder; build it with `python shards/build.py`")
    if not path.is_file():
        raise DataError(f"{path} not found: {role_dir} is not a shard folder written by `python shards/build.py`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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

    _warn_shared_groups(role_dir, manifest)
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


def _check_fields(path: Path, obj: dict, required: dict[str, Any], prefix: str = "") -> None:
    for name, kind in required.items():
        if name not in obj:
            raise DataError(f"{path}: field {prefix}{name} is missing")
        value = obj[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"{path}: field {prefix}{name} should be {kind.__name__}, found {value!r}")


def verify_roles(folder: str | os.PathLike) -> list[tuple[Path, Optional[dict], list[str]]]:
    """Check every shard of a role folder, or of each role under a data root, at verify="sha256":
    [(role folder, manifest or None, problems)], one entry per role found."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        role_dirs = [folder]
    else:
        role_dirs = [folder / r for r in ROLES if (folder / r / MANIFEST).is_file()]
        if not role_dirs:
            raise DataError(f"{folder}: neither a role folder (no {MANIFEST}) nor a data root with any of "
                            f"{', '.join(ROLES)} in it")
    out = []
    for role_dir in role_dirs:
        try:
            manifest, damaged = _open_role(role_dir, image_size=None, channels=None, verify="sha256")
        except DataError as exc:   # unreadable manifest, missing shard: reported per role, the others go on
            out.append((role_dir, None, [str(exc)]))
            continue
        out.append((role_dir, manifest, damaged))
    return out
