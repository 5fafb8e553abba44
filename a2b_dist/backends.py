"""Training backends behind one face (``train.backend``): ``ddp``, DistributedDataParallel through
Accelerate (the default), and ``deepspeed``, one DeepSpeed engine per network (a2b_dist.ds_backend).

A backend prepares its imports, builds the networks with their optimizers (``Models``), picks the
class of the update phases, and saves and loads its part of a checkpoint. train.py and
checkpoint.py ask the backend and never branch on its name. Every checkpoint holds the networks'
full weights in the generic safetensors shards (checkpoint.py's folder protocol), so export,
evaluation and detection read a checkpoint of either backend the same way, without DeepSpeed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from a2b_dist import checkpoint as ckpt
from a2b_dist import ds_backend
from a2b_dist.config import Config
from a2b_dist.errors import UserError
from a2b_dist.updates import A2BUpdates, Models, build_networks, make_ema

# What a backend hands to checkpoint.save_checkpoint: the global state (tensors shared by all
# ranks) and, optionally, a writer of the backend's own files into the temporary folder.
Parts = dict[str, Any]


class DDPBackend:
    """Both networks wrapped by ``accelerator.prepare`` (DDP when there are several processes), two
    torch Adam optimizers, an optional generator average; the global state is both networks, both
    optimizers, the fp16 scaler and the average, split over the ranks' safetensors shards."""

    name = "ddp"

    def prepare(self, cfg: Config) -> None:
        """Imports and environment a backend needs before the Accelerator exists: none here."""

    def build(self, cfg: Config, accelerator) -> Models:
        G, D = build_networks(cfg)
        o = cfg.optim
        opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
        # torch.compile covers the generator only: the critic's gradient penalty needs double
        # backward, which compiled graphs do not support.
        G_fwd = torch.compile(G) if cfg.train.compile else G
        G_train, D_train, opt_g, opt_d = accelerator.prepare(G_fwd, D, opt_g, opt_d)
        G.to(accelerator.device), D.to(accelerator.device)
        G_ema = make_ema(G, cfg.train.ema_decay) if cfg.train.ema_decay else None
        return Models(G, D, G_train, D_train, opt_g, opt_d, G_ema)

    def updates(self, cfg: Config, models: Models, accelerator, gp_generator: torch.Generator) -> A2BUpdates:
        return A2BUpdates(cfg, models, accelerator, gp_generator)

    def check_resume(self, path: Path, meta: dict, world: int) -> None:
        """Refuse a checkpoint this backend cannot continue with ``world`` processes: DDP takes any."""

    def checkpoint_parts(self, models: Models, accelerator) -> Parts:
        state = {"G": models.G.state_dict(), "D": models.D.state_dict(),
                 "opt_g": models.opt_g.state_dict(), "opt_d": models.opt_d.state_dict()}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        if models.G_ema is not None:
            state["G_ema"] = models.G_ema.state_dict()   # module.* weights and n_averaged
        return {"global_state": state}

    def load(self, path: Path, models: Models, accelerator, rank: int,
             warn: Callable[[str], None]) -> tuple[dict, Optional[dict], dict]:
        """Restore ``models`` from ``path``: (meta, this rank's json state or None, its tensors)."""
        state, meta, rank_json, rank_tensors = ckpt.load_checkpoint(path, rank)
        models.G.load_state_dict(state["G"])
        models.D.load_state_dict(state["D"])
        models.opt_g.load_state_dict(state["opt_g"])
        models.opt_d.load_state_dict(state["opt_d"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        if models.G_ema is not None:
            if "G_ema" in state:
                models.G_ema.load_state_dict(state["G_ema"])
            else:  # switched on at a resume: the average starts from the weights at hand
                warn(f"{path} holds no generator average; starting it at step {meta['step']}")
        return meta, rank_json, rank_tensors


class DeepSpeedBackend(DDPBackend):
    """Each network a DeepSpeed engine (ZeRO 0 or 1) with DeepSpeed's torch Adam; the engines write
    their own sharded files (``G/``, ``D/``) into the checkpoint folder, beside the generic shards
    that hold the full weights (so a checkpoint exports without DeepSpeed)."""

    name = "deepspeed"

    def prepare(self, cfg: Config) -> None:
        ds_backend.require_deepspeed(cfg)

    def build(self, cfg: Config, accelerator) -> Models:
        G, D = build_networks(cfg)
        G_train, D_train = ds_backend.initialize(cfg, G, D, accelerator)  # moves G and D to the device
        return Models(G, D, G_train, D_train, G_train.optimizer, D_train.optimizer)

    def updates(self, cfg: Config, models: Models, accelerator, gp_generator: torch.Generator) -> A2BUpdates:
        return ds_backend.DeepSpeedUpdates(cfg, models, accelerator, gp_generator)

    def check_resume(self, path: Path, meta: dict, world: int) -> None:
        if meta["world_size"] != world:
            raise UserError(f"{path} was written by {meta['world_size']} DeepSpeed processes; resume "
                            f"it with {meta['world_size']} (ZeRO shards are per process), or export its "
                            "generator with `a2b export`")

    def checkpoint_parts(self, models: Models, accelerator) -> Parts:
        engines = {"G": models.G_train, "D": models.D_train}
        return {"global_state": {"G": models.G.state_dict(), "D": models.D.state_dict()},
                "write_extra": lambda folder: ds_backend.save(folder, engines)}

    def load(self, path: Path, models: Models, accelerator, rank: int,
             warn: Callable[[str], None]) -> tuple[dict, Optional[dict], dict]:
        ds_backend.load(path, {"G": models.G_train, "D": models.D_train})   # weights, Adam, steps
        meta = ckpt.read_meta(path)
        return (meta, *ckpt.load_rank_state(path, rank, meta))


BACKENDS = {b.name: b for b in (DDPBackend(), DeepSpeedBackend())}


def get(name: str) -> DDPBackend:
    """The backend called ``name`` (train.backend; the config has checked the choice)."""
    return BACKENDS[name]
