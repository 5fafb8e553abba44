"""Evaluation: metrics against scikit-learn, mask diagnostics and references on constructed inputs
with known answers, the model-selection hook, and `a2b evaluate` end to end on simulated shards."""
from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from a2b_dist import evaluate as ev
from a2b_dist import metrics, references, scoring
from conftest import export_generator, make_eval_config


# ---------------------------------------------------------------------------------------------
# Image and pixel metrics

def test_image_metrics_match_sklearn_and_youden():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 20 + [-1] * 5)
    scores = np.concatenate([rng.normal(0, 1, 30), rng.normal(1.5, 1, 20), rng.normal(9, 1, 5)])
    m = metrics.image_metrics(labels, scores)
    known = labels >= 0
    assert m["auroc"] == pytest.approx(roc_auc_score(labels[known], scores[known]))
    assert m["aupr"] == pytest.approx(average_precision_score(labels[known], scores[known]))
    assert (m["n"], m["n_healthy"], m["n_anomalous"]) == (50, 30, 20)
    # The Youden threshold maximises sensitivity + specificity over all cut points.
    s, y = scores[known], labels[known]
    best = max(((s[y == 1] >= t).mean() + (s[y == 0] < t).mean(), t) for t in s)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best[0])
    assert m["sensitivity"] == pytest.approx((s[y == 1] >= m["threshold"]).mean())


def test_image_metrics_known_values():
    m = metrics.image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert (m["auroc"], m["aupr"], m["sensitivity"], m["specificity"]) == (1.0, 1.0, 1.0, 1.0)
    assert 0.2 < m["threshold"] <= 0.3
    m = metrics.image_metrics([0, 0, 0], [0.1, 0.2, 0.3])          # one class: undefined, not an error
    assert m["auroc"] is None and m["threshold"] is None
    m = metrics.image_metrics([0, 1], [1.0, 0.0])                   # inverted: threshold stays finite
    assert m["auroc"] == 0.0 and np.isfinite(m["threshold"]) and json.dumps(m)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    gt = np.zeros((3, 1, 8, 8))
    gt[0, 0, 2:5, 2:5] = 1
    gt[2, 0, 4:8, 0:3] = 1
    maps = rng.random((3, 1, 8, 8)) + gt * 0.3
    assert metrics.pixel_auroc(maps, gt) == pytest.approx(roc_auc_score(gt.ravel(), maps.ravel()))
    assert metrics.pixel_auroc(maps, np.zeros_like(gt)) is None


# ---------------------------------------------------------------------------------------------
# Mask diagnostics

def _constructed_masks():
    """4 images of 4x4: 2 healthy with M = 0.1 everywhere, 2 anomalous with a 2x2 anomaly where
    M = 0.9 and 0.1 elsewhere; every ground truth known."""
    masks = np.full((4, 1, 4, 4), 0.1)
    gt = np.zeros((4, 1, 4, 4))
    gt[2, 0, :2, :2] = 1
    gt[3, 0, 2:, 2:] = 1
    masks[gt > 0] = 0.9
    labels = np.array([0, 0, 1, 1])
    return masks, labels, gt


def test_mask_diagnostics_known_answers():
    masks, labels, gt = _constructed_masks()
    diff = gt * 0.5 + 0.01                                      # a perfect difference map
    d = metrics.mask_diagnostics(masks, labels, gt, np.ones(4, bool), diff)
    assert d["mask_mean_healthy"] == pytest.approx(0.1)
    assert d["mask_mean_anomalous"] == pytest.approx((4 * 0.9 + 12 * 0.1) / 16)
    assert d["mask_mean_inside"] == pytest.approx(0.9)
    assert d["mask_mean_outside"] == pytest.approx(0.1)
    assert d["mask_inside_outside_ratio"] == pytest.approx(9.0)
    assert d["mask_pixel_std"] == pytest.approx(np.std(masks, axis=0).mean())
    assert d["mask_pixel_auroc"] == 1.0 and d["diff_pixel_auroc"] == 1.0


def test_mask_diagnostics_fixed_pattern_has_zero_std_and_chance_auroc():
    """The collapse issue 5 describes: the same grid on every image, not following the anomaly."""
    masks, labels, gt = _constructed_masks()
    grid = np.indices((4, 4)).sum(axis=0) % 2 * 0.8 + 0.1      # checkerboard
    fixed = np.broadcast_to(grid, masks.shape)
    d = metrics.mask_diagnostics(fixed, labels, gt)
    assert d["mask_pixel_std"] == pytest.approx(0.0, abs=1e-12)
    assert d["mask_mean_healthy"] == pytest.approx(d["mask_mean_anomalous"])
    assert d["mask_pixel_auroc"] == pytest.approx(0.5)
    assert d["diff_pixel_auroc"] is None                        # no difference map given


def test_mask_summaries_merge_exactly():
    """Merging per-batch (or per-rank) summaries gives the whole-array answer; has_mask selects."""
    rng = np.random.default_rng(2)
    masks = rng.random((10, 1, 6, 6))
    gt = (rng.random((10, 1, 6, 6)) > 0.7).astype(float)
    labels = rng.integers(-1, 2, 10)
    has = rng.random(10) > 0.3
    whole = metrics.mask_diagnostics(masks, labels, gt, has, masks * 2)
    parts = [metrics.summarise_masks(masks[i:i + 3], labels[i:i + 3], gt[i:i + 3], has[i:i + 3], masks[i:i + 3] * 2)
             for i in range(0, 10, 3)]
    merged = metrics.finish_mask_diagnostics(metrics.merge_mask_summaries(parts))
    assert merged == pytest.approx(whole)
    assert whole["mask_mean_inside"] == pytest.approx(masks[has][gt[has] > 0].mean())
    assert whole["mask_mean_healthy"] == pytest.approx(masks[labels == 0].mean())
    assert whole["mask_pixel_auroc"] == pytest.approx(roc_auc_score(gt[has].ravel(), masks[has].ravel()))


# ---------------------------------------------------------------------------------------------
# Training-free references

def test_greyness_known_values():
    x = torch.stack([torch.full((1, 4, 4), -1.0),               # black: greyness 0
                     torch.zeros(1, 4, 4),                       # mid-grey: 1
                     torch.full((1, 4, 4), 1.0)])                # white: 0
    assert references.greyness(x).tolist() == pytest.approx([0.0, 1.0, 0.0])
    square = torch.full((1, 1, 4, 4), -1.0)
    square[..., :2, :2] = 0.0                                    # a mean-filled square on black
    assert references.greyness(square).item() == pytest.approx(4 / 16)


def test_healthy_distance_known_values():
    mean = torch.full((1, 2, 2), -1.0)                           # black healthy mean
    x = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0),
                     torch.tensor([[[0.0, -1.0], [-1.0, -1.0]]])])
    assert references.healthy_distance(x, mean).tolist() == pytest.approx([0.0, 1.0, 0.5 / 4])


# ---------------------------------------------------------------------------------------------
# On simulated shards: the pass, the selection hook, the command under 1 and 2 processes

def _tiny_generator(channels=1, seed=0):
    from a2b_dist.nets import Generator

    torch.manual_seed(seed)
    return Generator(channels, width=8, res_blocks=1)


def test_selection_metric_val_auc(eval_config):
    gen = _tiny_generator()
    gen.train()
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out = scoring.selection_metric(gen, eval_config, device="cpu")
    assert gen.training                                           # mode restored
    assert torch.equal(torch.get_rng_state(), before[0])          # no global RNG consumed
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
    assert 0.0 <= out["val_auc"] <= 1.0 and all(isinstance(v, float) for v in out.values())
    assert {"val_auc_mean", "val_auc_topk", "mask_pixel_std"} <= out.keys()
    assert out == scoring.selection_metric(gen, eval_config, device="cpu")


def _check_outputs(out: Path, test_dir: Path, processes: int) -> dict:
    manifest = json.loads((test_dir / "manifest.json").read_text())
    count = manifest.get("samples", manifest.get("count"))
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == count == metrics["counts"]["samples"]
    assert len({r["key"] for r in rows}) == count
    assert metrics["processes"] == processes and metrics["step"] == 7
    assert metrics["score"] == "mean" and 0 <= metrics["auroc"] <= 1
    assert set(metrics["scores"]) == {"mean", "topk", "mask", "smooth_topk", "intermediate"}
    assert (out / "roc.png").stat().st_size > 0 and (out / "masks.png").is_file()
    return metrics


@pytest.fixture(scope="module")
def one_process(sim_shards, standin_fid_weights, tmp_path_factory):
    """`a2b evaluate` in this process with references and FID: (its arguments, its output folder)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    ckpt = export_generator(tmp / "generator.pt", make_eval_config(sim_shards, tmp / "run"))
    args = ["--checkpoint", str(ckpt), "--shards", str(sim_shards / "test"), "--num-maps", "1",
            "eval.batch_size=16", "--references"]
    fid_args = ["--fid", f"eval.fid_weights={standin_fid_weights}", "eval.fid_dims=64", "eval.fid_samples=8",
                "--fid-cache", str(tmp / "cache")]
    assert ev.main(args + fid_args + ["--out", str(tmp / "one")]) == 0
    return args, tmp / "one"


def test_report_page_holds_metrics_json_and_loads_nothing(one_process, sim_shards):
    """report.html: the headline is metrics.json's, every figure is embedded, nothing is fetched, and
    the provenance names the scored shards' manifest by its hash."""
    import hashlib

    _, out = one_process
    page = (out / "report.html").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert f'id="image">{m["auroc"]:.4f}<' in page and f'id="AUPR">{m["aupr"]:.4f}<' in page
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert len(refs) >= 4 and all(r.startswith("data:image/png;base64,") for r in refs)
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page
    for title in ("Highest-scored healthy images", "Lowest-scored anomalous images",
                  "Highest-scored anomalous images", "Mask diagnostics", "FID", "Provenance"):
        assert title in page
    assert hashlib.sha256((sim_shards / "test" / "manifest.json").read_bytes()).hexdigest() in page


def test_report_renders_in_headless_chromium(one_process, tmp_path):
    from PIL import Image

    from conftest import chromium_screenshot

    _, out = one_process
    shot = chromium_screenshot(out / "report.html", tmp_path / "report.png")
    grey = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert grey.shape[0] > 500 and grey.std() > 20          # a page with text and figures, not a blank one
    assert (grey < 200).mean() > 0.02


def test_extremes_are_the_highest_and_lowest_scores(sim_shards, eval_config):
    from a2b_dist.data import EvalReader
    from a2b_dist.nets import build_generator

    torch.manual_seed(0)
    gen = build_generator(eval_config.model, 1).eval()
    with torch.no_grad():
        res = scoring.score_role(gen, sim_shards / "test", EvalReader(batch_size=16, image_size=32), topk_percent=5,
                                 kept=scoring.Kept(extremes=3, score="topk"))
    values = dict(zip(res["key"], res["scores"]["topk"]))
    healthy = sorted((k for k, y in zip(res["key"], res["label"]) if y == 0), key=lambda k: (-values[k], k))
    anomalous = sorted((k for k, y in zip(res["key"], res["label"]) if y > 0), key=lambda k: (values[k], k))
    ext = res["extremes"]
    assert [k for k, _, _ in ext["healthy_highest"]] == healthy[:3]
    assert [k for k, _, _ in ext["anomalous_lowest"]] == anomalous[:3]
    assert [k for k, _, _ in ext["anomalous_highest"]] == sorted(anomalous, key=lambda k: (-values[k], k))[:3]
    assert all(v == pytest.approx(values[k]) for k, v, _ in ext["healthy_highest"])


def test_evaluate_one_process(one_process, sim_shards):
    _, out = one_process
    metrics = _check_outputs(out, sim_shards / "test", 1)
    assert set(metrics["references"]) == {"greyness", "healthy_distance"}
    assert metrics["pixel_auroc"] is not None and metrics["mask"]["mask_pixel_std"] >= 0
    assert metrics["counts"]["with_ground_truth_masks"] == 80   # the simulator masks every test image
    assert metrics["fid"]["samples"] == 8 and metrics["fid"]["fid"] > 0
    assert sorted(p.name.split("-")[0] for p in (out / "maps").glob("*.png")) == ["anomalous", "healthy"]
    with open(out / "scores.csv") as f:
        header = next(csv.reader(f))
    assert header == ["key", "label", "score", "score_mean", "score_topk", "score_mask", "score_smooth_topk",
                      "score_intermediate", "greyness", "healthy_distance"]


def test_evaluate_two_processes_match_one(one_process, sim_shards, tmp_path):
    """Scores, references and mask diagnostics gathered from both ranks equal those of one process.
    (FID is left out here for time: test_fid checks that the ranks' shares of its samples add up.)"""
    args, one_out = one_process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "-m", "a2b_dist.evaluate"]
    done = subprocess.run(launch + args + ["--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = _check_outputs(tmp_path / "two", sim_shards / "test", 2)
    one = json.loads((one_out / "metrics.json").read_text())
    for name in ("auroc", "aupr", "threshold", "pixel_auroc", "pixel_aupro"):   # AUPRO: the all-reduced histograms
        assert two[name] == pytest.approx(one[name], rel=1e-5)
    for name in ("greyness", "healthy_distance"):
        assert two["references"][name] == pytest.approx(one["references"][name], rel=1e-5)
    numbers = lambda d: {k: v for k, v in d.items() if k != "pixel_metrics"}  # noqa: E731
    assert numbers(two["mask"]) == pytest.approx(numbers(one["mask"]), rel=1e-5)
    assert two["mask"]["pixel_metrics"] == one["mask"]["pixel_metrics"] == "exact"
    assert (one_out / "scores.csv").read_text() == (tmp_path / "two" / "scores.csv").read_text()


def test_evaluate_user_errors(sim_shards, eval_config, tmp_path):
    from a2b_dist.errors import UserError

    ckpt = export_generator(tmp_path / "generator.pt", eval_config)
    with pytest.raises(UserError, match="manifest.json"):
        ev.main(["--checkpoint", str(ckpt), "--shards", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="does not exist"):
        ev.main(["--checkpoint", str(tmp_path / "nope.pt"), "--shards", str(sim_shards / "test"),
                 "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--healthy"):
        ev.main(["--checkpoint", str(ckpt), "--shards", str(sim_shards / "test"), "--out", str(tmp_path / "o"),
                 "--references", "--healthy", str(tmp_path)])
    # Overrides: only how it scores and reads, checked like any config value, before anything is written.
    for override, words in (("model.width=4", "model.width cannot be set here; allowed: eval.*"),
                            ("eval.topk_percent=0", "eval.topk_percent=0.0 is out of range"),
                            ("eval.score=median", "eval.score='median' is not allowed"),
                            ("data.verify=md5", "data.verify='md5' is not allowed"),
                            ("eval.scores=mean", "eval.scores")):
        with pytest.raises(UserError, match=re.escape(words)):
            ev.main(["--checkpoint", str(ckpt), "--shards", str(sim_shards / "test"), "--out",
                     str(tmp_path / "o"), override])
    assert not (tmp_path / "o").exists()


def test_a_one_class_role_says_auroc_is_undefined_without_warnings(sim_shards, eval_config, tmp_path):
    """`a2b evaluate` on the healthy role (one class; a real process, as a user runs it): one line
    saying the AUROC is undefined, nothing from matplotlib or sklearn on stderr; the curves of an
    all-anomalous set draw without a warning either."""
    import warnings

    from a2b_dist.figures import pr_png, roc_png

    ckpt = export_generator(tmp_path / "generator.pt", eval_config)
    done = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(ckpt), "--shards",
                           str(sim_shards / "healthy"), "--out", str(tmp_path / "out")],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warning" not in done.stderr and "warning" not in done.stderr.lower(), done.stderr
    assert ("image AUROC, AUPR and threshold are undefined: the role holds only healthy images"
            in done.stdout)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["auroc"] is None
    result = {"label": np.ones(5, dtype=int), "scores": {"mean": np.linspace(0, 1, 5)}, "references": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert roc_png(result, "mean") and pr_png(result, "mean")
