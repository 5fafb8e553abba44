"""The generator as ONNX, for deployment stacks (ONNX Runtime, Triton, MONAI Deploy), and an ONNX
Runtime stand-in for the PyTorch generator, so that `a2b detect` and `a2b evaluate` take a .onnx
file as --checkpoint (`pip install 'a2b_dist[onnx]'`).

The graph takes "image" (batch, channels, size, size) in [-1, 1], any batch size, and gives four
named outputs: "b_prime" (Eq. 1's healthy translation), "b_int" (the intermediate image), "mask"
(M) and "anomaly_map" (|image - b_prime| averaged over channels). The run's config travels in the
model's metadata (a2b_format, a2b_config), so the scores are computed as for the .pt file.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from a2b_dist import losses
from a2b_dist.errors import UserError

ONNX_FORMAT = "a2b-generator-onnx-v1"
OPSET = 18
INPUT = "image"
OUTPUTS = ("b_prime", "b_int", "mask", "anomaly_map")


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"ONNX needs the {module} package: pip install 'a2b_dist[onnx]' "
                        "(onnx, onnxscript and onnxruntime)") from None


class _Deployed(torch.nn.Module):
    """The generator with Eq. 1 and the difference map inside the graph."""

    def __init__(self, generator: torch.nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor):
        b_int, mask = self.generator(x)
        b_prime = losses.blend_healthy(x, b_int, mask)
        return b_prime, b_int, mask, losses.anomaly_map(x, b_prime)


def export_onnx(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the evaluation generator of ``checkpoint`` (an export .pt, a checkpoint or a run folder)
    to ``out`` (.onnx), with the run's config in its metadata."""
    from a2b_dist.checkpoint import load_generator, map_norm_of
    from a2b_dist.config import to_dict
    from a2b_dist.files import atomic_path

    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise UserError(f"export target {out}: an ONNX file must end in .onnx (a2b detect and a2b evaluate "
                        "tell the formats apart by it)")
    if out.is_dir():
        raise UserError(f"export target {out} is a folder; give a file name, for example {out / 'generator.onnx'}")
    onnx = _need("onnx")
    _need("onnxscript")       # torch.onnx's exporter
    generator, cfg = load_generator(checkpoint)
    size, channels = cfg.data.image_size, cfg.data.channels
    example = torch.zeros(2, channels, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Deployed(generator).eval(), (example,), dynamo=True, verbose=False,
                                    input_names=[INPUT], output_names=list(OUTPUTS), opset_version=OPSET,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    model = program.model_proto
    props = {"a2b_format": ONNX_FORMAT, "a2b_config": json.dumps(to_dict(cfg)), "a2b_source": str(checkpoint)}
    norm = map_norm_of(generator)
    if norm is not None:   # the healthy_z kinds' statistics travel as metadata; the scores are computed outside the graph
        props["a2b_map_norm"] = json.dumps({"shape": list(norm.shape), "values": norm.flatten().tolist()})
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
    except OSError as e:
        raise UserError(f"cannot write export file {out}: {e.strerror or e}") from None
    return out


class OnnxGenerator:
    """An exported .onnx run by ONNX Runtime, called like the generator: x -> (B_int, M) as tensors
    on x's device. ``config``: the run's config from the model's metadata."""

    training = False

    def __init__(self, path: str | Path):
        from a2b_dist.config import from_dict

        ort = _need("onnxruntime")
        path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:   # noqa: BLE001 - ONNX Runtime raises its own classes for a bad file
            raise UserError(f"{path} is not an ONNX model ONNX Runtime can load ({type(e).__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        outputs = [o.name for o in self.session.get_outputs()]
        if meta.get("a2b_format") != ONNX_FORMAT or "a2b_config" not in meta or not set(OUTPUTS) <= set(outputs):
            raise UserError(f"{path} is an ONNX model but not an a2b generator (expected a2b_format {ONNX_FORMAT!r} "
                            "in its metadata and the outputs " + ", ".join(OUTPUTS)
                            + "; make one with `a2b export CKPT OUT.onnx --format onnx`)")
        try:
            self.config = from_dict(json.loads(meta["a2b_config"]), str(path))
            norm = json.loads(meta["a2b_map_norm"]) if "a2b_map_norm" in meta else None
            self.map_norm = (None if norm is None else
                             torch.tensor(norm["values"], dtype=torch.float32).reshape(norm["shape"]))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{path}: its a2b metadata is not valid ({type(e).__name__}: {e})") from None

    def eval(self) -> "OnnxGenerator":
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b_int, mask = self.session.run(["b_int", "mask"], {INPUT: x.detach().float().cpu().numpy()})
        return torch.from_numpy(b_int).to(x.device), torch.from_numpy(mask).to(x.device)
