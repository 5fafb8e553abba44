"""Sharded, resumable checkpoints without pickle.

Layout of one checkpoint (``runs/<name>/checkpoints/step-000001000/`` or ``runs/<name>/best/``):

    meta.json                    step, world size, config, the JSON skeleton of the global state
    state-00000-of-00002.safetensors   rank 0's share of the global tensors (models, optimizers)
    state-00001-of-00002.safetensors   rank 1's share
    rank-00000.json / rank-00000.safetensors   rank 0's own state (data stream position, RNG)
    ...

The global state (both networks, both optimizers, the fp16 scaler) is the same on every DDP rank, so
its tensors are split between the ranks and each writes only its share; loading reads every share,
which is why a checkpoint written by N processes loads in M. All ranks write into
``.tmp-<name>``; after a barrier rank 0 writes ``meta.json`` last and renames the folder into place,
so a folder without the ``.tmp-`` prefix is always complete and a crash mid-write leaves the previous
checkpoint untouched. Everything is safetensors or JSON: loading never unpickles.

A backend (a2b_dist.backends) may write files of its own into the temporary folder before the
barrier; meta.json lists every file written ("files") with its SHA-256. With
``train.backend=deepspeed`` the ``state-*`` shards hold both networks' full weights only (so any
checkpoint exports, evaluates and detects without DeepSpeed), and each engine adds DeepSpeed's own
sharded checkpoint, from which training resumes:

    meta.json                    as above, "backend": "deepspeed"
    G/mp_rank_00_model_states.pt               generator weights (and, ZeRO 0, its optimizer), rank 0
    G/zero_pp_rank_0_mp_rank_00_optim_states.pt   ZeRO 1: rank 0's shard of the generator's Adam state
    D/...                        the same for the critic
    zero_to_fp32.py, zero_to_torch.py          DeepSpeed's recovery scripts (ZeRO 1), copied by it
    rank-00000.json / rank-00000.safetensors   as above

Those are torch.save files; they are read only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from a2b_dist.config import Config, from_dict, to_dict
from a2b_dist.errors import UserError
from a2b_dist.files import atomic_path, sha256_file, write_atomic
from a2b_dist.losses import NORM_KINDS, SCORE_KINDS

class CheckpointError(UserError):
    """A checkpoint that cannot be read or written; the message names the folder or file."""


FORMAT = "a2b-checkpoint-v1"
EXPORT_FORMAT = "a2b-generator-v1"
CHECKPOINTS = "checkpoints"
BEST = "best"
MAP_NORM = "map_norm"   # rank tensor: the healthy map statistics of the healthy_z score kinds
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------------
# Nested state <-> (JSON skeleton, flat tensor dict)

def flatten_state(obj: Any, prefix: str = "", tensors: Optional[dict] = None) -> tuple[Any, dict]:
    """Replace every tensor in a nested dict/list by a reference; return (skeleton, tensors)."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}, tensors
    if isinstance(obj, dict):
        items = [[k, flatten_state(v, f"{prefix}/{k}", tensors)[0]] for k, v in obj.items()]
        if all(isinstance(k, str) for k, _ in items):
            return {"__dict__": {k: v for k, v in items}}, tensors
        return {"__items__": items}, tensors   # non-string keys (optimizer state is keyed by int)
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten_state(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)]}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {prefix!r}")


def unflatten_state(skeleton: Any, tensors: dict) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"].items()}
        if "__items__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__items__"]}
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def _share(keys: list[str], tensors: dict, world_size: int) -> list[list[str]]:
    """Deterministic split of tensor keys into world_size groups of similar byte size."""
    groups: list[list[str]] = [[] for _ in range(world_size)]
    sizes = [0] * world_size
    for key in sorted(keys, key=lambda k: (-tensors[k].numel() * tensors[k].element_size(), k)):
        i = min(range(world_size), key=lambda r: (sizes[r], r))
        groups[i].append(key)
        sizes[i] += tensors[key].numel() * tensors[key].element_size()
    return groups


# ---------------------------------------------------------------------------------------------
# Writing

def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1), fsync=True)


def save_checkpoint(target: Path, *, global_state: dict, rank_state: dict,
                    rank_tensors: dict, meta: dict, rank: int, world_size: int,
                    barrier: Callable[[], None], write_extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write one checkpoint collectively (every rank calls this with the same target and meta).

    ``global_state`` is the nested state every rank holds (written as safetensors shares, each
    rank its own); ``write_extra(folder)``, when given, writes a backend's own files into the
    temporary folder on every rank (DeepSpeed's engines: their sharded checkpoints). A backend
    (a2b_dist.backends.checkpoint_parts) supplies both.
    """
    target = Path(target)
    tmp = target.parent / f".tmp-{target.name}"
    try:
        return _save(target, tmp, global_state, rank_state, rank_tensors, meta, rank, world_size, barrier,
                     write_extra)
    except (OSError, SafetensorError) as e:   # disk full, quota, a size limit: drop the partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"could not write checkpoint {target}: {reason}; the partial folder "
                              "was removed and earlier checkpoints are untouched") from None


def _save(target: Path, tmp: Path, global_state: Optional[dict], rank_state: dict, rank_tensors: dict,
          meta: dict, rank: int, world_size: int, barrier: Callable[[], None],
          write_extra: Optional[Callable[[Path], None]]) -> Path:
    if rank == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    skeleton, tensors = flatten_state(global_state)
    mine = _share(list(tensors), tensors, world_size)[rank]
    save_file({k: tensors[k] for k in mine}, str(tmp / f"state-{rank:05d}-of-{world_size:05d}.safetensors"))
    if write_extra is not None:   # the backend's own files (collective: DeepSpeed's ZeRO shards)
        write_extra(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in rank_tensors.items()},
              str(tmp / f"rank-{rank:05d}.safetensors"))
    _write_json(tmp / f"rank-{rank:05d}.json", rank_state)
    if os.environ.get("A2B_FAULT_KILL_IN_CHECKPOINT") == str(meta.get("step")) and rank == 0:
        # Fault injection for the crash-safety test: die like a SIGKILL'd job, mid-write.
        os.kill(os.getpid(), signal.SIGKILL)
    barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        written = {"skeleton": skeleton, "files": [str(p.relative_to(tmp)) for p in files],
                   "sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in files}}   # checked on load
        _write_json(tmp / "meta.json", {**meta, "format": FORMAT, "world_size": world_size, **written})
        _into_place(tmp, target)
    barrier()
    return target


def _into_place(tmp: Path, target: Path) -> None:
    """Rename a finished folder to ``target``; an existing one (only `best` is ever replaced) is moved
    aside, swapped, then deleted."""
    old = target.parent / f".old-{target.name}"
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a complete checkpoint folder to ``target`` (replacing one there) through a temporary
    folder, so that ``target`` is never half-written (a2b train --seeds keeps the best seed's)."""
    source, target = Path(source), Path(target)
    problem = checkpoint_problem(source)
    if problem is not None:
        raise CheckpointError(f"checkpoint {source} cannot be copied: {problem}")
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        _into_place(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not copy checkpoint {source} to {target}: {e.strerror or e}") from None
    return target


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}"


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of interrupted writes."""
    root = Path(run_dir) / CHECKPOINTS
    complete = list_checkpoints(run_dir)
    for path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    newest = complete[-1].name if complete else ""
    for path in root.glob(".tmp-*"):
        if path.name[len(".tmp-"):] < newest:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Finding and reading

def is_complete(path: Path) -> bool:
    meta = path / "meta.json"
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("format") == FORMAT and all((path / f).is_file() for f in expected_files(data))


def expected_files(meta: dict) -> list[str]:
    """The files a checkpoint's meta.json says it has: its "files" list, or (checkpoints written
    before it was recorded) the global state's shards."""
    if meta.get("files"):
        return list(meta["files"])
    ws = meta.get("world_size", 0)
    return [f"state-{r:05d}-of-{ws:05d}.safetensors" for r in range(ws)]


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """Why a checkpoint folder cannot be loaded, naming the damaged file; None when it can.

    Checks meta.json (valid JSON, format, step, world size, config), that every file it lists is
    there with the SHA-256 recorded at write time (checkpoints of older versions: without), and that
    every safetensors header parses and covers its file (a truncated copy fails here).
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return f"{meta_path} is missing (an interrupted write?)"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{meta_path} is not readable JSON ({e})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"{meta_path}: format {got!r}, expected {FORMAT!r}"
    for field in ("step", "world_size", "config"):
        if field not in meta:
            return f"{meta_path} has no {field!r} field"
    for name in expected_files(meta):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    for name, digest in (meta.get("sha256") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if sha256_file(file) != digest:
            return f"{file} is damaged (its SHA-256 differs from the one recorded in meta.json)"
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as e:   # SafetensorError: truncated or not a safetensors file
            return f"{file} is damaged ({e})"
    return None


def _step_folders(run_dir: str | Path) -> list[Path]:
    """Every step-* folder of a run, newest first by the step in its name (meta.json may be damaged)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)), reverse=True)


def newest_loadable(run_dir: str | Path, warn: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint of a run that checkpoint_problem passes; each damaged one newer than
    it is reported through ``warn`` and skipped (resume falls back instead of crashing)."""
    for path in _step_folders(run_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"warning: skipping damaged checkpoint {path}: {problem}")
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first (by the step stored in meta.json)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: read_meta(p)["step"])


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder meaning its newest complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist")
    if p.is_dir() and ((p / "meta.json").exists() or any(p.glob("*.safetensors"))):   # one checkpoint
        problem = checkpoint_problem(p)
        if problem is not None:
            raise CheckpointError(f"checkpoint {p} cannot be loaded: {problem}")
        return p
    if p.is_dir():
        newest = newest_loadable(p, warn=lambda line: print(line, file=sys.stderr))
        if newest is not None:
            return newest
        raise UserError(f"{p} holds no loadable checkpoint (expected {p}/{CHECKPOINTS}/step-*/meta.json "
                        "or a checkpoint folder such as a run's best/)")
    raise UserError(f"{p} is not a checkpoint folder or run folder")


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_checkpoint(path: str | Path, rank: int, *, prefixes: Optional[tuple[str, ...]] = None
                    ) -> tuple[dict, dict, Optional[dict], dict]:
    """Read a checkpoint: (global_state, meta, this rank's json state or None, this rank's tensors).

    ``prefixes`` limits the global tensors read (for example ("/G",) for the generator only).
    The rank's own state is returned only when the checkpoint was written by a world that had
    this rank; callers decide whether it still applies (same world size). For a DeepSpeed
    checkpoint the global state holds the networks' weights only (the optimizers' shards are the
    engines' to load).
    """
    path = Path(path)
    try:
        return _load(path, rank, prefixes)
    except CheckpointError:
        raise
    except Exception as e:   # damaged after the check, or a file of another program
        problem = checkpoint_problem(path) or f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {problem}") from None


def _load(path: Path, rank: int, prefixes: Optional[tuple[str, ...]]) -> tuple[dict, dict, Optional[dict], dict]:
    meta = read_meta(path)
    ws = meta["world_size"]
    tensors: dict[str, torch.Tensor] = {}
    for r in range(ws):
        with safe_open(str(path / f"state-{r:05d}-of-{ws:05d}.safetensors"), framework="pt") as f:
            for key in f.keys():
                if prefixes is None or key.startswith(prefixes):
                    tensors[key] = f.get_tensor(key)
    skeleton = meta["skeleton"]
    if prefixes is not None:
        keep = {p.strip("/").split("/")[0] for p in prefixes}
        skeleton = {"__dict__": {k: v for k, v in skeleton["__dict__"].items() if k in keep}}
    state = unflatten_state(skeleton, tensors)
    return state, meta, *load_rank_state(path, rank, meta)


def load_rank_state(path: Path, rank: int, meta: dict) -> tuple[Optional[dict], dict]:
    """(this rank's json state or None, this rank's tensors) from a checkpoint folder."""
    rank_json, rank_tensors = None, {}
    if rank < meta["world_size"] and (path / f"rank-{rank:05d}.json").is_file():
        rank_json = json.loads((path / f"rank-{rank:05d}.json").read_text())
        with safe_open(str(path / f"rank-{rank:05d}.safetensors"), framework="pt") as f:
            rank_tensors = {k: f.get_tensor(k) for k in f.keys()}
    return rank_json, rank_tensors


# ---------------------------------------------------------------------------------------------
# Generator for evaluation, detection and export

def load_generator(path: str | Path, *, device: str | torch.device = "cpu"):
    """(Generator in eval mode, Config) from an export file (.pt, or .onnx run by ONNX Runtime), a
    checkpoint folder or a run folder."""
    from a2b_dist.nets import build_generator

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".onnx":     # `a2b export --format onnx`, run by ONNX Runtime
        from a2b_dist.onnx_model import OnnxGenerator

        onnx_generator = OnnxGenerator(p)
        return onnx_generator, onnx_generator.config
    if p.is_file():
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or one that needs unpickling of code
            raise UserError(f"{p} is not an a2b export file ({type(e).__name__}: {e})") from None
        if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
            raise UserError(f"{p} is not an a2b export file (expected format {EXPORT_FORMAT!r}; "
                            "make one with `a2b export CKPT OUT.pt`)")
        cfg, weights = from_dict(resolved_config(blob), str(p)), blob["generator"]
        norm = blob.get(MAP_NORM)
    else:
        ckpt = resolve_checkpoint(p)
        state, meta, _, rank_tensors = load_checkpoint(ckpt, 0, prefixes=("/G/", "/G_ema/"))
        cfg, weights = from_dict(resolved_config(meta), str(ckpt)), evaluation_weights(state)
        norm = rank_tensors.get(MAP_NORM)
    gen = build_generator(cfg.model, cfg.data.channels)
    gen.load_state_dict(weights)
    gen.map_norm = norm     # the healthy_z kinds' statistics (None: taken without them)
    return gen.to(device).eval(), cfg


def map_norm_of(generator) -> Optional[torch.Tensor]:
    """The healthy map statistics a loaded generator carries (load_generator), or None."""
    return getattr(generator, MAP_NORM, None)


def require_map_norm(generator, score: str, source) -> Optional[torch.Tensor]:
    """The generator's healthy map statistics; a one-line error when ``score`` needs them and it has none."""
    norm = map_norm_of(generator)
    if score in NORM_KINDS and norm is None:
        raise UserError(f"{source} holds no healthy map statistics, which eval.score={score} needs (a checkpoint "
                        "trained with eval.normalize_images=0, or saved at a step without an evaluation); "
                        f"name another kind with eval.score=...")
    return norm


def chosen_score(meta: dict) -> str:
    """The score kind eval.score=auto chose on validation for this checkpoint: the best one's own
    choice (meta["selection"]), else that of the best evaluation before it (meta["best"]), else the
    paper's mean (a run that never evaluated after select_from)."""
    for entry in (meta.get("selection"), meta.get("best")):
        if isinstance(entry, dict) and entry.get("score") in SCORE_KINDS:
            return entry["score"]
    return "mean"


def resolved_config(meta: dict) -> dict:
    """The config of a checkpoint's meta (or an export file's contents) as a dict, with
    eval.score=auto replaced by the kind it chose (the mean where it records none)."""
    config = meta["config"]
    if config.get("eval", {}).get("score") == "auto":
        config = {**config, "eval": {**config["eval"], "score": chosen_score(meta)}}
    return config


def evaluation_weights(state: dict) -> dict:
    """The generator weights to evaluate: the moving average (train.ema_decay) when the checkpoint
    has one, else the trained weights."""
    if "G_ema" in state:
        prefix = "module."   # AveragedModel keeps the averaged copy as .module, beside n_averaged
        return {k[len(prefix):]: v for k, v in state["G_ema"].items() if k.startswith(prefix)}
    return state["G"]


def export_generator(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the evaluation generator (the average when kept) + config to one file loadable with
    torch.load(weights_only=True)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"export target {out} is a folder; give a file name, for example {out / 'generator.pt'}")
    ckpt = resolve_checkpoint(checkpoint)
    # The target's place is checked before the checkpoint is read: its folder made, and the
    # temporary file opened there (torch.save then writes to that open file, so a failure is an
    # OSError, never torch's RuntimeError about a path).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of export target {out}: {e.strerror or e}") from None
    try:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            state, meta, _, rank_tensors = load_checkpoint(ckpt, 0, prefixes=("/G/", "/G_ema/"))
            extra = {MAP_NORM: rank_tensors[MAP_NORM]} if MAP_NORM in rank_tensors else {}
            torch.save({"format": EXPORT_FORMAT, "generator": evaluation_weights(state),
                        "config": resolved_config(meta), "step": meta["step"], "source": str(ckpt), **extra}, f)
    except OSError as e:
        raise UserError(f"cannot write export file {out}: {e.strerror or e}") from None
    return out


def state_digest(states: dict) -> str:
    """SHA-256 over {"G": state_dict, "D": state_dict}: names, dtypes, shapes and bytes.

    Equal digests on every rank mean the DDP replicas hold identical weights.
    """
    h = hashlib.sha256()
    for name in sorted(states):
        for key in sorted(states[name]):
            t = states[name][key].detach().to("cpu").contiguous()
            h.update(f"{name}/{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def meta_for(cfg: Config, step: int, **extra: Any) -> dict:
    return {"step": step, "backend": cfg.train.backend, "config": to_dict(cfg), **extra}
