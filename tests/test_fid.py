"""FID: pytorch-fid's distance on Gaussians with a closed-form answer, the full path with a stand-in
weights file, the reference cache, and the message when the weights are missing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from a2b_dist import fid
from a2b_dist.data import EvalReader
from a2b_dist.errors import UserError


def test_frechet_distance_of_gaussians_closed_form():
    # Covariances sharing eigenvectors: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = np.array([1.0, 2.0, 0.5, 3.0, 4.0]), np.array([2.0, 1.0, 0.5, 1.0, 9.0])
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert d == pytest.approx(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-6)
    # Independent coordinates: per coordinate (m1 - m2)^2 + (s1 - s2)^2; identical Gaussians: 0.
    assert fid.frechet_distance(np.array([1.0, 0.0]), np.diag([4.0, 1.0]), np.array([3.0, 0.0]),
                                np.diag([1.0, 1.0])) == pytest.approx(4.0 + 1.0)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-8)


def test_statistics_of_samples_approach_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, size=(20000, 3))
    y = rng.normal(1.0, 2.0, size=(20000, 3))
    d = fid.frechet_distance(*fid.statistics(x), *fid.statistics(y))
    assert d == pytest.approx(3 * 1.0 + 3 * 1.0, rel=0.05)


def test_missing_weights_message_says_where(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    with pytest.raises(UserError) as err:
        fid.find_weights(None)
    msg = str(err.value)
    assert str(expected) in msg and fid.WEIGHTS_URL in msg and "eval.fid_weights=PATH" in msg
    with pytest.raises(UserError, match="nope.pth"):
        fid.find_weights(tmp_path / "nope.pth")
    # Checked before anything else is built or read (these folders do not exist).
    with pytest.raises(UserError, match="FID weights not found"):
        fid.translation_fid(nn.Identity(), tmp_path / "no-role", tmp_path / "no-healthy")


def test_weights_found_in_hub_cache(monkeypatch, tmp_path, standin_fid_weights):
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE).symlink_to(standin_fid_weights)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert fid.find_weights(None) == tmp_path / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    assert fid.find_weights(standin_fid_weights.parent) == standin_fid_weights   # a folder holding it


def test_wrong_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / fid.WEIGHTS_FILE
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="does not hold pytorch-fid"):
        fid.load_inception(bad, dims=64)


class Identity(nn.Module):
    """A 'generator' whose B' is its input (mask 0)."""

    def forward(self, x):
        return x, torch.zeros_like(x[:, :1])


def test_full_fid_path_with_standin_weights(sim_shards, standin_fid_weights, tmp_path):
    assert fid.inception_input(-torch.ones(2, 1, 8, 8)).shape == (2, 3, 8, 8)
    reader = EvalReader(batch_size=16, image_size=32, channels=1)
    common = dict(samples=8, dims=64, weights=standin_fid_weights, seed=3, cache_dir=tmp_path / "cache")
    # B' = x on the healthy role itself, same samples: distance 0; written to the cache on the way.
    same = fid.translation_fid(Identity(), sim_shards / "healthy", sim_shards / "healthy", reader, **common)
    assert same["samples"] == same["reference_samples"] == 8 and not same["reference_cached"]
    # The test role against healthy: positive; the reference statistics now come from the cache.
    other = fid.translation_fid(Identity(), sim_shards / "test", sim_shards / "healthy", reader, **common)
    assert other["fid"] > 0 and other["reference_cached"]
    assert abs(same["fid"]) < 1e-4 * other["fid"]
    assert other["reference_cache"] == same["reference_cache"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_reference_cache_key_changes_with_every_input(standin_fid_weights, tmp_path):
    manifest = {"role": "healthy", "samples": 80, "shards": [{"name": "a.tar", "sha256": "x"}]}
    key = fid.reference_cache_key(standin_fid_weights, 64, 24, 0, manifest)
    assert key == fid.reference_cache_key(standin_fid_weights, 64, 24, 0, dict(manifest))
    other_weights = tmp_path / fid.WEIGHTS_FILE
    data = bytearray(standin_fid_weights.read_bytes())
    data[-1] ^= 0xFF                                           # same size, one byte differs
    other_weights.write_bytes(bytes(data))
    changed = [fid.reference_cache_key(other_weights, 64, 24, 0, manifest),
               fid.reference_cache_key(standin_fid_weights, 192, 24, 0, manifest),
               fid.reference_cache_key(standin_fid_weights, 64, 25, 0, manifest),
               fid.reference_cache_key(standin_fid_weights, 64, 24, 1, manifest),
               fid.reference_cache_key(standin_fid_weights, 64, 24, 0, {**manifest, "samples": 81})]
    assert key not in changed and len(set(changed)) == len(changed)


def test_selection_metric_fid(eval_config, standin_fid_weights):
    from a2b_dist.metrics import HIGHER_IS_BETTER
    from a2b_dist.scoring import selection_metric
    from a2b_dist.nets import Generator

    eval_config.eval.metric, eval_config.eval.fid_weights = "fid", str(standin_fid_weights)
    eval_config.eval.fid_dims, eval_config.eval.fid_samples = 64, 8
    torch.manual_seed(0)
    gen = Generator(1, width=8, res_blocks=1).eval()
    state = torch.get_rng_state()
    out = selection_metric(gen, eval_config, device="cpu")
    assert set(out) == {"fid", "fid_samples"} and out["fid"] > 0 and out["fid_samples"] == 8.0
    assert not gen.training and torch.equal(state, torch.get_rng_state())
    assert HIGHER_IS_BETTER["fid"] is False


def test_ranks_shares_of_the_fid_samples_add_up(sim_shards, monkeypatch):
    """Each rank picks from its own part of the role; together they hold exactly the samples one
    process picks, so the gathered features and the FID do not depend on the number of ranks."""
    def transform(x):
        return x.flatten(1).mean(dim=1, keepdim=True).double().numpy()   # a cheap stand-in feature

    common = dict(transform=transform, keep=0.4, seed=5, device="cpu")
    reader = lambda rank, world: EvalReader(batch_size=16, image_size=32, channels=1, rank=rank, world_size=world)  # noqa: E731
    whole = fid._pick(sim_shards / "test", reader=reader(0, 1), **common)
    monkeypatch.setattr(fid, "gather_objects", lambda obj, world_size: [obj])   # this rank's share only
    shares = [fid._pick(sim_shards / "test", reader=reader(r, 2), **common) for r in (0, 1)]
    assert {k for _, k, _ in whole} == {k for _, k, _ in shares[0]} | {k for _, k, _ in shares[1]}
    assert not {k for _, k, _ in shares[0]} & {k for _, k, _ in shares[1]}
    assert all(p < 0.4 for p, _, _ in whole) and 0 < len(whole) < 80
