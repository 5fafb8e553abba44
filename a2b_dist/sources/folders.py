"""Samples from a folder of image files (plus a labels CSV) or from an .npz of arrays (MedMNIST)."""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from a2b_dist.data.images import IMAGE_SUFFIXES, image_bit_depth, load_image, load_mask, prepare_image
from a2b_dist.data.manifest import ROLES
from a2b_dist.data.storage import FieldError
from a2b_dist.data.write import RoleSpec, Sample


def find_files(root: Path, suffixes: tuple[str, ...]) -> list[str]:
    """Relative POSIX paths of the files under root (recursive) whose name ends in one of
    ``suffixes`` (any case), sorted."""
    found = [p for p in Path(root).rglob("*") if p.is_file() and p.name.lower().endswith(suffixes)]
    return sorted(p.relative_to(root).as_posix() for p in found)


def find_images(images_dir: Path) -> list[str]:
    """Relative POSIX paths of every PNG/JPEG/TIFF under images_dir, sorted."""
    return find_files(images_dir, IMAGE_SUFFIXES)


def path_key(relative: str) -> str:
    """A stable, unique key from a relative path: readable stem plus 8 hex of the path's sha1."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit(".", 1)[0]).strip("_")[-80:]
    return f"{stem}-{hashlib.sha1(relative.encode('utf-8')).hexdigest()[:8]}"


def folder_role(
    images_dir: str | Path,
    *,
    role: str,
    size: int,
    channels: int,
    labels_csv: Optional[str | Path] = None,
    seed: int = 0,
) -> tuple[RoleSpec, dict, int]:
    """One role from image files: (samples, source description, bit depth 8 or 16).

    Without a CSV every image found recursively is a sample (healthy and mixed only); with one,
    the CSV's rows are the samples. Sample order is shuffled by the seed so that each shard is a
    random subset (a training batch is drawn from few shards at a time).
    """
    images_dir = Path(images_dir)
    if role not in ROLES:
        raise FieldError("{role=!r} is not one of {roles}", role=role, roles=", ".join(ROLES))
    if not images_dir.is_dir():
        raise FieldError("{images_dir=}: no such folder", images_dir=images_dir)
    if labels_csv is None:
        if role in ("val", "test"):
            raise FieldError("{role=} needs {labels_csv=CSV} with columns path,label[,mask]", role=role)
        rows = [(rel, None, None) for rel in find_images(images_dir)]
        if not rows:
            raise FieldError("{images_dir=}: no PNG, JPEG or TIFF files found ({suffixes})", images_dir=images_dir,
                             suffixes=", ".join(IMAGE_SUFFIXES))
    else:
        rows = _read_labels(Path(labels_csv), images_dir, role)

    depths = {image_bit_depth(images_dir / rel) for rel, _, _ in rows}
    bit_depth = max(depths)
    if bit_depth == 16 and channels == 3:
        raise FieldError("{images_dir=} holds 16-bit images, which can be stored with {channels=1} only",
                         images_dir=images_dir)
    order = np.random.default_rng(seed).permutation(len(rows))
    samples = _folder_samples(images_dir, [rows[i] for i in order], role, size, channels, bit_depth)
    source = {
        "kind": "folder",
        "images": str(images_dir.resolve()),
        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv else None,
        "files": len(rows),
        "source_bit_depths": sorted(depths),
        "resize": "shorter side to size (bilinear, antialiased), centre crop; masks nearest",
    }
    return RoleSpec(samples), source, bit_depth


def _folder_samples(images_dir, rows, role, size, channels, bit_depth) -> Iterator[Sample]:
    for rel, label, mask_rel in rows:
        image = load_image(images_dir / rel, size, channels)
        if bit_depth == 16 and image.dtype == np.uint8:
            image = image.astype(np.uint16) * 257  # exact: v/255 == 257v/65535, same tensor values
        origin = {"path": rel}
        if label is not None:
            origin["label"] = label
        if mask_rel:
            origin["mask"] = mask_rel
        yield Sample(
            key=path_key(rel),
            image=image,
            label=None if role == "mixed" else label,
            mask=load_mask(images_dir / mask_rel, size) if mask_rel else None,
            origin=origin,
        )


def read_label_csv(path: Path, root: Path, group_column: Optional[str] = None
                   ) -> list[tuple[int, str, Optional[int], Optional[str], Optional[str]]]:
    """Rows of a labels CSV (path,label[,mask][,GROUP]) as (line, path, label, group, mask).

    Paths are relative to ``root`` and must exist; a label is 0, 1 or empty (None: unknown); with
    ``group_column`` every row needs its group. Callers add their own rules (roles, groups).
    """
    if not path.is_file():
        raise FieldError("{labels_csv=}: no such file", labels_csv=path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "path" not in columns or "label" not in columns:
            raise FieldError("{labels_csv=}: needs a header with columns path,label[,mask][,GROUP]; found {columns}",
                             labels_csv=path, columns=columns)
        if group_column and group_column not in columns:
            raise FieldError("{group_column=!r}: not a column of {path} ({columns})", group_column=group_column,
                             path=path, columns=", ".join(columns))
        rows, seen = [], set()
        for line, row in enumerate(reader, start=2):
            where = {"labels_csv": path, "line": line}   # the row's place: "{labels_csv=}, line {line}"
            rel = (row["path"] or "").strip()
            if not rel or not (root / rel).is_file():
                raise FieldError("{labels_csv=}, line {line}: file {rel!r} not found under {root}", **where,
                                 rel=rel, root=root)
            if rel in seen:
                raise FieldError("{labels_csv=}, line {line}: {rel!r} is listed twice", **where, rel=rel)
            seen.add(rel)
            text = (row["label"] or "").strip()
            if text not in ("0", "1", ""):
                raise FieldError("{labels_csv=}, line {line}: label {text!r} should be 0 (healthy), 1 (anomalous) or "
                                 "empty (unknown)", **where, text=text)
            group = (row[group_column] or "").strip() if group_column else None
            if group_column and not group:
                raise FieldError("{labels_csv=}, line {line}: the {column} column is empty; every image needs "
                                 "its group", **where, column=group_column)
            mask = (row.get("mask") or "").strip() or None
            if mask and not (root / mask).is_file():
                raise FieldError("{labels_csv=}, line {line}: mask {mask!r} not found under {root}", **where, mask=mask,
                                 root=root)
            rows.append((line, rel, int(text) if text else None, group, mask))
    if not rows:
        raise FieldError("{labels_csv=}: no rows", labels_csv=path)
    return rows


def _read_labels(path: Path, images_dir: Path, role: str) -> list[tuple[str, Optional[int], Optional[str]]]:
    """The labels CSV of a `folder` build, with the role's rules: unknown labels only in mixed,
    no anomalous image in healthy."""
    rows = []
    for line, rel, label, _, mask in read_label_csv(path, images_dir):
        if label is None and role != "mixed":
            raise FieldError("{labels_csv=}, line {line}: label is empty; the {role} role needs 0 (healthy) or 1 "
                             "(anomalous)", labels_csv=path, line=line, role=role)
        if role == "healthy" and label == 1:
            raise FieldError("{labels_csv=}, line {line}: the healthy role takes healthy images only, found label 1",
                             labels_csv=path, line=line)
        rows.append((rel, label, mask))
    return rows


def parse_split(text: str, total: int) -> dict[str, int]:
    """'healthy=0.4,mixed=0.4,val=100,test=0.1' -> counts; a value with a dot is a fraction of total."""
    counts = {}
    for part in text.split(","):
        role, eq, value = part.strip().partition("=")
        if not eq or role not in ROLES or role in counts:
            raise FieldError("{split=!r}: expected role=count or role=fraction for roles {roles}, each once",
                             split=text, roles=", ".join(ROLES))
        try:
            number = float(value) if "." in value else int(value)
        except ValueError:
            raise FieldError("{split=!r}: {value!r} for {role} is neither a count nor a fraction", split=text,
                             value=value, role=role) from None
        if number < 0 or (isinstance(number, float) and number > 1):
            raise FieldError("{split=!r}: {role}={value} must be a count >= 0 or a fraction in [0, 1]", split=text,
                             role=role, value=value)
        counts[role] = int(number * total) if isinstance(number, float) else number
    if sum(counts.values()) > total:
        raise FieldError("{split=!r} asks for {asked} samples, the file holds {total}", split=text,
                         asked=sum(counts.values()), total=total)
    return {role: n for role, n in counts.items() if n > 0}


def npz_roles(
    file: str | Path,
    *,
    images_key: str,
    labels_key: str,
    size: int,
    channels: int,
    split: str = "healthy=0.4,mixed=0.4,val=0.05,test=0.15",
    seed: int = 0,
) -> tuple[dict[str, RoleSpec], dict, int]:
    """Roles from arrays (MedMNIST layout): label 0 is healthy, any other label anomalous.

    The samples are shuffled by the seed; healthy takes the first label-0 samples it needs, then
    mixed, val and test take consecutive runs of the remaining shuffled samples, so they keep the
    file's anomaly rate. Counts or fractions (of all samples) come from ``split``.
    """
    file = Path(file)
    if not file.is_file():
        raise FieldError("{file=}: no such file", file=file)
    try:
        arrays = np.load(file, allow_pickle=False)  # never unpickle what a data file holds
    except (OSError, ValueError) as exc:
        raise FieldError("{file=}: not a readable .npz ({exc})", file=file, exc=exc) from None
    for argument, key in (("{images_key=!r}", images_key), ("{labels_key=!r}", labels_key)):
        if key not in arrays.files:
            raise FieldError(argument + ": not in {file}, which holds {keys}", images_key=images_key,
                             labels_key=labels_key, file=file, keys=", ".join(arrays.files))
    try:
        images, labels = arrays[images_key], arrays[labels_key]
    except (OSError, ValueError) as exc:  # object arrays would need unpickling: refused
        raise FieldError("{file=}: not readable without unpickling ({exc})", file=file, exc=exc) from None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise FieldError("{images_key=!r}: expected (N, H, W) or (N, H, W, C) with C 1 or 3, found {shape}",
                         images_key=images_key, shape=images.shape)
    if images.dtype not in (np.uint8, np.uint16):
        raise FieldError("{images_key=!r}: expected uint8 or uint16, found {dtype}", images_key=images_key,
                         dtype=images.dtype)
    if images.dtype == np.uint16 and channels == 3:
        raise FieldError("{images_key=!r} holds 16-bit images, which can be stored with {channels=1} only",
                         images_key=images_key)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise FieldError("{labels_key=!r}: expected {n} integer labels, found {dtype} {shape}", labels_key=labels_key,
                         n=len(images), dtype=labels.dtype, shape=labels.shape)

    counts = parse_split(split, len(images))
    order = np.random.default_rng(seed).permutation(len(images))
    normals = order[labels[order] == 0]
    need = counts.get("healthy", 0)
    if need > len(normals):
        raise FieldError("{@split} healthy={need}: the file holds only {normals} label-0 samples", need=need,
                         normals=len(normals))
    healthy = normals[:need]
    rest = order[~np.isin(order, healthy)]
    picked, start = {"healthy": healthy}, 0
    for role in ("mixed", "val", "test"):
        n = counts.get(role, 0)
        if start + n > len(rest):
            raise FieldError("{split=!r}: not enough samples left for {role}={n}", split=split, role=role, n=n)
        picked[role], start = rest[start : start + n], start + n
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", file.stem)
    roles = {
        role: RoleSpec(_npz_samples(images, labels, indices, role, size, channels, f"{stem}-{images_key}", file.name))
        for role, indices in picked.items()
        if len(indices)
    }
    source = {
        "kind": "npz",
        "file": str(file.resolve()),
        "images_key": images_key,
        "labels_key": labels_key,
        "split": split,
        "counts": {role: len(i) for role, i in picked.items() if len(i)},
        "labels": "0 is healthy, any other value anomalous (the original value is in each json)",
        "resize": "shorter side to size (bilinear, antialiased), centre crop",
    }
    return roles, source, 16 if images.dtype == np.uint16 else 8


def _npz_samples(images, labels, indices, role, size, channels, prefix, file_name) -> Iterator[Sample]:
    for index in indices:
        index = int(index)
        original = int(labels[index])
        yield Sample(
            key=re.sub(r"[^A-Za-z0-9_-]+", "_", f"{prefix}-{index:06d}"),
            image=prepare_image(images[index], size, channels),
            label=None if role == "mixed" else int(original != 0),
            origin={"file": file_name, "index": index, "label": original},
        )
