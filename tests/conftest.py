"""Fixtures and helpers shared by the test files: small simulated shards built by the real command,
test images, an evaluation config, a generator export, a stand-in for the FID Inception weights."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from a2b_dist.config import Config, validate

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "shards" / "build.py"


def tar_members(role_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of every sample of a role, straight from its tar files."""
    import tarfile

    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(role_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, field = m.name.partition(".")
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def build_module():
    """a2b_dist.build, the module behind `a2b build` and shards/build.py."""
    from a2b_dist import build

    return build


def build_shards(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `python shards/build.py ARGS`; raise with its stderr if it fails."""
    proc = subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"shards/build.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def png_bytes() -> bytes:
    """A 32 x 32 grey 8-bit PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 32 x 32 PNG whose IHDR claims width x height (CRC fixed): a few hundred bytes that a
    reader without a size check would try to expand to width x height pixels."""
    import struct
    import zlib

    data = bytearray(png_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="session")
def sim_shards(tmp_path_factory) -> Path:
    """OUT with healthy/ mixed/ val/ test/ from the simulated protocol at 32 px, scaled to 5%:
    healthy 80, mixed 56 + 24 anomalous, val 5 + 5, test 40 + 40; at most 30 samples a shard,
    so every role but val spans several shards of uneven size. Treat it as read-only."""
    out = tmp_path_factory.mktemp("sim-shards") / "sim"
    build_shards("simulated", "--source", "mnist5k", "--size", "32", "--scale", "0.05",
                 "--maxcount", "30", "--seed", "0", "--out", str(out))
    return out


# Evaluation, FID and detect tests: a config over sim_shards, a generator export, and a stand-in
# for pytorch-fid's Inception weights.

def make_eval_config(root: Path, run_dir: Path) -> Config:
    """32 px, 1 channel, a tiny generator (width 8, one residual block)."""
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.channels, cfg.data.num_workers = str(root), 32, 1, 0
    cfg.model.width, cfg.model.res_blocks = 8, 1
    cfg.eval.batch_size = 16
    cfg.train.run_dir = str(run_dir)
    return validate(cfg)


def export_generator(path: Path, cfg: Config, seed: int = 0, step: int = 7) -> Path:
    """A randomly initialised generator in the `a2b export` format."""
    import dataclasses

    import torch

    from a2b_dist.nets import build_generator

    torch.manual_seed(seed)
    gen = build_generator(cfg.model, cfg.data.channels)
    torch.save({"format": "a2b-generator-v1", "generator": gen.state_dict(),
                "config": dataclasses.asdict(cfg), "step": step}, path)
    return path


@pytest.fixture()
def eval_config(sim_shards, tmp_path) -> Config:
    """A config over conftest's sim_shards with a tiny generator and its own run folder."""
    return make_eval_config(sim_shards, tmp_path / "run")


@pytest.fixture(scope="session")
def standin_fid_weights(tmp_path_factory) -> Path:
    """A file shaped like pytorch-fid's Inception weights (every key, random values): pytorch-fid's
    own FID Inception structure, built without its download, saved as a plain state dict."""
    from unittest import mock

    import torch
    import torchvision
    from pytorch_fid import inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        net = inception.fid_inception_v3()
        for m in net.modules():  # variance-preserving, so features (and distances) are of order 1
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid-weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def chromium_screenshot(page: Path, png: Path) -> Path:
    """A screenshot of a local HTML page by headless Chromium (Debian's `chromium`; CI installs it),
    with every network request sent to a closed port, so a page that needs the network shows it."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--proxy-server=127.0.0.1:9", "--window-size=1200,2400", f"--screenshot={png}",
                           Path(page).resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    return png
