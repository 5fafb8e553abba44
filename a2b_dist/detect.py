"""`a2b detect`: anomaly scores (and optionally maps) for a folder of new images.

    a2b detect --checkpoint runs/demo --images scans/ --out runs/demo/detect \
        --threshold runs/demo/eval/metrics.json --maps

Images (PNG, JPEG, TIFF; 8- or 16-bit; searched recursively) get the shards' preprocessing
(a2b_dist.data.load_image) at the checkpoint's image size and channels. Writes scores.csv sorted by
score, highest first (path relative to --images, score, and flagged when a threshold is given), and
with --maps one panel per image in maps/. A threshold from metrics.json (its Youden threshold) brings
that evaluation's score kind with it, so the two are comparable.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from a2b_dist import losses
from a2b_dist.checkpoint import map_norm_of
from a2b_dist.config import override_values
from a2b_dist.errors import UserError, check_device, check_number, check_output_folder, number_arg
from a2b_dist.figures import panel_png, plot_panel, safe_name
from a2b_dist.files import StagedFolder, write_atomic
from a2b_dist.memory import bound_heap
from a2b_dist.metrics import HIST_BINS, MAP_SCALE_PERCENTILE, hist_percentile, value_bins
from a2b_dist.provenance import provenance
from a2b_dist.report import write_detection_report
from a2b_dist.scoring import scoring_overrides

def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` as the folder builder finds them (recursive, by suffix, any case)."""
    from a2b_dist.sources.folders import find_images as find_relative

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder")
    paths = [folder / rel for rel in find_relative(folder)]
    if not paths:
        raise UserError(f"--images {folder} holds no PNG/JPG/JPEG/TIFF files (searched recursively)")
    return paths


def parse_threshold(value: Optional[str]) -> tuple[Optional[float], Optional[dict]]:
    """--threshold: a number, or metrics.json (or the folder holding it) from `a2b evaluate`.
    Returns (threshold, the metrics dict when it came from one)."""
    if value is None:
        return None, None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        return check_number("--threshold", number), None
    path = Path(value)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise UserError(f"--threshold {value}: not a number and no such metrics.json file")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--threshold {path}: not readable JSON ({e})") from None
    threshold = metrics.get("threshold") if isinstance(metrics, dict) else None
    if not isinstance(threshold, (int, float)):
        raise UserError(f"--threshold {path}: holds no threshold (a metrics.json from `a2b evaluate` on a role "
                        "with both healthy and anomalous images has one)")
    return float(threshold), metrics


def check_headers(paths: list[Path]) -> None:
    """Open every image's header (no pixels decoded): an unreadable file or one that claims too many
    pixels is a UserError naming it, before the output folder is made."""
    from a2b_dist.data import DataError
    from a2b_dist.data.images import image_bit_depth

    for p in paths:
        try:
            image_bit_depth(p)
        except DataError as e:
            raise UserError(f"{e}; remove or replace it") from None


def load_batch(paths: list[Path], size: int, channels: int) -> torch.Tensor:
    """(B, C, size, size) in [-1, 1], the shards' preprocessing; an unreadable file is a UserError."""
    from a2b_dist.data import DataError, load_image, to_tensor

    out = []
    for p in paths:
        try:
            out.append(to_tensor(load_image(p, size, channels)))
        except (DataError, OSError, ValueError) as e:
            raise UserError(f"{p}: cannot be read as an image ({e}); remove or replace it") from None
    return torch.stack(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2b detect", description="Anomaly scores and maps for a folder of images.")
    p.add_argument("--checkpoint", required=True, help="export .pt, checkpoint folder, or run folder")
    p.add_argument("--images", required=True, help="folder of PNG/JPEG/TIFF images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", default=None,
                   help="flag images with score >= this: a number, or metrics.json from `a2b evaluate` "
                        "(its Youden threshold and score kind)")
    p.add_argument("--maps", action="store_true", help="write a panel per image: input | B' | mask | map")
    p.add_argument("--report-panels", type=number_arg(0, None, integer=True), default=24,
                   help="report.html: heat maps of the highest-scored images, this many (default 24)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="settings of the checkpoint's config to change: eval.score (default: the "
                        "metrics.json's, else the checkpoint's), eval.topk_percent, eval.batch_size")
    return p


def check_out_outside_images(out: str, images: str) -> None:
    """--out must not be --images or lie inside it (paths resolved, symlinks followed): a second
    run would score the first run's panels as new images."""
    out_real, images_real = Path(out).resolve(), Path(images).resolve()
    if out_real == images_real or images_real in out_real.parents:
        raise UserError(f"--out {out} is inside --images {images} (resolved: {out_real} in {images_real}); its "
                        "panels would be scored as new images by the next run: pass an --out outside --images")


# Everything a2b detect writes into --out (an existing --out may hold these and nothing else).
OUTPUTS = ("report.html", "scores.csv", "maps")


@torch.no_grad()
def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from a2b_dist.data.storage import check_location   # the one location check: no credentials echoed
    bound_heap()   # resident memory stays flat over a long pass (a2b_dist/memory.py)

    check_location(args.images, "--images", local="detect reads a local folder of images")
    check_location(args.checkpoint, "--checkpoint", local="checkpoints are read from local files")
    check_location(args.out, "--out", local="the outputs are written to a local folder")
    check_out_outside_images(args.out, args.images)
    paths = find_images(args.images)
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint} does not exist")
    override_values(args.overrides)   # malformed overrides fail before anything is read
    check_output_folder("--out", args.out)
    threshold, metrics = parse_threshold(args.threshold)
    device = (check_device("--device", args.device) if args.device
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    check_headers(paths)   # unreadable files and decompression bombs before anything is written
    # The outputs go to a staging folder beside --out, swapped in at the end: --out holds one run's
    # files, and an unwritable place is found before any image is scored.
    stage = StagedFolder(args.out, "--out", "a2b detect", OUTPUTS)
    stage.prepare()
    try:
        return _detect(args, argv, paths, threshold, metrics, device, stage)
    finally:
        stage.discard()


def _detect(args, argv, paths: list[Path], threshold: Optional[float], metrics: Optional[dict], device,
            stage: StagedFolder) -> int:
    from a2b_dist.checkpoint import load_generator, require_map_norm

    generator, cfg = load_generator(args.checkpoint, device=device)
    generator.eval()
    cfg, given = scoring_overrides(cfg, args.overrides, ("eval.score", "eval.topk_percent", "eval.batch_size"),
                                   "a2b detect")

    # The score must be the one the threshold was chosen for.
    score, topk = cfg.eval.score, cfg.eval.topk_percent
    if metrics is not None:
        score, topk = metrics.get("score", score), metrics.get("topk_percent", topk)
        if "eval.score" in given and given["eval.score"] != score:
            raise UserError(f"eval.score={given['eval.score']} differs from the {score!r} score the threshold in "
                            f"{args.threshold} was chosen for; leave eval.score out or pass a number as --threshold")
        if "eval.topk_percent" in given and score == "topk" and given["eval.topk_percent"] != topk:
            raise UserError(f"eval.topk_percent={given['eval.topk_percent']} differs from the {topk} of {args.threshold}")

    require_map_norm(generator, score, args.checkpoint)    # before any image is scored
    with stage.writing() as out:
        spec = ScoreSpec(score, topk, threshold, metrics)
        rows = _score_and_write(args, argv, paths, cfg, generator, device, spec, out)
    out = Path(args.out)
    flagged = sum(v >= threshold for _, v in rows) if threshold is not None else None
    print(f"scored {len(rows)} images ({score} score)"
          + (f"; {flagged} flagged at threshold {threshold:.6g}" if threshold is not None else ""))
    print(f"wrote {out / 'report.html'} (open it in a browser), {out / 'scores.csv'}"
          + (f" and {len(rows)} panels in {out / 'maps'}" if args.maps else ""))
    return 0


def _translated(args, paths: list[Path], cfg, generator, device, score: str, topk: float):
    """Per batch: (relative paths, scores, per-image arrays x, B', M, |x - B'|)."""
    root = Path(args.images)
    batch_size = cfg.eval.batch_size
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        x = load_batch(chunk, cfg.data.image_size, cfg.data.channels).to(device)   # (B, C, H, W)
        b_int, m = generator(x)
        b_prime = losses.blend_healthy(x, b_int, m)                                 # Eq. 1
        diff = losses.anomaly_map(x, b_prime)                                       # (B, 1, H, W)
        values = losses.anomaly_score(diff, score, topk, m, losses.anomaly_map(x, b_int),
                                      map_norm_of(generator)).cpu().numpy()
        arrays = [{"x": x[i].cpu().numpy(), "b_prime": b_prime[i].cpu().numpy(), "mask": m[i, 0].cpu().numpy(),
                   "diff": diff[i, 0].cpu().numpy(), "gt": None} for i in range(len(chunk))]
        yield [p.relative_to(root).as_posix() for p in chunk], values, arrays


@dataclass(frozen=True)
class ScoreSpec:
    """How detect scores and flags: the score kind and top-k share (the threshold's, when it came
    from a metrics.json), the threshold, and that metrics.json (its map colour scale)."""
    score: str
    topk: float
    threshold: Optional[float] = None
    metrics: Optional[dict] = None


def _score_and_write(args, argv, paths: list[Path], cfg, generator, device, spec: ScoreSpec,
                     out: Path) -> list[tuple[str, float]]:
    """Score every image into ``out`` (the staging folder): panels, scores.csv, report.html.

    The heat maps share one colour scale: the evaluation's (metrics.json given as --threshold), else
    the MAP_SCALE_PERCENTILE-th percentile of this folder's maps; with --maps the panels are drawn in
    a second pass, once that scale is known."""
    score, topk, threshold = spec.score, spec.topk, spec.threshold
    rows: list[tuple[str, float]] = []
    top: list[tuple[float, str, dict]] = []     # the report's panels: the highest scores so far
    map_hist = np.zeros(HIST_BINS)
    for rel, values, arrays in _translated(args, paths, cfg, generator, device, score, topk):
        map_hist += np.bincount(value_bins(np.stack([a["diff"] for a in arrays])), minlength=HIST_BINS)
        for i, r in enumerate(rel):
            rows.append((r, float(values[i])))
            if args.report_panels and (len(top) < args.report_panels or (-values[i], r) < top[-1][:2]):
                # copies: a view would keep its whole batch alive as long as the panel
                top.append((-float(values[i]), r, {k: None if v is None else v.copy() for k, v in arrays[i].items()}))
                top.sort(key=lambda e: e[:2])
                del top[args.report_panels:]
    scale = (spec.metrics or {}).get("map_scale")          # the evaluation's, so the two pictures compare
    if not (isinstance(scale, dict) and isinstance(scale.get("value"), (int, float)) and scale["value"] > 0
            and isinstance(scale.get("percentile"), (int, float))):
        scale = {"percentile": MAP_SCALE_PERCENTILE, "value": hist_percentile(map_hist, MAP_SCALE_PERCENTILE)}
    if args.maps:
        (out / "maps").mkdir()
        for rel, values, arrays in _translated(args, paths, cfg, generator, device, score, topk):
            for i, r in enumerate(rel):
                plot_panel(out / "maps" / f"{safe_name(r)}.png", r, None, float(values[i]), arrays[i], scale)

    rows.sort(key=lambda r: (-r[1], r[0]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "score"] + (["flagged"] if threshold is not None else []))
    for rel, value in rows:
        writer.writerow([rel, f"{value:.6g}"] + ([int(value >= threshold)] if threshold is not None else []))
    write_atomic(out / "scores.csv", buf.getvalue())
    panels = {rel: panel_png(rel, None, -neg, arrays, scale) for neg, rel, arrays in top}
    write_detection_report(out / "report.html", rows=rows, score=score, threshold=threshold, panels=panels,
                           checkpoint=str(args.checkpoint),
                           prov=provenance(["a2b", "detect", *(argv if argv is not None else sys.argv[1:])], manifests={}))
    return rows


if __name__ == "__main__":
    from a2b_dist.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
