"""A2B-GAN training loop: one loop for a laptop CPU, one GPU, or many nodes.

    a2b train --config configs/test.yaml                       # one process
    a2b train --config configs/demo.yaml train.steps=500       # dotted overrides
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m a2b_dist.train --config configs/test.yaml            # DDP (2 CPU processes over gloo here)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        -m a2b_dist.train --config configs/test.yaml train.backend=deepspeed   # DeepSpeed ZeRO 1
    python jobs/submit.py --partition gpu --nodes 4 --config configs/covid.yaml   # SLURM

``train`` reads top to bottom in its phases: set up (processes, the data and the checkpoint checked,
the run folder claimed), build the networks, resume, then the loop (read a step's batches, one step,
agree across ranks, log, sample, evaluate, checkpoint) and finish. One step = one paper iteration
(a2b_dist.steps); ``train.batch_size``, the global batch, is split evenly over the processes.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from a2b_dist import backends
from a2b_dist import checkpoint as ckpt
from a2b_dist.config import Config, ConfigError, save_config
from a2b_dist.errors import UserError
from a2b_dist.files import append_jsonl, hold_folder
from a2b_dist.provenance import provenance
from a2b_dist.resume import check_resumable, drop_rows_after, load_checkpoint, resume_path
from a2b_dist.samples import sample_batch, save_samples
from a2b_dist.signals import StopOnSignal
from a2b_dist.steps import StepAgreement, TrainBatches, derive_seed, make_accelerator, read_step, train_step
from a2b_dist.tracking import MetricsLog, prepare_tracker_env
from a2b_dist.updates import A2BUpdates, Models

OnEvaluation = Callable[[int, dict, Optional[Path]], None]


def train(cfg: Config, *, resume: str = "auto", argv: Optional[list[str]] = None,
          stop_requested: Optional[Callable[[], bool]] = None, until_step: Optional[int] = None,
          on_evaluation: Optional[OnEvaluation] = None) -> dict:
    """Train (or resume) A2B-GAN as configured (the command line: a2b_dist.train_cli).

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
    # SIGTERM (scancel, a time limit, preemption without --signal) stops like a requested stop.
    with StopOnSignal(signal.SIGTERM, then=", then exit") as term, contextlib.ExitStack() as held:
        def stop() -> bool:
            return term() or (stop_requested is not None and stop_requested())

        run = _set_up(cfg, resume, argv, held)
        _build(run)
        load_checkpoint(run)
        if run.step >= cfg.train.steps:
            run.accelerator.print(f"nothing to do: step {run.step} >= train.steps={cfg.train.steps}")
            result = run.result(stopped=False)
        else:
            stopped = _loop(run, stop, until_step, on_evaluation)
            run.accelerator.wait_for_everyone()
            result = run.result(stopped)
    result["stop_signal"] = term.name if term() and result["stopped"] else None
    return result


@dataclass
class Run:
    """What the phases of one training share: its processes, data and networks, and where it stands
    (step, best selection, newest complete checkpoint)."""
    cfg: Config
    backend: Any
    accelerator: Any
    streams: dict
    start_from: Optional[Path] = None      # the checkpoint to resume, checked
    models: Optional[Models] = None
    updates: Optional[A2BUpdates] = None
    gp_gen: Optional[torch.Generator] = None     # the gradient penalty's interpolation
    aug_gen: Optional[torch.Generator] = None    # data.hflip
    sample_x: Optional[torch.Tensor] = None      # the sample grids' fixed batch (main process)
    step: int = 0
    best: Optional[dict] = None
    last_good: Optional[Path] = None
    norm_tensor: dict = field(default_factory=dict)   # this step's healthy map statistics (eval.normalize_images)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.cfg.train.run_dir)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main, self.device = self.accelerator.is_main_process, self.accelerator.device

    def position(self) -> dict:
        """Where this rank's data and augmentation stand (saved with a checkpoint)."""
        return {"streams": {role: s.state_dict() for role, s in self.streams.items()},
                "aug_rng": self.aug_gen.get_state()}

    def save(self, target: Path, at: Optional[dict] = None, **extra: Any) -> Path:
        at = at or self.position()
        rank_state = {"streams": at["streams"], "step": self.step}
        return ckpt.save_checkpoint(
            target, **self.backend.checkpoint_parts(self.models, self.accelerator), rank_state=rank_state,
            rank_tensors={"gp_rng": self.gp_gen.get_state(), "aug_rng": at["aug_rng"], **self.norm_tensor},
            meta=ckpt.meta_for(self.cfg, self.step, best=self.best, **extra), rank=self.rank,
            world_size=self.world, barrier=self.accelerator.wait_for_everyone)

    def save_step(self, at: Optional[dict] = None) -> Path:
        """checkpoints/step-N of this step (older ones pruned to train.keep_last), on every rank."""
        saved = self.save(ckpt.step_dir(self.run_dir, self.step), at=at)
        if self.main:
            ckpt.prune(self.run_dir, self.cfg.train.keep_last)
        self.accelerator.wait_for_everyone()
        return saved

    def result(self, stopped: bool) -> dict:
        digest = ckpt.state_digest({"G": self.models.G.state_dict(), "D": self.models.D.state_dict()})
        return {"step": self.step, "stopped": stopped, "run_dir": str(self.run_dir), "best": self.best,
                "weights_digest": digest}


# ---------------------------------------------------------------------------------------------
# Setup: processes, checks, the run folder, the networks

def _set_up(cfg: Config, resume: str, argv: Optional[list[str]], held: contextlib.ExitStack) -> Run:
    """Start the processes, check the data and the checkpoint to resume, then claim the run folder:
    nothing is written before the checks pass."""
    backend = backends.get(cfg.train.backend)
    backend.prepare(cfg)
    prepare_tracker_env(cfg)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"number of processes ({world})")
    streams = _open_streams(cfg, rank, world)
    for stream in streams.values():
        c = stream.checked
        if c["remote"] or c["verify"] == "sha256":   # these checks take real time: say what they did
            accelerator.print(f"data: {c['location']}: {c['shards']} shards, {c['bytes'] / 2**20:.1f} MiB, "
                              f"checked ({c['verify']}) in {c['seconds']:.1f} s")
    start_from = resume_path(cfg, resume, warn=accelerator.print)
    meta = ckpt.read_meta(start_from) if start_from is not None else None
    if start_from is not None:
        check_resumable(cfg, start_from, meta, world)
    run = Run(cfg, backend, accelerator, streams, start_from)
    _claim_run_folder(run, held, argv, meta)
    return run


def _claim_run_folder(run: Run, held: contextlib.ExitStack, argv: Optional[list[str]],
                      meta: Optional[dict]) -> None:
    """One writer per run folder: the main process holds its lock until train() returns (the other
    ranks write only their checkpoint shares, at the main process's pace); every rank stops alike.
    Then the config, this launch's provenance, and the metrics history cut back to the checkpoint."""
    refused = None
    if run.main:
        try:
            held.enter_context(hold_folder(run.run_dir))
        except UserError as e:
            refused = str(e)
    if run.world > 1:
        from a2b_dist.distributed import gather_objects

        refused = gather_objects(refused, run.world)[0]
    if refused is not None:
        raise UserError(refused)
    if run.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "samples").mkdir(exist_ok=True)
        save_config(run.cfg, str(run.run_dir / "config.yaml"))
        append_jsonl(run.run_dir / "launches.jsonl",
                     provenance(argv if argv is not None else sys.argv, accelerator=run.accelerator))
        if meta is not None:   # the steps after the checkpoint are about to be run again
            drop_rows_after(run.run_dir / "metrics.jsonl", int(meta["step"]))
    run.accelerator.wait_for_everyone()


def _build(run: Run) -> None:
    """The networks and optimizers as train.backend builds them, each rank's generators, the updates."""
    cfg = run.cfg
    run.models = run.backend.build(cfg, run.accelerator)
    run.gp_gen = torch.Generator(device=run.device).manual_seed(derive_seed(cfg.train.seed, run.rank, 7))
    run.aug_gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, run.rank, 11))
    run.updates = run.backend.updates(cfg, run.models, run.accelerator, run.gp_gen)
    run.sample_x = sample_batch(cfg) if run.main and cfg.train.sample_every else None


# ---------------------------------------------------------------------------------------------
# The loop

def _loop(run: Run, stop_requested: Callable[[], bool], until_step: Optional[int],
          on_evaluation: Optional[OnEvaluation]) -> bool:
    """Train from run.step to train.steps; True when it stopped early on request (after saving)."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    log = MetricsLog(cfg, accelerator, run.run_dir, resumed_at=run.step if run.start_from is not None else None)
    for line in log.where():
        accelerator.print(f"a2b: follow training with: {line}")
    batches = TrainBatches(cfg, run.streams, run.aug_gen, run.device)
    scaler = accelerator.scaler
    agreement = StepAgreement(run.world, run.device, fp16=scaler is not None and scaler.is_enabled())
    run.last_good = ckpt.latest_checkpoint(run.run_dir)
    window_start, stopped = time.perf_counter(), False
    bar = tqdm(total=cfg.train.steps, initial=run.step, disable=not run.main, dynamic_ncols=True, desc="train")
    run.models.G_train.train(), run.models.D_train.train()
    try:
        while run.step < cfg.train.steps:
            # The step's batches first: a data error (a shard that turned corrupt, a server that
            # stopped answering) then ends training between steps, with a checkpoint of the last one.
            _read_batches(run, batches)
            # One step: learning rates, n_critic critic updates, one generator update.
            stats, lrs = train_step(cfg, run.models, run.updates, batches, run.step)
            run.step += 1

            # Agree across ranks: loss sums for logging, non-finite losses, stop requests.
            ask = stop_requested() or (until_step is not None and run.step >= until_step)
            stopped = agreement.agree(stats, ask, run.step, run.last_good)
            bar.update(1)

            # Log, sample, evaluate, checkpoint.
            if run.step % cfg.train.log_every == 0 or run.step == cfg.train.steps:
                means = _log_losses(run, log, agreement, batches, lrs, time.perf_counter() - window_start)
                bar.set_postfix(loss_d=f"{means['loss_d']:.3f}", loss_g=f"{means['loss_g']:.3f}")
                window_start = time.perf_counter()
            if run.main and run.sample_x is not None and cfg.train.sample_every \
                    and run.step % cfg.train.sample_every == 0:
                png = run.run_dir / "samples" / f"step-{run.step:09d}.png"
                log.images(save_samples(run.models.G_eval, run.sample_x.to(run.device), png), png, run.step)
            metrics, improved = _evaluate(run, log)
            if improved:
                run.save(run.run_dir / ckpt.BEST, selection=run.best)
            if run.step % cfg.train.checkpoint_every == 0 or run.step == cfg.train.steps or stopped:
                run.last_good = run.save_step()
            if metrics is not None and on_evaluation is not None and run.main:
                on_evaluation(run.step, {**metrics, "best": run.best}, run.last_good)
            if stopped:
                accelerator.print(f"stop requested: saved {run.last_good} at step {run.step}")
                break
    finally:
        bar.close()
        log.close()
    return stopped


def _read_batches(run: Run, batches: TrainBatches) -> None:
    """Read the next step's batches on every rank. On a data error (any rank's; all learn it) save
    the last completed step, if not saved yet, and raise DataError on every rank."""
    from a2b_dist.data import DataError

    at_step = run.position()
    failed = read_step(batches, run.cfg.optim.n_critic, run.world, run.device)
    if failed is None:
        return
    saved = run.last_good
    if run.step > 0 and (saved is None or int(ckpt.read_meta(saved)["step"]) != run.step):
        saved = run.save_step(at=at_step)
    raise DataError(f"{failed}. " + (
        f"Saved {saved} at step {run.step}, the last completed step; fix the data (or set "
        "data.skip_corrupt=true) and continue with --resume auto" if saved is not None
        else "No step was completed, so nothing was saved"))


def _log_losses(run: Run, log: MetricsLog, agreement: StepAgreement, batches: TrainBatches,
                lrs: tuple[float, float], elapsed: float) -> dict[str, float]:
    """One metrics row: learning rates, the mean losses since the last row, images per second, the
    share of time spent waiting for data, damaged samples skipped. Returns the mean losses."""
    means, finite_steps = agreement.take_means()
    images_per_step = run.cfg.optim.n_critic * 2 * run.cfg.train.batch_size
    record = {"step": run.step, "time": time.time(), "lr_g": lrs[0], "lr_d": lrs[1], **means,
              "images_per_s": images_per_step * finite_steps / max(elapsed, 1e-9),
              "data_wait_share": batches.take_wait() / max(elapsed, 1e-9)}
    skipped = sum(getattr(s, "skipped", 0) for s in run.streams.values())
    if skipped:
        record["skipped_corrupt"] = skipped
    log.write(record)
    return means


def _evaluate(run: Run, log: MetricsLog) -> tuple[Optional[dict], bool]:
    """The model-selection evaluation when due (every eval.every steps and at the end): its metrics
    (None when not due) and whether they improve on run.best, which is then updated. Before
    eval.select_from (e.g. a focus warm-up) the mask has not formed: logged, never selected."""
    cfg, run.norm_tensor = run.cfg, {}
    if not cfg.eval.every or not (run.step % cfg.eval.every == 0 or run.step == cfg.train.steps):
        return None, False
    from a2b_dist.metrics import improves
    from a2b_dist.scoring import chosen_kind, selection_metric, selection_norm

    norm = selection_norm(G := run.models.G_eval, cfg, device=run.device)    # kept with this step's checkpoints
    run.norm_tensor = {} if norm is None else {ckpt.MAP_NORM: norm}
    metrics = selection_metric(G, cfg, device=run.device, rank=run.rank, world_size=run.world, norm=norm)
    value = metrics[cfg.eval.metric]
    improved = run.step >= cfg.eval.select_from and improves(cfg.eval.metric, value, run.best)
    if improved:
        run.best = {"metric": cfg.eval.metric, "value": value, "step": run.step}
        if cfg.eval.score == "auto":
            run.best["score"] = chosen_kind(metrics)   # the kind evaluate, detect and export use
    log.write({"step": run.step, **{f"eval/{k}": v for k, v in metrics.items()}, "best": run.best})
    return metrics, improved


# ---------------------------------------------------------------------------------------------
# The data

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


if __name__ == "__main__":   # python -m a2b_dist.train, accelerate launch -m a2b_dist.train: `a2b train`
    from a2b_dist.errors import run_guarded
    from a2b_dist.train_cli import main

    sys.exit(run_guarded(main, sys.argv[1:]))
