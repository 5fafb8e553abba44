"""What a loss-weight sweep needs besides Ray's own machinery (sweeps/tune.py is the command).

- the search space: the default one around the config's loss weights and learning rate, or a
  YAML file (``sweeps/search_space.yaml`` is the default written out), checked against the config;
- one trial: ``run_trial`` is the Ray Tune function trainable. It builds the trial's config and
  calls ``a2b_dist.train.train`` (the function behind ``a2b train``), reporting the metric and the
  checkpoint written at every evaluation; ``run_trial_ddp`` does the same with Ray Train's
  TorchTrainer for trials of several processes (several GPUs);
- the summary: the table of trials sorted by the metric, ``best.yaml``, the metric-against-weight plot.

Ray is imported only inside the functions that run under it, so the rest is plain Python.

Trial folders: ``<storage>/<name>/runs/<trial_id>/`` is the trial's ``train.run_dir`` (the trainer's
checkpoints, metrics.jsonl, and launches.jsonl with one line per call of train()); Ray keeps its own
copy of each reported checkpoint under ``<storage>/<name>/trial_<trial_id>/``. Ray's copy is the
single source of truth for where a trial continues (a resumed sweep, or PBT exploiting another
trial), so the iteration counts Ray schedules by always match the training step.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shutil
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from a2b_dist.config import Config, ConfigError, from_dict, get_field, merge, to_dict, to_yaml
from a2b_dist.errors import UserError
from a2b_dist.files import atomic_path, write_atomic

LOSS_WEIGHTS = ("loss.lambda_rec", "loss.lambda_id", "loss.lambda_f", "loss.lambda_fs", "loss.lambda_fz")
# One learning rate for both networks, as in the paper; a space may still search lr_g and lr_d apart.
LR = "optim.lr"
ALIASES = {LR: ("optim.lr_g", "optim.lr_d")}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# Default space: log-uniform over a decade either side of each weight, a factor 3 for the rate.
WEIGHT_FACTOR, LR_FACTOR = 10.0, 3.0
# The detection levers (benchmarks/README.md, "Detection quality"), each with its off value (the
# paper's) among the choices, so a sweep can tell on a user's own data whether a lever helps there.
LEVERS = {
    "loss.lambda_id_out": (0.0, 1.0, 5.0),
    "train.ema_decay": (0.0, 0.999),
    "loss.focus_size": ("image", "batch"),
    "data.hflip": (False, True),
}
REPORTS = "sweep-reports.jsonl"


# ---------------------------------------------------------------------------------------------
# Search space

@dataclass(frozen=True)
class Param:
    """One searched config field: a distribution and its bounds (or its values, for choice)."""
    key: str
    dist: str
    low: Optional[float] = None
    high: Optional[float] = None
    values: tuple = ()

    def domain(self):
        """The Ray Tune sampling domain."""
        from ray import tune

        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "randint":
            return tune.randint(int(self.low), int(self.high))
        return tune.choice(list(self.values))

    def extremes(self) -> list:
        """Values that must all be valid settings of the field (bounds, or every choice)."""
        if self.dist == "choice":
            return list(self.values)
        if self.dist == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def as_yaml(self) -> dict:
        if self.dist == "choice":
            return {"dist": "choice", "values": list(self.values)}
        return {"dist": self.dist, "low": self.low, "high": self.high}


def default_space(cfg: Config) -> dict[str, Param]:
    """The five loss weights and the learning rate, log-uniform around the config's values
    (the paper's, for the presets; a weight set to 0 is centred on the paper's default instead),
    and a choice for each detection lever in LEVERS."""
    paper = Config()
    space = {}
    for key in LOSS_WEIGHTS:
        centre = get_field(cfg, key) or get_field(paper, key)
        space[key] = Param(key, "loguniform", _round(centre / WEIGHT_FACTOR), _round(centre * WEIGHT_FACTOR))
    lr = cfg.optim.lr_g or paper.optim.lr_g
    space[LR] = Param(LR, "loguniform", _round(lr / LR_FACTOR), _round(min(lr * LR_FACTOR, 1.0)))
    for key, values in LEVERS.items():
        space[key] = Param(key, "choice", values=values)
    return space


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def parse_space(data: Any, source: str) -> dict[str, Param]:
    """A mapping ``section.field: {dist: loguniform, low: .., high: ..}`` (or ``{dist: choice,
    values: [..]}``) into Params; every mistake names the entry and what is allowed."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: a search space is a non-empty mapping of section.field to "
                          "{dist: loguniform|uniform|randint|choice, low: .., high: ..} or {dist: choice, values: [..]}")
    space = {}
    for key, spec in data.items():
        where = f"{source}: {key}"
        if not isinstance(spec, dict) or spec.get("dist") not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: give dist: one of {', '.join(DISTRIBUTIONS)} (got {spec!r})")
        dist = spec["dist"]
        if dist == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values or set(spec) - {"dist", "values"}:
                raise ConfigError(f"{where}: dist: choice takes a non-empty list `values` and nothing else")
            space[key] = Param(key, dist, values=tuple(values))
            continue
        if set(spec) != {"dist", "low", "high"}:
            raise ConfigError(f"{where}: dist: {dist} takes exactly low and high (got {', '.join(spec)})")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or low >= high:
            raise ConfigError(f"{where}: low and high must be finite numbers with low < high (got {low!r}, {high!r})")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {low})")
        if dist == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: randint needs integer low and high (high excluded)")
        space[key] = Param(key, dist, float(low), float(high))
    return space


def load_space(path: str | os.PathLike) -> dict[str, Param]:
    """Read a search-space YAML file (see sweeps/search_space.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--search-space {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--search-space {p} is not valid YAML: {e}") from None
    return parse_space(data, f"--search-space {p}")


def space_yaml(space: dict[str, Param], header: str = "") -> str:
    return header + yaml.safe_dump({k: p.as_yaml() for k, p in space.items()}, sort_keys=False)


def check_space(space: dict[str, Param], base: dict) -> None:
    """Every key must be a config field (or optim.lr) and every bound a valid value for it."""
    for key, param in space.items():
        for value in param.extremes():
            try:
                apply_params(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"search space entry {key} ({param.dist}, value {value!r}): {e}") from None


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
# The sweep's base config

def prepare_base(cfg: Config, *, metric: str, seed: int, max_steps: Optional[int]) -> Config:
    """The config every trial starts from: paths absolute (trials run in other folders and on other
    nodes), eval.metric set, an evaluation (and the checkpoint Ray keeps) every eval.every steps,
    and train.steps cut to --max-steps with the learning-rate decay scaled to match."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.eval.fid_weights:
        cfg.eval.fid_weights = str(Path(cfg.eval.fid_weights).expanduser().resolve())
    cfg.eval.metric = metric
    cfg.train.seed = seed
    if max_steps is not None:
        cfg.optim.decay_steps = min(max_steps, round(cfg.optim.decay_steps * max_steps / cfg.train.steps))
        cfg.train.steps = max_steps
    if not cfg.eval.every or cfg.eval.every > cfg.train.steps:
        # Schedulers need several reports per trial; four evaluations unless the config says otherwise.
        cfg.eval.every = max(1, cfg.train.steps // 4)
    cfg.train.checkpoint_every = cfg.eval.every   # so each report carries the checkpoint of its step
    return from_dict(to_dict(cfg), source="sweep base config")


def check_data(cfg: Config) -> None:
    """Fail before starting Ray when the shards (or, for FID, the Inception weights) are missing."""
    root = Path(cfg.data.root)
    roles = ("mixed", "healthy") + (("val",) if cfg.eval.metric == "val_auc" else ())
    for role in roles:
        if not (root / role / "manifest.json").is_file():
            raise UserError(f"no {role} shards at {root / role} (data.root={cfg.data.root}); build them with "
                            f"python shards/build.py ... --out {cfg.data.root}"
                            + ("; --metric val_auc needs a labelled val role" if role == "val" else ""))
    if cfg.eval.metric == "fid":
        from a2b_dist import fid
        fid.find_weights(cfg.eval.fid_weights)


# ---------------------------------------------------------------------------------------------
# One trial (runs in a Ray worker)

def trial_dirname(trial) -> str:
    """Ray's folder for a trial: short and stable (the default puts every sampled value in it)."""
    return f"trial_{trial.trial_id}"


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _reset_accelerate() -> None:
    """Let train() build a fresh Accelerator: a reused Ray worker has run train() before, and
    Accelerate keeps its state in process-wide singletons."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _ray_stop_event() -> Optional[threading.Event]:
    """The event Ray sets when it stops this trial (ASHA, PBT pause, end of sweep), if it has one."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        return None
    return getattr(get_session(), "stop_event", None)


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


def _append_json(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


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
        _append_json(run_dir / REPORTS, row)
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)

    with given.as_directory() if given is not None else nullcontext(None) as start:
        start = Path(start) if start is not None else None
        _drop_checkpoints_after(run_dir, _checkpoint_step(start) if start is not None else -1)
        stop = _ray_stop_event()
        _reset_accelerate()
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

    _reset_accelerate()
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
    stop = _ray_stop_event()
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


# ---------------------------------------------------------------------------------------------
# Summary

@dataclass
class TrialRow:
    trial_id: str
    status: str                 # completed | stopped early | error | not finished
    evaluations: int
    step: Optional[int]
    best: Optional[float]       # best value of the metric over the trial's evaluations
    best_step: Optional[int]
    last: Optional[float]
    params: dict
    run_dir: str


def summarize(results: Sequence[dict], metric: str, higher_is_better: bool, steps: int) -> list[TrialRow]:
    """One row per trial, best first. ``results``: dicts with trial_id, params, history (the
    reported rows, oldest first), error (bool), run_dir."""
    rows = []
    for r in results:
        history = [h for h in r["history"] if h.get(metric) is not None and not math.isnan(h[metric])]
        best_row = (max if higher_is_better else min)(history, key=lambda h: h[metric]) if history else None
        last_step = int(r["history"][-1]["step"]) if r["history"] else None
        if r["error"]:
            status = "error"
        elif last_step is not None and last_step >= steps:
            status = "completed"
        elif r.get("finished"):
            status = "stopped early"
        else:
            status = "not finished"
        rows.append(TrialRow(r["trial_id"], status, len(r["history"]), last_step,
                             best_row[metric] if best_row else None,
                             int(best_row["step"]) if best_row else None,
                             history[-1][metric] if history else None, dict(r["params"]), r["run_dir"]))
    sign = -1.0 if higher_is_better else 1.0
    rows.sort(key=lambda t: (t.best is None, sign * t.best if t.best is not None else 0.0, t.trial_id))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_columns(rows: Sequence[TrialRow], metric: str) -> tuple[list[str], list[list[Any]]]:
    keys = sorted({k for t in rows for k in t.params})
    header = ["trial", "status", "evaluations", "step", f"best_{metric}", "best_step", f"last_{metric}", *keys,
              "run_dir"]
    body = [[t.trial_id, t.status, t.evaluations, t.step, t.best, t.best_step, t.last,
             *(t.params.get(k) for k in keys), t.run_dir] for t in rows]
    return header, body


def format_table(rows: Sequence[TrialRow], metric: str) -> str:
    """Plain-text table (without the run folders) for the terminal."""
    header, body = table_columns(rows, metric)
    header, body = header[:-1], [b[:-1] for b in body]
    cells = [header] + [[_fmt(v) for v in b] for b in body]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(header))).rstrip() for c in cells)


def write_csv(path: Path, rows: Sequence[TrialRow], metric: str) -> None:
    header, body = table_columns(rows, metric)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([["" if v is None else v for v in b] for b in body])
    write_atomic(path, buf.getvalue())


def fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3 ... : the first that does not exist yet."""
    candidate, n = parent / name, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{name}-{n}"
    return candidate


def write_best(path: Path, base: dict, best: TrialRow, metric: str, run_dir: Path) -> Config:
    """best.yaml: the best trial's resolved config with a fresh run folder, for `a2b train --config`."""
    cfg = apply_params(base, best.params, run_dir)
    header = (f"# Best trial {best.trial_id} of the sweep: {metric} {best.best:.6g} at step {best.best_step}.\n"
              f"# Its own run folder (checkpoints, metrics): {best.run_dir}\n"
              f"# Train it again:            a2b train --config {path}\n"
              f"# On the full schedule, e.g.: a2b train --config {path} train.steps=400000 "
              "optim.decay_steps=100000\n")
    write_atomic(path, header + to_yaml(cfg))
    return cfg


def plot_params(path: Path, rows: Sequence[TrialRow], space: dict[str, Param], metric: str) -> None:
    """One panel per searched field: each trial's best metric against its value (best trial in red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in rows if t.best is not None]
    keys = list(space)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        param = space[key]
        xs = [t.params.get(key) for t in rows]
        ys = [t.best for t in rows]
        if param.dist == "choice":
            labels = [str(v) for v in param.values]
            xs = [labels.index(str(x)) if str(x) in labels else math.nan for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        elif param.dist == "loguniform":
            ax.set_xscale("log")
        ax.scatter(xs, ys, c=["tab:red" if i == 0 else "tab:blue" for i in range(len(rows))], s=24)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{metric} against each searched value ({len(rows)} trials; red: best)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


__all__ = ["Param", "default_space", "parse_space", "load_space", "check_space", "apply_params",
           "prepare_base", "check_data", "run_trial", "run_trial_ddp", "summarize", "format_table",
           "write_csv", "write_best", "plot_params", "space_yaml", "fresh_dir", "trial_dirname", "trial_name"]
