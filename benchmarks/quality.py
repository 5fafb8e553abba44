#!/usr/bin/env python
"""Detection quality: A2B-GAN against the detectors a user would pick instead, over protocols and seeds.

    python benchmarks/quality.py                                   # every protocol, seeds 0 1 2, demo budget
    python benchmarks/quality.py --protocols mnist-square phantom-lesion --seeds 0 --steps 500 --jobs 2
    python benchmarks/quality.py --variant ema=train.ema_decay=0.999 --methods a2b ema ae   # screen a lever

A protocol is SOURCE-KIND: `shards/build.py simulated --source SOURCE --anomaly KIND` at --size
(mnist stands for mnist5k),
built once into --work (data seed 0; the seeds vary every method's own randomness). Methods, each
trained at the same image budget (A2B-GAN's steps x n_critic x 2 roles x batch images drawn):
- a2b: the preset (--config, default configs/small.yaml: the toolkit's chosen defaults), trained on
  healthy + mixed, its checkpoint selected on validation AUROC as `a2b train` does;
- a2b-paper: the same networks and schedule with the paper's loss and optimiser values;
- a2b-healthy: the preset with the healthy set in the place of the mixed set (the ablation that
  tests the paper's thesis that the unannotated mixed set helps);
- ae: a convolutional autoencoder trained on healthy images only, scored by mean |x - AE(x)|;
- ddad: DDAD (Cai et al., MICCAI 2022): one ensemble of K autoencoders on healthy images, one on
  healthy + mixed; map = |mean_A - mean_B| (inter-discrepancy) + std_A (intra-discrepancy);
- pu: learning from positive and unlabelled data, the mixed set's own signal without a translation: a
  small patch classifier trained to tell mixed images (1) from healthy ones (0), scored by the mean
  of its top 5% patch logits (what any method could take from the mixed set at this budget);
- pca: PCA on healthy images, scored by mean |x - reconstruction|;
- references: the training-free greyness and healthy-distance scores.
ae and ddad are selected on validation AUROC at the cadence A2B-GAN is; the budget of ddad is
split evenly over its 2K autoencoders. Every A2B score kind (mean, topk, mask, smooth_topk, and the
critic's patch score on the input) is reported beside the preset's eval.score.
--fuse-pu adds, for every A2B-GAN method and the autoencoder, their score fused with the pu peer's
(each standardised on the healthy validation images, summed; the pu budget on top of theirs):
whether what the mixed set teaches a classifier adds to what the method finds by itself.
--variant NAME=key=value[,key=value...] adds an A2B-GAN method: the preset plus those overrides
(a screening run); the name may then be listed in --methods.

Results go to --work: one JSON per (protocol, method, seed), reused on a rerun (delete it to redo),
then results.json, table.md and val_auc.png (validation AUROC against steps for each A2B method).
Test AUROC is reported, never used to choose: choose on validation (the val_auc columns).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from a2b_dist.files import write_atomic  # noqa: E402

PROTOCOLS = ("mnist-square", "mnist-intensity", "mnist-noise", "mnist-blur", "phantom-lesion")
# The paper's values (section 4.4: lambda_id 1, lambda_fz 1, lambda_fs of its simulated set, lr 1e-4)
# on the preset's networks and schedule: no focus warm-up, no generator average, no output identity,
# plain mask selection, the mean score. Every loss weight the presets move away from the paper is set
# here, so that the column stays the paper's whatever the presets hold.
PAPER = ["loss.lambda_id=1", "loss.lambda_rec=1", "loss.lambda_f=0.1", "loss.lambda_fz=1", "loss.lambda_gp=10",
         "loss.lambda_fs=0.001", "loss.focus_eps=0.01", "loss.focus_warmup_steps=0",
         "loss.focus_warmup_terms=both", "loss.focus_size=image", "loss.lambda_id_out=0",
         "optim.lr_g=1e-4", "optim.lr_d=1e-4", "train.ema_decay=0", "data.hflip=false",
         "eval.select_from=0", "eval.score=mean", "eval.normalize_images=0", "model.mask_prior=0",
         "loss.pu_mask=0"]
# The synthetic-anomaly peer: the restoration lever (losses.foreign_patches) with the healthy set in
# the mixed set's place, so that the table separates "synthetic anomalies help" from "the mixed set helps".
SYNTH = ["loss.restore_prob=0.5"]
A2B_METHODS = {"a2b": [], "a2b-paper": PAPER, "a2b-healthy": [], "synth-healthy": SYNTH}
OTHER_METHODS = ("ae", "ddad", "pu", "pca", "references")
# Methods that read the mixed set, retrained at every --fractions value; the others are drawn flat.
MIXED_READERS_PEERS = ("ddad", "pu")
EVALS = 15            # validation evaluations per run, for every method that selects


# ---------------------------------------------------------------------------------------------
# Data

def protocol_dir(work: Path, protocol: str, size: int, fraction: float | None = None) -> Path:
    return work / "shards" / (f"{protocol}-{size}" + ("" if fraction is None else f"-f{fraction:g}"))


def parse_protocol(spec: str, default_size: int) -> tuple[str, int]:
    """NAME or NAME@SIZE (e.g. phantom-lesion@64) -> (NAME, SIZE)."""
    name, sep, size = spec.partition("@")
    if sep and not size.isdigit():
        raise SystemExit(f"--protocols {spec!r}: expected NAME or NAME@SIZE with SIZE a number of pixels")
    return name, int(size) if sep else default_size


def reads_mixed(method: str) -> bool:
    """Whether a method's training reads the mixed set (then it is retrained at every fraction)."""
    if method in OTHER_METHODS:
        return method in MIXED_READERS_PEERS
    return not healthy_only(method)


def healthy_only(method: str) -> bool:
    """A2B-GAN methods trained with the healthy set in the mixed set's place: a2b-healthy, synth-healthy
    and any --variant whose name ends in -healthy."""
    return method.endswith("-healthy")


def use_existing(work: Path, data: Path, size: int) -> str:
    """--data: an existing shards root (your own images) as one protocol named after its folder."""
    name = Path(data).resolve().name
    link = protocol_dir(work, name, size)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(data).resolve(), target_is_directory=True)
    return name


def ensure_shards(work: Path, protocol: str, size: int, fraction: float | None = None, scale: float = 1.0) -> Path:
    """The protocol's shards at ``size``; ``fraction``: its mixed role rebuilt with that anomalous share
    (the healthy, val and test roles are the same images as the protocol's own)."""
    root = protocol_dir(work, protocol, size, fraction)
    if all((root / r / "manifest.json").is_file() for r in ("healthy", "mixed", "val", "test")):
        return root
    source, _, kind = protocol.partition("-")
    source = {"mnist": "mnist5k"}.get(source, source)
    cmd = [sys.executable, str(ROOT / "shards" / "build.py"), "simulated", "--source", source,
           "--anomaly", kind, "--size", str(size), "--seed", "0", "--out", str(root), "--overwrite"]
    if fraction is not None:
        cmd += ["--mixed-fraction", str(fraction)]
    if scale != 1.0:
        cmd += ["--scale", str(scale)]
    print("building shards:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return root


def load_role(role_dir: Path, size: int) -> dict:
    from a2b_dist.data import eval_batches

    out = {"image": [], "label": [], "mask": [], "has_mask": []}
    for batch in eval_batches(role_dir, batch_size=256, image_size=size):
        for k in out:
            out[k].append(batch[k])
    return {k: torch.cat(v) for k, v in out.items()}


def mixed_fraction(root: Path) -> float:
    """The anomalous share of a built mixed role, from its manifest's truth counts."""
    truth = json.loads((root / "mixed" / "manifest.json").read_text()).get("simulated", {}).get("truth", {})
    total = sum(int(v) for v in truth.values())
    return round(int(truth.get("1", 0)) / total, 4) if total else float("nan")


def healthy_as_mixed(root: Path, work: Path) -> Path:
    """A shards root whose mixed role is the healthy role (links; nothing copied)."""
    alias = work / "shards" / f"{root.name}-healthy-as-mixed"
    alias.mkdir(parents=True, exist_ok=True)
    for role, target in (("healthy", "healthy"), ("mixed", "healthy"), ("val", "val"), ("test", "test")):
        link = alias / role
        if not link.exists():
            link.symlink_to((root / target).resolve(), target_is_directory=True)
    return alias


# ---------------------------------------------------------------------------------------------
# Metrics

def image_and_pixel(labels, scores, maps=None, gt=None, has_mask=None) -> dict:
    from a2b_dist.metrics import image_metrics, pixel_auroc

    out = {"auroc": image_metrics(np.asarray(labels), np.asarray(scores))["auroc"], "pixel_auroc": None}
    if maps is not None and has_mask is not None and bool(has_mask.any()):
        known = has_mask.bool().numpy()
        out["pixel_auroc"] = pixel_auroc(maps[known].numpy(), gt[known].numpy())
    return out


# ---------------------------------------------------------------------------------------------
# A2B-GAN

def a2b_config_preset(args):
    """The A2B-GAN preset as loaded (--config, --override): what the peers take their shared settings from."""
    from a2b_dist.config import load_config

    return load_config(args.config, list(args.override))


def a2b_config(args, overrides: list[str], root: Path, run_dir: Path, seed: int):
    from a2b_dist.config import load_config

    base = load_config(args.config)
    scale = args.steps / base.train.steps      # the preset's schedule, compressed or stretched
    sched = lambda v: int(round(v * scale))  # noqa: E731
    return load_config(args.config, [
        f"data.root={root}", f"data.image_size={args.size}", f"train.run_dir={run_dir}",
        f"train.steps={args.steps}", f"train.seed={seed}", f"train.batch_size={args.batch}",
        f"optim.decay_steps={sched(base.optim.decay_steps)}",
        f"loss.focus_warmup_steps={sched(base.loss.focus_warmup_steps)}",
        f"eval.every={max(1, args.steps // EVALS)}", f"eval.select_from={sched(base.eval.select_from)}",
        f"train.checkpoint_every={args.steps}", "train.sample_every=0", "train.cpu=true",
        "data.num_workers=0", *args.override, *overrides])


def critic_scores(run_dir: Path, cfg, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The final critic's patch scores on the inputs, negated (the critic rates healthy images high),
    and with loss.lambda_cls its domain head's: the mean of the top 5% patch logits for "mixed"."""
    from a2b_dist import checkpoint as ckpt
    from a2b_dist.nets import build_critic

    state, _, _, _ = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), 0, prefixes=("/D/",))
    D = build_critic(cfg.model, cfg.data.channels, cfg.data.image_size, domain_head=cfg.loss.lambda_cls > 0)
    D.load_state_dict(state["D"])
    D.eval()
    with torch.no_grad():
        out = torch.cat([D(x[i:i + 256]) for i in range(0, len(x), 256)])
    scores = {"critic": (-out[:, 0].flatten(1).mean(1)).numpy()}
    if out.shape[1] > 1:
        flat = out[:, 1].flatten(1)
        scores["domain"] = flat.topk(max(1, round(0.05 * flat.shape[1])), dim=1).values.mean(1).numpy()
    return scores


def run_a2b(args, method: str, root: Path, run_dir: Path, seed: int) -> dict:
    from a2b_dist.train import train

    overrides = {**A2B_METHODS, **args.variants}[method]
    data_root = healthy_as_mixed(root, Path(args.work)) if healthy_only(method) else root
    cfg = a2b_config(args, overrides, data_root, run_dir, seed)
    result = train(cfg, resume="none", argv=["benchmarks/quality.py", method])
    if result["stopped"]:     # a SIGTERM (or --until) ended training early: no cell from a partial run
        raise SystemExit(f"{run_dir}: training stopped at step {result['step']} of {cfg.train.steps}; "
                         "the cell is not recorded (run the benchmark again to redo it)")
    return score_a2b(args, method, root, run_dir, seed, (result["best"] or {}).get("value"))


def score_a2b(args, method: str, root: Path, run_dir: Path, seed: int, best_val_auc, rescore: bool = False) -> dict:
    """A trained run's cell: its chosen checkpoint scored on the test role by every kind, by the one
    eval.score=auto recorded. ``rescore``: with the current code's score kinds instead, the auto
    choice made again on validation at the same checkpoint (training and selection do not depend on
    the kinds, so this is the cell the current code would give, without training again)."""
    from a2b_dist import checkpoint as ckpt
    from a2b_dist.data import EvalReader
    from a2b_dist.references import healthy_mean_image
    from a2b_dist.scoring import chosen_kind, score_role, selection_metric, selection_norm, summarise_result

    data_root = healthy_as_mixed(root, Path(args.work)) if healthy_only(method) else root
    cfg = a2b_config(args, {**A2B_METHODS, **args.variants}[method], data_root, run_dir, seed)
    chosen = chosen_checkpoint(run_dir)
    G, loaded = ckpt.load_generator(chosen)
    norm = ckpt.map_norm_of(G)
    if rescore:
        norm = selection_norm(G, cfg, device="cpu")
        if cfg.eval.score == "auto":
            cfg.eval.score = chosen_kind(selection_metric(G, cfg, device="cpu", norm=norm))
    else:
        cfg.eval.score = loaded.eval.score          # eval.score=auto: the kind chosen on validation
    G.map_norm = norm
    with torch.no_grad():
        reader = EvalReader(batch_size=64, image_size=args.size)
        scored = score_role(G, root / "test", reader, topk_percent=cfg.eval.topk_percent,
                            healthy_mean=healthy_mean_image(root / "healthy", reader), norm=norm)
    summary = summarise_result(scored, score=cfg.eval.score)
    test = load_role(root / "test", args.size)
    scores = {k: v["auroc"] for k, v in summary["scores"].items()}
    for name, s in critic_scores(run_dir, cfg, test["image"]).items():
        scores[name] = image_and_pixel(test["label"], s)["auroc"]
    if args.fuse_pu:
        scores.update(a2b_fused(args, G, cfg, data_root, seed, test))
    curve = [[r["step"], r["eval/val_auc"]] for r in map(json.loads, open(run_dir / "metrics.jsonl"))
             if "eval/val_auc" in r]
    mask = summary["mask"]
    return {"auroc": summary["auroc"], "pixel_auroc": summary["pixel_auroc"], "scores": scores,
            "references": {k: v["auroc"] for k, v in summary["references"].items()},
            "mask": {k: mask.get(k) for k in ("mask_inside_outside_ratio", "mask_pixel_std", "mask_pixel_auroc",
                                              "mask_mean_healthy", "mask_mean_anomalous")},
            "selected_step": ckpt.read_meta(chosen)["step"], "val_curve": curve, "score": cfg.eval.score,
            "best_val_auc": best_val_auc, "images": args.steps * cfg.optim.n_critic * 2 * args.batch}


def a2b_fused(args, G, cfg, root: Path, seed: int, test: dict) -> dict:
    """pu_fused for an A2B-GAN generator, scored by the preset's eval.score."""
    from a2b_dist import losses as L
    from a2b_dist.checkpoint import map_norm_of

    def own_score(x):
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                xb = x[i:i + 256]
                b_int, m = G(xb)
                diff = L.anomaly_map(xb, L.blend_healthy(xb, b_int, m))
                out.append(L.anomaly_score(diff, cfg.eval.score, cfg.eval.topk_percent, m, L.anomaly_map(xb, b_int),
                                           map_norm_of(G)))
        return torch.cat(out).numpy()

    budget = args.steps * cfg.optim.n_critic * 2 * args.batch
    return pu_fused(args, root, seed, budget, own_score, test, load_role(root / "val", args.size))


def chosen_checkpoint(run_dir: Path):
    """The checkpoint `a2b train` hands a user: best/ when validation selected one, else the last."""
    from a2b_dist import checkpoint as ckpt

    best = run_dir / ckpt.BEST
    return ckpt.resolve_checkpoint(best) if best.exists() else ckpt.latest_checkpoint(run_dir)


# ---------------------------------------------------------------------------------------------
# Peers trained on healthy images (and, for DDAD, the mixed set too)

class ConvAutoencoder(nn.Module):
    """x (B, C, H, W) in [-1, 1] -> reconstruction, through a (B, 4w, H/8, W/8) bottleneck."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def train_autoencoders(args, pools: list[torch.Tensor], images_each: int, seed: int, score_fn, val: dict):
    """Train one autoencoder per pool in lockstep (L1, Adam), each drawing ``images_each`` images;
    every 1/EVALS of the way score val with score_fn(models, x) -> (maps, scores) and keep the best."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = [ConvAutoencoder(pools[0].shape[1], args.ae_width) for _ in pools]
    opts = [torch.optim.Adam(m.parameters(), lr=args.ae_lr) for m in models]
    iters = max(1, images_each // args.batch)
    every = max(1, iters // EVALS)
    best, best_state = -1.0, None
    for it in range(1, iters + 1):
        for m, opt, pool in zip(models, opts, pools):
            m.train()
            x = pool[torch.randint(len(pool), (args.batch,), generator=g)]
            loss = (m(x) - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if it % every == 0 or it == iters:
            for m in models:
                m.eval()
            with torch.no_grad():
                _, s = score_fn(models, val["image"])
            auc = image_and_pixel(val["label"], s)["auroc"]
            if auc > best:
                best, best_state = auc, [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    for m, state in zip(models, best_state):
        m.load_state_dict(state)
        m.eval()
    return models, best


def ae_maps(models, x):
    with torch.no_grad():
        maps = torch.cat([(x[i:i + 256] - models[0](x[i:i + 256])).abs().mean(1, keepdim=True)
                          for i in range(0, len(x), 256)])
    return maps, maps.flatten(1).mean(1).numpy()


MAP_KINDS = ("mean", "topk", "smooth_topk", "healthy_z")   # the score kinds a plain difference map has (no mask)


def map_kinds(test_maps: torch.Tensor, val_maps: torch.Tensor, val_labels, healthy_maps=None) -> tuple[dict, str]:
    """({kind: test scores}, the kind eval.score=auto's rule (scoring.chosen_kind) takes on
    validation), with the preset's top-k share: for a method whose only map is |x - x^|;
    ``healthy_maps``: its maps of the first healthy images (the preset's eval.normalize_images of
    them), which add healthy_z (the map standardised per pixel by them) as A2B-GAN's statistics do."""
    from a2b_dist import losses as L
    from a2b_dist.config import EvalConfig
    from a2b_dist.scoring import chosen_kind

    topk = EvalConfig().topk_percent
    norm = None if healthy_maps is None else L.norm_from_moments(L.map_moments(healthy_maps, torch.ones_like(healthy_maps), healthy_maps))
    kinds = [k for k in MAP_KINDS if norm is not None or k not in L.NORM_KINDS]
    chosen = chosen_kind({f"val_auc_{k}": image_and_pixel(val_labels, L.anomaly_score(val_maps, k, topk, norm=norm).numpy())["auroc"]
                          for k in kinds})
    return {k: L.anomaly_score(test_maps, k, topk, norm=norm).numpy() for k in kinds}, chosen


def ddad_maps(k: int):
    def fn(models, x):
        out = []
        with torch.no_grad():
            for i in range(0, len(x), 256):
                xb = x[i:i + 256]
                rec_a = torch.stack([m(xb) for m in models[:k]])          # (K, B, C, H, W): healthy only
                rec_b = torch.stack([m(xb) for m in models[k:]])          # healthy + mixed
                inter = (rec_a.mean(0) - rec_b.mean(0)).abs()
                intra = rec_a.std(0, unbiased=False)
                out.append((inter + intra).mean(1, keepdim=True))
        maps = torch.cat(out)
        return maps, maps.flatten(1).mean(1).numpy()
    return fn


class PatchClassifier(nn.Module):
    """x (B, C, H, W) -> (B, 1, H/4, W/4) logits, one per patch (receptive field about 22 px)."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def pu_maps(model, x, size: int):
    """Patch logits upsampled to the image (the map) and the mean of the top 5% of patches (the score)."""
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    flat = logits.flatten(1)
    k = max(1, round(0.05 * flat.shape[1]))
    scores = flat.topk(k, dim=1).values.mean(1).numpy()
    maps = nn.functional.interpolate(torch.sigmoid(logits), size=(size, size), mode="nearest")
    return maps, scores


def train_pu(args, healthy: torch.Tensor, mixed: torch.Tensor, budget: int, seed: int, val: dict):
    """Learning from positive and unlabelled data: every patch of a mixed image labelled 1, every
    patch of a healthy image 0 (binary cross-entropy, balanced batches). Where the mixed set holds
    anomalies, the patches that only it has are the ones rated high; with none, nothing is learnt."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PatchClassifier(healthy.shape[1], args.ae_width)
    opt = torch.optim.Adam(model.parameters(), lr=args.ae_lr)
    iters = max(1, budget // (2 * args.batch))
    every = max(1, iters // EVALS)
    best, best_state = -1.0, None
    for it in range(1, iters + 1):
        model.train()
        x = torch.cat([mixed[torch.randint(len(mixed), (args.batch,), generator=g)],
                       healthy[torch.randint(len(healthy), (args.batch,), generator=g)]])
        logits = model(x)
        target = torch.cat([torch.ones(args.batch), torch.zeros(args.batch)]).view(-1, 1, 1, 1).expand_as(logits)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % every == 0 or it == iters:
            model.eval()
            auc = image_and_pixel(val["label"], pu_maps(model, val["image"], args.size)[1])["auroc"]
            if auc > best:
                best, best_state = auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, best


FUSE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)   # the pu score's share in fused_pu_sel, chosen on validation


def pu_fused(args, root: Path, seed: int, budget: int, score_fn, test: dict, val: dict) -> dict:
    """A method's score fused with the pu peer's: the pu classifier trained with this seed at its own
    budget (on top of the method's), each score standardised by its mean and sd on the healthy
    validation images. {"fused_pu": test AUROC of the two summed, "fused_pu_val": its val AUROC,
    "fused_pu_sel": test AUROC of (1 - w) x method + w x pu with w of FUSE_WEIGHTS chosen on
    validation AUROC, "fused_pu_sel_val", "fused_pu_w"}: whether what the mixed set teaches a
    classifier adds to what the method finds by itself."""
    healthy = load_role(root / "healthy", args.size)["image"]
    model, _ = train_pu(args, healthy, load_role(root / "mixed", args.size)["image"], budget, seed, val)
    calib = val["image"][val["label"] == 0]

    def pu(x):
        return pu_maps(model, x, args.size)[1]

    def z(fn, x):
        ref = fn(calib)
        return (fn(x) - ref.mean()) / (ref.std() + 1e-12)

    zs = {name: (z(score_fn, role["image"]), z(pu, role["image"])) for name, role in (("test", test), ("val", val))}
    auc = lambda role, w: image_and_pixel(  # noqa: E731
        {"test": test, "val": val}[role]["label"], (1 - w) * zs[role][0] + w * zs[role][1])["auroc"]
    # the weight of the pu score chosen on validation AUROC (ties: the lower weight), reported on test
    chosen = max(FUSE_WEIGHTS, key=lambda w: (auc("val", w), -w))
    return {"fused_pu": auc("test", 0.5), "fused_pu_val": auc("val", 0.5),
            "fused_pu_sel": auc("test", chosen), "fused_pu_sel_val": auc("val", chosen), "fused_pu_w": chosen}


def run_peer(args, method: str, root: Path, seed: int, budget: int) -> dict:
    healthy = load_role(root / "healthy", args.size)["image"]
    test, val = load_role(root / "test", args.size), load_role(root / "val", args.size)
    extra = None
    chosen = None
    if method == "ae":
        models, best = train_autoencoders(args, [healthy], budget, seed, ae_maps, val)
        maps, scores = ae_maps(models, test["image"])
        # the same rule as eval.score=auto: selected by the mean, the kind then chosen on validation
        count = a2b_config_preset(args).eval.normalize_images
        by_kind, chosen = map_kinds(maps, ae_maps(models, val["image"])[0], val["label"],
                                    ae_maps(models, healthy[:count])[0] if count else None)
        scores = by_kind[chosen]
        extra = {k: image_and_pixel(test["label"], v)["auroc"] for k, v in by_kind.items()}
        if args.fuse_pu:
            extra.update(pu_fused(args, root, seed, budget, lambda x: ae_maps(models, x)[1], test, val))
    elif method == "ddad":
        k = args.ddad_k
        union = torch.cat([healthy, load_role(root / "mixed", args.size)["image"]])
        fn = ddad_maps(k)
        models, best = train_autoencoders(args, [healthy] * k + [union] * k, budget // (2 * k), seed, fn, val)
        maps, scores = fn(models, test["image"])
    elif method == "pu":
        model, best = train_pu(args, healthy, load_role(root / "mixed", args.size)["image"], budget, seed, val)
        maps, scores = pu_maps(model, test["image"], args.size)
    elif method == "pca":
        from sklearn.decomposition import PCA

        x = healthy[:budget].flatten(1).numpy()
        pca = PCA(n_components=min(args.pca_components, len(x)), svd_solver="randomized", random_state=seed)
        pca.fit(x)
        t = test["image"]
        rec = torch.from_numpy(pca.inverse_transform(pca.transform(t.flatten(1).numpy()))).float().reshape(t.shape)
        maps = (t - rec).abs().mean(1, keepdim=True)
        scores, best = maps.flatten(1).mean(1).numpy(), None
    else:
        raise ValueError(method)
    out = {**image_and_pixel(test["label"], scores, maps, test["mask"], test["has_mask"]), "best_val_auc": best}
    if extra:
        out["scores"] = extra
    if chosen is not None:
        out["score"] = chosen
    return out


# ---------------------------------------------------------------------------------------------
# Cells, table, plot

def run_cell(args, spec: str, method: str, seed: int, fraction: float | None = None) -> dict:
    """One (protocol, method, seed) cell; ``fraction``: on the protocol rebuilt with that mixed share."""
    torch.set_num_threads(args.threads)
    protocol, size = parse_protocol(spec, args.size)
    args = argparse.Namespace(**{**vars(args), "size": size})
    work = Path(args.work)
    tag = f"{protocol}-{args.size}" + ("" if fraction is None else f"-f{fraction:g}")
    out = work / "results" / f"{tag}-{args.steps}" / method / f"seed-{seed}.json"
    root = protocol_dir(work, protocol, args.size, fraction)
    if out.is_file():
        cached = json.loads(out.read_text())
        run_dir = work / "runs" / f"{tag}-{args.steps}" / method / f"seed-{seed}"
        is_a2b = method in A2B_METHODS or method in args.variants
        # an autoencoder cell from before it chose its kind on validation, or before the healthy_z kind
        stale_ae = method == "ae" and ("score" not in cached or (a2b_config_preset(args).eval.normalize_images
                                                                 and "healthy_z" not in cached.get("scores", {})))
        if is_a2b and args.rescore and run_dir.is_dir():
            res = {**cached, **score_a2b(args, method, root, run_dir, seed, cached.get("best_val_auc"), rescore=True)}
            write_atomic(out, json.dumps(res, indent=1))
            print(f"{tag:>20} {method:>14} seed {seed}: image AUROC {res['auroc']:.3f} (rescored: {res['score']})",
                  flush=True)
            return {**res, "fraction": mixed_fraction(root)}
        if not stale_ae and not (args.fuse_pu and "fused_pu_sel" not in cached.get("scores", {})
                                 and (method == "ae" or is_a2b)):
            return {**cached, "fraction": mixed_fraction(root)}
        if is_a2b:        # the fusion added to a finished cell from its kept run folder
            from a2b_dist import checkpoint as ckpt

            torch.set_num_threads(args.threads)
            G, loaded = ckpt.load_generator(chosen_checkpoint(run_dir))
            data_root = healthy_as_mixed(root, work) if healthy_only(method) else root
            cfg = a2b_config(args, {**A2B_METHODS, **args.variants}[method], data_root, run_dir, seed)
            cfg.eval.score = loaded.eval.score
            cached.setdefault("scores", {}).update(
                a2b_fused(args, G, cfg, data_root, seed, load_role(root / "test", args.size)))
            write_atomic(out, json.dumps(cached, indent=1))
            return {**cached, "fraction": mixed_fraction(root)}
    if args.cached:        # report only: a cell not finished (with the current code) is left out, nothing trained
        print(f"{tag:>20} {method:>14} seed {seed}: not run yet (--cached)", flush=True)
        return None
    t0 = time.time()
    budget = args.steps * 2 * 2 * args.batch          # n_critic 2 x roles 2 x batch per A2B step
    if method in A2B_METHODS or method in args.variants:
        run_dir = work / "runs" / f"{tag}-{args.steps}" / method / f"seed-{seed}"
        if run_dir.exists():   # a cell interrupted earlier: start it again
            shutil.rmtree(run_dir)
        res = run_a2b(args, method, root, run_dir, seed)
    elif method == "references":
        from a2b_dist.data import EvalReader
        from a2b_dist.references import greyness, healthy_distance, healthy_mean_image

        test = load_role(root / "test", args.size)
        mean = healthy_mean_image(root / "healthy", EvalReader(batch_size=64, image_size=args.size))
        res = {"scores": {"greyness": image_and_pixel(test["label"], greyness(test["image"]).numpy())["auroc"],
                          "healthy distance": image_and_pixel(
                              test["label"], healthy_distance(test["image"], mean).numpy())["auroc"]}}
        res["auroc"], res["pixel_auroc"] = max(res["scores"].values()), None
    else:
        res = run_peer(args, method, root, seed, budget)
    res.update(seconds=round(time.time() - t0, 1), protocol=spec, method=method, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(res, indent=1))
    res["fraction"] = mixed_fraction(root)        # read from the data, never stored with the cell
    print(f"{tag:>20} {method:>14} seed {seed}: image AUROC {res['auroc']:.3f} ({res['seconds']:.0f} s)",
          flush=True)
    return res


def mean_sd(values) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def table(results: list[dict], protocols, methods, args) -> str:
    by = {}
    for r in results:
        by.setdefault((r["protocol"], r["method"]), []).append(r)
    lines = [f"A2B-GAN {args.steps} steps x batch {args.batch}, {args.size} px (a protocol named NAME@SIZE: SIZE px), image budget "
             f"{args.steps * 4 * args.batch} per method, seeds {' '.join(map(str, args.seeds))}; "
             "test AUROC mean ± sd over seeds (val: best validation AUROC, the only figure used to choose)", "",
             "| protocol | method | image AUROC | pixel AUROC | val AUROC | other scores (image AUROC) | mask: mean M on healthy test images, in/out, pixel AUROC |",
             "|---|---|---|---|---|---|---|"]
    for p in protocols:
        for m in methods:
            rs = by.get((p, m), [])
            if not rs:
                continue
            kinds = sorted({k for r in rs for k in r.get("scores", {})})
            other = ", ".join(f"{k} {mean_sd([r['scores'].get(k) for r in rs])}" for k in kinds)
            masks = "-"
            if rs[0].get("mask"):
                masks = " / ".join(mean_sd([(r["mask"] or {}).get(k) for r in rs]) for k in
                                   ("mask_mean_healthy", "mask_inside_outside_ratio", "mask_pixel_auroc"))
            lines.append(f"| {p} | {m} | {mean_sd([r['auroc'] for r in rs])} | "
                         f"{mean_sd([r.get('pixel_auroc') for r in rs])} | {mean_sd([r.get('best_val_auc') for r in rs])} "
                         f"| {other} | {masks} |")
    return "\n".join(lines) + "\n"


def panels(n: int, height: float):
    """(pyplot, figure, axes) of n panels side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4 * n, height), squeeze=False)
    return plt, fig, axes[0]


def finish(plt, fig, axes, ylabel: str, path: Path) -> None:
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: list[dict], path: Path) -> None:
    curves = [r for r in results if r.get("val_curve")]
    protocols = sorted({r["protocol"] for r in curves})
    if not protocols:
        return
    plt, fig, axes = panels(len(protocols), 3.2)
    colours = {}
    for ax, p in zip(axes, protocols):
        for r in (r for r in curves if r["protocol"] == p):
            c = colours.setdefault(r["method"], f"C{len(colours)}")
            steps, vals = zip(*r["val_curve"])
            ax.plot(steps, vals, color=c, alpha=0.8, label=r["method"] if r["seed"] == min(
                x["seed"] for x in curves if x["method"] == r["method"] and x["protocol"] == p) else None)
        ax.set_title(p)
        ax.set_xlabel("step")
        ax.set_ylim(0.3, 1.0)
        ax.grid(alpha=0.3)
    finish(plt, fig, axes, "validation AUROC", path)


def thesis_points(results: list[dict], protocol: str, method: str) -> dict[float, list[float]]:
    """{mixed share: [test AUROC per seed]} of one method on one protocol."""
    out: dict[float, list[float]] = {}
    for r in results:
        if r["protocol"] == protocol and r["method"] == method:
            out.setdefault(round(r["fraction"], 2), []).append(r["auroc"])
    return dict(sorted(out.items()))


def thesis_table(results: list[dict], protocols, methods) -> str:
    """Test image AUROC (mean ± sd over seeds) against the mixed set's anomalous share."""
    fractions = sorted({round(r["fraction"], 2) for r in results})
    lines = ["The thesis curve: test image AUROC against the mixed set's anomalous share (same size; "
             "methods that do not read the mixed set were trained once)", "",
             "| protocol | method | " + " | ".join(f"share {f:g}" for f in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    for p in protocols:
        for m in methods:
            pts = thesis_points(results, p, m)
            if not pts:
                continue
            if len(pts) == 1 and len(fractions) > 1:     # trained once: one figure, flat across shares
                cells = [mean_sd(next(iter(pts.values()))) + " (does not read the mixed set)"] + [""] * (len(fractions) - 1)
            else:
                cells = [mean_sd(pts.get(f, [])) for f in fractions]
            lines.append(f"| {p} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_thesis(results: list[dict], protocols, methods, path: Path) -> None:
    """One panel per protocol: test image AUROC (mean, bars one sd) against the mixed share; a method
    that does not read the mixed set is a dashed flat line at its own result."""
    fractions = sorted({round(r["fraction"], 2) for r in results})
    plt, fig, axes = panels(len(protocols), 3.4)
    for ax, p in zip(axes, protocols):
        for i, m in enumerate(methods):
            pts = thesis_points(results, p, m)
            if not pts:
                continue
            if len(pts) == 1 and len(fractions) > 1:
                v = next(iter(pts.values()))
                ax.axhline(float(np.mean(v)), color=f"C{i}", ls="--", lw=1.2, label=f"{m} (no mixed set)")
                continue
            xs = list(pts)
            ax.errorbar(xs, [np.mean(v) for v in pts.values()], yerr=[np.std(v) for v in pts.values()],
                        color=f"C{i}", marker="o", capsize=3, label=m)
        ax.set_title(p)
        ax.set_xlabel("anomalous share of the mixed set")
        ax.grid(alpha=0.3)
    finish(plt, fig, axes, "test image AUROC", path)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name or "=" not in rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=section.field=value[,...]")
    return name, rest.split(",")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocols", nargs="+", default=["mnist-square", "mnist-intensity", "mnist-noise", "phantom-lesion"],
                   help=f"SOURCE-KIND[@SIZE], built with shards/build.py simulated (e.g. {', '.join(PROTOCOLS)}, "
                        "phantom-lesion@64)")
    p.add_argument("--data", type=Path, default=None,
                   help="an existing shards root (healthy/ mixed/ val/ test/) instead of --protocols")
    p.add_argument("--override", nargs="*", default=[],
                   help="section.field=value applied to every A2B-GAN method (e.g. smaller networks)")
    p.add_argument("--methods", nargs="+", default=[*A2B_METHODS, *OTHER_METHODS])
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   help="NAME=section.field=value[,...]: an extra A2B-GAN method (the preset plus overrides)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="*", default=[],
                   help="the thesis curve: rebuild each protocol's mixed set at these anomalous shares (same "
                        "size; e.g. 0 0.1 0.3 0.6), retrain every method that reads it at each, and plot test "
                        "AUROC against the share (thesis-*.png; methods that ignore the mixed set are flat)")
    p.add_argument("--size", type=int, default=32, help="image size of protocols named without @SIZE")
    p.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"), help="the A2B-GAN preset")
    p.add_argument("--steps", type=int, default=None,
                   help="A2B-GAN steps; sets every method's image budget (default: the preset's train.steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fuse-pu", action="store_true",
                   help="also report each A2B-GAN method's and the autoencoder's score fused with the pu "
                        "peer's (both standardised on healthy validation images, summed): fused_pu (test) and "
                        "fused_pu_val; fused_pu_sel: the pu score's weight chosen on validation "
                        "(fused_pu_w); finished cells get them added from their kept run folders")
    p.add_argument("--rescore", action="store_true",
                   help="score finished A2B-GAN cells again from their kept run folders with the current score "
                        "kinds (eval.score=auto chosen again on validation at the same checkpoint; nothing retrained)")
    p.add_argument("--cached", action="store_true",
                   help="train nothing: the table (and the thesis curve) from the cells already finished in "
                        "--work, listing the ones that are not (e.g. to read a long run's table part way through)")
    p.add_argument("--data-scale", type=float, default=1.0,
                   help="build the protocols with every role shrunk by this factor (quick checks; give such "
                        "a run a --work of its own, since folders are named by protocol and size only)")
    p.add_argument("--work", default="runs/quality", help="shards, runs and results (reused on a rerun)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: 1 when --jobs > 1)")
    p.add_argument("--ae-width", type=int, default=16)
    p.add_argument("--ae-lr", type=float, default=1e-3)
    p.add_argument("--ddad-k", type=int, default=3, help="autoencoders per DDAD ensemble")
    p.add_argument("--pca-components", type=int, default=32)
    args = p.parse_args(argv)
    if args.steps is None:
        from a2b_dist.config import load_config
        args.steps = load_config(args.config).train.steps
    args.variants = dict(args.variant)
    known = {*A2B_METHODS, *OTHER_METHODS, *args.variants}
    bad = [m for m in args.methods if m not in known]
    if bad:
        p.error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(sorted(known))}")
    if args.threads is None:
        args.threads = 1 if args.jobs > 1 else torch.get_num_threads()
    work = Path(args.work)
    if args.data is not None:
        args.protocols = [use_existing(work, args.data, args.size)]
        if args.fractions:
            p.error("--fractions rebuilds a simulated protocol's mixed set; it does not apply to --data")
    specs = [parse_protocol(spec, args.size) for spec in args.protocols]
    if args.cached:
        if args.rescore or args.fuse_pu:
            p.error("--cached reads finished cells only; --rescore and --fuse-pu compute on them: run those without --cached")
        unbuilt = [spec for spec, (protocol, size) in zip(args.protocols, specs)
                   if not (protocol_dir(work, protocol, size) / "mixed" / "manifest.json").is_file()]
        if unbuilt:
            p.error(f"--cached: {', '.join(unbuilt)} not built in {work}; run without --cached first")
    for (protocol, size) in ([] if args.cached else specs):
        root = ensure_shards(work, protocol, size, scale=args.data_scale)
        for f in args.fractions:
            if abs(f - mixed_fraction(root)) > 0.005:      # the protocol's own share is its own build
                ensure_shards(work, protocol, size, f, scale=args.data_scale)
    cells = [(pr, m, s, None) for s in args.seeds for pr in args.protocols for m in args.methods]
    for s_ in args.seeds:
        for spec, (protocol, size) in zip(args.protocols, specs):
            own = mixed_fraction(protocol_dir(work, protocol, size))
            cells += [(spec, m, s_, f) for f in args.fractions if abs(f - own) > 0.005
                      for m in args.methods if reads_mixed(m)]
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(run_cell, *zip(*[(args, *c) for c in cells])))
    else:
        results = [run_cell(args, *c) for c in cells]
    cells = [c for r, c in zip(results, cells) if r is not None]
    results = [r for r in results if r is not None]
    own = [r for r, c in zip(results, cells) if c[3] is None]
    text = table(own, args.protocols, args.methods, args)
    sizes = "-".join(sorted({str(size) for _, size in specs}))
    tag = f"{sizes}-{args.steps}"
    write_atomic(work / f"results-{tag}.json", json.dumps(results, indent=1))
    written = [f"results-{tag}.json", f"table-{tag}.md", f"val_auc-{tag}.png"]
    if args.fractions:
        text += "\n" + thesis_table(results, args.protocols, args.methods)
        plot_thesis(results, args.protocols, args.methods, work / f"thesis-{tag}.png")
        written.append(f"thesis-{tag}.png")
    write_atomic(work / f"table-{tag}.md", text)
    plot_curves(own, work / f"val_auc-{tag}.png")
    print("\n" + text)
    print(f"written in {work}: {', '.join(written)}")
    return results


if __name__ == "__main__":
    main()
