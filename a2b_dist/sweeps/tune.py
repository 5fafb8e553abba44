"""Ray Tune search over A2B-GAN's loss weights and learning rate, scored by validation AUC or FID.

`a2b tune`; `python sweeps/tune.py` (the path sweeps/README.md documents) runs this same command.
Ray is the [sweeps] extra (pip install '.[sweeps]'); without it the command says so in one line.

    a2b tune --config configs/simulated.yaml --metric val_auc --num-samples 16
    a2b tune --config configs/test.yaml data.root=data/demo --metric val_auc \
        --num-samples 4 --scheduler asha --max-steps 8           # minutes on a laptop CPU
    a2b tune --config configs/covid.yaml --metric fid --scheduler pbt \
        --num-samples 8 --gpus-per-trial 1 --address auto        # on a running Ray cluster
    a2b tune ... --resume                                        # continue an interrupted sweep
    sbatch sweeps/slurm_ray.sbatch configs/covid.yaml --metric val_auc --num-samples 32

Every trial calls a2b_dist.train.train, the function behind `a2b train`, and reports the metric with
the checkpoint of that step at every evaluation (every eval.every steps; four per trial when the
config has none). ASHA stops poor trials early, PBT continues the poor ones from the checkpoints of
good ones with perturbed values. Results go to STORAGE/NAME/: trials.csv (the table printed at the
end), best.yaml (for `a2b train --config`), metric_vs_params.png, and one folder per trial.
sweeps/README.md has the details. Argument and config mistakes print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sys
from pathlib import Path
from typing import Optional

from a2b_dist.config import from_dict, load_config, to_dict
from a2b_dist.errors import UserError
from a2b_dist.sweeps import trial
from a2b_dist.sweeps.space import (Param, check_data, check_space, default_space, load_space, parse_space,
                                   prepare_base)
from a2b_dist.sweeps.summary import fresh_dir, format_table, plot_params, summarize, write_best, write_csv

SCHEDULERS = ("asha", "pbt", "none")
METRICS = ("val_auc", "fid")
SWEEP_FILE = "sweep.json"     # the sweep's base config and space, so --resume runs exactly the same trials
RUNS = "runs"                  # STORAGE/NAME/runs/<trial_id>: each trial's train.run_dir
TRIAL_PLACEHOLDER_CPU = 0.01   # what a multi-process trial holds besides its Ray Train workers


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block: it names the argument
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str = "a2b tune") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML preset the trials start from, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted config overrides such as data.root=data/demo")
    p.add_argument("--metric", required=True, choices=METRICS,
                   help="val_auc (image AUROC on the val role, higher is better) or fid (lower is better)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials (default 8)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                   help="asha: stop poor trials early (default); pbt: population based training; none: run all")
    p.add_argument("--search-space", help="YAML search space replacing the default "
                                          "(see sweeps/search_space.yaml)")
    p.add_argument("--gpus-per-trial", type=float, default=0,
                   help="GPUs per trial (default 0); above 1, a whole number, trained by Ray Train's TorchTrainer")
    p.add_argument("--cpus-per-trial", type=float, default=1,
                   help="CPUs per trial (per process for multi-GPU trials; default 1)")
    p.add_argument("--workers-per-trial", type=int, default=None,
                   help="training processes per trial (default: --gpus-per-trial when above 1, else 1); "
                        "more than 1 runs the trial through TorchTrainer, on CPUs when --gpus-per-trial is 0")
    p.add_argument("--max-steps", type=int, default=None,
                   help="train each trial for this many steps instead of train.steps (the decay is scaled)")
    p.add_argument("--address", help="join a running Ray cluster: auto or HOST:PORT (default: start Ray here)")
    p.add_argument("--storage", default="runs/sweeps", help="folder for sweeps (default runs/sweeps); "
                                                            "on a multi-node cluster it must be shared")
    p.add_argument("--name", help="sweep name, the folder under --storage (default: <config name>-<metric>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted sweep STORAGE/NAME: unfinished and failed trials go on "
                        "from their last checkpoint, finished ones are kept")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the search and of every trial's training (default: the config's train.seed)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Argument mistakes, each named; raised before anything heavy is imported."""
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, not {args.num_samples}")
    if args.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be above 0, not {args.cpus_per_trial:g}")
    if args.gpus_per_trial < 0 or (args.gpus_per_trial > 1 and not float(args.gpus_per_trial).is_integer()):
        raise UserError(f"--gpus-per-trial must be 0, a fraction up to 1, or a whole number, "
                        f"not {args.gpus_per_trial:g}")
    if args.workers_per_trial is not None:
        if args.workers_per_trial < 1:
            raise UserError(f"--workers-per-trial must be at least 1, not {args.workers_per_trial}")
        if args.gpus_per_trial > 1 and args.workers_per_trial != args.gpus_per_trial:
            raise UserError(f"--workers-per-trial {args.workers_per_trial} does not match --gpus-per-trial "
                            f"{args.gpus_per_trial:g} (one process per GPU); leave it out")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, not {args.max_steps}")
    if args.address is not None and not (args.address == "auto"
                                         or re.fullmatch(r"(ray://)?[\w.\-]+:\d+", args.address)):
        raise UserError(f"--address must be auto or HOST:PORT (e.g. 10.0.0.1:6379), not {args.address!r}")
    if args.name is not None and not re.fullmatch(r"[\w.\-]+", args.name):
        raise UserError(f"--name must be letters, digits, '.', '-' or '_', not {args.name!r}")
    if args.search_space is not None and not Path(args.search_space).is_file():
        raise UserError(f"--search-space {args.search_space} does not exist")


def workers_per_trial(args: argparse.Namespace) -> int:
    if args.workers_per_trial is not None:
        return args.workers_per_trial
    return int(args.gpus_per_trial) if args.gpus_per_trial > 1 else 1


# ---------------------------------------------------------------------------------------------
# The sweep's definition: built from the arguments, or read back for --resume

def define(args: argparse.Namespace) -> tuple[dict, dict[str, Param]]:
    """(base config as a dict, search space) from the command line; checked."""
    cfg = load_config(args.config, args.overrides)
    seed = cfg.train.seed if args.seed is None else args.seed
    base = prepare_base(cfg, metric=args.metric, seed=seed, max_steps=args.max_steps)
    check_data(base)
    space = load_space(args.search_space) if args.search_space else default_space(base)
    check_space(space, to_dict(base))
    return to_dict(base), space


def save_definition(exp: Path, base: dict, space: dict[str, Param], argv: list[str]) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    data = {"argv": argv, "base": base, "space": {k: p.as_yaml() for k, p in space.items()}}
    (exp / SWEEP_FILE).write_text(json.dumps(data, indent=1) + "\n")


def load_definition(exp: Path, base: dict, space: dict[str, Param]) -> tuple[dict, dict[str, Param]]:
    """The stored definition of the sweep being resumed; says so when this command differs."""
    stored = json.loads((exp / SWEEP_FILE).read_text())
    old_base = to_dict(from_dict(stored["base"], source=str(exp / SWEEP_FILE)))
    old_space = parse_space(stored["space"], str(exp / SWEEP_FILE))
    if old_base != base or old_space != space:
        print(f"note: the config or search space differs from the one {exp.name} started with; "
              f"--resume continues with the stored one ({exp / SWEEP_FILE})", file=sys.stderr)
    return old_base, old_space


# ---------------------------------------------------------------------------------------------
# Ray

def start_ray(args: argparse.Namespace, gpus: float, cpus: float, workers: int) -> None:
    import ray

    try:
        if args.address:
            ray.init(address=args.address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
    except ConnectionError as e:
        raise UserError(f"--address {args.address}: cannot join a Ray cluster there ({e})") from None
    have = ray.cluster_resources()
    if gpus > have.get("GPU", 0):
        ray.shutdown()
        raise UserError(f"--gpus-per-trial {gpus:g}: the Ray cluster has {have.get('GPU', 0):g} GPUs")
    # A multi-process trial also holds TRIAL_PLACEHOLDER_CPU for itself while its workers run.
    need = cpus * workers + (TRIAL_PLACEHOLDER_CPU if workers > 1 else 0)
    if need > have.get("CPU", 0):
        ray.shutdown()
        raise UserError(f"--cpus-per-trial {cpus:g}: a trial needs {need:g} CPUs ({workers} process(es)"
                        + (" and the trial itself" if workers > 1 else "")
                        + f"), more than the Ray cluster's {have.get('CPU', 0):g}")


def make_trainable(base: dict, runs_dir: Path, args: argparse.Namespace, workers: int):
    from ray import tune

    if workers > 1:
        fn = tune.with_parameters(trial.run_trial_ddp, base=base, runs_dir=str(runs_dir), workers=workers,
                                  use_gpu=args.gpus_per_trial > 0, cpus_per_worker=args.cpus_per_trial)
        # The trial itself only waits on Ray Train's workers, which take their own resources
        # (Ray wants some resource per trial).
        return tune.with_resources(fn, {"cpu": TRIAL_PLACEHOLDER_CPU})
    fn = tune.with_parameters(trial.run_trial, base=base, runs_dir=str(runs_dir))
    return tune.with_resources(fn, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})


def mutation(param: Param):
    """PBT's mutation of one field: a choice as its list of values (PBT moves to a neighbouring value
    or resamples; given as a Ray domain it would multiply the value by 0.8 or 1.2), others their domain."""
    return list(param.values) if param.dist == "choice" else param.domain()


def make_scheduler(name: str, space: dict[str, Param], evaluations: int):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if name == "asha":
        # Time is counted in evaluations (Ray's training_iteration: one report per evaluation).
        return ASHAScheduler(time_attr="training_iteration", max_t=evaluations, grace_period=1,
                             reduction_factor=2)
    if name == "pbt":
        # Synchronous: trials are compared at the same step. (Asynchronous PBT compares a trial with
        # the others' latest results, and a GAN's metric moves with the step, so it would favour
        # whichever trial happens to be further along.)
        return PopulationBasedTraining(time_attr="training_iteration", synch=True,
                                       perturbation_interval=max(1, evaluations // 4),
                                       hyperparam_mutations={k: mutation(p) for k, p in space.items()},
                                       quantile_fraction=0.25, resample_probability=0.25)
    return None


def run_tuner(args: argparse.Namespace, exp: Path, base: dict, space: dict[str, Param], seed: int):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    cfg = from_dict(base)
    evaluations = math.ceil(cfg.train.steps / cfg.eval.every)
    workers = workers_per_trial(args)
    trainable = make_trainable(base, exp / RUNS, args, workers)
    if args.resume:
        # Finished trials stay as they are; unfinished and errored ones continue from their last checkpoint.
        return tune.Tuner.restore(str(exp), trainable, resume_unfinished=True, resume_errored=True).fit()
    # PBT perturbs with Python's and NumPy's global generators, in this process.
    random.seed(seed)
    import numpy as np
    np.random.seed(seed)
    import ray
    max_concurrent = 0   # no limit: trials wait for their resources
    if workers > 1:
        per_trial = (args.gpus_per_trial if args.gpus_per_trial > 0
                     else workers * args.cpus_per_trial + TRIAL_PLACEHOLDER_CPU)
        have = ray.cluster_resources().get("GPU" if args.gpus_per_trial > 0 else "CPU", 0)
        max_concurrent = max(1, int(have // per_trial))
    tuner = tune.Tuner(
        trainable,
        param_space={k: p.domain() for k, p in space.items()},
        tune_config=tune.TuneConfig(
            metric=args.metric, mode="max" if _higher(args.metric) else "min", num_samples=args.num_samples,
            scheduler=make_scheduler(args.scheduler, space, evaluations),
            # Trials of several processes: only as many at once as the cluster holds, as each trial's
            # own placeholder takes almost nothing and its workers queue for the rest.
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent),
            reuse_actors=workers == 1, trial_name_creator=trial.trial_name,
            trial_dirname_creator=trial.trial_name),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=str(exp.parent), verbose=1,
            # A trial's last evaluation ends it before any scheduler sees it (PBT must not clone then).
            stop={"step": cfg.train.steps},
            # Ray keeps the newest reported checkpoints of each trial (the trainer keeps its own in the
            # trial's run folder); PBT needs a few more, as a trial copies another's a little later.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if args.scheduler == "pbt" else 2),
            failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def _higher(metric: str) -> bool:
    from a2b_dist.metrics import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER[metric]


# ---------------------------------------------------------------------------------------------
# Summary

def collect(grid, exp: Path, space: dict[str, Param]) -> list[dict]:
    """Every trial's reported rows (from its result.json), sampled values, and outcome."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    # Each trial's final status, from the experiment state Ray wrote (the public reader of it).
    status = {t.trial_id: t.status for t in ExperimentAnalysis(str(exp)).trials}
    out = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        history = []
        results_file = Path(result.path) / "result.json"
        if results_file.is_file():
            for line in results_file.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    history.append({k: v for k, v in row.items() if k != "config"})
        params = {k: result.config.get(k) for k in space}
        out.append({"trial_id": trial_id, "params": params, "history": history,
                    "error": result.error is not None or status.get(trial_id) == Trial.ERROR,
                    "finished": status.get(trial_id) in (Trial.TERMINATED, Trial.ERROR),
                    "run_dir": str(exp / RUNS / trial_id)})
    return out


def report(grid, exp: Path, base: dict, space: dict[str, Param], metric: str) -> int:
    cfg = from_dict(base)
    rows = summarize(collect(grid, exp, space), metric, _higher(metric), cfg.train.steps)
    print()
    print(f"{len(rows)} trials of sweep {exp.name}, best first ({metric}, "
          f"{'higher' if _higher(metric) else 'lower'} is better):")
    print(format_table(rows, metric))
    write_csv(exp / "trials.csv", rows, metric)
    unfinished = sum(r.status == "not finished" for r in rows)
    if not rows or rows[0].best is None:
        print(f"no trial reported {metric}; see the errors above and {exp}/trial_*/error.txt", file=sys.stderr)
        return 1
    best_run = fresh_dir(exp, "best-run")
    write_best(exp / "best.yaml", base, rows[0], metric, best_run)
    plot_params(exp / "metric_vs_params.png", rows, space, metric)
    print(f"\nwrote {exp}/trials.csv, {exp}/best.yaml (train it: a2b train --config {exp}/best.yaml), "
          f"{exp}/metric_vs_params.png")
    if unfinished:
        print(f"{unfinished} trial(s) did not finish; continue with the same command and --resume",
              file=sys.stderr)
        return 1
    return 0


def require_ray(prog: str = "a2b tune") -> None:
    """Ray is the [sweeps] extra; without it, one line that says how to get it."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError(f"{prog} needs Ray Tune: install the extra with pip install 'a2b_dist[sweeps]'")


def main(argv: Optional[list[str]] = None, prog: str = "a2b tune") -> int:
    """``prog``: the name the messages give this command (``sweeps/tune.py`` when run by that path)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help"} & set(argv):   # without Ray nothing else can run: say so first
        require_ray(prog)
    args = build_parser(prog).parse_intermixed_args(argv)
    check_args(args)
    base, space = define(args)
    storage = Path(args.storage).expanduser().resolve()
    name = args.name or f"{Path(args.config).stem}-{args.metric}"
    exp = storage / name
    if args.resume:
        from ray.tune import Tuner
        if not (exp / SWEEP_FILE).is_file() or not Tuner.can_restore(str(exp)):
            raise UserError(f"--resume: no sweep to continue at {exp}; check --storage and --name "
                            "(or start it without --resume)")
        base, space = load_definition(exp, base, space)
    elif exp.exists() and any(exp.iterdir()):
        raise UserError(f"--name {name}: {exp} already holds a sweep; add --resume to continue it, "
                        "or pick another --name")
    else:
        save_definition(exp, base, space, [*prog.split(), *argv])
    seed = from_dict(base).train.seed
    start_ray(args, args.gpus_per_trial, args.cpus_per_trial, workers_per_trial(args))
    # A short experiment-state period: a killed sweep loses at most this many seconds of bookkeeping.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # SIGTERM (SLURM's time limit, `kill`) stops like Ctrl-C: Ray Tune saves the sweep's state first.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    grid = run_tuner(args, exp, base, space, seed)
    import ray
    ray.shutdown()   # before the summary, so worker shutdown messages do not interleave with it
    return report(grid, exp, base, space, args.metric)

