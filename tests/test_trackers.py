"""Trackers through Accelerate's tracker API: a real MLflow client on a local file store receives
the losses and the validation AUROC; TensorBoard's event files hold the sample grids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mlflow_and_tensorboard_receive_losses_auroc_and_samples(sim_shards, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in requirements.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", "configs/test.yaml",
                           f"data.root={sim_shards}", f"train.run_dir={run}", "train.steps=4", "train.log_every=2",
                           "train.sample_every=2", "eval.every=2", "optim.decay_steps=2",
                           "train.log_with=tensorboard,mlflow"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tensorboard --logdir {run / 'tb'}" in proc.stderr + proc.stdout
    uri = (run / "mlruns").resolve().as_uri()
    assert f"mlflow ui --backend-store-uri {uri}" in proc.stderr + proc.stdout

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # as the trainer set it for its own file store
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    [experiment] = [e for e in client.search_experiments() if e.name == "tb"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss_d"] for r in logged if "loss_d" in r}
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "loss_d")}
    assert history == pytest.approx(losses) and sorted(history) == [2, 4]
    aucs = {r["step"]: r["eval/val_auc"] for r in logged if "eval/val_auc" in r}
    assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "eval/val_auc")} == pytest.approx(aucs)
    assert mlrun.data.params["loss.lambda_gp"] == "10.0"
    assert len(client.list_artifacts(mlrun.info.run_id, "samples")) == 2

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert [e.step for e in events.Scalars("loss_d")] == [2, 4]


def test_log_with_names_the_choices(tmp_path):
    from a2b_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.log_with='tensorbored'.*tensorboard, mlflow, wandb, or none"):
        load_config("configs/test.yaml", ["train.log_with=tensorbored"])
    assert load_config("configs/test.yaml", ["train.log_with=none"]).train.log_with == "none"


def test_tracker_defaults_follow_each_run_but_keep_the_users(tmp_path, monkeypatch):
    """A process that trains twice (a sweep's reused Ray worker) logs each run into its own MLflow
    store; a MLFLOW_TRACKING_URI the user set is never replaced."""
    from a2b_dist.config import load_config
    from a2b_dist.tracking import prepare_tracker_env

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for run in ("a", "b"):
        prepare_tracker_env(load_config("configs/test.yaml", [f"train.run_dir={tmp_path / run}",
                                                               "train.log_with=mlflow"]))
        assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / run / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    prepare_tracker_env(load_config("configs/test.yaml", [f"train.run_dir={tmp_path / 'c'}", "train.log_with=mlflow"]))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
