"""Bad inputs and faults in training, checkpoints, evaluation, detection and export (issue 15).

Every bad input: a non-zero exit, one line naming the file, field or argument and what is allowed,
no traceback, nothing left behind. Every fault: what survives. Real processes, real shards, real
signals; the one simulated fault (a file size limit standing in for a full disk) is a real OS limit.
tests/README.md lists the cases and what each gets.
"""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2b_dist import checkpoint as ckpt
from a2b_dist import cli
from conftest import bomb_png, png_bytes
from test_train import ENV, ROOT, assert_same_weights, final_weights, run, train_cmd


def one_line_error(code, err: str, *needles: str) -> str:
    """The CLI's answer to a user mistake: non-zero, no traceback, one `error:` line naming things."""
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def a2b(argv: list[str], capsys) -> tuple[int, str]:
    """`a2b ...` in this process (argparse usage errors exit through SystemExit)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(sim_shards, tmp_path_factory) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8 (copy it before damaging it)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}"))
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def state_file(run_dir: Path, step: int) -> Path:
    return ckpt.step_dir(run_dir, step) / "state-00000-of-00001.safetensors"


# ---------------------------------------------------------------------------------------------
# Numbers that are not numbers

@pytest.mark.parametrize("override, field", [("optim.lr_g=.nan", "optim.lr_g"), ("loss.lambda_gp=.inf", "loss.lambda_gp"),
                                             ("loss.focus_eps=-.inf", "loss.focus_eps"),
                                             ("eval.topk_percent=.nan", "eval.topk_percent")])
def test_nan_and_infinity_in_the_config_are_refused(override, field, tmp_path, capsys):
    code, err = a2b(["train", "--config", "configs/test.yaml", override, f"train.run_dir={tmp_path / 'run'}"], capsys)
    one_line_error(code, err, field, "finite")
    assert not (tmp_path / "run").exists()


def test_detect_threshold_must_be_a_finite_number(run_copy, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    for args, named in ((["--threshold", "nan"], "--threshold"), (["--threshold", "-inf"], "--threshold"),
                        (["eval.topk_percent=inf"], "eval.topk_percent")):
        code, err = a2b(["detect", "--checkpoint", str(run_copy), "--images", str(images), "--out",
                         str(tmp_path / "out"), *args], capsys)
        one_line_error(code, err, named)
    assert not (tmp_path / "out").exists()


def test_detect_refuses_a_missing_device_and_an_out_that_is_a_file(run_copy, tmp_path, capsys):
    import torch

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    if not torch.cuda.is_available():
        code, err = a2b(["detect", "--checkpoint", str(run_copy), "--images", str(images), "--out",
                         str(tmp_path / "out"), "--device", "cuda"], capsys)
        one_line_error(code, err, "--device", "no CUDA device")
    code, err = a2b(["detect", "--checkpoint", str(run_copy), "--images", str(images), "--out",
                     str(tmp_path / "out"), "--device", "tpu:9"], capsys)
    one_line_error(code, err, "--device")
    (tmp_path / "file").write_text("x")
    code, err = a2b(["detect", "--checkpoint", str(run_copy), "--images", str(images), "--out",
                     str(tmp_path / "file" / "out")], capsys)
    one_line_error(code, err, "--out", "is a file")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_an_out_that_is_a_file(run_copy, sim_shards, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    code, err = a2b(["evaluate", "--checkpoint", str(run_copy), "--shards", str(sim_shards / "test"),
                     "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, "--out", "is a file")
    assert (tmp_path / "out").read_text() == "x"


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints

def test_truncated_checkpoint_is_named_by_evaluate_detect_and_export(run_copy, sim_shards, tmp_path, capsys):
    damaged = state_file(run_copy, 8)
    damaged.write_bytes(damaged.read_bytes()[:-100])
    step8 = str(ckpt.step_dir(run_copy, 8))
    code, err = a2b(["export", step8, str(tmp_path / "g.pt")], capsys)
    one_line_error(code, err, str(damaged), "damaged")
    assert list(tmp_path.glob("*g.pt*")) == []
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    code, err = a2b(["detect", "--checkpoint", step8, "--images", str(images), "--out", str(tmp_path / "d")], capsys)
    one_line_error(code, err, str(damaged))
    proc = run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", step8, "--shards",
                str(sim_shards / "test"), "--out", str(tmp_path / "e")], check=False)
    one_line_error(proc.returncode, proc.stderr, str(damaged))
    # A run folder means its newest loadable checkpoint: the damaged one is reported and skipped.
    code, err = a2b(["export", str(run_copy), str(tmp_path / "g.pt")], capsys)
    assert code == 0 and f"skipping damaged checkpoint {ckpt.step_dir(run_copy, 8)}" in err
    import torch
    assert torch.load(tmp_path / "g.pt", weights_only=True)["step"] == 4


def test_flipped_byte_is_caught_by_the_recorded_hash(run_copy):
    damaged = state_file(run_copy, 8)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF                                  # same size, header intact: only the hash can tell
    damaged.write_bytes(bytes(data))
    problem = ckpt.checkpoint_problem(ckpt.step_dir(run_copy, 8))
    assert problem is not None and str(damaged) in problem and "SHA-256" in problem
    assert ckpt.checkpoint_problem(ckpt.step_dir(run_copy, 4)) is None


@pytest.mark.parametrize("damage", ["truncated state", "corrupt meta.json"])
def test_resume_auto_falls_back_to_the_newest_loadable_checkpoint(run_copy, sim_shards, damage):
    if damage == "truncated state":
        state_file(run_copy, 8).write_bytes(state_file(run_copy, 8).read_bytes()[:50])
        named = state_file(run_copy, 8)
    else:
        (ckpt.step_dir(run_copy, 8) / "meta.json").write_text('{"step": 8, "form')
        named = ckpt.step_dir(run_copy, 8) / "meta.json"
    out = run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_copy}", "train.steps=10",
                        "optim.decay_steps=2"))
    text = out.stdout + out.stderr
    assert f"skipping damaged checkpoint {ckpt.step_dir(run_copy, 8)}" in text and str(named) in text
    assert f"resumed from {ckpt.step_dir(run_copy, 4)} at step 4" in text
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_copy))["step"] == 10


def test_meta_without_config_is_named(run_copy, capsys, tmp_path):
    meta_path = ckpt.step_dir(run_copy, 8) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]
    meta_path.write_text(json.dumps(meta))
    code, err = a2b(["export", str(ckpt.step_dir(run_copy, 8)), str(tmp_path / "g.pt")], capsys)
    one_line_error(code, err, str(meta_path), "'config'")


def test_export_to_an_existing_folder_leaves_nothing(run_copy, tmp_path, capsys):
    target = tmp_path / "exports"
    target.mkdir()
    code, err = a2b(["export", str(run_copy), str(target)], capsys)
    one_line_error(code, err, str(target), "is a folder")
    assert list(target.iterdir()) == [] and list(tmp_path.glob("*.tmp*")) == []


# ---------------------------------------------------------------------------------------------
# Resume and start

def test_resume_with_another_model_names_the_fields(run_copy, sim_shards):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    proc = run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_copy}", "train.steps=12",
                         "model.width=16", "model.res_blocks=2"), check=False)
    line = one_line_error(proc.returncode, proc.stderr, "model.width=8 (this run: 16)", "model.res_blocks=1")
    assert "resume with the checkpoint's values" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before   # nothing touched


def test_failed_start_leaves_no_run_folder(tmp_path):
    proc = run(train_cmd(1, f"data.root={tmp_path / 'no-shards'}", f"train.run_dir={tmp_path / 'run'}"),
               check=False)
    one_line_error(proc.returncode, proc.stderr, "no-shards")
    assert not (tmp_path / "run").exists()


def test_failed_checkpoint_write_leaves_no_partial_folder(sim_shards, trained, tmp_path):
    """A real OS limit on file size (RLIMIT_FSIZE, SIGXFSZ ignored) makes the checkpoint's largest
    file fail with EFBIG, as a full disk would with ENOSPC, while the small files still write."""
    limit = state_file(trained, 4).stat().st_size // 2
    others = [p.stat().st_size for p in trained.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert max(others) < limit, "the run's other files must fit under the limit for this test"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    run_dir = tmp_path / "run"
    cmd = train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=small_files,
                          env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"})
    one_line_error(proc.returncode, proc.stderr, f"could not write checkpoint {ckpt.step_dir(run_dir, 4)}",
                   "File too large")
    assert list((run_dir / "checkpoints").iterdir()) == []


def test_metrics_hold_one_history_after_a_crash_and_resume(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={sim_shards}", f"train.run_dir={run_dir}", "train.log_every=1"]
    # The process SIGKILLs itself while writing the step-8 checkpoint: rows 5-8 are logged, then rerun.
    proc = run(train_cmd(1, *args), env={**ENV, "A2B_FAULT_KILL_IN_CHECKPOINT": "8"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    run(train_cmd(1, *args))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


# ---------------------------------------------------------------------------------------------
# SIGTERM: scancel, time limits, preemption without --signal

def test_sigterm_to_a_two_process_run_saves_and_resumes_exactly(sim_shards, tmp_path):
    common = [f"data.root={sim_shards}", "train.steps=400", "train.checkpoint_every=1000", "train.log_every=1",
              "train.sample_every=0", "data.num_workers=1"]
    run(train_cmd(2, *common, f"train.run_dir={tmp_path / 'full'}"))

    run_dir = tmp_path / "split"
    log = open(tmp_path / "split.log", "w")
    proc = subprocess.Popen(train_cmd(2, *common, f"train.run_dir={run_dir}"), cwd=ROOT, env=ENV, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal; raise train.steps"
    os.killpg(proc.pid, signal.SIGTERM)   # as SLURM signals every process of the job step
    proc.wait(timeout=300)
    log.close()
    text = (tmp_path / "split.log").read_text()
    saved = ckpt.list_checkpoints(run_dir)
    assert len(saved) == 1, text[-3000:]
    step = ckpt.read_meta(saved[0])["step"]
    assert 3 <= step < 400 and "caught SIGTERM" in text and f"stopped by SIGTERM at step {step}" in text

    out = run(train_cmd(2, *common, f"train.run_dir={run_dir}"))
    assert f"at step {step}" in out.stdout + out.stderr
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(run_dir))


def test_detect_names_an_image_whose_header_claims_too_many_pixels(run_copy, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    (images / "bomb.png").write_bytes(bomb_png())
    code, err = a2b(["detect", "--checkpoint", str(run_copy), "--images", str(images), "--out", str(tmp_path / "out")],
                    capsys)
    one_line_error(code, err, str(images / "bomb.png"), "400,000,000 pixels", "decompression bomb")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# One writer per run folder (issue 26)

def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_training_into_a_held_run_folder_names_the_holder(sim_shards, tmp_path):
    """Two real trainings into one train.run_dir: the second stops with one line naming the first
    (host, pid) and writes nothing; the first trains on alone, every step once in metrics.jsonl."""
    run_dir = tmp_path / "run"
    common = [f"data.root={sim_shards}", f"train.run_dir={run_dir}", "train.log_every=1", "train.sample_every=0"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(train_cmd(1, *common, "train.steps=400", "train.checkpoint_every=1000"), cwd=ROOT,
                             env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended too soon; raise train.steps"
        before = files_of(run_dir)
        second = run(train_cmd(1, *common, "train.steps=400"), check=False)
        one_line_error(second.returncode, second.stderr, f"train.run_dir {run_dir} is in use",
                       f"pid {first.pid}", f"host {socket.gethostname()}")
        after = files_of(run_dir)
        # No second event file or checkpoint; config, launch record and lock as the first wrote them
        # (metrics.jsonl and the first run's event file grow meanwhile: the first run is training).
        assert after.keys() == before.keys()
        for name in ("config.yaml", "launches.jsonl", ".a2b-run.lock"):
            assert after[name] == before[name], name
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert len((run_dir / "launches.jsonl").read_text().splitlines()) == 1


HOLD = """
import sys, time
from a2b_dist.files import hold_folder
with hold_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_left_by_a_killed_holder_is_not_in_the_way(run_copy, sim_shards):
    """A process holding the run folder (the library's lock, as train() takes it) refuses a resume;
    once it is SIGKILLed (a crash, a SLURM node failure) the kernel drops its lock and a restart
    resumes in the same folder, as a requeued job does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_copy)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files_of(run_copy)
        args = [f"data.root={sim_shards}", f"train.run_dir={run_copy}", "train.steps=10", "optim.decay_steps=2"]
        proc = run(train_cmd(1, *args), check=False)
        one_line_error(proc.returncode, proc.stderr, f"pid {holder.pid}", "is in use")
        assert files_of(run_copy) == before
    finally:
        holder.kill()
        holder.wait()
    out = run(train_cmd(1, *args))
    assert f"resumed from {ckpt.step_dir(run_copy, 8)} at step 8" in out.stdout + out.stderr
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_copy))["step"] == 10


# ---------------------------------------------------------------------------------------------
# Outputs: one generation per folder, unwritable places named before the work (issue 26)

UNWRITABLE = Path("/sys/a2b-test-out")   # refused even to root (EPERM, EACCES or EROFS by the kernel)


@pytest.fixture
def generators(sim_shards, tmp_path) -> tuple[Path, Path]:
    """Two exports of different weights (steps 7 and 9): two evaluations tell apart by every file."""
    from conftest import export_generator, make_eval_config

    cfg = make_eval_config(sim_shards, tmp_path / "run")
    return (export_generator(tmp_path / "g0.pt", cfg, seed=0, step=7),
            export_generator(tmp_path / "g1.pt", cfg, seed=1, step=9))


def evaluate_cmd(gen: Path, shards: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(gen), "--shards",
            str(shards / "test"), "--out", str(out), "--num-maps", "2"]


def test_a_killed_reevaluation_leaves_the_previous_generation_whole(generators, sim_shards, tmp_path):
    """A re-evaluation into an existing --out, SIGKILLed (1) from outside while it scores and (2) by
    itself after writing every new file but before the swap: --out still holds the first
    evaluation's files, byte for byte; the next run removes the dead runs' staging folders and
    swaps its own generation in whole."""
    g0, g1 = generators
    out = tmp_path / "eval"
    run(evaluate_cmd(g0, sim_shards, out))
    first = files_of(out)
    assert json.loads(first["metrics.json"])["step"] == 7

    proc = subprocess.Popen(evaluate_cmd(g1, sim_shards, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    staging = tmp_path / f".eval.staging-{proc.pid}"
    deadline = time.time() + 300
    while not staging.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the re-evaluation ended before the kill"
    proc.kill()
    proc.wait()
    assert files_of(out) == first

    proc = run(evaluate_cmd(g1, sim_shards, out), env={**ENV, "A2B_FAULT_KILL_BEFORE_SWAP": "1"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert files_of(out) == first
    # It removed the first killed run's staging folder on start; its own, beside --out and never
    # inside it, holds every new file (step 9) that the kill kept out of --out.
    (left,) = tmp_path.glob(".eval.staging-*")
    assert left != staging and json.loads((left / "metrics.json").read_text())["step"] == 9

    run(evaluate_cmd(g1, sim_shards, out))
    second = files_of(out)
    assert json.loads(second["metrics.json"])["step"] == 9
    assert second.keys() <= first.keys() | {"groups.csv"} and second["scores.csv"] != first["scores.csv"]
    assert not any(p.name.startswith(".eval.") for p in tmp_path.iterdir())   # no staging or old folder left


def test_evaluate_and_detect_refuse_unwritable_outputs_before_the_work(generators, sim_shards, tmp_path, capsys):
    """Unwritable --out: under a folder nobody may write (/sys, even as root), under a file, and
    (not as root, who may write anywhere) under a read-only folder or an existing read-only --out.
    One line naming the place, before anything is scored; nothing left beside it."""
    g0, _ = generators
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    (tmp_path / "file").write_text("x")
    places = [(tmp_path / "file" / "out", "is a file")]
    if Path("/sys").is_dir():
        places.append((UNWRITABLE, str(UNWRITABLE)))
    if os.geteuid() != 0:   # root writes into 0o555 folders: these two run for other users only
        locked = tmp_path / "locked"
        locked.mkdir()
        (locked / "old").mkdir()
        (locked / "old" / "metrics.json").write_text("{}")
        os.chmod(locked / "old", 0o555)
        os.chmod(locked, 0o555)
        places += [(locked / "new", str(locked)), (locked / "old", "not writable")]
    try:
        for out, named in places:
            code, err = a2b(["evaluate", "--checkpoint", str(g0), "--shards", str(sim_shards / "test"),
                             "--out", str(out)], capsys)
            one_line_error(code, err, "--out", named)
            code, err = a2b(["detect", "--checkpoint", str(g0), "--images", str(images), "--out", str(out)], capsys)
            one_line_error(code, err, "--out", named)
    finally:
        if os.geteuid() != 0:
            os.chmod(tmp_path / "locked", 0o755)
            os.chmod(tmp_path / "locked" / "old", 0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["g0.pt", "g1.pt", "images", "file"] + (["locked"] if os.geteuid() != 0 else []))


def test_export_to_an_unwritable_place_is_one_line(run_copy, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    targets = [(tmp_path / "file" / "g.pt", str(tmp_path / "file" / "g.pt"))]
    if Path("/sys").is_dir():
        targets.append((UNWRITABLE / "g.pt", str(UNWRITABLE / "g.pt")))
    if os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o555)
        targets.append((tmp_path / "locked" / "g.pt", str(tmp_path / "locked" / "g.pt")))
    for target, named in targets:
        code, err = a2b(["export", str(run_copy), str(target)], capsys)
        one_line_error(code, err, named)
    assert not list(tmp_path.rglob("*.pt*"))


def test_an_out_holding_other_files_is_not_replaced(generators, sim_shards, tmp_path, capsys):
    """--out swaps in a whole folder, so an existing --out must be an earlier run's: a folder with
    anything else (a mistyped --out pointing at a run folder) is refused and left as it was."""
    g0, _ = generators
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = a2b(["evaluate", "--checkpoint", str(g0), "--shards", str(sim_shards / "test"), "--out", str(out)],
                    capsys)
    one_line_error(code, err, "--out", "'notes.txt'", "does not write")
    assert files_of(out) == {"notes.txt": b"mine"} and not list(tmp_path.glob(".somewhere.*"))


def test_an_old_generation_moved_away_by_a_killed_swap_is_put_back(tmp_path):
    """A kill between the swap's two renames leaves --out missing and the previous generation at
    .OUT.old-PID; the next run puts it back before it starts."""
    from a2b_dist.files import StagedFolder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out.old-{dead.pid}"
    old.mkdir()
    (old / "metrics.json").write_text('{"step": 7}')
    stage = StagedFolder(tmp_path / "out", "--out", "a2b evaluate", ("metrics.json",))
    stage.prepare()
    assert (tmp_path / "out" / "metrics.json").read_text() == '{"step": 7}' and not old.exists()
    stage.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_detect_refuses_an_out_inside_its_images(generators, tmp_path, capsys):
    """--out equal to --images, inside it, or inside it through a symlink: one line naming both,
    before anything is read or written (a second run would score its own panels)."""
    g0, _ = generators
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.png").write_bytes(png_bytes())
    (tmp_path / "link").symlink_to(images)
    before = files_of(images)
    for out in (images, images / "out", images / "sub" / "deeper", tmp_path / "link" / "out"):
        code, err = a2b(["detect", "--checkpoint", str(g0), "--images", str(images), "--out", str(out), "--maps"],
                        capsys)
        one_line_error(code, err, f"--out {out}", f"--images {images}")
    assert files_of(images) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g0.pt", "g1.pt", "images", "link"]
