"""A procedural CT-like head: nested ellipses in the manner of the Shepp-Logan phantom.

Head ``index`` depends only on ``index`` (its anatomy is drawn from a numpy Generator seeded by
(PHANTOM_TAG, index)), so the phantom is a fixed population like a data set, and ``seed`` only
assigns roles and anomalies. Its anatomy is jittered per head: centre, rotation, head axes, skull
thickness, grey levels, ventricle sizes, and which of the small inner structures are present.
Each image is rendered directly at the requested size with analytically anti-aliased edges
(the coverage of a pixel by an ellipse from its approximate signed distance to the boundary),
then a smooth linear bias field and Gaussian noise are applied, rounded, clipped to 0..255.

Coordinates are normalised: u to the right, v upwards, both in (-1, 1) over the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHANTOM_TAG = 0x50484E54  # "PHNT": seeds head i as default_rng([PHANTOM_TAG, i])
DEFAULT_COUNT = 5000

# (name, u, v, semi-axis u, semi-axis v, angle in degrees, presence probability): the inner
# structures in the head's own frame, for a head of semi-axes (0.69, 0.92) as in Shepp-Logan
# (scaled with the drawn head); small ones enlarged so that 32 px still shows some of them.
INNER = (
    ("top", 0.0, 0.35, 0.21, 0.25, 0.0, 0.85),
    ("centre_upper", 0.0, 0.10, 0.055, 0.055, 0.0, 0.7),
    ("centre_lower", 0.0, -0.10, 0.055, 0.055, 0.0, 0.7),
    ("bottom_left", -0.08, -0.605, 0.06, 0.035, 0.0, 0.5),
    ("bottom_mid", 0.0, -0.606, 0.035, 0.035, 0.0, 0.5),
    ("bottom_right", 0.06, -0.605, 0.035, 0.06, 0.0, 0.5),
)
VENTRICLES = (("ventricle_right", 0.22, 0.0, 0.11, 0.31, -18.0), ("ventricle_left", -0.22, 0.0, 0.16, 0.41, 18.0))

# Every jitter range, as recorded in the manifest.
RANGES = {
    "centre_shift": [-0.05, 0.05],            # u and v, normalised units
    "rotation_deg": [-12.0, 12.0],
    "head_axes_factor": [0.88, 1.02],         # times (0.69, 0.92), each axis on its own
    "skull_thickness": [0.06, 0.09],          # normalised units (about 1-1.4 px at 32 px)
    "skull_level": [215.0, 245.0],
    "brain_level": [90.0, 115.0],
    "csf_level": [30.0, 50.0],                # ventricles
    "ventricle_axes_factor": [0.8, 1.2],
    "ventricle_shift": [-0.03, 0.03],
    "ventricle_angle_jitter_deg": [-6.0, 6.0],
    "inner_axes_factor": [0.8, 1.3],
    "inner_shift": [-0.025, 0.025],
    "inner_contrast": [8.0, 22.0],            # grey levels above the brain
    "bias_amplitude": [0.0, 0.08],            # linear multiplicative field 1 + a (cos t u + sin t v)
    "noise_sigma": [2.0, 5.0],                # grey levels, i.i.d. Gaussian per pixel
}

RULE = (
    "nested ellipses in the manner of the Shepp-Logan phantom (skull ring, brain, two ventricles, "
    "up to six small inner structures each present with its own probability), painted in order with "
    "anti-aliased coverage, the anatomy jittered per head from default_rng([PHANTOM_TAG, index]); "
    "then a linear bias field and Gaussian noise; rounded and clipped to 0..255"
)


@dataclass
class Ellipse:
    name: str
    u: float
    v: float
    au: float      # semi-axis along the ellipse's own first axis
    av: float
    angle: float   # degrees, counter-clockwise
    level: float


def anatomy(index: int) -> dict:
    """The head's parameters (independent of the image size)."""
    rng = np.random.default_rng([PHANTOM_TAG, int(index)])
    draws = iter(rng.random(64).tolist())  # every head reads the same stream in the same order
    U = lambda key: RANGES[key][0] + (RANGES[key][1] - RANGES[key][0]) * next(draws)  # noqa: E731
    cu, cv = U("centre_shift"), U("centre_shift")
    rot = U("rotation_deg")
    head_au, head_av = 0.69 * U("head_axes_factor"), 0.92 * U("head_axes_factor")
    thickness = U("skull_thickness")
    skull, brain, csf = U("skull_level"), U("brain_level"), U("csf_level")
    fu, fv = head_au / 0.69, head_av / 0.92  # inner structures scale with the head
    local = []
    for name, u, v, au, av, angle in VENTRICLES:
        k_u, k_v = U("ventricle_axes_factor"), U("ventricle_axes_factor")
        du, dv, da = U("ventricle_shift"), U("ventricle_shift"), U("ventricle_angle_jitter_deg")
        local.append(Ellipse(name, (u + du) * fu, (v + dv) * fv, au * k_u * fu, av * k_v * fv, angle + da, csf))
    present = []
    for name, u, v, au, av, angle, p in INNER:
        k = U("inner_axes_factor")
        du, dv = U("inner_shift"), U("inner_shift")
        contrast = U("inner_contrast")
        if next(draws) < p:
            present.append(name)
            local.append(Ellipse(name, (u + du) * fu, (v + dv) * fv, au * k * fu, av * k * fv, angle, brain + contrast))
    bias, bias_dir = U("bias_amplitude"), 2 * np.pi * next(draws)
    noise = U("noise_sigma")

    c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))

    def place(e: Ellipse) -> Ellipse:  # the head's frame -> the image's
        return Ellipse(e.name, cu + c * e.u - s * e.v, cv + s * e.u + c * e.v, e.au, e.av, e.angle + rot, e.level)

    ellipses = [
        place(Ellipse("skull", 0.0, 0.0, head_au, head_av, 0.0, skull)),
        place(Ellipse("brain", 0.0, -0.0184 * fv, head_au - thickness, head_av - thickness, 0.0, brain)),
    ] + [place(e) for e in local]
    return {
        "index": int(index),
        "ellipses": ellipses,
        "bias": (bias, bias_dir),
        "noise_sigma": noise,
        "summary": {
            "centre": [round(cu, 4), round(cv, 4)],
            "rotation_deg": round(rot, 3),
            "head_axes": [round(head_au, 4), round(head_av, 4)],
            "skull_thickness": round(thickness, 4),
            "levels": {"skull": round(skull, 2), "brain": round(brain, 2), "csf": round(csf, 2)},
            "inner_present": present,
            "bias": [round(bias, 4), round(bias_dir, 4)],
            "noise_sigma": round(noise, 3),
        },
    }


def coverages(ellipses: list[Ellipse], size: int) -> np.ndarray:
    """(E, size, size) float32: the share of each pixel inside each ellipse, from its first-order
    signed distance to the boundary g / |grad g| with g = (x/a)^2 + (y/b)^2 - 1 (a one-pixel ramp
    across the edge: anti-aliased at any size)."""
    px = 2.0 / size  # one pixel in normalised units
    p = np.array([[e.u, e.v, 1 / e.au, 1 / e.av, np.radians(e.angle)] for e in ellipses],
                 np.float32)[:, :, None, None]
    cu, cv, ia, ib, t = p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4]
    centres = ((np.arange(size) + 0.5) * px - 1).astype(np.float32)  # pixel j at u = centres[j]; row i at v = -centres[i]
    u, v = centres[None, None, :] - cu, -centres[None, :, None] - cv
    c, s = np.cos(t), np.sin(t)
    xa, ya = (c * u + s * v) * ia, (c * v - s * u) * ib  # the ellipse's own axes, over its semi-axes
    g = xa * xa + ya * ya - 1
    grad = 2 * px * np.sqrt((xa * ia) ** 2 + (ya * ib) ** 2) + np.float32(1e-30)  # |grad g| per pixel
    return np.clip(0.5 - g / grad, 0.0, 1.0)


def render(index: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Head ``index`` at ``size`` px: (size, size) uint8, regions {'head', 'brain'} (pixels fully
    inside the skull's outer edge / the brain's edge), and the anatomy summary for the json."""
    a = anatomy(index)
    cov = coverages(a["ellipses"], size)
    image = np.zeros((size, size), np.float64)
    for e, c in zip(a["ellipses"], cov):  # painted in order, each over the previous
        image += (e.level - image) * c
    regions = {"head": cov[0] >= 1.0, "brain": cov[1] >= 1.0}
    rng = np.random.default_rng([PHANTOM_TAG, int(index), size])  # the noise, after the anatomy
    centres = (np.arange(size) + 0.5) * (2.0 / size) - 1
    bias, direction = a["bias"]
    field = 1 + bias * (np.cos(direction) * centres[None, :] - np.sin(direction) * centres[:, None])
    image = image * field + a["noise_sigma"] * rng.standard_normal((size, size))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), regions, a["summary"]


def protocol() -> dict:
    return {"rule": RULE, "tag": PHANTOM_TAG, "ranges": RANGES,
            "inner": [{"name": n, "u": u, "v": v, "au": au, "av": av, "p": p} for n, u, v, au, av, _, p in INNER],
            "ventricles": [{"name": n, "u": u, "v": v, "au": au, "av": av, "angle": ang} for n, u, v, au, av, ang in VENTRICLES]}
