"""train.backend=deepspeed: real DeepSpeed engines in 2 CPU processes over gloo, against the DDP backend.

Losses of the first steps are compared with a DDP run on the same seed and data within
LOSS_RTOL / LOSS_ATOL (measured here: equal to the last bit, fp32, ZeRO 1).
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from a2b_dist import checkpoint as ckpt
from a2b_dist import ds_backend
from a2b_dist.compat import LoadThrough
from a2b_dist.config import ConfigError, load_config
from test_train import ENV, final_weights, launch, run, train_cmd

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
DS = "train.backend=deepspeed"


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=2", "train.zero_stage=2 is not allowed; choose 0 or 1"),
    ("train.mixed_precision=fp16", "train.mixed_precision=fp16 is not supported with train.backend=deepspeed"),
    ("train.compile=true", "train.compile=true is not supported with train.backend=deepspeed"),
])
def test_config_refuses_what_the_backend_does_not_do(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/test.yaml", [DS, override])
    assert load_config("configs/test.yaml", [DS]).train.zero_stage == 1


def test_missing_deepspeed_is_one_line(tmp_path):
    # A None entry in sys.modules makes `import deepspeed` raise ImportError, as when not installed.
    code = ("import sys; sys.modules['deepspeed'] = None; from a2b_dist.cli import main; "
            f"sys.exit(main(['train', '--config', 'configs/test.yaml', '{DS}', 'train.run_dir={tmp_path}']))")
    proc = run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'a2b_dist[deepspeed]'" in proc.stderr and f"deepspeed=={ds_backend.PINNED}" in proc.stderr
    assert "train.backend=ddp" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.safetensors"
    run([*launch(2), "tests/ds_grad_check.py", str(out), "configs/test.yaml"])
    g = load_file(str(out))
    for stage in (0, 1):
        assert g[f"z{stage}/world"].item() == 2
        keys = [k.split("/", 2)[2] for k in g if k.startswith(f"z{stage}/ref/")]
        assert any(k.startswith("D/") for k in keys) and any(k.startswith("G/") for k in keys)
        for key in keys:
            ref, ds = g[f"z{stage}/ref/{key}"], g[f"z{stage}/ds/{key}"]
            assert ref.abs().sum() > 0, f"{key} got no gradient"
            torch.testing.assert_close(ds, ref, rtol=1e-4, atol=1e-5, msg=f"ZeRO {stage} {key}")
        # The critic's weights accumulate gradients in its update, never in the generator's.
        assert g[f"z{stage}/accumulations_in_critic"].item() > 0
        assert g[f"z{stage}/accumulations_in_generator"].item() == 0


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss_d" in r]


def _weights_only_globals(path):
    """Names of the non-default globals a DeepSpeed file needs: only the allowlisted ones."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in ds_backend.checkpoint_types()}
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert found <= allowed, f"{path}: {found - allowed}"
    return found


def test_trains_checkpoints_resumes_exports_like_ddp(sim_shards, tmp_path):
    common = [f"data.root={sim_shards}", "train.log_every=1"]
    run(train_cmd(2, *common, f"train.run_dir={tmp_path / 'ddp'}"))
    # TORCH_EXTENSIONS_DIR: where a JIT-compiled DeepSpeed op would land; none may be built.
    run(train_cmd(2, *common, DS, f"train.run_dir={tmp_path / 'ds'}"),
        env={**ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")})
    assert not (tmp_path / "ops").exists(), "DeepSpeed compiled an op"

    # Same seed, same data: the DeepSpeed engines' losses are the DDP run's.
    ddp, ds = _losses(tmp_path / "ddp"), _losses(tmp_path / "ds")
    assert [r["step"] for r in ds] == list(range(1, 9))
    for x, y in zip(ddp, ds):
        for key in ("loss_d", "wasserstein", "gp", "loss_g", "adv_g", "rec", "idt", "focus"):
            assert y[key] == pytest.approx(x[key], rel=LOSS_RTOL, abs=LOSS_ATOL), (x["step"], key)

    # DeepSpeed's sharded format inside the usual step folders, found by --resume auto and pruned.
    step8 = ckpt.latest_checkpoint(tmp_path / "ds")
    meta = ckpt.read_meta(step8)
    assert meta["step"] == 8 and meta["world_size"] == 2 and meta["backend"] == "deepspeed"
    assert sorted(p.name for p in (tmp_path / "ds" / "checkpoints").iterdir()) == ["step-000000004", "step-000000008"]
    for net in ("G", "D"):
        assert (step8 / net / "mp_rank_00_model_states.pt").is_file()
        shards = sorted(p.name for p in (step8 / net).glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        assert shards == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
        assert _weights_only_globals(step8 / net / shards[0])     # ZeRO shards need the allowlist
        assert not _weights_only_globals(step8 / net / "mp_rank_00_model_states.pt")

    # Stop at step 3, resume with --resume auto (the default): the same weights as without the stop.
    split = tmp_path / "split"
    run(train_cmd(2, *common, DS, f"train.run_dir={split}", "--until-step", "3"))
    assert ckpt.read_meta(ckpt.latest_checkpoint(split))["step"] == 3
    out = run(train_cmd(2, *common, DS, f"train.run_dir={split}"))
    assert "resumed from" in out.stdout + out.stderr and "at step 3" in out.stdout + out.stderr
    full, resumed = final_weights(tmp_path / "ds"), final_weights(split)
    for net in ("G", "D"):
        for key in full[net]:
            assert torch.equal(resumed[net][key], full[net][key]), f"{net}.{key} differs after resume"
    after = [(r["loss_d"], r["loss_g"]) for r in _losses(split) if r["step"] > 3]
    assert after == [(r["loss_d"], r["loss_g"]) for r in _losses(tmp_path / "ds") if r["step"] > 3]

    # Export: the same single generator file as a DDP run's, and `a2b detect` reads it.
    exported = {}
    for name in ("ddp", "ds"):
        exported[name] = tmp_path / f"{name}.pt"
        run([sys.executable, "-m", "a2b_dist.cli", "export", str(tmp_path / name), str(exported[name])])
    blob, ddp_blob = (torch.load(exported[n], weights_only=True) for n in ("ds", "ddp"))
    assert blob["format"] == ckpt.EXPORT_FORMAT and blob["step"] == 8
    assert blob["generator"].keys() == ddp_blob["generator"].keys()
    for key, value in ddp_blob["generator"].items():
        torch.testing.assert_close(blob["generator"][key], value, rtol=LOSS_RTOL, atol=LOSS_ATOL)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / f"{i}.png")
    run([sys.executable, "-m", "a2b_dist.cli", "detect", "--checkpoint", str(exported["ds"]),
         "--images", str(images), "--out", str(tmp_path / "detect")])
    rows = (tmp_path / "detect" / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,score" and len(rows) == 4

    # Resuming with another backend or world size is a one-line error, not a traceback.
    for args, message in (([f"train.run_dir={split}"], "was written with train.backend=deepspeed"),
                          ([DS, f"train.run_dir={split}"], "written by 2 DeepSpeed processes")):
        proc = run(train_cmd(1, f"data.root={sim_shards}", *args), check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_one_process_bf16_zero0(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", DS, "train.zero_stage=0",
                  "train.mixed_precision=bf16", "train.steps=2", "optim.decay_steps=1", "train.checkpoint_every=2"))
    launch_info = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[0])
    assert launch_info["mixed_precision"] == "bf16" and launch_info["versions"]["deepspeed"] == ds_backend.PINNED
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir))
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["config"]["train"]["zero_stage"] == 0
    # ZeRO 0 keeps the whole Adam state beside the weights; no ZeRO shards. Weights stay fp32.
    step2 = ckpt.latest_checkpoint(run_dir)
    assert not list(step2.glob("*/zero_pp_rank_*"))
    states = ds_backend.load_weights_only(step2 / "G" / "mp_rank_00_model_states.pt")
    assert states["optimizer"]["state"] and all(t.dtype == torch.float32 for t in states["module"].values())
    assert all(torch.isfinite(torch.tensor(r["loss_d"])) for r in _losses(run_dir))


class _NotAllowed:
    """A class no checkpoint may carry: loading one must fail, not run its unpickling."""


def test_checkpoint_loader_refuses_other_globals(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler   # one of the allowlisted types

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"state": {"w": torch.ones(2)}, "scale": LossScaler(1.0)}, good)
    torch.save({"state": {"w": torch.ones(2)}, "payload": _NotAllowed()}, bad)
    loader = LoadThrough(inner=None, load=ds_backend.load_weights_only)   # what initialize() installs
    assert torch.equal(loader.load(str(good))["state"]["w"], torch.ones(2))
    with pytest.raises(Exception, match="Weights only load failed"):
        loader.load(str(bad))
