"""Write samples into role folders of WebDataset shards plus manifest.json, all or nothing.

Every role is written into a temporary folder next to its target (``.healthy.partial-*``), each
shard under a temporary name renamed once complete; the folders are renamed into place only after
every role of the build succeeded, so a failed build leaves no half-written output.

``upload_roles`` copies a build to object storage, each role's manifest after all its shards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import webdataset as wds

from .images import encode_png
from .manifest import (FORMAT, MANIFEST, ROLES, DataError, read_manifest, role_exists, sha256_file, shard_name,
                       shared_groups)
from .storage import FieldError, Storage, check_location, is_url, join

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # no dots (WebDataset splits the key at the first dot)


@dataclass
class Sample:
    key: str                          # unique and stable within the build, [A-Za-z0-9_-]
    image: np.ndarray                 # (C, H, W) uint8 or uint16
    label: Optional[int] = None       # 0 healthy, 1 anomalous, None unknown
    mask: Optional[np.ndarray] = None  # (H, W) {0, 1}, ground truth where known
    origin: dict = field(default_factory=dict)  # written as the json field
    group: Optional[str] = None       # patient or volume: no group may appear in two roles


@dataclass
class RoleSpec:
    samples: Iterable[Sample]
    info: dict = field(default_factory=dict)  # extra manifest entries for this role


@dataclass(frozen=True)
class WriteSpec:
    """How a build writes its roles, fixed once per build: the images (``image_size``,
    ``channels``, ``bit_depth`` 8 or 16), what each manifest records of the build (``source``,
    ``seed``, ``command``), the shard limits (``maxcount`` samples, ``maxsize`` bytes) and whether
    existing role folders are replaced (``overwrite``)."""

    image_size: int
    channels: int
    bit_depth: int
    source: dict
    seed: Optional[int]
    command: str
    maxcount: int = 1000
    maxsize: int = 1_000_000_000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.maxcount < 1:
            raise DataError(f"maxcount must be at least 1, not {self.maxcount}")
        if self.maxsize < 1:
            raise DataError(f"maxsize must be at least 1 byte, not {self.maxsize}")


def write_roles(out_root: str | os.PathLike, roles: Mapping[str, RoleSpec], spec: WriteSpec) -> dict[str, dict]:
    """Write each role to ``out_root/<role>/``; returns the manifests by role."""
    out_root = Path(out_root)
    for role in roles:
        if role not in ROLES:
            raise DataError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if (out_root / role).exists() and not spec.overwrite:
            raise FieldError("{path} already exists; remove it, or pass {overwrite=True}", path=out_root / role)
    created = not out_root.exists()
    out_root.mkdir(parents=True, exist_ok=True)

    staged: dict[str, Path] = {}
    manifests: dict[str, dict] = {}
    seen_keys: set[str] = set()
    writer = None
    try:
        for role, role_spec in roles.items():
            staged[role] = Path(tempfile.mkdtemp(prefix=f".{role}.partial-", dir=out_root))
            os.chmod(staged[role], 0o777 & ~_umask())  # mkdtemp makes 0700; shards are shared data
            writer = _RoleWriter(staged[role], role, spec, seen_keys)
            for sample in role_spec.samples:
                writer.add(sample)
            manifest = writer.finish()
            manifest.update(source=spec.source, seed=spec.seed, command=spec.command, **role_spec.info)
            (staged[role] / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            manifests[role] = manifest
        shared = shared_groups({role: m.get("groups", []) for role, m in manifests.items()})
        if shared:
            raise DataError(f"groups in two roles would leak between training and test: {shared[0]}")
        for role, path in staged.items():
            _replace(path, out_root / role)
    except OSError as exc:   # a full disk, a file-size limit, a folder that became unwritable
        target = out_root / role / writer.name if writer is not None and writer.name else out_root
        raise OSError(exc.errno, f"could not write {exc.filename or target}: {exc.strerror or exc}; "
                                 "the partial output was removed") from None
    finally:
        if writer is not None:
            writer.abort()
        for path in staged.values():
            shutil.rmtree(path, ignore_errors=True)
        if created and not any(out_root.iterdir()):
            out_root.rmdir()  # a failed build leaves nothing behind, not even the folder it made
    return manifests


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(staged: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / target.name)
    os.rename(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _RoleWriter:
    """Rotates shards by sample count and byte size; checks each sample against the role."""

    def __init__(self, folder: Path, role: str, spec: WriteSpec, seen_keys: set[str]):
        self.folder, self.role = folder, role
        self.shape = (spec.channels, spec.image_size, spec.image_size)
        self.dtype = {8: np.uint8, 16: np.uint16}.get(spec.bit_depth)
        if self.dtype is None:
            raise DataError(f"bit depth must be 8 or 16, not {spec.bit_depth}")
        self.image_size, self.channels, self.bit_depth = spec.image_size, spec.channels, spec.bit_depth
        self.maxcount, self.maxsize = spec.maxcount, spec.maxsize
        self.seen_keys = seen_keys
        self.shards: list[dict] = []
        self.labels: Counter = Counter()
        self.masks = 0
        self.groups: set[str] = set()
        self.name: Optional[str] = None   # the shard being written
        self._tar = None

    def add(self, sample: Sample) -> None:
        record = self._encode(sample)
        size = sum(512 + -(-len(v) // 512) * 512 for k, v in record.items() if k != "__key__")
        if self._tar is not None and (self._count >= self.maxcount or self._bytes + size > self.maxsize):
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        self._tar.write(record)
        self._count += 1
        self._bytes += size
        self.labels["unknown" if sample.label is None or self.role == "mixed" else str(sample.label)] += 1
        self.masks += sample.mask is not None
        if sample.group is not None:
            self.groups.add(sample.group)

    def finish(self) -> dict:
        if self._tar is not None:
            self._close_shard()
        if not self.shards:
            raise DataError(f"role {self.role}: no samples to write")
        grouped = {"groups": sorted(self.groups)} if self.groups else {}
        return {
            "format": FORMAT,
            "role": self.role,
            "samples": sum(s["samples"] for s in self.shards),
            "labels": dict(sorted(self.labels.items())),
            "masks": self.masks,
            "image_size": self.image_size,
            "channels": self.channels,
            "bit_depth": self.bit_depth,
            "fields": {
                "png": "image, lossless PNG (16-bit images as 16-bit PNG)",
                "cls": "label as ascii 0/1 (absent in the mixed role)",
                "mask.png": "ground-truth mask, 8-bit PNG 0/255 (only where known)",
                "json": "origin of the sample",
            },
            "shards": self.shards,
            **grouped,
        }

    def abort(self) -> None:
        """Close an open shard without keeping it (the staging folder is removed anyway). Closing
        writes the end-of-archive blocks, which fails again on a full disk: that is ignored here."""
        if self._tar is not None:
            tar, self._tar = self._tar, None
            try:
                tar.close()
            except OSError:
                pass

    def _encode(self, sample: Sample) -> dict:
        where = f"role {self.role}, key {sample.key!r}"
        if not KEY_PATTERN.match(sample.key):
            raise DataError(f"{where}: keys may hold only letters, digits, '_' and '-'")
        if sample.key in self.seen_keys:
            raise DataError(f"{where}: duplicate key")
        self.seen_keys.add(sample.key)
        image = sample.image
        if image.shape != self.shape or image.dtype != self.dtype:
            raise DataError(f"{where}: image is {image.shape} {image.dtype}, the role holds {self.shape} {np.dtype(self.dtype)}")
        record: dict[str, Any] = {"__key__": sample.key, "png": encode_png(image)}
        if self.role == "mixed":
            pass  # unannotated by definition: no cls even where the truth is known
        elif sample.label in (0, 1):
            if self.role == "healthy" and sample.label != 0:
                raise DataError(f"{where}: the healthy role takes label 0 only, found {sample.label}")
            record["cls"] = str(sample.label).encode("ascii")
        elif self.role == "healthy" and sample.label is None:
            record["cls"] = b"0"
        else:
            raise DataError(f"{where}: the {self.role} role needs a label 0 or 1, found {sample.label!r}")
        if sample.mask is not None:
            if sample.mask.shape != self.shape[1:]:
                raise DataError(f"{where}: mask is {sample.mask.shape}, images are {self.shape[1:]}")
            record["mask.png"] = encode_png((np.asarray(sample.mask) > 0).astype(np.uint8)[None] * 255)
        origin = sample.origin if sample.group is None else {**sample.origin, "group": sample.group}
        record["json"] = json.dumps(origin, sort_keys=True).encode("utf-8")
        return record

    def _open_shard(self) -> None:
        self.name = shard_name(self.role, len(self.shards))
        self._partial = self.folder / (self.name + ".partial")
        # mtime 0 and fixed owner: the same build gives byte-identical shards (same sha256).
        self._tar = wds.TarWriter(str(self._partial), encoder=False, mtime=0.0, user="a2b", group="a2b")
        self._count = 0
        self._bytes = 1024  # the end-of-archive blocks

    def _close_shard(self) -> None:
        self._tar.close()
        self._tar = None
        final = self.folder / self.name
        os.replace(self._partial, final)
        self.shards.append(
            {"name": self.name, "samples": self._count, "bytes": final.stat().st_size, "sha256": sha256_file(final)}
        )


# Uploading a build to object storage.

def check_upload_target(url: str, roles: Iterable[str], *, overwrite: bool, storage: Storage) -> dict[str, bool]:
    """Whether each role is already at ``url`` (role -> True); an error when one is and not
    ``overwrite``, or when ``url`` cannot take uploads. Called before a build, and by upload_roles."""
    check_location(url, "upload target")
    if not is_url(url):
        raise FieldError("{url=}: not a URL; upload to s3://bucket/prefix or gs://bucket/prefix (a local "
                         "{@out_root} is written in place)", url=url)
    if url.lower().startswith(("http://", "https://")):
        raise DataError(f"{url}: an HTTP server cannot take uploads through fsspec; copy the built folder to "
                        "the folder the server serves, or upload to s3:// or gs://")
    present = {role: role_exists(url, role, storage) for role in roles}
    for role, there in present.items():
        if there and not overwrite:
            raise FieldError("{path} already holds a {manifest}; pass {overwrite=True} to replace it",
                             path=join(url, role), manifest=MANIFEST)
    return present


def upload_roles(local_root: str | os.PathLike, url: str, *, roles: Optional[Iterable[str]] = None,
                 overwrite: bool = False, storage: Optional[Storage] = None,
                 report: Callable[[str], None] = lambda line: None) -> dict[str, dict]:
    """Copy role folders of ``local_root`` to ``url/<role>/``: every shard first (in parallel, each
    checked by its size on the server), the manifest last, so that a reader never finds a manifest
    whose shards are not all there. Each local role is checked against its manifest (sizes and
    sample counts) before anything is sent. Returns the manifests by role."""
    storage = storage or Storage()
    local_root = Path(local_root)
    names = list(roles) if roles is not None else [r for r in ROLES if (local_root / r / MANIFEST).is_file()]
    if not names:
        raise DataError(f"{local_root}: no role folder with a {MANIFEST} in it ({', '.join(ROLES)})")
    manifests = {role: read_manifest(local_root / role) for role in names}   # damaged: nothing is sent
    present = check_upload_target(url, names, overwrite=overwrite, storage=storage)
    for role, manifest in manifests.items():
        target = join(url, role)
        if present[role]:   # readers stop seeing the old role before its shards change
            storage.remove(join(target, MANIFEST))
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda shard: storage.upload(local_root / role / shard["name"], join(target, shard["name"])),
                          manifest["shards"]))
        urls = [join(target, s["name"]) for s in manifest["shards"]]
        for dest, shard, size in zip(urls, manifest["shards"], storage.sizes(urls)):
            if size != shard["bytes"]:
                raise DataError(f"{dest}: {size} bytes on the server after the upload, {shard['bytes']} here; "
                                f"the manifest was not uploaded")
        storage.write_bytes(join(target, MANIFEST), (local_root / role / MANIFEST).read_bytes())
        report(f"{target}: {len(manifest['shards'])} shards and {MANIFEST} uploaded "
               f"({sum(s['bytes'] for s in manifest['shards']) / 2**20:.1f} MiB)")
    return manifests
