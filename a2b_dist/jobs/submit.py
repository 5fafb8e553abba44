"""Submit A2B-GAN training to SLURM (or run it through the same tasks on this machine).

`a2b submit`; `python jobs/submit.py` (the path jobs/README.md documents) runs this same command.

    a2b submit --config configs/covid.yaml --partition gpu --nodes 4 --gpus-per-node 4
    a2b submit --config configs/test.yaml train.steps=40 --partition gpu --nodes 2 --dry-run
    a2b submit --config configs/demo.yaml --cluster local --gpus-per-node 2   # 2 tasks here
    a2b submit --status runs/covid        # same as: a2b status runs/covid

One task per GPU (nodes x gpus-per-node tasks; one per node with --gpus-per-node 0), each running
a2b_dist.train.train, the function behind `a2b train`. The job survives preemption and time limits:
on USR2 (sent --signal-delay seconds before the limit, or by the scheduler) every rank stops at the
same step, they save one checkpoint and the job requeues itself, up to --max-requeues times; a
restarted job resumes from the newest complete checkpoint in its run folder. jobs/README.md has the
details. Errors in the arguments or the config stop here, before anything is submitted.
"""
from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import time
from pathlib import Path

from a2b_dist.config import Config, load_config, to_dict, to_yaml
from a2b_dist.errors import UserError

CLUSTERS = ("slurm", "local", "debug")
# What each text argument may hold: SLURM's own characters for it, never a newline or a '#' that
# would start a new #SBATCH line in the batch script submitit writes.
_NAME = r"[A-Za-z0-9_.+-]+"
SBATCH_TEXT = {
    "partition": (re.compile(rf"{_NAME}(,{_NAME})*"), "letters, digits, _ . + - and commas between names"),
    "account": (re.compile(_NAME), "letters, digits and _ . + -"),
    "qos": (re.compile(rf"{_NAME}(,{_NAME})*"), "letters, digits, _ . + - and commas between names"),
    "name": (re.compile(_NAME), "letters, digits and _ . + -"),
    "constraint": (re.compile(r"[A-Za-z0-9_.+\-&|,*\[\]():!]+"), "feature names and the operators & | , * [ ] ( ) : !"),
    "exclude": (re.compile(r"[A-Za-z0-9_.\-,\[\]]+"), "a host list: letters, digits, _ . - , [ ]"),
    "comment": (re.compile(r"[ -\"$-~]+"), "printable characters other than '#' (no newline)"),
}
PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]+")


def build_parser(prog: str = "a2b submit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML preset, e.g. configs/covid.yaml")
    p.add_argument("overrides", nargs="*", help="dotted config overrides such as train.steps=1000")
    p.add_argument("--cluster", default="slurm", choices=CLUSTERS,
                   help="slurm (sbatch), local (submitit's local executor: processes on this machine), "
                        "debug (in this process)")
    g = p.add_argument_group("resources (sbatch)")
    g.add_argument("--partition", help="SLURM partition (required with --cluster slurm)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0 = one CPU task per node")
    g.add_argument("--cpus-per-task", type=int, default=None, help="default: data.num_workers + 1")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per node; default: the partition's")
    g.add_argument("--time", type=int, default=24 * 60, help="time limit in minutes (default 1440)")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude", help="nodes to avoid, e.g. n[3-4]")
    g.add_argument("--comment")
    g.add_argument("--name", help="job name (default: a2b-<run folder name>)")
    g.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR2 (default 120)")
    r = p.add_argument_group("run")
    r.add_argument("--run-dir", help="run folder (overrides train.run_dir); logs go to RUN_DIR/slurm/JOBID/")
    r.add_argument("--resume", default="auto",
                   help="first start only: auto (newest checkpoint in the run folder), none, or a checkpoint "
                        "or run folder; a requeued job always resumes from its run folder")
    r.add_argument("--max-requeues", type=int, default=3,
                   help="the job requeues itself at most this many times (default 3)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and sbatch parameters only")
    r.add_argument("--status", metavar="RUN_DIR", help="print a run's job state, progress and checkpoints")
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what would fail on the cluster, before submitting."""
    if args.config is None:
        raise UserError("--config is required (a YAML preset such as configs/demo.yaml)")
    if args.cluster == "slurm" and not args.partition:
        raise UserError("--partition is required with --cluster slurm (`sinfo -s` lists partitions)")
    for name in ("nodes", "time", "signal_delay"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("gpus_per_node", "max_requeues"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(args, name)})")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1 (got {args.cpus_per_task})")
    if args.mem_gb is not None and not (math.isfinite(args.mem_gb) and args.mem_gb > 0):
        raise UserError(f"--mem-gb must be a positive, finite number of GB (got {args.mem_gb})")
    for name, (pattern, allowed) in SBATCH_TEXT.items():
        value = getattr(args, name)
        if value is not None and not pattern.fullmatch(value):
            raise UserError(f"--{name.replace('_', '-')} {value!r}: only {allowed} are allowed "
                            "(the value goes into the batch script)")
    if args.config is not None and not PRINTABLE.fullmatch(args.config):
        raise UserError(f"--config {args.config!r}: a path with control characters (a newline?) "
                        "cannot go into the batch script")
    if args.cluster != "slurm" and args.nodes > 1:
        raise UserError(f"--cluster {args.cluster} runs on this machine only: use --nodes 1 "
                        "(and --gpus-per-node for the number of tasks)")
    if args.cluster == "debug" and args.gpus_per_node > 1:
        raise UserError("--cluster debug runs one task in this process: use --gpus-per-node 0 or 1, "
                        "or --cluster local for several tasks")
    if args.resume not in ("auto", "none"):
        from a2b_dist.checkpoint import resolve_checkpoint
        args.resume = str(resolve_checkpoint(args.resume).resolve())


def resolve_config(args: argparse.Namespace) -> Config:
    """The config the job will run: file + overrides, paths made absolute, checked against the data."""
    from a2b_dist.config import ConfigError
    from a2b_dist.data import DataError, read_manifest
    from a2b_dist.data.manifest import build_hint
    from a2b_dist.data.storage import Storage, absolute, join

    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.train.run_dir = args.run_dir
    # The job may start in another directory (and node): pin every path now.
    cfg.train.run_dir = str(Path(cfg.train.run_dir).resolve())
    if not PRINTABLE.fullmatch(cfg.train.run_dir):   # the logs' path goes into the batch script
        name = "--run-dir" if args.run_dir else "train.run_dir"
        raise UserError(f"{name} {cfg.train.run_dir!r}: a path with control characters (a newline?) "
                        "cannot go into the batch script")
    cfg.data.root = absolute(cfg.data.root)   # a URL stays as it is: every node reads it directly
    if cfg.eval.fid_weights:
        cfg.eval.fid_weights = str(Path(cfg.eval.fid_weights).resolve())
    tasks = n_tasks(args)
    if cfg.train.batch_size % tasks:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the number of tasks "
                          f"({tasks} = {args.nodes} nodes x {max(args.gpus_per_node, 1)} per node)")
    for role in ("mixed", "healthy"):
        try:
            read_manifest(join(cfg.data.root, role), image_size=cfg.data.image_size, channels=cfg.data.channels,
                          storage=Storage.from_config(cfg.data))
        except DataError as e:
            raise UserError(f"data.root={cfg.data.root}: {e}. {build_hint(cfg.data.root, cfg.data.image_size)}") from None
    return cfg


def n_tasks(args: argparse.Namespace) -> int:
    return args.nodes * max(args.gpus_per_node, 1)


def executor_parameters(args: argparse.Namespace, cfg: Config) -> dict:
    """submitit AutoExecutor parameters; slurm_* ones are sbatch options under their sbatch names."""
    default_name = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"a2b-{Path(cfg.train.run_dir).name}")
    params = {"name": args.name or default_name, "timeout_min": args.time,
              "nodes": args.nodes, "tasks_per_node": max(args.gpus_per_node, 1),
              "cpus_per_task": args.cpus_per_task or cfg.data.num_workers + 1}
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(args, name):
            params[f"slurm_{name}"] = getattr(args, name)
    params["slurm_signal_delay_s"] = args.signal_delay
    # Requeueable: node failures and `scontrol requeue` restart the job; it resumes from disk.
    params["slurm_additional_parameters"] = {"requeue": True}
    return params


def sbatch_options(params: dict) -> list[str]:
    """The executor parameters as the sbatch options submitit writes (for --dry-run)."""
    from a2b_dist.jobs.launch import preempt_signal

    names = {"name": "job-name", "timeout_min": "time", "tasks_per_node": "ntasks-per-node"}
    opts = []
    for key, value in params.items():
        if key == "slurm_additional_parameters":
            opts += [f"--{k}" if v is True else f"--{k}={v}" for k, v in value.items()]
        elif key == "slurm_signal_delay_s":
            opts.append(f"--signal={preempt_signal().name.removeprefix('SIG')}@{value}")
        elif key == "mem_gb":
            opts.append(f"--mem={value:g}GB")
        else:
            opts.append(f"--{names.get(key, key.removeprefix('slurm_').replace('_', '-'))}={value}")
    return opts


def submit(args: argparse.Namespace, cfg: Config, status: str = "a2b status"):
    import submitit

    from a2b_dist.jobs.launch import TrainingTask, record_event

    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit from a SLURM login node, or try --cluster local")
    run_dir = Path(cfg.train.run_dir)
    folder = run_dir / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_requeues)
    params = executor_parameters(args, cfg)
    if args.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    job = executor.submit(TrainingTask(to_dict(cfg), resume=args.resume, max_requeues=args.max_requeues))
    logs = Path(str(folder).replace("%j", str(job.job_id))) / f"{job.job_id}_0_log.out"
    record_event(run_dir, "submitted", job_id=str(job.job_id), cluster=args.cluster, tasks=n_tasks(args),
                 nodes=args.nodes, folder=str(logs.parent), logs=str(logs), argv=sys.argv)
    print(f"submitted job {job.job_id} ({args.cluster}): {args.nodes} node(s) x {max(args.gpus_per_node, 1)} "
          f"task(s) = {n_tasks(args)} task(s)")
    print(f"run folder: {run_dir}")
    print(f"logs: {logs} (rank 0; {job.job_id}_<rank>_log.out/.err for the others)")
    print(f"status: {status} {run_dir}")
    return job, logs


def main(argv: list[str] | None = None, prog: str = "a2b submit") -> int:
    """``prog``: the name the messages give this command (``jobs/submit.py`` when run by that path)."""
    args = build_parser(prog).parse_intermixed_args(argv)
    if args.status:
        from a2b_dist.jobs.status import format_status, run_status
        if not Path(args.status).is_dir():
            raise UserError(f"--status {args.status}: no such run folder")
        print(format_status(run_status(args.status)))
        return 0
    check_arguments(args)
    cfg = resolve_config(args)
    if args.dry_run:
        print("# resolved config")
        print(to_yaml(cfg).rstrip())
        print(f"# sbatch parameters ({n_tasks(args)} tasks; --cluster {args.cluster}; nothing submitted)")
        print(" ".join(sbatch_options(executor_parameters(args, cfg))))
        return 0
    job, logs = submit(args, cfg, status="python jobs/status.py" if prog.endswith(".py") else "a2b status")
    if args.cluster != "slurm":   # local and debug: this process waits for the result of rank 0
        from submitit.core.utils import FailedJobError

        t0 = time.time()
        try:
            result = job.results()[0]
        except FailedJobError as e:
            last = [line for line in str(e).splitlines() if line.strip()][-1]
            raise UserError(f"job {job.job_id} failed ({last.strip()}); its log: {logs}") from None
        print(f"finished in {time.time() - t0:.0f} s: {result}")
    return 0

