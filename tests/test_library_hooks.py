"""The few places where a dependency offers no public API for what the toolkit needs, each isolated
in one function; these tests fail when the library changes under it (real Accelerate, real local
Ray, real submitit; nothing mocked).

- sweep._reset_accelerate: Accelerate keeps its state in process-wide singletons and has no public
  reset; a Ray worker that runs a second trial must build a fresh Accelerator.
- sweep._ray_stop_event: the event Ray Tune sets when it stops a function trial (ASHA, PBT), read
  from its session; Ray's public API offers no way to see the stop before the next report.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, threading
    from accelerate import Accelerator
    import ray
    from ray import tune
    from a2b_dist.sweep import _ray_stop_event, _reset_accelerate

    Accelerator(cpu=True)
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        print("ACCELERATE without reset: accepted")
    except ValueError:
        print("ACCELERATE without reset: refused")
    _reset_accelerate()
    print("ACCELERATE after reset:", Accelerator(cpu=True, mixed_precision="bf16").mixed_precision)

    def trainable(config):
        ev = _ray_stop_event()
        tune.report({"event": float(isinstance(ev, threading.Event)), "unset": float(ev is not None and not ev.is_set())})

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    grid = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=sys.argv[1], name="hook")).fit()
    print("RAY", grid[0].metrics["event"], grid[0].metrics["unset"])
""")


def test_accelerate_reset_and_ray_stop_event_still_work(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ray")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # the reset is needed (a second Accelerator with other settings is refused) and it works
    assert "ACCELERATE without reset: refused" in lines
    assert "ACCELERATE after reset: bf16" in lines
    # inside a real Tune trial the session's stop event exists and is not set while it runs
    assert "RAY 1.0 1.0" in lines


def test_preempt_signal_follows_submitit():
    from a2b_dist.launch import preempt_signal

    assert preempt_signal() == signal.SIGUSR2   # submitit's default
    code = "from a2b_dist.launch import preempt_signal; print(preempt_signal().name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    assert out.stdout.strip() == "SIGUSR1", out.stderr[-2000:]
