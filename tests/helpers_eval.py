"""Fixtures shared by the evaluation, FID and detect tests: small simulated shards and a config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from a2b_dist.config import Config, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """shards/build.py simulated at 32 px, scaled down: healthy 80, mixed 80, val 10, test 80
    (test in 3 shards, so ranks read across shard boundaries)."""
    out = tmp_path_factory.mktemp("eval-shards") / "sim"
    subprocess.run([sys.executable, str(ROOT / "shards" / "build.py"), "simulated", "--source", "mnist5k",
                    "--size", "32", "--scale", "0.05", "--maxcount", "30", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture()
def eval_config(eval_shards, tmp_path) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.channels, cfg.data.num_workers = str(eval_shards), 32, 1, 0
    cfg.model.width, cfg.model.res_blocks = 8, 1
    cfg.eval.batch_size = 16
    cfg.train.run_dir = str(tmp_path / "run")
    return validate(cfg)
