"""Helpers for the evaluation, FID and detect tests: a config over conftest's sim_shards, a generator
export, and a stand-in for pytorch-fid's Inception weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from a2b_dist.config import Config, validate

def make_config(root: Path, run_dir: Path) -> Config:
    """32 px, 1 channel, a tiny generator (width 8, one residual block)."""
    cfg = Config()
    cfg.data.root, cfg.data.image_size, cfg.data.channels, cfg.data.num_workers = str(root), 32, 1, 0
    cfg.model.width, cfg.model.res_blocks = 8, 1
    cfg.eval.batch_size = 16
    cfg.train.run_dir = str(run_dir)
    return validate(cfg)


def export_generator(path: Path, cfg: Config, seed: int = 0, step: int = 7) -> Path:
    """A randomly initialised generator in the `a2b export` format."""
    import dataclasses

    import torch

    from a2b_dist.nets import build_generator

    torch.manual_seed(seed)
    gen = build_generator(cfg.model, cfg.data.channels)
    torch.save({"format": "a2b-generator-v1", "generator": gen.state_dict(),
                "config": dataclasses.asdict(cfg), "step": step}, path)
    return path


@pytest.fixture()
def eval_config(sim_shards, tmp_path) -> Config:
    """A config over conftest's sim_shards with a tiny generator and its own run folder."""
    return make_config(sim_shards, tmp_path / "run")


@pytest.fixture(scope="session")
def standin_fid_weights(tmp_path_factory) -> Path:
    """A file shaped like pytorch-fid's Inception weights (every key, random values): pytorch-fid's
    own FID Inception structure, built without its download, saved as a plain state dict."""
    from unittest import mock

    import torch
    import torchvision
    from pytorch_fid import inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        net = inception.fid_inception_v3()
        for m in net.modules():  # variance-preserving, so features (and distances) are of order 1
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid-weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path
