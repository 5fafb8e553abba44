#!/usr/bin/env python
"""Evaluation at the scale of real test sets: memory and time of the pixel metrics, and of
`a2b evaluate` end to end, against the number of annotated test pixels.

    python benchmarks/eval_scale.py metrics --pixels 1e7 1e8 1e9      # the metric state alone
    python benchmarks/eval_scale.py evaluate --size 128 --count 20000 --pixels 1e7 1e8 1e9 --width 8 --res-blocks 1
    python benchmarks/eval_scale.py agree --checkpoint RUN/best --shards DATA/test --processes 2
    python benchmarks/eval_scale.py detect --checkpoint RUN/best --shards DATA/test --count 2000

metrics: maps, masks and ground truth made batch by batch (128 px, half the images with one or
two square lesions, the maps higher inside them) go through the metric state exactly as
`a2b evaluate` feeds it (metrics.summarise_masks, merged batch by batch, finished once); each
pixel count runs in a fresh process so that its peak memory is its own. "state MB" is the peak
resident memory above what the process held before the first batch (the imports and one batch
of maps). Where the pixels fit (--exact-up-to), the binned pixel AUROC is also checked against
sklearn's exact one on the same pixels, after the timing.

evaluate: `shards/build.py simulated --source phantom --size SIZE --count COUNT` (built once under
--work); with --pixels, its test role repeated through the toolkit's shard writer (new keys each
pass) up to that many annotated pixels; a randomly initialised generator in the export format
(--width, --res-blocks: a narrow one keeps 1 B pixels within the hour on 2 cores; the metric state
does not depend on it); then `a2b evaluate` on the role in its own process: wall time, and its
resident memory sampled every 0.5 s (at 10% of the run, and the peak).

agree: a trained generator's maps on a real role, every annotated pixel kept for sklearn's exact
AUROC and AUPR beside the toolkit's binned ones; with --processes 2 also `a2b evaluate` on 1 and
on 2 processes, side by side.

detect: `a2b detect` images/s on CPU for the .pt and the .onnx export of one checkpoint (with and
without --maps, the latter on the first --maps-count images), and the largest per-image score
difference between the two.
"""
from __future__ import annotations

import argparse
import json
import os
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


def role_samples(role: Path, manifest: dict):
    """(key, {field: bytes}) of every sample of a local role, in shard order (tar reading only)."""
    import tarfile

    from a2b_dist.data.manifest import split_member

    for shard in manifest["shards"]:
        with tarfile.open(Path(role) / shard["name"], mode="r:") as tar:
            fields, key = {}, None
            for member in tar:
                k, field = split_member(member.name)
                if key is not None and k != key:
                    yield key, fields
                    fields = {}
                key = k
                fields[field] = tar.extractfile(member).read()
            if key is not None:
                yield key, fields


def repeat_role(source: Path, out: Path, images: int) -> Path:
    """A test role of ``images`` samples written by the toolkit's shard writer: the samples of
    ``source`` (a built role) in order, again and again, each pass with its own keys (``KEY-rN``),
    so that `a2b evaluate` reads a set of any size through the real reader. Built once."""
    from a2b_dist.data.images import decode_png
    from a2b_dist.data.manifest import read_manifest
    from a2b_dist.data.write import RoleSpec, Sample, WriteSpec, write_roles

    if (out / "test" / "manifest.json").is_file():
        return out / "test"
    manifest = read_manifest(source)
    size, channels = manifest["image_size"], manifest["channels"]

    def samples():
        made = 0
        for rep in range(-(-images // manifest["samples"])):
            for key, fields in role_samples(source, manifest):
                yield sample(key, fields, rep)
                made += 1
                if made == images:
                    return

    def sample(key, fields, rep):
        mask = decode_png(fields["mask.png"])[0] > 0 if "mask.png" in fields else None
        return Sample(key=f"{key}-r{rep}", image=decode_png(fields["png"]), label=int(fields["cls"]),
                      mask=mask, origin={**json.loads(fields["json"]), "repeat": rep})

    t0 = time.perf_counter()
    spec = WriteSpec(image_size=size, channels=channels, bit_depth=manifest["bit_depth"],
                     source={"kind": "repeated", "from": str(source)}, seed=None,
                     command=f"benchmarks/eval_scale.py: {images} samples of {source}, repeated", overwrite=True)
    write_roles(out, {"test": RoleSpec(samples())}, spec)
    print(f"wrote {out / 'test'} ({images} images) in {time.perf_counter() - t0:.0f} s", flush=True)
    return out / "test"


def _watch_rss(proc: subprocess.Popen, every: float = 0.5) -> list[tuple[float, float]]:
    """(seconds, resident MB) of a child process, sampled until it exits."""
    samples, t0 = [], time.perf_counter()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                samples.append((time.perf_counter() - t0, int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20))
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(every)
    return samples


def run_evaluate(args) -> list[dict]:
    import dataclasses

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
        print(f"built {data} in {time.perf_counter() - t0:.0f} s", flush=True)
    overrides = [f"data.image_size={args.size}", f"model.width={args.width}", f"model.res_blocks={args.res_blocks}"]
    cfg = load_config(str(ROOT / "configs" / "small.yaml"), overrides)
    gen_path = work / f"generator-{args.size}-w{args.width}-r{args.res_blocks}.pt"
    if not gen_path.is_file():
        torch.manual_seed(0)
        gen = build_generator(cfg.model, cfg.data.channels)
        torch.save({"format": "a2b-generator-v1", "generator": gen.state_dict(),
                    "config": dataclasses.asdict(cfg), "step": 0}, gen_path)
    rows = []
    for pixels in args.pixels or [None]:
        role = data / "test"
        if pixels is not None:
            images = max(1, round(pixels / args.size ** 2))
            role = repeat_role(role, work / f"repeat-{args.size}-{images}", images)
        out = work / f"eval-{role.parent.name}-w{args.width}-r{args.res_blocks}"
        cmd = [str(Path(sys.executable).parent / "a2b"), "evaluate", "--checkpoint", str(gen_path),
               "--shards", str(role), "--out", str(out), f"eval.batch_size={args.batch}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        trace = _watch_rss(proc)
        stdout, stderr = proc.communicate()
        seconds = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(stderr[-2000:])
        m = json.loads((out / "metrics.json").read_text())
        peak = max((mb for _, mb in trace), default=float("nan"))
        # memory once the imports, the generator and the first batches are in: the first sample past 10% of the run
        settled = next((mb for t, mb in trace if t >= 0.1 * seconds), peak)
        row = {"images": m["counts"]["samples"], "pixels": m["mask"].get("annotated_pixels"), "seconds": seconds,
               "peak_mb": peak, "settled_mb": settled, "pixel_metrics": m["mask"].get("pixel_metrics"),
               "pixel_auroc": m["pixel_auroc"], "width": args.width, "res_blocks": args.res_blocks}
        rows.append(row)
        (work / f"{out.name}.rss.json").write_text(json.dumps({"row": row, "trace": trace}) + "\n")
        print(f"{row['images']} images: {seconds:.0f} s, peak {peak:.0f} MB", flush=True)
    print(f"\n| test images | annotated pixels | generator | `a2b evaluate` s | M pixels/s | RSS at 10% MB "
          "| peak RSS MB | pixel metrics | pixel AUROC |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['pixels']:,} | width {r['width']}, {r['res_blocks']} blocks | "
              f"{r['seconds']:.0f} | {r['pixels'] / r['seconds'] / 1e6:.2f} | {r['settled_mb']:.0f} | "
              f"{r['peak_mb']:.0f} | {r['pixel_metrics']} | {r['pixel_auroc']:.4f} |")
    return rows


def run_agree(args) -> list[dict]:
    """Binned against exact pixel metrics on a trained generator's maps of a real role: every
    annotated pixel is kept here (the benchmark's memory, not the toolkit's) for sklearn, and the
    same pixels go through the toolkit's histograms. With --processes 2, `a2b evaluate` on the
    role with 1 and with 2 processes (Accelerate, gloo on CPU), their metrics side by side."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    from a2b_dist import losses
    from a2b_dist.checkpoint import load_generator
    from a2b_dist.data import EvalReader
    from a2b_dist.metrics import (add_mask_summary, binned_aupr, binned_auroc, summarise_masks)

    generator, cfg = load_generator(args.checkpoint)
    reader = EvalReader.from_config(cfg, 0, 1)
    summary, kept = None, {"m": [], "d": [], "gt": []}
    with torch.no_grad():
        for batch in reader.batches(args.shards):
            x = batch["image"]
            b_int, m = generator(x)
            diff = losses.anomaly_map(x, losses.blend_healthy(x, b_int, m))
            part = summarise_masks(m, batch["label"].numpy(), batch["mask"], batch["has_mask"], diff)
            summary = part if summary is None else add_mask_summary(summary, part)
            known = batch["has_mask"].numpy().astype(bool)
            kept["m"].append(m.numpy()[known].ravel())
            kept["d"].append(diff.numpy()[known].ravel())
            kept["gt"].append(batch["mask"].numpy()[known].ravel() > 0.5)
    truth = np.concatenate(kept["gt"])
    row = {"shards": str(args.shards), "image_size": cfg.data.image_size, "pixels": int(truth.size),
           "positive": int(truth.sum())}
    for q, name in ((1, "map"), (0, "mask")):
        values = np.concatenate(kept["d" if name == "map" else "m"])
        neg, pos, _ = summary["hist"][q]
        row[name] = {"exact_auroc": float(roc_auc_score(truth, values)), "binned_auroc": binned_auroc(neg, pos),
                     "exact_aupr": float(average_precision_score(truth, values)), "binned_aupr": binned_aupr(neg, pos)}
    rows = [row]
    print("\n| set | px | annotated pixels | quantity | exact AUROC | binned AUROC | |diff| | exact AUPR | binned AUPR |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for name, shown in (("map", "difference map"), ("mask", "M")):
        r = row[name]
        print(f"| {args.label or args.shards} | {row['image_size']} | {row['pixels']:,} | "
              f"{shown} | {r['exact_auroc']:.5f} | {r['binned_auroc']:.5f} | "
              f"{abs(r['exact_auroc'] - r['binned_auroc']):.1e} | {r['exact_aupr']:.5f} | {r['binned_aupr']:.5f} |")
    if args.processes > 1:
        work = Path(args.work)
        outs = {}
        for n in (1, args.processes):
            out = work / f"agree-{args.label or 'set'}-p{n}"
            cmd = [str(Path(sys.executable).parent / "a2b"), "evaluate"] if n == 1 else [
                sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--num_machines", "1", "-m", "a2b_dist.evaluate"]
            env = {**os.environ, "OMP_NUM_THREADS": "1" if n > 1 else "2"}
            subprocess.run(cmd + ["--checkpoint", str(args.checkpoint), "--shards", str(args.shards), "--out", str(out)],
                           check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            outs[n] = json.loads((out / "metrics.json").read_text())
        print(f"\n| `a2b evaluate` | image AUROC | pixel AUROC | pixel AUPRO | M pixel AUROC | pixel metrics |"
              "\n|---|---|---|---|---|---|")
        for n, m in outs.items():
            print(f"| {n} process{'es' if n > 1 else ''} | {m['auroc']:.6f} | {m['pixel_auroc']:.6f} | "
                  f"{m['pixel_aupro']:.6f} | {m['mask']['mask_pixel_auroc']:.6f} | {m['mask']['pixel_metrics']} |")
        row["processes"] = {str(n): {"auroc": m["auroc"], "pixel_auroc": m["pixel_auroc"],
                                     "pixel_aupro": m["pixel_aupro"]} for n, m in outs.items()}
    return rows


def run_detect(args) -> list[dict]:
    """`a2b detect` images/s on this CPU for the .pt export and the .onnx export of one checkpoint,
    on --count PNG files taken from a role (their bytes as stored), and the largest difference
    between the two paths' per-image scores."""
    import csv

    from a2b_dist.data.manifest import read_manifest

    work = Path(args.work)
    manifest = read_manifest(args.shards)
    folder = work / f"detect-images-{manifest['image_size']}-{args.count}"
    if not folder.is_dir():
        staging = work / f".{folder.name}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        made = 0
        for key, fields in role_samples(Path(args.shards), manifest):
            if made == args.count:
                break
            (staging / f"{key}.png").write_bytes(fields["png"])
            made += 1
        if made < args.count:
            raise SystemExit(f"{args.shards} holds {made} images, fewer than --count {args.count}")
        staging.rename(folder)
    a2b = str(Path(sys.executable).parent / "a2b")
    exports = {"pt": work / "detect-model.pt", "onnx": work / "detect-model.onnx"}
    if Path(args.checkpoint).is_file():       # already an export .pt
        exports["pt"] = Path(args.checkpoint)
    else:
        subprocess.run([a2b, "export", str(args.checkpoint), str(exports["pt"])], check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run([a2b, "export", str(args.checkpoint), str(exports["onnx"]), "--format", "onnx"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    few = folder.with_name(f"{folder.name}-first{args.maps_count}")   # --maps draws a panel per image
    if not few.is_dir():
        staging = few.with_name(f".{few.name}.partial")
        staging.mkdir(parents=True, exist_ok=True)
        for png in sorted(folder.iterdir())[:args.maps_count]:
            (staging / png.name).write_bytes(png.read_bytes())
        staging.rename(few)
    rows, scores = [], {}
    for kind, model in exports.items():
        for maps in (False, True):
            out = work / f"detect-out-{kind}{'-maps' if maps else ''}"
            cmd = [a2b, "detect", "--checkpoint", str(model), "--images", str(few if maps else folder),
                   "--out", str(out), "--device", "cpu"] + (["--maps"] if maps else [])
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            with open(out / "scores.csv", newline="") as f:
                table = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
            scores.setdefault(kind, table)
            rows.append({"format": kind, "maps": maps, "images": len(table), "seconds": seconds,
                         "images_per_s": len(table) / seconds})
            print(f"{kind}{' --maps' if maps else ''}: {len(table)} images in {seconds:.1f} s", flush=True)
    worst = max(abs(scores["pt"][k] - scores["onnx"][k]) for k in scores["pt"])
    print(f"\n| export | --maps | images ({manifest['image_size']} px) | `a2b detect` s | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| .{r['format']} | {'yes' if r['maps'] else 'no'} | {r['images']:,} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.0f} |")
    print(f"\nlargest |score(.pt) - score(.onnx)| over the {len(scores['pt'])} images: {worst:.2e}")
    return rows


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
    e.add_argument("--pixels", type=float, nargs="*", default=None,
                   help="annotated pixels per run: the built test role repeated (new keys each pass) up to "
                        "this many images x size^2; default: the built test role once")
    e.add_argument("--width", type=int, default=32, help="generator width (small.yaml: 32)")
    e.add_argument("--res-blocks", type=int, default=3, help="generator residual blocks (small.yaml: 3)")
    e.add_argument("--batch", type=int, default=32, help="eval.batch_size (default 32, the config's)")
    a = sub.add_parser("agree", help="binned against exact pixel metrics on a trained generator's maps")
    a.add_argument("--checkpoint", required=True, help="export .pt or run folder (RUN/best)")
    a.add_argument("--shards", required=True, help="a labelled role with masks, e.g. data/demo/test")
    a.add_argument("--label", default=None, help="name of the set in the table")
    a.add_argument("--processes", type=int, default=1, help="also compare `a2b evaluate` on 1 and N processes")
    a.add_argument("--work", default="runs/eval_scale")
    d = sub.add_parser("detect", help="`a2b detect` images/s for the .pt and the .onnx export")
    d.add_argument("--checkpoint", required=True, help="run folder or checkpoint to export (e.g. RUN/best), "
                   "or an export .pt")
    d.add_argument("--shards", required=True, help="a role whose PNGs become the image folder")
    d.add_argument("--count", type=int, default=2000)
    d.add_argument("--maps-count", type=int, default=200, help="images for the runs with --maps (default 200)")
    d.add_argument("--work", default="runs/eval_scale")
    args = p.parse_args(argv)
    if args.cmd == "detect":
        return run_detect(args)
    if args.cmd == "agree":
        return run_agree(args)
    if args.cmd == "_one":
        print(json.dumps(one_count(args.pixels, args.side, args.batch, args.exact_up_to)))
    elif args.cmd == "metrics":
        return run_metrics(args)
    else:
        return run_evaluate(args)


if __name__ == "__main__":
    main()
