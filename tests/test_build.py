"""shards/build.py: folder, npz and simulated builds, read back through a2b_dist.data; CLI errors."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from a2b_dist.data import DataError, eval_batches, load_image, read_manifest, to_tensor
from a2b_dist.sources.simulate import role_counts
from a2b_dist.sources.folders import path_key
from conftest import BUILD, build_module, tar_members

build = build_module()


def read_all(role_dir: Path, **kw) -> dict[str, dict]:
    """key -> {image, label, mask, has_mask} over one full eval pass."""
    out = {}
    for batch in eval_batches(role_dir, batch_size=4, **kw):
        for i, key in enumerate(batch["key"]):
            out[key] = {k: batch[k][i] for k in ("image", "label", "mask", "has_mask")}
    return out


def save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


# Folder builds.

@pytest.mark.parametrize(
    "kind, channels, suffixes",
    [("gray8", 1, [".png", ".tif"]), ("gray16", 1, [".png", ".tiff"]), ("rgb8", 3, [".png", ".tif"])],
)
def test_folder_round_trip_is_pixel_exact(tmp_path, kind, channels, suffixes):
    rng = np.random.default_rng(0)
    originals = {}
    for i in range(7):
        if kind == "gray16":
            array = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
        elif kind == "rgb8":
            array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        else:
            array = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        rel = f"sub{i % 2}/img.{i}{suffixes[i % 2]}"  # dots and folders in names: keys must cope
        save(tmp_path / "images" / rel, array)
        originals[rel] = array
    out = tmp_path / "out"
    assert build.main(["folder", "--images", str(tmp_path / "images"), "--role", "healthy", "--out", str(out),
                       "--size", "16", "--channels", str(channels), "--maxcount", "3"]) == 0

    manifest = read_manifest(out / "healthy", image_size=16, channels=channels, verify="sha256")
    assert manifest["bit_depth"] == (16 if kind == "gray16" else 8)
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]
    stored = tar_members(out / "healthy")
    read = read_all(out / "healthy")
    assert len(read) == len(originals)
    for rel, array in originals.items():
        chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        png = np.asarray(Image.open(io.BytesIO(stored[path_key(rel)]["png"])))
        assert png.dtype == array.dtype and np.array_equal(png, array)  # stored losslessly, same depth
        assert np.array_equal(read[path_key(rel)]["image"].numpy(), to_tensor(chw).numpy())
        assert read[path_key(rel)]["label"] == 0


def test_folder_resize_rule_labels_and_masks(tmp_path):
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    rows = []
    for i in range(4):
        save(images / f"a{i}.png", rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # wide RGB
        mask = np.zeros((24, 40), np.uint8)
        mask[4:12, 10:30] = 255
        save(images / "masks" / f"a{i}.png", mask)
        rows.append({"path": f"a{i}.png", "label": i % 2, "mask": f"masks/a{i}.png" if i % 2 else ""})
    save(images / "b.jpg", rng.integers(0, 256, (30, 20), dtype=np.uint8), quality=90)
    rows.append({"path": "b.jpg", "label": 0, "mask": ""})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    assert build.main(["folder", "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--role", "test",
                       "--out", str(tmp_path / "out"), "--size", "16", "--channels", "1"]) == 0
    manifest = read_manifest(tmp_path / "out" / "test", image_size=16, channels=1)
    assert manifest["labels"] == {"0": 3, "1": 2} and manifest["masks"] == 2
    read = read_all(tmp_path / "out" / "test")
    for row in rows:
        got = read[path_key(row["path"])]
        expected = load_image(images / row["path"], 16, 1)  # the same rule `a2b detect` applies
        assert np.array_equal(got["image"].numpy(), to_tensor(expected).numpy())
        assert int(got["label"]) == row["label"] and bool(got["has_mask"]) == bool(row["mask"])
        if row["mask"]:
            # 24x40 -> 16x27 (nearest), centre crop of 16 columns from 5: rows 3..7, columns 2..14.
            expected_mask = np.zeros((16, 16), np.float32)
            expected_mask[3:8, 2:15] = 1
            assert np.array_equal(got["mask"][0].numpy(), expected_mask)
    assert tuple(load_image(images / "a0.png", 16, 3).shape) == (3, 16, 16)


def test_mixed_depths_are_promoted_without_changing_values(tmp_path):
    images = tmp_path / "images"
    save(images / "eight.png", np.full((8, 8), 200, np.uint8))
    save(images / "sixteen.png", np.full((8, 8), 4000, np.uint16))
    assert build.main(["folder", "--images", str(images), "--role", "mixed", "--out", str(tmp_path / "out"),
                       "--size", "8", "--channels", "1"]) == 0
    assert read_manifest(tmp_path / "out" / "mixed")["bit_depth"] == 16
    read = read_all(tmp_path / "out" / "mixed")
    assert np.allclose(read[path_key("eight.png")]["image"].numpy(), 200 / 255 * 2 - 1, atol=1e-6)
    assert int(read[path_key("eight.png")]["label"]) == -1  # mixed: unannotated


def test_failed_build_leaves_no_output(tmp_path):
    images = tmp_path / "images"
    save(images / "good.png", np.zeros((8, 8), np.uint8))
    good = (images / "good.png").read_bytes()
    (images / "bad.png").write_bytes(good[:40])  # a valid header, then the data stops
    out = tmp_path / "out"
    assert build.main(["folder", "--images", str(images), "--role", "healthy", "--out", str(out),
                       "--size", "8", "--channels", "1", "--maxcount", "1"]) == 2
    assert not out.exists()


def test_existing_output_needs_overwrite(tmp_path, capsys):
    images = tmp_path / "images"
    save(images / "a.png", np.zeros((8, 8), np.uint8))
    args = ["folder", "--images", str(images), "--role", "healthy", "--out", str(tmp_path / "out"),
            "--size", "8", "--channels", "1"]
    assert build.main(args) == 0
    assert build.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert build.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["healthy"]


def test_maxsize_rotates_shards(tmp_path):
    images = tmp_path / "images"
    for i in range(6):
        save(images / f"{i}.png", np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8))
    assert build.main(["folder", "--images", str(images), "--role", "healthy", "--out", str(tmp_path / "out"),
                       "--size", "32", "--channels", "1", "--maxsize", "6000"]) == 0
    manifest = read_manifest(tmp_path / "out" / "healthy")
    assert len(manifest["shards"]) >= 3 and manifest["samples"] == 6


# npz builds.

def test_npz_roles_follow_the_split(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 15 + [2] * 5).reshape(-1, 1)  # MedMNIST: (N, 1), multi-class
    np.savez(tmp_path / "med.npz", train_images=rng.integers(0, 256, (60, 12, 12), dtype=np.uint8),
             train_labels=labels)
    assert build.main(["npz", "--file", str(tmp_path / "med.npz"), "--images-key", "train_images",
                       "--labels-key", "train_labels", "--out", str(tmp_path / "out"), "--size", "16",
                       "--channels", "1", "--split", "healthy=20,mixed=0.25,val=5,test=10", "--seed", "3"]) == 0
    counts = {role: read_manifest(tmp_path / "out" / role)["samples"] for role in ("healthy", "mixed", "val", "test")}
    assert counts == {"healthy": 20, "mixed": 15, "val": 5, "test": 10}
    origins = {k: json.loads(v["json"]) for k, v in tar_members(tmp_path / "out" / "healthy").items()}
    assert all(o["label"] == 0 for o in origins.values())
    test = tar_members(tmp_path / "out" / "test")
    assert all(v["cls"] == (b"0" if json.loads(v["json"])["label"] == 0 else b"1") for v in test.values())
    used = [json.loads(v["json"])["index"] for role in counts for v in tar_members(tmp_path / "out" / role).values()]
    assert len(used) == len(set(used)) == 50
    assert "cls" not in next(iter(tar_members(tmp_path / "out" / "mixed").values()))


def test_npz_with_pickled_objects_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "evil.npz", images=np.array([object()], dtype=object), labels=np.zeros(1, np.int64))
    assert build.main(["npz", "--file", str(tmp_path / "evil.npz"), "--images-key", "images", "--labels-key",
                       "labels", "--out", str(tmp_path / "out"), "--size", "8", "--channels", "1"]) == 2
    assert "pickle" in capsys.readouterr().err


# Simulated builds.

def test_simulated_roles_counts_and_masks(sim_shards):
    expected = role_counts(5000, 0.05)
    all_keys = []
    for role, (normal, anomalous) in expected.items():
        manifest = read_manifest(sim_shards / role, image_size=32, channels=1, verify="sha256")
        assert manifest["samples"] == normal + anomalous
        assert manifest["source"]["square_side"] == 10 and "50%" in manifest["source"]["rule"]
        assert "python shards/build.py simulated" in manifest["command"] and manifest["seed"] == 0
        stored = tar_members(sim_shards / role)
        assert len(stored) == manifest["samples"]
        all_keys += list(stored)
        truth = [json.loads(v["json"])["anomalous"] for v in stored.values()]
        assert sum(truth) == anomalous
        if role == "mixed":
            assert manifest["labels"] == {"unknown": normal + anomalous}
            assert all("cls" not in v and "mask.png" not in v for v in stored.values())
        if role in ("val", "test"):
            assert manifest["labels"] == {"0": normal, "1": anomalous}
            for key, fields in stored.items():
                origin = json.loads(fields["json"])
                assert fields["cls"] == (b"1" if origin["anomalous"] else b"0")
                mask = np.asarray(Image.open(io.BytesIO(fields["mask.png"]))) > 0  # every val/test sample
                image = np.asarray(Image.open(io.BytesIO(fields["png"])))
                if origin["anomalous"]:
                    y, x, side = origin["box"]["y"], origin["box"]["x"], origin["box"]["side"]
                    assert mask.sum() == side * side and mask[y : y + side, x : x + side].all()
                    assert (image[y : y + side, x : x + side] == origin["fill"]).all()
                else:
                    assert not mask.any()
    assert len(all_keys) == len(set(all_keys))  # each source image used once


def test_simulated_build_is_reproducible(tmp_path):
    def shas(out: Path) -> dict:
        return {role: [s["sha256"] for s in read_manifest(out / role)["shards"]] for role in ("healthy", "test")}

    common = ["simulated", "--source", "digits", "--size", "16", "--scale", "0.1"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert build.main(common + ["--seed", seed, "--out", str(tmp_path / name)]) == 0
    assert shas(tmp_path / "a") == shas(tmp_path / "b") != shas(tmp_path / "c")


# The command line.

@pytest.mark.parametrize(
    "args, named",
    [
        (["simulated", "--source", "mnist5k", "--size", "0"], "--size"),  # argparse
        (["folder", "--images", "/no/such/folder", "--role", "healthy", "--size", "16", "--channels", "1"], "--images"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, named):
    proc = subprocess.run([sys.executable, str(BUILD), *args, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and named in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, named",
    [
        (["simulated", "--source", "cifar", "--size", "32"], "--source"),
        (["simulated", "--source", "digits", "--size", "32", "--scale", "2"], "--scale"),
        (["npz", "--file", "x.npz", "--images-key", "a", "--labels-key", "b", "--size", "8", "--channels", "2"],
         "--channels"),
        (["folder", "--images", ".", "--role", "patients", "--size", "8", "--channels", "1"], "--role"),
        (["simulated", "--source", "digits", "--size", "8", "--maxsize", "lots"], "--maxsize"),
    ],
)
def test_argument_errors_name_the_argument(tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as exit_:
        build.main(args + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and named in err and len(err.strip().splitlines()) == 1


def test_val_and_test_need_labels(tmp_path, capsys):
    save(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    assert build.main(["folder", "--images", str(tmp_path / "images"), "--role", "val", "--out",
                       str(tmp_path / "out"), "--size", "8", "--channels", "1"]) == 2
    assert "--labels" in capsys.readouterr().err


def test_bad_csv_label_names_the_line(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "l.csv").write_text("path,label\na.png,2\n")
    with pytest.raises(DataError, match=r"line 2: label '2'"):
        build.folder_role(tmp_path / "images", role="test", size=8, channels=1, labels_csv=tmp_path / "l.csv")


def test_library_errors_name_the_argument_and_the_command_its_flag(tmp_path):
    """The sources and the writer name their arguments (``images_dir=X``, ``overwrite=True``), never
    a flag; `a2b build` says its flags for the same errors, in one place (build.message)."""
    from a2b_dist.data.storage import FieldError
    from a2b_dist.data.write import RoleSpec, WriteSpec, write_roles
    from a2b_dist.sources.folders import parse_split
    from a2b_dist.sources.medical import SliceRule, parse_window
    from a2b_dist.sources.simulate import simulated_roles

    missing = tmp_path / "nope"
    (tmp_path / "out" / "healthy").mkdir(parents=True)
    spec = WriteSpec(image_size=8, channels=1, bit_depth=8, source={}, seed=0, command="test")
    cases = [
        (lambda: build.folder_role(missing, role="healthy", size=8, channels=1), "images_dir",
         f"images_dir={missing}: no such folder", f"--images {missing}: no such folder"),
        (lambda: build.folder_role(tmp_path, role="test", size=8, channels=1), "role",
         "role=test needs labels_csv=CSV with columns", "--role test needs --labels CSV with columns"),
        (lambda: parse_split("healthy=abc", 10), "split",
         "split='healthy=abc': 'abc' for healthy is neither", "--split 'healthy=abc': 'abc' for healthy is neither"),
        (lambda: simulated_roles("digits", 32, 0, anomaly="lesion"), "anomaly",
         "anomaly=lesion needs a head: source=phantom or cthead", "--anomaly lesion needs a head: --source phantom"),
        (lambda: simulated_roles("digits", 32, 0, mixed_fraction=2.0), "mixed_fraction",
         "mixed_fraction must be in [0, 1], not 2.0", "--mixed-fraction must be in [0, 1], not 2.0"),
        (lambda: parse_window("12"), "window", "window='12': expected CENTRE,WIDTH", "--window '12': expected"),
        (lambda: SliceRule((5.0, 1.0), 0.1, 0.05), "percentiles", "percentiles=5.0,1.0: need 0 <= low",
         "--percentiles 5.0,1.0: need 0 <= low"),
        (lambda: write_roles(tmp_path / "out", {"healthy": RoleSpec([])}, spec), "overwrite",
         f"{tmp_path / 'out' / 'healthy'} already exists; remove it, or pass overwrite=True",
         f"{tmp_path / 'out' / 'healthy'} already exists; remove it, or pass --overwrite"),
    ]
    for call, field, library, command in cases:
        with pytest.raises(FieldError) as caught:
            call()
        assert isinstance(caught.value, DataError) and caught.value.field == field
        assert str(caught.value).startswith(library) and "--" not in str(caught.value), str(caught.value)
        assert build.message(caught.value).startswith(command), build.message(caught.value)
