"""Fixtures shared by the test files: small simulated shards built by the real command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "shards" / "build.py"


def build_shards(*args: str) -> subprocess.CompletedProcess:
    """Run `python shards/build.py ARGS`; raise with its stderr if it fails."""
    proc = subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True)
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
