"""A2B-GAN training loop: one loop for a laptop CPU, one GPU, or many nodes.

    a2b train --config configs/test.yaml                       # one process
    a2b train --config configs/demo.yaml train.steps=500       # dotted overrides
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m a2b_dist.train --config configs/test.yaml            # DDP (2 CPU processes over gloo here)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m a2b_dist.train --config configs/test.yaml train.backend=deepspeed   # DeepSpeed ZeRO 1
    python jobs/submit.py --partition gpu --nodes 4 --config configs/covid.yaml   # SLURM

One step = one paper iteration: ``optim.n_critic`` critic updates (each on a fresh batch of A and B),
then one generator update on the last of those batches (StarGAN's order). ``train.batch_size`` is
the global batch, split evenly over the processes. The learning rate is a pure function of the step
(constant, then linear decay over the last ``optim.decay_steps``), so resuming needs no scheduler state.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from a2b_dist import backends
from a2b_dist import checkpoint as ckpt
from a2b_dist import losses as L
from a2b_dist.config import Config, ConfigError, from_dict, get_field, save_config, to_dict, trackers
from a2b_dist.errors import UserError
from a2b_dist.files import append_jsonl, atomic_path, hold_folder, write_atomic
from a2b_dist.updates import A2BUpdates, Models

# Under fp16 a loss-scale overflow makes a step's losses inf (GradScaler skips it); more than this
# many in a row is a real divergence.
MAX_FP16_OVERFLOWS = 20
LOSS_TERMS = ("loss_d", "wasserstein", "gp", "cls_d", "loss_g", "adv_g", "rec", "idt", "idt_out", "focus",
              "mask_sup", "pseudo", "cls")


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


def record_launch(run_dir: Path, accelerator, argv: list[str]) -> None:
    """Append versions, command line and world size for this (re)start to the run folder."""
    import accelerate
    import webdataset

    info = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv, "cwd": os.getcwd(),
            "host": socket.gethostname(), "world_size": accelerator.num_processes,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "accelerate": accelerate.__version__, "webdataset": webdataset.__version__,
                         "numpy": np.__version__,
                         **({"deepspeed": sys.modules["deepspeed"].__version__}
                            if "deepspeed" in sys.modules else {})},
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    append_jsonl(run_dir / "launches.jsonl", info)


_TRACKER_DEFAULTS: dict[str, str] = {}   # environment values prepare_tracker_env chose, not the user


def prepare_tracker_env(cfg: Config) -> None:
    """Defaults for the trackers' own settings, before the Accelerator starts them: MLflow writes to
    a file store in the run folder (no server, no database) unless MLFLOW_TRACKING_URI points
    elsewhere (a tracking server, sqlite:///...); wandb runs offline
    (into the run folder) unless WANDB_MODE or WANDB_API_KEY is set, so no run needs a network."""
    import importlib.util

    run_dir = Path(cfg.train.run_dir).resolve()
    names = trackers(cfg)
    for name, package, install in (("mlflow", "mlflow", "pip install 'a2b_dist[mlflow]'"),
                                   ("wandb", "wandb", "pip install wandb")):
        if name in names and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.log_with={cfg.train.log_with} needs the {package} package: {install}, "
                              f"or leave {name} out")
    def default(key: str, value: str) -> None:
        # A value this function set for an earlier run in the same process (a sweep's reused worker)
        # is that run's; it is replaced. A value the user set is kept.
        if os.environ.get(key) is None or _TRACKER_DEFAULTS.get(key) == os.environ[key]:
            os.environ[key] = _TRACKER_DEFAULTS[key] = value

    if "mlflow" in names:
        default("MLFLOW_TRACKING_URI", (run_dir / "mlruns").as_uri())
        if _TRACKER_DEFAULTS.get("MLFLOW_TRACKING_URI") == os.environ["MLFLOW_TRACKING_URI"]:
            default("MLFLOW_ALLOW_FILE_STORE", "true")   # our file store; MLflow 3 keeps it in maintenance mode
    if "wandb" in names:
        if not os.environ.get("WANDB_API_KEY"):
            default("WANDB_MODE", "offline")
        default("WANDB_DIR", str(run_dir))


class MetricsLog:
    """metrics.jsonl (one JSON object per line, main process only) and the trackers of
    train.log_with through Accelerate (``accelerator.log``): scalars, the sample grids as images."""

    def __init__(self, cfg: Config, accelerator, run_dir: Path, resumed_at: Optional[int] = None):
        self.enabled = accelerator.is_main_process
        self.acc = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.names = trackers(cfg)
        if self.names:
            # After a resume, TensorBoard hides the events past the checkpoint (they are rerun).
            kwargs = {"tensorboard": {"purge_step": resumed_at + 1}} if resumed_at is not None else {}
            kwargs["mlflow"] = {"run_name": f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
            flat = {f"{section}.{k}": v for section, fields in to_dict(cfg).items() for k, v in fields.items()}
            accelerator.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in flat.items()}, init_kwargs=kwargs)

    def where(self) -> list[str]:
        """One line per tracker: where to look."""
        lines = []
        if "tensorboard" in self.names:
            lines.append(f"tensorboard --logdir {self.path.parent / 'tb'}")
        if "mlflow" in self.names:
            lines.append(f"mlflow ui --backend-store-uri {os.environ.get('MLFLOW_TRACKING_URI')}")
        if "wandb" in self.names:
            lines.append(f"wandb ({os.environ.get('WANDB_MODE', 'online')}) in {os.environ.get('WANDB_DIR')}")
        return lines

    def write(self, record: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, record)
        if self.names:
            values = {k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.acc.log(values, step=record["step"])

    def images(self, grid: torch.Tensor, png: Path, step: int) -> None:
        """The sample grid (C, H, W in [0, 1]) to each tracker that keeps images (main process)."""
        if not self.enabled:
            return
        if "tensorboard" in self.names:
            self.acc.get_tracker("tensorboard").log_images({"samples": grid.cpu().numpy()}, step=step,
                                                          dataformats="CHW")
        if "mlflow" in self.names:
            self.acc.get_tracker("mlflow").log_artifact(str(png), artifact_path="samples")
        if "wandb" in self.names:
            self.acc.get_tracker("wandb").log_images({"samples": [grid.permute(1, 2, 0).cpu().numpy()]}, step=step)

    def close(self) -> None:
        # Each tracker's finish(), not accelerator.end_training(): that also destroys the process
        # group, which train() still needs (and a sweep's next trial after it).
        if self.names and self.enabled:
            for tracker in self.acc.trackers:
                tracker.finish()


def _open_streams(cfg: Config, rank: int, world: int):
    """The two training streams of this rank; their shards checked on open (data.verify). With
    sha256 on several processes rank 0 alone reads every shard, once, and all ranks share its verdict."""
    from a2b_dist.data import StreamSpec, TrainStream
    from a2b_dist.data.manifest import build_hint, role_exists
    from a2b_dist.data.storage import Storage, join
    from a2b_dist.distributed import verified_once

    storage = Storage.from_config(cfg.data)
    per_rank = cfg.train.batch_size // world

    def open_all(verify: str) -> dict:
        streams = {}
        for tag, role in enumerate(("mixed", "healthy")):
            role_dir = join(cfg.data.root, role)
            if not role_exists(cfg.data.root, role, storage):
                raise UserError(f"no {role} shards at {role_dir} (data.root={cfg.data.root}). "
                                f"{build_hint(cfg.data.root, cfg.data.image_size)}")
            streams[role] = TrainStream(   # checks the shards (damaged ones skipped with data.skip_corrupt)
                role_dir, StreamSpec.from_config(cfg.data, batch_size=per_rank, seed=derive_seed(cfg.train.seed, tag),
                                                 rank=rank, world_size=world, verify=verify), storage=storage)
        return streams

    return verified_once(open_all, cfg.data.verify, rank, world)


def _sample_batch(cfg: Config, n: int = 8) -> Optional[torch.Tensor]:
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


def _resume_path(cfg: Config, resume: str, warn: Callable[[str], None]) -> Optional[Path]:
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


class StopOnTerminate:
    """SIGTERM as a stop request, for as long as training runs (a context manager).

    SLURM sends SIGTERM on ``scancel``, at a time limit and on preemption without ``--signal``;
    torchrun forwards it to every worker. Training then stops at the next step boundary like a
    requested stop: all ranks agree, save one checkpoint and return. Forked data-loader workers
    inherit the handler and ignore the signal (their parent stops them). Outside the main thread
    (a Ray worker thread) signals cannot be handled; nothing is installed.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.received = False
        self.previous: Any = None

    def __enter__(self) -> "StopOnTerminate":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _on_signal(self, signum: int, frame: Any = None) -> None:
        if os.getpid() != self.pid:
            return
        if not self.received:
            print("a2b: caught SIGTERM; all ranks save at the next step boundary, then exit",
                  file=sys.stderr, flush=True)
        self.received = True


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


def train(cfg: Config, *, resume: str = "auto", argv: Optional[list[str]] = None,
          stop_requested: Optional[Callable[[], bool]] = None, until_step: Optional[int] = None,
          on_evaluation: Optional[Callable[[int, dict, Optional[Path]], None]] = None) -> dict:
    """Train (or resume) A2B-GAN as configured.

    Returns {"step", "stopped", "stop_signal", "run_dir", "best", "weights_digest"} on every rank;
    the digest (checkpoint.state_digest of both networks) is equal on all ranks when the replicas
    agree.

    ``stop_requested`` is polled on every rank after each step (only one rank needs to say yes: the
    answer is agreed through the per-step all-reduce); then all ranks save one checkpoint together
    and return with stopped=True. SIGTERM is a stop request too (``stop_signal``: "SIGTERM").
    ``until_step`` stops the same way after that step (a time-boxed session; the schedule still
    follows train.steps). ``on_evaluation(step, metrics, checkpoint)`` runs on the main process
    after each model-selection evaluation and its checkpoint, if any (the sweep reports through it;
    it gets the newest complete checkpoint).
    """
    with StopOnTerminate() as term, contextlib.ExitStack() as held:
        def stop() -> bool:
            return term.received or (stop_requested is not None and stop_requested())

        result = _train(cfg, resume=resume, argv=argv, stop_requested=stop, until_step=until_step,
                        on_evaluation=on_evaluation, held=held)
    result["stop_signal"] = "SIGTERM" if term.received and result["stopped"] else None
    return result


def _train(cfg: Config, *, resume: str, argv: Optional[list[str]], stop_requested: Callable[[], bool],
           until_step: Optional[int], on_evaluation: Optional[Callable[[int, dict, Optional[Path]], None]],
           held: contextlib.ExitStack) -> dict:
    # Set up processes, folders and logging.
    backend = backends.get(cfg.train.backend)
    backend.prepare(cfg)
    prepare_tracker_env(cfg)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"number of processes ({world})")
    run_dir = Path(cfg.train.run_dir)
    device = accelerator.device

    # Check the data and the checkpoint to resume before anything is written.
    streams = _open_streams(cfg, rank, world)
    for stream in streams.values():
        c = stream.checked
        if c["remote"] or c["verify"] == "sha256":   # these checks take real time: say what they did
            accelerator.print(f"data: {c['location']}: {c['shards']} shards, {c['bytes'] / 2**20:.1f} MiB, "
                              f"checked ({c['verify']}) in {c['seconds']:.1f} s")
    start_from = _resume_path(cfg, resume, warn=accelerator.print)
    meta = ckpt.read_meta(start_from) if start_from is not None else None
    if start_from is not None:
        check_resumable(cfg, start_from, meta, world)
    # One writer per run folder: the main process holds its lock until train() returns (the other
    # ranks write only their checkpoint shares, at the main process's pace); every rank stops alike.
    refused = None
    if main:
        try:
            held.enter_context(hold_folder(run_dir))
        except UserError as e:
            refused = str(e)
    if world > 1:
        from a2b_dist.distributed import gather_objects

        refused = gather_objects(refused, world)[0]
    if refused is not None:
        raise UserError(refused)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        save_config(cfg, str(run_dir / "config.yaml"))
        record_launch(run_dir, accelerator, argv if argv is not None else sys.argv)
        if start_from is not None:   # the steps after the checkpoint are about to be run again
            drop_rows_after(run_dir / "metrics.jsonl", int(meta["step"]))
    accelerator.wait_for_everyone()

    # Models, optimizers.
    models = backend.build(cfg, accelerator)
    gp_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.train.seed, rank, 7))
    aug_gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, rank, 11))   # data.hflip
    updates = backend.updates(cfg, models, accelerator, gp_gen)
    sample_x = _sample_batch(cfg) if main and cfg.train.sample_every else None

    # Resume from the newest complete checkpoint (or the one given).
    step, best = 0, None
    if start_from is not None:
        meta, rank_json, rank_tensors = backend.load(start_from, models, accelerator, rank, warn=accelerator.print)
        step = int(meta["step"])
        best = meta.get("best")
        same_world = meta["world_size"] == world and rank_json is not None
        if same_world:
            gp_gen.set_state(rank_tensors["gp_rng"])
            if "aug_rng" in rank_tensors:
                aug_gen.set_state(rank_tensors["aug_rng"])
            for role, stream in streams.items():
                stream.load_state_dict(rank_json["streams"][role], step)
        else:  # another world size: every rank's randomness is reseeded from (seed, rank, step)
            gp_gen.manual_seed(derive_seed(cfg.train.seed, rank, 7, step))
            aug_gen.manual_seed(derive_seed(cfg.train.seed, rank, 11, step))
            for role, stream in streams.items():
                stream.load_state_dict({}, step)
        accelerator.print(f"resumed from {start_from} at step {step}"
                          + ("" if same_world else f" (written by {meta['world_size']} processes, "
                                                  f"now {world}: data streams and RNG reseeded)"))
    if step >= cfg.train.steps:
        accelerator.print(f"nothing to do: step {step} >= train.steps={cfg.train.steps}")
        digest = ckpt.state_digest({"G": models.G.state_dict(), "D": models.D.state_dict()})
        return {"step": step, "stopped": False, "run_dir": str(run_dir), "best": best, "weights_digest": digest}

    def position() -> dict:
        """Where this rank's data and augmentation stand (saved with a checkpoint)."""
        return {"streams": {role: s.state_dict() for role, s in streams.items()}, "aug_rng": aug_gen.get_state()}

    def save(target: Path, at: Optional[dict] = None, **extra) -> Path:
        at = at or position()
        rank_state = {"streams": at["streams"], "step": step}
        return ckpt.save_checkpoint(
            target, **backend.checkpoint_parts(models, accelerator), rank_state=rank_state, rank_tensors={"gp_rng": gp_gen.get_state(), "aug_rng": at["aug_rng"]},
            meta=ckpt.meta_for(cfg, step, best=best, **extra), rank=rank, world_size=world,
            barrier=accelerator.wait_for_everyone)

    log = MetricsLog(cfg, accelerator, run_dir, resumed_at=step if start_from is not None else None)
    for line in log.where():
        accelerator.print(f"a2b: follow training with: {line}")
    next_batch = TrainBatches(cfg, streams, aug_gen, device)
    images_per_step = cfg.optim.n_critic * 2 * cfg.train.batch_size
    window_start = time.perf_counter()
    agreement = StepAgreement(world, device, fp16=accelerator.scaler is not None and accelerator.scaler.is_enabled())
    last_good = ckpt.latest_checkpoint(run_dir)
    stopped = False

    from tqdm.auto import tqdm

    from a2b_dist.data import DataError
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not main, dynamic_ncols=True, desc="train")
    models.G_train.train(), models.D_train.train()
    try:
        while step < cfg.train.steps:
            # The step's batches first: a data error (a shard that turned corrupt, a server that
            # stopped answering) then ends training between steps, with a checkpoint of the last one.
            at_step = position()
            failed = _read_step(next_batch, cfg.optim.n_critic, world, device)
            if failed is not None:
                saved = last_good
                if step > 0 and (saved is None or int(ckpt.read_meta(saved)["step"]) != step):
                    saved = save(ckpt.step_dir(run_dir, step), at=at_step)
                    if main:
                        ckpt.prune(run_dir, cfg.train.keep_last)
                    accelerator.wait_for_everyone()
                raise DataError(f"{failed}. " + (
                    f"Saved {saved} at step {step}, the last completed step; fix the data (or set "
                    "data.skip_corrupt=true) and continue with --resume auto" if saved is not None
                    else "No step was completed, so nothing was saved"))
            # One step: learning rates, n_critic critic updates, one generator update.
            stats, (lr_g, lr_d) = train_step(cfg, models, updates, next_batch, step)
            step += 1

            # Agree across ranks: loss sums for logging, non-finite losses, stop requests.
            ask = stop_requested() or (until_step is not None and step >= until_step)
            stopped = agreement.agree(stats, ask, step, last_good)
            bar.update(1)

            # Log, sample, evaluate, checkpoint.
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                means, finite_steps = agreement.take_means()
                record = {"step": step, "time": time.time(), "lr_g": lr_g, "lr_d": lr_d, **means,
                          "images_per_s": images_per_step * finite_steps / max(elapsed, 1e-9),
                          "data_wait_share": next_batch.take_wait() / max(elapsed, 1e-9)}
                skipped = sum(getattr(s, "skipped", 0) for s in streams.values())
                if skipped:
                    record["skipped_corrupt"] = skipped
                log.write(record)
                bar.set_postfix(loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}")
                window_start = time.perf_counter()
            if main and sample_x is not None and cfg.train.sample_every and step % cfg.train.sample_every == 0:
                png = run_dir / "samples" / f"step-{step:09d}.png"
                log.images(save_samples(models.G_eval, sample_x.to(device), png), png, step)
            improved = evaluated = False
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                metrics = evaluate_for_selection(cfg, models.G_eval, accelerator)
                evaluated = True
                value = metrics[cfg.eval.metric]
                # Before select_from (e.g. a focus warm-up) the mask has not formed: log, never select.
                improved = step >= cfg.eval.select_from and _better(cfg.eval.metric, value, best)
                if improved:
                    best = {"metric": cfg.eval.metric, "value": value, "step": step}
                    if cfg.eval.score == "auto":
                        from a2b_dist.scoring import chosen_kind
                        best["score"] = chosen_kind(metrics)   # the kind evaluate, detect and export use
                log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}, "best": best})
            at_end = step == cfg.train.steps
            if improved:
                save(run_dir / ckpt.BEST, selection=best)
            if step % cfg.train.checkpoint_every == 0 or at_end or stopped:
                last_good = save(ckpt.step_dir(run_dir, step))
                if main:
                    ckpt.prune(run_dir, cfg.train.keep_last)
                accelerator.wait_for_everyone()
            if evaluated and on_evaluation is not None and main:
                on_evaluation(step, {**metrics, "best": best}, last_good)
            if stopped:
                accelerator.print(f"stop requested: saved {last_good} at step {step}")
                break
    finally:
        bar.close()
        log.close()
    accelerator.wait_for_everyone()
    digest = ckpt.state_digest({"G": models.G.state_dict(), "D": models.D.state_dict()})
    return {"step": step, "stopped": stopped, "run_dir": str(run_dir), "best": best, "weights_digest": digest}


def _read_step(next_batch: TrainBatches, n_critic: int, world: int, device: torch.device) -> Optional[str]:
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


def _better(metric: str, value: float, best: Optional[dict]) -> bool:
    from a2b_dist.metrics import HIGHER_IS_BETTER

    if best is None or best.get("metric") != metric:
        return True
    return value > best["value"] if HIGHER_IS_BETTER[metric] else value < best["value"]


def evaluate_for_selection(cfg: Config, G: torch.nn.Module, accelerator) -> dict:
    from a2b_dist.scoring import selection_metric

    return selection_metric(G, cfg, device=accelerator.device, rank=accelerator.process_index,
                            world_size=accelerator.num_processes)


def train_seeds(config: str, overrides: list[str], seeds: list[int], *, resume: str = "auto",
                argv: Optional[list[str]] = None) -> dict:
    """Train the same config once per seed, each in train.run_dir/seed-N, and keep the one whose
    selected checkpoint has the best validation figure: its best/ is copied to train.run_dir/best
    (what `a2b evaluate --checkpoint RUN/best` reads) and train.run_dir/seeds.json lists every seed.

    A seed that already finished is not trained again (each resumes from its own folder)."""
    from accelerate import PartialState

    from a2b_dist.config import load_config

    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: each seed once")
    base = load_config(config, overrides)
    if not base.eval.every:
        raise ConfigError("--seeds keeps the seed with the best validation figure, which needs eval.every > 0")
    run_dir = Path(base.train.run_dir)
    results = []
    for seed in seeds:
        cfg = load_config(config, [*overrides, f"train.seed={seed}", f"train.run_dir={run_dir / f'seed-{seed}'}"])
        result = train(cfg, resume=resume, argv=argv)
        results.append({"seed": seed, "run_dir": str(Path(cfg.train.run_dir)), "best": result["best"],
                        "stop_signal": result.get("stop_signal")})
        if result.get("stop_signal"):
            return {"stop_signal": result["stop_signal"], "step": result["step"], "seeds": results, "chosen": None}
    chosen = None
    for r in results:
        if r["best"] is not None and _better(base.eval.metric, r["best"]["value"], chosen and chosen["best"]):
            chosen = r
    if chosen is None:
        raise UserError(f"no seed selected a checkpoint (eval.select_from={base.eval.select_from} >= "
                        f"train.steps={base.train.steps}?)")
    if PartialState().is_main_process:
        target = ckpt.copy_checkpoint(Path(chosen["run_dir"]) / ckpt.BEST, run_dir / ckpt.BEST)
        write_atomic(run_dir / "seeds.json", json.dumps(
            {"metric": base.eval.metric, "chosen": chosen["seed"], "best": str(target), "seeds": results}, indent=1))
        lines = [f"  seed {r['seed']}: {base.eval.metric} {r['best']['value']:.4f} at step {r['best']['step']}"
                 if r["best"] else f"  seed {r['seed']}: no checkpoint selected" for r in results]
        print("\n".join([f"seeds ({base.eval.metric}):", *lines,
                         f"kept seed {chosen['seed']}: {target} (from {chosen['run_dir']}; all in {run_dir}/seeds.json)"]))
    PartialState().wait_for_everyone()
    return {"stop_signal": None, "seeds": results, "chosen": chosen["seed"]}


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (argparse type of --seeds)."""
    import argparse

    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seeds as integers separated by commas, e.g. 0,1,2")
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one or more seeds >= 0, e.g. 0,1,2")
    return seeds


def main(argv: Optional[list[str]] = None) -> int:
    """`a2b train --config X [section.field=value ...] [--resume auto|none|PATH] [--seeds N,N,...]`."""
    import argparse

    from a2b_dist.config import load_config

    parser = argparse.ArgumentParser(prog="a2b train", description="Train A2B-GAN from shards.")
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("--resume", default="auto",
                        help="auto: newest complete checkpoint in train.run_dir (default); none; or a path")
    parser.add_argument("--until-step", type=int, default=None,
                        help="stop after this step with a checkpoint (resume later with --resume auto)")
    parser.add_argument("--seeds", type=seed_list, default=None, metavar="N,N,...",
                        help="e.g. 0,1,2: train once per seed (train.run_dir/seed-N) and keep the one with the best "
                             "validation figure as train.run_dir/best (a GAN seed can fail; this is the remedy)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as loss.lambda_rec=2")
    args = parser.parse_args(argv)
    launch_argv = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    if args.seeds is not None:
        if args.until_step is not None:
            parser.error("--until-step and --seeds do not go together")
        if args.resume not in ("auto", "none"):
            parser.error("--seeds takes --resume auto or none (each seed resumes from its own folder)")
        result = train_seeds(args.config, args.overrides, args.seeds, resume=args.resume, argv=launch_argv)
    else:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, resume=args.resume, until_step=args.until_step, argv=launch_argv)
    if result["stop_signal"]:
        print(f"stopped by {result['stop_signal']} at step {result['step']} (checkpoint saved); continue with "
              "--resume auto", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    from a2b_dist.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))

