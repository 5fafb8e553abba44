"""DeepSpeed backend (``train.backend=deepspeed``): both networks as DeepSpeed engines, ZeRO stage 0 or 1.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m a2b_dist.train --config configs/test.yaml train.backend=deepspeed train.zero_stage=1

Accelerate still starts the processes and the process group; ``deepspeed.initialize`` is called
directly, once per network, because Accelerate's DeepSpeed integration drives one engine per
``Accelerator.backward`` (README, "DeepSpeed"). What differs from DDP, and why:

- Precision: the engines keep fp32 weights and the step runs under the same ``torch.autocast`` as
  the DDP path (bf16 or none); DeepSpeed's own bf16 mode would cast the networks' weights, which the
  gradient penalty, evaluation and export all read. fp16 is refused.
- Optimizer: DeepSpeed's "Adam" with ``torch_adam`` (``torch.optim.Adam``: no op to compile) and
  ``adam_w_mode`` off, so the update is the DDP path's Adam; DeepSpeed's default gradient clipping
  (1.0) is switched off because the paper does not clip.
- Checkpoints: each engine writes DeepSpeed's own sharded files (``G/``, ``D/`` inside the step
  folder; a2b_dist.checkpoint owns the folder); they are read back with
  ``torch.load(weights_only=True)`` and an allowlist of the three DeepSpeed types in ZeRO shards.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from a2b_dist import compat
from a2b_dist.config import Config, ConfigError
from a2b_dist.errors import UserError
from a2b_dist.updates import A2BUpdates

PINNED = "0.19.8"   # the version requirements.txt pins and the tests run


def require_deepspeed(cfg: Config) -> None:
    """Import deepspeed (CPU runs: DeepSpeed's CPU accelerator) or say how to get it."""
    if cfg.train.cpu or not torch.cuda.is_available():
        # Pick the CPU accelerator explicitly: quiet, and right where train.cpu=true on a GPU machine.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"train.backend=deepspeed needs the deepspeed package ({e}): install the extra with "
            f"`pip install 'a2b_dist[deepspeed]'` (deepspeed=={PINNED}), or choose train.backend=ddp") from None


def engine_config(cfg: Config, lr: float, micro_batch: int) -> dict:
    """The DeepSpeed config of one network's engine."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,                     # DeepSpeed's default is 1.0; the paper does not clip
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "optimizer": {"type": "Adam", "params": {
            "lr": lr, "betas": [o.beta1, o.beta2], "eps": 1e-8, "weight_decay": 0.0,
            "torch_adam": True, "adam_w_mode": False}},
        "bf16": {"enabled": False},                   # precision comes from torch.autocast (see above)
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _init_process_group(device: torch.device) -> None:
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != device.type:
        raise UserError(f"DeepSpeed picked its {accel.device_name()} accelerator but the trainer runs on "
                        f"{device}; set DS_ACCELERATOR={device.type}")
    if device.type == "cpu":
        # DeepSpeed's CPU communication backend compiles a shared-memory op on first use (over a
        # minute) that only its inference all-reduce uses; training collectives go through gloo.
        shm = accel.get_op_builder("ShareMemCommBuilder")
        if shm is not None:
            compat.skip_deepspeed_op(shm.NAME)
    if not dist.is_initialized():
        # One process: Accelerate starts no process group, DeepSpeed needs one (of size 1) and the
        # LOCAL_RANK a launcher would set.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(accel.communication_backend_name(), store=dist.HashStore(), rank=0, world_size=1)


def initialize(cfg: Config, G: torch.nn.Module, D: torch.nn.Module, accelerator) -> tuple[Any, Any]:
    """(generator engine, critic engine); both read their checkpoints through ``load_weights_only``."""
    import deepspeed

    _init_process_group(accelerator.device)
    micro = cfg.train.batch_size // accelerator.num_processes
    engines = []
    for net, lr in ((G, cfg.optim.lr_g), (D, cfg.optim.lr_d)):
        engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                               config=engine_config(cfg, lr, micro))
        compat.load_checkpoints_through(engine, load_weights_only)
        engines.append(engine)
    return engines[0], engines[1]


def save(folder: str | Path, engines: dict) -> None:
    """Each engine writes DeepSpeed's sharded checkpoint into ``folder/<name>/`` (collective)."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=name, save_latest=False)


def load(path: str | Path, engines: dict) -> None:
    """Restore each engine (weights, Adam state, its step count) from ``path/<name>/`` (collective)."""
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(str(path), tag=name, load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"{path}/{name} is not a readable DeepSpeed checkpoint")


def checkpoint_types() -> list:
    """The only non-torch types in DeepSpeed's ZeRO shards (checked by tests/test_deepspeed.py)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location=None) -> Any:
    """torch.load(weights_only=True) of one file of a DeepSpeed checkpoint."""
    with torch.serialization.safe_globals(checkpoint_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedUpdates(A2BUpdates):
    """The same phases with both networks as DeepSpeed engines (``train.backend=deepspeed``).

    ``engine.backward`` and ``engine.step`` (which also clears the gradients) take the optimizers'
    place. An engine's forward hooks its outputs so that the next backward through them runs
    DeepSpeed's gradient reduction when it ends, and the gradient penalty's autograd.grad is such a
    backward: through the engine it would reduce the critic's gradients before they exist. So the
    interpolates go through the bare critic module, real and fake through the engine, and the one
    engine.backward of the critic loss reaches every critic weight through both. As under DDP, the
    generator update runs the critic bare and frozen: no critic gradient, no critic reduction.
    """

    def critic_outputs(self, b: torch.Tensor, fake: torch.Tensor, x_hat: torch.Tensor,
                       a: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        parts = [b, fake] + ([a.float()] if a is not None else [])
        d_real, d_fake, *d_mixed = self.m.D_train(torch.cat(parts).contiguous(memory_format=self.memory_format)
                                                  ).split(b.shape[0])
        d_hat = self.m.D(x_hat.contiguous(memory_format=self.memory_format))
        return (d_real, d_fake, d_hat, *d_mixed)

    def apply(self, loss: torch.Tensor, trained, opt) -> None:
        trained.backward(loss)   # the engine reduces gradients; its step also clears them
        trained.step()
