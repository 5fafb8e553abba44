"""The ``a2b evaluate`` command: score a labelled role with a trained generator and write the files.

The pieces live by concern: scoring.py (the pass over a role), metrics.py, references.py,
figures.py, distributed.py, files.py; this module parses the command line and writes.

One process:
    a2b evaluate --checkpoint runs/demo --shards data/demo/test --out runs/demo/eval --references
Several processes (every sample is scored exactly once across ranks; rank 0 writes the files):
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 -m a2b_dist.evaluate \
        --checkpoint runs/demo --shards data/demo/test --out runs/demo/eval

The paper's score (section 3.3, 4) is the mean of the difference map |x - B'|; ``topk`` (the mean of
the largest topk_percent of the map) is reported beside it. Files written to --out:
report.html (one self-contained page: a2b_dist.report), metrics.json, scores.csv, roc.png,
masks.png, maps/<class>-<key>.png; with ``--group-by patient`` also groups.csv and a ``groups`` entry in metrics.json (AUROC of each group's mean and max score).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from a2b_dist.config import SCORING_FIELDS, override_values, to_yaml
from a2b_dist.data import EvalReader
from a2b_dist.errors import UserError, check_output_folder, run_guarded
from a2b_dist.figures import plot_masks, plot_panel, plot_roc, safe_name
from a2b_dist.files import StagedFolder, write_atomic
from a2b_dist.memory import bound_heap
from a2b_dist.metrics import group_metrics
from a2b_dist.references import healthy_mean_image
from a2b_dist.provenance import provenance
from a2b_dist.report import write_evaluation_report
from a2b_dist.scoring import Kept, score_role, scoring_overrides, summarise_result


# Everything a2b evaluate writes into --out (an existing --out may hold these and nothing else).
OUTPUTS = ("report.html", "metrics.json", "scores.csv", "groups.csv", "roc.png", "masks.png", "maps")


def sample_groups(role_dir: str | os.PathLike, field: str, storage=None) -> dict[str, str]:
    """key -> the value of ``field`` in each sample's json (``patient``, ``volume``, ``group``)."""
    from a2b_dist.data.manifest import sample_origins

    out = {}
    for key, origin in sample_origins(role_dir, storage).items():
        value = origin.get(field)
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"--group-by {field}: sample {key!r} in {role_dir} has no {field!r} in its json; "
                            "shards from `shards/build.py dicom` carry patient and group, `nifti` volume and group")
        out[key] = str(value)
    return out


def write_groups_csv(path: str | os.PathLike, field: str, table: list[tuple]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([field, "label", "images", "score_mean", "score_max"])
    for name, label, n, mean, top in table:
        writer.writerow([name, label, n, f"{mean:.6g}", f"{top:.6g}"])
    write_atomic(path, buf.getvalue())


def write_scores_csv(path: str | os.PathLike, result: dict, score: str) -> None:
    """key, label, score (the chosen kind), then every score kind and reference as its own column."""
    columns = [f"score_{k}" for k in result["scores"]] + list(result["references"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", "label", "score"] + columns)
    values = list(result["scores"].values()) + list(result["references"].values())
    for i, key in enumerate(result["key"]):
        writer.writerow([key, int(result["label"][i]), f"{result['scores'][score][i]:.6g}"]
                        + [f"{v[i]:.6g}" for v in values])
    write_atomic(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="a2b evaluate", description=(
        "Score every image of a labelled shard role with a trained generator and write metrics.json, "
        "scores.csv, roc.png, masks.png and difference-map panels."))
    p.add_argument("--checkpoint", required=True,
                   help="export .pt, checkpoint folder, or run folder (its newest complete checkpoint; "
                        "RUN/best for the best one)")
    p.add_argument("--shards", required=True, help="a role folder of shards, e.g. data/demo/test, or its URL "
                   "(https://host/data/test, s3://bucket/data/test)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-maps", type=int, default=4, help="difference-map panels per class (default 4)")
    p.add_argument("--report-panels", type=int, default=6,
                   help="report.html: panels of the highest-scored healthy, lowest- and highest-scored "
                        "anomalous images, this many each (default 6)")
    p.add_argument("--references", action="store_true",
                   help="also report training-free references: greyness and distance to the healthy mean")
    p.add_argument("--healthy", default=None,
                   help="healthy role for --references and --fid (default: healthy/ beside --shards)")
    p.add_argument("--fid", action="store_true", help="also compute FID of B' against the healthy role")
    p.add_argument("--fid-cache", default=None, help="folder for cached healthy statistics (.npz)")
    p.add_argument("--seed", type=int, default=0, help="picks the panel and FID samples (default 0)")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="also aggregate scores per group named by this field of each sample's json "
                        "(patient, volume, group): mean and max score, AUROC per group; writes groups.csv")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="settings of the checkpoint's config to change for scoring: eval.* (score, "
                        "topk_percent, batch_size, fid_weights, fid_samples, fid_dims) and data.num_workers, "
                        "data.skip_corrupt, data.verify (size | count | sha256); e.g. eval.score=topk")
    return p


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    """The training step stored with a checkpoint or export, or None when it has none."""
    from a2b_dist import checkpoint

    p = Path(path)
    try:
        if p.is_file():
            blob = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            step = blob.get("step") if isinstance(blob, dict) else None
        else:
            step = checkpoint.read_meta(checkpoint.resolve_checkpoint(p)).get("step")
    except (OSError, RuntimeError, ValueError, KeyError, UserError):
        return None
    return int(step) if step is not None else None


def _check_args(args) -> None:
    """Argument checks before anything is loaded (a URL's manifest is checked when it is read)."""
    from a2b_dist.data.storage import check_location, is_url, join, parent

    shards = check_location(args.shards, "--shards")
    check_location(args.checkpoint, "--checkpoint", local="checkpoints are read from local files")
    check_location(args.out, "--out", local="the outputs are written to a local folder")
    if not is_url(shards) and not (Path(shards) / "manifest.json").is_file():
        raise UserError(f"--shards {shards}: no manifest.json there; pass one role folder written by "
                        "`python shards/build.py`, e.g. DATA/test")
    if not Path(args.checkpoint).exists():
        raise UserError(f"--checkpoint {args.checkpoint} does not exist")
    check_output_folder("--out", args.out)
    for name in ("num_maps", "report_panels"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(args, name)}")
    override_values(args.overrides)   # malformed overrides fail before anything is loaded
    if (args.references or args.fid):
        healthy = check_location(args.healthy, "--healthy") if args.healthy else join(parent(shards), "healthy")
        if not is_url(healthy) and not (Path(healthy) / "manifest.json").is_file():
            raise UserError(f"{healthy} is not a healthy shard role (no manifest.json); "
                            "--references and --fid need one: pass --healthy DIR")
        args.healthy = healthy


def main(argv: Optional[list[str]] = None) -> int:
    from accelerate import Accelerator

    from a2b_dist.distributed import gather_objects

    args = build_parser().parse_intermixed_args(argv)
    _check_args(args)
    bound_heap()   # resident memory stays flat over a long pass (a2b_dist/memory.py)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    # The outputs go to a staging folder beside --out, swapped in at the end: --out holds one
    # evaluation's files, and an unwritable place is found before the long passes.
    stage = StagedFolder(args.out, "--out", "a2b evaluate", OUTPUTS)
    refused = None
    if accelerator.is_main_process:
        try:
            stage.prepare()
        except UserError as e:
            refused = str(e)
    refused = gather_objects(refused, world)[0]
    if refused is not None:
        raise UserError(refused)
    try:
        return _evaluate(args, argv, accelerator, stage)
    finally:
        stage.discard()


def _evaluate(args, argv: Optional[list[str]], accelerator, stage: StagedFolder) -> int:
    from a2b_dist.checkpoint import load_generator, require_map_norm
    from a2b_dist.data.manifest import open_role
    from a2b_dist.data.storage import join
    from a2b_dist.distributed import verified_once

    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    # Load the generator and its config (with this command's overrides); the shards must match its
    # image size and channels.
    generator, cfg = load_generator(args.checkpoint, device=device)
    cfg, _ = scoring_overrides(cfg, args.overrides, SCORING_FIELDS, "a2b evaluate")
    size, channels = cfg.data.image_size, cfg.data.channels
    reader = EvalReader.from_config(cfg, rank, world)
    manifest = verified_once(   # data.verify=sha256 reads every shard once, on rank 0
        lambda verify: open_role(args.shards, image_size=size, channels=channels, skip_corrupt=cfg.data.skip_corrupt,
                                 verify=verify, storage=reader.storage), cfg.data.verify, rank, world)
    if args.healthy:   # a URL's healthy role is checked here, before the long passes
        open_role(args.healthy, image_size=size, channels=channels, skip_corrupt=cfg.data.skip_corrupt,
                  verify="size", storage=reader.storage)
    groups = (sample_groups(args.shards, args.group_by, reader.storage)   # fail before scoring
              if args.group_by else None)
    if args.fid:  # fail before the long passes when the Inception weights are missing
        from a2b_dist import fid
        fid.find_weights(cfg.eval.fid_weights)
    score, topk = cfg.eval.score, cfg.eval.topk_percent
    norm = require_map_norm(generator, score, args.checkpoint)   # the healthy_z kinds' statistics, if kept

    # Training-free reference: the healthy mean image.
    healthy_mean = healthy_mean_image(args.healthy, reader) if args.references else None

    # Score every sample once across ranks.
    generator.eval()
    result = score_role(generator, args.shards, reader, topk_percent=topk, device=device,
                        healthy_mean=healthy_mean, norm=norm,
                        kept=Kept(panels=args.num_maps, extremes=args.report_panels, seed=args.seed, score=score))
    metrics = summarise_result(result, score=score)
    metrics = {"checkpoint": str(args.checkpoint), "step": checkpoint_step(args.checkpoint),
               "shards": str(args.shards), "role": manifest.get("role"), "processes": world,
               "topk_percent": topk, **metrics}
    expected = manifest.get("samples", manifest.get("count"))
    metrics["counts"]["manifest"] = expected
    if not args.references:
        metrics.pop("references")
    grouped = None
    if groups is not None:
        grouped = group_metrics(result["key"], result["label"], result["scores"][score], groups)
        metrics["groups"] = {"by": args.group_by, "score": score,
                             **{k: v for k, v in grouped.items() if k != "table"}}

    if args.fid:
        metrics["fid"] = fid.translation_fid(
            generator, args.shards, args.healthy, reader, device=device, samples=cfg.eval.fid_samples,
            dims=cfg.eval.fid_dims, weights=cfg.eval.fid_weights, seed=args.seed, cache_dir=args.fid_cache)

    # Rank 0 writes the files.
    if accelerator.is_main_process:
        with stage.writing() as out:
            _write_outputs(out, args, argv, metrics, result, grouped, cfg, reader, score)
        _report(metrics, Path(args.out), expected)
    accelerator.wait_for_everyone()
    return 0


def _write_outputs(out: Path, args, argv, metrics: dict, result: dict, grouped, cfg, reader, score: str) -> None:
    from a2b_dist.data.storage import join

    (out / "maps").mkdir(parents=True, exist_ok=True)
    write_scores_csv(out / "scores.csv", result, score)
    if grouped is not None:
        write_groups_csv(out / "groups.csv", args.group_by, grouped["table"])
    plot_roc(out / "roc.png", result, score)
    by_key = {k: i for i, k in enumerate(result["key"])}
    for cls, entries in result["panels"].items():
        for key, arrays in entries:
            plot_panel(out / "maps" / f"{'anomalous' if cls else 'healthy'}-{safe_name(key)}.png",
                       key, cls, float(result["scores"][score][by_key[key]]), arrays, metrics.get("map_scale"))
    if result["panels"][0] or result["panels"][1]:
        plot_masks(out / "masks.png", result["panels"])
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    manifests = {"scored": join(args.shards, "manifest.json")}
    if args.healthy:
        manifests["healthy"] = join(args.healthy, "manifest.json")
    write_evaluation_report(out / "report.html", metrics=metrics, result=result, config_yaml=to_yaml(cfg),
                            prov=provenance(["a2b", "evaluate", *(argv if argv is not None else sys.argv[1:])],
                                            manifests=manifests, storage=reader.storage),
                            group_table=grouped["table"] if grouped is not None else None,
                            group_field=args.group_by)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _report(metrics: dict, out: Path, expected: Optional[int]) -> None:
    c = metrics["counts"]
    print(f"scored {c['samples']} images ({c['healthy']} healthy, {c['anomalous']} anomalous"
          + (f"; manifest lists {expected}" if expected is not None and expected != c["samples"] else "")
          + f") on {metrics['processes']} process(es)")
    if c["healthy"] == 0 or c["anomalous"] == 0:
        print(f"image AUROC, AUPR and threshold are undefined: the role holds only "
              f"{'anomalous' if c['anomalous'] else 'healthy'} images (both classes are needed); "
              f"pixel AUROC {_fmt(metrics['pixel_auroc'])}   AUPRO (FPR <= 0.3) {_fmt(metrics.get('pixel_aupro'))}")
    else:
        print(f"image AUROC ({metrics['score']}): {_fmt(metrics['auroc'])}   AUPR {_fmt(metrics['aupr'])}   "
              f"pixel AUROC {_fmt(metrics['pixel_auroc'])}   AUPRO (FPR <= 0.3) {_fmt(metrics.get('pixel_aupro'))}")
    for name, m in metrics.get("references", {}).items():
        print(f"reference {name}: AUROC {_fmt(m['auroc'])}")
    mask = metrics["mask"]
    if mask:
        print(f"mask: inside/outside {_fmt(mask['mask_inside_outside_ratio'])}   per-pixel std "
              f"{_fmt(mask['mask_pixel_std'])}   pixel AUROC of M {_fmt(mask['mask_pixel_auroc'])}")
    if "groups" in metrics:
        g = metrics["groups"]
        print(f"per {g['by']} ({g['groups']} groups): AUROC of the mean score {_fmt(g['mean']['auroc'])}   "
              f"of the max score {_fmt(g['max']['auroc'])}")
    if "fid" in metrics:
        print(f"FID: {metrics['fid']['fid']:.3f} ({metrics['fid']['samples']} samples)")
    print(f"wrote {out}/report.html (open it in a browser), metrics.json, scores.csv, roc.png, masks.png, maps/")


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
