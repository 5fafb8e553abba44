"""Every place the toolkit reaches into a dependency's private internals, one small function each.

Each does something the dependency offers no public API for. Each docstring names the versions it
was checked on (``CHECKED_ON``, the pins of requirements.txt) and why no public API does it;
tests/test_library_hooks.py runs each against the installed library and fails, naming the hook and
the installed version, when the library changes under it. Nothing else in the package, jobs/,
sweeps/ or shards/ may touch a dependency's private names (the same test greps for them).

Optional dependencies (Ray, DeepSpeed) are imported inside the functions that need them.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional

# The versions every hook below was checked on (requirements.txt's pins).
CHECKED_ON = {"accelerate": "1.15.0", "ray": "2.60.0", "deepspeed": "0.19.8", "torch": "2.14.1"}


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next ``Accelerator()`` is built afresh.

    A reused Ray worker has run ``train()`` before, and Accelerate keeps its state in process-wide
    singletons (``AcceleratorState``, ``PartialState``, ``GradientState``): a second Accelerator with
    other settings (mixed precision) is refused. Accelerate has no public reset; its own tests call
    ``AcceleratorState._reset_state(True)`` (which also resets ``PartialState``) and
    ``GradientState._reset_state()``. Checked on accelerate 1.15.0 (torch 2.14.1).
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def ray_trial_stop_event() -> Optional[threading.Event]:
    """The event Ray sets when it stops this trial (ASHA, PBT pause, end of sweep), if it has one.

    Read from the trial's session, ``ray.train._internal.session.get_session().stop_event``. Ray's
    public API (``ray.tune.report``, ``get_context``) offers no way to see the stop before the next
    report, and the trainer must stop at a step boundary with a checkpoint, not be killed in the
    middle of one. None outside a trial (or if Ray is not installed). Checked on ray 2.60.0.
    """
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        return None
    return getattr(get_session(), "stop_event", None)


def skip_deepspeed_op(name: str) -> None:
    """Mark DeepSpeed's op ``name`` as not compatible, so that DeepSpeed never builds it.

    On the CPU, DeepSpeed's communication backend compiles a shared-memory op
    (``ShareMemCommBuilder``) on first use (over a minute) that only its inference all-reduce uses;
    training collectives go through gloo. DeepSpeed has no option to leave it out: its
    ``deepspeed.comm.torch.build_shm_op`` builds it unless the probed table
    ``deepspeed.ops.__compatible_ops__`` says the op is incompatible, so the entry is set to False.
    Checked on deepspeed 0.19.8 (torch 2.14.1).
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__[name] = False


def load_checkpoints_through(engine: Any, load: Callable[..., Any]) -> None:
    """Make a DeepSpeed engine read every checkpoint file with ``load(path, map_location)``.

    DeepSpeed's engine reads its checkpoint files through its ``checkpoint_engine`` attribute, whose
    ``TorchCheckpointEngine.load`` unpickles the files with torch's full unpickler, which would run
    any code a checkpoint carries. DeepSpeed's config chooses among its own checkpoint engines
    only; none loads weights only. So the attribute is replaced by ``LoadThrough``, which loads
    through ``load`` and leaves everything else (saving, commit, who writes) to DeepSpeed's engine.
    Checked on deepspeed 0.19.8 (torch 2.14.1).
    """
    engine.checkpoint_engine = LoadThrough(engine.checkpoint_engine, load)


class LoadThrough:
    """A DeepSpeed checkpoint engine (``inner``) whose ``load(path, map_location)`` is ``load``'s;
    every other attribute is the wrapped engine's (``load_checkpoints_through``)."""

    def __init__(self, inner: Any, load: Callable[..., Any]):
        self.inner = inner
        self.load_file = load

    def load(self, path: str, map_location=None) -> Any:
        return self.load_file(path, map_location)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "load_file"):   # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


__all__ = ["CHECKED_ON", "LoadThrough", "load_checkpoints_through", "ray_trial_stop_event",
           "reset_accelerate_state", "skip_deepspeed_op"]
