"""One trial of a loss-weight sweep, as it runs inside a Ray worker (``tune.py`` beside it is the
command, ``a2b tune`` or ``python sweeps/tune.py``; ``space.py`` and ``summary.py`` its search space
and summary).

``run_trial`` is the Ray Tune function trainable: it builds the trial's config (``apply_params``)
and calls ``a2b_dist.train.train`` (the function behind ``a2b train``), reporting the metric and the
checkpoint written at every evaluation; ``run_trial_ddp`` does the same with Ray Train's
TorchTrainer for trials of several processes (several GPUs). Ray is imported only inside them.

Trial folders: ``<storage>/<name>/runs/<trial_id>/`` is the trial's ``train.run_dir`` (the trainer's
checkpoints, metrics.jsonl, and launches.jsonl with one line per call of train()); Ray keeps its own
copy of each reported checkpoint under ``<storage>/<name>/trial_<trial_id>/``. Ray's copy is the
single source of truth for where a trial continues (a resumed sweep, or PBT exploiting another
trial), so the iteration counts Ray schedules by always match the training step.
"""
from __future__ import annotations

import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from a2b_dist.compat import ray_trial_stop_event, reset_accelerate_state
from a2b_dist.config import Config, from_dict, merge, to_dict
from a2b_dist.files import append_jsonl, hold_folder

# One learning rate for both networks, as in the paper; a space may still search lr_g and lr_d apart.
LR = "optim.lr"
ALIASES = {LR: ("optim.lr_g", "optim.lr_d")}
REPORTS = "sweep-reports.jsonl"


# ---------------------------------------------------------------------------------------------
# The trial's config

def _expand(params: dict) -> dict:
    out = {}
    for key, value in params.items():
        for target in ALIASES.get(key, (key,)):
            out[target] = value
    return out


def apply_params(base: dict, params: dict, run_dir: Optional[str | os.PathLike] = None) -> Config:
    """The resolved, validated config of one trial: the sweep's base config plus its sampled values."""
    values = {k: v.item() if hasattr(v, "item") else v for k, v in _expand(params).items()}  # numpy scalars from Ray
    if run_dir is not None:
        values["train.run_dir"] = str(run_dir)
    return merge(base, values, source="sweep trial config")


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Ray worker)

def trial_name(trial) -> str:
    """Ray's name and folder for a trial: short and stable (the default puts every sampled value in it)."""
    return f"trial_{trial.trial_id}"


def _checkpoint_step(path: Path) -> int:
    from a2b_dist import checkpoint as ckpt

    return int(ckpt.read_meta(path)["step"])


def _drop_checkpoints_after(run_dir: Path, step: int) -> None:
    """Remove the trial's own step checkpoints beyond the one it continues from: they belong to a
    line of training Ray has discarded (PBT replaced it, or the sweep died before reporting them)."""
    from a2b_dist import checkpoint as ckpt

    for path in ckpt.list_checkpoints(run_dir):
        if _checkpoint_step(path) > step:
            shutil.rmtree(path, ignore_errors=True)


def _numbers(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _report_row(step: int, metrics: dict) -> dict:
    row = {"step": step, **_numbers(metrics)}
    best = metrics.get("best")
    if isinstance(best, dict) and "value" in best:
        row[f"best_{best['metric']}"] = float(best["value"])
    return row


def _trial_argv(trial_id: str, params: dict, start: Optional[Path]) -> list[str]:
    return ["sweeps/tune.py", f"trial={trial_id}", f"resume={start or 'none'}",
            *(f"{k}={v}" for k, v in params.items())]


def run_trial(params: dict, *, base: dict, runs_dir: str) -> None:
    """Ray Tune trainable: train one trial with a2b_dist.train.train and report each evaluation.

    Continues from Ray's checkpoint when Ray gives one (a restored sweep, or the checkpoint of the
    trial PBT copies), from scratch otherwise. Each report carries the metric, the step, and the
    trial's checkpoint folder of that step."""
    from ray import tune

    from a2b_dist.train import train

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(runs_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = apply_params(base, params, run_dir)
    given = tune.get_checkpoint()

    def on_evaluation(step: int, metrics: dict, checkpoint: Optional[Path]) -> None:
        row = _report_row(step, metrics)
        append_jsonl(run_dir / REPORTS, row)
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    # The trial folder's lock is held from before its checkpoints are pruned until train() returns
    # (train() takes the same lock again, allowed within one thread): a second sweep, or a training
    # pointed at this folder, stops with the holder's name instead of training beside this trial.
    with hold_folder(run_dir, "trial folder"), \
            given.as_directory() if given is not None else nullcontext(None) as start:
        start = Path(start) if start is not None else None
        _drop_checkpoints_after(run_dir, _checkpoint_step(start) if start is not None else -1)
        stop = ray_trial_stop_event()
        reset_accelerate_state()
        # From a checkpoint of the last step (a restored sweep whose trial had finished unrecorded)
        # train() has nothing to do; returning without a report ends the trial with its last result.
        train(cfg, resume=str(start) if start is not None else "none",
              argv=_trial_argv(trial_id, params, start), on_evaluation=on_evaluation,
              stop_requested=stop.is_set if stop is not None else None)


def _ddp_worker(loop_config: dict) -> None:
    """One process of a multi-process trial (Ray Train worker): the same train() call, which finds
    the process group Ray Train set up through Accelerate; the main process hands each evaluation to
    the trial through a queue."""
    from a2b_dist.train import train

    queue = loop_config["queue"]

    def on_evaluation(step: int, metrics: dict, checkpoint: Optional[Path]) -> None:
        queue.put((_report_row(step, metrics), str(checkpoint) if checkpoint else None))

    reset_accelerate_state()
    train(from_dict(loop_config["config"]), resume=loop_config["resume"], argv=loop_config["argv"],
          on_evaluation=on_evaluation)


def run_trial_ddp(params: dict, *, base: dict, runs_dir: str, workers: int, use_gpu: bool,
                  cpus_per_worker: float) -> None:
    """Ray Tune trainable for trials of several processes (--gpus-per-trial > 1): a Ray Train
    TorchTrainer runs ``workers`` copies of train(); rank 0's evaluations come back through a queue
    and are reported here. The trial folder must be on storage every node sees (as for any
    multi-node Ray Tune run), because every rank writes its share of each checkpoint there."""
    import queue as queue_mod

    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(runs_dir) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = apply_params(base, params, run_dir)
    given = tune.get_checkpoint()
    # Ray's trial checkpoints live on the shared storage, so every worker can read this path.
    start = Path(given.path) if given is not None else None
    with hold_folder(run_dir, "trial folder"):   # the workers' rank 0 takes it next, in train()
        _drop_checkpoints_after(run_dir, _checkpoint_step(start) if start is not None else -1)
    results = Queue(actor_options={"num_cpus": 0})
    per_worker = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"config": to_dict(cfg), "resume": str(start) if start else "none",
                           "argv": _trial_argv(trial_id, params, start), "queue": results},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"train-{trial_id}", storage_path=str(Path(runs_dir) / "ray-train")))
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the trial's thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    stop = ray_trial_stop_event()
    while stop is None or not stop.is_set():   # once Ray stops the trial it ends this actor and its workers
        try:
            row, checkpoint = results.get(timeout=1.0)
        except (Empty, queue_mod.Empty):
            if thread.is_alive():
                continue
            if results.empty():
                break
            continue
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(checkpoint) if checkpoint else None)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


__all__ = ["apply_params", "run_trial", "run_trial_ddp", "trial_name"]
