"""Heat maps a reader can see: one colour scale per run, from a high percentile of the set's maps,
so that healthy panels stay dark and lesions light up (checked in a real browser's screenshot)."""
from __future__ import annotations

import numpy as np
import pytest

from a2b_dist import metrics, scoring
from a2b_dist.report import write_evaluation_report


def _result(n: int = 20, side: int = 32):
    """Scored images whose difference maps are small everywhere (0.0005, as the demo's) and ten
    times larger inside a square on the anomalous ones: the scale of a trained model's maps."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side] / side
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    x = np.repeat((0.6 * yy - 0.3)[None, None], n, 0) + 0.05 * rng.standard_normal((n, 1, side, side))
    gt = np.zeros((n, 1, side, side), bool)
    gt[labels == 1, :, 8:18, 8:18] = True
    diff = (0.0005 * rng.random((n, 1, side, side)) + 0.005 * gt).astype(np.float32)
    mask = np.clip(0.05 + 0.8 * gt, 0, 1).astype(np.float32)
    keys = [f"img-{i:02d}" for i in range(n)]
    arrays = [{"x": x[i].astype(np.float32), "b_prime": (x[i] - diff[i]).astype(np.float32), "mask": mask[i, 0],
               "diff": diff[i, 0], "gt": gt[i, 0].astype(np.float32)} for i in range(n)]
    score = diff.reshape(n, -1).mean(1)
    result = {"key": keys, "label": labels, "scores": {"mean": score}, "references": {},
              "mask_summary": metrics.summarise_masks(mask, labels, gt, None, diff), "panels": {0: [], 1: []}}
    healthy = [(keys[i], float(score[i]), arrays[i]) for i in range(n) if labels[i] == 0][:3]
    anomalous = [(keys[i], float(score[i]), arrays[i]) for i in range(n) if labels[i] == 1][:3]
    return result, healthy, anomalous, diff


def _page(tmp_path, name: str, result: dict, healthy, anomalous, scale):
    m = scoring.summarise_result(result, score="mean")
    m.update(checkpoint="ckpt", shards="shards", role="test", step=1, processes=1, map_scale=scale)
    page = {**result, "extremes": {"healthy_highest": healthy, "anomalous_lowest": anomalous[:0],
                                   "anomalous_highest": anomalous}}
    prov = {"time": "t", "host": "h", "argv": ["a2b"], "versions": {}, "manifests": {}}
    return write_evaluation_report(tmp_path / f"{name}.html", metrics=m, result=page, config_yaml="", prov=prov)


def _hot_pixels(png) -> int:
    """Pixels in the bright end of the inferno colour map (orange to pale yellow, blended over the
    grey input), not the mask's viridis greens (whose green exceeds their red)."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 150) & (r - b > 35) & (r >= g - 10)).sum())


def test_the_map_scale_is_a_high_percentile_of_every_map_value():
    result, _, _, diff = _result()
    scale = scoring.summarise_result(result, score="mean")["map_scale"]
    assert scale["percentile"] == metrics.MAP_SCALE_PERCENTILE
    expected = np.percentile(diff, metrics.MAP_SCALE_PERCENTILE)
    assert scale["value"] == pytest.approx(expected, rel=3e-3)        # the bin's width: 0.1% of the value
    # the same from halves added up (batches, ranks), and without ground truth (a2b detect)
    halves = [metrics.summarise_masks(np.zeros_like(d), np.zeros(len(d)), None, None, d) for d in (diff[:7], diff[7:])]
    merged = metrics.finish_mask_diagnostics(metrics.merge_mask_summaries(halves))
    assert merged["map_scale"] == pytest.approx(scale["value"])


def test_report_heat_maps_show_the_lesions_and_leave_healthy_panels_dark(tmp_path):
    """Screenshots in headless Chromium: with the run's scale the anomalous panels' squares light up
    and the healthy panels stay as dark as the page without heat; on the fixed 0-1 scale nothing does."""
    from conftest import chromium_screenshot

    result, healthy, anomalous, _ = _result()
    scale = scoring.summarise_result(result, score="mean")["map_scale"]
    hot = {}
    for name, (h, a, s) in {"healthy": (healthy, [], scale), "anomalous": ([], anomalous, scale),
                            "healthy-fixed": (healthy, [], None), "anomalous-fixed": ([], anomalous, None)}.items():
        page = _page(tmp_path, name, result, h, a, s)
        hot[name] = _hot_pixels(chromium_screenshot(page, tmp_path / f"{name}.png"))
        if s is not None:
            assert f"0 to {s['value']:.3g} (the {s['percentile']:g}th percentile of this set" in page.read_text()
    # three squares of 10 x 10 image pixels, several screen pixels each, light up; colour bars are alike
    assert hot["anomalous"] - hot["healthy"] > 1000
    assert abs(hot["anomalous-fixed"] - hot["healthy-fixed"]) < 100               # the old scale: nothing
