#!/usr/bin/env python
"""Evaluation at the scale of real test sets: memory and time of the pixel metrics, and of
`a2b evaluate` end to end, against the number of annotated test pixels.

    python benchmarks/eval_scale.py metrics --pixels 1e7 1e8 1e9      # the metric state alone
    python benchmarks/eval_scale.py evaluate --size 128 --count 20000  # `a2b evaluate` on a built set

metrics: maps, masks and ground truth made batch by batch (128 px, half the images with one or
two square lesions, the maps higher inside them) go through the metric state exactly as
`a2b evaluate` feeds it (metrics.summarise_masks, merged batch by batch, finished once); each
pixel count runs in a fresh process so that its peak memory is its own. "state MB" is the peak
resident memory above what the process held before the first batch (the imports and one batch
of maps). Where the pixels fit (--exact-up-to), the binned pixel AUROC is also checked against
sklearn's exact one on the same pixels, after the timing.

evaluate: `shards/build.py simulated --source phantom --size SIZE --count COUNT` (built once under
--work), a randomly initialised generator in the export format, then `a2b evaluate` on the test
role in its own process: wall time and that process's peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def synthetic_batch(rng, batch: int, side: int):
    """(masks M, labels, ground truth, difference maps) of one batch, as float32 / bool arrays."""
    import numpy as np

    gt = np.zeros((batch, 1, side, side), bool)
    labels = np.zeros(batch, np.int64)
    for i in range(batch // 2, batch):
        labels[i] = 1
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(side // 16, side // 4))
            r, c = rng.integers(0, side - s, 2)
            gt[i, 0, r:r + s, c:c + s] = True
    noise = rng.random(gt.shape, dtype=np.float32)
    diff = (0.004 * noise + 0.003 * gt * rng.random(gt.shape, dtype=np.float32)).astype(np.float32)
    mask = np.clip(0.2 * noise + 0.6 * gt, 0, 1).astype(np.float32)
    return mask, labels, gt, diff


def one_count(pixels: int, side: int, batch: int, exact_up_to: int, seed: int = 0) -> dict:
    """The metric state fed ``pixels`` annotated pixels; run in a process of its own."""
    import numpy as np

    from a2b_dist import metrics

    rng = np.random.default_rng(seed)
    per_batch = batch * side * side
    batches = max(1, round(pixels / per_batch))
    first = synthetic_batch(rng, batch, side)
    base, before = current_mb(), peak_mb()   # ru_maxrss cannot be reset: a new peak shows above `before`
    high = base
    t0 = time.perf_counter()
    summary = None
    for i in range(batches):
        mask, labels, gt, diff = first if i == 0 else synthetic_batch(rng, batch, side)
        part = metrics.summarise_masks(mask, labels, gt, None, diff)
        summary = part if summary is None else metrics.merge_mask_summaries([summary, part])
        high = max(high, current_mb())
    result = metrics.finish_mask_diagnostics(summary)
    seconds = time.perf_counter() - t0
    after = peak_mb()
    state = max(high, after if after > before else 0.0) - base
    out = {"pixels": batches * per_batch, "images": batches * batch, "seconds": seconds,
           "mpix_per_s": batches * per_batch / seconds / 1e6, "state_mb": state,
           "pixel_metrics": result["pixel_metrics"], "diff_pixel_auroc": result["diff_pixel_auroc"],
           "diff_pixel_aupro": result["diff_pixel_aupro"], "exact_auroc": None}
    if out["pixels"] <= exact_up_to:      # the same pixels again, kept whole, for sklearn
        from sklearn.metrics import roc_auc_score

        rng = np.random.default_rng(seed)
        values, truth = [], []
        for _ in range(batches):
            _, _, gt, diff = synthetic_batch(rng, batch, side)
            values.append(diff.ravel())
            truth.append(gt.ravel())
        out["exact_auroc"] = float(roc_auc_score(np.concatenate(truth), np.concatenate(values)))
    return out


def run_metrics(args) -> list[dict]:
    rows = []
    for pixels in args.pixels:
        cmd = [sys.executable, __file__, "_one", "--pixels", str(int(pixels)), "--side", str(args.side),
               "--batch", str(args.batch), "--exact-up-to", str(int(args.exact_up_to))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['pixels'] / 1e6:>10.0f} M pixels: {r['seconds']:.1f} s, {r['state_mb']:.0f} MB", flush=True)
    print("\n| annotated pixels | images (128 px) | time s | M pixels/s | metric state MB | pixel metrics "
          "| pixel AUROC | exact (sklearn) | AUPRO |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        exact = "-" if r["exact_auroc"] is None else f"{r['exact_auroc']:.5f}"
        print(f"| {r['pixels']:,} | {r['images']:,} | {r['seconds']:.1f} | {r['mpix_per_s']:.1f} | "
              f"{r['state_mb']:.0f} | {r['pixel_metrics']} | {r['diff_pixel_auroc']:.5f} | {exact} | "
              f"{r['diff_pixel_aupro']:.4f} |")
    return rows


def run_evaluate(args) -> dict:
    import torch

    from a2b_dist.config import load_config
    from a2b_dist.nets import build_generator

    work = Path(args.work)
    data = work / f"phantom-{args.size}-{args.count}"
    if not (data / "test" / "manifest.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "shards" / "build.py"), "simulated", "--source", "phantom",
                        "--size", str(args.size), "--count", str(args.count), "--seed", "0", "--out", str(data),
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        print(f"built {data} in {time.perf_counter() - t0:.0f} s")
    cfg = load_config(str(ROOT / "configs" / "small.yaml"), [f"data.image_size={args.size}"])
    gen_path = work / f"generator-{args.size}.pt"
    if not gen_path.is_file():
        import dataclasses

        torch.manual_seed(0)
        gen = build_generator(cfg.model, cfg.data.channels)
        torch.save({"format": "a2b-generator-v1", "generator": gen.state_dict(),
                    "config": dataclasses.asdict(cfg), "step": 0}, gen_path)
    out = work / f"eval-{args.size}-{args.count}"
    cmd = [str(Path(sys.executable).parent / "a2b"), "evaluate", "--checkpoint", str(gen_path),
           "--shards", str(data / "test"), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    m = json.loads((out / "metrics.json").read_text())
    row = {"images": m["counts"]["samples"], "pixels": m["mask"].get("annotated_pixels"), "seconds": seconds,
           "peak_mb": peak, "pixel_metrics": m["mask"].get("pixel_metrics"), "pixel_auroc": m["pixel_auroc"]}
    print("\n| test images | annotated pixels | `a2b evaluate` s | peak RSS MB | pixel metrics | pixel AUROC |\n"
          "|---|---|---|---|---|---|")
    print(f"| {row['images']:,} | {row['pixels']:,} | {seconds:.0f} | {peak:.0f} | {row['pixel_metrics']} | "
          f"{row['pixel_auroc']:.4f} |")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("metrics", help="the metric state alone, on synthetic maps")
    m.add_argument("--pixels", type=float, nargs="+", default=[1e7, 1e8, 1e9])
    m.add_argument("--side", type=int, default=128)
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--exact-up-to", type=float, default=2e7,
                   help="check against sklearn's exact pixel AUROC up to this many pixels")
    one = sub.add_parser("_one")
    for a, t in (("--pixels", int), ("--side", int), ("--batch", int), ("--exact-up-to", float)):
        one.add_argument(a, type=t, required=True)
    e = sub.add_parser("evaluate", help="`a2b evaluate` end to end on a built phantom set")
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--count", type=int, default=20000)
    e.add_argument("--work", default="runs/eval_scale")
    args = p.parse_args(argv)
    if args.cmd == "_one":
        print(json.dumps(one_count(args.pixels, args.side, args.batch, args.exact_up_to)))
    elif args.cmd == "metrics":
        return run_metrics(args)
    else:
        return run_evaluate(args)


if __name__ == "__main__":
    main()
