"""`a2b` command: train, export, evaluate, detect.

    a2b train --config configs/demo.yaml [section.field=value ...] [--resume auto|none|PATH]
    a2b export CKPT OUT.pt
    a2b evaluate --checkpoint CKPT --shards DIR --out DIR
    a2b detect --checkpoint CKPT --images DIR --out DIR

User mistakes (a bad path, argument or config value) print one message and exit 2, no traceback.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

from a2b_dist.errors import run_guarded

COMMANDS = {
    "train": ("a2b_dist.train", "train A2B-GAN from shards"),
    "export": ("a2b_dist.cli", "write a checkpoint's generator and config to one .pt file"),
    "evaluate": ("a2b_dist.evaluate", "AUROC, scores, ROC and difference maps on a labelled role"),
    "detect": ("a2b_dist.detect", "scores and maps for a folder of new images"),
}


def export_main(argv: list[str]) -> int:
    import argparse

    from a2b_dist.checkpoint import export_generator

    parser = argparse.ArgumentParser(prog="a2b export", description=COMMANDS["export"][1])
    parser.add_argument("checkpoint", help="checkpoint folder or run folder (newest complete checkpoint)")
    parser.add_argument("out", help="output file, e.g. generator.pt")
    args = parser.parse_args(argv)
    from a2b_dist.data.storage import check_location   # the one location check: no credentials echoed

    check_location(args.checkpoint, "checkpoint", local="checkpoints are read from local files")
    check_location(args.out, "out", local="the export is written to a local file")
    out = export_generator(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
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
    return run_guarded(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
