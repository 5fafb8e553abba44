"""a2b_dist.data readers: manifest checks, exactly-once evaluation, resumable training streams,
corrupt samples, and the image preprocessing rule."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from a2b_dist.data import (DataError, StreamSpec, TrainStream, eval_batches, load_image, prepare_image, read_manifest,
                           to_tensor)
from a2b_dist.data.manifest import count_samples, sha256_file
from a2b_dist.data.write import RoleSpec, Sample, WriteSpec, write_roles


def make_role(root: Path, n: int, maxcount: int, role: str = "test", size: int = 8) -> Path:
    """A role of n random 8-bit samples (labels alternate, masks on anomalies) in shards of maxcount."""
    rng = np.random.default_rng(n)
    samples = [
        Sample(key=f"s{i:03d}", image=rng.integers(0, 256, (1, size, size), dtype=np.uint8),
               label={"healthy": 0, "mixed": None}.get(role, i % 2),
               mask=np.eye(size, dtype=np.uint8) if i % 2 and role in ("val", "test") else None, origin={"i": i})
        for i in range(n)
    ]
    spec = WriteSpec(image_size=size, channels=1, bit_depth=8, source={}, seed=0, command="test", maxcount=maxcount)
    write_roles(root, {role: RoleSpec(samples)}, spec)
    return root / role


def rewrite_shard(role_dir: Path, index: int, edit) -> Path:
    """Apply edit(list of (name, bytes)) to a shard's members and make the manifest agree again."""
    manifest = json.loads((role_dir / "manifest.json").read_text())
    shard = manifest["shards"][index]
    path = role_dir / shard["name"]
    with tarfile.open(path) as tar:
        entries = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in edit(entries):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard.update(bytes=path.stat().st_size, sha256=sha256_file(path), samples=count_samples(path))
    manifest["samples"] = sum(s["samples"] for s in manifest["shards"])
    (role_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def take(stream: TrainStream, n: int) -> list[torch.Tensor]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


# Layers.

def test_the_shard_format_imports_no_source():
    """a2b_dist/data/ is the shard format; a2b_dist/sources/ (where images come from) imports it,
    never the reverse (issue 28)."""
    import ast

    data = Path(__file__).resolve().parents[1] / "a2b_dist" / "data"
    found = []
    for path in sorted(data.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "a2b_dist.data".rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                modules = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}: {m}" for m in modules if m.split(".")[:2] == ["a2b_dist", "sources"]]
    assert not found, found
    assert len(list(data.glob("*.py"))) >= 6   # the scan saw the package


# Manifest checks on open.

@pytest.fixture()
def role(tmp_path) -> Path:
    return make_role(tmp_path, n=10, maxcount=4)  # shards of 4, 4, 2


def test_manifest_reads_and_verifies(role):
    manifest = read_manifest(role, image_size=8, channels=1, verify="sha256")
    assert manifest["samples"] == 10 and [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["labels"] == {"0": 5, "1": 5} and manifest["masks"] == 5


def test_missing_manifest(role):
    (role / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest\.json not found"):
        read_manifest(role)


def test_missing_shard(role):
    (role / "test-000001.tar").unlink()
    with pytest.raises(DataError, match=r"test-000001\.tar: shard listed in .* is missing"):
        read_manifest(role)


def test_count_mismatch(role):
    manifest = json.loads((role / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["samples"] += 1
    (role / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"test-000000\.tar: holds 4 samples, .* lists 5"):
        read_manifest(role)


def test_size_mismatch(role):
    with pytest.raises(DataError, match=r"manifest\.json: the shards hold 8x8 images, but image_size=64"):
        read_manifest(role, image_size=64)
    with pytest.raises(DataError, match="image_size=64"):
        TrainStream(role, StreamSpec(batch_size=2, image_size=64, channels=1, seed=0))


def test_channel_mismatch(role):
    with pytest.raises(DataError, match=r"manifest\.json: the shards hold 1-channel images, but channels=3"):
        read_manifest(role, channels=3)
    with pytest.raises(DataError, match="channels=3"):
        eval_batches(role, batch_size=2, channels=3)


def test_malformed_manifest_field(role):
    manifest = json.loads((role / "manifest.json").read_text())
    del manifest["image_size"]
    (role / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="field image_size is missing"):
        read_manifest(role)


# Evaluation: every sample exactly once across ranks.

@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_exactly_once_with_uneven_shards(tmp_path, sim_shards, world_size):
    small = make_role(tmp_path, n=10, maxcount=7)  # two shards (7 + 3): fewer shards than 3 ranks
    for role_dir in (small, sim_shards / "test"):  # 80 samples in shards of 30, 30, 20
        expected = read_manifest(role_dir)["samples"]
        per_rank = [keys_of(eval_batches(role_dir, batch_size=4, rank=r, world_size=world_size))
                    for r in range(world_size)]
        everything = [k for keys in per_rank for k in keys]
        assert len(everything) == len(set(everything)) == expected
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1  # balanced: DDP ranks stay in step
        assert per_rank[0] == keys_of(eval_batches(role_dir, batch_size=4, rank=0, world_size=world_size))


def test_eval_with_workers_covers_the_same_samples(sim_shards):
    alone = keys_of(eval_batches(sim_shards / "test", batch_size=8, rank=1, world_size=2))
    pooled = keys_of(eval_batches(sim_shards / "test", batch_size=8, rank=1, world_size=2, num_workers=2))
    assert sorted(alone) == sorted(pooled) and len(pooled) == 40


def test_eval_batch_fields(sim_shards):
    batches = list(eval_batches(sim_shards / "test", batch_size=16))
    b = batches[0]
    assert b["image"].shape == (16, 1, 32, 32) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["label"].dtype == torch.int64 and set(b["label"].tolist()) <= {0, 1}
    assert b["mask"].shape == (16, 1, 32, 32) and set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    assert b["has_mask"].dtype == torch.bool and b["has_mask"].all()  # simulated test: masks for all
    labels = torch.cat([b["label"] for b in batches])
    masked = torch.cat([b["mask"].flatten(1).amax(1) for b in batches])
    assert torch.equal(masked.long(), labels)  # a square exactly where anomalous
    mixed = next(iter(eval_batches(sim_shards / "mixed", batch_size=16)))
    assert (mixed["label"] == -1).all() and not mixed["has_mask"].any() and not mixed["mask"].any()


# Training streams.

def test_stream_reproducible_and_different_per_rank_and_seed(sim_shards):
    def first(**kw):
        args = dict(batch_size=8, image_size=32, channels=1, seed=0) | kw
        return torch.stack(take(TrainStream(sim_shards / "healthy", StreamSpec(**args)), 3))

    a = first()
    assert a.shape == (3, 8, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, first())
    assert not torch.equal(a, first(seed=1))
    assert not torch.equal(first(rank=0, world_size=2), first(rank=1, world_size=2))


def test_stream_differs_per_worker(sim_shards):
    stream = TrainStream(sim_shards / "healthy",
                         StreamSpec(batch_size=8, image_size=32, channels=1, seed=0, num_workers=2))
    batches = take(stream, 4)  # round-robin: worker 0, 1, 0, 1
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[2], batches[3])
    assert [p[1] for p in stream.state_dict()["positions"]] == [16, 16]


def test_stream_is_shuffled_and_covers_the_role(sim_shards):
    stream = TrainStream(sim_shards / "healthy", StreamSpec(batch_size=10, image_size=32, channels=1, seed=0))
    seen = torch.cat(take(stream, 16)).flatten(1)  # 160 draws from 80 samples in 3 shards
    distinct = torch.unique(seen, dim=0)
    assert len(distinct) > 60
    everything = torch.cat([b["image"] for b in eval_batches(sim_shards / "healthy", batch_size=80)]).flatten(1)
    order = [int((everything == row).all(1).nonzero()[0]) for row in seen[:30]]
    assert order != sorted(order)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resume_is_exact(sim_shards, num_workers):
    args = dict(batch_size=7, image_size=32, channels=1, seed=3, rank=1, world_size=2, num_workers=num_workers,
                shuffle_buffer=16)
    n = 5  # odd: the resumed run must start with worker 1's turn
    straight = take(TrainStream(sim_shards / "healthy", StreamSpec(**args)), 2 * n)
    first = TrainStream(sim_shards / "healthy", StreamSpec(**args))
    assert all(torch.equal(a, b) for a, b in zip(take(first, n), straight[:n]))
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TrainStream(sim_shards / "healthy", StreamSpec(**args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed.load_state_dict(state, step=n)
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, n), straight[n:]))


def test_stream_resume_on_another_layout_reseeds_with_a_warning(sim_shards):
    args = dict(batch_size=4, image_size=32, channels=1, seed=0)
    two = TrainStream(sim_shards / "healthy", StreamSpec(rank=0, world_size=2, **args))
    take(two, 3)
    state = two.state_dict()

    def resumed():
        one = TrainStream(sim_shards / "healthy", StreamSpec(**args))
        with pytest.warns(UserWarning, match=r"world_size 2 -> 1.*reseeding.*step=3"):
            one.load_state_dict(state, step=3)
        return torch.stack(take(one, 2))

    fresh = torch.stack(take(TrainStream(sim_shards / "healthy", StreamSpec(**args)), 2))
    assert torch.equal(resumed(), resumed()) and not torch.equal(resumed(), fresh)


# Corrupt samples and shards.

def test_bad_png_fails_naming_shard_and_key(tmp_path):
    role_dir = make_role(tmp_path, n=10, maxcount=10, role="healthy")
    rewrite_shard(role_dir, 0, lambda es: [(n, b"garbage" if n == "s004.png" else d) for n, d in es])
    with pytest.raises(DataError, match=r"healthy-000000\.tar: sample 's004': png does not decode"):
        list(eval_batches(role_dir, batch_size=4))
    with pytest.raises(DataError, match=r"healthy-000000\.tar: sample 's004'"):
        take(TrainStream(role_dir, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0)), 5)
    with pytest.raises(DataError, match=r"healthy-000000\.tar: sample 's004'"):  # re-raised from a worker
        take(TrainStream(role_dir, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0, num_workers=1)), 5)


def test_bad_png_skipped_and_counted(tmp_path):
    role_dir = make_role(tmp_path, n=10, maxcount=10, role="healthy")
    rewrite_shard(role_dir, 0, lambda es: [(n, b"garbage" if n == "s004.png" else d) for n, d in es])
    batches = eval_batches(role_dir, batch_size=4, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipped 1"):
        keys = keys_of(batches)
    assert batches.skipped == 1 and len(keys) == 9 and "s004" not in keys
    stream = TrainStream(role_dir, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0, skip_corrupt=True))
    take(stream, 5)  # 20 draws from one shard of 10: the bad sample came by twice
    assert stream.skipped == 2 and stream.state_dict()["skipped"] == 2


def test_truncated_tar_fails_naming_shard_and_key(role):
    path = role / "test-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])  # cut inside the second shard
    with pytest.raises(DataError, match=r"test-000001\.tar: \d+ bytes, .*truncated.*key 's00\d'"):
        read_manifest(role)
    with pytest.raises(DataError, match=r"test-000001\.tar.*key 's00\d'"):
        eval_batches(role, batch_size=4)
    with pytest.raises(DataError, match=r"test-000001\.tar.*skip_corrupt"):
        TrainStream(role, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0))


def test_truncated_tar_skipped_and_counted(role):
    path = role / "test-000001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.warns(UserWarning, match="test-000001.tar"):
        batches = eval_batches(role, batch_size=4, skip_corrupt=True)
    with pytest.warns(UserWarning, match="skipped"):
        keys = keys_of(batches)
    assert batches.skipped > 0 and len(keys) + batches.skipped == 10 and len(set(keys)) == len(keys)
    with pytest.warns(UserWarning, match="test-000001.tar"):
        stream = TrainStream(role, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0, skip_corrupt=True))
    take(stream, 10)
    assert stream.skipped > 0


def test_pickles_in_a_shard_are_never_loaded(tmp_path):
    role_dir = make_role(tmp_path, n=6, maxcount=6, role="healthy")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap(str(marker)))

    def add_pickles(entries):
        out = []
        for name, data in entries:
            out.append((name, data))
            if name == "s002.png":  # webdataset's default decoders would unpickle these two
                out += [("s002.pickle", payload), ("s002.pyd", payload)]
        return out

    rewrite_shard(role_dir, 0, add_pickles)
    assert len(keys_of(eval_batches(role_dir, batch_size=4))) == 6
    take(TrainStream(role_dir, StreamSpec(batch_size=4, image_size=8, channels=1, seed=0)), 3)
    assert not marker.exists()


class _Trap:
    """Unpickling this creates a file: the readers must never do it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# Preprocessing.

def test_to_tensor_scales_by_dtype():
    assert to_tensor(np.array([[[0, 255]]], np.uint8)).tolist() == [[[-1.0, 1.0]]]
    assert to_tensor(np.array([[[0, 65535]]], np.uint16)).tolist() == [[[-1.0, 1.0]]]
    assert torch.equal(to_tensor(np.array([[[51]]], np.uint8)), to_tensor(np.array([[[51 * 257]]], np.uint16)))


def test_prepare_image_rule():
    gray = np.arange(20 * 40, dtype=np.uint16).reshape(20, 40)
    out = prepare_image(gray, 10, 1)
    assert out.shape == (1, 10, 10) and out.dtype == np.uint16  # 16-bit kept
    assert np.array_equal(prepare_image(gray[:, 5:25], 20, 1)[0], gray[:, 5:25])  # exact when nothing to do
    wide = np.zeros((16, 32), np.uint8)
    wide[:, 8:24] = 200  # the centre 16 columns survive the crop unchanged
    assert np.array_equal(prepare_image(wide, 16, 1)[0], np.full((16, 16), 200, np.uint8))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 100
    assert (prepare_image(rgb, 4, 1) == 30).all()  # 0.299 * 100, rounded
    assert np.array_equal(prepare_image(gray[:, :20], 20, 3), np.repeat(gray[None, :, :20], 3, axis=0))


def test_load_image_names_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"x\.png: not a readable image"):
        load_image(tmp_path / "x.png", 8, 1)
