"""Medical inputs: DICOM images (pydicom) and NIfTI volumes (nibabel) -> samples with a group key.

The rules (shards/README.md, "dicom" and "nifti"):

DICOM, per file, in this order, all in float64 on the stored integers (16-bit data is never
narrowed before step 3):
1. modality values: ``v = stored * RescaleSlope + RescaleIntercept`` (1 and 0 when absent);
2. window: centre C and width W from ``window=(C, W)``, else the file's first WindowCenter and
   WindowWidth, else the image's own min..max; DICOM's linear VOI function (PS3.3 C.11.2.1.2.1)
   ``y = clip((v - (C - 0.5)) / (W - 1) + 0.5, 0, 1)``;
3. MONOCHROME1 (white is low) is inverted: ``y = 1 - y``;
4. stored as ``round(y * 65535)`` (16-bit, default) or ``round(y * 255)`` (``bit_depth=8``).

NIfTI, per volume: reoriented to the closest canonical (RAS) orientation, normalised by its own
percentiles ``y = clip((v - P_lo) / (P_hi - P_lo), 0, 1)`` (default P0.5 and P99.5), cut into
2-D slices along ``axis``; a slice is kept when at least ``min_foreground`` of its pixels have
``y > foreground_level`` (defaults 0.05 and 0.1: a threshold on the percentile scale of the volume
itself, not on a data set's raw intensities).

Roles are assigned per group (DICOM: PatientID or a CSV column; NIfTI: the volume), so no group
appears in two roles.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from a2b_dist.data.images import prepare_image, prepare_mask
from a2b_dist.data.manifest import DataError
from a2b_dist.data.storage import FieldError
from a2b_dist.data.write import RoleSpec, Sample

from .folders import find_files, parse_split, path_key, read_label_csv

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Decoders pydicom needs for compressed pixel data (pydicom's own table of pixel data handlers).
_DECODERS = {
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "HTJ2K": "pylibjpeg pylibjpeg-openjpeg",
    "RLE": "pylibjpeg pylibjpeg-rle",
}


def _require(module: str):
    """Import pydicom or nibabel, or say how to install it (the pins are in requirements.txt)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {'DICOM' if module == 'pydicom' else 'NIfTI'} files needs {module}: "
                        "install the extra with pip install 'a2b_dist[medical]'") from None


def voi_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2.1): modality values -> [0, 1] float64."""
    if width < 1:
        raise DataError(f"window width must be at least 1, not {width}")
    if width == 1:  # the standard's special case: a step at the centre
        return (values > centre - 0.5).astype(np.float64)
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def to_levels(unit: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0, 1] floats -> uint16 (x 65535) or uint8 (x 255), rounded to the nearest level."""
    if bit_depth not in (8, 16):
        raise DataError(f"bit depth must be 8 or 16, not {bit_depth}")
    top, dtype = (65535, np.uint16) if bit_depth == 16 else (255, np.uint8)
    return np.rint(np.clip(unit, 0.0, 1.0) * top).astype(dtype)


def parse_window(text: Optional[str]) -> Optional[tuple[float, float]]:
    """'40,400' -> (centre 40.0, width 400.0); None stays None."""
    if text is None:
        return None
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise FieldError("{window=!r}: expected CENTRE,WIDTH, e.g. 40,400", window=text) from None
    if width < 1:
        raise FieldError("{window=!r}: the width must be at least 1", window=text)
    return centre, width


def _decoder_hint(syntax) -> str:
    name = syntax.name
    for prefix in ("JPEG 2000", "JPEG-LS", "HTJ2K", "RLE", "JPEG"):  # most specific first
        if prefix in name:
            return _DECODERS[prefix]
    return "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


class DicomSkip(DataError):
    """A file the dicom builder skips by default and stops at with ``strict=True``; ``reason`` is the
    short category counted in the build's summary, the message the whole story."""

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.reason = reason


COLOUR = ("PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


def read_dicom(path: Path, window: Optional[tuple[float, float]] = None, bit_depth: int = 16) -> tuple[np.ndarray, dict]:
    """One DICOM file -> ((H, W) uint16/uint8 by the module's rule, header facts for the json).

    Files without the DICM preamble are read too (pydicom's ``force=True``). Colour images
    (PALETTE COLOR through its lookup table, RGB, YBR) become grey by luminance, scaled by their
    largest level; the window does not apply to them. What cannot become one grey frame raises
    DicomSkip naming the file and why (no pixel data, several frames, a missing decoder, damage).
    """
    pydicom = _require("pydicom")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many kinds on a file that is not DICOM or is cut short
        raise DicomSkip(path, "not readable as DICOM", f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if "PixelData" not in ds:
        kind = str(ds.get("Modality", "") or "") or getattr(ds.get("SOPClassUID"), "name", "") or "no SOP class"
        raise DicomSkip(path, "no image (no PixelData)", f"the DICOM file holds no image (no PixelData; {kind})")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (ValueError, TypeError) as exc:
        raise DicomSkip(path, "unreadable header values", f"a header value does not parse ({exc})") from None
    if frames > 1:
        raise DicomSkip(path, "multi-frame", f"holds {frames} frames; the dicom builder takes single-frame images "
                                             "(write the frames as files, or use the nifti builder for volumes)")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") + COLOUR:
        raise DicomSkip(path, f"unsupported photometric {photometric}",
                        f"photometric interpretation {photometric} is not supported (MONOCHROME1/2, "
                        f"{', '.join(COLOUR)})")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by handler
        text = str(exc).lower()
        if syntax is not None and syntax.is_compressed and ("missing" in text or "does not support" in text):
            raise DicomSkip(path, f"needs a decoder for {syntax.name}",
                            f"pixel data is compressed as {syntax.name} ({syntax}), which pydicom decodes only "
                            f"with an extra package: pip install {_decoder_hint(syntax)}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DicomSkip(path, "pixel data does not decode",
                        f"cannot decode the pixel data ({type(exc).__name__}: {first[:200]})") from None

    if photometric in COLOUR:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            try:
                rgb = apply_color_lut(stored, ds)
            except Exception as exc:
                raise DicomSkip(path, "palette does not apply", f"its colour palette cannot be applied ({exc})") from None
            top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind == "u" else float(rgb.max() or 1)
        else:
            rgb = stored   # pydicom returns YBR data converted to RGB
            top = float(2 ** int(ds.get("BitsStored", stored.dtype.itemsize * 8)) - 1)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DicomSkip(path, "unexpected pixel layout", f"{photometric} pixels of shape {rgb.shape}, expected (H, W, 3)")
        from a2b_dist.data.images import LUMA

        unit = np.clip((rgb.astype(np.float64) @ LUMA) / top, 0.0, 1.0)
        window, source = None, f"colour: {photometric} to grey by luminance (0.299 R + 0.587 G + 0.114 B) / {top:g}"
    else:
        if stored.ndim != 2:
            raise DicomSkip(path, "unexpected pixel layout", f"{photometric} pixels of shape {stored.shape}, expected (H, W)")
        # 1. Modality values (float64 holds every 16-bit value exactly).
        values = stored.astype(np.float64) * slope + intercept
        # 2. Window: the command line, else the file, else the image's range.
        source = "command line"
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            try:
                window, source = (_first(ds.WindowCenter), _first(ds.WindowWidth)), "file"
            except (ValueError, TypeError):
                window = None
            if window is not None and window[1] < 1:
                window = None   # a width below 1 is not a window (seen in exports); use the image's range
        if window is None:
            lo, hi = float(values.min()), float(values.max())
            window, source = ((lo + hi + 1) / 2, max(hi - lo + 1, 1.0)), "image range"
        unit = voi_window(values, *window)
        # 3. MONOCHROME1 shows low values white: invert so that white is high, as in every other image.
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
    facts = {
        "patient": str(ds.get("PatientID", "") or "").strip(),
        "study": str(ds.get("StudyInstanceUID", "") or "").strip(),
        "photometric": photometric,
        "rescale": [slope, intercept],
        "window": [float(window[0]), float(window[1])] if window is not None else None,
        "window_from": source,
        "bits_stored": int(ds.get("BitsStored", stored.dtype.itemsize * 8) or 0),
    }
    return to_levels(unit, bit_depth), facts


def _first(value) -> float:
    """WindowCenter/WindowWidth may hold several windows: the first is the default one."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


# ---------------------------------------------------------------------------------------------
# Splits by group

def split_groups(groups: dict[str, list[Optional[int]]], split: str, seed: int) -> dict[str, list[str]]:
    """Assign whole groups to roles: group -> its samples' labels in, role -> groups out.

    ``split`` counts groups (``val=3``) or fractions of all groups (``mixed=0.4``). The groups are
    shuffled with the seed; healthy takes the first groups whose samples are all labelled 0 (or
    unlabelled, when no labels were given). Mixed, val and test, in this order, then take the next
    groups of the shuffled rest, stratified: each takes round(n * r) groups holding an anomalous
    image, r being their share of the rest, and val or test of two groups or more at least one
    such group and one without. No group can land in two roles.
    """
    names = sorted(groups)
    counts = parse_split(split, len(names))
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    any_labels = any(label is not None for labels in groups.values() for label in labels)
    normal = [g for g in order if all(label == 0 or (label is None and not any_labels) for label in groups[g])]
    need = counts.get("healthy", 0)
    if need > len(normal):
        raise FieldError("{@split} healthy={need}: only {normal} groups have every image labelled 0", need=need,
                         normal=len(normal))
    picked = {"healthy": normal[:need]}
    taken = set(picked["healthy"])
    rest = [g for g in order if g not in taken]
    anomalous = [g for g in rest if any(label == 1 for label in groups[g])]
    others = [g for g in rest if g not in set(anomalous)]
    rate = len(anomalous) / len(rest) if rest else 0.0
    for role in ("mixed", "val", "test"):
        n = counts.get(role, 0)
        if n > len(anomalous) + len(others):
            raise FieldError("{split=!r}: not enough groups left for {role}={n}", split=split, role=role, n=n)
        k = round(n * rate)
        if role in ("val", "test") and n >= 2 and anomalous and others:
            k = min(max(k, 1), n - 1)  # both classes, so that the role's AUROC is defined
        k = max(min(k, len(anomalous)), n - len(others))
        picked[role] = anomalous[:k] + others[: n - k]
        anomalous, others = anomalous[k:], others[n - k :]
        if role in ("val", "test") and n and any(label is None for g in picked[role] for label in groups[g]):
            raise FieldError("{@split} {role}={n}: the {role} role needs a label for every image; pass "
                             "{labels_csv=CSV}", role=role, n=n)
    return {role: sorted(g) for role, g in picked.items() if g}


def _sample_order(items: list, seed: int) -> list:
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


# ---------------------------------------------------------------------------------------------
# DICOM folder -> roles

@dataclass
class _Row:
    rel: str
    label: Optional[int] = None
    group: Optional[str] = None
    mask: Optional[str] = None
    facts: dict = field(default_factory=dict)


def _read_csv(path: Path, root: Path, group_column: Optional[str]) -> list[_Row]:
    return [_Row(rel, label, group, mask) for _, rel, label, group, mask in read_label_csv(path, root, group_column)]


FALLBACKS = ("StudyInstanceUID", "file")   # the group of a file without PatientID, in this order


@dataclass
class DicomScan:
    """What the dicom builder found before writing: the files it skipped (with why), where each
    patient came from, and pydicom's warnings counted by message instead of printed one by one."""

    files: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, reason, message)
    groups_from: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)

    def reasons(self) -> dict[str, int]:
        """Skipped files per reason, most frequent first."""
        return dict(Counter(reason for _, reason, _ in self.skipped).most_common())

    def summary(self) -> list[str]:
        """Lines for the person who ran the build."""
        lines = []
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} of {self.files} files: "
                         + "; ".join(f"{n} {r}" for r, n in self.reasons().items()))
        fallback = {k: v for k, v in self.groups_from.items() if k in FALLBACKS}
        if fallback:
            lines.append("no PatientID in " + ", ".join(f"{n} files (grouped by {k})" for k, n in fallback.items())
                         + "; pass --labels CSV --group-column NAME to give their patients")
        if self.warnings:
            top = sorted(self.warnings.items(), key=lambda x: -x[1])[:3]
            lines.append(f"pydicom warned {sum(self.warnings.values())} times ({len(self.warnings)} kinds; most often: "
                         + "; ".join(f"{n}x {m}" for m, n in top) + ")")
        return lines


@contextmanager
def _counted_warnings(counts: dict[str, int]) -> Iterator[None]:
    """pydicom's warnings counted by their first line instead of printed once per file (its logger
    has a NullHandler and prints nothing by itself)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in seen:
                text = str(w.message).strip()
                key = text.splitlines()[0][:120] if text else w.category.__name__
                counts[key] = counts.get(key, 0) + 1


def dicom_roles(
    images_dir: str | Path,
    *,
    size: int,
    channels: int,
    split: str,
    labels_csv: Optional[str | Path] = None,
    group_column: Optional[str] = None,
    window: Optional[tuple[float, float]] = None,
    bit_depth: int = 16,
    seed: int = 0,
    strict: bool = False,
) -> tuple[dict[str, RoleSpec], dict, int, DicomScan]:
    """Roles from a folder of DICOM files, split by patient: (role specs, source, bit depth, scan).

    Every file is read once before the split (headers and pixels): what cannot become one grey
    frame is skipped and listed in the scan (``strict``: the first such file is an error). The
    patient is the CSV's group column, else PatientID, else (not ``strict``) StudyInstanceUID,
    else the file itself, each fallback counted in the scan.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FieldError("{images_dir=}: no such folder", images_dir=images_dir)
    if bit_depth == 16 and channels == 3:
        raise FieldError("16-bit images can be stored with {channels=1} only; pass {bit_depth=8} for 3 channels")
    if labels_csv is None:
        rows = [_Row(rel) for rel in find_files(images_dir, DICOM_SUFFIXES)]
        if not rows:
            raise FieldError("{images_dir=}: no DICOM files found ({suffixes})", images_dir=images_dir,
                             suffixes=", ".join(DICOM_SUFFIXES))
    else:
        rows = _read_csv(Path(labels_csv), images_dir, group_column)
    _require("pydicom")

    # Read every file once: skip (or, strict, stop at) what is not one grey frame; find each patient.
    scan = DicomScan(files=len(rows))
    readable = []
    with _counted_warnings(scan.warnings):
        for row in rows:
            try:
                _, facts = read_dicom(images_dir / row.rel, window, bit_depth)
            except DicomSkip as exc:
                if strict:
                    raise FieldError("{skip} ({strict=True} stops at the first file that is skipped otherwise)",
                                     skip=exc) from None
                scan.skipped.append((row.rel, exc.reason, str(exc)))
                continue
            if row.group is None:
                if facts["patient"]:
                    row.group, origin = facts["patient"], "PatientID"
                elif strict:
                    raise FieldError("{file}: no PatientID in the header; give each image's patient in a CSV column "
                                     "with {labels_csv=CSV} {group_column=NAME} ({strict=True}; without it such "
                                     "files are grouped by study)", file=images_dir / row.rel)
                elif facts["study"]:
                    row.group, origin = f"study-{facts['study']}", "StudyInstanceUID"
                else:
                    row.group, origin = f"file-{row.rel}", "file"
            else:
                origin = group_column or "CSV"
            scan.groups_from[origin] = scan.groups_from.get(origin, 0) + 1
            readable.append(row)
    if not readable:
        raise FieldError("{images_dir=}: none of the {n} DICOM files is a readable single-frame image ({why})",
                         images_dir=images_dir, n=len(rows),
                         why="; ".join(sorted({m for _, _, m in scan.skipped}))[:600])
    rows = readable
    by_group: dict[str, list[Optional[int]]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row.label)
    assigned = split_groups(by_group, split, seed)

    roles = {}
    for role, groups in assigned.items():
        members = set(groups)
        chosen = _sample_order([r for r in rows if r.group in members], seed)
        roles[role] = RoleSpec(_dicom_samples(images_dir, chosen, role, size, channels, window, bit_depth),
                               info={"group_by": "patient"})
    source = {
        "kind": "dicom",
        "images": str(images_dir.resolve()),
        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv else None,
        "group_column": group_column or "PatientID (DICOM header)",
        "files": scan.files,
        "skipped": {"count": len(scan.skipped), "reasons": scan.reasons(), "list": SKIPPED_LIST if scan.skipped else None},
        "groups_from": scan.groups_from,
        "pydicom_warnings": sum(scan.warnings.values()),
        "patients": len(by_group),
        "split": split,
        "counts": {role: {"groups": len(g), "images": sum(len(by_group[x]) for x in g)} for role, g in assigned.items()},
        "window": list(window) if window else "the file's first WindowCenter/WindowWidth, else the image's range",
        "conversion": "stored * RescaleSlope + RescaleIntercept (float64); DICOM linear VOI window to [0, 1]; "
                      f"MONOCHROME1 inverted; colour (palette, RGB, YBR) to grey by luminance; "
                      f"x {65535 if bit_depth == 16 else 255}, rounded",
        "resize": "shorter side to size (bilinear, antialiased), centre crop; masks nearest",
    }
    return roles, source, bit_depth, scan


SKIPPED_LIST = "dicom-skipped.csv"   # written beside the role folders: path,reason,message


def write_skipped(out_root: Path, scan: DicomScan) -> Optional[Path]:
    """OUT/dicom-skipped.csv (through a temporary name), or nothing when no file was skipped."""
    import csv
    import io

    from a2b_dist.files import write_atomic

    target = Path(out_root) / SKIPPED_LIST
    if not scan.skipped:
        target.unlink(missing_ok=True)   # a list from an earlier build of this folder is not this build's
        return None
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "reason", "message"])
    writer.writerows(scan.skipped)
    return write_atomic(target, buf.getvalue())


def _dicom_samples(images_dir, rows, role, size, channels, window, bit_depth) -> Iterator[Sample]:
    import warnings

    from a2b_dist.data.images import load_mask

    for row in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the scan counted them already
            plane, facts = read_dicom(images_dir / row.rel, window, bit_depth)
        origin = {"path": row.rel, "patient": row.group,
                  **{k: v for k, v in facts.items() if k not in ("patient", "study")}}
        if row.label is not None:
            origin["label"] = row.label
        if row.mask:
            origin["mask"] = row.mask
        yield Sample(
            key=path_key(row.rel),
            image=prepare_image(plane, size, channels),
            label=None if role == "mixed" else row.label,
            mask=load_mask(images_dir / row.mask, size) if row.mask else None,
            origin=origin,
            group=row.group,
        )


# ---------------------------------------------------------------------------------------------
# Image files listed in a CSV with a group column -> roles (ChestX-ray8, COVIDx)

def listed_roles(
    images_dir: str | Path,
    *,
    labels_csv: str | Path,
    group_column: str,
    size: int,
    channels: int,
    split: str,
    seed: int = 0,
) -> tuple[dict[str, RoleSpec], dict, int]:
    """Roles from PNG/JPEG/TIFF files listed in a CSV (path,label,GROUP[,mask]), split by group.

    Images follow the ``folder`` rule (shards/README.md, Preprocessing): the role set is 16-bit when
    any listed file is, 8-bit files then scaled by 257.
    """
    from a2b_dist.data.images import image_bit_depth, load_image, load_mask

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FieldError("{images_dir=}: no such folder", images_dir=images_dir)
    rows = _read_csv(Path(labels_csv), images_dir, group_column)
    by_group: dict[str, list[Optional[int]]] = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row.label)
    assigned = split_groups(by_group, split, seed)
    depths = {image_bit_depth(images_dir / row.rel) for row in rows}
    bit_depth = max(depths)
    if bit_depth == 16 and channels == 3:
        raise FieldError("{images_dir=} holds 16-bit images, which can be stored with {channels=1} only",
                         images_dir=images_dir)

    def samples(role: str, chosen: list[_Row]) -> Iterator[Sample]:
        for row in chosen:
            image = load_image(images_dir / row.rel, size, channels)
            if bit_depth == 16 and image.dtype == np.uint8:
                image = image.astype(np.uint16) * 257  # exact: v/255 == 257v/65535
            origin = {"path": row.rel, group_column: row.group}
            if row.label is not None:
                origin["label"] = row.label
            if row.mask:
                origin["mask"] = row.mask
            yield Sample(key=path_key(row.rel), image=image, label=None if role == "mixed" else row.label,
                         mask=load_mask(images_dir / row.mask, size) if row.mask else None,
                         origin=origin, group=row.group)

    roles = {}
    for role, groups in assigned.items():
        members = set(groups)
        roles[role] = RoleSpec(samples(role, _sample_order([r for r in rows if r.group in members], seed)),
                               info={"group_by": group_column})
    source = {
        "kind": "split",
        "images": str(images_dir.resolve()),
        "labels_csv": str(Path(labels_csv).resolve()),
        "group_column": group_column,
        "files": len(rows),
        "groups": len(by_group),
        "split": split,
        "counts": {role: {"groups": len(g), "images": sum(len(by_group[x]) for x in g)} for role, g in assigned.items()},
        "source_bit_depths": sorted(depths),
        "resize": "shorter side to size (bilinear, antialiased), centre crop; masks nearest",
    }
    return roles, source, bit_depth


# ---------------------------------------------------------------------------------------------
# NIfTI volumes -> slice roles

@dataclass(frozen=True)
class SliceRule:
    """Per-volume normalisation and the foreground rule that keeps a slice (module docstring)."""

    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_level: float = 0.1   # on the normalised [0, 1] scale of the volume
    min_foreground: float = 0.05    # share of a slice's pixels above foreground_level

    def __post_init__(self) -> None:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise FieldError("{percentiles=}: need 0 <= low < high <= 100", percentiles=f"{lo},{hi}")
        if not 0 <= self.foreground_level < 1:
            raise FieldError("{foreground_level=}: must be in [0, 1)", foreground_level=self.foreground_level)
        if not 0 <= self.min_foreground <= 1:
            raise FieldError("{min_foreground=}: must be in [0, 1]", min_foreground=self.min_foreground)


def normalise_volume(volume: np.ndarray, rule: SliceRule) -> np.ndarray:
    """Volume -> [0, 1] float64 by its own percentiles (P_lo -> 0, P_hi -> 1, clipped)."""
    lo, hi = np.percentile(volume, rule.percentiles)
    if hi <= lo:
        return np.zeros(volume.shape, np.float64)  # a constant volume has no foreground
    return np.clip((volume.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def kept_slices(unit: np.ndarray, axis: int, rule: SliceRule) -> list[int]:
    """Indices along axis of the slices with at least min_foreground of pixels above foreground_level."""
    other = tuple(a for a in range(3) if a != axis)
    share = (unit > rule.foreground_level).mean(axis=other)
    return [int(i) for i in np.flatnonzero(share >= rule.min_foreground)]


def read_nifti(path: Path, what: str = "volume") -> np.ndarray:
    """A 3-D NIfTI file in the closest canonical (RAS) orientation: (X, Y, Z) float64."""
    nib = _require("nibabel")
    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(image.dataobj, dtype=np.float64)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, ValueError, EOFError
        raise DataError(f"{path}: not a readable NIfTI {what} ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D {what}, found shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: the {what} holds NaN or infinite values")
    return data


def nifti_roles(
    volumes_dir: str | Path,
    *,
    size: int,
    channels: int,
    split: str,
    axis: int = 2,
    labels_csv: Optional[str | Path] = None,
    rule: SliceRule = SliceRule(),
    bit_depth: int = 16,
    seed: int = 0,
) -> tuple[dict[str, RoleSpec], dict, int]:
    """Slice roles from NIfTI volumes, split by volume: (role specs, source, bit depth).

    Labels: a CSV row per volume (path,label[,mask]); a mask volume labels each slice (anomalous
    when its mask slice has any non-zero voxel) and is stored with it; without a mask every slice
    takes the volume's label.
    """
    volumes_dir = Path(volumes_dir)
    if axis not in (0, 1, 2):
        raise FieldError("{axis=}: must be 0, 1 or 2", axis=axis)
    if not volumes_dir.is_dir():
        raise FieldError("{volumes_dir=}: no such folder", volumes_dir=volumes_dir)
    if bit_depth == 16 and channels == 3:
        raise FieldError("16-bit images can be stored with {channels=1} only; pass {bit_depth=8} for 3 channels")
    if labels_csv is None:
        rows = [_Row(rel) for rel in find_files(volumes_dir, NIFTI_SUFFIXES)]
        if not rows:
            raise FieldError("{volumes_dir=}: no NIfTI files found ({suffixes})", volumes_dir=volumes_dir,
                             suffixes=", ".join(NIFTI_SUFFIXES))
    else:
        rows = _read_csv(Path(labels_csv), volumes_dir, None)
    by_group = {r.rel: [r.label] for r in rows}  # the volume's label; a mask then labels each slice
    assigned = split_groups(by_group, split, seed)
    row_of = {r.rel: r for r in rows}

    roles = {}
    for role, groups in assigned.items():
        roles[role] = RoleSpec(
            _nifti_samples(volumes_dir, [row_of[g] for g in groups], role, size, channels, axis, rule, bit_depth, seed),
            info={"group_by": "volume"},
        )
    source = {
        "kind": "nifti",
        "volumes": str(volumes_dir.resolve()),
        "labels_csv": str(Path(labels_csv).resolve()) if labels_csv else None,
        "files": len(rows),
        "axis": axis,
        "orientation": "closest canonical (RAS): axis 0 left-right, 1 posterior-anterior, 2 inferior-superior",
        "split": split,
        "counts": {role: {"groups": len(g)} for role, g in assigned.items()},
        "normalisation": f"per volume: (v - P{rule.percentiles[0]}) / (P{rule.percentiles[1]} - "
                         f"P{rule.percentiles[0]}), clipped to [0, 1]; x {65535 if bit_depth == 16 else 255}, rounded",
        "slice_rule": {"foreground_level": rule.foreground_level, "min_foreground": rule.min_foreground,
                       "rule": "a slice is kept when at least min_foreground of its pixels exceed "
                               "foreground_level on the volume's normalised scale"},
        "resize": "shorter side to size (bilinear, antialiased), centre crop; masks nearest",
    }
    return roles, source, bit_depth


def _nifti_samples(volumes_dir, rows, role, size, channels, axis, rule, bit_depth, seed) -> Iterator[Sample]:
    # Every kept slice of the role is prepared (at ``size``) before the shuffle, so each shard mixes
    # volumes; memory holds the role's resized slices, not its volumes.
    slices = []
    for row in rows:
        unit = normalise_volume(read_nifti(volumes_dir / row.rel), rule)
        mask = read_nifti(volumes_dir / row.mask, "mask") if row.mask else None
        if mask is not None and mask.shape != unit.shape:
            raise DataError(f"{volumes_dir / row.mask}: mask shape {mask.shape} differs from the volume's {unit.shape}")
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", re.sub(r"\.nii(\.gz)?$", "", row.rel, flags=re.I)).strip("_")[-60:]
        stem = f"{stem}-{hashlib.sha1(row.rel.encode('utf-8')).hexdigest()[:8]}"
        for index in kept_slices(unit, axis, rule):
            plane = np.take(unit, index, axis=axis)
            mask_plane = np.take(mask, index, axis=axis) if mask is not None else None
            label = int(mask_plane.any()) if mask_plane is not None else row.label
            slices.append((row, stem, index, prepare_image(to_levels(plane, bit_depth), size, channels),
                           prepare_mask(mask_plane, size) if mask_plane is not None else None, label))
    for row, stem, index, image, mask_small, label in _sample_order(slices, seed):
        origin = {"volume": row.rel, "axis": axis, "slice": index}
        if label is not None:
            origin["label"] = label
        yield Sample(
            key=f"{stem}-a{axis}-{index:04d}",
            image=image,
            label=None if role == "mixed" else label,
            mask=mask_small,
            origin=origin,
            group=row.rel,
        )
