"""Simulated anomalies: one function per kind, each changing a clean (H, W) uint8 image only
inside the mask it returns.

Every kind draws its shape, size and strength from ranges relative to the image size (so the
same kind works from 32 px to 512 px) with the numpy Generator it is given, then draws its
location until the change alters at least the kind's ``min_changed_fraction`` of the mask's
pixels (a change that alters nothing is no anomaly: MNIST's flat black background), at most
MAX_DRAWS times, else a DataError. ``allowed`` (or None: anywhere) is where the mask may lie
(the head or brain of the phantom or of the CT head). The result is composited as
``where(mask, changed, clean)``, so the image is bit-identical to the clean one outside the mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve

from a2b_dist.data.manifest import DataError
from a2b_dist.data.storage import FieldError

MAX_DRAWS = 1000
MIN_AXIS_PX = 1.5            # semi-axes below this (small images) are raised to it: a region of one pixel is no shape
MIN_CHANGED_FRACTION = 0.5   # the square's rule (the paper's protocol, unchanged)
SQUARE_RULE = (
    "a square is redrawn until at least {:.0%} of its pixels change value when filled with its "
    "mean (rounded to the nearest grey level); an image with no such square in {} draws is an error"
).format(MIN_CHANGED_FRACTION, MAX_DRAWS)


@dataclass
class Change:
    image: np.ndarray        # (H, W) uint8, equal to the clean image outside mask
    mask: np.ndarray         # (H, W) bool, where the change was applied
    origin: dict = field(default_factory=dict)  # what the sample's json records
    changed_fraction: float = 0.0


# The square (section 4.3 of the paper), kept exactly as it always was.

def square_side(size: int) -> int:
    return max(1, round(40 * size / 128))


@dataclass
class Square:
    y: int
    x: int
    side: int
    fill: int
    changed_fraction: float


def draw_square(image: np.ndarray, side: int, rng: np.random.Generator,
                allowed: Optional[np.ndarray] = None) -> Square:
    """A square whose mean fill changes at least MIN_CHANGED_FRACTION of its pixels; given
    ``allowed``, its corner is drawn among the positions where it lies wholly inside."""
    h, w = image.shape
    corners = None
    if allowed is not None:
        # forbidden pixels under each side x side box, from a summed-area table
        table = np.pad(np.cumsum(np.cumsum(~allowed, 0), 1), ((1, 0), (1, 0)))
        boxes = table[side:, side:] - table[:-side, side:] - table[side:, :-side] + table[:-side, :-side]
        corners = np.flatnonzero(boxes == 0)
        if not len(corners):
            raise FieldError("no square of side {side} fits inside its region at {size=}", side=side, size=h)
    for _ in range(MAX_DRAWS):
        if corners is None:
            y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        else:
            y, x = divmod(int(corners[rng.integers(len(corners))]), w - side + 1)
        patch = image[y : y + side, x : x + side]
        fill = int(np.rint(patch.mean()))
        changed = float((patch != fill).mean())
        if changed >= MIN_CHANGED_FRACTION:
            return Square(y, x, side, fill, changed)
    raise DataError(f"no square of side {side} changes {MIN_CHANGED_FRACTION:.0%} of its pixels in {MAX_DRAWS} draws")


def square(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    side = square_side(image.shape[0])
    sq = draw_square(image, side, rng, allowed)
    out = image.copy()
    out[sq.y : sq.y + side, sq.x : sq.x + side] = sq.fill
    mask = np.zeros(image.shape, bool)
    mask[sq.y : sq.y + side, sq.x : sq.x + side] = True
    # The json of a square is what it always was (byte-identical shards).
    origin = {"box": {"y": sq.y, "x": sq.x, "side": side}, "fill": sq.fill,
              "changed_fraction": round(sq.changed_fraction, 4)}
    return Change(out, mask, origin, sq.changed_fraction)


# Elliptical regions.

@dataclass
class Ellipse:
    ay: float      # semi-axes, px (before rotation: ay along rows, ax along columns)
    ax: float
    angle: float   # degrees
    r: np.ndarray  # elliptical radius over a (2 hy + 1, 2 hx + 1) window centred on a pixel

    @property
    def half(self) -> tuple[int, int]:
        return self.r.shape[0] // 2, self.r.shape[1] // 2


def ellipse(ay: float, ax: float, angle: float) -> Ellipse:
    """The elliptical radius r (r < 1 inside) on the smallest window, centred on a pixel centre,
    holding the whole ellipse."""
    t = np.radians(angle)
    c, s = np.cos(t), np.sin(t)
    hy = int(np.ceil(np.hypot(ay * c, ax * s)))
    hx = int(np.ceil(np.hypot(ay * s, ax * c)))
    y, x = np.mgrid[-hy : hy + 1, -hx : hx + 1].astype(np.float64)
    yr, xr = c * y + s * x, c * x - s * y
    return Ellipse(ay, ax, angle, np.sqrt((yr / ay) ** 2 + (xr / ax) ** 2))


def raised_cosine(r: np.ndarray) -> np.ndarray:
    """cos^2(pi r / 2) inside r < 1, exactly 0 from r = 1 on: smooth and truncated."""
    return np.where(r < 1, np.cos(np.pi / 2 * np.minimum(r, 1)) ** 2, 0.0)


def flat_top(r: np.ndarray) -> np.ndarray:
    """1 up to r = 0.5, a cos^2 ramp down to exactly 0 at r = 1, 0 beyond."""
    ramp = np.cos(np.pi / 2 * np.clip((r - 0.5) / 0.5, 0, 1)) ** 2
    return np.where(r < 1, ramp, 0.0)


def uniform(rng: np.random.Generator, bounds: tuple[float, float], scale: float = 1.0) -> float:
    return float(rng.uniform(bounds[0], bounds[1])) * scale


def draw_ellipse(rng: np.random.Generator, axes: tuple[float, float], size: int) -> Ellipse:
    """Semi-axes each drawn from ``axes`` times the image size (at least MIN_AXIS_PX), any orientation."""
    ay, ax = uniform(rng, axes, size), uniform(rng, axes, size)
    return ellipse(max(ay, MIN_AXIS_PX), max(ax, MIN_AXIS_PX), float(rng.uniform(0, 180)))


def locate(rng: np.random.Generator, shape: tuple[int, int], e: Ellipse, allowed: Optional[np.ndarray],
           accept: Callable[[int, int, tuple], Optional[tuple[np.ndarray, float]]], kind: str, threshold: float):
    """Draw the centre (the whole window inside the image, the mask inside ``allowed``) until
    ``accept(cy, cx, window)`` returns (changed window, changed fraction); a DataError after
    MAX_DRAWS draws."""
    h, w = shape
    hy, hx = e.half
    if 2 * hy + 1 > h or 2 * hx + 1 > w:
        raise FieldError("{size=} is too small for the {kind} anomaly's region ({rows}x{columns} px)", size=h,
                         kind=kind, rows=2 * hy + 1, columns=2 * hx + 1)
    inside = e.r < 1
    centres = None
    if allowed is not None:
        # forbidden pixels under the region centred on each pixel: a correlation, so a convolution with
        # the region turned by 180 degrees (the same array for an ellipse, not for an irregular blob);
        # the window must also lie inside the image
        blocked = fftconvolve((~allowed).astype(np.float64), inside[::-1, ::-1].astype(np.float64),
                              mode="same") > 0.5
        valid = np.zeros_like(allowed)
        valid[hy : h - hy, hx : w - hx] = ~blocked[hy : h - hy, hx : w - hx]
        centres = np.flatnonzero(valid)
        if not len(centres):
            raise FieldError("no {kind} anomaly of {pixels} px fits inside its region at {size=}", kind=kind,
                             pixels=int(inside.sum()), size=h)
    for _ in range(MAX_DRAWS):
        if centres is None:
            cy, cx = int(rng.integers(hy, h - hy)), int(rng.integers(hx, w - hx))
        else:
            cy, cx = divmod(int(centres[rng.integers(len(centres))]), w)
        window = (slice(cy - hy, cy + hy + 1), slice(cx - hx, cx + hx + 1))
        result = accept(cy, cx, window)
        if result is not None:
            return cy, cx, window, result
    raise DataError(f"no {kind} anomaly changes {threshold:.0%} of its region's pixels in {MAX_DRAWS} draws")


def composite(image: np.ndarray, window, inside: np.ndarray, changed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out, mask = image.copy(), np.zeros(image.shape, bool)
    mask[window] = inside
    out[window] = np.where(inside, changed, image[window])
    return out, mask


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def changed_share(before: np.ndarray, after: np.ndarray, inside: np.ndarray, levels: int = 1) -> float:
    """The share of the region's pixels that change by at least ``levels`` grey levels."""
    return float((np.abs(before[inside].astype(np.int16) - after[inside]) >= levels).mean())


def ellipse_origin(cy: int, cx: int, e: Ellipse) -> dict:
    return {"centre": {"y": cy, "x": cx}, "axes": {"y": round(e.ay, 3), "x": round(e.ax, 3)},
            "angle": round(e.angle, 2), "mask_pixels": int((e.r < 1).sum())}


# intensity: a smooth local brightening or darkening.

INTENSITY = {"axes": (0.06, 0.16), "min_axis_px": MIN_AXIS_PX, "amplitude": (40.0, 100.0), "min_changed_fraction": 0.25,
             "profile": "raised cosine cos^2(pi r / 2) of the elliptical radius r, 0 from r = 1 on"}


def intensity(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    p = INTENSITY
    e = draw_ellipse(rng, p["axes"], image.shape[0])
    sign = 1 if rng.random() < 0.5 else -1
    amplitude = uniform(rng, p["amplitude"])
    inside, delta = e.r < 1, sign * amplitude * raised_cosine(e.r)

    def accept(cy, cx, window):
        changed = to_uint8(image[window] + delta)
        share = changed_share(image[window], changed, inside)
        return (changed, share) if share >= p["min_changed_fraction"] else None

    found = locate(rng, image.shape, e, allowed, accept, "intensity", p["min_changed_fraction"])
    cy, cx, window, (changed, share) = found
    out, mask = composite(image, window, inside, changed)
    origin = {"anomaly": "intensity", **ellipse_origin(cy, cx, e), "sign": sign, "amplitude": round(amplitude, 2),
              "changed_fraction": round(share, 4)}
    return Change(out, mask, origin, share)


# noise: a patch of correlated noise around the region's own mean, blended over the image.

NOISE = {"axes": (0.06, 0.16), "min_axis_px": MIN_AXIS_PX, "texture_sigma": (0.005, 0.02), "std": (12.0, 35.0), "blend": (0.6, 1.0),
         "min_changed_fraction": 0.25,
         "texture": "i.i.d. Gaussian noise smoothed by a Gaussian of texture_sigma (times the size) px, "
                    "rescaled to unit standard deviation, times std, plus the mean of the clean region; "
                    "blended as (1 - blend) image + blend texture inside the ellipse (a hard edge)"}


def noise(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    p = NOISE
    size = image.shape[0]
    e = draw_ellipse(rng, p["axes"], size)
    texture_sigma = uniform(rng, p["texture_sigma"], size)
    std, blend = uniform(rng, p["std"]), uniform(rng, p["blend"])
    z = gaussian_filter(rng.standard_normal(e.r.shape), texture_sigma, mode="reflect")
    z = (z - z.mean()) / max(float(z.std()), 1e-12)
    inside = e.r < 1

    def accept(cy, cx, window):
        clean = image[window].astype(np.float64)
        changed = to_uint8((1 - blend) * clean + blend * (clean[inside].mean() + std * z))
        share = changed_share(image[window], changed, inside)
        return (changed, share) if share >= p["min_changed_fraction"] else None

    found = locate(rng, image.shape, e, allowed, accept, "noise", p["min_changed_fraction"])
    cy, cx, window, (changed, share) = found
    out, mask = composite(image, window, inside, changed)
    origin = {"anomaly": "noise", **ellipse_origin(cy, cx, e), "texture_sigma": round(texture_sigma, 3),
              "std": round(std, 2), "blend": round(blend, 3), "changed_fraction": round(share, 4)}
    return Change(out, mask, origin, share)


# blur: the image blurred inside an ellipse, blended in smoothly.

BLUR = {"axes": (0.08, 0.2), "min_axis_px": MIN_AXIS_PX, "sigma": (0.25, 0.5), "min_sigma_px": 1.0, "min_changed_fraction": 0.2,
        "min_change_levels": 8,
        "weight": "flat top: 1 up to r = 0.5, a cos^2 ramp to exactly 0 at r = 1 (elliptical radius r)",
        "filter": "scipy.ndimage.gaussian_filter of the whole image (mode reflect), sigma times the region's mean "
                  "semi-axis px (a smear on the region's own scale)"}


def blur(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    p = BLUR
    size = image.shape[0]
    e = draw_ellipse(rng, p["axes"], size)
    sigma = max(uniform(rng, p["sigma"], (e.ay + e.ax) / 2), p["min_sigma_px"])
    blurred = gaussian_filter(image.astype(np.float64), sigma, mode="reflect")
    inside, weight = e.r < 1, flat_top(e.r)

    def accept(cy, cx, window):
        clean = image[window].astype(np.float64)
        changed = to_uint8(clean + weight * (blurred[window] - clean))
        share = changed_share(image[window], changed, inside, p["min_change_levels"])
        return (changed, share) if share >= p["min_changed_fraction"] else None

    found = locate(rng, image.shape, e, allowed, accept, "blur", p["min_changed_fraction"])
    cy, cx, window, (changed, share) = found
    out, mask = composite(image, window, inside, changed)
    origin = {"anomaly": "blur", **ellipse_origin(cy, cx, e), "sigma": round(sigma, 3),
              "changed_fraction": round(share, 4)}
    return Change(out, mask, origin, share)


# lesion (phantom): one or two small soft blobs inside the brain, brighter or darker.

LESION = {"count": [1, 2], "radius": (0.03, 0.08), "min_axis_px": MIN_AXIS_PX, "aspect": (0.6, 1.0), "amplitude": (25.0, 60.0),
          "min_changed_fraction": 0.25,
          "profile": "flat top: 1 up to r = 0.5, a cos^2 ramp to exactly 0 at r = 1 (elliptical radius r)",
          "placement": "each blob wholly inside the brain (pixels fully inside its edge); two blobs never overlap"}


def lesion(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    p = LESION
    size = image.shape[0]
    count = int(rng.integers(p["count"][0], p["count"][1] + 1))
    out, mask, blobs, shares = image.copy(), np.zeros(image.shape, bool), [], []
    for _ in range(count):
        radius = uniform(rng, p["radius"], size)
        e = ellipse(max(radius, MIN_AXIS_PX), max(radius * uniform(rng, p["aspect"]), MIN_AXIS_PX),
                    float(rng.uniform(0, 180)))
        sign = 1 if rng.random() < 0.5 else -1
        amplitude = uniform(rng, p["amplitude"])
        inside, delta = e.r < 1, sign * amplitude * flat_top(e.r)
        free = ~mask if allowed is None else allowed & ~mask

        def accept(cy, cx, window):
            changed = to_uint8(out[window] + delta)
            share = changed_share(out[window], changed, inside)
            return (changed, share) if share >= p["min_changed_fraction"] else None

        found = locate(rng, image.shape, e, free, accept, "lesion", p["min_changed_fraction"])
        cy, cx, window, (changed, share) = found
        out, blob = composite(out, window, inside, changed)
        mask |= blob
        shares.append(share * inside.sum())
        blobs.append({**ellipse_origin(cy, cx, e), "sign": sign, "amplitude": round(amplitude, 2)})
    share = float(sum(shares) / mask.sum())
    return Change(out, mask, {"anomaly": "lesion", "lesions": blobs, "changed_fraction": round(share, 4)}, share)


# hemorrhage (phantom, cthead): an irregular hyperdense blob inside the brain, like an acute bleed.

HEMORRHAGE = {"axes": (0.04, 0.1), "min_axis_px": MIN_AXIS_PX, "irregularity": (0.05, 0.18), "harmonics": [2, 3],
              "strength": (0.45, 0.8), "min_changed_fraction": 0.5, "min_change_levels": 8,
              "shape": "an ellipse (semi-axes each axes x size px, any angle) whose boundary radius is modulated by "
                       "1 + sum over harmonics k of a_k cos(k phi + phase_k), each a_k drawn from irregularity",
              "profile": "flat top: 1 up to r = 0.5, a cos^2 ramp to exactly 0 at r = 1 (r the modulated radius)",
              "brightening": "clean + strength x profile x (255 - clean): towards white, as an acute bleed "
                             "(60..90 HU) shows on a brain window"}


def irregular(ay: float, ax: float, angle: float, amplitudes: list, phases: list) -> Ellipse:
    """An ellipse whose radius is modulated by harmonics: r / (1 + sum a_k cos(k phi + phase_k)) < 1
    inside (phi the angle in the ellipse's own normalised frame), on a window that holds it all."""
    grow = 1 + sum(abs(a) for a in amplitudes)
    outer = ellipse(ay * grow, ax * grow, angle)
    hy, hx = outer.half
    t = np.radians(angle)
    c, s = np.cos(t), np.sin(t)
    y, x = np.mgrid[-hy : hy + 1, -hx : hx + 1].astype(np.float64)
    yr, xr = (c * y + s * x) / ay, (c * x - s * y) / ax
    phi = np.arctan2(yr, xr)
    boundary = 1 + sum(a * np.cos(k * phi + p) for k, (a, p) in enumerate(zip(amplitudes, phases), start=2))
    return Ellipse(ay, ax, angle, np.sqrt(yr**2 + xr**2) / boundary)


def hemorrhage(image: np.ndarray, rng: np.random.Generator, allowed: Optional[np.ndarray] = None) -> Change:
    p = HEMORRHAGE
    size = image.shape[0]
    ay, ax = max(uniform(rng, p["axes"], size), MIN_AXIS_PX), max(uniform(rng, p["axes"], size), MIN_AXIS_PX)
    angle = float(rng.uniform(0, 180))
    amplitudes = [uniform(rng, p["irregularity"]) for _ in p["harmonics"]]
    phases = [float(rng.uniform(0, 2 * np.pi)) for _ in p["harmonics"]]
    strength = uniform(rng, p["strength"])
    e = irregular(ay, ax, angle, amplitudes, phases)
    inside, weight = e.r < 1, strength * flat_top(e.r)

    def accept(cy, cx, window):
        clean = image[window].astype(np.float64)
        changed = to_uint8(clean + weight * (255 - clean))
        share = changed_share(image[window], changed, inside, p["min_change_levels"])
        return (changed, share) if share >= p["min_changed_fraction"] else None

    found = locate(rng, image.shape, e, allowed, accept, "hemorrhage", p["min_changed_fraction"])
    cy, cx, window, (changed, share) = found
    out, mask = composite(image, window, inside, changed)
    origin = {"anomaly": "hemorrhage", **ellipse_origin(cy, cx, e),
              "irregularity": [round(a, 4) for a in amplitudes], "phases": [round(q, 4) for q in phases],
              "strength": round(strength, 4), "changed_fraction": round(share, 4)}
    return Change(out, mask, origin, share)


@dataclass(frozen=True)
class Kind:
    name: str
    seed_id: int               # the anomaly of source image i: default_rng([seed, seed_id, i])
    apply: Callable[..., Change]
    parameters: dict
    rule: str
    region: str                # on a head (phantom, cthead): where its mask must lie ("head" or "brain")
    needs_regions: bool = False  # only on sources with regions (a head with a brain: phantom, cthead)


def _rule(what: str, threshold: float, change: str = "value") -> str:
    return (f"{what}; its location is redrawn until at least {threshold:.0%} of the region's pixels change "
            f"{change}; an image with no such location in {MAX_DRAWS} draws is an error")


KINDS = {
    "square": Kind("square", 2, square, {"side": "round(40 * size / 128)",
                                          "fill": "the square's mean, rounded to the nearest grey level",
                                          "min_changed_fraction": MIN_CHANGED_FRACTION}, SQUARE_RULE, "head"),
    "intensity": Kind("intensity", 3, intensity, INTENSITY, _rule(
        "an ellipse (semi-axes each axes x size px, any angle) adds sign x amplitude x cos^2(pi r / 2), "
        "sign + or - with equal chance, rounded and clipped to 0..255", INTENSITY["min_changed_fraction"]), "head"),
    "noise": Kind("noise", 4, noise, NOISE, _rule(
        "an ellipse (semi-axes each axes x size px, any angle) is blended with a correlated noise texture "
        "around its own mean", NOISE["min_changed_fraction"]), "head"),
    "blur": Kind("blur", 5, blur, BLUR, _rule(
        "an ellipse (semi-axes each axes x size px, any angle) is replaced by the Gaussian-blurred image, "
        "blended with a flat-top weight that reaches 0 at its edge", BLUR["min_changed_fraction"],
        f"by at least {BLUR['min_change_levels']} grey levels (a blur of flat, noisy tissue is no anomaly)"), "head"),
    "lesion": Kind("lesion", 6, lesion, LESION, _rule(
        "1 or 2 small blobs (radius x size px, aspect, any angle) inside the brain add sign x amplitude x "
        "a flat-top profile, sign + or - per blob", LESION["min_changed_fraction"]), "brain", needs_regions=True),
    "hemorrhage": Kind("hemorrhage", 7, hemorrhage, HEMORRHAGE, _rule(
        "an irregular blob (an ellipse of semi-axes axes x size px, any angle, its radius modulated by harmonics "
        "2 and 3) inside the brain is brightened towards white, clean + strength x flat-top profile x "
        "(255 - clean), like an acute bleed on a brain window", HEMORRHAGE["min_changed_fraction"],
        f"by at least {HEMORRHAGE['min_change_levels']} grey levels"), "brain", needs_regions=True),
}
