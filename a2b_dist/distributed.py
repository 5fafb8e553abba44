"""Helpers for code that runs on every rank: gathering Python objects, picking samples the same
way on any number of ranks."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from a2b_dist.errors import UserError

T = TypeVar("T")


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-item list without a process group)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def all_reduce_sum(array: np.ndarray, world_size: int, device: str | torch.device = "cpu") -> np.ndarray:
    """The element-wise sum of a fixed-size float64 array over the ranks, in one all-reduce (the
    array itself without a process group). ``device``: where the backend wants tensors (CUDA for NCCL)."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(device)
        torch.distributed.all_reduce(t)
        return t.cpu().numpy()
    return array


def verified_once(open_with: Callable[[str], T], verify: str, rank: int, world_size: int) -> T:
    """``open_with(verify)`` on every rank, except that ``sha256`` (which reads every shard) runs on
    rank 0 alone while the other ranks check sizes; rank 0's verdict, a UserError, is raised on
    every rank (a rank that failed alone would leave the others waiting at the next collective)."""
    if verify != "sha256" or world_size == 1:
        return open_with(verify)
    result, message = None, None
    if rank == 0:
        try:
            result = open_with("sha256")
        except UserError as e:
            message = str(e)
    message = gather_objects(message, world_size)[0]
    if message is not None:
        raise UserError(message)
    return result if rank == 0 else open_with("size")


def sample_priority(key: str, seed: int) -> float:
    """A fixed pseudo-random number in [0, 1) per (seed, key): picks samples the same way on any
    number of ranks and without touching any global RNG."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64
