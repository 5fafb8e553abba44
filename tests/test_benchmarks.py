"""The benchmark scripts: tiny sizes, a step or two, the table is printed; the speed benchmarks run
the trainer's own step (checked against train() on the same batches). Nothing here is timed."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY = ["--size", "32", "--batch", "4", "--width", "4", "--res-blocks", "1", "--critic-width", "4",
        "--repeats", "1", "--iters", "1", "--warmup", "0", "--device", "cpu"]


def test_train_speed_prints_both_loops_flops_and_ratio(capsys):
    import train_speed

    result = train_speed.main(TINY)
    out = capsys.readouterr().out
    assert "FLOPs per iteration" in out and "toolkit / bare" in out
    assert len(re.findall(r"^toolkit +[\d.]+", out, re.M)) == 1 and len(re.findall(r"^bare +[\d.]+", out, re.M)) == 1
    assert result["flops_per_iter"] > 0 and result["toolkit_images_per_s"] > 0 and result["bare_images_per_s"] > 0


def test_benchmark_step_is_the_trainers_step(sim_shards, tmp_path):
    """train() for one step logs its losses; the speed benchmark's step, fed the trainer's own first
    batches (the same streams, same seed), gives the same losses: the benchmark times the trainer."""
    import train_speed

    from a2b_dist.config import load_config
    from a2b_dist.steps import LOSS_TERMS
    from a2b_dist.train import _open_streams, train

    cfg = load_config(ROOT / "configs" / "test.yaml", [
        f"data.root={sim_shards}", f"train.run_dir={tmp_path / 'run'}", "train.steps=1", "train.log_every=1",
        "train.sample_every=0", "eval.every=0", "loss.lambda_id_out=2", "optim.decay_steps=1"])
    train(cfg, resume="none")
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1

    streams = {role: iter(s) for role, s in _open_streams(cfg, 0, 1).items()}
    batches = [(next(streams["mixed"]), next(streams["healthy"])) for _ in range(cfg.optim.n_critic)]
    step, _ = train_speed.toolkit_stepper(cfg, batches=batches)
    stats = step(0)
    for term in LOSS_TERMS:
        assert float(stats[term]) == pytest.approx(logged[term], rel=1e-5, abs=1e-7), term
    # and a different batch gives different losses: the comparison can fail
    other = train_speed.toolkit_stepper(cfg, batches=batches[::-1])[0](0)
    assert float(other["loss_g"]) != pytest.approx(logged["loss_g"], rel=1e-5)


def test_train_speed_counts_the_flops_of_one_iteration():
    """Counted FLOPs grow with the image area: 4x the pixels, about 4x the FLOPs."""
    import train_speed

    counts = []
    for size in (32, 64):
        args = train_speed.argparse.Namespace(size=size, batch=2, width=4, res_blocks=1, critic_width=4,
                                              precision="no", channels_last=False, compile=False, device="cpu")
        cfg = train_speed.make_config(args)
        counts.append(train_speed.count_flops(train_speed.bare_stepper(cfg, torch.device("cpu"))))
    assert 3.0 < counts[1] / counts[0] < 5.0


def test_ddp_scaling_prints_its_table(capsys):
    import ddp_scaling

    rows = ddp_scaling.main(["--processes", "1", *TINY])
    out = capsys.readouterr().out
    assert "images/s" in out and "efficiency" in out
    assert rows[0]["processes"] == 1 and rows[0]["images_per_s"] > 0


def test_data_throughput_reads_local_and_from_an_http_server(capsys):
    """The loader benchmark: local shards, the same shards streamed from a real http.server, and
    from the node's cache after one pass filled it."""
    import data_throughput

    rows = data_throughput.main(["--sizes", "32", "--samples", "64", "--batch-size", "4", "--batches", "3"])
    out = capsys.readouterr().out
    assert [r["source"] for r in rows] == ["local", "http", "http+cache"] and all(r["images_per_s"] > 0 for r in rows)
    assert "images/s/worker" in out and len(re.findall(r"^ +32 +http\+cache", out, re.M)) == 1


def test_quality_prints_every_method(sim_shards, tmp_path, capsys):
    import quality

    work = tmp_path / "work"
    args = ["--data", str(sim_shards), "--steps", "2", "--batch", "4", "--ae-width", "4", "--seeds", "0", "1",
            "--pca-components", "4", "--ddad-k", "2", "--work", str(work), "--override", "model.width=4",
            "model.res_blocks=1", "model.critic_width=4", "--variant", "ema=train.ema_decay=0.9",
            "--methods", "a2b", "a2b-paper", "a2b-healthy", "ema", "ae", "ddad", "pu", "pca", "references"]
    rows = quality.main(args)
    out = capsys.readouterr().out
    for name in ("a2b", "a2b-paper", "a2b-healthy", "ema", "ae", "ddad", "pu", "pca", "references"):
        assert f"| {name} |" in out
    assert len(rows) == 18 and all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    a2b = [r for r in rows if r["method"].startswith("a2b") or r["method"] == "ema"]
    assert all({"mean", "topk", "mask", "smooth_topk", "intermediate", "critic"} <= set(r["scores"]) for r in a2b)
    assert all(r["images"] == 2 * 2 * 2 * 4 for r in a2b)        # steps x n_critic x roles x batch
    # eval.score=auto (the preset's): the kind chosen on validation is reported, and the paper's method keeps the mean
    assert all(r["score"] in {"mean", "topk", "mask", "smooth_topk", "intermediate", "healthy_z", "healthy_z_mask",
                              "healthy_z_int"} for r in a2b)
    # the preset's eval.normalize_images: the healthy_z kinds for A2B-GAN, not for the paper's values
    assert all({"healthy_z", "healthy_z_mask", "healthy_z_int"} <= set(r["scores"]) for r in a2b if r["method"] != "a2b-paper")
    assert all("healthy_z" not in r["scores"] for r in a2b if r["method"] == "a2b-paper")
    assert all(r["score"] == "mean" for r in a2b if r["method"] == "a2b-paper")
    for r in (r for r in rows if r["method"] == "a2b"):
        assert r["auroc"] == r["scores"][r["score"]]
    ae = [r for r in rows if r["method"] == "ae"]                  # the autoencoder gets the same rule
    assert all(r["score"] in quality.MAP_KINDS and r["auroc"] == r["scores"][r["score"]] for r in ae)
    assert all("healthy_z" in r["scores"] for r in ae)
    assert "± " in out                                              # two seeds: mean and spread
    tag = "32-2"
    assert json.loads((work / f"results-{tag}.json").read_text()) == rows
    assert (work / f"table-{tag}.md").is_file() and (work / f"val_auc-{tag}.png").stat().st_size > 0
    # the ablation trained on the healthy set in the mixed set's place
    mixed = (work / "shards" / f"{sim_shards.name}-{32}-healthy-as-mixed" / "mixed").resolve()
    assert mixed == (sim_shards / "healthy").resolve()
    # a rerun reuses every finished cell
    again = quality.main(args)
    assert again == rows
    # --rescore: the A2B-GAN cells scored again from their kept runs (same checkpoint, the kind chosen
    # again on validation), the same figures when the score kinds have not changed; nothing retrained
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.safetensors")}
    rescored = {(r["method"], r["seed"]): r for r in quality.main([*args, "--rescore"])}
    for r in rows:
        again = rescored[(r["method"], r["seed"])]
        if r["method"] in ("a2b", "a2b-paper", "a2b-healthy", "ema"):
            assert again["selected_step"] == r["selected_step"] and again["score"] == r["score"]
            assert again["auroc"] == pytest.approx(r["auroc"], abs=1e-9)
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.safetensors")} == before
    # --cached: the table of the finished cells, a cell not run yet listed and left out, nothing trained
    capsys.readouterr()
    methods_at = args.index("--methods")
    cached = quality.main([*args[:methods_at], "--methods", "a2b", "ae", "synth-healthy", "--seeds", "0", "--cached"])
    out = capsys.readouterr().out
    assert sorted((r["method"], r["seed"]) for r in cached) == [("a2b", 0), ("ae", 0)]
    assert re.search(r"synth-healthy seed 0: not run yet", out) and "| synth-healthy |" not in out
    assert not list((work / "runs").rglob("synth-healthy"))
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.safetensors")} == before
    with pytest.raises(SystemExit):                     # --cached computes nothing, so it refuses what would
        quality.main([*args, "--cached", "--fuse-pu"])


def test_quality_thesis_curve_retrains_only_what_reads_the_mixed_set(tmp_path, capsys):
    """--fractions: the mixed role rebuilt at each share (same size, same other roles), every method
    that reads it retrained at each, the others once (flat); NAME@SIZE sets a protocol's size."""
    import quality

    work = tmp_path / "work"
    args = ["--protocols", "mnist-square@32", "--data-scale", "0.1", "--fractions", "0", "0.6", "--steps", "2",
            "--batch", "4",
            "--ae-width", "4", "--seeds", "0", "--work", str(work), "--override", "model.width=4",
            "model.res_blocks=1", "model.critic_width=4", "--methods", "a2b", "a2b-healthy", "ae"]
    rows = quality.main(args)
    out = capsys.readouterr().out
    shares = sorted((r["method"], r["fraction"]) for r in rows)
    assert shares == [("a2b", 0.0), ("a2b", 0.3), ("a2b", 0.6), ("a2b-healthy", 0.3), ("ae", 0.3)]
    for f, anomalous in (("0", 0), ("0.6", 0.6)):
        root = work / "shards" / f"mnist-square-32-f{f}"
        assert quality.mixed_fraction(root) == pytest.approx(anomalous, abs=0.01)
        for shard in (root / "test").glob("*.tar"):               # the same test images as the protocol's own
            assert shard.read_bytes() == (work / "shards" / "mnist-square-32" / "test" / shard.name).read_bytes()
    assert "| mnist-square@32 | a2b |" in out and "share 0.6" in out and "(does not read the mixed set)" in out
    assert (work / "thesis-32-2.png").stat().st_size > 0
    assert json.loads((work / "results-32-2.json").read_text()) == rows


def test_quality_fuses_with_the_pu_peer_and_adds_it_to_finished_cells(sim_shards, tmp_path, capsys):
    """--fuse-pu: the A2B-GAN and autoencoder scores standardised on healthy validation images and
    summed with the pu classifier's; a cell finished without it gets it from its kept run folder."""
    import quality

    work = tmp_path / "work"
    base = ["--data", str(sim_shards), "--steps", "2", "--batch", "4", "--ae-width", "4", "--seeds", "0",
            "--work", str(work), "--override", "model.width=4", "model.res_blocks=1", "model.critic_width=4",
            "--methods", "a2b", "ae"]
    plain = quality.main(base)
    assert all("fused_pu" not in r.get("scores", {}) for r in plain)
    fused = quality.main(base + ["--fuse-pu"])
    capsys.readouterr()
    for before, after in zip(plain, fused):
        assert after["auroc"] == before["auroc"]                   # the cell itself is not retrained
        assert 0.0 <= after["scores"]["fused_pu"] <= 1.0 and 0.0 <= after["scores"]["fused_pu_val"] <= 1.0
        assert after["scores"]["fused_pu_w"] in quality.FUSE_WEIGHTS   # the pu share chosen on validation
        assert 0.0 <= after["scores"]["fused_pu_sel"] <= 1.0
        assert after["scores"]["fused_pu_sel_val"] >= after["scores"]["fused_pu_val"] - 1e-12
    cell = next((work / "results").rglob("a2b/seed-0.json"))
    assert "fused_pu" in json.loads(cell.read_text())["scores"]   # written back: a rerun reuses it
    assert quality.main(base + ["--fuse-pu"]) == fused


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_script_parses_and_refuses_without_a_gpu():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_run.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for real")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr


def test_eval_scale_runs_its_four_tables_on_tiny_sizes(sim_shards, eval_config, tmp_path, capsys):
    """eval_scale.py end to end on tiny sizes: the repeated role holds the pixels asked for with new
    keys, `a2b evaluate` on it prints its row; agree prints binned beside exact (equal to 1e-4 on
    these maps) and 1 beside 2 processes; detect prints .pt and .onnx rows whose scores agree."""
    import eval_scale
    from conftest import export_generator

    work = tmp_path / "work"
    rows = eval_scale.main(["evaluate", "--size", "32", "--count", "300", "--pixels", "1e5", "--width", "4",
                            "--res-blocks", "1", "--batch", "16", "--work", str(work)])
    assert rows[0]["images"] == round(1e5 / 32 ** 2) and rows[0]["pixel_metrics"] == "exact"
    manifest = json.loads(next(work.glob("repeat-32-*/test/manifest.json")).read_text())
    assert manifest["samples"] == rows[0]["images"] == sum(manifest["labels"].values())
    assert rows[0]["peak_mb"] > 0
    model = export_generator(tmp_path / "g.pt", eval_config)
    agree = eval_scale.main(["agree", "--checkpoint", str(model), "--shards", str(sim_shards / "test"),
                             "--processes", "2", "--work", str(work)])[0]
    for q in ("map", "mask"):
        assert abs(agree[q]["exact_auroc"] - agree[q]["binned_auroc"]) < 1e-4
    assert agree["processes"]["1"] == pytest.approx(agree["processes"]["2"], rel=1e-6)
    pytest.importorskip("onnxruntime")
    detect = eval_scale.main(["detect", "--checkpoint", str(model), "--shards", str(sim_shards / "test"),
                              "--count", "12", "--maps-count", "3", "--work", str(work)])
    assert [(r["format"], r["maps"], r["images"]) for r in detect] == [
        ("pt", False, 12), ("pt", True, 3), ("onnx", False, 12), ("onnx", True, 3)]
    out = capsys.readouterr().out
    assert "largest |score(.pt) - score(.onnx)|" in out and "| .onnx | no | 12 |" in out


def test_report_heatmaps_photographs_a_reports_sections(tmp_path, capsys):
    """report_heatmaps.py on a page written by the report writer: the highest-scored anomalous
    panels (lesions ten times the background on the run's scale) pass, the healthy ones stay dark."""
    import report_heatmaps
    from test_heatmaps import _page, _result

    from a2b_dist import scoring

    result, healthy, anomalous, _ = _result()
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    scale = scoring.summarise_result(result, score="mean")["map_scale"]
    page = _page(tmp_path, "report", result, healthy, anomalous, scale)
    assert report_heatmaps.main([str(page)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 to " in out and "| Highest-scored healthy images | 3 |" in out
    flat = _page(tmp_path, "flat", result, healthy, anomalous, None)   # the old fixed 0-1 scale: nothing lights up
    assert report_heatmaps.main([str(flat)]) == 1


def test_paper_column_holds_the_papers_loss_and_optimiser_values():
    """quality.py's a2b-paper method on the small preset is the paper's section 4.4 values, whatever the
    preset moves (it sets lambda_id 10 and lambda_fz 0, which the paper column must not inherit)."""
    import quality

    from a2b_dist.config import load_config

    preset = load_config(ROOT / "configs" / "small.yaml")
    assert (preset.loss.lambda_id, preset.loss.lambda_fz) != (1.0, 1.0)   # else this test checks nothing
    cfg = load_config(ROOT / "configs" / "small.yaml", quality.PAPER)
    loss, optim = cfg.loss, cfg.optim
    assert (loss.lambda_gp, loss.lambda_id, loss.lambda_rec, loss.lambda_f, loss.lambda_fz, loss.lambda_fs) == (
        10.0, 1.0, 1.0, 0.1, 1.0, 0.001)
    assert loss.lambda_id_out == 0 and loss.restore_prob == 0 and loss.pseudo_fraction == 0
    assert loss.critic_mixed == 0 and loss.lambda_cls == 0
    assert (optim.lr_g, optim.lr_d) == (1e-4, 1e-4) and cfg.eval.score == "mean"
    assert preset.model.mask_prior > 0 and cfg.model.mask_prior == 0     # the paper's mask starts at 0.5
    assert preset.loss.pu_mask > 0 and cfg.loss.pu_mask == 0             # the paper has no mask classifier term
