"""Provenance: what produced a result, as one record.

The run folder's ``launches.jsonl`` gets one per (re)start of training (with the world size,
device and precision); report.html of ``a2b evaluate`` and ``a2b detect`` shows one (with the
SHA-256 of each scored shard role's manifest.json). Both are this function's record.
"""
from __future__ import annotations

import hashlib
import os
import platform
import socket
import sys
import time
from typing import Optional


def versions() -> dict[str, str]:
    """The versions that shape a result: Python and the libraries the toolkit runs on (DeepSpeed
    where it was imported)."""
    import accelerate
    import numpy as np
    import torch
    import webdataset

    return {"python": platform.python_version(), "torch": torch.__version__,
            "accelerate": accelerate.__version__, "webdataset": webdataset.__version__, "numpy": np.__version__,
            **({"deepspeed": sys.modules["deepspeed"].__version__} if "deepspeed" in sys.modules else {})}


def manifest_digest(location: str, storage=None) -> Optional[str]:
    """SHA-256 of a manifest.json (a path or a URL, read through ``storage``); None when unreadable."""
    from a2b_dist.data.storage import DataError, Storage

    try:
        return hashlib.sha256((storage or Storage()).read_bytes(str(location))).hexdigest()
    except (OSError, DataError):
        return None


def provenance(argv: Optional[list[str]] = None, *, manifests: Optional[dict[str, str]] = None, storage=None,
               accelerator=None) -> dict:
    """Time, command line, working folder, host, versions and SLURM job; with ``accelerator`` the
    world size, device and mixed precision of a training; with ``manifests`` ({role: manifest.json
    location}) each one's path and SHA-256."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv if argv is None else argv),
              "cwd": os.getcwd(), "host": socket.gethostname()}
    if accelerator is not None:
        record.update(world_size=accelerator.num_processes, device=str(accelerator.device),
                      mixed_precision=accelerator.mixed_precision)
    record["versions"] = versions()
    record["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    if manifests is not None:
        record["manifests"] = {name: {"path": str(p), "sha256": manifest_digest(p, storage)}
                               for name, p in manifests.items()}
    return record
