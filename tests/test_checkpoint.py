"""Checkpoint format units: nested state round trip, sharing between ranks, discovery and pruning."""
import json

import pytest
import torch

from a2b_dist import checkpoint as ckpt
from a2b_dist.config import Config, to_dict
from a2b_dist.errors import UserError


def _optimizer_state():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return net, opt


def test_flatten_round_trip_keeps_int_keys_and_scalars():
    net, opt = _optimizer_state()
    state = {"G": net.state_dict(), "opt": opt.state_dict(), "scaler": {"scale": 65536.0, "growth": 2000}}
    skeleton, tensors = ckpt.flatten_state(state)
    json.dumps(skeleton)                          # the skeleton is plain JSON
    back = ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert set(back["opt"]["state"]) == {0, 1}    # optimizer state keyed by int survives JSON
    assert back["opt"]["param_groups"][0]["betas"] == [0.5, 0.999]
    assert torch.equal(back["G"]["weight"], net.weight)
    opt2 = torch.optim.Adam(net.parameters())
    opt2.load_state_dict(back["opt"])             # and loads into a fresh optimizer
    assert opt2.param_groups[0]["lr"] == 1e-3


def test_share_splits_every_key_once_and_balances():
    tensors = {f"t{i}": torch.zeros(100 * (i + 1)) for i in range(7)}
    for world in (1, 2, 3, 8):
        groups = ckpt._share(list(tensors), tensors, world)
        flat = [k for g in groups for k in g]
        assert sorted(flat) == sorted(tensors) and len(groups) == world


def _save(tmp_path, step, run="run"):
    net, opt = _optimizer_state()
    target = ckpt.step_dir(tmp_path / run, step)
    ckpt.save_checkpoint(target, global_state={"G": net.state_dict(), "opt_g": opt.state_dict()},
                         rank_state={"step": step}, rank_tensors={"rng": torch.arange(3)},
                         meta=ckpt.meta_for(Config(), step), rank=0, world_size=1, barrier=lambda: None)
    return target, net


def test_save_load_and_latest(tmp_path):
    target, net = _save(tmp_path, 10)
    assert ckpt.is_complete(target)
    state, meta, rank_json, rank_tensors = ckpt.load_checkpoint(target, 0)
    assert meta["step"] == 10 and rank_json == {"step": 10}
    assert torch.equal(state["G"]["weight"], net.weight) and torch.equal(rank_tensors["rng"], torch.arange(3))
    only_g, _, _, _ = ckpt.load_checkpoint(target, 0, prefixes=("/G/",))
    assert set(only_g) == {"G"}
    _save(tmp_path, 20)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-000000020"
    assert ckpt.resolve_checkpoint(tmp_path / "run") == ckpt.step_dir(tmp_path / "run", 20)
    # A rank the writing world did not have gets no rank state (another world size).
    assert ckpt.load_checkpoint(target, 3)[2] is None


def test_incomplete_folders_are_ignored_and_pruned(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    run = tmp_path / "run"
    broken = ckpt.step_dir(run, 4)
    broken.mkdir()                               # no meta.json: not complete
    (run / "checkpoints" / ".tmp-step-000000002").mkdir()   # leftover of a crash
    assert ckpt.latest_checkpoint(run).name == "step-000000003"
    ckpt.prune(run, keep_last=2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000000002", "step-000000003", "step-000000004"]


def test_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no loadable checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")
    bogus = tmp_path / "bogus.pt"
    torch.save({"format": "something-else"}, bogus)
    with pytest.raises(UserError, match="not an a2b export"):
        ckpt.load_generator(bogus)


def test_export_round_trip(tmp_path):
    from a2b_dist.nets import build_generator

    cfg = Config()
    cfg.model.width, cfg.model.res_blocks, cfg.data.image_size = 4, 1, 32
    gen = build_generator(cfg.model, cfg.data.channels)
    target = ckpt.step_dir(tmp_path / "run", 5)
    ckpt.save_checkpoint(target, global_state={"G": gen.state_dict()}, rank_state={}, rank_tensors={},
                         meta={"step": 5, "config": to_dict(cfg)}, rank=0, world_size=1, barrier=lambda: None)
    out = ckpt.export_generator(tmp_path / "run", tmp_path / "g.pt")
    blob = torch.load(out, weights_only=True)
    assert blob["step"] == 5 and blob["config"]["model"]["width"] == 4
    loaded, cfg2 = ckpt.load_generator(out)
    assert cfg2 == cfg and not loaded.training
    x = torch.rand(1, 1, 32, 32)
    gen.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], gen(x)[0])
