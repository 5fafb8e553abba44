"""`a2b` command: every job of the toolkit, one verb each.

    a2b build simulated --source mnist5k --size 32 --out data/demo   # or folder, npz, dicom, split, nifti
    a2b upload data/xray s3://bucket/xray  |  a2b verify data/xray
    a2b train --config configs/demo.yaml [section.field=value ...] [--resume auto|none|PATH]
    a2b submit --config configs/covid.yaml --partition gpu --nodes 4  |  a2b status runs/covid
    a2b tune --config configs/test.yaml data.root=data/demo --metric val_auc   (pip install '.[sweeps]')
    a2b export CKPT OUT.pt  |  a2b export CKPT OUT.onnx --format onnx
    a2b evaluate --checkpoint CKPT --shards DIR --out DIR
    a2b detect --checkpoint CKPT --images DIR --out DIR

The scripts the layout promised run the same commands: `python shards/build.py` is `a2b build`
(with `upload` and `verify` as its subcommands), `python jobs/submit.py` is `a2b submit`,
`python jobs/status.py` is `a2b status`, `python sweeps/tune.py` is `a2b tune`.

User mistakes (a bad path, argument or config value) print one message and exit 2, no traceback.
"""
from __future__ import annotations

import functools
import importlib
import sys
from typing import Optional

from a2b_dist.errors import UserError, run_guarded

# verb -> (the module whose main(argv) runs it, one line of help), in the order data flows
COMMANDS = {
    "build": ("a2b_dist.build", "WebDataset shards from images: folder, npz, dicom, split, nifti, simulated"),
    "upload": ("a2b_dist.build", "copy a built data root to object storage (s3://, gs://), manifests last"),
    "verify": ("a2b_dist.build", "check every shard against its manifest: size, sample count, sha256"),
    "train": ("a2b_dist.train_cli", "train A2B-GAN from shards"),
    "submit": ("a2b_dist.jobs.submit", "train on SLURM through submitit (or the same tasks on this machine)"),
    "status": ("a2b_dist.jobs.status", "a run's job state, last step, metrics, checkpoints and replicas"),
    "tune": ("a2b_dist.sweeps.tune", "search the loss weights with Ray Tune (pip install '.[sweeps]')"),
    "export": ("a2b_dist.cli", "write a checkpoint's generator and config to one .pt (or .onnx) file"),
    "evaluate": ("a2b_dist.evaluate", "AUROC, scores, ROC and difference maps on a labelled role"),
    "detect": ("a2b_dist.detect", "scores and maps for a folder of new images"),
}
# Verbs whose main(argv, prog) names itself in its messages (`a2b submit`, or `jobs/submit.py` when
# run by that path); `a2b upload ARGS` and `a2b verify ARGS` are `a2b build upload|verify ARGS`.
NAMED = ("build", "submit", "status", "tune")
BUILD_STEPS = ("upload", "verify")


def export_main(argv: list[str]) -> int:
    import argparse

    from a2b_dist.checkpoint import export_generator

    parser = argparse.ArgumentParser(prog="a2b export", description=COMMANDS["export"][1])
    parser.add_argument("checkpoint", help="checkpoint folder or run folder (newest complete checkpoint)")
    parser.add_argument("out", help="output file, e.g. generator.pt (or generator.onnx with --format onnx)")
    parser.add_argument("--format", choices=("pt", "onnx"), default="pt",
                        help="pt: weights and config for torch.load(weights_only=True) (default); onnx: the "
                             "generator as an ONNX graph (opset 18, any batch size; outputs b_prime, b_int, mask, "
                             "anomaly_map) for ONNX Runtime and other deployment stacks (pip install '.[onnx]')")
    args = parser.parse_args(argv)
    from a2b_dist.data.storage import check_location   # the one location check: no credentials echoed

    check_location(args.checkpoint, "checkpoint", local="checkpoints are read from local files")
    check_location(args.out, "out", local="the export is written to a local file")
    if args.format == "onnx":
        from a2b_dist.onnx_model import export_onnx

        out = export_onnx(args.checkpoint, args.out)
    elif args.out.lower().endswith(".onnx"):
        raise UserError(f"export target {args.out} ends in .onnx; add --format onnx, or name the .pt file otherwise")
    else:
        out = export_generator(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Run ``a2b VERB ARGS``; ``prog`` is the name its messages give it (a script's path, see ``script``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: a2b COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "export":
        return run_guarded(export_main, rest)
    module = importlib.import_module(COMMANDS[name][0])
    if name in BUILD_STEPS:
        return run_guarded(functools.partial(module.main, prog=prog or "a2b"), [name, *rest])
    if name in NAMED:
        return run_guarded(functools.partial(module.main, prog=prog or f"a2b {name}"), rest)
    return run_guarded(module.main, rest)


def script(verb: str, path: str) -> int:
    """What the scripts at the documented paths run: ``python jobs/submit.py ARGS`` is
    ``a2b submit ARGS``, its messages naming ``jobs/submit.py`` as before."""
    return main([verb, *sys.argv[1:]], prog=path)


if __name__ == "__main__":
    sys.exit(main())
