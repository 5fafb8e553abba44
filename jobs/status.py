#!/usr/bin/env python
"""Where a training run stands: its job's state from SLURM, the last step, metrics and checkpoints.

    python jobs/status.py runs/covid            # also: python jobs/submit.py --status runs/covid
    python jobs/status.py runs/covid --json     # the same as one JSON object

Reads the run folder (jobs.jsonl, written at submission and by every start of the job;
metrics.jsonl; checkpoints/; replicas/) and asks sacct (or squeue) about the newest job id.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from a2b_dist.errors import UserError  # noqa: E402
from a2b_dist.launch import format_status, run_status  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/status.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder (train.run_dir, or submit.py --run-dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: no such run folder")
    status = run_status(args.run_dir)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    from a2b_dist.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
