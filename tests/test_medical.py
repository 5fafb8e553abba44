"""Medical inputs (a2b_dist/sources/medical.py): DICOM and NIfTI written here, built by shards/build.py,
checked pixel by pixel by hand, split by patient, then trained on and evaluated per patient."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEGLSLossless, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from a2b_dist.data import eval_batches, read_manifest  # noqa: E402
from a2b_dist.errors import UserError  # noqa: E402
from a2b_dist.data.manifest import DataError, sample_origins  # noqa: E402
from a2b_dist.sources.medical import (DicomSkip, SliceRule, kept_slices, normalise_volume, read_dicom,  # noqa: E402
                                   split_groups)
from conftest import BUILD, ROOT, build_module  # noqa: E402

build = build_module()


def write_dicom(path: Path, pixels: np.ndarray, *, patient: str = "P0", photometric: str = "MONOCHROME2",
                rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                syntax=ExplicitVRLittleEndian) -> Path:
    """A minimal single-frame grayscale DICOM file, uncompressed unless syntax says otherwise."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax.is_compressed:
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])  # a JPEG 2000 start, no decoder needed to write
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# Pixel values, checked by hand.

def test_16bit_rescale_and_file_window_by_hand(tmp_path):
    # v = 2 * stored - 1024; window C 0.5, W 2001 -> y = v / 2000 + 0.5, clipped to [0, 1].
    stored = np.array([[12, 1012], [612, 262], [0, 4000], [613, 512]], np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, rescale=(2, -1024), window=(0.5, 2001))
    image, facts = read_dicom(path)
    assert image.dtype == np.uint16 and facts["window_from"] == "file" and facts["patient"] == "P0"
    # v -1000 -> 0; 1000 -> 1; 200 -> 0.6; -500 -> 0.25; -1024 clipped; 6976 clipped; 202 -> 0.601; 0 -> 0.5
    expected = np.array([[0, 65535], [39321, 16384], [0, 65535], [39387, 32768]], np.uint16)
    np.testing.assert_array_equal(image, expected)  # 612 and 613 stay apart: 16 bits until the last step
    # A window on the command line wins over the file's: C 200.5, W 801 -> y = (v - 200) / 800 + 0.5.
    image, facts = read_dicom(path, window=(200.5, 801), bit_depth=8)
    assert facts["window_from"] == "command line" and image.dtype == np.uint8
    assert image[1, 0] == 128 and image[0, 1] == 255 and image[0, 0] == 0  # 127.5 rounds to even


def test_monochrome1_is_inverted_by_hand(tmp_path):
    stored = np.array([[0, 51], [204, 255]], np.uint8)
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")
    # No window anywhere: the image's range 0..255 (C 128, W 256) gives y = v / 255; inverted 1 - y.
    image, facts = read_dicom(path, bit_depth=8)
    assert facts["window_from"] == "image range" and facts["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(image, 255 - stored)
    image16, _ = read_dicom(path)
    np.testing.assert_array_equal(image16, 257 * (255 - stored.astype(np.uint16)))


def test_compressed_syntax_names_the_decoder(tmp_path, capsys):
    """JPEG-LS needs pylibjpeg-libjpeg, which is not installed here: the file is skipped with the
    package to install; a folder holding only such files is a one-line error that names it."""
    write_dicom(tmp_path / "scans" / "jls.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGLSLossless)
    with pytest.raises(DicomSkip, match=r"JPEG-LS.*pip install pylibjpeg pylibjpeg-libjpeg") as info:
        read_dicom(tmp_path / "scans" / "jls.dcm")
    assert info.value.reason == "needs a decoder for JPEG-LS Lossless Image Compression"
    for strict in ([], ["--strict"]):
        proc = subprocess.run([sys.executable, str(BUILD), "dicom", "--images", str(tmp_path / "scans"), "--split",
                               "healthy=1", "--out", str(tmp_path / "out"), "--size", "8", "--channels", "1", *strict],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1 and "pip install pylibjpeg pylibjpeg-libjpeg" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_pydicom_test_files_build_with_a_summary(tmp_path):
    """pydicom's own test files (real files written by many tools: no preamble, no PatientID,
    palette and YBR colour, RT plans, structured reports, multi-frame, truncated, badly encoded):
    the default build reads what can be read, skips the rest with a summary and a list, and prints
    pydicom's warnings as one counted line; --strict stops at the first skipped file."""
    found = sorted(p.relative_to(PYDICOM_FILES).as_posix() for p in PYDICOM_FILES.rglob("*.dcm"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(BUILD), "dicom", "--images", str(PYDICOM_FILES), "--split",
                           "healthy=0.5,mixed=0.5", "--out", str(out), "--size", "32", "--channels", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") <= 2, proc.stderr           # no warning printed per file
    with open(out / "dicom-skipped.csv", newline="") as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    built = {o["path"]: o for role in ("healthy", "mixed") for o in sample_origins(out / role).values()}
    assert not set(skipped) & set(built) and set(skipped) | set(built) <= set(found)
    source = read_manifest(out / "healthy")["source"]
    assert source["files"] == len(found) and source["skipped"]["count"] == len(skipped)
    assert f"skipped {len(skipped)} of {len(found)} files" in proc.stdout and "pydicom warned" in proc.stdout
    # What each kind of file became.
    assert skipped["rtplan.dcm"] == skipped["test-SR.dcm"] == "no image (no PixelData)"
    assert skipped["rtdose.dcm"] == "multi-frame" and skipped["MR_truncated.dcm"] == "pixel data does not decode"
    assert skipped["JPEG-lossy.dcm"].startswith("needs a decoder for JPEG Extended")
    assert built["examples_palette.dcm"]["photometric"] == "PALETTE COLOR"
    assert built["SC_rgb_dcmtk_+eb+cy+n1.dcm"]["photometric"] == "YBR_FULL"
    assert built["MR_small_bigendian.dcm"]["patient"] == built["MR_small_RLE.dcm"]["patient"] == "4MR1"
    assert built["image_dfl.dcm"]["patient"].startswith(("study-", "file-"))      # no PatientID: a fallback
    assert source["groups_from"]["PatientID"] >= 30 and "no PatientID in" in proc.stdout
    # The same files, --strict: the first file skipped above is the error, nothing written.
    proc = subprocess.run([sys.executable, str(BUILD), "dicom", "--images", str(PYDICOM_FILES), "--split",
                           "healthy=0.5,mixed=0.5", "--out", str(tmp_path / "strict"), "--size", "32", "--channels",
                           "1", "--strict"], capture_output=True, text=True, timeout=300)
    fallback = {p for p, o in built.items() if o["patient"].startswith(("study-", "file-"))}
    first = next(p for p in found if p in skipped or p in fallback)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and first in proc.stderr, (first, proc.stderr)
    assert "--strict" in proc.stderr and not (tmp_path / "strict").exists()


# Splits by patient.

def test_split_groups_never_shares_a_group():
    groups = {f"P{i}": [0, 0] if i < 6 else [0, 1] for i in range(12)}
    for seed in range(5):
        roles = split_groups(groups, "healthy=3,mixed=0.25,val=2,test=4", seed)
        assert [len(roles[r]) for r in ("healthy", "mixed", "val", "test")] == [3, 3, 2, 4]
        everything = [g for names in roles.values() for g in names]
        assert len(everything) == len(set(everything))  # no group in two roles
        assert all(groups[g] == [0, 0] for g in roles["healthy"])
        for role in ("val", "test"):  # stratified: both classes in each labelled role
            assert sorted({max(groups[g]) for g in roles[role]}) == [0, 1]
        # healthy takes 3 normal groups; the rest is 6 anomalous of 9: mixed 3 -> 2, val 2 -> 1, test 4 -> 3
        assert [sum(max(groups[g]) for g in roles[r]) for r in ("mixed", "val", "test")] == [2, 1, 3]
    assert split_groups(groups, "healthy=3,test=4", 1) == split_groups(groups, "healthy=3,test=4", 1)
    with pytest.raises(DataError, match="only 6 groups"):
        split_groups(groups, "healthy=7", 0)


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> Path:
    """8 patients x 2 images (64 x 48, 16-bit): P0-P3 healthy, P4-P7 one healthy and one anomalous
    image, labelled in a CSV; built by the real command into healthy/mixed/val/test at 32 px."""
    tmp = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(0)
    rows = []
    for p in range(8):
        for i in range(2):
            label = int(p >= 4 and i == 1)
            pixels = rng.integers(0, 3000, (64, 48)).astype(np.uint16)
            if label:
                pixels[20:40, 10:30] = 4095
            rel = f"patient{p}/img{i}.dcm"
            write_dicom(tmp / "scans" / rel, pixels, patient=f"P{p}", photometric=("MONOCHROME1" if i else "MONOCHROME2"),
                        rescale=(1, -1024))
            rows.append({"path": rel, "label": label})
    with open(tmp / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp / "cxr"
    assert build.main(["dicom", "--images", str(tmp / "scans"), "--labels", str(tmp / "labels.csv"),
                       "--split", "healthy=2,mixed=2,val=2,test=2", "--window", "1000,4000", "--maxcount", "3",
                       "--out", str(out), "--size", "32", "--channels", "1", "--seed", "0"]) == 0
    return out


def test_dicom_build_splits_by_patient(dicom_root):
    seen = {}
    for role in ("healthy", "mixed", "val", "test"):
        manifest = read_manifest(dicom_root / role, image_size=32, channels=1)
        assert manifest["bit_depth"] == 16 and manifest["group_by"] == "patient"
        assert len(manifest["groups"]) == 2 and manifest["samples"] == 4
        origins = sample_origins(dicom_root / role)
        for key, origin in origins.items():
            assert origin["group"] == origin["patient"] == origin["path"].split("/")[0].replace("patient", "P")
            assert origin["window"] == [1000.0, 4000.0] and origin["window_from"] == "command line"
        assert sorted({o["patient"] for o in origins.values()}) == manifest["groups"]
        for group in manifest["groups"]:
            assert seen.setdefault(group, role) == role, f"{group} in {seen[group]} and {role}"
    assert len(seen) == 8
    assert set(read_manifest(dicom_root / "healthy")["groups"]) <= {"P0", "P1", "P2", "P3"}
    labels = [int(v) for b in eval_batches(dicom_root / "test", batch_size=8) for v in b["label"]]
    # Stratified: mixed and val each take one of the two normal patients left after healthy, so
    # test holds two patients with one anomalous image each.
    assert sorted(labels) == [0, 0, 1, 1]


def test_shared_patients_warn_loudly(dicom_root, tmp_path):
    # Two separate calls choose their patients independently: test now shares patients with healthy.
    out = tmp_path / "leaky"
    scans, labels = dicom_root.parent / "scans", dicom_root.parent / "labels.csv"
    common = ["--images", str(scans), "--labels", str(labels), "--out", str(out), "--size", "32", "--channels", "1"]
    assert build.main(["dicom", *common, "--split", "healthy=4"]) == 0
    assert build.main(["dicom", *common, "--split", "test=6", "--seed", "1"]) == 0
    with pytest.warns(UserWarning, match=r"LEAKAGE.*roles (healthy and test|test and healthy) share \d groups \('P"):
        read_manifest(out / "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_manifest(dicom_root / "test")  # the one-call split: no warning


# NIfTI volumes.

def write_volume(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return path


def phantom(shift: int) -> np.ndarray:
    """(16, 16, 10): slices z 0-1 empty, z 2 a 2x2 speck (1.6% of the slice), z 3-9 an 8x8 square
    (25%) of value 100 + z."""
    volume = np.zeros((16, 16, 10), np.float32)
    volume[4:6, 4:6, 2] = 50
    for z in range(3, 10):
        volume[4 + shift : 12 + shift, 4:12, z] = 100 + z
    return volume


def test_slice_rule_and_normalisation_by_hand():
    rule = SliceRule(percentiles=(0, 100))
    unit = normalise_volume(phantom(0), rule)
    assert unit.max() == 1.0 and unit[5, 5, 9] == 1.0 and unit[5, 5, 3] == pytest.approx(103 / 109)
    assert kept_slices(unit, 2, rule) == [3, 4, 5, 6, 7, 8, 9]  # the speck is under 5% of its slice
    assert kept_slices(unit, 2, SliceRule(percentiles=(0, 100), min_foreground=0.01)) == list(range(2, 10))


def build_nifti(tmp_path: Path, size: int) -> Path:
    """4 phantom volumes, sub0-1 healthy, sub2-3 anomalous (sub3 with a lesion mask on slices 5-6),
    built by the real command into healthy (1 volume), mixed (1) and test (2)."""
    vols = tmp_path / "vols"
    rows = []
    for v in range(4):
        write_volume(vols / f"sub{v}.nii.gz", phantom(v % 2))
        row = {"path": f"sub{v}.nii.gz", "label": int(v >= 2), "mask": ""}
        if v == 3:
            mask = np.zeros((16, 16, 10), np.uint8)
            mask[6:8, 6:8, 5:7] = 1  # a lesion on slices 5 and 6 only
            write_volume(vols / "sub3_mask.nii.gz", mask)
            row["mask"] = "sub3_mask.nii.gz"
        rows.append(row)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "brain"
    assert build.main(["nifti", "--volumes", str(vols), "--labels", str(tmp_path / "labels.csv"), "--axis", "2",
                       "--percentiles", "0,100", "--split", "healthy=1,mixed=1,test=2", "--out", str(out),
                       "--size", str(size), "--channels", "1"]) == 0
    return out


def test_nifti_build_slices_by_volume(tmp_path):
    out = build_nifti(tmp_path, 16)
    groups = {}
    for role in ("healthy", "mixed", "test"):
        manifest = read_manifest(out / role, image_size=16, channels=1)
        assert manifest["group_by"] == "volume" and manifest["samples"] == 7 * len(manifest["groups"])
        for g in manifest["groups"]:
            assert groups.setdefault(g, role) == role
    assert set(read_manifest(out / "healthy")["groups"]) <= {"sub0.nii.gz", "sub1.nii.gz"}
    test = {k: o for k, o in sample_origins(out / "test").items()}
    assert sorted(o["slice"] for o in test.values()) == sorted(list(range(3, 10)) * 2)
    if "sub3.nii.gz" in read_manifest(out / "test")["groups"]:
        lesion = {o["slice"]: o["label"] for o in test.values() if o["volume"] == "sub3.nii.gz"}
        assert lesion == {z: int(z in (5, 6)) for z in range(3, 10)}
    # Stored values by hand: slice z of the square is round((100 + z) / 109 * 65535).
    batch = next(iter(eval_batches(out / "healthy", batch_size=7)))
    for key, image in zip(batch["key"], batch["image"]):
        z = int(key.rsplit("-", 1)[1])
        level = round((100 + z) / 109 * 65535)
        assert float(image.max()) == pytest.approx(level / 32767.5 - 1, abs=1e-6)


# Train and evaluate per patient on the DICOM shards.

@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_train_then_evaluate_by_group(kind, dicom_root, tmp_path):
    root = dicom_root if kind == "dicom" else build_nifti(tmp_path, 32)
    field = "patient" if kind == "dicom" else "volume"
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", "configs/test.yaml",
                           f"data.root={root}", f"train.run_dir={run_dir}", "train.steps=2", "optim.decay_steps=1",
                           "train.checkpoint_every=2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from a2b_dist import evaluate as ev

    out = tmp_path / "eval"
    assert ev.main(["--checkpoint", str(run_dir), "--shards", str(root / "test"), "--out", str(out),
                    "--num-maps", "0", "--group-by", field]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    groups = metrics["groups"]
    assert groups["by"] == field and groups["groups"] == 2
    assert metrics["counts"]["samples"] == (4 if kind == "dicom" else 14) and metrics["auroc"] is not None
    with open(out / "groups.csv") as f:
        table = list(csv.DictReader(f))
    with open(out / "scores.csv") as f:
        scores = {r["key"]: float(r["score"]) for r in csv.DictReader(f)}
    origins = sample_origins(root / "test")
    for row in table:
        mine = [s for k, s in scores.items() if origins[k][field] == row[field]]
        assert float(row["score_mean"]) == pytest.approx(np.mean(mine), rel=1e-5)
        assert float(row["score_max"]) == pytest.approx(max(mine), rel=1e-5)
    with pytest.raises(UserError, match="no 'nothing' in its json"):
        ev.main(["--checkpoint", str(run_dir), "--shards", str(root / "test"), "--out", str(out),
                 "--group-by", "nothing"])


def test_group_metrics_known_values():
    from a2b_dist.metrics import group_metrics

    keys = ["a1", "a2", "b1", "b2", "c1"]
    labels = np.array([0, 0, 0, 1, 0])
    scores = np.array([0.1, 0.3, 0.2, 0.9, 0.25])
    out = group_metrics(keys, labels, scores, {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"})
    assert out["groups"] == 3 and out["table"][1] == ("B", 1, 2, pytest.approx(0.55), pytest.approx(0.9))
    assert out["mean"]["auroc"] == 1.0 and out["max"]["auroc"] == 1.0
    assert out["mean"]["n_healthy"] == 2 and out["mean"]["n_anomalous"] == 1


def test_split_builds_listed_pngs_by_patient(tmp_path):
    from PIL import Image

    rows = []
    for p in range(6):
        for i in range(2):
            rel = f"images/{p:03d}_{i:03d}.png"
            (tmp_path / "images").mkdir(exist_ok=True)
            Image.fromarray(np.full((20, 24), 40 * p + i, np.uint8)).save(tmp_path / rel)
            rows.append({"path": rel, "label": int(p >= 3 and i == 1), "patient": f"{p:05d}"})
    with open(tmp_path / "all.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "cxr"
    assert build.main(["split", "--images", str(tmp_path), "--labels", str(tmp_path / "all.csv"), "--group-column",
                       "patient", "--split", "healthy=2,mixed=1,val=1,test=2", "--out", str(out), "--size", "20",
                       "--channels", "1"]) == 0
    seen = {}
    for role in ("healthy", "mixed", "val", "test"):
        manifest = read_manifest(out / role)
        assert manifest["group_by"] == "patient" and manifest["bit_depth"] == 8
        for key, origin in sample_origins(out / role).items():
            assert origin["patient"] == origin["group"] == f"{int(origin['path'][7:10]):05d}"
            assert seen.setdefault(origin["patient"], role) == role
    assert len(seen) == 6 and set(read_manifest(out / "healthy")["groups"]) <= {"00000", "00001", "00002"}
