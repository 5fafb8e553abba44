"""A signal as a stop request: the trainer's SIGTERM and the SLURM launcher's preemption signal.

    with StopOnSignal(signal.SIGTERM, then=", then exit") as term:   # the trainer, while it trains
        train(..., stop_requested=term)
    stop = StopOnSignal(preempt_signal()).install()                  # the launcher, for the task's life
    ...; stop.call_previous()                                        # submitit's requeue, once saved

The handler only raises a flag. The trainer polls it after every step and all-reduces it, so
whichever rank got the signal, all ranks stop at the same step boundary and save one checkpoint
together (shared/DESIGN.md rule 8; jobs/README.md, "Preemption and time limits").
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional


class StopOnSignal:
    """A stop flag raised by ``signum`` (``stop()`` is True once it arrived; ``received`` is when).

    ``install()`` (or ``with``) replaces the signal's handler and keeps the one it replaced:
    leaving the ``with`` block restores it, and ``call_previous()`` hands the signal on to it once
    the loop has saved (submitit's preemption handler: ``checkpoint()``, requeue, exit). Forked
    data-loader workers inherit the handler and ignore the signal (their parent stops them). Outside
    the main thread (a Ray worker thread) signals cannot be handled; nothing is installed.
    """

    def __init__(self, signum: int, then: str = "") -> None:
        self.signum = signal.Signals(signum)
        self.then = then          # the end of the one line printed when the signal arrives
        self.pid = os.getpid()
        self.received: Optional[float] = None
        self.previous: Any = None

    @property
    def name(self) -> str:
        return self.signum.name

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(self.signum, self._on_signal)
        return self

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None

    def __enter__(self) -> "StopOnSignal":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __call__(self) -> bool:
        return self.received is not None

    def call_previous(self) -> None:
        """Hand the (agreed, saved) stop to the handler this one replaced, where that is a function."""
        if callable(self.previous):
            self.previous(self.signum, None)

    def _on_signal(self, signum: int, frame: Any = None) -> None:
        if os.getpid() != self.pid:
            return
        if self.received is None:
            print(f"a2b: caught {signal.Signals(signum).name}; all ranks save at the next step boundary{self.then}",
                  file=sys.stderr, flush=True)
        self.received = time.time()
