#!/usr/bin/env python
"""Detection quality: A2B-GAN against normal-only baselines, same data, same image budget.

    python benchmarks/quality.py                                  # 32 px simulated MNIST, seed 0
    python benchmarks/quality.py --steps 1500 --seeds 0 1 2       # the demo's schedule, three seeds
    python benchmarks/quality.py --data data/xray --size 256 --config configs/covid.yaml --steps 20000

Methods, each scored on the test role by the mean of its difference map (image AUROC) and by the
map's pixels where ground-truth masks exist (pixel AUROC):
- A2B-GAN: a2b_dist.train.train on the healthy and the mixed, unannotated set (the paper's setting),
  scored as `a2b evaluate` scores (|x - B'|); the weights of the last step, no model selection.
- conv AE: a small convolutional autoencoder trained on the healthy set only, scored by |x - AE(x)|.
- PCA: scikit-learn PCA fitted on healthy images only, scored by |x - reconstruction|.
- greyness and healthy distance: training-free references (a2b_dist.evaluate).
Image budget: A2B draws n_critic x 2 roles x batch images per step; the autoencoder trains on as
many healthy images; PCA is fitted on up to that many distinct healthy images (one pass).
If --data holds no shards, they are built with shards/build.py simulated --source mnist5k.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from a2b_dist.evaluate import healthy_mean_image, image_metrics, pixel_auroc  # noqa: E402


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


def ensure_shards(root: Path, size: int) -> None:
    if all((root / role / "manifest.json").is_file() for role in ("healthy", "mixed", "test")):
        return
    cmd = [sys.executable, str(ROOT / "shards" / "build.py"), "simulated", "--source", "mnist5k",
           "--size", str(size), "--seed", "0", "--out", str(root)]
    print("building shards:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def test_maps(root: Path, size: int, reconstruct) -> dict:
    """Score the test role with a reconstruction function: labels, image scores, maps, masks."""
    from a2b_dist.data import eval_batches

    out = {"label": [], "score": [], "map": [], "gt": [], "has_mask": []}
    with torch.no_grad():
        for batch in eval_batches(root / "test", batch_size=64, image_size=size):
            x = batch["image"]
            diff = (x - reconstruct(x)).abs().mean(dim=1, keepdim=True)   # (B, 1, H, W)
            out["label"].append(batch["label"].numpy())
            out["score"].append(diff.flatten(1).mean(1).numpy())
            out["map"].append(diff.numpy())
            out["gt"].append(batch["mask"].numpy())
            out["has_mask"].append(batch["has_mask"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def metrics_of(scored: dict) -> tuple[float, float | None]:
    known = scored["has_mask"].astype(bool)
    pix = pixel_auroc(scored["map"][known], scored["gt"][known]) if known.any() else None
    return image_metrics(scored["label"], scored["score"])["auroc"], pix


def healthy_images(root: Path, size: int, limit: int) -> torch.Tensor:
    from a2b_dist.data import eval_batches

    xs, n = [], 0
    for batch in eval_batches(root / "healthy", batch_size=256, image_size=size):
        xs.append(batch["image"])
        n += len(xs[-1])
        if n >= limit:
            break
    return torch.cat(xs)[:limit]


def run_a2b(args, seed: int, run_dir: Path) -> dict:
    from a2b_dist import checkpoint as ckpt
    from a2b_dist.config import load_config
    from a2b_dist.evaluate import score_role, summarise_result
    from a2b_dist.train import train

    cfg = load_config(args.config, [
        f"data.root={args.data}", f"data.image_size={args.size}", f"train.run_dir={run_dir}",
        f"train.steps={args.steps}", f"train.seed={seed}", f"train.batch_size={args.batch}",
        f"optim.decay_steps={min(args.steps // 3, 500)}", f"train.checkpoint_every={args.steps}",
        "train.sample_every=0", "eval.every=0", "train.cpu=true", *args.override])
    train(cfg, resume="none", argv=["benchmarks/quality.py"])
    G, _ = ckpt.load_generator(ckpt.latest_checkpoint(run_dir))
    with torch.no_grad():
        result = score_role(G, Path(args.data) / "test", batch_size=64, topk_percent=cfg.eval.topk_percent,
                            image_size=args.size, healthy_mean=healthy_mean_image(Path(args.data) / "healthy"))
    summary = summarise_result(result, score="mean")
    return {"A2B-GAN": (summary["auroc"], summary["pixel_auroc"]),
            "greyness": (summary["references"]["greyness"]["auroc"], None),
            "healthy distance": (summary["references"]["healthy_distance"]["auroc"], None),
            "images": args.steps * cfg.optim.n_critic * 2 * args.batch}


def run_autoencoder(args, seed: int, budget: int) -> tuple[float, float | None]:
    from a2b_dist.data import TrainStream

    torch.manual_seed(seed)
    ae = ConvAutoencoder(1, args.ae_width)
    opt = torch.optim.Adam(ae.parameters(), lr=args.ae_lr)
    stream = iter(TrainStream(Path(args.data) / "healthy", batch_size=args.batch, image_size=args.size,
                              channels=1, seed=seed, num_workers=0))
    ae.train()
    for _ in range(budget // args.batch):
        x = next(stream)
        loss = (ae(x) - x).abs().mean()                                    # L1, as A2B's Eq. 6-7
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ae.eval()
    return metrics_of(test_maps(Path(args.data), args.size, ae))


def run_pca(args, seed: int, budget: int) -> tuple[float, float | None]:
    from sklearn.decomposition import PCA

    x = healthy_images(Path(args.data), args.size, budget)
    shape = x.shape[1:]
    pca = PCA(n_components=min(args.pca_components, len(x)), svd_solver="randomized", random_state=seed)
    pca.fit(x.flatten(1).numpy())

    def reconstruct(batch: torch.Tensor) -> torch.Tensor:
        z = pca.inverse_transform(pca.transform(batch.flatten(1).numpy()))
        return torch.from_numpy(z).float().reshape(-1, *shape)

    return metrics_of(test_maps(Path(args.data), args.size, reconstruct))


def fmt(v) -> str:
    return f"{v:.3f}" if v is not None else "-"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="shards root (default: built in a temporary folder)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="A2B-GAN preset")
    p.add_argument("--steps", type=int, default=300, help="A2B-GAN steps; sets every method's image budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ae-width", type=int, default=16)
    p.add_argument("--ae-lr", type=float, default=1e-3)
    p.add_argument("--pca-components", type=int, default=32)
    p.add_argument("--override", nargs="*", default=[], help="more A2B config overrides, section.field=value")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="a2b-quality-") as tmp:
        if args.data is None:
            args.data = str(Path(tmp) / "shards")
        ensure_shards(Path(args.data), args.size)
        rows: dict[str, list[tuple]] = {}
        for seed in args.seeds:
            a2b = run_a2b(args, seed, Path(tmp) / f"a2b-{seed}")
            budget = a2b.pop("images")
            a2b["conv AE (healthy only)"] = run_autoencoder(args, seed, budget)
            a2b["PCA (healthy only)"] = run_pca(args, seed, budget)
            for name, value in a2b.items():
                rows.setdefault(name, []).append(value)

    order = ["A2B-GAN", "conv AE (healthy only)", "PCA (healthy only)", "greyness", "healthy distance"]
    print(f"\nquality: {args.data if not args.data.startswith(tempfile.gettempdir()) else 'simulated mnist5k'}, "
          f"{args.size} px, A2B {args.steps} steps x batch {args.batch} = image budget {budget} per method, "
          f"seeds {' '.join(map(str, args.seeds))}; test role")
    print(f"{'method':<24} {'image AUROC':>12} {'pixel AUROC':>12}   per seed (image / pixel)")
    for name in order:
        vals = rows[name]
        img = [v[0] for v in vals]
        pix = [v[1] for v in vals if v[1] is not None]
        per = "  ".join(f"{fmt(i)}/{fmt(x)}" for i, x in vals)
        print(f"{name:<24} {fmt(float(np.mean(img))):>12} {fmt(float(np.mean(pix)) if pix else None):>12}   {per}")
    return rows


if __name__ == "__main__":
    main()
