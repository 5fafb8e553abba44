"""sweeps/tune.py with a real local Ray and real (tiny) training: an ASHA sweep killed part-way and
resumed without rerunning finished trials, its table, best.yaml and `a2b train` on it; a PBT sweep
scored by FID with stand-in Inception weights; argument errors; the search space as units.

About 3 minutes on 2 CPU cores: each sweep starts its own local Ray and trains trials of 4-6 steps
at 32 px."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from a2b_dist.config import Config, ConfigError, load_config, to_dict
from a2b_dist.sweeps import space as search_space
from a2b_dist.sweeps.trial import LR, apply_params
from a2b_dist.sweeps import tune

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "sweeps" / "tune.py"
# Six steps, an evaluation (a report with its checkpoint) every two: three reports per trial.
TINY = ["train.steps=6", "optim.decay_steps=2", "eval.every=2", "train.sample_every=0", "train.log_every=2"]


def sweep_env(mark: str = "") -> dict:
    # A local test cluster needs no token; the mark finds this sweep's Ray processes afterwards.
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "A2B_SWEEP_TEST_MARK": mark or uuid.uuid4().hex}


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, str(TUNE), *args]


def kill_marked(mark: str) -> None:
    """SIGKILL the Ray processes the killed driver left behind (found by the mark in their environment)."""
    needle = f"A2B_SWEEP_TEST_MARK={mark}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def trial_state(exp: Path) -> dict[str, tuple[str, str]]:
    """Ray's record of each trial, read from the experiment state file as a restore reads it:
    trial id -> (status, the checkpoint folder of its last result, where it would continue from)."""
    state: dict[str, tuple[str, str]] = {}
    for path in exp.glob("experiment_state-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):   # being rewritten
            continue
        for entry in data["trial_data"]:
            trial, run = json.loads(entry[0]), json.loads(entry[1])
            state[trial["trial_id"]] = (trial["status"], (run.get("last_result") or {}).get("checkpoint_dir_name"))
    return state


def trial_status(exp: Path) -> dict[str, str]:
    return {t: s for t, (s, _) in trial_state(exp).items()}


def launches(exp: Path, trial_id: str) -> list[list[str]]:
    """argv of every train() call of a trial (the trainer appends one line to launches.jsonl per call)."""
    path = exp / "runs" / trial_id / "launches.jsonl"
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()] if path.is_file() else []


def read_table(exp: Path) -> list[dict]:
    with open(exp / "trials.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Search space and base config (no Ray)

def _get_default(key):
    obj = Config()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def test_default_space_centres_on_the_config_and_file_matches():
    cfg = load_config(str(ROOT / "configs" / "test.yaml"))          # lambda_fs 0.001, the simulated value
    space = search_space.default_space(cfg)
    assert set(space) == {*search_space.LOSS_WEIGHTS, LR, *search_space.LEVERS}
    assert all(space[k].dist == "loguniform" for k in (*search_space.LOSS_WEIGHTS, LR))
    for key, values in search_space.LEVERS.items():                       # each lever can be switched off
        assert space[key].dist == "choice" and _get_default(key) in space[key].values
    fs = space["loss.lambda_fs"]
    assert fs.low == pytest.approx(1e-4) and fs.high == pytest.approx(1e-2)
    assert space["loss.lambda_f"].low == pytest.approx(0.01) and space["loss.lambda_f"].high == pytest.approx(1.0)
    assert space[LR].low < 1e-4 < space[LR].high
    # The shipped example is the default space for the paper's X-ray values.
    assert search_space.load_space(ROOT / "sweeps" / "search_space.yaml") == search_space.default_space(Config())


def test_search_space_mistakes_name_the_entry(tmp_path):
    base = to_dict(Config())
    with pytest.raises(ConfigError, match="loss.lambda_nope"):
        search_space.check_space(search_space.parse_space({"loss.lambda_nope": {"dist": "uniform", "low": 0, "high": 1}}, "x"),
                          base)
    with pytest.raises(ConfigError, match="loss.lambda_rec.*out of range"):
        search_space.check_space(search_space.parse_space({"loss.lambda_rec": {"dist": "uniform", "low": -1, "high": 1}}, "x"),
                          base)
    with pytest.raises(ConfigError, match="model.upsample"):
        search_space.check_space(search_space.parse_space({"model.upsample": {"dist": "choice", "values": ["transpose", "cubic"]}},
                                            "x"), base)
    for bad, words in [({"loss.lambda_id": {"dist": "gauss", "low": 0, "high": 1}}, "dist: one of"),
                       ({"loss.lambda_id": {"dist": "loguniform", "low": 0, "high": 1}}, "low > 0"),
                       ({"loss.lambda_id": {"dist": "uniform", "low": 2, "high": 1}}, "low < high"),
                       ({"loss.lambda_id": {"dist": "uniform", "low": 0}}, "exactly low and high"),
                       ({"loss.lambda_id": {"dist": "uniform", "low": float("nan"), "high": 1}}, "finite numbers"),
                       ({"loss.lambda_id": {"dist": "loguniform", "low": 1e-3, "high": float("inf")}}, "finite"),
                       ([1, 2], "non-empty mapping")]:
        with pytest.raises(ConfigError, match=words):
            search_space.parse_space(bad, "space.yaml")
    (tmp_path / "nan.yaml").write_text("loss.lambda_id: {dist: uniform, low: .nan, high: 1}\n")
    with pytest.raises(ConfigError, match=r"nan.yaml: loss.lambda_id: low and high must be finite"):
        search_space.load_space(tmp_path / "nan.yaml")
    (tmp_path / "s.yaml").write_text("optim.lr: {dist: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
                                     "model.upsample: {dist: choice, values: [transpose, nearest]}\n")
    space = search_space.load_space(tmp_path / "s.yaml")
    search_space.check_space(space, base)
    cfg = apply_params(base, {"optim.lr": 3e-4, "model.upsample": "nearest"}, tmp_path / "run")
    assert cfg.optim.lr_g == cfg.optim.lr_d == 3e-4 and cfg.model.upsample == "nearest"
    assert cfg.train.run_dir == str(tmp_path / "run")


def test_base_config_for_trials(tmp_path):
    cfg = load_config(None, ["data.root=rel/data", "train.steps=1000", "optim.decay_steps=400", "eval.every=0"])
    base = search_space.prepare_base(cfg, metric="fid", seed=5, max_steps=100)
    assert Path(base.data.root).is_absolute() and base.data.root.endswith("rel/data")
    assert base.train.steps == 100 and base.optim.decay_steps == 40        # decay scaled with the steps
    assert base.eval.every == 25 == base.train.checkpoint_every             # four reports, each with a checkpoint
    assert base.eval.metric == "fid" and base.train.seed == 5


# ---------------------------------------------------------------------------------------------
# Argument errors: one line naming the argument, exit 2, no traceback

@pytest.mark.parametrize("args, words", [
    (["--metric", "val_auc", "--num-samples", "0"], "--num-samples"),
    (["--metric", "val_auc", "--search-space", "nope.yaml"], "--search-space nope.yaml"),
    (["--metric", "val_auc", "--address", "not an address"], "--address"),
    (["--metric", "val_auc", "--gpus-per-trial", "1.5"], "--gpus-per-trial"),
    (["--metric", "val_auc", "--gpus-per-trial", "2", "--workers-per-trial", "3"], "--workers-per-trial"),
    (["--metric", "val_auc", "data.root=/nonexistent"], "no mixed shards at /nonexistent/mixed"),
    (["--metric", "fid", "eval.fid_weights=/nonexistent/w.pth"], "/nonexistent/w.pth"),
    (["--metric", "val_auc", "--resume", "--name", "never-ran"], "--resume: no sweep to continue"),
])
def test_bad_arguments(args, words, sim_shards, tmp_path, capsys):
    from a2b_dist.errors import run_guarded

    argv = ["--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}", "--storage", str(tmp_path),
            *args]
    assert run_guarded(tune.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert not list(tmp_path.iterdir())                       # nothing started, nothing written


@pytest.mark.parametrize("args, words", [
    (["--metric", "auc"], "argument --metric: invalid choice: 'auc'"),
    (["--metric", "val_auc", "loss.lambda_rec=-1"], "loss.lambda_rec=-1.0 is out of range"),
])
def test_bad_arguments_from_the_command_line(args, words, sim_shards, tmp_path):
    cmd = tune_cmd("--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}",
                   "--storage", str(tmp_path), *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=sweep_env(), timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr


def test_more_gpus_than_the_cluster_has(sim_shards, tmp_path):
    # Multi-GPU trials go through Ray Train's TorchTrainer; here Ray starts and says it has no GPU.
    proc = subprocess.run(tune_cmd("--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}",
                                   "--metric", "val_auc", "--gpus-per-trial", "2", "--storage", str(tmp_path)),
                          capture_output=True, text=True, env=sweep_env(), timeout=600)
    assert proc.returncode == 2
    assert "error: --gpus-per-trial 2: the Ray cluster has 0 GPUs" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Real sweeps

def test_asha_sweep_killed_then_resumed_and_best_config_trains(sim_shards, tmp_path):
    args = ["--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}", *TINY,
            "--metric", "val_auc", "--num-samples", "4", "--scheduler", "asha",
            "--storage", str(tmp_path / "sweeps"), "--name", "asha"]
    exp = tmp_path / "sweeps" / "asha"
    mark = uuid.uuid4().hex
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(tune_cmd(*args), stdout=log, stderr=subprocess.STDOUT, env=sweep_env(mark))

    # Kill the driver (SIGKILL: no chance to clean up) once Ray has recorded a finished trial
    # while others still run or wait.
    deadline = time.time() + 600
    try:
        while True:
            status = trial_status(exp)
            done = [t for t, s in status.items() if s == "TERMINATED"]
            if done and len(status) == 4 and len(done) < 4:
                break
            assert driver.poll() is None, f"the sweep ended before it could be killed:\n{_tail(tmp_path / 'first.log')}"
            if time.time() > deadline:   # a hang guard, not a speed check
                pytest.fail(f"no trial finished in time:\n{_tail(tmp_path / 'first.log')}")
            time.sleep(0.3)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_marked(mark)
        log.close()
    time.sleep(1)
    kill_marked(mark)

    # What a rerun must leave alone: the finished trials' results and their single train() call
    # (Ray's record as the killed sweep left it on disk).
    state = trial_state(exp)
    status = {t: s for t, (s, _) in state.items()}
    done = [t for t, s in status.items() if s == "TERMINATED"]
    unfinished = set(status) - set(done)
    assert done and unfinished, status
    results_before = {t: (exp / f"trial_{t}" / "result.json").read_bytes() for t in done}
    assert all(len(launches(exp, t)) == 1 for t in done)

    proc = subprocess.run(tune_cmd(*args, "--resume"), capture_output=True, text=True, env=sweep_env(),
                          timeout=900)
    (tmp_path / "resume.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _tail(tmp_path / "resume.log")
    assert "4 trials of sweep asha, best first (val_auc, higher is better)" in proc.stdout

    # Finished trials were not run again; the others ran to their end, from their last checkpoint.
    for t in done:
        assert (exp / f"trial_{t}" / "result.json").read_bytes() == results_before[t]
        assert len(launches(exp, t)) == 1
    for t in unfinished:
        calls = launches(exp, t)
        assert calls, f"trial {t} never trained"
        checkpoint = state[t][1]
        assert calls[-1][2] == (f"resume={exp}/trial_{t}/{checkpoint}" if checkpoint else "resume=none"), calls
    # (Ray's experiment-state file is written periodically, so it may still say RUNNING after the
    # driver has returned; the table below comes from the finished run's results and is the record.)

    # The table, printed and saved, sorted by the metric.
    rows = read_table(exp)
    assert {r["trial"] for r in rows} == set(status) and len(rows) == 4
    assert all(r["status"] in ("completed", "stopped early") for r in rows)
    best = [float(r["best_val_auc"]) for r in rows]
    assert best == sorted(best, reverse=True)
    assert {"loss.lambda_rec", "loss.lambda_id", "loss.lambda_f", "loss.lambda_fs", "loss.lambda_fz",
            "optim.lr"} <= set(rows[0])
    for r in rows:
        assert r["trial"] in proc.stdout
    assert (exp / "metric_vs_params.png").stat().st_size > 0

    # best.yaml: the best trial's config, absolute data root, a fresh run folder; a2b train runs it.
    cfg = load_config(str(exp / "best.yaml"))
    assert cfg.data.root == str(sim_shards) and not Path(cfg.train.run_dir).exists()
    assert cfg.loss.lambda_rec == pytest.approx(float(rows[0]["loss.lambda_rec"]), rel=1e-3)
    assert cfg.optim.lr_g == cfg.optim.lr_d == pytest.approx(float(rows[0]["optim.lr"]), rel=1e-3)
    train = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", str(exp / "best.yaml")],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (Path(cfg.train.run_dir) / "checkpoints" / "step-000000006" / "meta.json").is_file()


def test_pbt_sweep_by_fid_with_standin_weights(sim_shards, standin_fid_weights, tmp_path):
    exp = tmp_path / "sweeps" / "fid"
    proc = subprocess.run(
        tune_cmd("--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}", *TINY,
                 f"eval.fid_weights={standin_fid_weights}", "eval.fid_dims=64", "eval.fid_samples=8",
                 "--metric", "fid", "--num-samples", "2", "--scheduler", "pbt", "--seed", "3",
                 "--storage", str(tmp_path / "sweeps"), "--name", "fid"),
        capture_output=True, text=True, env=sweep_env(), timeout=900)
    (tmp_path / "pbt.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _tail(tmp_path / "pbt.log")
    assert "2 trials of sweep fid, best first (fid, lower is better)" in proc.stdout
    rows = read_table(exp)
    fids = [float(r["best_fid"]) for r in rows]
    assert len(rows) == 2 and fids == sorted(fids) and all(f > 0 for f in fids)
    assert load_config(str(exp / "best.yaml")).eval.metric == "fid"
    # PBT exploited: one trial went on from the other's checkpoint, with perturbed values.
    ids = [r["trial"] for r in rows]
    clones = [(t, argv) for t in ids for argv in launches(exp, t)[1:]
              if any(f"/trial_{o}/checkpoint_" in argv[2] for o in ids if o != t)]
    assert clones, {t: launches(exp, t) for t in ids}
    trial, argv = clones[0]
    assert argv[3:] != launches(exp, trial)[0][3:]                            # the values changed


def test_multi_process_trial_through_ray_train(sim_shards, tmp_path):
    # The --gpus-per-trial > 1 path (Ray Train's TorchTrainer, one train() per process) on 2 CPU processes.
    exp = tmp_path / "sweeps" / "ddp"
    proc = subprocess.run(
        tune_cmd("--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}", *TINY,
                 "train.steps=4", "--metric", "val_auc", "--num-samples", "1", "--scheduler", "none",
                 "--workers-per-trial", "2", "--cpus-per-trial", "0.5",
                 "--storage", str(tmp_path / "sweeps"), "--name", "ddp"),
        capture_output=True, text=True, env=sweep_env(), timeout=900)
    (tmp_path / "ddp.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, _tail(tmp_path / "ddp.log")
    [row] = read_table(exp)
    assert row["status"] == "completed" and row["evaluations"] == "2"
    [call] = [json.loads(line) for line in (exp / "runs" / row["trial"] / "launches.jsonl").read_text().splitlines()]
    assert call["world_size"] == 2
    # Both ranks wrote their share of the checkpoint Ray copied with the report.
    reported = sorted((exp / f"trial_{row['trial']}").glob("checkpoint_*"))[-1]
    assert json.loads((reported / "meta.json").read_text())["world_size"] == 2
    assert (reported / "rank-00001.json").is_file()


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
