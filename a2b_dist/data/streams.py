"""Readers over role folders: an infinite, resumable training stream and an exactly-once eval pass.

Training (``TrainStream``). Each (rank, worker) reads its own infinite sequence of blocks. Block b
draws one shard, with replacement and weighted by sample count (resampled shards: no rank ever
runs out, so DDP never hangs on uneven shards), from an RNG seeded by
(seed, rank, worker, origin, b), and streams that shard through a shuffle buffer driven by the
same RNG. A position is (block, offset) per worker; every batch carries its worker's position
after the batch, and the DataLoader hands batches over round-robin in worker order, so the main
process knows every worker's position from the batches it consumed. Resuming replays at most one
shard's raw bytes (no decoding) to reach the offset. ``origin`` is 0 for a fresh stream and the
step at which a stream was reseeded because a saved state did not fit (another world size).

Evaluation (``eval_batches``). Samples are numbered across the shards in manifest order; rank r
of W takes the contiguous run [r * n // W, (r + 1) * n // W), split the same way over its
workers, so across all ranks every sample is read exactly once, whatever the shard counts.

A role folder may be a URL (http(s)://, s3://, gs://): its shards stream through a ``Storage``
(bounded timeouts, retries with backoff, the node's cache), with the same order, positions and
exactly-once split as local shards.

Nothing inside a shard is unpickled: only the ``png``/``mask.png`` fields are decoded (Pillow),
``cls`` is parsed as ASCII; every other field is ignored.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import signal
import tarfile
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .images import decode_png, to_float
from .manifest import MANIFEST, DataError, open_role, split_member
from .storage import Storage, is_url, join

STATE_FORMAT = "a2b-trainstream/1"


# Reading shards.

class _BrokenShard(Exception):
    def __init__(self, path: str, last_key: Optional[str], reason: BaseException):
        super().__init__(f"{path}: truncated or unreadable tar after key {last_key!r} ({reason})")


class _CorruptSample(Exception):
    pass


def _tar_samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) in file order from a tar stream. A sample cut off by a truncation is not yielded."""
    key, fields = None, {}
    for member in wds.tariterators.tar_file_iterator(stream):
        member_key, field = split_member(member["fname"])
        if member_key != key:
            if key is not None:
                yield key, fields
            key, fields = member_key, {}
        fields[field] = member["data"]
    if key is not None:
        yield key, fields


def _shard_samples(path: str, storage: Storage, size: int, sha256: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of one shard, a local file or a URL read through ``storage`` (its
    cache, or a stream). A stream that fails is opened again, with backoff, and the samples
    already delivered are read past; the last failure raises TransferError naming the URL."""
    delivered, last, attempt = 0, None, 0
    while True:
        try:
            with storage.open_shard(path, size=size, sha256=sha256) as stream:
                for index, (key, fields) in enumerate(_tar_samples(stream)):
                    if index >= delivered:
                        delivered += 1
                        last = key
                        yield key, fields
            return
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise _BrokenShard(path, last, exc) from None
        except DataError:
            raise
        except Exception as exc:   # a transfer that failed (each library has its own errors; failed() sorts them)
            if not is_url(path):   # a local file that cannot be read is damaged, as a bad tar
                if isinstance(exc, OSError):
                    raise _BrokenShard(path, last, exc) from None
                raise
            storage.failed(path, "reading", exc, attempt)
            attempt += 1


def _decode_image(fields: dict, image_size: int, channels: int) -> np.ndarray:
    if "png" not in fields:
        raise _CorruptSample(f"no png field (fields: {', '.join(sorted(fields)) or 'none'})")
    try:
        array = decode_png(fields["png"])
    except Exception as exc:  # Pillow raises many types on bad bytes
        raise _CorruptSample(f"png does not decode ({type(exc).__name__}: {exc})") from None
    if array.shape != (channels, image_size, image_size):
        raise _CorruptSample(f"png is {array.shape}, expected {(channels, image_size, image_size)}")
    return array


def _decode_eval(fields: dict, image_size: int, channels: int) -> tuple[np.ndarray, int, Optional[np.ndarray]]:
    image = _decode_image(fields, image_size, channels)
    label = -1
    if "cls" in fields:
        text = fields["cls"].decode("ascii", "replace").strip()
        if text not in ("0", "1"):
            raise _CorruptSample(f"cls is {text!r}, expected 0 or 1")
        label = int(text)
    mask = None
    if "mask.png" in fields:
        try:
            mask = decode_png(fields["mask.png"])
        except Exception as exc:
            raise _CorruptSample(f"mask.png does not decode ({type(exc).__name__}: {exc})") from None
        if mask.shape != (1, image_size, image_size):
            raise _CorruptSample(f"mask.png is {mask.shape}, expected {(1, image_size, image_size)}")
    return image, label, mask


def _corrupt(path: str, key: str, reason: Exception) -> DataError:
    return DataError(f"{path}: sample {key!r}: {reason} (skip_corrupt=True skips and counts such samples)")


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A deterministic shuffle buffer: holds up to `size` items; a shard that fits is fully permuted."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _in_worker(batches: Iterator[dict]) -> Iterator[dict]:
    """In a DataLoader worker, hand a DataError to the main process as a record and end cleanly:
    the main process raises it with the worker's own message (a worker that raises instead
    takes seconds to join, and its error arrives wrapped in a worker traceback)."""
    try:
        yield from batches
    except DataError as exc:
        if get_worker_info() is None:
            raise
        yield {"error": str(exc)}


def _ignore_sigterm(worker_id: int) -> None:
    """In a training loader worker: ignore SIGTERM. SLURM signals every process of a job on
    scancel or a time limit, and torch's worker handler would die of it mid-batch, failing the
    trainer before it can save (a2b_dist.signals.StopOnSignal); the worker still ends when its
    trainer stops it or exits."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raise_error_record(batch: dict) -> None:
    if "error" in batch:
        raise DataError(batch["error"])


# Training stream.

def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class StreamSpec:
    """How one rank reads a training role: built once (``from_config``), checked on construction.

    ``seed``, ``rank`` and ``world_size`` fix the sample order (with the worker and its position);
    ``num_workers`` loader processes (0: in-process), each holding ``shuffle_buffer`` samples;
    ``skip_corrupt`` skips and counts undecodable samples and damaged shards; ``verify`` is the
    check of each shard on open (size, count or sha256)."""

    batch_size: int
    image_size: int
    channels: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 256
    skip_corrupt: bool = False
    verify: str = "count"

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 1), ("seed", 0), ("world_size", 1), ("rank", 0)):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum))
        if self.rank >= self.world_size:
            raise DataError(f"rank {self.rank} is outside world_size {self.world_size}")
        for name, minimum in (("num_workers", 0), ("shuffle_buffer", 1)):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum))

    @classmethod
    def from_config(cls, data, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    verify: Optional[str] = None) -> "StreamSpec":
        """data.image_size, data.channels, data.num_workers, data.shuffle_buffer, data.skip_corrupt
        and data.verify (``verify`` overrides it: the trainer may check on one rank only); the
        batch (per rank) and the seed are the trainer's."""
        return cls(batch_size=batch_size, image_size=data.image_size, channels=data.channels, seed=seed, rank=rank,
                   world_size=world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                   skip_corrupt=data.skip_corrupt, verify=data.verify if verify is None else verify)


@dataclass(frozen=True, eq=False)
class _Plan:
    """What every worker of one TrainStream reads, fixed when the stream opens."""

    spec: StreamSpec
    role_dir: str
    storage: Storage
    shards: list              # (path, samples, bytes, sha256) per shard
    weights: np.ndarray       # a block draws its shard with these probabilities (samples per shard)
    streams: int              # logical worker streams: max(1, num_workers)


class _WorkerStream:
    """One worker's infinite sequence of blocks; yields (array, block, offset after it)."""

    def __init__(self, plan: _Plan, origin: int, worker: int):
        self.plan, self.origin, self.worker = plan, origin, worker
        self.skipped = 0

    def block_rng(self, block: int) -> tuple[int, np.random.Generator]:
        p = self.plan
        rng = np.random.default_rng([p.spec.seed, p.spec.rank, self.worker, self.origin, block])
        return int(rng.choice(len(p.shards), p=p.weights)), rng

    def samples(self, block: int, offset: int) -> Iterator[tuple[np.ndarray, int, int]]:
        p, spec = self.plan, self.plan.spec
        idle_blocks = 0
        while True:
            shard, rng = self.block_rng(block)
            path, expected, size, sha256 = p.shards[shard]
            delivered, good = 0, 0
            missing = 0

            def read():
                nonlocal delivered, missing
                try:
                    for item in _shard_samples(path, p.storage, size, sha256):
                        delivered += 1
                        yield item
                except _BrokenShard as exc:
                    if not spec.skip_corrupt:
                        raise DataError(f"{exc} (skip_corrupt=True skips and counts the lost samples)") from None
                    missing = max(0, expected - delivered)
                    return
                if delivered != expected:   # checked on open for local shards, here for streamed ones
                    if not spec.skip_corrupt:
                        raise DataError(f"{path}: holds {delivered} samples, its manifest lists {expected} "
                                        "(skip_corrupt=True skips and counts the lost samples)")
                    missing = max(0, expected - delivered)

            for n, (key, fields) in enumerate(_shuffled(read(), spec.shuffle_buffer, rng), start=1):
                if n <= offset:
                    continue  # resuming: replay the block's order without decoding
                try:
                    array = _decode_image(fields, spec.image_size, spec.channels)
                except _CorruptSample as exc:
                    if not spec.skip_corrupt:
                        raise _corrupt(path, key, exc) from None
                    self.skipped += 1
                    continue
                good += 1
                yield array, block, n
            self.skipped += missing
            idle_blocks = idle_blocks + 1 if good == 0 and offset == 0 else 0
            if idle_blocks >= 10 * len(p.shards) + 10:
                raise DataError(f"{p.role_dir}: no decodable sample in {idle_blocks} shard reads in a row")
            block, offset = block + 1, 0


class _TrainWorkers(IterableDataset):
    """Runs in each DataLoader worker (or in-process): batches of one logical worker stream."""

    def __init__(self, plan: _Plan, origin: int, positions: list[list[int]], first_worker: int):
        super().__init__()
        self.plan, self.origin, self.positions, self.first_worker = plan, origin, positions, first_worker

    def __iter__(self):
        return _in_worker(self._batches())

    def _batches(self):
        p = self.plan
        info = get_worker_info()
        # Logical worker ids are rotated so that, after a resume, the first batch comes from the
        # worker whose turn it was; the DataLoader always starts its round-robin at worker 0.
        worker = ((info.id if info else 0) + self.first_worker) % p.streams
        stream = _WorkerStream(p, self.origin, worker)
        block, offset = self.positions[worker]
        images = []
        for array, block, offset in stream.samples(block, offset):
            images.append(to_float(array))
            if len(images) == p.spec.batch_size:
                batch = torch.from_numpy(np.stack(images))  # (B, C, H, W)
                yield {"image": batch, "worker": worker, "position": [block, offset], "skipped": stream.skipped}
                images = []


class TrainStream:
    """Infinite shuffled batches (batch_size, C, H, W) float32 in [-1, 1] for one rank; resumable.

    ``spec`` (a StreamSpec) says how: the batch, the images, the seed and rank, the workers, the
    checks. Different per rank and per worker, reproducible from (seed, rank, worker, position).
    ``state_dict()`` is the position after the last batch yielded; ``load_state_dict(state, step)``
    continues exactly from it, or reseeds from (seed, rank, worker, step) with a warning when the
    state was saved under another layout (world size, rank, workers, shards, shuffle buffer).
    """

    def __init__(self, role_dir: str | os.PathLike, spec: StreamSpec, *, storage: Optional[Storage] = None):
        role_dir = str(role_dir)
        storage = storage or Storage()
        started = time.perf_counter()
        self.manifest = open_role(role_dir, image_size=spec.image_size, channels=spec.channels,
                                  skip_corrupt=spec.skip_corrupt, verify=spec.verify, storage=storage)
        # What was checked on open, for the run's log: remote checks and sha256 take real time.
        self.checked = {"location": role_dir, "remote": is_url(role_dir), "verify": spec.verify,
                        "shards": len(self.manifest["shards"]),
                        "bytes": sum(s["bytes"] for s in self.manifest["shards"]),
                        "seconds": round(time.perf_counter() - started, 3)}
        shards = [(join(role_dir, s["name"]), s["samples"], s["bytes"], s["sha256"]) for s in self.manifest["shards"]]
        counts = np.array([s[1] for s in shards], dtype=np.float64)
        if counts.sum() == 0:
            raise DataError(f"{join(role_dir, MANIFEST)}: the role holds no samples")
        self.spec = spec
        self.num_workers = spec.num_workers
        self.streams = max(1, spec.num_workers)
        self._plan = _Plan(spec, role_dir, storage, shards, counts / counts.sum(), self.streams)
        listing = json.dumps([[s["name"], s["samples"], s["sha256"]] for s in self.manifest["shards"]])
        self._shards_id = hashlib.sha256(listing.encode()).hexdigest()[:16]
        self._reset(origin=0, skipped=0)

    def _reset(self, origin: int, skipped: int) -> None:
        self._origin = origin
        self._positions = [[0, 0] for _ in range(self.streams)]
        self._next_worker = 0
        self._skipped_before = skipped
        self._skipped_now = [0] * self.streams

    @property
    def skipped(self) -> int:
        """Corrupt or lost samples skipped so far (only with skip_corrupt)."""
        return self._skipped_before + sum(self._skipped_now)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._skipped_before, self._skipped_now = self.skipped, [0] * self.streams
        dataset = _TrainWorkers(self._plan, self._origin, [list(p) for p in self._positions], self._next_worker)
        if self.num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                      worker_init_fn=_ignore_sigterm))
        for batch in batches:
            _raise_error_record(batch)
            worker = batch["worker"]
            self._positions[worker] = list(batch["position"])
            self._next_worker = (worker + 1) % self.streams
            self._skipped_now[worker] = batch["skipped"]
            yield batch["image"]  # (B, C, H, W)

    def _layout(self) -> dict:
        spec = self.spec
        return {
            "format": STATE_FORMAT,
            "seed": spec.seed,
            "rank": spec.rank,
            "world_size": spec.world_size,
            "streams": self.streams,
            "shuffle_buffer": spec.shuffle_buffer,
            "shards": self._shards_id,
        }

    def state_dict(self) -> dict:
        """The position after the last batch yielded; JSON-serialisable."""
        return dict(
            self._layout(),
            origin=self._origin,
            next_worker=self._next_worker,
            positions=[list(p) for p in self._positions],
            skipped=self.skipped,
        )

    def load_state_dict(self, state: dict, step: int) -> None:
        """Continue exactly from a saved state, or reseed from (seed, rank, worker, step) if it does not fit."""
        step = _check_int("step", step, 0)
        state = state if isinstance(state, dict) else {}
        differs = [f"{k} {state.get(k)!r} -> {v!r}" for k, v in self._layout().items() if state.get(k) != v]
        positions = state.get("positions")
        valid = (
            isinstance(positions, list)
            and len(positions) == self.streams
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) for p in positions)
            and isinstance(state.get("origin"), int)
            and isinstance(state.get("next_worker"), int)
            and 0 <= state["next_worker"] < self.streams
        )
        skipped = state.get("skipped", 0) if isinstance(state.get("skipped"), int) else 0
        if differs or not valid:
            reason = "no saved state" if not state else ", ".join(differs) if differs else "malformed positions"
            warnings.warn(
                f"TrainStream for {self._plan.role_dir}: the saved stream state does not fit ({reason}); "
                f"reseeding from (seed, rank, worker, step={step}), so the sample order differs from an "
                f"uninterrupted run",
                stacklevel=2,
            )
            self._reset(origin=step, skipped=skipped)
            return
        self._reset(origin=state["origin"], skipped=skipped)
        self._positions = [list(p) for p in positions]
        self._next_worker = state["next_worker"]


# Evaluation pass.

class _EvalWorkers(IterableDataset):
    def __init__(self, plan: dict):
        super().__init__()
        self.plan = plan

    def __iter__(self):
        return _in_worker(self._batches())

    def _batches(self):
        p = self.plan
        info = get_worker_info()
        worker = info.id if info else 0
        skipped = 0
        batch: list[tuple] = []
        for path, start, stop, size, sha256 in p["ranges"][worker]:
            index = -1
            try:
                for index, (key, fields) in enumerate(_shard_samples(path, p["storage"], size, sha256)):
                    if index < start:
                        continue
                    if index >= stop:
                        break
                    try:
                        batch.append((key, *_decode_eval(fields, p["image_size"], p["channels"])))
                    except _CorruptSample as exc:
                        if not p["skip_corrupt"]:
                            raise _corrupt(path, key, exc) from None
                        skipped += 1
                        continue
                    if len(batch) == p["batch_size"]:
                        yield _collate(batch, worker, skipped, p["image_size"])
                        batch = []
            except _BrokenShard as exc:
                if not p["skip_corrupt"]:
                    raise DataError(f"{exc} (skip_corrupt=True skips and counts the lost samples)") from None
                skipped += stop - max(start, index + 1)
                continue
            if index + 1 < stop:  # the shard holds fewer samples than its manifest says
                if not p["skip_corrupt"]:
                    raise DataError(f"{path}: ends after {index + 1} samples, the manifest lists at least {stop}")
                skipped += stop - max(start, index + 1)
        if batch:
            yield _collate(batch, worker, skipped, p["image_size"])
        yield {"done": True, "worker": worker, "skipped": skipped}


def _collate(batch: list[tuple], worker: int, skipped: int, image_size: int) -> dict:
    keys, images, labels, masks = zip(*batch)
    blank = np.zeros((1, image_size, image_size), np.uint8)
    return {
        "image": torch.from_numpy(np.stack([to_float(x) for x in images])),  # (B, C, H, W)
        "label": torch.tensor(labels, dtype=torch.int64),  # (B,), -1 unknown
        "mask": torch.from_numpy(np.stack([blank if m is None else m for m in masks]) > 0).float(),  # (B, 1, H, W)
        "has_mask": torch.tensor([m is not None for m in masks], dtype=torch.bool),  # (B,)
        "key": list(keys),
        "worker": worker,
        "skipped": skipped,
    }


class EvalBatches:
    """Iterator over one rank's share of a role, in a fixed order; ``skipped`` counts skipped samples."""

    def __init__(self, plan: dict, num_workers: int, samples: int):
        self._plan, self._num_workers = plan, num_workers
        self.samples = samples  # this rank's share, skipped ones included
        self._skipped = [0] * max(1, num_workers)
        self._iterator: Optional[Iterator[dict]] = None

    @property
    def skipped(self) -> int:
        return sum(self._skipped)

    def __iter__(self) -> "EvalBatches":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._run()
        return next(self._iterator)

    def _run(self) -> Iterator[dict]:
        dataset = _EvalWorkers(self._plan)
        if self._num_workers == 0:
            batches = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self._num_workers))
        for batch in batches:
            _raise_error_record(batch)
            self._skipped[batch["worker"]] = batch["skipped"]
            if batch.get("done"):
                continue
            yield {k: batch[k] for k in ("image", "label", "mask", "has_mask", "key")}
        if self.skipped:
            warnings.warn(f"{self._plan['role_dir']}: skipped {self.skipped} corrupt or lost samples of {self.samples}")


def eval_batches(
    role_dir: str | os.PathLike,
    *,
    batch_size: int,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    skip_corrupt: bool = False,
    storage: Optional[Storage] = None,
) -> EvalBatches:
    """A finite pass over this rank's share of a role; all ranks together see every sample once.

    Batches are dicts: image float32 (B, C, H, W) in [-1, 1]; label int64 (B,), -1 where unknown;
    mask float32 (B, 1, H, W) in {0, 1}, zeros where absent; has_mask bool (B,); key list[str].
    ``role_dir`` may be a URL, read through ``storage``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    _check_int("num_workers", num_workers, 0)
    role_dir = str(role_dir)
    storage = storage or Storage()
    manifest = open_role(role_dir, image_size=image_size, channels=channels, skip_corrupt=skip_corrupt,
                         storage=storage)
    total = manifest["samples"]
    lo, hi = total * rank // world_size, total * (rank + 1) // world_size
    workers = max(1, num_workers)
    ranges = []
    for w in range(workers):
        w_lo, w_hi = lo + (hi - lo) * w // workers, lo + (hi - lo) * (w + 1) // workers
        ranges.append(_shard_ranges(role_dir, manifest["shards"], w_lo, w_hi))
    plan = {
        "role_dir": role_dir,
        "storage": storage,
        "ranges": ranges,
        "batch_size": batch_size,
        "image_size": manifest["image_size"],
        "channels": manifest["channels"],
        "skip_corrupt": skip_corrupt,
    }
    return EvalBatches(plan, num_workers, hi - lo)


def _shard_ranges(role_dir: str, shards: list[dict], lo: int, hi: int) -> list[tuple[str, int, int, int, str]]:
    """Global sample range [lo, hi) -> (shard location, first local index, stop, bytes, sha256) per shard touched."""
    out, first = [], 0
    for shard in shards:
        last = first + shard["samples"]
        start, stop = max(lo, first), min(hi, last)
        if start < stop:
            out.append((join(role_dir, shard["name"]), start - first, stop - first, shard["bytes"], shard["sha256"]))
        first = last
    return out


@dataclass(frozen=True)
class EvalReader:
    """How every rank reads a role for scoring: the options of ``eval_batches``, held once so that
    the evaluation functions (scoring, references, FID) take one object instead of seven loose
    arguments (as stylegan2-ada's MetricOptions)."""
    batch_size: int = 32
    image_size: Optional[int] = None
    channels: Optional[int] = None
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    skip_corrupt: bool = False
    storage: Storage = Storage()

    @classmethod
    def from_config(cls, cfg, rank: int = 0, world_size: int = 1) -> "EvalReader":
        """eval.batch_size, the data section's image size, channels, loader workers, skip_corrupt,
        and how URLs are read (timeouts, retries, the node's cache)."""
        return cls(batch_size=cfg.eval.batch_size, image_size=cfg.data.image_size, channels=cfg.data.channels,
                   rank=rank, world_size=world_size, num_workers=cfg.data.num_workers,
                   skip_corrupt=cfg.data.skip_corrupt, storage=Storage.from_config(cfg.data))

    def batches(self, role_dir: str | os.PathLike) -> EvalBatches:
        """This rank's share of one pass over ``role_dir`` (eval_batches)."""
        return eval_batches(role_dir, batch_size=self.batch_size, image_size=self.image_size,
                            channels=self.channels, rank=self.rank, world_size=self.world_size,
                            num_workers=self.num_workers, skip_corrupt=self.skip_corrupt,
                            storage=self.storage)
