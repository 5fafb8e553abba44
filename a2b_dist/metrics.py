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


def summarise_masks(masks: Any, labels: Any, gt_masks: Any = None, has_mask: Any = None,
                    diff_maps: Any = None) -> dict:
    """Mergeable summary of masks M (N, 1, H, W) or (N, H, W) in [0, 1].

    ``gt_masks`` (same shape, {0, 1}) with ``has_mask`` (N,) bool select the images whose ground truth
    is known (all of them when has_mask is None); ``diff_maps`` (same shape) add the difference map's
    pixel AUROC. Finish with ``finish_mask_diagnostics``.
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
        "m_pix": np.zeros(0, np.float32), "d_pix": np.zeros(0, np.float32), "gt_pix": np.zeros(0, bool),
    }
    if gt_masks is None:
        return summary
    gt = _as_numpy(gt_masks).reshape(m.shape[0], -1) > 0.5
    known = np.ones(m.shape[0], bool) if has_mask is None else _as_numpy(has_mask, bool).ravel()
    mk, gk = m[known], gt[known]
    summary.update(n_known=int(known.sum()), in_sum=float(mk[gk].sum()), in_count=float(gk.sum()),
                   out_sum=float(mk[~gk].sum()), out_count=float((~gk).sum()),
                   m_pix=mk.ravel().astype(np.float32), gt_pix=gk.ravel())
    if diff_maps is not None:
        d = _as_numpy(diff_maps).reshape(m.shape[0], -1)
        summary["d_pix"] = d[known].ravel().astype(np.float32)
    return summary


def merge_mask_summaries(summaries: Iterable[dict]) -> dict:
    """Add up summaries from batches or ranks (sums add, pixel lists concatenate)."""
    summaries = [s for s in summaries if s is not None and s["n"] > 0]
    if not summaries:
        raise ValueError("no mask summaries to merge")
    out = dict(summaries[0])
    for s in summaries[1:]:
        for k in ("n", "n_known", "pix_sum", "pix_sqsum", "label_sum", "label_count",
                  "in_sum", "in_count", "out_sum", "out_count"):
            out[k] = out[k] + s[k]
        for k in ("m_pix", "d_pix", "gt_pix"):
            out[k] = np.concatenate([out[k], s[k]])
    return out


def _ratio(a: float, b: float) -> Optional[float]:
    return float(a / b) if b else None


def finish_mask_diagnostics(summary: dict) -> dict:
    """The diagnostics of issue 5 from a (merged) summary; None where the data cannot say.

    mask_mean_healthy / _anomalous: mean M per image, averaged over images of that label;
    mask_mean_inside / _outside: mean M over ground-truth anomaly pixels / the other known pixels;
    mask_pixel_std: per-pixel standard deviation of M across images (population), averaged over
    pixels (near 0 when M is the same pattern on every image);
    mask_pixel_auroc / diff_pixel_auroc: pixel AUROC of M and of the difference map |x - B'|.
    """
    n = summary["n"]
    mean = summary["pix_sum"] / n
    var = np.maximum(summary["pix_sqsum"] / n - mean * mean, 0.0)
    inside = _ratio(summary["in_sum"], summary["in_count"])
    outside = _ratio(summary["out_sum"], summary["out_count"])
    gt = summary["gt_pix"]
    return {
        "mask_mean": float(mean.mean()),
        "mask_mean_healthy": _ratio(summary["label_sum"][0], summary["label_count"][0]),
        "mask_mean_anomalous": _ratio(summary["label_sum"][1], summary["label_count"][1]),
        "mask_mean_inside": inside,
        "mask_mean_outside": outside,
        "mask_inside_outside_ratio": (inside / outside if inside is not None and outside else None),
        "mask_pixel_std": float(np.sqrt(var).mean()),
        "mask_pixel_auroc": pixel_auroc(summary["m_pix"], gt) if gt.size else None,
        "diff_pixel_auroc": (pixel_auroc(summary["d_pix"], gt)
                             if gt.size and summary["d_pix"].size == gt.size else None),
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
