"""Resuming a run: which checkpoint (``--resume``), whether this run can continue it, loading it,
and the metrics history cut back to it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from a2b_dist import backends
from a2b_dist import checkpoint as ckpt
from a2b_dist.config import Config, from_dict, get_field
from a2b_dist.errors import UserError
from a2b_dist.files import write_atomic
from a2b_dist.steps import derive_seed

if TYPE_CHECKING:
    from a2b_dist.train import Run


def resume_path(cfg: Config, resume: str, warn: Callable[[str], None]) -> Optional[Path]:
    """``auto``: the newest loadable checkpoint of the run (damaged newer ones are reported and
    skipped); ``none``; or a checkpoint / run folder, which must be loadable."""
    if resume == "none":
        return None
    if resume == "auto":
        return ckpt.newest_loadable(cfg.train.run_dir, warn=warn)
    from a2b_dist.data.storage import check_location   # the one location check: no credentials echoed

    check_location(resume, "--resume", local="checkpoints are read from local files")
    return ckpt.resolve_checkpoint(resume)


# Fields that shape the networks' tensors: a checkpoint resumes only into the same values.
SHAPE_FIELDS = ("model.width", "model.res_blocks", "model.critic_width", "model.critic_layers",
                "model.upsample", "model.mask_activation", "data.image_size", "data.channels")


def check_resumable(cfg: Config, path: Path, meta: dict, world: int) -> None:
    """Refuse, before anything is loaded or written, a checkpoint this run cannot continue."""
    written_by = meta.get("backend", "ddp")
    if written_by != cfg.train.backend:
        raise UserError(f"{path} was written with train.backend={written_by}; resume it with "
                        f"train.backend={written_by}, or start a new train.run_dir")
    backends.get(cfg.train.backend).check_resume(path, meta, world)
    theirs = from_dict(meta["config"], str(path / "meta.json"))
    differ = [(name, get_field(theirs, name), get_field(cfg, name)) for name in SHAPE_FIELDS
              if get_field(theirs, name) != get_field(cfg, name)]
    if differ:
        listed = ", ".join(f"{name}={old!r} (this run: {new!r})" for name, old, new in differ)
        raise UserError(f"{path} was trained with {listed}; resume with the checkpoint's values, or "
                        "start a new train.run_dir (or --resume none)")


def drop_rows_after(path: Path, step: int) -> int:
    """Remove metrics.jsonl rows past ``step`` (steps a resumed run repeats); returns how many.

    Rewritten to a temporary name and renamed, so readers (plots, the sweep) see one history.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1   # a line cut short by a crash
            continue
        if isinstance(row_step, (int, float)) and row_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


def load_checkpoint(run: Run) -> None:
    """Load ``run.start_from`` (checked by check_resumable) into a2b_dist.train's Run: weights,
    optimizers, step, selection and, from the same world size, this rank's streams and random
    state; from another world size every rank's randomness is reseeded from (seed, rank, step)."""
    if run.start_from is None:
        return
    cfg, rank = run.cfg, run.rank
    meta, rank_json, rank_tensors = run.backend.load(run.start_from, run.models, run.accelerator, rank,
                                                     warn=run.accelerator.print)
    run.step, run.best = int(meta["step"]), meta.get("best")
    same_world = meta["world_size"] == run.world and rank_json is not None
    if same_world:
        run.gp_gen.set_state(rank_tensors["gp_rng"])
        if "aug_rng" in rank_tensors:
            run.aug_gen.set_state(rank_tensors["aug_rng"])
        for role, stream in run.streams.items():
            stream.load_state_dict(rank_json["streams"][role], run.step)
    else:
        run.gp_gen.manual_seed(derive_seed(cfg.train.seed, rank, 7, run.step))
        run.aug_gen.manual_seed(derive_seed(cfg.train.seed, rank, 11, run.step))
        for role, stream in run.streams.items():
            stream.load_state_dict({}, run.step)
    run.accelerator.print(f"resumed from {run.start_from} at step {run.step}"
                          + ("" if same_world else f" (written by {meta['world_size']} processes, "
                                                   f"now {run.world}: data streams and RNG reseeded)"))
