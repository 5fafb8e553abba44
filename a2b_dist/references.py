"""Training-free references: what no learning achieves on the same images (greyness; distance to
the healthy mean image)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from a2b_dist.data import EvalReader
from a2b_dist.distributed import gather_objects
from a2b_dist.errors import UserError


def greyness(x: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - |2u - 1| with u = (x + 1) / 2 the image in [0, 1]: (B, C, H, W) in [-1, 1] -> (B,).
    High for mid-grey pixels; a mean-filled square on black background raises it."""
    u = (x.float() + 1) / 2
    return (1 - (2 * u - 1).abs()).flatten(1).mean(dim=1)


def healthy_distance(x: torch.Tensor, healthy_mean: torch.Tensor) -> torch.Tensor:
    """Mean absolute distance, in [0, 1] intensity units, to the healthy mean image (C, H, W): -> (B,)."""
    return ((x.float() - healthy_mean.float().to(x.device)).abs() / 2).flatten(1).mean(dim=1)


@torch.no_grad()
def healthy_mean_image(healthy_dir: str | os.PathLike, reader: Optional[EvalReader] = None) -> torch.Tensor:
    """Mean image (C, H, W) in [-1, 1] over a role (the healthy shards), summed across ranks."""
    reader = reader or EvalReader(batch_size=64)
    total: Optional[torch.Tensor] = None
    count = 0
    for batch in reader.batches(healthy_dir):
        s = batch["image"].double().sum(dim=0)
        total = s if total is None else total + s
        count += batch["image"].shape[0]
    parts = gather_objects((total, count), reader.world_size)
    sums = [t for t, _ in parts if t is not None]
    n = sum(c for _, c in parts)
    if not n:
        raise UserError(f"{healthy_dir} holds no images to average for the healthy-distance reference")
    return (torch.stack(sums).sum(dim=0) / n).float()
