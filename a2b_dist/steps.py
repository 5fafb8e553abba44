"""One training step and what the ranks agree on after it; the trainer and the speed benchmarks
share them.

One step = one paper iteration: ``optim.n_critic`` critic updates (each on a fresh batch of A and B),
then one generator update on the last of those batches (StarGAN's order). The learning rate is a pure
function of the step (constant, then linear decay over the last ``optim.decay_steps``), so resuming
needs no scheduler state.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from a2b_dist import backends
from a2b_dist import losses as L
from a2b_dist.config import Config, ConfigError, trackers
from a2b_dist.errors import UserError
from a2b_dist.updates import A2BUpdates, Models

# Under fp16 a loss-scale overflow makes a step's losses inf (GradScaler skips it); more than this
# many in a row is a real divergence.
MAX_FP16_OVERFLOWS = 20
LOSS_TERMS = ("loss_d", "wasserstein", "gp", "cls_d", "loss_g", "adv_g", "rec", "idt", "idt_out", "focus",
              "mask_sup", "pseudo", "cls", "pu")


class NonFiniteLoss(UserError):
    """A loss became NaN or infinite; nothing was saved over the last good checkpoint."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, purpose...), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def set_learning_rates(cfg: Config, models: Models, step: int) -> tuple[float, float]:
    """Both learning rates for ``step`` (the paper: linear decay to 0 over the last optim.decay_steps)."""
    lr_g = L.linear_decay_lr(cfg.optim.lr_g, step, cfg.train.steps, cfg.optim.decay_steps)
    lr_d = L.linear_decay_lr(cfg.optim.lr_d, step, cfg.train.steps, cfg.optim.decay_steps)
    for group in models.opt_g.param_groups:
        group["lr"] = lr_g
    for group in models.opt_d.param_groups:
        group["lr"] = lr_d
    return lr_g, lr_d


def train_step(cfg: Config, models: Models, updates: A2BUpdates, next_batch: Callable[[str], torch.Tensor],
               step: int) -> tuple[dict, tuple[float, float]]:
    """One paper iteration at ``step`` (0-based): the learning rates, optim.n_critic critic updates
    (Eq. 4) each on a fresh batch of A (``next_batch("mixed")``) and B (``next_batch("healthy")``),
    then one generator update (Eq. 10) on the last batch. Returns this step's losses (the last
    critic update's and the generator update's, LOSS_TERMS, unreduced tensors) and (lr_g, lr_d).

    The trainer's loop and the speed benchmarks both call this; only their batches differ.
    """
    lrs = set_learning_rates(cfg, models, step)
    for _ in range(cfg.optim.n_critic):
        a, b = next_batch("mixed"), next_batch("healthy")
        stats = updates.critic_update(a, b)
    stats.update(updates.generator_update(a, b, step))
    return stats, lrs


class TrainBatches:
    """``next_batch(role)`` for train_step: the next batch of a role's stream on the device, in the
    configured memory format, each image flipped left-right with probability 1/2 when data.hflip
    (drawn from ``aug_gen``, which checkpoints save); counts the seconds spent waiting for data."""

    def __init__(self, cfg: Config, streams: dict, aug_gen: torch.Generator, device: torch.device):
        self.iters = {role: iter(s) for role, s in streams.items()}
        self.hflip, self.aug_gen, self.device = cfg.data.hflip, aug_gen, device
        self.fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.wait = 0.0
        self.fetched: list[tuple[str, torch.Tensor]] = []

    def fetch_step(self, n_critic: int) -> None:
        """Read one step's batches (mixed, healthy per critic update, train_step's order) before any
        update, so a data error stops training between steps, never inside one."""
        self.fetched = [(role, self._read(role)) for _ in range(n_critic) for role in ("mixed", "healthy")]

    def __call__(self, role: str) -> torch.Tensor:
        if self.fetched:
            fetched_role, x = self.fetched.pop(0)
            assert fetched_role == role, (fetched_role, role)
            return x
        return self._read(role)

    def _read(self, role: str) -> torch.Tensor:
        t = time.perf_counter()
        x = next(self.iters[role])
        if self.hflip:
            flip = (torch.rand(x.shape[0], generator=self.aug_gen) < 0.5).view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
        self.wait += time.perf_counter() - t
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt)

    def take_wait(self) -> float:
        """Seconds waited since the last call; clears them."""
        wait, self.wait = self.wait, 0.0
        return wait


class StepAgreement:
    """What all ranks agree on after each step, in one all-reduce: the mean losses (for logging),
    whether they are finite, and whether any rank asked to stop.

    Finite losses are added to running sums that ``take_means`` reads and clears. A non-finite
    loss raises NonFiniteLoss on every rank alike, except under fp16, where GradScaler skips an
    overflowing update and lowers its scale (its job) up to MAX_FP16_OVERFLOWS times in a row.
    """

    def __init__(self, world: int, device: torch.device, fp16: bool):
        self.world, self.device, self.fp16 = world, device, fp16
        self.sums = torch.zeros(len(LOSS_TERMS), device=device, dtype=torch.float64)
        self.steps = 0               # finite steps in the sums
        self.overflow_streak = 0

    def agree(self, stats: dict, stop: bool, step: int, last_good: Optional[Path] = None) -> bool:
        """All-reduce ``stats`` (LOSS_TERMS) and the stop flag; True when any rank asked to stop."""
        n = len(LOSS_TERMS)
        vec = torch.stack([stats[k].double() for k in LOSS_TERMS]
                          + [torch.tensor(float(stop), device=self.device, dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(vec)
        vec[:n] /= self.world
        if torch.isfinite(vec).all():
            self.overflow_streak = 0
            self.sums += vec[:n]
            self.steps += 1
        elif self.fp16 and self.overflow_streak < MAX_FP16_OVERFLOWS:
            self.overflow_streak += 1
        else:
            bad = [k for k, v in zip(LOSS_TERMS, vec.tolist()) if not math.isfinite(v)]
            raise NonFiniteLoss(
                f"step {step}: non-finite loss ({', '.join(bad)}); stopped without saving. "
                f"The last good checkpoint is {last_good or 'none (no checkpoint yet)'}; lower the "
                f"learning rates or use train.mixed_precision=no/bf16 and resume from it.")
        return vec[-1].item() > 0

    def take_means(self) -> tuple[dict[str, float], int]:
        """Mean of each loss over the finite steps since the last call, and how many; clears them."""
        means = dict(zip(LOSS_TERMS, (self.sums / max(self.steps, 1)).tolist()))
        steps = self.steps
        self.sums.zero_()
        self.steps = 0
        return means, steps


def make_accelerator(cfg: Config):
    """The Accelerator of a training: CPU or GPU, the config's precision, train.log_with's trackers."""
    from accelerate import Accelerator

    cpu = cfg.train.cpu or not torch.cuda.is_available()
    # The config's precision wins over `accelerate launch --mixed_precision` (Accelerator's argument
    # overrides the launcher); fp16 autocast needs a GPU, so on CPU it is refused with a message.
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    # No DDP buffer options: the networks hold no buffers (InstanceNorm keeps no running statistics,
    # checked in build_models), so DDP has nothing to broadcast in either network's forward.
    names = trackers(cfg)
    return Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision, step_scheduler_with_optimizer=False,
                       log_with=names or None, project_dir=cfg.train.run_dir if names else None)


def build_models(cfg: Config, accelerator) -> Models:
    """The networks and optimizers as train.backend builds them (the speed benchmarks use this too)."""
    return backends.get(cfg.train.backend).build(cfg, accelerator)


def read_step(next_batch: TrainBatches, n_critic: int, world: int, device: torch.device) -> Optional[str]:
    """Read the next step's batches on every rank; the first rank's data error, if any rank had
    one (every rank learns it, so all stop at the same step boundary), else None."""
    from a2b_dist.data import DataError
    from a2b_dist.distributed import gather_objects

    message = None
    try:
        next_batch.fetch_step(n_critic)
    except DataError as e:
        message = str(e)
    if world > 1:
        flag = torch.tensor(float(message is not None), device=device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            message = next(m for m in gather_objects(message, world) if m is not None)
    return message
