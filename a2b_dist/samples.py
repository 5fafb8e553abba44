"""The sample grids a training writes every train.sample_every steps (RUN/samples/step-N.png):
input, B_int, mask, B' and difference map of a fixed batch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from a2b_dist import losses as L
from a2b_dist.config import Config
from a2b_dist.files import atomic_path


def sample_batch(cfg: Config, n: int = 8) -> Optional[torch.Tensor]:
    """A fixed batch for sample grids: the first images of the val role (else the mixed role)."""
    from a2b_dist.data import eval_batches
    from a2b_dist.data.manifest import role_exists
    from a2b_dist.data.storage import Storage, join

    storage = Storage.from_config(cfg.data)
    for role in ("val", "mixed"):
        if role_exists(cfg.data.root, role, storage):
            for batch in eval_batches(join(cfg.data.root, role), batch_size=n, image_size=cfg.data.image_size,
                                      channels=cfg.data.channels, storage=storage):
                return batch["image"]
    return None


@torch.no_grad()
def save_samples(G: torch.nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    """Grid: rows input, B_int, mask, B', difference map; one column per image. Written to ``path``
    and returned as one (C, H, W) image in [0, 1]."""
    from torchvision.utils import make_grid, save_image

    was_training = G.training
    G.eval()
    b_int, mask = G(x)
    b_prime = L.blend_healthy(x, b_int, mask)
    diff = L.anomaly_map(x, b_prime)
    G.train(was_training)
    c = x.shape[1]
    to01 = lambda t: (t.float().clamp(-1, 1) + 1) / 2  # noqa: E731
    rows = [to01(x), to01(b_int), mask.float().expand(-1, c, -1, -1),
            to01(b_prime), (diff / 2).clamp(0, 1).expand(-1, c, -1, -1)]
    grid = make_grid(torch.cat(rows).cpu(), nrow=x.shape[0], padding=1)
    with atomic_path(path, suffix=".png") as tmp:
        save_image(grid, str(tmp))
    return grid
