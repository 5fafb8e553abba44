"""`a2b train` (and ``python -m a2b_dist.train``): one training, or one per seed keeping the best.

    a2b train --config configs/demo.yaml [section.field=value ...] [--resume auto|none|PATH]
              [--until-step N] [--seeds N,N,...]
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

from a2b_dist import checkpoint as ckpt
from a2b_dist.config import ConfigError
from a2b_dist.errors import UserError
from a2b_dist.files import write_atomic
from a2b_dist.train import train


def train_seeds(config: str, overrides: list[str], seeds: list[int], *, resume: str = "auto",
                argv: Optional[list[str]] = None) -> dict:
    """Train the same config once per seed, each in train.run_dir/seed-N, and keep the one whose
    selected checkpoint has the best validation figure: its best/ is copied to train.run_dir/best
    (what `a2b evaluate --checkpoint RUN/best` reads) and train.run_dir/seeds.json lists every seed.

    A seed that already finished is not trained again (each resumes from its own folder)."""
    from accelerate import PartialState

    from a2b_dist.config import load_config
    from a2b_dist.metrics import improves

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
        if r["best"] is not None and improves(base.eval.metric, r["best"]["value"], chosen and chosen["best"]):
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
