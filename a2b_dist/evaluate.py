"""Evaluation: anomaly scores, image and pixel AUROC, difference maps, mask diagnostics,
training-free references, and the ``a2b evaluate`` command.

One process:
    a2b evaluate --checkpoint runs/demo --shards data/demo/test --out runs/demo/eval --references
Several processes (every sample is scored exactly once across ranks; rank 0 writes the files):
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m a2b_dist.evaluate \
        --checkpoint runs/demo --shards data/demo/test --out runs/demo/eval

The paper's score (section 3.3, 4) is the mean of the difference map |x - B'|; ``topk`` (the mean of
the largest topk_percent of the map) is reported beside it. Files written to --out:
metrics.json, scores.csv, roc.png, masks.png, maps/<class>-<key>.png; with ``--group-by patient``
also groups.csv and a ``groups`` entry in metrics.json (AUROC of each group's mean and max score).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from a2b_dist import losses
from a2b_dist.errors import UserError, check_output_folder, number_arg

SCORE_KINDS = losses.SCORE_KINDS
HIGHER_IS_BETTER = {"val_auc": True, "fid": False}


# ---------------------------------------------------------------------------------------------
# Image-level metrics

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


# ---------------------------------------------------------------------------------------------
# Mask diagnostics (issue 5): does M depend on the image and cover the anomaly?
# Computed from a summary of sums and pixel lists that merges exactly across batches and ranks.

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


# ---------------------------------------------------------------------------------------------
# Training-free references (issue 5): what no learning achieves on the same images.

def greyness(x: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - |2u - 1| with u = (x + 1) / 2 the image in [0, 1]: (B, C, H, W) in [-1, 1] -> (B,).
    High for mid-grey pixels; a mean-filled square on black background raises it."""
    u = (x.float() + 1) / 2
    return (1 - (2 * u - 1).abs()).flatten(1).mean(dim=1)


def healthy_distance(x: torch.Tensor, healthy_mean: torch.Tensor) -> torch.Tensor:
    """Mean absolute distance, in [0, 1] intensity units, to the healthy mean image (C, H, W): -> (B,)."""
    return ((x.float() - healthy_mean.float().to(x.device)).abs() / 2).flatten(1).mean(dim=1)


@torch.no_grad()
def healthy_mean_image(healthy_dir: str | os.PathLike, *, batch_size: int = 64, image_size: Optional[int] = None,
                       channels: Optional[int] = None, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, skip_corrupt: bool = False) -> torch.Tensor:
    """Mean image (C, H, W) in [-1, 1] over a role (the healthy shards), summed across ranks."""
    from a2b_dist.data import eval_batches

    total: Optional[torch.Tensor] = None
    count = 0
    for batch in eval_batches(healthy_dir, batch_size=batch_size, image_size=image_size, channels=channels,
                              rank=rank, world_size=world_size, num_workers=num_workers,
                              skip_corrupt=skip_corrupt):
        s = batch["image"].double().sum(dim=0)
        total = s if total is None else total + s
        count += batch["image"].shape[0]
    parts = gather_objects((total, count), world_size)
    sums = [t for t, _ in parts if t is not None]
    n = sum(c for _, c in parts)
    if not n:
        raise UserError(f"{healthy_dir} holds no images to average for the healthy-distance reference")
    return (torch.stack(sums).sum(dim=0) / n).float()


# ---------------------------------------------------------------------------------------------
# Distributed helpers

def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-item list without a process group)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def sample_priority(key: str, seed: int) -> float:
    """A fixed pseudo-random number in [0, 1) per (seed, key): picks samples the same way on any
    number of ranks and without touching any global RNG."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


# ---------------------------------------------------------------------------------------------
# The evaluation pass

@torch.no_grad()
def score_role(generator: torch.nn.Module, role_dir: str | os.PathLike, *, batch_size: int,
               topk_percent: float, device: str | torch.device = "cpu", image_size: Optional[int] = None,
               channels: Optional[int] = None, rank: int = 0, world_size: int = 1, num_workers: int = 0,
               skip_corrupt: bool = False, healthy_mean: Optional[torch.Tensor] = None,
               num_panels: int = 0, seed: int = 0) -> dict:
    """Score every sample of a role once across ranks; every rank returns the gathered result.

    Returns {"key": [...], "label": int64 (N,), "scores": {kind: (N,)}, "references": {kind: (N,)},
    "mask_summary": summary, "panels": {0: [...], 1: [...]}} sorted by key; panels hold up to
    num_panels samples per class (x, B', M, difference map, ground truth) chosen by key hash.
    """
    from a2b_dist.data import eval_batches

    keys: list[str] = []
    labels: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {k: [] for k in SCORE_KINDS}
    refs: dict[str, list[np.ndarray]] = {"greyness": []}
    if healthy_mean is not None:
        refs["healthy_distance"] = []
    summaries: list[dict] = []
    panels: dict[int, list[tuple]] = {0: [], 1: []}
    for batch in eval_batches(role_dir, batch_size=batch_size, image_size=image_size, channels=channels,
                              rank=rank, world_size=world_size, num_workers=num_workers,
                              skip_corrupt=skip_corrupt):
        x = batch["image"].to(device)                                   # (B, C, H, W)
        b_int, m = generator(x)                                         # (B, C, H, W), (B, 1, H, W)
        b_prime = losses.blend_healthy(x, b_int, m)                     # Eq. 1
        diff = losses.anomaly_map(x, b_prime)                           # (B, 1, H, W)
        diff_int = losses.anomaly_map(x, b_int)                         # before the mask: (B, 1, H, W)
        y = batch["label"].cpu().numpy()
        keys += list(batch["key"])
        labels.append(y)
        for kind in SCORE_KINDS:
            scores[kind].append(losses.anomaly_score(diff, kind, topk_percent, m, diff_int).cpu().numpy())
        refs["greyness"].append(greyness(x).cpu().numpy())
        if healthy_mean is not None:
            refs["healthy_distance"].append(healthy_distance(x, healthy_mean).cpu().numpy())
        summaries.append(summarise_masks(m, y, batch["mask"], batch["has_mask"], diff))
        if num_panels:
            _keep_panels(panels, num_panels, seed, batch, x, b_prime, m, diff)

    local = {
        "key": keys,
        "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "scores": {k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()},
        "references": {k: np.concatenate(v) if v else np.zeros(0) for k, v in refs.items()},
        "mask_summary": merge_mask_summaries(summaries) if summaries else None,
        "panels": panels,
    }
    return _merge_ranks(gather_objects(local, world_size), num_panels)


def _keep_panels(panels: dict, limit: int, seed: int, batch: dict, x, b_prime, m, diff) -> None:
    for i, key in enumerate(batch["key"]):
        label = int(batch["label"][i])
        if label < 0:
            continue
        cls = 1 if label > 0 else 0
        entry = (sample_priority(key, seed), key, {
            "x": x[i].cpu().numpy(), "b_prime": b_prime[i].cpu().numpy(), "mask": m[i, 0].cpu().numpy(),
            "diff": diff[i, 0].cpu().numpy(),
            "gt": batch["mask"][i, 0].numpy() if bool(batch["has_mask"][i]) else None})
        panels[cls].append(entry)
        panels[cls].sort(key=lambda e: e[0])
        del panels[cls][limit:]


def _merge_ranks(parts: list[dict], num_panels: int) -> dict:
    keys = [k for p in parts for k in p["key"]]
    if len(set(keys)) != len(keys):
        raise RuntimeError("a sample was scored on more than one rank; the data layer must split "
                           "a role so that every sample is read exactly once")
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    cat = lambda arrays: np.concatenate(arrays)[order] if keys else np.zeros(0)  # noqa: E731
    panels = {}
    for cls in (0, 1):
        entries = sorted((e for p in parts for e in p["panels"][cls]), key=lambda e: e[0])[:num_panels]
        panels[cls] = [(key, arrays) for _, key, arrays in entries]
    summaries = [p["mask_summary"] for p in parts if p["mask_summary"] is not None]
    return {
        "key": [keys[i] for i in order],
        "label": np.concatenate([p["label"] for p in parts])[order].astype(np.int64),
        "scores": {k: cat([p["scores"][k] for p in parts]) for k in parts[0]["scores"]},
        "references": {k: cat([p["references"][k] for p in parts]) for k in parts[0]["references"]},
        "mask_summary": merge_mask_summaries(summaries) if summaries else None,
        "panels": panels,
    }


def summarise_result(result: dict, *, score: str) -> dict:
    """metrics.json's body from score_role's result: the chosen score at the top level, every score
    and reference side by side, mask diagnostics, counts."""
    labels = result["label"]
    per_score = {k: image_metrics(labels, v) for k, v in result["scores"].items()}
    main = per_score[score]
    mask = finish_mask_diagnostics(result["mask_summary"]) if result["mask_summary"] else {}
    return {
        "score": score,
        "auroc": main["auroc"], "aupr": main["aupr"], "threshold": main["threshold"],
        "sensitivity": main["sensitivity"], "specificity": main["specificity"],
        "pixel_auroc": mask.get("diff_pixel_auroc"),
        "counts": {"samples": len(result["key"]), "healthy": int((labels == 0).sum()),
                   "anomalous": int((labels > 0).sum()), "unlabelled": int((labels < 0).sum()),
                   "with_ground_truth_masks": mask.get("images_with_ground_truth", 0)},
        "scores": per_score,
        "references": {k: image_metrics(labels, v) for k, v in result["references"].items()},
        "mask": mask,
    }


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


def sample_groups(role_dir: str | os.PathLike, field: str) -> dict[str, str]:
    """key -> the value of ``field`` in each sample's json (``patient``, ``volume``, ``group``)."""
    from a2b_dist.data.manifest import sample_origins

    out = {}
    for key, origin in sample_origins(role_dir).items():
        value = origin.get(field)
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"--group-by {field}: sample {key!r} in {role_dir} has no {field!r} in its json; "
                            "shards from `shards/build.py dicom` carry patient and group, `nifti` volume and group")
        out[key] = str(value)
    return out


def write_groups_csv(path: str | os.PathLike, field: str, table: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([field, "label", "images", "score_mean", "score_max"])
    for name, label, n, mean, top in table:
        writer.writerow([name, label, n, f"{mean:.6g}", f"{top:.6g}"])
    write_atomic(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Model selection hook for the trainer

def selection_metric(generator: torch.nn.Module, cfg, *, device: str | torch.device, rank: int = 0,
                     world_size: int = 1) -> dict[str, float]:
    """cfg.eval.metric for model selection, as a flat dict of floats that includes that key.

    ``val_auc``: image AUROC with cfg.eval.score on cfg.data.root/val, every score's AUROC
    (``val_auc_mean``, ``val_auc_topk``), AUPR, pixel AUROC and the mask diagnostics (``mask_*``;
    keys whose value is undefined are left out). ``fid``: FID of B' against the healthy role
    (see a2b_dist.fid.translation_fid). Every rank must call it and gets the same dict. Pass the
    unwrapped generator; its train/eval mode is restored, and no global RNG state is consumed.
    """
    was_training = generator.training
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    generator.eval()
    try:
        # fork_rng: whatever the data loaders draw from torch's global RNG is put back afterwards.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            if cfg.eval.metric == "fid":
                from a2b_dist import fid
                return fid.selection_fid(generator, cfg, device=device, rank=rank, world_size=world_size)
            return _selection_val_auc(generator, cfg, device=device, rank=rank, world_size=world_size)
    finally:
        generator.train(was_training)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _selection_val_auc(generator, cfg, *, device, rank, world_size) -> dict[str, float]:
    result = score_role(generator, Path(cfg.data.root) / "val", batch_size=cfg.eval.batch_size,
                        topk_percent=cfg.eval.topk_percent, device=device, image_size=cfg.data.image_size,
                        channels=cfg.data.channels, rank=rank, world_size=world_size,
                        num_workers=cfg.data.num_workers, skip_corrupt=cfg.data.skip_corrupt)
    summary = summarise_result(result, score=cfg.eval.score)
    flat: dict[str, Any] = {"val_auc": summary["auroc"], "val_aupr": summary["aupr"],
                            "val_pixel_auroc": summary["pixel_auroc"]}
    for kind, m in summary["scores"].items():
        flat[f"val_auc_{kind}"] = m["auroc"]
    for name, value in summary["mask"].items():
        if name.startswith(("mask_", "diff_")):
            flat[name] = value
    if flat["val_auc"] is None:
        raise UserError(f"{Path(cfg.data.root) / 'val'} needs both healthy and anomalous labelled images "
                        "for eval.metric=val_auc; rebuild the shards with a labelled val role or use "
                        "eval.metric=fid")
    return {k: float(v) for k, v in flat.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Files: metrics.json, scores.csv, figures (rank 0 only)

def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write to a temporary name in the same folder, then rename into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def write_scores_csv(path: str | os.PathLike, result: dict, score: str) -> None:
    """key, label, score (the chosen kind), then every score kind and reference as its own column."""
    columns = [f"score_{k}" for k in result["scores"]] + list(result["references"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", "label", "score"] + columns)
    values = list(result["scores"].values()) + list(result["references"].values())
    for i, key in enumerate(result["key"]):
        writer.writerow([key, int(result["label"][i]), f"{result['scores'][score][i]:.6g}"]
                        + [f"{v[i]:.6g}" for v in values])
    write_atomic(path, buf.getvalue())


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_roc(path: str | os.PathLike, result: dict, score: str) -> None:
    """ROC curves of every score and reference, AUROC in the legend; the chosen score drawn bold."""
    plt = _pyplot()
    labels = result["label"]
    known = labels >= 0
    y = (labels[known] > 0).astype(int)
    fig, ax = plt.subplots(figsize=(5, 5))
    curves = [(f"score {k}", v, k == score) for k, v in result["scores"].items()]
    curves += [(f"reference {k}", v, False) for k, v in result["references"].items()]
    if 0 < y.sum() < y.size:
        for name, values, main in curves:
            fpr, tpr, _ = roc_curve(y, values[known])
            auc = roc_auc_score(y, values[known])
            ax.plot(fpr, tpr, lw=2.5 if main else 1.2, ls="-" if name.startswith("score") else "--",
                    label=f"{name}: AUROC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC ({y.size} images)")
    ax.legend(loc="lower right", fontsize=8)
    _save_figure(fig, Path(path))
    plt.close(fig)


def _display(img: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """(C, H, W) in [-1, 1] -> an imshow array in [0, 1] and its colour map."""
    u = np.clip((img + 1) / 2, 0, 1)
    return (u[0], "gray") if u.shape[0] == 1 else (u.transpose(1, 2, 0), None)


def plot_panel(path: str | os.PathLike, key: str, label: Optional[int], score: float, arrays: dict) -> None:
    """input | healthy translation B' | mask M | difference map over the input (ground truth outlined)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.9))
    x, cmap = _display(arrays["x"])
    b, _ = _display(arrays["b_prime"])
    axes[0].imshow(x, cmap=cmap, vmin=0, vmax=1)
    axes[1].imshow(b, cmap=cmap, vmin=0, vmax=1)
    axes[2].imshow(arrays["mask"], cmap="viridis", vmin=0, vmax=1)
    axes[3].imshow(x, cmap=cmap, vmin=0, vmax=1)
    # One colour scale for every panel (|x - B'| in the [-1, 1] image units), so panels compare.
    heat = axes[3].imshow(arrays["diff"], cmap="inferno", alpha=0.55, vmin=0, vmax=1)
    fig.colorbar(heat, ax=axes[3], fraction=0.046, pad=0.04)
    if arrays["gt"] is not None and arrays["gt"].any():
        for ax in (axes[0], axes[2], axes[3]):
            ax.contour(arrays["gt"], levels=[0.5], colors="cyan", linewidths=0.8)
    for ax, title in zip(axes, ("input", "healthy translation B'", "mask M", "|x - B'| on input")):
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{key}  " + (f"label {label}  " if label is not None else "") + f"score {score:.4g}", fontsize=9)
    _save_figure(fig, Path(path))
    plt.close(fig)


def plot_masks(path: str | os.PathLike, panels: dict) -> None:
    """Masks on healthy and anomalous images: per class a row of inputs and a row of their masks."""
    plt = _pyplot()
    cols = max(1, max(len(panels[0]), len(panels[1])))
    fig, axes = plt.subplots(4, cols, figsize=(1.6 * cols, 6.8), squeeze=False)
    for row, (cls, name) in enumerate(((0, "healthy"), (1, "anomalous"))):
        for c in range(cols):
            ax_img, ax_mask = axes[2 * row, c], axes[2 * row + 1, c]
            ax_img.axis("off")
            ax_mask.axis("off")
            if c >= len(panels[cls]):
                continue
            _, arrays = panels[cls][c]
            x, cmap = _display(arrays["x"])
            ax_img.imshow(x, cmap=cmap, vmin=0, vmax=1)
            ax_mask.imshow(arrays["mask"], cmap="viridis", vmin=0, vmax=1)
            if arrays["gt"] is not None and arrays["gt"].any():
                ax_mask.contour(arrays["gt"], levels=[0.5], colors="red", linewidths=0.8)
        axes[2 * row, 0].set_title(f"{name}: input", fontsize=8, loc="left")
        axes[2 * row + 1, 0].set_title(f"{name}: mask M (0-1; red: ground truth)", fontsize=8, loc="left")
    _save_figure(fig, Path(path))
    plt.close(fig)


def safe_name(key: str) -> str:
    """A key or relative path as a file name: anything but letters, digits, - _ . becomes _."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


# ---------------------------------------------------------------------------------------------
# `a2b evaluate`

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2b evaluate", description=(
        "Score every image of a labelled shard role with a trained generator and write metrics.json, "
        "scores.csv, roc.png, masks.png and difference-map panels."))
    p.add_argument("--checkpoint", required=True,
                   help="export .pt, checkpoint folder, or run folder (its newest complete checkpoint; "
                        "RUN/best for the best one)")
    p.add_argument("--shards", required=True, help="a role folder of shards, e.g. data/demo/test")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score", choices=SCORE_KINDS, default=None,
                   help="score behind the top-level AUROC and threshold (default: the checkpoint's "
                        "eval.score, normally mean, the paper's); every score is reported anyway")
    p.add_argument("--topk-percent", type=number_arg(0.01, 100.0), default=None,
                   help="share of the map's pixels the topk score averages (default: eval.topk_percent)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (default: eval.batch_size)")
    p.add_argument("--num-maps", type=int, default=4, help="difference-map panels per class (default 4)")
    p.add_argument("--references", action="store_true",
                   help="also report training-free references: greyness and distance to the healthy mean")
    p.add_argument("--healthy", default=None,
                   help="healthy role for --references and --fid (default: healthy/ beside --shards)")
    p.add_argument("--fid", action="store_true", help="also compute FID of B' against the healthy role")
    p.add_argument("--fid-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: eval.fid_weights, then the torch hub cache)")
    p.add_argument("--fid-samples", type=int, default=None, help="images per side (default: eval.fid_samples)")
    p.add_argument("--fid-dims", type=int, default=None, choices=(64, 192, 768, 2048),
                   help="Inception feature size (default: eval.fid_dims)")
    p.add_argument("--fid-cache", default=None, help="folder for cached healthy statistics (.npz)")
    p.add_argument("--seed", type=int, default=0, help="picks the panel and FID samples (default 0)")
    p.add_argument("--num-workers", type=int, default=0, help="loader processes per process (default 0)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="skip undecodable samples and damaged shards and count them")
    p.add_argument("--verify", choices=("size", "count", "sha256"), default="count",
                   help="checks of each shard against the manifest before scoring (sha256 reads every shard)")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="also aggregate scores per group named by this field of each sample's json "
                        "(patient, volume, group): mean and max score, AUROC per group; writes groups.csv")
    return p


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    """The training step stored with a checkpoint or export, or None when it has none."""
    from a2b_dist import checkpoint

    p = Path(path)
    try:
        if p.is_file():
            blob = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            step = blob.get("step") if isinstance(blob, dict) else None
        else:
            step = checkpoint.read_meta(checkpoint.resolve_checkpoint(p)).get("step")
    except (OSError, RuntimeError, ValueError, KeyError, UserError):
        return None
    return int(step) if step is not None else None


def _check_args(args) -> None:
    shards = Path(args.shards)
    if not (shards / "manifest.json").is_file():
        raise UserError(f"--shards {shards}: no manifest.json there; pass one role folder written by "
                        "`python shards/build.py`, e.g. DATA/test")
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint} does not exist")
    check_output_folder("--out", args.out)
    for name in ("batch_size", "fid_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.num_maps < 0:
        raise UserError(f"--num-maps must be 0 or more, not {args.num_maps}")
    if args.topk_percent is not None and not 0 < args.topk_percent <= 100:
        raise UserError(f"--topk-percent must be in (0, 100], not {args.topk_percent}")
    if (args.references or args.fid):
        healthy = Path(args.healthy) if args.healthy else shards.parent / "healthy"
        if not (healthy / "manifest.json").is_file():
            raise UserError(f"{healthy} is not a healthy shard role (no manifest.json); "
                            "--references and --fid need one: pass --healthy DIR")
        args.healthy = str(healthy)


def main(argv: Optional[list[str]] = None) -> int:
    from accelerate import Accelerator

    from a2b_dist.checkpoint import load_generator
    from a2b_dist.data.manifest import open_role

    args = build_parser().parse_args(argv)
    _check_args(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    # Load the generator and its config; the shards must match its image size and channels.
    generator, cfg = load_generator(args.checkpoint, device=device)
    size, channels = cfg.data.image_size, cfg.data.channels
    manifest = open_role(args.shards, image_size=size, channels=channels, skip_corrupt=args.skip_corrupt,
                         verify=args.verify)
    groups = sample_groups(args.shards, args.group_by) if args.group_by else None  # fail before scoring
    if args.fid:  # fail before the long passes when the Inception weights are missing
        from a2b_dist import fid
        fid.find_weights(args.fid_weights or cfg.eval.fid_weights)
    score = args.score or cfg.eval.score
    topk = args.topk_percent if args.topk_percent is not None else cfg.eval.topk_percent
    batch_size = args.batch_size or cfg.eval.batch_size
    common = dict(batch_size=batch_size, image_size=size, channels=channels, rank=rank, world_size=world,
                  num_workers=args.num_workers, skip_corrupt=args.skip_corrupt)

    # Training-free reference: the healthy mean image.
    healthy_mean = healthy_mean_image(args.healthy, **common) if args.references else None

    # Score every sample once across ranks.
    generator.eval()
    result = score_role(generator, args.shards, topk_percent=topk, device=device,
                        healthy_mean=healthy_mean, num_panels=args.num_maps, seed=args.seed, **common)
    metrics = summarise_result(result, score=score)
    metrics = {"checkpoint": str(args.checkpoint), "step": checkpoint_step(args.checkpoint),
               "shards": str(args.shards), "role": manifest.get("role"), "processes": world,
               "topk_percent": topk, **metrics}
    expected = manifest.get("samples", manifest.get("count"))
    metrics["counts"]["manifest"] = expected
    if not args.references:
        metrics.pop("references")
    grouped = None
    if groups is not None:
        grouped = group_metrics(result["key"], result["label"], result["scores"][score], groups)
        metrics["groups"] = {"by": args.group_by, "score": score,
                             **{k: v for k, v in grouped.items() if k != "table"}}

    if args.fid:
        metrics["fid"] = fid.translation_fid(
            generator, args.shards, args.healthy, device=device, rank=rank, world_size=world,
            samples=args.fid_samples or cfg.eval.fid_samples, dims=args.fid_dims or cfg.eval.fid_dims,
            weights=args.fid_weights or cfg.eval.fid_weights, seed=args.seed, batch_size=batch_size,
            image_size=size, channels=channels, cache_dir=args.fid_cache, num_workers=args.num_workers,
            skip_corrupt=args.skip_corrupt)

    # Rank 0 writes the files.
    if accelerator.is_main_process:
        out = Path(args.out)
        (out / "maps").mkdir(parents=True, exist_ok=True)
        for stale in [*(out / "maps").glob("healthy-*.png"), *(out / "maps").glob("anomalous-*.png")]:
            stale.unlink()  # panels of an earlier run into the same folder
        write_scores_csv(out / "scores.csv", result, score)
        if grouped is not None:
            write_groups_csv(out / "groups.csv", args.group_by, grouped["table"])
        plot_roc(out / "roc.png", result, score)
        by_key = {k: i for i, k in enumerate(result["key"])}
        for cls, entries in result["panels"].items():
            for key, arrays in entries:
                plot_panel(out / "maps" / f"{'anomalous' if cls else 'healthy'}-{safe_name(key)}.png",
                           key, cls, float(result["scores"][score][by_key[key]]), arrays)
        if result["panels"][0] or result["panels"][1]:
            plot_masks(out / "masks.png", result["panels"])
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _report(metrics, out, expected)
    accelerator.wait_for_everyone()
    return 0


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _report(metrics: dict, out: Path, expected: Optional[int]) -> None:
    c = metrics["counts"]
    print(f"scored {c['samples']} images ({c['healthy']} healthy, {c['anomalous']} anomalous"
          + (f"; manifest lists {expected}" if expected is not None and expected != c["samples"] else "")
          + f") on {metrics['processes']} process(es)")
    print(f"image AUROC ({metrics['score']}): {_fmt(metrics['auroc'])}   AUPR {_fmt(metrics['aupr'])}   "
          f"pixel AUROC {_fmt(metrics['pixel_auroc'])}")
    for name, m in metrics.get("references", {}).items():
        print(f"reference {name}: AUROC {_fmt(m['auroc'])}")
    mask = metrics["mask"]
    if mask:
        print(f"mask: inside/outside {_fmt(mask['mask_inside_outside_ratio'])}   per-pixel std "
              f"{_fmt(mask['mask_pixel_std'])}   pixel AUROC of M {_fmt(mask['mask_pixel_auroc'])}")
    if "groups" in metrics:
        g = metrics["groups"]
        print(f"per {g['by']} ({g['groups']} groups): AUROC of the mean score {_fmt(g['mean']['auroc'])}   "
              f"of the max score {_fmt(g['max']['auroc'])}")
    if "fid" in metrics:
        print(f"FID: {metrics['fid']['fid']:.3f} ({metrics['fid']['samples']} samples)")
    print(f"wrote {out}/metrics.json, scores.csv, roc.png, masks.png, maps/")


if __name__ == "__main__":
    from a2b_dist.cli import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
