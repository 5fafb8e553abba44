"""Metrics of a scored role: image-level (AUROC, AUPR, the Youden threshold), pixel-level, the
mask diagnostics (does M cover the lesion?) and per-group aggregates (patient, volume).

Everything here takes arrays (numpy or torch) and returns plain dicts; nothing reads files.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from a2b_dist.errors import UserError

HIGHER_IS_BETTER = {"val_auc": True, "fid": False}   # the selection metrics (eval.metric)


def improves(metric: str, value: float, best: Optional[dict]) -> bool:
    """Whether ``value`` of the selection ``metric`` beats ``best`` ({"metric", "value", ...}; None,
    or another metric's, is beaten by anything)."""
    if best is None or best.get("metric") != metric:
        return True
    return value > best["value"] if HIGHER_IS_BETTER[metric] else value < best["value"]


def _as_numpy(a: Any, dtype=np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict:
    """AUROC, AUPR, and sensitivity/specificity at the Youden threshold (max TPR - FPR).

    Labels: 0 healthy, > 0 anomalous, < 0 unknown (left out). A sample is flagged when
    score >= threshold (the rule of sklearn's roc_curve). Undefined values (one class only) are None.
    """
    labels = _as_numpy(labels, np.int64)
    scores = _as_numpy(scores)
    known = labels >= 0
    y = (labels[known] > 0).astype(np.int64)
    s = scores[known]
    out: dict[str, Any] = {"n": int(known.sum()), "n_healthy": int((y == 0).sum()),
                           "n_anomalous": int((y == 1).sum()), "auroc": None, "aupr": None,
                           "threshold": None, "sensitivity": None, "specificity": None}
    if out["n_healthy"] == 0 or out["n_anomalous"] == 0:
        return out
    fpr, tpr, thresholds = roc_curve(y, s)
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    if not math.isfinite(threshold):  # roc_curve's first point (flag nothing): keep it finite for JSON
        threshold = float(np.nextafter(s.max(), np.inf))
    flagged = s >= threshold
    out.update(auroc=float(roc_auc_score(y, s)), aupr=float(average_precision_score(y, s)),
               threshold=threshold,
               sensitivity=float(flagged[y == 1].mean()), specificity=float((~flagged[y == 0]).mean()))
    return out


def pixel_auroc(maps: Any, gt_masks: Any) -> Optional[float]:
    """AUROC of per-pixel values against ground-truth masks (any shapes with equal element counts);
    None when the masks hold only one class."""
    values = _as_numpy(maps).ravel()
    truth = _as_numpy(gt_masks).ravel() > 0.5
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, values))


# Pixel-level metrics in constant memory. A non-negative float32's bit pattern, read as an integer,
# grows with its value; dropping its low HIST_SHIFT bits leaves HIST_BINS bins, each about 2^-10
# (0.1%) of its value wide, at whatever scale the maps have (0.001 or 1). Every map and mask pixel of
# an image with ground truth is counted into its bin, as a positive or a negative pixel, and with
# the weight 1/(size of its ground-truth region) for PRO; the histograms add across batches and
# ranks. Up to EXACT_PIXELS annotated pixels the values are also kept, and AUROC/AUPR are exact.
HIST_SHIFT = 13
HIST_BINS = 1 << (31 - HIST_SHIFT)
EXACT_PIXELS = 1 << 20
MAP_SCALE_PERCENTILE = 99.5        # heat maps are drawn from 0 to this percentile of the set's map values
PRO_FPR_LIMIT = 0.3                 # AUPRO integrates the per-region overlap up to this FPR (MVTec AD)
_HIST_ROWS = ("neg", "pos", "pro")  # per quantity (M, the difference map): counts, counts, region weights


def value_bins(values: Any) -> np.ndarray:
    """Histogram bin of each value (flattened, int32); NaN and values <= 0 fall in bin 0."""
    v = _as_numpy(values, np.float32).reshape(-1)
    v = np.where(v > 0, v, np.float32(0))
    return v.view(np.int32) >> HIST_SHIFT


def bin_value(index: int | np.ndarray) -> np.ndarray:
    """The lowest value of a histogram bin (the inverse of value_bins up to the bin width)."""
    return (np.asarray(index, np.int64).astype(np.int32) << HIST_SHIFT).view(np.float32).astype(np.float64)


def _region_weights(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """For each ground-truth pixel of (N, H, W), in row-major order: 1 / the size of its 8-connected
    region within its image; and the number of regions."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True                                    # connected within an image, never across
    labels, count = ndimage.label(gt, structure=structure)
    inside = labels[gt]
    sizes = np.bincount(inside, minlength=count + 1).astype(np.float64)
    sizes[0] = 1.0
    return 1.0 / sizes[inside], int(count)


def _histograms(values: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(3, HIST_BINS): counts of negative and positive pixels and the region weights, per bin."""
    idx = value_bins(values)
    truth = truth.reshape(-1)
    inside = idx[truth]
    out = np.empty((len(_HIST_ROWS), HIST_BINS))
    out[1] = np.bincount(inside, minlength=HIST_BINS)
    out[0] = np.bincount(idx, minlength=HIST_BINS) - out[1]
    out[2] = np.bincount(inside, weights=weights, minlength=HIST_BINS)
    return out


def summarise_masks(masks: Any, labels: Any, gt_masks: Any = None, has_mask: Any = None,
                    diff_maps: Any = None) -> dict:
    """Mergeable summary of masks M (N, 1, H, W) or (N, H, W) in [0, 1].

    ``gt_masks`` (same shape, {0, 1}) with ``has_mask`` (N,) bool select the images whose ground truth
    is known (all of them when has_mask is None); ``diff_maps`` (same shape) add the difference map's
    pixel metrics. Its size does not grow with the pixels (the histograms are fixed; the values
    themselves are kept only up to EXACT_PIXELS). Add summaries with ``add_mask_summary`` or
    ``merge_mask_summaries``, finish with ``finish_mask_diagnostics``.
    """
    m = _as_numpy(masks, np.float32)
    m = m.reshape(m.shape[0], -1)                                     # (N, H*W)
    y = _as_numpy(labels, np.int64).ravel()
    image_mean = m.mean(axis=1, dtype=np.float64)                    # (N,)
    summary: dict[str, Any] = {
        "n": m.shape[0], "n_known": 0,
        "pix_sum": m.sum(axis=0, dtype=np.float64), "pix_sqsum": np.square(m, dtype=np.float64).sum(axis=0),
        "label_sum": np.array([image_mean[y == 0].sum(), image_mean[y > 0].sum()]),
        "label_count": np.array([(y == 0).sum(), (y > 0).sum()], dtype=np.int64),
        "in_sum": 0.0, "in_count": 0.0, "out_sum": 0.0, "out_count": 0.0,
        "hist": None, "regions": 0, "has_diff": diff_maps is not None,
        "exact": {"m": [], "d": [], "gt": []}, "pixels": 0,
        # every difference-map value of every image (with ground truth or not): the heat maps' scale
        "map_hist": (np.bincount(value_bins(diff_maps), minlength=HIST_BINS).astype(np.float64)
                     if diff_maps is not None else None),
    }
    if gt_masks is None:
        return summary
    gt = _as_numpy(gt_masks, np.float32).reshape(m.shape[0], -1) > 0.5
    known = np.ones(m.shape[0], bool) if has_mask is None else _as_numpy(has_mask, bool).ravel()
    every = bool(known.all())
    mk, gk = (m, gt) if every else (m[known], gt[known])
    inside = float(mk[gk].sum(dtype=np.float64))
    summary.update(n_known=int(known.sum()), in_sum=inside, in_count=float(gk.sum()),
                   out_sum=float(mk.sum(dtype=np.float64)) - inside, out_count=float((~gk).sum()),
                   pixels=int(gk.size))
    if not gk.size:
        return summary
    side = tuple(gt_masks.shape[-2:])
    weights, summary["regions"] = _region_weights(gk.reshape(-1, *side))
    d = None
    if diff_maps is not None:
        d = _as_numpy(diff_maps, np.float32).reshape(m.shape[0], -1)
        d = d if every else d[known]
    hist = np.zeros((2, len(_HIST_ROWS), HIST_BINS))
    hist[0] = _histograms(mk, gk, weights)
    if d is not None:
        hist[1] = _histograms(d, gk, weights)
    summary["hist"] = hist
    if gk.size <= EXACT_PIXELS:
        summary["exact"] = {"m": [mk.ravel().copy()], "gt": [gk.ravel().copy()],
                            "d": [d.ravel().copy()] if d is not None else []}
    else:
        summary["exact"] = None
    return summary


_SUMS = ("n", "n_known", "pix_sum", "pix_sqsum", "label_sum", "label_count", "in_sum", "in_count", "out_sum",
         "out_count", "regions", "pixels")


def add_mask_summary(total: dict, part: dict) -> dict:
    """Add ``part`` into ``total`` in place (its histograms too, without a copy) and return it; the
    kept pixel values are dropped once more than EXACT_PIXELS are annotated in all."""
    if part is None or part["n"] == 0:
        return total
    for k in _SUMS:
        total[k] = total[k] + part[k]
    total["has_diff"] = total["has_diff"] and part["has_diff"]
    if part.get("map_hist") is not None:
        if total.get("map_hist") is None:
            total["map_hist"] = part["map_hist"].copy()
        else:
            total["map_hist"] += part["map_hist"]
    if part["hist"] is not None:
        if total["hist"] is None:
            total["hist"] = part["hist"].copy()
        else:
            total["hist"] += part["hist"]
    if total["exact"] is not None and part["exact"] is not None and total["pixels"] <= EXACT_PIXELS:
        for k in total["exact"]:
            total["exact"][k] = total["exact"][k] + part["exact"][k]
    else:
        total["exact"] = None
    return total


def merge_mask_summaries(summaries: Iterable[dict]) -> dict:
    """Add up summaries from batches or ranks into a new one (the inputs are left as they are)."""
    summaries = [s for s in summaries if s is not None and s["n"] > 0]
    if not summaries:
        raise ValueError("no mask summaries to merge")
    first = summaries[0]
    out = {**first, "hist": None if first["hist"] is None else first["hist"].copy(),
           "map_hist": None if first.get("map_hist") is None else first["map_hist"].copy(),
           "exact": None if first["exact"] is None else {k: list(v) for k, v in first["exact"].items()}}
    for s in summaries[1:]:
        add_mask_summary(out, s)
    return out


def hist_percentile(counts: np.ndarray, q: float) -> Optional[float]:
    """The value below which ``q`` percent of the counted values lie (the upper edge of the bin where
    the cumulative count reaches it); None for an empty histogram."""
    total = counts.sum()
    if not total:
        return None
    i = int(np.searchsorted(np.cumsum(counts), q / 100 * total, side="left"))
    return float(bin_value(min(i + 1, HIST_BINS - 1)))


def binned_auroc(neg: np.ndarray, pos: np.ndarray) -> Optional[float]:
    """AUROC from counts per bin (ascending values): P(pos > neg) + P(same bin) / 2."""
    n_neg, n_pos = neg.sum(), pos.sum()
    if not n_neg or not n_pos:
        return None
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_neg * n_pos))


def binned_aupr(neg: np.ndarray, pos: np.ndarray) -> Optional[float]:
    """Average precision from counts per bin: sum over thresholds (descending) of the recall step
    times the precision there (sklearn's definition, one threshold per bin)."""
    n_pos = pos.sum()
    if not n_pos or not neg.sum():
        return None
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    step = pos[::-1] > 0
    return float((pos[::-1][step] / n_pos * tp[step] / (tp[step] + fp[step])).sum())


def binned_aupro(neg: np.ndarray, pro: np.ndarray, regions: int, fpr_limit: float = PRO_FPR_LIMIT) -> Optional[float]:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by it (MVTec AD's AUPRO):
    at each threshold, PRO is the mean over ground-truth regions of the share of the region's pixels
    at or above it, FPR the share of negative pixels at or above it; the curve is integrated with the
    trapezoid rule and cut at the limit by linear interpolation."""
    if not regions or not neg.sum():
        return None
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
    overlap = np.concatenate([[0.0], np.cumsum(pro[::-1]) / regions])
    keep = np.concatenate([[True], (neg[::-1] > 0) | (pro[::-1] > 0)])
    fpr, overlap = fpr[keep], overlap[keep]
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if cut < len(fpr):
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], overlap[cut - 1], overlap[cut]
        y = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        fpr, overlap = np.append(fpr[:cut], fpr_limit), np.append(overlap[:cut], y)
    return float(np.trapezoid(overlap, fpr) / fpr_limit)


def _pixel_metrics(summary: dict, q: int, key: str) -> dict:
    """AUROC, AUPR (exact while the values are kept, else binned) and AUPRO of quantity q."""
    hist = summary["hist"]
    if hist is None:
        return {"auroc": None, "aupr": None, "aupro": None}
    neg, pos, pro = hist[q]
    exact = summary["exact"]
    if exact is not None and exact[key]:
        values, truth = np.concatenate(exact[key]), np.concatenate(exact["gt"])
        auroc = pixel_auroc(values, truth)
        aupr = float(average_precision_score(truth, values)) if auroc is not None else None
    else:
        auroc, aupr = binned_auroc(neg, pos), binned_aupr(neg, pos)
    return {"auroc": auroc, "aupr": aupr, "aupro": binned_aupro(neg, pro, summary["regions"])}


def _ratio(a: float, b: float) -> Optional[float]:
    return float(a / b) if b else None


def finish_mask_diagnostics(summary: dict) -> dict:
    """The diagnostics of issue 5 from a (merged) summary; None where the data cannot say.

    mask_mean_healthy / _anomalous: mean M per image, averaged over images of that label;
    mask_mean_inside / _outside: mean M over ground-truth anomaly pixels / the other known pixels;
    mask_pixel_std: per-pixel standard deviation of M across images (population), averaged over
    pixels (near 0 when M is the same pattern on every image);
    mask_pixel_auroc / diff_pixel_auroc (and _aupr, _aupro up to FPR 0.3): pixel metrics of M and of
    the difference map |x - B'|; pixel_metrics says whether AUROC/AUPR are exact or from histograms.
    """
    n = summary["n"]
    mean = summary["pix_sum"] / n
    var = np.maximum(summary["pix_sqsum"] / n - mean * mean, 0.0)
    inside = _ratio(summary["in_sum"], summary["in_count"])
    outside = _ratio(summary["out_sum"], summary["out_count"])
    mask = _pixel_metrics(summary, 0, "m")
    diff = _pixel_metrics(summary, 1, "d") if summary["has_diff"] else {"auroc": None, "aupr": None, "aupro": None}
    return {
        "mask_mean": float(mean.mean()),
        "mask_mean_healthy": _ratio(summary["label_sum"][0], summary["label_count"][0]),
        "mask_mean_anomalous": _ratio(summary["label_sum"][1], summary["label_count"][1]),
        "mask_mean_inside": inside,
        "mask_mean_outside": outside,
        "mask_inside_outside_ratio": (inside / outside if inside is not None and outside else None),
        "mask_pixel_std": float(np.sqrt(var).mean()),
        "mask_pixel_auroc": mask["auroc"], "mask_pixel_aupr": mask["aupr"], "mask_pixel_aupro": mask["aupro"],
        "diff_pixel_auroc": diff["auroc"], "diff_pixel_aupr": diff["aupr"], "diff_pixel_aupro": diff["aupro"],
        "pixel_metrics": ("exact" if summary["exact"] is not None else "binned") if summary["hist"] is not None else None,
        "annotated_pixels": int(summary["pixels"]),
        "map_scale": (hist_percentile(summary["map_hist"], MAP_SCALE_PERCENTILE)
                      if summary.get("map_hist") is not None else None),
        "images_with_ground_truth": int(summary["n_known"]),
    }


def mask_diagnostics(masks: Any, labels: Any, gt_masks: Any = None, has_mask: Any = None,
                     diff_maps: Any = None) -> dict:
    """Mask diagnostics of whole arrays in one call (see ``finish_mask_diagnostics``)."""
    return finish_mask_diagnostics(summarise_masks(masks, labels, gt_masks, has_mask, diff_maps))


def group_metrics(keys: Sequence[str], labels: np.ndarray, scores: np.ndarray, groups: dict[str, str]) -> dict:
    """Scores aggregated per group (patient, volume): each group's mean and max image score, its
    label anomalous when any of its images is (unknown when any is unknown), and image_metrics of
    both aggregates over the groups. ``groups`` maps each key to its group."""
    if not len(keys):
        raise UserError("no scored samples to group")
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(groups[key], []).append(i)
    names = sorted(members)
    group_labels = np.array([-1 if (labels[members[g]] < 0).any() else int((labels[members[g]] > 0).any())
                             for g in names], dtype=np.int64)
    mean = np.array([scores[members[g]].mean() for g in names])
    top = np.array([scores[members[g]].max() for g in names])
    return {"groups": len(names), "images_per_group": {"min": min(map(len, members.values())),
                                                         "max": max(map(len, members.values()))},
            "mean": image_metrics(group_labels, mean), "max": image_metrics(group_labels, top),
            "table": [(g, int(group_labels[i]), len(members[g]), float(mean[i]), float(top[i]))
                      for i, g in enumerate(names)]}
