"""Run the trainer as a submitit task (SLURM, this machine, or in-process) and report on the job.

    task = TrainingTask(to_dict(cfg), resume="auto", max_requeues=3)
    executor.submit(task)                  # jobs/submit.py does this; each task runs train()

One task per GPU. Each task exports the torch.distributed variables from SLURM (submitit's
TorchDistributedEnvironment; A2B_MASTER_ADDR / A2B_MASTER_PORT override the rendezvous) and calls
``a2b_dist.train.train``, the same function as ``a2b train``; Accelerate then starts NCCL on GPUs or
gloo on CPUs.

Preemption and time limits (shared/DESIGN.md rule 8; jobs/README.md has the whole story):
submitit installs a USR2 handler that would call ``checkpoint()``, requeue the job and exit on the
spot, in the middle of a step. The task replaces it, once training code is running, by a handler that
only raises a flag (a2b_dist.signals.StopOnSignal, the class of the trainer's SIGTERM stop too).
``train`` polls the flag after every step and all-reduces it, so whichever rank got the signal, all
ranks stop at the same step boundary and write one checkpoint together. Only then does rank 0 call
submitit's original handler, which calls ``checkpoint()`` (a fresh task that resumes from disk),
writes it as the job's new submission, runs ``scontrol requeue`` once and exits.

The run folder records what happened, for ``jobs/status.py`` and for tests: ``jobs.jsonl`` (one line
per submission, start, stop, requeue, end) and ``replicas/rank-*.json`` (a digest of the weights each
rank holds when training returns; equal digests mean the DDP replicas agree).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import submitit
import torch

from a2b_dist import checkpoint as ckpt
from a2b_dist.config import from_dict
from a2b_dist.errors import UserError
from a2b_dist.files import append_jsonl, write_atomic
from a2b_dist.signals import StopOnSignal

JOBS_FILE = "jobs.jsonl"
REPLICAS = "replicas"


# ---------------------------------------------------------------------------------------------
# Inside a task: distributed environment, the stop flag, the replicas' weights

def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT (and CUDA_VISIBLE_DEVICES) for this task.

    The rendezvous host is the job's first node unless A2B_MASTER_ADDR names another (for clusters
    whose node names do not resolve); A2B_MASTER_PORT likewise, else a port derived from the job id.
    Variables inherited from the submitting shell are overwritten: they describe another job.
    """
    env = submitit.helpers.TorchDistributedEnvironment()
    env.master_addr = os.environ.get("A2B_MASTER_ADDR") or env.master_addr
    if os.environ.get("A2B_MASTER_PORT"):
        env.master_port = int(os.environ["A2B_MASTER_PORT"])
    return env.export(overwrite=True)


def preempt_signal() -> signal.Signals:
    """The signal submitit treats as preemption, from its public ``JobEnvironment.USR_SIG`` (the
    name without SIG; USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    name = "SIG" + submitit.JobEnvironment.USR_SIG
    try:
        return signal.Signals[name]
    except KeyError:
        raise UserError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG!r} is not a signal this "
                        "system has; unset it or use USR1/USR2") from None


def checkpoint_digest(path: str | Path) -> str:
    """The digest of a checkpoint's generator and critic weights (as state_digest)."""
    state, _, _, _ = ckpt.load_checkpoint(path, 0, prefixes=("/G/", "/D/"))
    return ckpt.state_digest({"G": state["G"], "D": state["D"]})


# ---------------------------------------------------------------------------------------------
# The task

def _attempt() -> dict:
    """Who and where this task is: job id, restart count, cluster."""
    env = submitit.JobEnvironment()
    return {"job_id": env.job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "cluster": env.cluster}


class TrainingTask(submitit.helpers.Checkpointable):
    """One rank of a training run; picklable, small (the resolved config as a dict, two options).

    ``resume`` applies to the first start only: a requeued start (SLURM_RESTART_COUNT > 0, or the
    fresh task ``checkpoint()`` returns) resumes from the newest complete checkpoint in the run folder.
    """

    def __init__(self, config: dict, resume: str = "auto", max_requeues: int = 3) -> None:
        self.config = config
        self.resume = resume
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from a2b_dist.train import train

        dist_env = export_distributed_env()
        stop = StopOnSignal(preempt_signal()).install()   # replaces submitit's handler, keeps it
        rank = dist_env.rank
        if "OMP_NUM_THREADS" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK"):
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        cfg = from_dict(self.config, "submission")
        run_dir = Path(cfg.train.run_dir)
        attempt = _attempt()
        newest = ckpt.latest_checkpoint(run_dir)   # for the record; train() checks it and falls back if damaged
        resume = "auto" if attempt["restart"] > 0 and newest is not None else self.resume
        if rank == 0:
            record_event(run_dir, "start", **attempt, world_size=dist_env.world_size,
                         master=f"{dist_env.master_addr}:{dist_env.master_port}", host=socket.gethostname(),
                         resume=resume, resume_step=_resume_step(resume, newest))
        try:
            result = train(cfg, resume=resume, stop_requested=stop,
                           argv=[sys.argv[0], f"submitit task {attempt['job_id']}", f"resume={resume}"])
        except Exception as e:
            if rank == 0:
                record_event(run_dir, "failed", **attempt, error=f"{type(e).__name__}: {e}")
            raise
        write_replica(run_dir, rank, dist_env.world_size, result["step"], attempt, result["weights_digest"])
        if not result["stopped"] or result["step"] >= cfg.train.steps:   # a signal at the last step: done
            if rank == 0:
                record_event(run_dir, "finished", **attempt, step=result["step"])
            return result
        # SIGTERM alone (scancel, a time limit, `scontrol requeue`, preemption without --signal): the
        # checkpoint is saved and SLURM itself requeues or ends the job; a requeued start resumes from
        # that checkpoint. Calling submitit's requeue as well would queue the job a second time.
        by_sigterm = result["stop_signal"] == "SIGTERM" and stop.received is None
        if rank == 0:
            record_event(run_dir, "stopped", **attempt, step=result["step"],
                         signal="SIGTERM" if by_sigterm else stop.name)
            if not by_sigterm:
                stop.call_previous()   # submitit's: checkpoint(), requeue and exit on SLURM; returns where nothing requeues
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Optional[submitit.helpers.DelayedSubmission]:
        """The next start of this run: a fresh task that resumes from disk (None: do not requeue)."""
        cfg = from_dict(self.config, "submission")
        attempt = _attempt()
        if attempt["restart"] >= self.max_requeues:
            record_event(cfg.train.run_dir, "not requeued", **attempt,
                         reason=f"requeue limit reached ({self.max_requeues}, --max-requeues); resubmit "
                                f"with --resume auto to continue")
            return None
        record_event(cfg.train.run_dir, "requeue", **attempt)
        return submitit.helpers.DelayedSubmission(TrainingTask(self.config, "auto", self.max_requeues))


def _resume_step(resume: str, newest: Optional[Path]) -> Optional[int]:
    if resume == "none":
        return None
    path = newest if resume == "auto" else ckpt.resolve_checkpoint(resume)
    return None if path is None else int(ckpt.read_meta(path)["step"])


# ---------------------------------------------------------------------------------------------
# The run folder's records

def record_event(run_dir: str | Path, event: str, **fields: Any) -> None:
    """Append one line to RUN_DIR/jobs.jsonl (submissions and what each start of the job did)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    line = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    append_jsonl(Path(run_dir) / JOBS_FILE, line)


def read_events(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_replica(run_dir: Path, rank: int, world_size: int, step: int, attempt: dict, digest: str) -> None:
    folder = run_dir / REPLICAS
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"rank-{rank:05d}.json", json.dumps(
        {"rank": rank, "world_size": world_size, "step": step, "digest": digest, **attempt}))


def read_replicas(run_dir: str | Path) -> list[dict]:
    """The newest attempt's replica digests (one per rank), by rank."""
    files = sorted((Path(run_dir) / REPLICAS).glob("rank-*.json"))
    found = [json.loads(p.read_text()) for p in files]
    if not found:
        return []
    newest = max((r["job_id"], r["restart"]) for r in found)
    return sorted((r for r in found if (r["job_id"], r["restart"]) == newest), key=lambda r: r["rank"])
