"""shards/build.py simulated --source cthead: augmented slices of the real head CT in Debian's
invesalius-examples. The volume reads as documented; the roles never share a slice (nor adjacent
ones); anomalies lie inside the brain and change nothing outside their mask; hemorrhages brighten;
builds are reproducible; a missing file is a one-line error naming the package.

Skipped (with the reason) where the package's file is absent; .ci/run installs it."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from a2b_dist.data import DataError, read_manifest
from a2b_dist.sources import cthead
from a2b_dist.sources.anomalies import KINDS
from a2b_dist.sources.simulate import render_clean
from conftest import BUILD, build_module, tar_members

build = build_module()

ROLES = ("healthy", "mixed", "val", "test")
SIZE = 32


def _ct_file() -> str:
    return str(cthead.locate())


def _ct_missing() -> str:
    """Why the head CT cannot be read here ('' when it can)."""
    try:
        cthead.locate()
    except DataError as exc:
        return f"{exc}; .ci/run installs it"
    return ""


needs_ct = pytest.mark.skipif(bool(_ct_missing()), reason=_ct_missing())


def samples(role_dir: Path) -> list[dict]:
    """Every sample of a role: origin (json), image, mask (or None)."""
    return [{"origin": json.loads(f["json"]),
             "image": np.asarray(Image.open(io.BytesIO(f["png"]))),
             "mask": np.asarray(Image.open(io.BytesIO(f["mask.png"]))) > 0 if "mask.png" in f else None}
            for f in tar_members(role_dir).values()]


def run_build(out: Path, *args: str) -> Path:
    assert build.main(["simulated", "--source", "cthead", *args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """--count 200 --size 32, default anomaly (lesion), seed 0."""
    return run_build(tmp_path_factory.mktemp("cthead") / "out", "--count", "200", "--size", str(SIZE), "--seed", "0")


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


@needs_ct
def test_volume_reads_as_a_head_ct_in_hounsfield_units():
    volume = cthead.load_volume(_ct_file())
    assert volume.hu.shape == (108, 256, 256) and volume.hu.dtype == np.int16
    assert volume.hu.min() == -1024 and volume.hu.max() > 1500           # air and dense bone, in HU
    assert volume.spacing == pytest.approx((0.957, 0.957, 1.5), abs=1e-3)
    assert volume.sha256 == hashlib.sha256(Path(_ct_file()).read_bytes()).hexdigest()
    a = cthead.anatomy(_ct_file())
    middle = a.usable[len(a.usable) // 2]
    head, brain = a.masks[middle] > 0.5
    assert brain.mean() >= cthead.MIN_BRAIN_SHARE and (head | ~brain).all()
    assert 0 <= np.median(volume.hu[middle][brain]) <= 60                # brain tissue, not bone or air
    # slices run upwards: the usable ones sit between the skull base and the vertex
    assert 10 < a.usable[0] < a.usable[-1] < 100 and a.brain_share[-1] == 0


@needs_ct
def test_roles_take_disjoint_slices_with_guards_between(small):
    protocol = read_manifest(small / "test", image_size=SIZE, channels=1)["source"]
    split = protocol["split"]
    assert protocol["dataset"] == "cthead" and protocol["sha256"] == cthead.load_volume(_ct_file()).sha256
    assert protocol["anomaly"] == "lesion" and protocol["source_images"] == 200
    used = {}
    for role in ROLES:
        origins = [s["origin"] for s in samples(small / role)]
        assert origins and all(o["source"] == "cthead" for o in origins)
        used[role] = {o["slice"] for o in origins}
        assert used[role] <= set(split[role]), f"{role} uses slices outside its part of the split"
        for o in origins:  # the augmentation drawn is recorded
            assert set(o["augment"]) == {"flip", "rotation_deg", "scale", "shift", "window"}
    guard = set(split["guard"])
    for i, a in enumerate(ROLES):
        assert not used[a] & guard
        for b in ROLES[i + 1:]:
            assert not set(split[a]) & set(split[b])
            gap = min(abs(x - y) for x in split[a] for y in split[b])
            assert gap >= 2, f"{a} and {b} hold adjacent slices"
    # every role spans the brain from its lower to its upper part
    first, last = protocol["usable_slices"]
    for role in ROLES:
        assert min(split[role]) < first + (last - first) / 3 and max(split[role]) > last - (last - first) / 3
    assert sorted(sum((split[r] for r in ROLES), []) + split["guard"]) == list(range(first, last + 1))


@needs_ct
def test_lesions_lie_inside_the_brain_and_change_nothing_outside(small):
    checked = 0
    for role in ("val", "test", "mixed"):
        for s in samples(small / role):
            origin = s["origin"]
            clean, regions, fields = cthead.render(origin["index"], SIZE, role, 0)
            assert fields["slice"] == origin["slice"]
            if not origin["anomalous"]:
                assert np.array_equal(s["image"], clean)
                continue
            if s["mask"] is None:
                continue
            mask = s["mask"]
            assert mask.any() and regions["brain"][mask].all(), "the lesion leaves the brain"
            assert np.array_equal(s["image"][~mask], clean[~mask])
            checked += 1
    assert checked >= 10


@needs_ct
def test_the_same_seed_gives_the_same_bytes(small, tmp_path):
    again = run_build(tmp_path / "again", "--count", "200", "--size", str(SIZE), "--seed", "0")
    other = run_build(tmp_path / "other", "--count", "200", "--size", str(SIZE), "--seed", "1")
    assert shard_bytes(again) == shard_bytes(small)
    assert shard_bytes(other).keys() == shard_bytes(small).keys() and shard_bytes(other) != shard_bytes(small)


@needs_ct
def test_hemorrhage_brightens_only_inside_its_mask(tmp_path):
    out = run_build(tmp_path / "h", "--anomaly", "hemorrhage", "--count", "200", "--size", str(SIZE), "--seed", "2")
    protocol = read_manifest(out / "test", image_size=SIZE, channels=1)["source"]
    assert protocol["anomaly"] == "hemorrhage" and "inside the brain" in protocol["region"]
    areas = set()
    for role in ("val", "test"):
        for s in samples(out / role):
            origin, image, mask = s["origin"], s["image"], s["mask"]
            clean = render_clean("cthead", origin["index"], SIZE, role=role, seed=2)
            if not origin["anomalous"]:
                assert not mask.any() and np.array_equal(image, clean)
                continue
            assert origin["anomaly"] == "hemorrhage" and mask.any()
            assert np.array_equal(image[~mask], clean[~mask]), "changed outside the mask"
            gain = image[mask].astype(int) - clean[mask]
            assert (gain >= 0).all(), "a hemorrhage darkened a pixel"
            assert (gain >= 8).mean() >= protocol["min_changed_fraction"] and gain.mean() >= 15
            assert cthead.render(origin["index"], SIZE, role, 2)[1]["brain"][mask].all()
            areas.add(int(mask.sum()))
    assert len(areas) >= 5, f"sizes do not vary: {sorted(areas)}"


@needs_ct
@pytest.mark.parametrize("kind", ["intensity", "noise", "blur"])
def test_other_region_kinds_stay_inside_their_region(tmp_path, kind):
    out = run_build(tmp_path / kind, "--anomaly", kind, "--count", "200", "--size", str(SIZE), "--seed", "4")
    region = KINDS[kind].region
    assert f"inside the {region}" in read_manifest(out / "val", image_size=SIZE, channels=1)["source"]["region"]
    anomalous = 0
    for role in ("val", "test"):
        for s in samples(out / role):
            origin, mask = s["origin"], s["mask"]
            clean, regions, _ = cthead.render(origin["index"], SIZE, role, 4)
            if origin["anomalous"]:
                assert origin["anomaly"] == kind and regions[region][mask].all()
                anomalous += 1
            assert np.array_equal(s["image"][~mask], clean[~mask])
    assert anomalous == 4 + 32


def test_missing_file_is_one_line_naming_the_package(tmp_path):
    env = {**os.environ, cthead.ENV: str(tmp_path / "nowhere" / "Cranium.inv3")}
    proc = subprocess.run([sys.executable, str(BUILD), "simulated", "--source", "cthead", "--size", "32",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "apt-get install invesalius-examples" in proc.stderr and cthead.ENV in proc.stderr
    assert not (tmp_path / "out").exists()


def test_render_needs_the_role_and_the_seed():
    with pytest.raises(DataError, match="role"):
        render_clean("cthead", 0, SIZE)
