"""FID between healthy translations B' and real healthy images (paper section 4.4, Heusel et al.),
with pytorch-fid's own Inception network and distance function.

Never downloads: the Inception weights (pt_inception-2015-12-05-6726825d.pth) are read from a
configured path (eval.fid_weights) or from the torch hub cache,
<torch.hub.get_dir()>/checkpoints/; without them ``find_weights`` raises a UserError that says where
to put the file. Samples are picked by a seeded hash of their keys (the same on any number of ranks),
features are gathered from all ranks, and the healthy reference statistics are cached as .npz under
a name derived from everything they depend on (weights file, dims, sample count, seed, manifest).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from pytorch_fid.inception import InceptionV3
from torch.nn.functional import adaptive_avg_pool2d

from a2b_dist import losses
from a2b_dist.data import EvalReader
from a2b_dist.errors import UserError
from a2b_dist.files import atomic_path, sha256_file
from a2b_dist.distributed import gather_objects, sample_priority

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = fid_inception.FID_WEIGHTS_URL
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# The network

def hub_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def find_weights(configured: Optional[str | os.PathLike] = None) -> Path:
    """The Inception weights file: the configured path (a file, or a folder holding it), else the
    torch hub cache. Raises UserError saying where to put the file when it is absent."""
    hub = hub_weights_path()
    fetch = (f"This program never downloads: fetch {WEIGHTS_URL} on a machine with internet access")
    if configured:
        path = Path(configured).expanduser()
        if path.is_dir():
            path = path / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"FID weights not found: {path} (from eval.fid_weights) does not exist. "
                            f"{fetch} and pass its path as eval.fid_weights=PATH (the config, or an override "
                            "of a2b evaluate), "
                            f"or put it at {hub} (the torch hub cache) and leave the option out.")
        return path
    if not hub.is_file():
        raise UserError(f"FID weights not found: FID needs pytorch-fid's Inception weights at {hub} "
                        f"(the torch hub cache, <torch.hub.get_dir()>/checkpoints/). {fetch} and put the file "
                        "there, or pass its path as eval.fid_weights=PATH (the config, or an override of "
                        "a2b evaluate).")
    return hub


@contextlib.contextmanager
def _weights_from(path: Path) -> Iterator[None]:
    """Make pytorch-fid's fid_inception_v3() read the state dict from ``path`` (weights_only, so no
    code is unpickled) instead of its URL; restored on exit."""
    original = fid_inception.load_state_dict_from_url

    def load(url, *args, **kwargs):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated file, or not a torch file
            raise UserError(f"{path} is not a readable Inception weights file ({type(e).__name__}: {e}); "
                            f"download {WEIGHTS_FILE} again from {WEIGHTS_URL}") from None

    fid_inception.load_state_dict_from_url = load
    try:
        yield
    finally:
        fid_inception.load_state_dict_from_url = original


_LAST_MODEL: dict[tuple, InceptionV3] = {}


def load_inception(weights: str | os.PathLike, dims: int = 2048, device: str | torch.device = "cpu") -> InceptionV3:
    """pytorch-fid's FID InceptionV3 returning ``dims`` features, weights from a file (checked first).
    The last model is kept for the next call with the same file, dims and device (the trainer asks
    every eval.every steps)."""
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise UserError(f"FID dims={dims} is not one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}")
    path = find_weights(weights)
    st = path.stat()
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns, dims, str(torch.device(device)))
    if ident not in _LAST_MODEL:
        _LAST_MODEL.clear()
        _LAST_MODEL[ident] = _build_inception(path, dims).to(device).eval()
    return _LAST_MODEL[ident]


def _build_inception(path: Path, dims: int) -> InceptionV3:
    with _weights_from(path):
        try:
            model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except RuntimeError as e:  # load_state_dict: missing or mis-shaped keys
            raise UserError(f"{path} does not hold pytorch-fid's FID Inception weights ({str(e).splitlines()[0]}); "
                            f"download {WEIGHTS_FILE} from {WEIGHTS_URL}") from None
    return model


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, 3, H, W) in [0, 1]; 1-channel images repeat to 3. InceptionV3
    itself resizes to 299 x 299 (bilinear) and rescales, as pytorch-fid does for image files."""
    u = ((x.float() + 1) / 2).clamp(0, 1)
    return u.repeat(1, 3, 1, 1) if u.shape[1] == 1 else u


@torch.no_grad()
def inception_features(model: InceptionV3, x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, dims) float64, as pytorch-fid's get_activations computes them."""
    pred = model(inception_input(x))[0]
    if pred.shape[2] != 1 or pred.shape[3] != 1:  # blocks before the last: average-pool to 1 x 1
        pred = adaptive_avg_pool2d(pred, output_size=(1, 1))
    return pred.squeeze(3).squeeze(2).cpu().double().numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, dims) features (pytorch-fid's calculate_activation_statistics)."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance, as a float."""
    with warnings.catch_warnings():  # pytorch-fid 0.3.0 passes sqrtm's disp, deprecated in SciPy 1.16
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


# ---------------------------------------------------------------------------------------------
# Sampling a role and gathering features

def _role_count(role_dir: str | os.PathLike, image_size, channels, storage=None) -> tuple[dict, int]:
    from a2b_dist.data import read_manifest

    manifest = read_manifest(role_dir, image_size=image_size, channels=channels, storage=storage)
    return manifest, int(manifest.get("samples", manifest.get("count", 0)))


@torch.no_grad()
def sampled_features(role_dir: str | os.PathLike, transform: Callable[[torch.Tensor], np.ndarray],
                     reader: EvalReader, *, samples: int, seed: int, device: str | torch.device) -> np.ndarray:
    """Features (n, dims) of min(samples, role size) samples picked by seeded key hash, identical on
    every rank and for any world size; ``transform`` maps an image batch in [-1, 1] to features."""
    _, count = _role_count(role_dir, reader.image_size, reader.channels, reader.storage)
    # Keep a little more than needed by hash (3 standard deviations), then the ``samples`` lowest
    # after gathering; in the rare case that is too few, read again keeping everything. Either way
    # the result is the ``samples`` lowest priorities of the whole role.
    keep = min(1.0, (samples + 3 * math.sqrt(samples) + 3) / max(count, 1))
    picked = _pick(role_dir, transform, keep, seed, reader, device)
    if len(picked) < min(samples, count) and keep < 1.0:
        picked = _pick(role_dir, transform, 1.0, seed, reader, device)
    everything = sorted(picked, key=lambda e: (e[0], e[1]))[:samples]
    if len(everything) < 2:
        raise UserError(f"{role_dir}: FID needs at least 2 images, found {len(everything)}")
    return np.stack([f for _, _, f in everything])


def _pick(role_dir, transform, keep: float, seed: int, reader: EvalReader, device
          ) -> list[tuple[float, str, np.ndarray]]:
    """(priority, key, features) of every sample whose priority is below ``keep``, from all ranks."""
    picked: list[tuple[float, str, np.ndarray]] = []
    for batch in reader.batches(role_dir):
        prio = [sample_priority(k, seed) for k in batch["key"]]
        idx = [i for i, p in enumerate(prio) if p < keep]
        if not idx:
            continue
        feats = transform(batch["image"][idx].to(device))
        picked += [(prio[i], batch["key"][i], f) for i, f in zip(idx, feats)]
    return [e for part in gather_objects(picked, reader.world_size) for e in part]


# ---------------------------------------------------------------------------------------------
# Reference statistics of the healthy role, cached

_WEIGHTS_HASHES: dict[tuple, str] = {}


def _weights_hash(path: Path) -> str:
    st = path.stat()
    ident = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if ident not in _WEIGHTS_HASHES:
        _WEIGHTS_HASHES[ident] = sha256_file(path)
    return _WEIGHTS_HASHES[ident]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "a2b_dist" / "fid"


def reference_cache_key(weights: Path, dims: int, samples: int, seed: int, manifest: dict) -> str:
    """Hash of everything the healthy statistics depend on; a change to any gives a new file name."""
    blob = json.dumps({"version": CACHE_VERSION, "weights_sha256": _weights_hash(weights), "dims": dims,
                       "samples": samples, "seed": seed, "manifest": manifest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def reference_statistics(healthy_dir: str | os.PathLike, model: InceptionV3, reader: EvalReader, *,
                         weights: Path, dims: int, samples: int, seed: int, device: str | torch.device,
                         cache_dir: Optional[str | os.PathLike] = None) -> dict:
    """{"mu", "sigma", "n", "path", "cached"} of the healthy role; read from / written to the cache.
    Rank 0 decides whether the cache holds them, so all ranks take the same branch."""
    manifest, _ = _role_count(healthy_dir, reader.image_size, reader.channels, reader.storage)
    key = reference_cache_key(weights, dims, samples, seed, manifest)
    path = Path(cache_dir or default_cache_dir()) / f"healthy-{key}.npz"
    loaded = None
    if reader.rank == 0 and path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                loaded = {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"])}
    loaded = gather_objects(loaded, reader.world_size)[0]
    if loaded is not None:
        return {**loaded, "path": str(path), "cached": True}
    feats = sampled_features(healthy_dir, lambda x: inception_features(model, x), reader, samples=samples,
                             seed=seed, device=device)
    mu, sigma = statistics(feats)
    if reader.rank == 0:
        try:   # a cache: a place that cannot be written costs the next run this pass, not this result
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, mu=mu, sigma=sigma, n=len(feats), key=key)
        except OSError as e:
            print(f"warning: --fid-cache: could not cache the healthy statistics at {path}: {e.strerror or e}",
                  file=sys.stderr)
    return {"mu": mu, "sigma": sigma, "n": len(feats), "path": str(path), "cached": False}


# ---------------------------------------------------------------------------------------------
# FID of a generator's healthy translations

@torch.no_grad()
def translation_fid(generator: torch.nn.Module, role_dir: str | os.PathLike, healthy_dir: str | os.PathLike,
                    reader: Optional[EvalReader] = None, *, device: str | torch.device = "cpu",
                    samples: int = 1000, dims: int = 2048, weights: Optional[str | os.PathLike] = None,
                    seed: int = 0, cache_dir: Optional[str | os.PathLike] = None) -> dict:
    """FID between B' (Eq. 1) of ``samples`` images of ``role_dir`` and ``samples`` real images of
    ``healthy_dir``. The caller puts the generator in eval mode. Same result on every rank."""
    path = find_weights(weights)          # before building anything: fail fast with the fix
    model = load_inception(path, dims, device)
    reader = reader or EvalReader()
    common = dict(samples=samples, seed=seed, device=device)
    ref = reference_statistics(healthy_dir, model, reader, weights=path, dims=dims, cache_dir=cache_dir, **common)

    def translate(x: torch.Tensor) -> np.ndarray:
        b_int, m = generator(x)
        return inception_features(model, losses.blend_healthy(x, b_int, m))

    feats = sampled_features(role_dir, translate, reader, **common)
    mu, sigma = statistics(feats)
    return {"fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), "samples": len(feats),
            "reference_cached": ref["cached"],
            "reference_samples": ref["n"], "dims": dims, "seed": seed, "weights": str(path),
            "role": str(role_dir), "healthy": str(healthy_dir), "reference_cache": ref["path"]}


def selection_fid(generator: torch.nn.Module, cfg, *, device: str | torch.device, rank: int = 0,
                  world_size: int = 1) -> dict[str, float]:
    """Model selection by FID: B' of the val role (the mixed role where there is no val) against the
    healthy role, cfg.eval.fid_samples per side, seed 0; reference statistics cached in the run folder."""
    from a2b_dist.data.manifest import role_exists
    from a2b_dist.data.storage import join

    reader = EvalReader.from_config(cfg, rank, world_size)
    root = cfg.data.root
    role = join(root, "val" if role_exists(root, "val", reader.storage) else "mixed")
    result = translation_fid(generator, role, join(root, "healthy"), reader,
                             device=device, samples=cfg.eval.fid_samples, dims=cfg.eval.fid_dims,
                             weights=cfg.eval.fid_weights, seed=0, cache_dir=Path(cfg.train.run_dir) / "fid-cache")
    return {"fid": result["fid"], "fid_samples": float(result["samples"])}
