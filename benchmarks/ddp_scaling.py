#!/usr/bin/env python
"""DDP scaling: images/s of the toolkit's training step with 1, 2, ... processes.

    python benchmarks/ddp_scaling.py                        # CPU: 1 and 2 processes over gloo
    python benchmarks/ddp_scaling.py --size 256 --precision bf16 --width 64 --res-blocks 6 \
        --critic-width 64 --processes 1 2 4 8               # GPUs, one process per GPU (NCCL)

Each process count is a fresh `accelerate launch --multi_gpu --num_processes N --num_machines 1
--main_process_port <free port>` (one process: plain python) running the step that
benchmarks/train_speed.py times (train()'s per-step work on in-memory data, loss all-reduce
included). Weak scaling: every process keeps --batch images per role, so the global batch is
N x --batch. On CPU the cores are split evenly between the processes (--threads per process).
Efficiency = images/s with N processes / (N x images/s with 1).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    """Runs inside each launched process; the main process prints one JSON line."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_speed import make_config, time_run, toolkit_stepper

    from a2b_dist.steps import make_accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.batch = args.batch * world  # global batch: --batch per process
    cfg = make_config(args)
    acc = make_accelerator(cfg)
    step, acc = toolkit_stepper(cfg, acc)
    for i in range(args.warmup):
        step(i)
    runs = []
    for r in range(args.repeats):
        acc.wait_for_everyone()
        runs.append(time_run(step, args.iters, acc.device, args.warmup + r * args.iters))
    # A run ends when every rank has finished it: take the slowest rank's time.
    t = torch.tensor(runs, dtype=torch.float64, device=acc.device)
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if acc.is_main_process:
        sec = statistics.median(t.tolist())
        print("RESULT " + json.dumps({"processes": world, "sec_per_iter": sec, "threads": torch.get_num_threads(),
                                      "images_per_s": cfg.optim.n_critic * 2 * args.batch / sec,
                                      "device": str(acc.device)}), flush=True)


def launch(args, n: int, passthrough: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "ddp_scaling.py"), "--worker", *passthrough]
    if n > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision",
               args.precision, *cmd[1:]]
    if args.threads == 0 and args.device == "cpu":
        cmd += ["--threads", str(max(1, (os.cpu_count() or 1) // n))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{n} processes: no result (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main(argv=None) -> list[dict]:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="images per role per process")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--res-blocks", type=int, default=3)
    p.add_argument("--critic-width", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: CPU cores / N on CPU)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    raw = list(argv if argv is not None else sys.argv[1:])
    passthrough, skip = [], False
    for i, tok in enumerate(raw):  # everything but --processes goes to the workers
        if skip:
            if tok.startswith("--"):
                skip = False
            else:
                continue
        if tok == "--processes":
            skip = True
            continue
        passthrough.append(tok)
    passthrough += ["--device", args.device]

    rows = []
    print(f"DDP weak scaling: {args.size} px, batch {args.batch} per process, precision {args.precision}, "
          f"generator width {args.width} / {args.res_blocks} res blocks, critic width {args.critic_width}, "
          f"device {args.device}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'processes':>9} {'threads':>7} {'global batch':>12} {'s/iter':>8} {'images/s':>9} {'efficiency':>10}")
    for n in args.processes:
        r = launch(args, n, passthrough)
        rows.append(r)
        eff = r["images_per_s"] / (n * rows[0]["images_per_s"] / rows[0]["processes"])
        print(f"{n:>9} {r['threads']:>7} {n * args.batch:>12} {r['sec_per_iter']:>8.3f} "
              f"{r['images_per_s']:>9.1f} {eff:>10.2f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
