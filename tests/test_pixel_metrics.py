"""Pixel-level metrics in constant memory: histograms of map values against the exact computation."""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from a2b_dist import metrics


def _maps(seed: int, n: int = 40, side: int = 32, scale: float = 1.0):
    """Maps that are higher inside square lesions, plus noise, at a given scale of values."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((n, 1, side, side), bool)
    for i in range(n // 2, n):                               # half the images carry one or two lesions
        for _ in range(rng.integers(1, 3)):
            r, c, s = rng.integers(0, side - 8), rng.integers(0, side - 8), rng.integers(2, 8)
            gt[i, 0, r:r + s, c:c + s] = True
    maps = (rng.gamma(2.0, 1.0, gt.shape) + 1.5 * gt * rng.random(gt.shape)) * scale
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    return maps.astype(np.float32), gt, labels


def _aupro_reference(maps: np.ndarray, gt: np.ndarray, limit: float = 0.3) -> float:
    """Per-region overlap straight from its definition, one threshold per distinct value."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    labels, count = ndimage.label(gt[:, 0], structure=structure)
    values = maps[:, 0]
    thresholds = np.unique(values)[::-1]

    def share_at_or_above(v):                        # for every threshold at once
        v = np.sort(v)
        return 1.0 - np.searchsorted(v, thresholds, side="left") / len(v)

    fpr = np.concatenate([[0.0], share_at_or_above(values[~gt[:, 0]])])
    pro = np.concatenate([[0.0], np.mean([share_at_or_above(values[labels == r]) for r in range(1, count + 1)], 0)])
    grid = np.linspace(0, limit, 20001)
    return float(np.trapezoid(np.interp(grid, fpr, pro), grid) / limit)


@pytest.mark.parametrize("scale", [0.003, 1.0])
def test_binned_pixel_metrics_agree_with_the_exact_ones(scale):
    """At the scale of the demo's maps (values near 0.001-0.006) and at 1, AUROC and AUPR from the
    histograms are within 0.001 of sklearn's on the same pixels; AUPRO within 0.002 of its definition."""
    maps, gt, labels = _maps(0, scale=scale)
    s = metrics.summarise_masks(np.clip(maps, 0, 1), labels, gt, None, maps)
    neg, pos, pro = s["hist"][1]
    assert metrics.binned_auroc(neg, pos) == pytest.approx(roc_auc_score(gt.ravel(), maps.ravel()), abs=1e-3)
    assert metrics.binned_aupr(neg, pos) == pytest.approx(average_precision_score(gt.ravel(), maps.ravel()), abs=1e-3)
    assert metrics.binned_aupro(neg, pro, s["regions"]) == pytest.approx(_aupro_reference(maps, gt), abs=2e-3)
    per_image = sum(ndimage.label(g[0], structure=np.ones((3, 3)))[1] for g in gt)   # 8-connected
    assert s["regions"] == per_image


def test_a_perfect_map_has_aupro_one_and_a_constant_map_the_chance_diagonal():
    maps, gt, labels = _maps(1)
    perfect = gt.astype(np.float32) + 0.01
    d = metrics.mask_diagnostics(np.clip(maps, 0, 1), labels, gt, None, perfect)
    assert d["diff_pixel_auroc"] == 1.0 and d["diff_pixel_aupr"] == pytest.approx(1.0)
    assert d["diff_pixel_aupro"] == pytest.approx(1.0)
    flat = metrics.mask_diagnostics(np.full(gt.shape, 0.5), labels, gt)
    # one threshold takes every pixel: the curve is the diagonal, whose area up to 0.3 is 0.3 / 2
    assert flat["mask_pixel_auroc"] == pytest.approx(0.5) and flat["mask_pixel_aupro"] == pytest.approx(0.15)


def test_large_sets_switch_to_the_histograms_without_growing(monkeypatch):
    """Past EXACT_PIXELS annotated pixels the values are no longer kept: the summary's size stays
    fixed however many batches are added, and the binned answer matches the exact one."""
    maps, gt, labels = _maps(2, n=60)
    exact = metrics.mask_diagnostics(np.clip(maps, 0, 1), labels, gt, None, maps)
    monkeypatch.setattr(metrics, "EXACT_PIXELS", 5 * 32 * 32)
    summary = None
    for i in range(0, 60, 4):
        part = metrics.summarise_masks(np.clip(maps[i:i + 4], 0, 1), labels[i:i + 4], gt[i:i + 4], None, maps[i:i + 4])
        summary = part if summary is None else metrics.merge_mask_summaries([summary, part])
    assert summary["exact"] is None and summary["hist"].shape == (2, 3, metrics.HIST_BINS)
    binned = metrics.finish_mask_diagnostics(summary)
    assert exact["pixel_metrics"] == "exact" and binned["pixel_metrics"] == "binned"
    for key in ("diff_pixel_auroc", "diff_pixel_aupr", "mask_pixel_auroc", "mask_pixel_aupr"):
        assert binned[key] == pytest.approx(exact[key], abs=1e-3), key
    assert binned["diff_pixel_aupro"] == exact["diff_pixel_aupro"]          # always from the histograms
    assert binned["annotated_pixels"] == gt.size


def test_bins_are_monotone_and_fine_at_every_scale():
    values = np.array([0.0, -1.0, np.nan, 1e-6, 1.001e-6, 0.003, 0.00301, 0.5, 1.0, 2.0], np.float32)
    bins = metrics.value_bins(values)
    assert bins[0] == bins[1] == bins[2] == 0                               # <= 0 and NaN at the bottom
    assert list(bins[3:]) == sorted(bins[3:]) and len(set(bins[3:])) == len(bins[3:])   # 0.3% apart: apart
    low = metrics.bin_value(bins[3:])
    assert np.all(low <= values[3:]) and np.all(values[3:] - low <= values[3:] * 2 ** -10)


_MALLINFO_PROBE = r"""
import ctypes, sys
import numpy as np
from a2b_dist.memory import MMAP_THRESHOLD, bound_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "bound":
    assert bound_heap()
big = np.ones(4_000_000); del big            # a freed 32 MB mapping: glibc raises its dynamic threshold
before = libc.mallinfo2().hblkhd
block = np.ones(4 * MMAP_THRESHOLD // 8)     # 512 KiB, above the fixed threshold, below the raised one
print(int(libc.mallinfo2().hblkhd - before >= 4 * MMAP_THRESHOLD))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(platform.libc_ver()),
                    reason="memory.bound_heap acts on glibc only")
def test_bound_heap_keeps_large_blocks_out_of_the_heap():
    """Scoring's per-batch temporaries (megabytes) must come from mappings of their own, which go back
    to the system when freed: the unbounded heap let `a2b evaluate` grow ~0.2 MB per 128 px image
    (benchmarks/README.md). Without bound_heap, glibc serves a 512 KiB block from the heap once a
    larger mapping was freed; with it, from a mapping."""
    def mapped(mode):
        done = subprocess.run([sys.executable, "-c", _MALLINFO_PROBE, mode], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip() == "1"
    assert not mapped("default")       # the probe sees glibc's dynamic threshold at work
    assert mapped("bound")
