"""Where training reports: metrics.jsonl and the trackers of train.log_with (TensorBoard, MLflow,
wandb) through Accelerate, with their settings defaulted into the run folder (no server, no network)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from a2b_dist.config import Config, ConfigError, to_dict, trackers
from a2b_dist.files import append_jsonl


_TRACKER_DEFAULTS: dict[str, str] = {}   # environment values prepare_tracker_env chose, not the user


def prepare_tracker_env(cfg: Config) -> None:
    """Defaults for the trackers' own settings, before the Accelerator starts them: MLflow writes to
    a file store in the run folder (no server, no database) unless MLFLOW_TRACKING_URI points
    elsewhere (a tracking server, sqlite:///...); wandb runs offline
    (into the run folder) unless WANDB_MODE or WANDB_API_KEY is set, so no run needs a network."""
    import importlib.util

    run_dir = Path(cfg.train.run_dir).resolve()
    names = trackers(cfg)
    for name, package, install in (("mlflow", "mlflow", "pip install 'a2b_dist[mlflow]'"),
                                   ("wandb", "wandb", "pip install wandb")):
        if name in names and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.log_with={cfg.train.log_with} needs the {package} package: {install}, "
                              f"or leave {name} out")
    def default(key: str, value: str) -> None:
        # A value this function set for an earlier run in the same process (a sweep's reused worker)
        # is that run's; it is replaced. A value the user set is kept.
        if os.environ.get(key) is None or _TRACKER_DEFAULTS.get(key) == os.environ[key]:
            os.environ[key] = _TRACKER_DEFAULTS[key] = value

    if "mlflow" in names:
        default("MLFLOW_TRACKING_URI", (run_dir / "mlruns").as_uri())
        if _TRACKER_DEFAULTS.get("MLFLOW_TRACKING_URI") == os.environ["MLFLOW_TRACKING_URI"]:
            default("MLFLOW_ALLOW_FILE_STORE", "true")   # our file store; MLflow 3 keeps it in maintenance mode
    if "wandb" in names:
        if not os.environ.get("WANDB_API_KEY"):
            default("WANDB_MODE", "offline")
        default("WANDB_DIR", str(run_dir))


class MetricsLog:
    """metrics.jsonl (one JSON object per line, main process only) and the trackers of
    train.log_with through Accelerate (``accelerator.log``): scalars, the sample grids as images."""

    def __init__(self, cfg: Config, accelerator, run_dir: Path, resumed_at: Optional[int] = None):
        self.enabled = accelerator.is_main_process
        self.acc = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.names = trackers(cfg)
        if self.names:
            # After a resume, TensorBoard hides the events past the checkpoint (they are rerun).
            kwargs = {"tensorboard": {"purge_step": resumed_at + 1}} if resumed_at is not None else {}
            kwargs["mlflow"] = {"run_name": f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
            flat = {f"{section}.{k}": v for section, fields in to_dict(cfg).items() for k, v in fields.items()}
            accelerator.init_trackers("tb", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                    for k, v in flat.items()}, init_kwargs=kwargs)

    def where(self) -> list[str]:
        """One line per tracker: where to look."""
        lines = []
        if "tensorboard" in self.names:
            lines.append(f"tensorboard --logdir {self.path.parent / 'tb'}")
        if "mlflow" in self.names:
            lines.append(f"mlflow ui --backend-store-uri {os.environ.get('MLFLOW_TRACKING_URI')}")
        if "wandb" in self.names:
            lines.append(f"wandb ({os.environ.get('WANDB_MODE', 'online')}) in {os.environ.get('WANDB_DIR')}")
        return lines

    def write(self, record: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, record)
        if self.names:
            values = {k: v for k, v in record.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.acc.log(values, step=record["step"])

    def images(self, grid: torch.Tensor, png: Path, step: int) -> None:
        """The sample grid (C, H, W in [0, 1]) to each tracker that keeps images (main process)."""
        if not self.enabled:
            return
        if "tensorboard" in self.names:
            self.acc.get_tracker("tensorboard").log_images({"samples": grid.cpu().numpy()}, step=step,
                                                          dataformats="CHW")
        if "mlflow" in self.names:
            self.acc.get_tracker("mlflow").log_artifact(str(png), artifact_path="samples")
        if "wandb" in self.names:
            self.acc.get_tracker("wandb").log_images({"samples": [grid.permute(1, 2, 0).cpu().numpy()]}, step=step)

    def close(self) -> None:
        # Each tracker's finish(), not accelerator.end_training(): that also destroys the process
        # group, which train() still needs (and a sweep's next trial after it).
        if self.names and self.enabled:
            for tracker in self.acc.trackers:
                tracker.finish()
