"""`a2b detect` on a folder of PNGs written by the test (8- and 16-bit), thresholds, and bad paths."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from a2b_dist import detect, losses
from a2b_dist.config import Config, validate
from a2b_dist.data import load_image, to_tensor
from a2b_dist.errors import UserError
from conftest import export_generator


@pytest.fixture()
def setup(tmp_path):
    """A tiny exported generator at 32 px, and a folder: 8-bit PNGs at 32 and 28 px (one in a
    subfolder), the same image as a 16-bit PNG, and a file that is no image type."""
    cfg = Config()
    cfg.data.image_size, cfg.model.width, cfg.model.res_blocks = 32, 8, 1
    ckpt = export_generator(tmp_path / "gen.pt", validate(cfg))
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    base = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(base).save(images / "a.png")
    Image.fromarray((base.astype(np.uint16) * 257)).save(images / "a16.png")    # same values, 16-bit
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / "sub" / "b.PNG")
    square = np.zeros((32, 32), np.uint8)
    square[8:18, 8:18] = 128
    Image.fromarray(square).save(images / "sub" / "square.png")
    (images / "notes.txt").write_text("not an image")
    return ckpt, images, tmp_path


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_detect_scores_a_folder(setup):
    ckpt, images, tmp = setup
    assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / "out"),
                        "--threshold", "0.3", "--maps", "eval.batch_size=3"]) == 0
    rows = _rows(tmp / "out" / "scores.csv")
    assert sorted(r["path"] for r in rows) == ["a.png", "a16.png", "sub/b.PNG", "sub/square.png"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(r["flagged"] == str(int(float(r["score"]) >= 0.3)) for r in rows)
    by_path = {r["path"]: float(r["score"]) for r in rows}
    assert by_path["a.png"] == pytest.approx(by_path["a16.png"], abs=1e-5)   # 8- and 16-bit agree
    assert len(list((tmp / "out" / "maps").glob("*.png"))) == 4

    # The same preprocessing and score as a direct computation through the data layer.
    from a2b_dist.checkpoint import load_generator

    gen, cfg = load_generator(ckpt)
    x = to_tensor(load_image(images / "sub" / "b.PNG", 32, 1))[None]
    with torch.no_grad():
        b_int, m = gen(x)
        expected = losses.anomaly_score(losses.anomaly_map(x, losses.blend_healthy(x, b_int, m)), "mean").item()
    assert by_path["sub/b.PNG"] == pytest.approx(expected, rel=1e-4)


def test_threshold_from_metrics_json_brings_its_score(setup):
    ckpt, images, tmp = setup
    (tmp / "eval").mkdir()
    (tmp / "eval" / "metrics.json").write_text(json.dumps({"threshold": 0.5, "score": "topk", "topk_percent": 10.0}))
    assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / "out"),
                        "--threshold", str(tmp / "eval")]) == 0
    rows = _rows(tmp / "out" / "scores.csv")
    assert all(r["flagged"] == str(int(float(r["score"]) >= 0.5)) for r in rows)
    no_threshold = tmp / "out2"
    assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(no_threshold),
                        "eval.score=topk", "eval.topk_percent=10"]) == 0
    plain = _rows(no_threshold / "scores.csv")
    assert "flagged" not in plain[0]
    assert [r["score"] for r in plain] == [r["score"] for r in rows]          # topk 10% was used
    with pytest.raises(UserError, match="differs"):
        detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / "o"),
                     "--threshold", str(tmp / "eval" / "metrics.json"), "eval.score=mean"])


def test_detect_report_lists_every_image_once_by_score(setup):
    import re

    ckpt, images, tmp = setup
    assert detect.main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(tmp / "out"),
                        "--threshold", "0.3", "--report-panels", "2"]) == 0
    page = (tmp / "out" / "report.html").read_text()
    listed = re.findall(r'<tr><td class="num">\d+</td><td>([^<]+)</td><td class="num">([^<]+)</td>', page)
    rows = _rows(tmp / "out" / "scores.csv")
    assert [p for p, _ in listed] == [r["path"] for r in rows]                  # each once, highest first
    assert sorted(p for p, _ in listed) == ["a.png", "a16.png", "sub/b.PNG", "sub/square.png"]
    assert page.count("data:image/png;base64,") == 2                            # the two highest scores
    assert f"{sum(float(r['score']) >= 0.3 for r in rows)}</b> flagged at threshold 0.3" in page


def test_bad_paths_are_user_errors(setup):
    ckpt, images, tmp = setup
    base = ["--checkpoint", str(ckpt), "--out", str(tmp / "o")]
    with pytest.raises(UserError, match="missing-folder"):
        detect.main(base + ["--images", str(tmp / "missing-folder")])
    (tmp / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        detect.main(base + ["--images", str(tmp / "empty")])
    with pytest.raises(UserError, match="nope.json"):
        detect.main(base + ["--images", str(images), "--threshold", str(tmp / "nope.json")])
    with pytest.raises(UserError, match="nope.pt"):
        detect.main(["--checkpoint", str(tmp / "nope.pt"), "--images", str(images), "--out", str(tmp / "o")])
    (images / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        detect.main(base + ["--images", str(images)])
