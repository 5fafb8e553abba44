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
EXACT_PIXELS = 1 << 22
PRO_FPR_LIMIT = 0.3                 # AUPRO integrates the per-region overlap up to this FPR (MVTec AD)
_HIST_ROWS = ("neg", "pos", "pro")  # per quantity (M, the difference map): counts, counts, region weights


def value_bins(values: Any) -> torch.Tensor:
    """Histogram bin of each value (flattened); NaN and values <= 0 fall in bin 0."""
    v = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    v = v.detach().float().cpu().reshape(-1)
    v = torch.where(v > 0, v, torch.zeros((), dtype=v.dtype))
    return (v.view(torch.int32) >> HIST_SHIFT).long()


def bin_value(index: int | np.ndarray) -> np.ndarray:
    """The lowest value of a histogram bin (the inverse of value_bins up to the bin width)."""
    return (np.asarray(index, np.int64).astype(np.int32) << HIST_SHIFT).view(np.float32).astype(np.float64)


def _regions(gt: np.ndarray) -> tuple[np.ndarray, int]:
    """Per pixel of (N, H, W) ground truth: 1 / the size of its 8-connected region (0 outside), and
    the number of regions."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True                                    # connected within an image, never across
    labels, count = ndimage.label(gt, structure=structure)
    if not count:
        return np.zeros(gt.shape, np.float64), 0
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    weight = np.zeros_like(sizes)
    weight[1:] = 1.0 / sizes[1:]
    return weight[labels], int(count)


def _histograms(values: np.ndarray, gt: np.ndarray, pro_weight: np.ndarray) -> np.ndarray:
    """(3, HIST_BINS): counts of negative and positive pixels, region weights, per bin."""
    idx = value_bins(values)
    truth = torch.from_numpy(gt.reshape(-1))
    out = torch.zeros(len(_HIST_ROWS), HIST_BINS, dtype=torch.float64)
    out[0] = torch.bincount(idx[~truth], minlength=HIST_BINS).double()
    out[1] = torch.bincount(idx[truth], minlength=HIST_BINS).double()
    out[2] = torch.bincount(idx, weights=torch.from_numpy(pro_weight.reshape(-1)), minlength=HIST_BINS)
    return out.numpy()


def summarise_masks(masks: Any, labels: Any, gt_masks: Any = None, has_mask: Any = None,
                    diff_maps: Any = None) -> dict:
    """Mergeable summary of masks M (N, 1, H, W) or (N, H, W) in [0, 1].

    ``gt_masks`` (same shape, {0, 1}) with ``has_mask`` (N,) bool select the images whose ground truth
    is known (all of them when has_mask is None); ``diff_maps`` (same shape) add the difference map's
    pixel metrics. Its size does not grow with the pixels (the histograms are fixed; the values
    themselves are kept only up to EXACT_PIXELS). Add summaries with ``merge_mask_summaries``,
    finish with ``finish_mask_diagnostics``.
    """
    m = _as_numpy(masks)
    m = m.reshape(m.shape[0], -1)                                     # (N, H*W)
    y = _as_numpy(labels, np.int64).ravel()
    image_mean = m.mean(axis=1)                                       # (N,)
    summary: dict[str, Any] = {
        "n": m.shape[0], "n_known": 0,
        "pix_sum": m.sum(axis=0), "pix_sqsum": (m * m).sum(axis=0),  # (H*W,) float64
        "label_sum": np.array([image_mean[y == 0].sum(), image_mean[y > 0].sum()]),
        "label_count": np.array([(y == 0).sum(), (y > 0).sum()], dtype=np.int64),
        "in_sum": 0.0, "in_count": 0.0, "out_sum": 0.0, "out_count": 0.0,
        "hist": None, "regions": 0, "has_diff": diff_maps is not None,
        "exact": {"m": [], "d": [], "gt": []}, "pixels": 0,
    }
    if gt_masks is None:
        return summary
    gt = _as_numpy(gt_masks).reshape(m.shape[0], -1) > 0.5
    known = np.ones(m.shape[0], bool) if has_mask is None else _as_numpy(has_mask, bool).ravel()
    mk, gk = m[known], gt[known]
    summary.update(n_known=int(known.sum()), in_sum=float(mk[gk].sum()), in_count=float(gk.sum()),
                   out_sum=float(mk[~gk].sum()), out_count=float((~gk).sum()), pixels=int(gk.size))
    if not gk.size:
        return summary
    side = _as_numpy(gt_masks).shape[-2:]
    pro_weight, summary["regions"] = _regions(gk.reshape(-1, *side))
    d = _as_numpy(diff_maps).reshape(m.shape[0], -1)[known] if diff_maps is not None else None
    hist = np.zeros((2, len(_HIST_ROWS), HIST_BINS))
    hist[0] = _histograms(mk, gk, pro_weight)
    if d is not None:
        hist[1] = _histograms(d, gk, pro_weight)
    summary["hist"] = hist
    if gk.size <= EXACT_PIXELS:
        summary["exact"] = {"m": [mk.ravel().astype(np.float32)], "gt": [gk.ravel()],
                            "d": [d.ravel().astype(np.float32)] if d is not None else []}
    else:
        summary["exact"] = None
    return summary


def merge_mask_summaries(summaries: Iterable[dict]) -> dict:
    """Add up summaries from batches or ranks (sums and histograms add; the kept pixel values are
    dropped once more than EXACT_PIXELS are annotated in all)."""
    summaries = [s for s in summaries if s is not None and s["n"] > 0]
    if not summaries:
        raise ValueError("no mask summaries to merge")
    out = dict(summaries[0])
    out["exact"] = None if out["exact"] is None else {k: list(v) for k, v in out["exact"].items()}
    for s in summaries[1:]:
        for k in ("n", "n_known", "pix_sum", "pix_sqsum", "label_sum", "label_count",
                  "in_sum", "in_count", "out_sum", "out_count", "regions", "pixels"):
            out[k] = out[k] + s[k]
        out["has_diff"] = out["has_diff"] and s["has_diff"]
        if s["hist"] is not None:
            out["hist"] = s["hist"].copy() if out["hist"] is None else out["hist"] + s["hist"]
        if out["exact"] is not None and s["exact"] is not None:
            for k in out["exact"]:
                out["exact"][k] += s["exact"][k]
        else:
            out["exact"] = None
    if out["pixels"] > EXACT_PIXELS:
        out["exact"] = None
    return out


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
