"""Data layer: WebDataset shards per role (healthy, mixed, val, test), their manifests, and readers.

    manifest = read_manifest("data/demo/healthy", image_size=32, channels=1)
    stream = TrainStream("data/demo/healthy", StreamSpec(batch_size=16, image_size=32, channels=1, seed=0))
    for batch in eval_batches("data/demo/test", batch_size=64): ...

The format is documented in shards/README.md. This package takes plain arguments only: it knows
no trainer and no config module.
"""
from .images import load_image, load_mask, prepare_image, to_tensor
from .manifest import DataError, read_manifest
from .streams import EvalBatches, EvalReader, StreamSpec, TrainStream, eval_batches

__all__ = [
    "DataError",
    "EvalBatches",
    "EvalReader",
    "StreamSpec",
    "TrainStream",
    "eval_batches",
    "load_image",
    "load_mask",
    "prepare_image",
    "read_manifest",
    "to_tensor",
]
