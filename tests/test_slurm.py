"""jobs/submit.py against a real SLURM controller: the throw-away cluster of jobs/cluster/testcluster.sh
(nodes n1..n4 on this machine, fake GPUs, so every task trains on CPU over gloo).

Needs root and Debian's slurm-wlm, munge, slurmdbd and mariadb-server (.ci/slurm-setup.sh installs
them and starts the cluster). A running cluster is reused (SLURM_CONF, else the script's default
place); one this file starts is stopped again at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from a2b_dist import checkpoint as ckpt
from test_submit import (ROOT, STATUS, SUBMIT, assert_replicas_agree, events, main_in_process, metric_steps,
                         submit_args)

CLUSTER = ROOT / "jobs" / "cluster" / "testcluster.sh"
DEFAULT_CONF = Path(os.environ.get("A2B_SLURM_BASE", "/tmp/a2b-slurm")) / "etc" / "slurm.conf"
RESOURCES = ("--partition", "gpu", "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "20")
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _why_skip() -> str:
    if shutil.which("slurmctld") is None:
        return ("slurmctld is not installed: apt-get install -y --no-install-recommends slurm-wlm munge "
                "slurmdbd mariadb-server (or run .ci/slurm-setup.sh)")
    if os.geteuid() != 0:
        return "the local test cluster runs slurmd as root: run these tests as root"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_skip()), reason=_why_skip() or "-")


def _answers(conf: Path) -> bool:
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P"], env={**os.environ, "SLURM_CONF": str(conf)},
                              capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and "gpu" in proc.stdout


@pytest.fixture(scope="session")
def slurm_env() -> dict:
    """The environment for sbatch/sacct and jobs/submit.py on the test cluster."""
    conf = Path(os.environ["SLURM_CONF"]) if os.environ.get("SLURM_CONF") else DEFAULT_CONF
    started = False
    if not _answers(conf):
        conf = DEFAULT_CONF
        proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{CLUSTER} start failed:\n{proc.stdout}\n{proc.stderr}"
        started = True
    env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        socket.gethostbyname("n1")
    except OSError:   # node names resolve only with /etc/hosts entries (.ci/slurm-setup.sh adds them)
        env["A2B_MASTER_ADDR"] = "127.0.0.1"
    yield env
    if started:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=300)


def sh(env: dict, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def submit(env: dict, *args: str) -> str:
    out = sh(env, sys.executable, SUBMIT, *args).stdout
    first = out.splitlines()[0]
    assert first.startswith("submitted job "), out
    return first.split()[2]


def logs(run_dir: Path) -> str:
    """The tails of every task's log, for failure messages."""
    parts = []
    for path in sorted((run_dir / "slurm").glob("*/*_log.*")):
        text = path.read_text(errors="replace").replace("\r", "\n")
        lines = [line for line in text.splitlines() if not line.startswith("train:")]
        parts.append(f"== {path.name}\n" + "\n".join(lines[-15:]))
    return "\n".join(parts)


def sacct_states(env: dict, job_id: str) -> list[str]:
    """One state per start of the job (a requeued job has several records), oldest first."""
    out = sh(env, "sacct", "-j", job_id, "-X", "-n", "-P", "-D", "-o", "State", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_done(env: dict, job_id: str, run_dir: Path, timeout: float = 600) -> list[str]:
    """Poll sacct until the job ends; the deadline only guards against a hang (not a speed check)."""
    deadline = time.time() + timeout
    while True:
        states = sacct_states(env, job_id)
        if states and states[-1] in DONE:
            return states
        if time.time() > deadline:
            pytest.fail(f"job {job_id} still {states} after {timeout} s (hung?)\n{logs(run_dir)}")
        time.sleep(0.5)


def wait_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not [s for s in metric_steps(run_dir) if s >= step]:
        if time.time() > deadline:
            pytest.fail(f"no step {step} after {timeout} s (hung?)\n{logs(run_dir)}")
        time.sleep(0.1)


def world_sizes(run_dir: Path) -> list[int]:
    return [json.loads(line)["world_size"] for line in (run_dir / "launches.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nodes, steps", [(2, 24), (4, 16)])
def test_multi_node_ddp_job_completes(slurm_env, sim_shards, tmp_path, nodes, steps):
    """`--nodes N --gpus-per-node 1`: N tasks on N nodes train one gloo DDP run to its last step."""
    run_dir = tmp_path / "run"
    proc = sh(slurm_env, sys.executable, SUBMIT,
              *submit_args(sim_shards, run_dir, "--nodes", str(nodes), *RESOURCES, steps=steps, every=8))
    job_id = proc.stdout.split()[2]
    assert f"run folder: {run_dir}" in proc.stdout and f"{run_dir}/slurm/{job_id}/{job_id}_0_log.out" in proc.stdout
    assert wait_done(slurm_env, job_id, run_dir) == ["COMPLETED"], logs(run_dir)
    assert world_sizes(run_dir) == [nodes]
    for rank in range(nodes):   # one task per node: submitit logs node=<rank>(<nodes>)
        log = (run_dir / "slurm" / job_id / f"{job_id}_{rank}_log.out").read_text()
        assert f"node={rank}({nodes}), global_rank={rank}({nodes})" in log
    assert metric_steps(run_dir)[-1] == steps
    assert [ckpt.read_meta(p)["step"] for p in ckpt.list_checkpoints(run_dir)] == [steps - 8, steps]
    assert_replicas_agree(run_dir, world_size=nodes, step=steps)
    status = sh(slurm_env, sys.executable, STATUS, str(run_dir)).stdout
    assert f"job          {job_id} on slurm: COMPLETED" in status and f"last step    {steps}" in status
    assert f"{nodes} of {nodes} ranks at step {steps}: weights agree" in status


def test_usr2_saves_requeues_and_resumes_from_that_step(slurm_env, sim_shards, tmp_path):
    """`scancel --signal=USR2` mid-run: one agreed checkpoint at the step where the ranks stopped, one
    requeue, and the restarted job resumes from that step (no periodic checkpoint exists before the
    last step, so nothing else could provide it) and ends at exactly train.steps."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_env, *submit_args(sim_shards, run_dir, "--nodes", "2", *RESOURCES, steps=60, every=60))
    wait_step(run_dir, 4)
    sh(slurm_env, "scancel", "--signal=USR2", job_id)
    assert wait_done(slurm_env, job_id, run_dir) == ["REQUEUED", "COMPLETED"], logs(run_dir)
    log = [e for e in events(run_dir) if e["event"] != "submitted"]
    assert [(e["event"], e["restart"]) for e in log] == [
        ("start", 0), ("stopped", 0), ("requeue", 0), ("start", 1), ("finished", 1)], log
    stopped = log[1]["step"]
    assert 4 <= stopped < 60 and log[3]["resume_step"] == stopped and log[4]["step"] == 60
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 60   # no step trained twice: not from 0
    assert world_sizes(run_dir) == [2, 2]
    assert_replicas_agree(run_dir, world_size=2, step=60)
    status = sh(slurm_env, sys.executable, SUBMIT, "--status", str(run_dir)).stdout
    assert "COMPLETED (nodes n[1-2], restarts 1)" in status


def test_scontrol_requeue_saves_on_sigterm_and_the_restart_resumes_there(slurm_env, sim_shards, tmp_path):
    """`scontrol requeue` sends SIGTERM and requeues the job itself (checkpoint() is not called):
    all ranks save at the next step boundary, the task records the stop without queueing the job a
    second time, and the restart resumes from that checkpoint, not from the last periodic one."""
    run_dir = tmp_path / "run"
    job_id = submit(slurm_env, *submit_args(sim_shards, run_dir, "--nodes", "2", *RESOURCES, steps=100, every=50))
    wait_step(run_dir, 12)
    sh(slurm_env, "scontrol", "requeue", job_id)
    assert wait_done(slurm_env, job_id, run_dir) == ["REQUEUED", "COMPLETED"], logs(run_dir)
    log = [e for e in events(run_dir) if e["event"] != "submitted"]
    assert [(e["event"], e["restart"]) for e in log] == [
        ("start", 0), ("stopped", 0), ("start", 1), ("finished", 1)], log
    stopped = log[1]["step"]
    assert log[1]["signal"] == "SIGTERM" and 12 <= stopped < 100, log
    assert log[2]["resume_step"] == stopped and log[3]["step"] == 100, log
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 100   # one history, nothing trained twice
    assert world_sizes(run_dir) == [2, 2]
    assert_replicas_agree(run_dir, world_size=2, step=100)


def test_bad_arguments_and_dry_run_submit_nothing(slurm_env, sim_shards, tmp_path, capsys, monkeypatch):
    for key in ("SLURM_CONF", "A2B_MASTER_ADDR"):
        if key in slurm_env:
            monkeypatch.setenv(key, slurm_env[key])
    jobs = ["sacct", "-n", "-X", "-a", "-o", "JobID", "-S", "now-1hour"]
    before = sh(slurm_env, *jobs).stdout.split()
    run_dir = tmp_path / "run"
    for extra, message in [([], "--partition is required"),
                           (["--partition", "gpu", "--nodes", "0"], "--nodes must be at least 1"),
                           (["--partition", "gpu", "optim.decay_steps=100"], "optim.decay_steps=100 exceeds")]:
        rc, out, err = main_in_process(submit_args(sim_shards, run_dir, *extra), capsys)
        assert rc == 2 and err.startswith("error: ") and message in err, err
    rc, out, err = main_in_process([*submit_args(sim_shards, run_dir, "--nodes", "4", *RESOURCES), "--dry-run"], capsys)
    assert rc == 0 and "--nodes=4" in out and "--partition=gpu" in out and "nothing submitted" in out, err
    assert sh(slurm_env, *jobs).stdout.split() == before and not run_dir.exists()
