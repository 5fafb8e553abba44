"""Smoke tests of the benchmark scripts: tiny sizes, a step or two, the table is printed.
Nothing here is timed; the numbers are not checked, only that each script runs end to end."""
from __future__ import annotations

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


def test_quality_prints_every_method(sim_shards, tmp_path, capsys):
    import quality

    data = tmp_path / "shards"
    shutil.copytree(sim_shards, data)
    rows = quality.main(["--data", str(data), "--steps", "2", "--batch", "4", "--ae-width", "4",
                         "--pca-components", "4", "--override", "model.width=4", "model.res_blocks=1",
                         "model.critic_width=4", "optim.decay_steps=0"])
    out = capsys.readouterr().out
    for name in ("A2B-GAN", "conv AE", "PCA", "greyness", "healthy distance"):
        assert name in out and name in " ".join(rows)
    assert all(0.0 <= v[0] <= 1.0 for vals in rows.values() for v in vals)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_script_parses_and_refuses_without_a_gpu():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_run.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for real")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
