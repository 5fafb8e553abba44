"""shards/build.py simulated --anomaly KIND and --source phantom: every allowed (source, kind)
changes its image only inside the recorded mask, and visibly inside it; sizes vary; builds are
reproducible; the phantom's heads are heads and differ; bad choices are one-line errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from a2b_dist.data import read_manifest
from a2b_dist.sources.anomalies import KINDS
from a2b_dist.sources.phantom import render
from a2b_dist.sources.simulate import role_counts, render_clean
from conftest import BUILD, build_module, tar_members

build = build_module()

SIZE = 32
SCALE = "0.05"  # mnist5k and phantom: healthy 80, mixed 56 + 24, val 5 + 5, test 40 + 40
COMBOS = [(source, kind) for source in ("mnist5k", "digits", "phantom") for kind in KINDS
          if source == "phantom" or not KINDS[kind].needs_regions]


def samples(role_dir: Path) -> list[dict]:
    """Every sample of a role: origin (json), image, mask (or None), cls (or None)."""
    decoded = []
    for fields in tar_members(role_dir).values():
        decoded.append({
            "origin": json.loads(fields["json"]),
            "image": np.asarray(Image.open(io.BytesIO(fields["png"]))),
            "mask": np.asarray(Image.open(io.BytesIO(fields["mask.png"]))) > 0 if "mask.png" in fields else None,
            "cls": fields.get("cls"),
        })
    return decoded


def run_build(out: Path, *args: str) -> Path:
    assert build.main(["simulated", *args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source, kind) -> OUT, each built once at 32 px (digits at scale 0.3: 86 + 86 test)."""
    cache = {}

    def get(source: str, kind: str) -> Path:
        if (source, kind) not in cache:
            scale = "0.3" if source == "digits" else SCALE
            out = tmp_path_factory.mktemp(f"{source}-{kind}") / "out"
            cache[source, kind] = run_build(out, "--source", source, "--anomaly", kind, "--size", str(SIZE),
                                            "--scale", scale, "--seed", "0", "--maxcount", "40")
        return cache[source, kind]

    return get


@pytest.mark.parametrize("source, kind", COMBOS)
def test_anomaly_changes_only_inside_its_mask(built, source, kind):
    out = built(source, kind)
    protocol = read_manifest(out / "test", image_size=SIZE, channels=1)["source"]
    assert protocol["anomaly"] == kind and protocol["dataset"] == source and "rule" in protocol
    threshold = protocol["min_changed_fraction"]
    levels = protocol.get("parameters", {}).get("min_change_levels", 1)
    areas = []
    for role in ("val", "test"):
        for s in samples(out / role):
            origin, image, mask = s["origin"], s["image"], s["mask"]
            clean = render_clean(source, origin["index"], SIZE)
            assert mask is not None and s["cls"] == (b"1" if origin["anomalous"] else b"0")
            if not origin["anomalous"]:
                assert not mask.any() and np.array_equal(image, clean)
                continue
            assert mask.any()
            assert np.array_equal(image[~mask], clean[~mask]), "changed outside the mask"
            change = np.abs(image.astype(int) - clean)[mask]
            assert (change >= levels).mean() >= threshold - 1e-9, "too little changes inside the mask"
            assert abs((change >= levels).mean() - origin["changed_fraction"]) < 1e-3
            assert origin.get("anomaly", "square") == kind
            if source == "phantom":  # inside the head (the brain for lesions)
                regions = render(origin["index"], SIZE)[1]
                assert regions[KINDS[kind].region][mask].all()
            areas.append(int(mask.sum()))
    if kind == "square":
        assert set(areas) == {round(40 * SIZE / 128) ** 2}
    else:
        assert len(set(areas)) >= 5, f"sizes do not vary: {sorted(set(areas))}"
    # Unlabelled roles: normal images are the clean ones, anomalies differ from them.
    for role in ("healthy", "mixed"):
        for s in samples(out / role):
            origin = s["origin"]
            assert s["mask"] is None
            same = np.array_equal(s["image"], render_clean(source, origin["index"], SIZE))
            assert same != origin["anomalous"]


@pytest.mark.parametrize("source, kind", [("mnist5k", "noise"), ("phantom", "lesion"), ("phantom", "blur")])
def test_builds_are_reproducible_from_the_seed(tmp_path, source, kind):
    def shas(out: Path) -> dict:
        return {role: [s["sha256"] for s in read_manifest(out / role)["shards"]] for role in ("mixed", "test")}

    common = ["--source", source, "--anomaly", kind, "--size", "24", "--scale", "0.02"]
    a = run_build(tmp_path / "a", *common, "--seed", "5")
    b = run_build(tmp_path / "b", *common, "--seed", "5")
    c = run_build(tmp_path / "c", *common, "--seed", "6")
    assert shas(a) == shas(b) != shas(c)


def test_phantom_heads_vary_and_are_heads():
    heads = [render(i, SIZE) for i in range(24)]
    images = np.stack([h[0] for h in heads]).astype(int)
    assert len({im.tobytes() for im in images}) == len(images)
    assert len({json.dumps(h[2]["centre"]) for h in heads}) == len(heads)  # the anatomy is jittered
    assert len({tuple(h[2]["inner_present"]) for h in heads}) > 1          # structures come and go
    for image, regions, _ in heads:
        head, brain = regions["head"], regions["brain"]
        ring = head & ~brain
        assert brain.sum() > 0.25 * SIZE**2 and ring.any()
        assert image[ring].max() >= 200 and image[ring].mean() > image[brain].mean() + 50  # bright skull
        assert 60 < np.median(image[brain]) < 140                                            # grey brain
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert border.mean() < 10                                                            # dark outside
    # The whole head is rendered at any size without a resize (same anatomy, 32 and 128 px).
    assert render(3, 128)[2] == heads[3][2] and render(3, 128)[0].shape == (128, 128)


def test_phantom_defaults_to_lesions_and_count_sets_the_population(tmp_path):
    out = run_build(tmp_path / "p", "--source", "phantom", "--size", "24", "--count", "400", "--seed", "1")
    manifest = read_manifest(out / "test", image_size=24, channels=1)
    protocol = manifest["source"]
    assert protocol["anomaly"] == "lesion" and protocol["source_images"] == 400
    assert "Shepp-Logan" in protocol["generator"]["rule"]
    assert protocol["seeding"] == f"source image i: default_rng([seed, {KINDS['lesion'].seed_id}, i])"
    counts = role_counts(400)
    assert manifest["samples"] == sum(counts["test"])
    origins = [s["origin"] for s in samples(out / "test")]
    assert all("anatomy" in o and "digit" not in o for o in origins)
    assert all(1 <= len(o["lesions"]) <= 2 for o in origins if o["anomalous"])


def test_bad_anomaly_gives_one_line_naming_the_allowed_values_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(BUILD), "simulated", "--source", "mnist5k", "--anomaly", "bogus",
                           "--size", "32", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--anomaly" in proc.stderr and all(repr(kind) in proc.stderr for kind in KINDS)


@pytest.mark.parametrize(
    "args, named",
    [
        (["--source", "digits", "--anomaly", "lesion"], ["--anomaly lesion", "--source phantom"]),
        (["--source", "mnist5k", "--count", "100"], ["--count"]),
        (["--source", "phantom", "--count", "0"], ["--count"]),
        (["--source", "phantom", "--anomaly", "intensity", "--size", "4"], ["--size"]),
        (["--source", "phantom", "--anomaly", "lesion", "--size", "8"], ["--size 8"]),
    ],
)
def test_bad_choices_give_one_line_and_exit_2(tmp_path, capsys, args, named):
    argv = ["simulated", *args, "--out", str(tmp_path / "out")]
    if "--size" not in args:
        argv += ["--size", "32"]
    try:
        code = build.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for word in named:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_mixed_fraction_rebuilds_only_the_mixed_share(tmp_path):
    """--mixed-fraction F: the mixed role keeps its size and holds round(F x size) anomalies; the
    healthy, val and test roles are the very same samples as the protocol's own build."""
    own = run_build(tmp_path / "own", "--source", "mnist5k", "--scale", SCALE, "--anomaly", "noise", "--size", "32")
    shares = {}
    for f in ("0", "0.6"):
        out = run_build(tmp_path / f"f{f}", "--source", "mnist5k", "--scale", SCALE, "--anomaly", "noise", "--size", "32",
                        "--mixed-fraction", f)
        for role in ("healthy", "val", "test"):
            assert tar_members(out / role) == tar_members(own / role)
        mixed = samples(out / "mixed")
        assert len(mixed) == len(samples(own / "mixed"))
        shares[f] = sum(s["origin"]["anomalous"] for s in mixed) / len(mixed)
        recorded = read_manifest(out / "mixed", image_size=SIZE, channels=1)["source"]["role_counts"]["mixed"]
        assert recorded["anomalous"] / (recorded["normal"] + recorded["anomalous"]) == pytest.approx(float(f), abs=0.01)
    assert shares == {"0": 0.0, "0.6": pytest.approx(0.6, abs=0.01)}
    for bad in ("-0.1", "1.5"):
        proc = subprocess.run([sys.executable, str(BUILD), "simulated", "--source", "mnist5k", "--size", "32",
                               "--mixed-fraction", bad, "--out", str(tmp_path / "bad")], capture_output=True, text=True)
        assert proc.returncode == 2 and "--mixed-fraction" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "bad").exists()
