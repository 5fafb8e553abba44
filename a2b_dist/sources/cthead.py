"""A real head CT as a simulated source: Debian's invesalius-examples ships ``Cranium.inv3``.

The file is InVesalius' project format: a gzipped tar holding ``main.plist`` (the volume's shape,
dtype, spacing) and ``matrix.dat`` (the raw int16 volume, 108 axial slices of 256 x 256, Hounsfield
units: air is -1024). It is read with tarfile, plistlib and numpy.frombuffer only (nothing is
unpickled, nothing is extracted to disk) and cached per process.

Orientation, as found by looking at the slices: slice 0 is at the jaw, the last one above the
vertex; the file's rows run from the back of the head to the face, so rows are reversed on reading
(face at the top, the scanner table's arc below the head, as CT slices are usually shown). Left
and right are not known from the file and do not matter: every image is flipped with p = 0.5.

Regions per slice, at full resolution from the HU values: ``head`` is the largest connected body
part (smoothed HU > -300) with its holes filled; ``brain`` is intracranial soft tissue: inside the
convex hull of the skull (bone: smoothed HU > 180) and not within a pixel of bone, HU in (-20, 100)
(no air, no fat, no bone), opened with a disk of radius 3 px and reduced to its largest component,
holes filled. A slice is usable when its brain covers at least MIN_BRAIN_SHARE of the slice (the
longest run of such slices: the cerebrum from just above the skull base to below the vertex; lower
slices are mostly face and skull base, upper ones a thin cap).

One head, so the roles must never share a slice: the usable slices are cut, bottom to top, into
blocks that go to the roles in the fixed pattern PATTERN (healthy and mixed get the long blocks,
test and val short ones), one unused guard slice between consecutive blocks (adjacent slices, 1.5
mm apart, are near duplicates). The pattern repeats, so every role has slices from the bottom, the
middle and the top of the brain.

Image ``index`` of a role is one augmented usable slice of that role, drawn from
``default_rng([CTHEAD_TAG, seed, index])``: the slice, a horizontal flip (p = 0.5), a rotation, a
scale and a shift (one affine map about the image centre, linear interpolation, applied to the
full-resolution HU slice and to its region masks alike), and a brain window (level and width in
HU). The windowed slice is then area-averaged to ``size`` (bilinear above 256 px) and rounded; a
region keeps the pixels that its warped mask covers completely (pixels fully inside its edge).
"""
from __future__ import annotations

import hashlib
import io
import os
import plistlib
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from a2b_dist.data.manifest import DataError
from a2b_dist.data.storage import FieldError

PACKAGE = "invesalius-examples"
PACKAGE_FILE = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
ENV = "A2B_CTHEAD"
CTHEAD_TAG = 0x43544844   # "CTHD": image i of a build is drawn from default_rng([CTHEAD_TAG, seed, i])
DEFAULT_COUNT = 5000      # augmented images in all, like the phantom's heads
AIR_HU = -1024.0

# Segmentation of each slice (full resolution, HU).
SMOOTH_SIGMA_PX = 1.0
BODY_HU = -300.0
BONE_HU = 180.0
SOFT_HU = (-20.0, 100.0)
OPEN_RADIUS_PX = 3
MIN_BRAIN_SHARE = 0.15    # usable: the brain covers at least 15% of the slice (about 90 cm^2 here)

# The split: blocks of consecutive usable slices, bottom to top, in this repeating order.
PATTERN = ("healthy", "mixed", "test", "val")
BLOCK = {"healthy": 5, "mixed": 5, "test": 3, "val": 2}
GUARD = 1                 # unused slices between consecutive blocks

# Augmentation, as recorded in the manifest.
RANGES = {
    "flip_probability": 0.5,                 # left-right
    "rotation_deg": [-8.0, 8.0],             # counter-clockwise as displayed, about the image centre
    "scale": [0.92, 1.08],
    "shift": [-0.04, 0.04],                  # rows and columns, each a fraction of the image side
    "window_level_hu": [22.0, 38.0],         # this scanner's brain is about 15..35 HU
    "window_width_hu": [72.0, 108.0],
}
REGION_COVER = 0.999      # a region's pixel at the built size: its warped mask covers it (up to rounding)


@dataclass(frozen=True)
class Volume:
    path: str
    sha256: str
    hu: np.ndarray            # (slices, rows, columns) int16, rows reversed (face up); read-only
    spacing: tuple            # as in main.plist: (column, row, slice) mm
    name: str


@dataclass(frozen=True)
class Anatomy:
    volume: Volume
    brain_share: np.ndarray   # per slice
    usable: tuple             # slice numbers, bottom to top
    split: dict               # role -> tuple of slice numbers
    guards: tuple             # unused slices between blocks
    masks: dict               # slice -> (2, rows, columns) float32: head, brain (usable slices only)


def locate() -> Path:
    """The .inv3 file: $A2B_CTHEAD, else where Debian's package puts it; a one-line DataError if absent."""
    env = os.environ.get(ENV)
    path = Path(env) if env else PACKAGE_FILE
    if not path.is_file():
        where = f"{ENV}={env} is not a file" if env else f"{path} not found"
        raise FieldError("{source=cthead} needs the head CT of Debian's {package}: apt-get install {package} "
                         "({where}; set {env}=PATH to use a Cranium.inv3 elsewhere)", package=PACKAGE, where=where,
                         env=ENV)
    return path


@lru_cache(maxsize=2)
def load_volume(path: str) -> Volume:
    """The volume in ``path`` (an InVesalius .inv3); cached, treat its array as read-only."""
    try:
        data = Path(path).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise DataError(f"{path}: no main.plist inside (not an InVesalius project)")
            meta = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = meta["matrix"]
            shape = tuple(int(n) for n in matrix["shape"])
            dtype = np.dtype(str(matrix["dtype"])).newbyteorder("<")
            name = Path(str(matrix.get("filename", "matrix.dat"))).name
            if len(shape) != 3 or dtype.kind not in "iu" or name not in members:
                raise DataError(f"{path}: main.plist describes no integer 3-D matrix it holds ({matrix})")
            member = members[name]
            if member.size != int(np.prod(shape)) * dtype.itemsize:
                raise DataError(f"{path}: {name} holds {member.size} bytes, not the {shape} {dtype.name} of main.plist")
            raw = tar.extractfile(member).read()
    except DataError:
        raise
    except (OSError, EOFError, tarfile.TarError, plistlib.InvalidFileException, KeyError, TypeError,
            ValueError) as exc:
        raise DataError(f"{path}: not a readable InVesalius project ({exc})") from None
    hu = np.frombuffer(raw, dtype=dtype).reshape(shape)[:, ::-1].astype(np.int16)
    hu.setflags(write=False)
    return Volume(path=str(path), sha256=hashlib.sha256(data).hexdigest(), hu=hu,
                  spacing=tuple(float(s) for s in meta.get("spacing", ())), name=str(meta.get("name", "")))


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    return labels == 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, n + 1))))


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a mask's pixels, filled (empty when it has no area)."""
    points = np.argwhere(mask)
    if len(points) < 3:
        return np.zeros_like(mask)
    try:
        corners = points[ConvexHull(points).vertices]
    except QhullError:  # all on one line
        return np.zeros_like(mask)
    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for y, x in corners], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def segment(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head, brain) bool masks of one HU slice (the rule in the module's docstring)."""
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), SMOOTH_SIGMA_PX)
    head = ndimage.binary_fill_holes(_largest(smooth > BODY_HU))
    bone = (smooth > BONE_HU) & head
    brain = (_hull(bone) & ~ndimage.binary_dilation(bone, _disk(1))
             & (smooth > SOFT_HU[0]) & (smooth < SOFT_HU[1]))
    brain = ndimage.binary_opening(brain, _disk(OPEN_RADIUS_PX))
    brain = ndimage.binary_fill_holes(_largest(brain)) & head
    return head, brain


def split_slices(usable: tuple) -> tuple[dict, tuple]:
    """Role -> slices, and the guard slices: blocks of BLOCK[role] slices, bottom to top, in the
    order PATTERN (repeated), GUARD unused slices between blocks; the top block may be shorter."""
    split, guards = {role: [] for role in PATTERN}, []
    i, k = 0, 0
    while i < len(usable):
        role = PATTERN[k % len(PATTERN)]
        block = usable[i : i + BLOCK[role]]
        split[role] += block
        i += len(block)
        if i + GUARD < len(usable):
            guards += usable[i : i + GUARD]
            i += GUARD
        k += 1
    return {role: tuple(int(z) for z in split[role]) for role in split}, tuple(int(z) for z in guards)


@lru_cache(maxsize=2)
def anatomy(path: str) -> Anatomy:
    """Regions of every slice, the usable slices and the split (cached per file)."""
    volume = load_volume(path)
    shares, masks = [], {}
    for z, hu in enumerate(volume.hu):
        head, brain = segment(hu)
        shares.append(float(brain.mean()))
        masks[z] = (head, brain)
    shares = np.array(shares)
    ok = np.append(shares >= MIN_BRAIN_SHARE, False)
    runs, start = [], None   # the longest run of consecutive usable slices
    for z, good in enumerate(ok):
        if good and start is None:
            start = z
        elif not good and start is not None:
            runs.append((z - start, start))
            start = None
    if not runs:
        raise DataError(f"{path}: no slice has a brain region of {MIN_BRAIN_SHARE:.0%} of its area")
    length, first = max(runs)
    usable = tuple(range(first, first + length))
    split, guards = split_slices(usable)
    if not all(split.values()):
        raise DataError(f"{path}: {length} usable slices are too few to give every role its own slices")
    kept = {z: np.stack(masks[z]).astype(np.float32) for z in usable}
    return Anatomy(volume, shares, usable, split, guards, kept)


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    """Area average to ``size`` (bilinear when enlarging), float32."""
    method = Image.Resampling.BOX if size <= plane.shape[0] else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize((size, size), method))


def augmentation(index: int, seed: int, slices: tuple) -> dict:
    """The draws of image ``index``: slice, flip, rotation, scale, shift (fractions), window."""
    rng = np.random.default_rng([CTHEAD_TAG, int(seed), int(index)])
    u = rng.random(8).tolist()   # always the same stream, in the same order
    span = lambda key, t: RANGES[key][0] + (RANGES[key][1] - RANGES[key][0]) * t  # noqa: E731
    return {
        "slice": int(slices[min(int(u[0] * len(slices)), len(slices) - 1)]),
        "flip": bool(u[1] < RANGES["flip_probability"]),
        "rotation_deg": span("rotation_deg", u[2]),
        "scale": span("scale", u[3]),
        "shift": (span("shift", u[4]), span("shift", u[5])),
        "window": (span("window_level_hu", u[6]), span("window_width_hu", u[7])),
    }


def render(index: int, size: int, role: str, seed: int, path: Optional[str] = None, regions: bool = True
           ) -> tuple[np.ndarray, Optional[dict], dict]:
    """Image ``index`` of ``role``: (size, size) uint8, regions {'head', 'brain'} (pixels fully
    inside; None when not asked for: the image is the same, and twice as fast), and the json
    fields (``slice``, ``augment``)."""
    a = anatomy(str(path or locate()))
    if role not in a.split:
        raise DataError(f"role {role!r} is not one of {', '.join(a.split)}")
    d = augmentation(index, seed, a.split[role])
    hu = a.volume.hu[d["slice"]].astype(np.float32) - AIR_HU        # air 0: the warp's fill value
    planes = np.concatenate([hu[None], a.masks[d["slice"]]]) if regions else hu[None]
    rows, cols = hu.shape
    centre = np.array([(rows - 1) / 2, (cols - 1) / 2])
    t = np.radians(d["rotation_deg"])
    # output (r, c) -> input: centre + R(-t) (out - centre - shift) / scale
    inverse = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) / d["scale"]
    shift = np.array(d["shift"]) * np.array([rows, cols])
    offset = centre - inverse @ (centre + shift)
    warped = np.stack([ndimage.affine_transform(plane, inverse, offset, order=1, mode="constant", cval=0.0)
                       for plane in planes])   # plane by plane: twice as fast as one 3-D call
    if d["flip"]:
        warped = warped[:, :, ::-1]
    level, width = d["window"]
    shown = np.clip((warped[0] + AIR_HU - (level - width / 2)) / width, 0.0, 1.0) * 255
    image = np.clip(np.rint(_resize(shown, size)), 0, 255).astype(np.uint8)
    found = {name: _resize(plane, size) >= REGION_COVER for name, plane in zip(("head", "brain"), warped[1:])}
    fields = {"slice": d["slice"], "augment": {
        "flip": d["flip"], "rotation_deg": round(d["rotation_deg"], 3), "scale": round(d["scale"], 4),
        "shift": {"y": round(d["shift"][0], 4), "x": round(d["shift"][1], 4)},
        "window": {"level": round(level, 2), "width": round(width, 2)}}}
    return image, (found if regions else None), fields


def protocol(path: Optional[str] = None) -> dict:
    """The manifest's description of the source: the file, the rule for slices, the split, the ranges."""
    a = anatomy(str(path or locate()))
    v = a.volume
    return {
        "package": f"Debian {PACKAGE} (InVesalius example project, GPL-2)",
        "file": v.path,
        "sha256": v.sha256,
        "volume": {"name": v.name, "shape": list(v.hu.shape), "dtype": "int16", "spacing_mm": list(v.spacing),
                   "values": "Hounsfield units (air -1024)",
                   "orientation": "axial slices, 0 at the jaw; rows reversed on reading (face up, table below)"},
        "regions": ("head: largest body part (Gaussian sigma 1 px, HU > -300), holes filled; brain: inside the "
                    "convex hull of bone (HU > 180) and not within 1 px of it, HU in (-20, 100), opened with a "
                    "disk of radius 3 px, largest component, holes filled; both warped with the image and kept "
                    "where they cover a pixel of the output completely"),
        "slice_rule": f"usable: the longest run of consecutive slices whose brain region covers at least "
                      f"{MIN_BRAIN_SHARE:.0%} of the slice",
        "usable_slices": [a.usable[0], a.usable[-1]],
        "split": {
            "rule": (f"usable slices cut bottom to top into blocks of {', '.join(f'{r} {BLOCK[r]}' for r in PATTERN)} "
                     f"slices in the repeating order {', '.join(PATTERN)}, {GUARD} unused guard slice between "
                     "blocks: no slice in two roles, no two roles on adjacent slices"),
            **{role: list(a.split[role]) for role in ("healthy", "mixed", "val", "test")},
            "guard": list(a.guards),
        },
        "augmentation": {**RANGES, "order": "slice, flip, rotation, scale, shift, window level, window width "
                                             "from default_rng([CTHEAD_TAG, seed, index]).random(8)",
                         "tag": CTHEAD_TAG},
        "render": ("one affine map (rotation and scale about the centre, then the shift; linear interpolation, "
                   "air outside) of the full-resolution HU slice, flip, window y = clip((HU - (level - width / 2)) "
                   "/ width, 0, 1) * 255, area average to --size (bilinear above 256 px), rounded"),
    }
