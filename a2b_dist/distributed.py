"""Helpers for code that runs on every rank: gathering Python objects, picking samples the same
way on any number of ranks."""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-item list without a process group)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def sample_priority(key: str, seed: int) -> float:
    """A fixed pseudo-random number in [0, 1) per (seed, key): picks samples the same way on any
    number of ranks and without touching any global RNG."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64
