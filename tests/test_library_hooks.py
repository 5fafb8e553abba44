"""The few places where a dependency offers no public API for what the toolkit needs, each one small
function in a2b_dist/compat.py; these tests fail when the library changes under it (real Accelerate,
real local Ray, real DeepSpeed, real submitit; nothing mocked), with a message naming the hook, the
installed version and the version it was checked on.

- compat.reset_accelerate_state: Accelerate keeps its state in process-wide singletons and has no
  public reset; a Ray worker that runs a second trial must build a fresh Accelerator.
- compat.ray_trial_stop_event: the event Ray Tune sets when it stops a function trial (ASHA, PBT),
  read from its session; Ray's public API offers no way to see the stop before the next report.
- compat.skip_deepspeed_op: DeepSpeed's CPU communication backend would compile its shared-memory
  op (over a minute) unless its op table marks the op incompatible.
- compat.load_checkpoints_through: DeepSpeed reads checkpoints through the engine's
  ``checkpoint_engine`` (torch.load with weights_only=False); the toolkit puts a weights-only loader there.

And no private name of a dependency anywhere else: the last test greps the package, jobs/, sweeps/
and shards/ for them.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

from a2b_dist.compat import CHECKED_ON

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def changed(hook: str, dist: str, what: str) -> str:
    """The message of a hook that no longer fits its dependency."""
    return (f"a2b_dist.compat.{hook} no longer fits {dist} {version(dist)} (checked on {dist} "
            f"{CHECKED_ON[dist]}): {what}; see the hook's docstring for what it needs and find a "
            f"new way in {dist} {version(dist)}")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def outcome(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# The hooks still find what they touch

def test_accelerate_reset_hook_finds_its_attributes():
    import inspect

    from accelerate.state import AcceleratorState, GradientState, PartialState

    for cls in (AcceleratorState, GradientState, PartialState):
        assert callable(getattr(cls, "_reset_state", None)), \
            changed("reset_accelerate_state", "accelerate", f"{cls.__name__}._reset_state is gone")
        assert isinstance(getattr(cls, "_shared_state", None), dict), \
            changed("reset_accelerate_state", "accelerate", f"{cls.__name__} keeps no _shared_state dict")
    params = inspect.signature(AcceleratorState._reset_state).parameters
    assert "reset_partial_state" in params, \
        changed("reset_accelerate_state", "accelerate",
                f"AcceleratorState._reset_state no longer takes reset_partial_state (takes {list(params)})")


def test_ray_stop_event_hook_finds_the_session():
    # compat returns None when the import fails (Ray missing), so a move inside Ray would pass
    # silently: here it must import.
    try:
        from ray.train._internal.session import get_session
    except ImportError as e:
        raise AssertionError(changed("ray_trial_stop_event", "ray",
                                     f"ray.train._internal.session.get_session cannot be imported ({e})")) from None
    assert get_session() is None, changed("ray_trial_stop_event", "ray", "a session exists outside any trial")
    from a2b_dist.compat import ray_trial_stop_event

    assert ray_trial_stop_event() is None   # outside a trial


def test_deepspeed_op_hook_keeps_the_shm_op_from_being_built():
    proc = run_script("""
        import importlib, time
        from deepspeed.accelerator import get_accelerator
        from a2b_dist import compat

        shm = get_accelerator().get_op_builder("ShareMemCommBuilder")
        print("BUILDER", shm is not None)
        compat.skip_deepspeed_op(shm.NAME)
        comm = importlib.import_module("deepspeed.comm.torch")
        start = time.monotonic()
        print("BUILT", comm.build_shm_op() is not None, "SECONDS", round(time.monotonic() - start))
    """)
    hook = "skip_deepspeed_op"
    assert proc.returncode == 0, changed(hook, "deepspeed", "the op table or build_shm_op changed") + "\n" + outcome(proc)
    assert "BUILDER True" in proc.stdout, \
        changed(hook, "deepspeed", "the CPU accelerator has no ShareMemCommBuilder") + "\n" + outcome(proc)
    assert "BUILT False SECONDS 0" in proc.stdout, \
        changed(hook, "deepspeed", "build_shm_op built the op although the table marks it incompatible") \
        + "\n" + outcome(proc)


def test_deepspeed_checkpoint_hook_loads_every_file_through_ours(tmp_path):
    proc = run_script("""
        import sys
        import deepspeed, torch
        from a2b_dist import compat, ds_backend
        from a2b_dist.config import load_config

        ds_backend._init_process_group(torch.device("cpu"))
        cfg = load_config("configs/test.yaml")
        net = torch.nn.Linear(3, 2)
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                               config=ds_backend.engine_config(cfg, 1e-3, 1))
        print("ATTRIBUTE", hasattr(engine, "checkpoint_engine"))
        read = []

        def load(path, map_location=None):
            read.append(path)
            return ds_backend.load_weights_only(path, map_location)

        compat.load_checkpoints_through(engine, load)
        engine.save_checkpoint(sys.argv[1], tag="G", save_latest=False)
        saved = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            net.weight.zero_()
        loaded, _ = engine.load_checkpoint(sys.argv[1], tag="G", load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        print("LOADED", loaded is not None, "THROUGH OURS", len(read),
              "RESTORED", all(torch.equal(saved[k], v) for k, v in net.state_dict().items()))
    """, str(tmp_path / "ckpt"))
    hook = "load_checkpoints_through"
    assert proc.returncode == 0, changed(hook, "deepspeed", "saving or loading through the wrapper failed") \
        + "\n" + outcome(proc)
    assert "ATTRIBUTE True" in proc.stdout, \
        changed(hook, "deepspeed", "the engine has no checkpoint_engine attribute") + "\n" + outcome(proc)
    found = re.search(r"LOADED True THROUGH OURS (\d+) RESTORED True", proc.stdout)
    assert found and int(found.group(1)) >= 1, \
        changed(hook, "deepspeed", "load_checkpoint no longer reads its files through engine.checkpoint_engine.load") \
        + "\n" + outcome(proc)


# ---------------------------------------------------------------------------------------------
# The hooks still work, in a real Accelerate and a real Ray Tune trial

SCRIPT = """
    import sys, threading
    from accelerate import Accelerator
    import ray
    from ray import tune
    from a2b_dist.compat import ray_trial_stop_event, reset_accelerate_state

    Accelerator(cpu=True)
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        print("ACCELERATE without reset: accepted")
    except ValueError:
        print("ACCELERATE without reset: refused")
    reset_accelerate_state()
    print("ACCELERATE after reset:", Accelerator(cpu=True, mixed_precision="bf16").mixed_precision)

    def trainable(config):
        ev = ray_trial_stop_event()
        tune.report({"event": float(isinstance(ev, threading.Event)), "unset": float(ev is not None and not ev.is_set())})

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    grid = tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=sys.argv[1], name="hook")).fit()
    print("RAY", grid[0].metrics["event"], grid[0].metrics["unset"])
"""


def test_accelerate_reset_and_ray_stop_event_still_work(tmp_path):
    proc = run_script(SCRIPT, str(tmp_path / "ray"))
    assert proc.returncode == 0, outcome(proc)
    lines = proc.stdout.splitlines()
    # the reset is needed (a second Accelerator with other settings is refused) and it works
    assert "ACCELERATE without reset: refused" in lines, \
        changed("reset_accelerate_state", "accelerate", "a second Accelerator with other settings is accepted "
                "without a reset: the hook may no longer be needed") + "\n" + outcome(proc)
    assert "ACCELERATE after reset: bf16" in lines, \
        changed("reset_accelerate_state", "accelerate", "after the reset a fresh Accelerator still gets the old "
                "settings") + "\n" + outcome(proc)
    # inside a real Tune trial the session's stop event exists and is not set while it runs
    assert "RAY 1.0 1.0" in lines, \
        changed("ray_trial_stop_event", "ray", "inside a trial the session has no unset stop_event") + "\n" + outcome(proc)


def test_preempt_signal_follows_submitit():
    from a2b_dist.jobs.launch import preempt_signal

    assert preempt_signal() == signal.SIGUSR2   # submitit's default
    code = "from a2b_dist.jobs.launch import preempt_signal; print(preempt_signal().name)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SUBMITIT_PREEMPT_SIGNAL": "USR1"})
    assert out.stdout.strip() == "SIGUSR1", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Nothing outside compat.py touches a dependency's internals

DEPS = r"(?:torch|accelerate|ray|deepspeed|webdataset|wds|submitit|fsspec)"
PRIVATE = [
    # the known hooks, by the names they touch
    re.compile(r"\._reset_state\b"),
    re.compile(r"\b_internal\b"),
    re.compile(r"\bget_session\b"),
    re.compile(r"__compatible_ops__"),
    re.compile(r"\.checkpoint_engine\s*=[^=]"),
    # any underscore name reached through a dependency's module path: torch._dynamo,
    # from ray.train._internal import ..., torch.distributed._x
    re.compile(rf"\b{DEPS}(?:\.[A-Za-z]\w*)*\._[A-Za-z]"),
    re.compile(rf"^\s*from\s+{DEPS}(?:\.\w+)*\.(?:_\w+)\b", re.M),
]


def test_no_private_dependency_name_outside_compat():
    files = [p for folder in ("a2b_dist", "jobs", "sweeps", "shards") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20 and ROOT / "a2b_dist" / "compat.py" in files
    found = []
    for path in files:
        if path == ROOT / "a2b_dist" / "compat.py":
            continue
        text = path.read_text()
        for pattern in PRIVATE:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {text.splitlines()[line - 1].strip()}")
    assert not found, ("a dependency's private name outside a2b_dist/compat.py (move it there as one small "
                       "function with the versions it was checked on, and test it here):\n" + "\n".join(found))
    # the patterns do find the hooks where they live
    compat = (ROOT / "a2b_dist" / "compat.py").read_text()
    assert all(p.search(compat) for p in PRIVATE[:5])
