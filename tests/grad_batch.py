"""The fixed global batch of tests/ddp_grad_check.py and tests/ds_grad_check.py, and this rank's part."""
import torch


def fixed_batch(cfg, acc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, slice]:
    """(a, b, alpha) for the whole global batch from a fixed seed, and the slice this rank takes."""
    g = torch.Generator().manual_seed(123)
    size, c, n = cfg.data.image_size, cfg.data.channels, cfg.train.batch_size
    a = torch.rand(n, c, size, size, generator=g) * 2 - 1
    b = torch.rand(n, c, size, size, generator=g) * 2 - 1
    alpha = torch.rand(n, 1, 1, 1, generator=g)
    per = n // acc.num_processes
    return a, b, alpha, slice(acc.process_index * per, (acc.process_index + 1) * per)
