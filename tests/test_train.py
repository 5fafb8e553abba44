"""End-to-end trainer tests: real processes, real tar shards, real DDP over gloo on CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from a2b_dist import checkpoint as ckpt
from a2b_dist.losses import linear_decay_lr

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd, env=None, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env or ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int) -> list[str]:
    """`accelerate launch` for nproc CPU processes over gloo (--cpu would silently start one)."""
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--main_process_port", str(free_port()), "--dynamo_backend", "no"]


def train_cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "a2b_dist.cli", "train", "--config", "configs/test.yaml", *args]
    return [*launch(nproc), "-m", "a2b_dist.train", "--config", "configs/test.yaml", *args]


def final_weights(run_dir: Path) -> dict:
    path = ckpt.latest_checkpoint(run_dir)
    state, meta, _, _ = ckpt.load_checkpoint(path, 0)
    return {"step": meta["step"], **{net: state[net] for net in ("G", "D", "G_ema") if net in state}}


def assert_same_weights(x: dict, y: dict):
    assert x["step"] == y["step"]
    assert x.keys() == y.keys()
    for net in ("G", "D", "G_ema"):
        for key in x.get(net, {}):
            assert torch.equal(x[net][key], y[net][key]), f"{net}.{key} differs"


def test_single_process_run_folder(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "eval.every=4"))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-000000004", "step-000000008"]
    assert all(ckpt.is_complete(run_dir / "checkpoints" / n) for n in names)
    for name in ("config.yaml", "launches.jsonl", "samples/step-000000004.png", "samples/step-000000008.png"):
        assert (run_dir / name).is_file(), name
    launch = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[0])
    assert launch["versions"]["torch"] == torch.__version__ and "train" in " ".join(launch["argv"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "loss_d" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    # Model selection every 4 steps: val AUC appended, the best kept in best/ beside the last K.
    evals = [r for r in lines if "eval/val_auc" in r]
    assert [r["step"] for r in evals] == [4, 8]
    best = max(evals, key=lambda r: (r["eval/val_auc"], -r["step"]))
    assert evals[-1]["best"]["step"] == best["step"]
    assert ckpt.is_complete(run_dir / "best") and ckpt.read_meta(run_dir / "best")["step"] == best["step"]
    for r in records:
        for key in ("loss_d", "gp", "loss_g", "rec", "idt", "focus", "images_per_s", "data_wait_share"):
            assert key in r
        # The rate applied in update number `step` (1-based): linear decay over the last 4 of 8.
        assert r["lr_g"] == pytest.approx(linear_decay_lr(1e-4, r["step"] - 1, 8, 4))
    assert records[-1]["lr_g"] == pytest.approx(0.25e-4)


def test_append_jsonl_writes_one_line_per_call(tmp_path):
    """The one appender of jobs.jsonl, launches.jsonl, metrics.jsonl and sweep-reports.jsonl: each
    call adds one line in json.dumps' default format after what is there, readable at once."""
    from a2b_dist.files import append_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n')
    append_jsonl(path, {"step": 1, "loss_d": 0.5, "best": {"metric": "val_auc"}, "host": "n\u00e9"})
    assert path.read_text() == '{"step": 0}\n{"step": 1, "loss_d": 0.5, "best": {"metric": "val_auc"}, "host": "n\\u00e9"}\n'
    append_jsonl(path, {"step": 2})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_selection_starts_at_select_from(sim_shards, tmp_path):
    """Evaluations before eval.select_from are logged but never become best/ (e.g. during a focus warm-up)."""
    run_dir = tmp_path / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "eval.every=2", "eval.select_from=6"))
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/val_auc" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    assert evals[0]["best"] is None and evals[1]["best"] is None
    best = max(evals[2:], key=lambda r: (r["eval/val_auc"], -r["step"]))
    assert evals[-1]["best"]["step"] == best["step"]
    assert ckpt.read_meta(run_dir / "best")["step"] == best["step"]


def test_ddp_two_processes_bf16(sim_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    out = run(train_cmd(2, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "train.mixed_precision=bf16",
                        "data.verify=sha256"))
    # sha256 on 2 processes: rank 0 read every shard, and says so once per role.
    assert (out.stdout + out.stderr).count("checked (sha256)") == 2
    launch = json.loads((run_dir / "launches.jsonl").read_text().splitlines()[0])
    assert launch["world_size"] == 2 and launch["mixed_precision"] == "bf16"
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir))
    assert meta["step"] == 8 and meta["world_size"] == 2
    # Each rank wrote its own share of the global state.
    assert (ckpt.latest_checkpoint(run_dir) / "state-00001-of-00002.safetensors").is_file()


def test_ddp_gradients_equal_single_process(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run([sys.executable, "tests/ddp_grad_check.py", str(one), "configs/test.yaml"])
    run([*launch(2), "tests/ddp_grad_check.py", str(two), "configs/test.yaml"])
    g1, g2 = load_file(str(one)), load_file(str(two))
    assert g1["world"].item() == 1 and g2["world"].item() == 2
    keys = [k for k in g1 if k.startswith(("D/", "G/"))]
    assert any(k.startswith("D/") for k in keys) and any(k.startswith("G/") for k in keys)
    for key in keys:
        assert g1[key].abs().sum() > 0, f"{key} got no gradient"
        torch.testing.assert_close(g2[key], g1[key], rtol=1e-4, atol=1e-5, msg=key)
    assert g1["critic_untouched"].item() and g2["critic_untouched"].item()


def test_resume_is_exact(sim_shards, tmp_path):
    common = [f"data.root={sim_shards}", "train.checkpoint_every=2", "data.num_workers=1"]
    run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'full'}"))
    run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'split'}", "--until-step", "3"))
    assert ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "split"))["step"] == 3
    out = run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'split'}"))
    assert "at step 3" in out.stdout + out.stderr
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "split"))


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_across_world_sizes(sim_shards, tmp_path, first, second):
    args = [f"data.root={sim_shards}", f"train.run_dir={tmp_path / 'run'}"]
    run(train_cmd(first, *args, "--until-step", "4"))
    out = run(train_cmd(second, *args))
    assert f"written by {first} processes, now {second}" in out.stdout + out.stderr
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 8 and meta["world_size"] == second


def test_kill_during_checkpoint_keeps_previous(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={sim_shards}", f"train.run_dir={run_dir}"]
    # Fault injection: the process SIGKILLs itself after writing part of the step-8 checkpoint.
    proc = run(train_cmd(1, *args), env={**ENV, "A2B_FAULT_KILL_IN_CHECKPOINT": "8"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / ".tmp-step-000000008").is_dir()
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["step"] == 4
    out = run(train_cmd(1, *args))
    assert "at step 4" in out.stdout + out.stderr
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["step"] == 8
    assert not (run_dir / "checkpoints" / ".tmp-step-000000008").exists()


def test_non_finite_loss_stops_without_saving(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}",
                         "loss.lambda_gp=1e39"), check=False)   # fp32 overflow: the critic loss is inf
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step 1: non-finite loss (loss_d" in proc.stderr and "Traceback" not in proc.stderr
    assert ckpt.latest_checkpoint(run_dir) is None


def test_missing_shards_message(tmp_path):
    proc = run(train_cmd(1, f"data.root={tmp_path / 'none'}", f"train.run_dir={tmp_path / 'run'}"), check=False)
    assert proc.returncode == 2
    assert "python shards/build.py simulated" in proc.stderr and "Traceback" not in proc.stderr


def test_score_auto_picks_the_best_validated_kind_and_every_scorer_uses_it(sim_shards, tmp_path):
    """eval.score=auto: checkpoints are selected by the mean score's validation AUROC, as with
    eval.score=mean; at the selected one the kind with the highest validation AUROC is recorded
    (best["score"]) and is what load_generator, a2b export (.pt) and a2b evaluate score with; an
    explicit eval.score=auto on a scoring command is refused in one line."""
    from a2b_dist.losses import SCORE_KINDS

    run_dir = tmp_path / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "eval.every=2", "eval.select_from=2",
                  "eval.score=auto", "eval.normalize_images=8"))
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/val_auc" in r]
    assert all(r["eval/val_auc"] == r["eval/val_auc_mean"] for r in evals)      # selection by the mean score
    best = evals[-1]["best"]
    at = next(r for r in evals if r["step"] == best["step"])
    aucs = {k: at[f"eval/val_auc_{k}"] for k in SCORE_KINDS}
    assert best["score"] in SCORE_KINDS and aucs[best["score"]] == max(aucs.values())
    assert ckpt.read_meta(run_dir / "best")["selection"]["score"] == best["score"]
    _, cfg = ckpt.load_generator(run_dir / "best")
    assert cfg.eval.score == best["score"]
    out = tmp_path / "g.pt"
    run([sys.executable, "-m", "a2b_dist.cli", "export", str(run_dir / "best"), str(out)])
    blob = torch.load(out, weights_only=True)
    assert blob["config"]["eval"]["score"] == best["score"]
    blob["config"]["eval"]["score"] = "auto"              # an export that records no choice scores by the mean
    torch.save(blob, tmp_path / "raw.pt")
    assert ckpt.load_generator(tmp_path / "raw.pt")[1].eval.score == "mean"
    ev = tmp_path / "eval"
    run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(out), "--shards",
         str(sim_shards / "test"), "--out", str(ev)])
    assert json.loads((ev / "metrics.json").read_text())["score"] == best["score"]
    refused = run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(out), "--shards",
                   str(sim_shards / "test"), "--out", str(tmp_path / "e2"), "eval.score=auto"], check=False)
    assert refused.returncode == 2 and "eval.score=auto is chosen on validation" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "e2").exists()
    fid = run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={tmp_path / 'r2'}", "eval.score=auto",
                        "eval.metric=fid"), check=False)
    assert fid.returncode == 2 and "eval.score=auto chooses the score kind on validation AUROC" in fid.stderr


def test_healthy_map_statistics_travel_with_the_checkpoint_and_change_no_training(sim_shards, tmp_path):
    """eval.normalize_images: at every evaluation the maps of the first healthy images give per-pixel
    statistics, the healthy_z kinds are validated with them, and best/ keeps them; load_generator,
    the .pt export and a2b evaluate use them. Training itself (weights, selection) is what it is
    without them. A kind that needs them on a file without them is a one-line error."""
    with_norm, without = tmp_path / "with", tmp_path / "without"
    common = [f"data.root={sim_shards}", "eval.every=2", "eval.select_from=2"]
    run(train_cmd(1, *common, f"train.run_dir={with_norm}", "eval.normalize_images=8"))
    run(train_cmd(1, *common, f"train.run_dir={without}"))
    assert_same_weights(final_weights(with_norm), final_weights(without))
    evals = [r for r in map(json.loads, (with_norm / "metrics.jsonl").read_text().splitlines()) if "eval/val_auc" in r]
    assert all(f"eval/val_auc_{k}" in r for r in evals for k in ("healthy_z", "healthy_z_mask", "healthy_z_int"))
    assert ckpt.read_meta(with_norm / "best")["selection"] == ckpt.read_meta(without / "best")["selection"]
    _, _, _, tensors = ckpt.load_checkpoint(with_norm / "best", 0)
    gen, cfg = ckpt.load_generator(with_norm / "best")
    size = cfg.data.image_size
    assert tensors[ckpt.MAP_NORM].shape == (3, 2, size, size) and torch.equal(gen.map_norm, tensors[ckpt.MAP_NORM])
    assert (gen.map_norm[:, 1] >= 0).all() and gen.map_norm[0, 0].mean() > 0
    assert ckpt.load_generator(without / "best")[0].map_norm is None
    out = tmp_path / "g.pt"
    run([sys.executable, "-m", "a2b_dist.cli", "export", str(with_norm / "best"), str(out)])
    assert torch.equal(torch.load(out, weights_only=True)[ckpt.MAP_NORM], gen.map_norm)
    ev = tmp_path / "eval"
    run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(out), "--shards",
         str(sim_shards / "test"), "--out", str(ev), "eval.score=healthy_z"])
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["score"] == "healthy_z" and {"healthy_z", "healthy_z_mask", "healthy_z_int"} <= metrics["scores"].keys()
    blob = torch.load(out, weights_only=True)
    del blob[ckpt.MAP_NORM]
    torch.save(blob, tmp_path / "bare.pt")
    refused = run([sys.executable, "-m", "a2b_dist.cli", "evaluate", "--checkpoint", str(tmp_path / "bare.pt"),
                   "--shards", str(sim_shards / "test"), "--out", str(tmp_path / "e2"), "eval.score=healthy_z_mask"],
                  check=False)
    assert refused.returncode == 2 and "holds no healthy map statistics" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "e2").exists()
    bad = run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'r3'}", "eval.score=healthy_z"), check=False)
    assert bad.returncode == 2 and "set eval.normalize_images" in bad.stderr and not (tmp_path / "r3").exists()


def test_export_loads_with_weights_only(sim_shards, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(1, f"data.root={sim_shards}", f"train.run_dir={run_dir}", "train.steps=2",
                  "optim.decay_steps=1", "train.checkpoint_every=2"))
    out = tmp_path / "g.pt"
    run([sys.executable, "-m", "a2b_dist.cli", "export", str(run_dir), str(out)])
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == ckpt.EXPORT_FORMAT and blob["step"] == 2
    g_export, cfg = ckpt.load_generator(out)
    g_run, _ = ckpt.load_generator(run_dir)
    x = torch.rand(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size) * 2 - 1
    with torch.no_grad():
        for t1, t2 in zip(g_export(x), g_run(x)):
            assert torch.equal(t1, t2)


def test_ema_and_flips_resume_exactly_and_are_what_export_holds(sim_shards, tmp_path):
    """The generator average, and the flip augmentation's random state, survive a resume bit for
    bit; evaluation and export read the average, not the last weights."""
    common = [f"data.root={sim_shards}", "train.checkpoint_every=2", "train.ema_decay=0.9", "data.hflip=true"]
    run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'full'}"))
    run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'split'}", "--until-step", "3"))
    run(train_cmd(1, *common, f"train.run_dir={tmp_path / 'split'}"))
    full = final_weights(tmp_path / "full")
    assert "G_ema" in full and int(full["G_ema"]["n_averaged"]) == full["step"]
    assert_same_weights(full, final_weights(tmp_path / "split"))
    g, _ = ckpt.load_generator(tmp_path / "full")
    averaged = {k[len("module."):]: v for k, v in full["G_ema"].items() if k.startswith("module.")}
    for key, value in g.state_dict().items():
        assert torch.equal(value, averaged[key]), key
    assert any(not torch.equal(averaged[k], full["G"][k]) for k in averaged)
    out = tmp_path / "g.pt"
    run([sys.executable, "-m", "a2b_dist.cli", "export", str(tmp_path / "full"), str(out)])
    exported = torch.load(out, weights_only=True)["generator"]
    assert all(torch.equal(exported[k], averaged[k]) for k in averaged)


def test_seeds_trains_each_and_keeps_the_best_validated(sim_shards, tmp_path):
    """a2b train --seeds 3,5: one run folder per seed, the seed with the higher validation AUROC's
    best/ copied to RUN/best, seeds.json listing both; a second call trains nothing again."""
    run_dir = tmp_path / "run"
    args = ["--seeds", "3,5", f"data.root={sim_shards}", f"train.run_dir={run_dir}", "eval.every=4"]
    out = run(train_cmd(1, *args))
    listing = json.loads((run_dir / "seeds.json").read_text())
    values = {r["seed"]: r["best"]["value"] for r in listing["seeds"]}
    assert set(values) == {3, 5} and listing["metric"] == "val_auc"
    assert listing["chosen"] == max(values, key=values.get)
    chosen = run_dir / f"seed-{listing['chosen']}"
    assert (run_dir / "seed-3" / "best").is_dir() and (run_dir / "seed-5" / "best").is_dir()
    assert json.loads((chosen / "best" / "meta.json").read_text()) == json.loads((run_dir / "best" / "meta.json").read_text())
    for f in (chosen / "best").rglob("*.safetensors"):
        assert f.read_bytes() == (run_dir / "best" / f.relative_to(chosen / "best")).read_bytes()
    assert f"kept seed {listing['chosen']}" in out.stdout
    assert not list(run_dir.glob(".*best"))                        # no staging folder left behind
    # The seeds differ, so their runs do.
    assert final_weights(run_dir / "seed-3")["G"]["main.0.weight"].ne(final_weights(run_dir / "seed-5")["G"]["main.0.weight"]).any()
    again = run(train_cmd(1, *args))
    assert again.stdout.count("nothing to do") == 2 and json.loads((run_dir / "seeds.json").read_text()) == listing
    bad = run(train_cmd(1, "--seeds", "1,1", f"data.root={sim_shards}", f"train.run_dir={tmp_path / 'x'}",
                        "eval.every=4"), check=False)
    assert bad.returncode == 2 and "each seed once" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()
