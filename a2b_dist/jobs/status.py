"""Where a training run stands: its job's state from SLURM, the last step, metrics and checkpoints.

`a2b status`; `python jobs/status.py` runs this same command.

    a2b status runs/covid            # also: a2b submit --status runs/covid
    a2b status runs/covid --json     # the same as one JSON object

Reads the run folder (jobs.jsonl, written at submission and by every start of the job;
metrics.jsonl; checkpoints/; replicas/) and asks sacct (or squeue) about the newest job id.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from a2b_dist import checkpoint as ckpt
from a2b_dist.errors import UserError
from a2b_dist.jobs.launch import JOBS_FILE, read_events, read_replicas


def slurm_job_state(job_id: str, run: Callable = subprocess.run) -> dict:
    """{"state", "nodes", "restarts", "exit_code", "reason", "source"} from sacct, else squeue."""
    if shutil.which("sacct"):
        proc = run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-D", "-o", "State,NodeList,ExitCode,Reason"],
                   capture_output=True, text=True, timeout=30)
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and rows:
            state, nodes, exit_code, reason = rows[-1]
            return {"state": state.split()[0], "nodes": nodes, "exit_code": exit_code, "reason": reason,
                    "restarts": len(rows) - 1, "source": "sacct"}
    if shutil.which("squeue"):
        proc = run(["squeue", "-j", str(job_id), "-h", "-o", "%T|%N|%r"], capture_output=True, text=True,
                   timeout=30)
        rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and rows:
            state, nodes, reason = rows[0]
            return {"state": state, "nodes": nodes, "reason": reason, "source": "squeue"}
    return {"state": "UNKNOWN", "source": "neither sacct nor squeue knows this job"}


def run_status(run_dir: str | Path, *, query_slurm: bool = True) -> dict:
    """What a run folder says about its job, steps, metrics, checkpoints and replicas."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    submissions = [e for e in events if e["event"] == "submitted"]
    job = submissions[-1] if submissions else None
    if job is not None and job.get("cluster") == "slurm" and query_slurm:
        job = {**job, **slurm_job_state(job["job_id"])}
    last_metrics = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [line for line in metrics.read_text().splitlines() if line.strip()]
        last_metrics = json.loads(lines[-1]) if lines else None
    checkpoints = [{"path": str(p), "step": int(ckpt.read_meta(p)["step"])} for p in ckpt.list_checkpoints(run_dir)]
    replicas = read_replicas(run_dir)
    return {"run_dir": str(run_dir), "job": job, "events": [e for e in events if e["event"] != "submitted"],
            "last_step": max([c["step"] for c in checkpoints] + ([last_metrics["step"]] if last_metrics else []),
                             default=None),
            "last_metrics": last_metrics, "checkpoints": checkpoints, "replicas": replicas}


def format_status(status: dict) -> str:
    """The status as lines a person reads."""
    lines = [f"run folder   {status['run_dir']}"]
    job = status["job"]
    if job is None:
        lines.append(f"job          none recorded ({JOBS_FILE} has no submission)")
    else:
        state = job.get("state", "(not queried)") if job.get("cluster") == "slurm" else "(not a SLURM job)"
        keys = ("nodes", "restarts") + (("reason",) if job.get("state") == "PENDING" else ())
        extra = ", ".join(f"{k} {job[k]}" for k in keys if job.get(k) not in (None, "", "None"))
        lines.append(f"job          {job['job_id']} on {job['cluster']}: {state}" + (f" ({extra})" if extra else ""))
        lines.append(f"logs         {job['logs']}")
    if status["events"]:
        e = status["events"][-1]
        detail = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "time", "cluster"))
        lines.append(f"last event   {e['time']} {e['event']}: {detail}")
    lines.append(f"last step    {status['last_step'] if status['last_step'] is not None else 'none yet'}")
    if status["last_metrics"] is not None:
        lines.append(f"metrics      {json.dumps(status['last_metrics'])}")
    cks = status["checkpoints"]
    lines.append("checkpoints  " + (", ".join(f"step {c['step']}" for c in cks) + f" (newest {cks[-1]['path']})"
                                    if cks else "none"))
    reps = status["replicas"]
    if reps:
        digests = {r["digest"] for r in reps}
        agree = "agree" if len(digests) == 1 and len(reps) == reps[0]["world_size"] else "DIFFER"
        lines.append(f"replicas     {len(reps)} of {reps[0]['world_size']} ranks at step {reps[0]['step']}: "
                     f"weights {agree} ({', '.join(d[:12] for d in sorted(digests))})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "a2b status") -> int:
    """``prog``: the name the messages give this command (``jobs/status.py`` when run by that path)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder (train.run_dir, or a2b submit --run-dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: no such run folder")
    status = run_status(args.run_dir)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0

