"""Scoring a role with a generator: every sample once across ranks, every score kind, the mask
summaries and a few panels per class; the summary that metrics.json holds; the model-selection
hook the trainer calls."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from a2b_dist import losses
from a2b_dist.data import EvalReader
from a2b_dist.distributed import all_reduce_sum, gather_objects, sample_priority
from a2b_dist.errors import UserError
from a2b_dist.metrics import (HIST_BINS, MAP_SCALE_PERCENTILE, add_mask_summary, finish_mask_diagnostics,
                              image_metrics, merge_mask_summaries, summarise_masks)
from a2b_dist.references import greyness, healthy_distance

SCORE_KINDS = losses.SCORE_KINDS


@dataclass(frozen=True)
class Kept:
    """What score_role keeps with its arrays for pictures: ``panels`` samples per class chosen by key
    hash (with ``seed``), and the ``extremes`` highest- and lowest-scored by the ``score`` kind."""
    panels: int = 0
    extremes: int = 0
    seed: int = 0
    score: str = "mean"


@torch.no_grad()
def score_role(generator: torch.nn.Module, role_dir: str | os.PathLike, reader: EvalReader, *,
               topk_percent: float, device: str | torch.device = "cpu",
               healthy_mean: Optional[torch.Tensor] = None, norm: Optional[torch.Tensor] = None,
               kept: Kept = Kept()) -> dict:
    """Score every sample of a role once across ranks; every rank returns the gathered result.

    Returns {"key": [...], "label": int64 (N,), "scores": {kind: (N,)}, "references": {kind: (N,)},
    "mask_summary": summary, "panels": {0: [...], 1: [...]}, "extremes": {...}} sorted by key;
    panels hold up to kept.panels samples per class (x, B', M, difference map, ground truth) chosen
    by key hash; ``norm``: healthy_map_norm's statistics, which add the healthy_z kinds (left out
    without it); extremes the kept.extremes highest-scored healthy images (false positives first),
    the lowest-scored anomalous ones (missed first) and the highest-scored anomalous ones, by the
    kept.score kind, as [(key, score, arrays)].
    """
    keys: list[str] = []
    labels: list[np.ndarray] = []
    kinds = [k for k in SCORE_KINDS if norm is not None or k not in losses.NORM_KINDS]
    scores: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    refs: dict[str, list[np.ndarray]] = {"greyness": []}
    if healthy_mean is not None:
        refs["healthy_distance"] = []
    summary: Optional[dict] = None          # the mask and pixel summary, added up batch by batch
    panels: dict[int, list[tuple]] = {0: [], 1: []}
    tails: dict[str, list[tuple]] = {name: [] for name in EXTREMES}
    for batch in reader.batches(role_dir):
        x = batch["image"].to(device)                                   # (B, C, H, W)
        b_int, m = generator(x)                                         # (B, C, H, W), (B, 1, H, W)
        b_prime = losses.blend_healthy(x, b_int, m)                     # Eq. 1
        diff = losses.anomaly_map(x, b_prime)                           # (B, 1, H, W)
        diff_int = losses.anomaly_map(x, b_int)                         # before the mask: (B, 1, H, W)
        y = batch["label"].cpu().numpy()
        keys += list(batch["key"])
        labels.append(y)
        for kind in kinds:
            scores[kind].append(losses.anomaly_score(diff, kind, topk_percent, m, diff_int, norm).cpu().numpy())
        refs["greyness"].append(greyness(x).cpu().numpy())
        if healthy_mean is not None:
            refs["healthy_distance"].append(healthy_distance(x, healthy_mean).cpu().numpy())
        part = summarise_masks(m, y, batch["mask"], batch["has_mask"], diff)
        summary = part if summary is None else add_mask_summary(summary, part)
        if kept.panels:
            _keep_panels(panels, kept.panels, kept.seed, batch, x, b_prime, m, diff)
        if kept.extremes:
            _keep_extremes(tails, kept.extremes, scores[kept.score][-1], batch, x, b_prime, m, diff)

    local = {
        "key": keys,
        "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "scores": {k: np.concatenate(v) if v else np.zeros(0) for k, v in scores.items()},
        "references": {k: np.concatenate(v) if v else np.zeros(0) for k, v in refs.items()},
        "mask_summary": summary,
        "panels": panels,
        "extremes": tails,
    }
    # The pixel histograms (fixed size) are summed over the ranks by one all-reduce; the rest is gathered.
    size = 2 * 3 * HIST_BINS
    packed = np.zeros(size + HIST_BINS + 1)      # pixel histograms | all map values | region count
    if summary is not None:
        if summary["hist"] is not None:
            packed[:size], packed[-1] = summary["hist"].ravel(), summary["regions"]
        if summary["map_hist"] is not None:
            packed[size:size + HIST_BINS] = summary["map_hist"]
        summary["hist"], summary["map_hist"], summary["regions"] = None, None, 0
    packed = all_reduce_sum(packed, reader.world_size, device)
    merged = _merge_ranks(gather_objects(local, reader.world_size), kept.panels, kept.extremes)
    if merged["mask_summary"] is not None:
        if packed[:size].any():
            merged["mask_summary"]["hist"] = packed[:size].reshape(2, 3, HIST_BINS)
            merged["mask_summary"]["regions"] = int(packed[-1])
        if packed[size:size + HIST_BINS].any():
            merged["mask_summary"]["map_hist"] = packed[size:size + HIST_BINS]
    return merged


def _arrays(i: int, batch: dict, x, b_prime, m, diff) -> dict:
    """One sample's arrays, copied: a view would keep its whole batch alive as long as the panel."""
    return {"x": x[i].cpu().numpy().copy(), "b_prime": b_prime[i].cpu().numpy().copy(),
            "mask": m[i, 0].cpu().numpy().copy(), "diff": diff[i, 0].cpu().numpy().copy(),
            "gt": batch["mask"][i, 0].numpy().copy() if bool(batch["has_mask"][i]) else None}


def _keep_panels(panels: dict, limit: int, seed: int, batch: dict, x, b_prime, m, diff) -> None:
    for i, key in enumerate(batch["key"]):
        label = int(batch["label"][i])
        if label < 0:
            continue
        cls = 1 if label > 0 else 0
        priority = sample_priority(key, seed)
        if len(panels[cls]) >= limit and priority >= panels[cls][-1][0]:
            continue
        panels[cls].append((priority, key, _arrays(i, batch, x, b_prime, m, diff)))
        panels[cls].sort(key=lambda e: e[0])
        del panels[cls][limit:]


# name -> (the class it draws from, +1: highest scores first / -1: lowest first)
EXTREMES = {"healthy_highest": (0, 1), "anomalous_lowest": (1, -1), "anomalous_highest": (1, 1)}


def _keep_extremes(tails: dict, limit: int, values: np.ndarray, batch: dict, x, b_prime, m, diff) -> None:
    """Keep, per EXTREMES entry, the ``limit`` samples with the most extreme score seen so far
    (ties by key, so the choice does not depend on the order or number of ranks)."""
    for i, key in enumerate(batch["key"]):
        label = int(batch["label"][i])
        if label < 0:
            continue
        cls = 1 if label > 0 else 0
        for name, (want, sign) in EXTREMES.items():
            if cls != want:
                continue
            entry = (-sign * float(values[i]), key, float(values[i]))
            kept = tails[name]
            if len(kept) >= limit and entry[:2] >= kept[-1][:2]:
                continue
            kept.append((*entry, _arrays(i, batch, x, b_prime, m, diff)))
            kept.sort(key=lambda e: e[:2])
            del kept[limit:]


def _merge_ranks(parts: list[dict], num_panels: int, extremes: int = 0) -> dict:
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
    tails = {name: [(key, value, arrays) for _, key, value, arrays in
                    sorted((e for p in parts for e in p["extremes"][name]), key=lambda e: e[:2])[:extremes]]
             for name in EXTREMES}
    summaries = [p["mask_summary"] for p in parts if p["mask_summary"] is not None]
    return {
        "key": [keys[i] for i in order],
        "label": np.concatenate([p["label"] for p in parts])[order].astype(np.int64),
        "scores": {k: cat([p["scores"][k] for p in parts]) for k in parts[0]["scores"]},
        "references": {k: cat([p["references"][k] for p in parts]) for k in parts[0]["references"]},
        "mask_summary": merge_mask_summaries(summaries) if summaries else None,
        "panels": panels,
        "extremes": tails,
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
        "pixel_aupro": mask.get("diff_pixel_aupro"),
        # one colour scale for every heat-map panel: 0 to this percentile of the set's |x - B'| values
        "map_scale": {"percentile": MAP_SCALE_PERCENTILE, "value": mask.get("map_scale")},
        "counts": {"samples": len(result["key"]), "healthy": int((labels == 0).sum()),
                   "anomalous": int((labels > 0).sum()), "unlabelled": int((labels < 0).sum()),
                   "with_ground_truth_masks": mask.get("images_with_ground_truth", 0)},
        "scores": per_score,
        "references": {k: image_metrics(labels, v) for k, v in result["references"].items()},
        "mask": mask,
    }


@torch.no_grad()
def healthy_map_norm(generator, role_dir: str | os.PathLike, reader: EvalReader, count: int, *,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(3, 2, H, W) float32: per-pixel mean and standard deviation of |x - B'|, M * |x - B'| and
    |x - B_int| over the first ``count`` images of a healthy role (in its shards' order; every rank
    reads the same images, so every rank gets the same statistics without a collective). The healthy_z score
    kinds standardise a map by them (losses.standardise_map)."""
    from dataclasses import replace

    reader = replace(reader, rank=0, world_size=1)
    moments, seen = None, 0
    for batch in reader.batches(role_dir):
        x = batch["image"][: count - seen].to(device)
        b_int, m = generator(x)
        diff = losses.anomaly_map(x, losses.blend_healthy(x, b_int, m))
        part = losses.map_moments(diff, m, losses.anomaly_map(x, b_int)).cpu()
        moments = part if moments is None else moments + part
        seen += len(x)
        if seen >= count:
            break
    if moments is None:
        raise UserError(f"{role_dir} has no images to take the healthy map statistics from "
                        "(eval.normalize_images); set eval.normalize_images=0 to score without them")
    return losses.norm_from_moments(moments)


def selection_norm(generator: torch.nn.Module, cfg, *, device: str | torch.device) -> Optional[torch.Tensor]:
    """healthy_map_norm of the current generator on cfg.data.root/healthy for validation and the
    checkpoint (None when eval.normalize_images is 0 or eval.metric is not val_auc); like
    selection_metric, it restores the generator's mode and consumes no global RNG state."""
    if cfg.eval.metric != "val_auc" or not cfg.eval.normalize_images:
        return None
    from a2b_dist.data.storage import join

    with _evaluating(generator, device):
        return healthy_map_norm(generator, join(cfg.data.root, "healthy"), EvalReader.from_config(cfg),
                                cfg.eval.normalize_images, device=device)


@contextmanager
def _evaluating(generator: torch.nn.Module, device: str | torch.device):
    """Eval mode, no gradients, and every global RNG (torch, numpy, random) put back afterwards."""
    was_training = generator.training
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    generator.eval()
    try:
        # fork_rng: whatever the data loaders draw from torch's global RNG is put back afterwards.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        generator.train(was_training)
        np.random.set_state(np_state)
        random.setstate(py_state)


def selection_metric(generator: torch.nn.Module, cfg, *, device: str | torch.device, rank: int = 0,
                     world_size: int = 1, norm: Optional[torch.Tensor] = None) -> dict[str, float]:
    """cfg.eval.metric for model selection, as a flat dict of floats that includes that key.

    ``val_auc``: image AUROC with cfg.eval.score on cfg.data.root/val, every score's AUROC
    (``val_auc_mean``, ``val_auc_topk``; the healthy_z kinds with ``norm``, selection_norm's
    statistics), AUPR, pixel AUROC and the mask diagnostics (``mask_*``;
    keys whose value is undefined are left out). ``fid``: FID of B' against the healthy role
    (see a2b_dist.fid.translation_fid). Every rank must call it and gets the same dict. Pass the
    unwrapped generator; its train/eval mode is restored, and no global RNG state is consumed.
    """
    with _evaluating(generator, device):
        if cfg.eval.metric == "fid":
            from a2b_dist import fid
            return fid.selection_fid(generator, cfg, device=device, rank=rank, world_size=world_size)
        return _selection_val_auc(generator, cfg, device=device, rank=rank, world_size=world_size, norm=norm)


def selection_score(cfg) -> str:
    """The score kind whose validation AUROC selects checkpoints: eval.score, or the paper's mean
    when eval.score=auto (which then picks its kind at the selected checkpoint: chosen_kind)."""
    return "mean" if cfg.eval.score == "auto" else cfg.eval.score


def chosen_kind(metrics: dict) -> str:
    """eval.score=auto's choice from one validation's figures: the kind with the highest AUROC
    (ties: the first in SCORE_KINDS, the paper's mean first)."""
    aucs = {k: metrics.get(f"val_auc_{k}") for k in SCORE_KINDS}
    known = [k for k in SCORE_KINDS if aucs[k] is not None]
    return max(known, key=lambda k: (aucs[k], -SCORE_KINDS.index(k))) if known else "mean"


def scoring_overrides(cfg, overrides, allowed, command: str):
    """(cfg, given): a scoring command's overrides applied to a loaded checkpoint's config (whose
    eval.score=auto is already the kind it chose). eval.score=auto itself is refused in one line:
    the choice is made on validation during training and recorded with the checkpoint."""
    from a2b_dist.config import apply_overrides

    loaded = cfg.eval.score
    cfg, given = apply_overrides(cfg, overrides, allowed=allowed, source=command)
    if cfg.eval.score == "auto":
        raise UserError(f"{command}: eval.score=auto is chosen on validation during training and recorded with "
                        f"the checkpoint, which scores with {loaded!r}; leave eval.score out to use it, or name "
                        f"a kind ({', '.join(SCORE_KINDS)})")
    return cfg, given


def _selection_val_auc(generator, cfg, *, device, rank, world_size, norm=None) -> dict[str, float]:
    from a2b_dist.data.storage import join

    result = score_role(generator, join(cfg.data.root, "val"), EvalReader.from_config(cfg, rank, world_size),
                        topk_percent=cfg.eval.topk_percent, device=device, norm=norm)
    summary = summarise_result(result, score=selection_score(cfg))
    flat: dict[str, Any] = {"val_auc": summary["auroc"], "val_aupr": summary["aupr"],
                            "val_pixel_auroc": summary["pixel_auroc"]}
    for kind, m in summary["scores"].items():
        flat[f"val_auc_{kind}"] = m["auroc"]
    for name, value in summary["mask"].items():
        if name.startswith(("mask_", "diff_")):
            flat[name] = value
    if flat["val_auc"] is None:
        raise UserError(f"{join(cfg.data.root, 'val')} needs both healthy and anomalous labelled images "
                        "for eval.metric=val_auc; rebuild the shards with a labelled val role or use "
                        "eval.metric=fid")
    return {k: float(v) for k, v in flat.items() if v is not None}
