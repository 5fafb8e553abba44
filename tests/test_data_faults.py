"""Bad inputs and faults in the data layer: shard building, verification, reading (issue 15).

Real shards from the real builder, real damage (truncation, a flipped byte), a real file-size limit
standing in for a full disk (RLIMIT_FSIZE gives EFBIG where a full disk gives ENOSPC: the same
write path fails), a real SIGTERM. tests/README.md lists the cases and what each gets.
"""
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BUILD, ROOT, bomb_png, png_bytes
from test_reliability import one_line_error
from test_train import ENV


def build(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILD), *args], capture_output=True, text=True, timeout=300, **kw)


def a2b_train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", "configs/test.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name or ".tmp" in p.name)


def test_folder_builder_names_an_image_whose_header_claims_too_many_pixels(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"ok{i}.png").write_bytes(png_bytes())
    (images / "bomb.png").write_bytes(bomb_png())
    proc = build("folder", "--images", str(images), "--role", "healthy", "--out", str(tmp_path / "out"),
                 "--size", "32", "--channels", "1")
    one_line_error(proc.returncode, proc.stderr, str(images / "bomb.png"), "400,000,000 pixels", "decompression bomb")
    assert not (tmp_path / "out").exists()


def damaged_copy(sim_shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    data = Path(shutil.copytree(sim_shards, tmp_path / "data"))
    shard = sorted((data / "mixed").glob("*.tar"))[0]
    return data, shard


def test_skip_corrupt_trains_past_a_truncated_shard(sim_shards, tmp_path):
    data, shard = damaged_copy(sim_shards, tmp_path)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    # Without skip_corrupt: one line naming the shard and the option; no run folder.
    proc = a2b_train(f"data.root={data}", f"train.run_dir={tmp_path / 'run'}")
    one_line_error(proc.returncode, proc.stderr, str(shard), "truncated", "skip_corrupt")
    assert not (tmp_path / "run").exists()
    # With it: trains to the end, the lost samples counted in the metrics.
    proc = a2b_train(f"data.root={data}", f"train.run_dir={tmp_path / 'run'}", "data.skip_corrupt=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-1].get("skipped_corrupt", 0) > 0, rows[-1]


def flip_a_byte(shard: Path) -> None:
    """Change one byte of the first member's data (the tar headers, the size and the count stay)."""
    with open(shard, "r+b") as f:
        f.seek(512 + 40)
        byte = f.read(1)
        f.seek(512 + 40)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_finds_a_changed_byte_that_size_and_count_miss(sim_shards, tmp_path):
    proc = build("verify", str(sim_shards))
    assert proc.returncode == 0 and proc.stdout.count(": ok,") == 4, proc.stdout
    data, shard = damaged_copy(sim_shards, tmp_path)
    flip_a_byte(shard)
    proc = build("verify", str(data))
    assert proc.returncode == 1 and proc.stdout.count(": ok,") == 3, proc.stdout
    assert f"{shard}: sha256 differs" in proc.stdout and "DAMAGED" in proc.stdout and "Traceback" not in proc.stderr
    proc = build("verify", str(data / "mixed"))   # one role folder
    assert proc.returncode == 1 and "sha256 differs" in proc.stdout
    proc = build("verify", str(tmp_path / "nothing"))
    one_line_error(proc.returncode, proc.stderr, str(tmp_path / "nothing"), "role folder")
    # Training with data.verify=sha256 refuses the role before making a run folder.
    proc = a2b_train(f"data.root={data}", f"train.run_dir={tmp_path / 'run'}", "data.verify=sha256")
    one_line_error(proc.returncode, proc.stderr, str(shard), "sha256 differs")
    assert not (tmp_path / "run").exists()
    proc = a2b_train(f"data.root={data}", f"train.run_dir={tmp_path / 'run'}", "data.verify=md5")
    one_line_error(proc.returncode, proc.stderr, "data.verify", "size, count, sha256")


def test_a_build_that_runs_out_of_space_leaves_nothing(tmp_path):
    """The third shard's write fails (EFBIG under a file-size limit, as ENOSPC on a full disk); the
    cleanup, which writes the end-of-archive blocks again, must not raise a second time."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    proc = build("simulated", "--source", "mnist5k", "--size", "32", "--scale", "0.05", "--maxcount", "30",
                 "--out", str(out), preexec_fn=small_files)
    one_line_error(proc.returncode, proc.stderr, "could not write", "File too large", "partial output was removed")
    assert not out.exists()
    # Into an existing folder: the folder and what it held stay as they were.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = build("simulated", "--source", "mnist5k", "--size", "32", "--scale", "0.05", "--maxcount", "30",
                 "--out", str(out), preexec_fn=small_files)
    one_line_error(proc.returncode, proc.stderr, "could not write")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_sigterm_during_a_build_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(BUILD), "simulated", "--source", "phantom", "--size", "64",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and leftovers(out)):
        time.sleep(0.2)
    assert out.exists() and leftovers(out), "the build never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM; no output written" in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_sample_that_turned_corrupt_mid_run_saves_the_last_completed_step(sim_shards, tmp_path):
    """A shard altered after its check (same size, so the open-time count check passes): training
    stops at the step that would read it, with one line naming the shard, after saving a checkpoint
    of the last completed step (as SIGTERM does), which then resumes."""
    import tarfile

    from a2b_dist import checkpoint as ckpt

    data, _ = damaged_copy(sim_shards, tmp_path)
    shard = sorted((data / "mixed").glob("*.tar"))[-1]
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][-1]
    with open(shard, "r+b") as f:              # the PNG's bytes after its signature, zeroed in place
        f.seek(member.offset_data + 8)
        f.write(b"\0" * (member.size - 8))
    run_dir = tmp_path / "run"
    common = [f"data.root={data}", f"train.run_dir={run_dir}", "train.log_every=1", "train.sample_every=0",
              "train.checkpoint_every=1000"]
    proc = a2b_train(*common, "train.steps=40")
    line = one_line_error(proc.returncode, proc.stderr, str(shard), member.name.split(".")[0], "Saved")
    saved = ckpt.list_checkpoints(run_dir)
    assert len(saved) == 1, line
    step = ckpt.read_meta(saved[0])["step"]
    rows = [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step >= 1 and rows == list(range(1, step + 1))    # every completed step, and no other
    assert f"Saved {saved[0]} at step {step}, the last completed step" in line
    out = a2b_train(*common, "train.steps=40", "data.skip_corrupt=true", "--until-step", str(step + 1))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {saved[0]} at step {step}" in out.stdout + out.stderr
