"""jobs/submit.py and jobs/status.py without a SLURM cluster: argument checks, --dry-run,
--cluster local (2 gloo tasks through submitit's local executor) and debug, and the stop-and-save
path of a preempted task. tests/test_slurm.py runs the same launcher against a real cluster."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2b_dist import checkpoint as ckpt
from a2b_dist.jobs import launch, submit
from a2b_dist.signals import StopOnSignal

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = str(ROOT / "jobs" / "submit.py")
STATUS = str(ROOT / "jobs" / "status.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env or ENV, timeout=timeout)


def submit_args(shards: Path, run_dir: Path, *extra: str, steps: int = 8, every: int = 4) -> list[str]:
    """jobs/submit.py arguments for the test preset on these shards, `steps` steps."""
    return ["--config", "configs/test.yaml", f"data.root={shards}", f"train.steps={steps}",
            f"optim.decay_steps={min(4, steps)}", f"train.checkpoint_every={every}", "--run-dir", str(run_dir),
            *extra]


def events(run_dir: Path) -> list[dict]:
    return launch.read_events(run_dir)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def assert_replicas_agree(run_dir: Path, world_size: int, step: int) -> None:
    """Every rank wrote the digest of the weights it holds; all equal each other and the checkpoint."""
    replicas = launch.read_replicas(run_dir)
    assert [r["rank"] for r in replicas] == list(range(world_size)), replicas
    assert {r["step"] for r in replicas} == {step}
    newest = ckpt.latest_checkpoint(run_dir)
    assert ckpt.read_meta(newest)["step"] == step
    assert {r["digest"] for r in replicas} == {launch.checkpoint_digest(newest)}


def main_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    from a2b_dist.errors import run_guarded

    rc = run_guarded(submit.main, argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("extra, message", [
    (["--nodes", "2"], "--partition is required"),
    (["--partition", "gpu", "--nodes", "0"], "--nodes must be at least 1"),
    (["--partition", "gpu", "--gpus-per-node", "-1"], "--gpus-per-node must be 0 or more"),
    (["--partition", "gpu", "train.steps=0"], "train.steps=0 is out of range"),
    (["--partition", "gpu", "train.no_such_field=1"], "no_such_field"),
    (["--partition", "gpu", "--nodes", "3"], "train.batch_size=4 must be divisible by the number of tasks (3"),
    (["--cluster", "local", "--nodes", "2"], "runs on this machine only"),
    (["--partition", "gpu", "--resume", "/no/such/checkpoint"], "does not exist"),
    (["--partition", "gpu", "--mem-gb", "nan"], "--mem-gb must be a positive, finite number"),
    (["--partition", "gpu", "--mem-gb", "inf"], "--mem-gb must be a positive, finite number"),
    (["--partition", "gpu\n#SBATCH --wrap=id"], "--partition 'gpu\\n#SBATCH --wrap=id': only letters"),
    (["--partition", "gpu", "--account", "lab #SBATCH"], "--account"),
    (["--partition", "gpu", "--comment", "ok\n#SBATCH --uid=0"], "--comment"),
    (["--partition", "gpu", "--comment", "a # b"], "other than '#'"),
    (["--partition", "gpu", "--constraint", "h200\n"], "--constraint"),
    (["--partition", "gpu", "--exclude", "n1;rm"], "a host list"),
    (["--partition", "gpu", "--name", "x y"], "--name"),
    (["--partition", "gpu", "--qos", "high\r"], "--qos"),
    (["--partition", "gpu", "--run-dir", "runs/a\n#SBATCH --uid=0"], "--run-dir"),
])
def test_bad_arguments_fail_before_submission(sim_shards, tmp_path, capsys, extra, message):
    run_dir = tmp_path / "run"
    rc, out, err = main_in_process(submit_args(sim_shards, run_dir, *extra), capsys)
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not run_dir.exists()  # nothing was submitted, not even the run folder made


def test_missing_shards_and_the_real_command_print_one_line(tmp_path):
    proc = run([sys.executable, SUBMIT, "--config", "configs/test.yaml", f"data.root={tmp_path}/none",
                "--partition", "gpu", "--run-dir", str(tmp_path / "run")])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "Build the shards first" in proc.stderr and "shards/build.py simulated" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_config_and_sbatch_parameters(sim_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc, out, err = main_in_process(submit_args(sim_shards, run_dir, "--partition", "gpu", "--nodes", "2",
                                               "--gpus-per-node", "2", "--cpus-per-task", "3", "--mem-gb", "16",
                                               "--time", "90", "--account", "radiology", "--qos", "high",
                                               "--constraint", "h200", "--exclude", "n3", "--comment", "a b",
                                               "--name", "covid", "--dry-run"), capsys)
    assert rc == 0, err
    config, sbatch = out.split("# sbatch parameters")
    assert f"run_dir: {run_dir}" in config and f"root: {sim_shards}" in config and "steps: 8" in config
    for option in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2",
                   "--cpus-per-task=3", "--mem=16GB", "--time=90", "--account=radiology", "--qos=high",
                   "--constraint=h200", "--exclude=n3", "--comment=a b", "--job-name=covid",
                   "--signal=USR2@120", "--requeue"):
        assert option in sbatch, option
    assert "4 tasks" in sbatch and "nothing submitted" in sbatch
    assert not run_dir.exists()


def test_stop_flag_hands_over_to_the_handler_it_replaced():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        stop = StopOnSignal(launch.preempt_signal()).install()
        assert not stop()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert stop() and calls == []          # the signal only raised the flag
        stop.call_previous()
        assert calls == [signal.SIGUSR2]       # ... the old handler runs when the loop has saved
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_debug_cluster_runs_in_process(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, SUBMIT, *submit_args(sim_shards, run_dir, "--cluster", "debug",
                                                     "--gpus-per-node", "0", steps=4)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'step': 4" in proc.stdout
    assert_replicas_agree(run_dir, world_size=1, step=4)


def child_pids(parent: int) -> dict[int, bytes]:
    """{pid: environ} of the processes whose parent is `parent` (from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found[int(proc.name)] = (proc / "environ").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def local_task_pid(submitter: int, rank: int) -> int:
    """The pid of one task of `jobs/submit.py --cluster local`: submit.py -> controller -> tasks."""
    for controller in child_pids(submitter):
        for pid, environ in child_pids(controller).items():
            if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in environ.split(b"\0"):
                return pid
    raise AssertionError(f"no local task of rank {rank} under jobs/submit.py ({submitter})")


def test_checkpoint_returns_a_fresh_task_until_the_requeue_limit(tmp_path, monkeypatch):
    from a2b_dist.config import load_config, to_dict

    cfg = load_config("configs/test.yaml", [f"train.run_dir={tmp_path}"])
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    task = launch.TrainingTask(to_dict(cfg), resume="none", max_requeues=3)
    again = task.checkpoint()
    assert isinstance(again.function, launch.TrainingTask) and again.function is not task
    assert again.function.resume == "auto" and again.function.config == task.config and not again.args
    assert launch.TrainingTask(to_dict(cfg), max_requeues=2).checkpoint() is None
    assert [(e["event"], e["job_id"], e["restart"]) for e in events(tmp_path)] == [
        ("requeue", "7", 2), ("not requeued", "7", 2)]
    assert "--max-requeues" in events(tmp_path)[1]["reason"]


def test_local_cluster_two_ddp_tasks_survive_preemption(sim_shards, tmp_path):
    """`--cluster local --gpus-per-node 2`: two gloo tasks through submitit's local executor. USR2 to
    rank 0 mid-run: both ranks stop at one step and save it; only then does submitit's handler call
    checkpoint() and requeue (the local executor restarts the tasks), and the restart resumes from
    that step and finishes with the configured step count."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, SUBMIT, *submit_args(sim_shards, run_dir, "--cluster", "local", "--gpus-per-node", "2",
                                                "--time", "10", "--resume", "none", steps=40, every=40)]
    # The rendezvous port: submitit derives it from the job id, which the local executor takes from
    # a process id, so it can land on an ephemeral port another socket of this machine holds (a
    # CI run failed so, EADDRINUSE); the launcher's A2B_MASTER_PORT override gets a port free now.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**ENV, "A2B_MASTER_PORT": str(port)}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 600   # a hang guard, not a speed check
        while not [s for s in metric_steps(run_dir) if s >= 4]:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"no step 4 (hung, or the launcher ended): {proc.communicate()}")
            time.sleep(0.1)
        os.kill(local_task_pid(proc.pid, rank=0), signal.SIGUSR2)   # rank 0 only: the ranks must agree
        out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
    assert proc.returncode == 0, out + err
    assert "submitted job" in out and f"run folder: {run_dir}" in out and "logs: " in out
    assert "'step': 40, 'stopped': False" in out
    log = [e for e in events(run_dir) if e["event"] != "submitted"]
    assert [e["event"] for e in log] == ["start", "stopped", "requeue", "start", "finished"], log
    stopped = log[1]["step"]
    assert 4 <= stopped < 40 and log[3]["resume"] == "auto" and log[3]["resume_step"] == stopped
    assert log[4]["step"] == 40
    launches = [json.loads(line) for line in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [entry["world_size"] for entry in launches] == [2, 2]
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 40   # resumed from `stopped`, not from 0
    assert_replicas_agree(run_dir, world_size=2, step=40)
    status = run([sys.executable, STATUS, str(run_dir)])
    assert status.returncode == 0, status.stderr
    assert "last step    40" in status.stdout and "2 of 2 ranks at step 40: weights agree" in status.stdout
