"""`a2b export --format onnx`: the graph ONNX Runtime runs gives the PyTorch generator's outputs and
`a2b detect`'s scores; files that are not this toolkit's generators are refused in one line."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2b_dist import cli, detect, losses
from a2b_dist.config import Config, validate
from conftest import export_generator

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
onnx = pytest.importorskip("onnx", reason="the [onnx] extra is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny generator at 32 px as .pt and as .onnx (through the `a2b export` command), with the
    mask's learnt bias (model.mask_prior), so the graph and the .pt round trip must carry it too."""
    tmp = tmp_path_factory.mktemp("onnx")
    cfg = Config()
    cfg.data.image_size, cfg.model.width, cfg.model.res_blocks, cfg.model.mask_prior = 32, 8, 1, 0.05
    pt = export_generator(tmp / "gen.pt", validate(cfg), seed=3)
    assert cli.main(["export", str(pt), str(tmp / "gen.onnx"), "--format", "onnx"]) == 0
    return pt, tmp / "gen.onnx", tmp


def test_onnx_graph_matches_the_generator_at_any_batch_size(exported):
    from a2b_dist.checkpoint import load_generator

    pt, path, _ = exported
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["a2b_format"] == "a2b-generator-onnx-v1" and model.opset_import[0].version >= 18
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["b_prime", "b_int", "mask", "anomaly_map"]
    gen, _ = load_generator(pt)
    for batch in (1, 5):                                       # the batch dimension is dynamic
        x = torch.rand(batch, 1, 32, 32) * 2 - 1
        b_prime, b_int, mask, amap = session.run(None, {"image": x.numpy()})
        with torch.no_grad():
            ref_int, ref_mask = gen(x)
            ref_prime = losses.blend_healthy(x, ref_int, ref_mask)
        np.testing.assert_allclose(b_int, ref_int.numpy(), atol=1e-5)
        np.testing.assert_allclose(mask, ref_mask.numpy(), atol=1e-5)
        np.testing.assert_allclose(b_prime, ref_prime.numpy(), atol=1e-5)
        np.testing.assert_allclose(amap, losses.anomaly_map(x, ref_prime).numpy(), atol=1e-5)


def test_detect_with_the_onnx_file_gives_the_pt_scores(exported):
    pt, path, tmp = exported
    rng = np.random.default_rng(0)
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    scores = {}
    for name, ckpt in (("pt", pt), ("onnx", path)):
        assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / name),
                            "eval.batch_size=3", "eval.score=topk"]) == 0
        with open(tmp / name / "scores.csv") as f:
            scores[name] = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    assert scores["pt"].keys() == scores["onnx"].keys() and len(scores["pt"]) == 7
    for key, value in scores["pt"].items():
        assert scores["onnx"][key] == pytest.approx(value, abs=1e-5)


def test_files_that_are_not_a2b_generators_are_refused_in_one_line(exported, tmp_path, capsys):
    _, _, tmp = exported
    images = tmp / "images"
    other = tmp_path / "conv.onnx"                              # a valid ONNX model of something else
    torch.onnx.export(torch.nn.Conv2d(1, 1, 3), (torch.zeros(1, 1, 8, 8),), str(other), dynamo=False)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    for bad, words in ((other, "is an ONNX model but not an a2b generator"),
                       (garbage, "is not an ONNX model ONNX Runtime can load")):
        code = cli.main(["detect", "--checkpoint", str(bad), "--images", str(images), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # the format and the file name must agree
    assert cli.main(["export", str(tmp / "gen.pt"), str(tmp_path / "g.pt"), "--format", "onnx"]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert cli.main(["export", str(tmp / "gen.pt"), str(tmp_path / "g.onnx")]) == 2
    assert "add --format onnx" in capsys.readouterr().err
    assert not list(tmp_path.glob("g.*"))


def test_healthy_map_statistics_travel_in_the_onnx_metadata(tmp_path):
    """A generator with healthy map statistics (eval.normalize_images) keeps them through
    `a2b export --format onnx`, and `a2b detect` gives the .pt file's healthy_z scores with it."""
    from a2b_dist.checkpoint import MAP_NORM, load_generator

    cfg = Config()
    cfg.data.image_size, cfg.model.width, cfg.model.res_blocks, cfg.eval.normalize_images = 32, 8, 1, 4
    pt = export_generator(tmp_path / "gen.pt", validate(cfg), seed=5)
    blob = torch.load(pt, weights_only=True)
    g = torch.Generator().manual_seed(1)
    blob[MAP_NORM] = torch.rand(3, 2, 32, 32, generator=g) * 0.1
    torch.save(blob, pt)
    assert cli.main(["export", str(pt), str(tmp_path / "gen.onnx"), "--format", "onnx"]) == 0
    onnx_gen, _ = load_generator(tmp_path / "gen.onnx")
    assert torch.equal(onnx_gen.map_norm, blob[MAP_NORM])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    scores = {}
    for name, ckpt in (("pt", pt), ("onnx", tmp_path / "gen.onnx")):
        assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp_path / name),
                            "eval.score=healthy_z_mask"]) == 0
        with open(tmp_path / name / "scores.csv") as f:
            scores[name] = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    assert len(scores["pt"]) == 5 and any(v > 0 for v in scores["pt"].values())
    for key, value in scores["pt"].items():
        assert scores["onnx"][key] == pytest.approx(value, abs=1e-5)
