"""One config tree for A2B-GAN: dataclasses whose defaults are the paper's values (section 4.4).

Load a YAML preset, apply dotted overrides (``loss.lambda_rec=2``), validate:

    cfg = load_config("configs/demo.yaml", ["train.steps=100"])

Every user mistake raises ``ConfigError`` with the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from a2b_dist.errors import UserError, check_number


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text):
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(UserError, ValueError):
    """A config value a user has to fix; the message names the field and the allowed values."""


@dataclass
class DataConfig:
    # A folder holding the roles healthy/ mixed/ val/ test/ as shards/build.py writes them.
    root: str = "data/simulated-128"
    image_size: int = 128
    channels: int = 1
    num_workers: int = 2          # loader processes per training process
    shuffle_buffer: int = 256     # samples held for shuffling, per loader worker
    skip_corrupt: bool = False    # skip and count undecodable samples and damaged shards instead of failing
    verify: str = "count"         # checks of each shard against its manifest on open: size, count
                                  # (size and tar headers), sha256 (also the hash: reads every shard once)
    hflip: bool = False           # random horizontal flip of training images (the authors' augmentation;
                                  # off by default: laterality matters in many medical images)


@dataclass
class ModelConfig:
    width: int = 64               # generator channels after the first conv (StarGAN conv_dim)
    res_blocks: int = 6           # residual blocks at the bottleneck
    critic_width: int = 64        # critic channels after its first conv
    critic_layers: int = 0        # stride-2 convs in the critic; 0 = from image size (6 at 128 px and up)
    upsample: str = "transpose"   # transpose (StarGAN) | nearest | bilinear (resize, then conv)
    mask_activation: str = "sigmoid"  # sigmoid | tanh ((tanh + 1) / 2, as the authors' code)


@dataclass
class LossConfig:
    lambda_gp: float = 10.0
    lambda_id: float = 1.0
    lambda_rec: float = 1.0
    lambda_f: float = 0.1
    lambda_fs: float = 1.0        # the paper uses 1 for the X-ray sets and 0.001 for the simulated set
    lambda_fz: float = 1.0
    focus_eps: float = 0.01
    focus_warmup_steps: int = 0   # ramp the focus loss linearly from 0 over this many steps
    focus_warmup_terms: str = "both"  # both | zero_one (ramp only the 0/1 term; the size term acts from step 0)
    focus_size: str = "image"     # image: (mean M)^2 per image, averaged | batch: (mean M over the batch)^2
                                  # (the authors' code), which lets single anomalous images keep big masks
    lambda_id_out: float = 0.0    # Fixed-Point GAN identity on the output: L1(B'(b), b) for healthy b (0: paper)


@dataclass
class OptimConfig:
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    n_critic: int = 2             # critic updates per generator update
    # Linear decay of both learning rates to 0 over the last decay_steps steps (paper: last 100,000).
    decay_steps: int = 100_000


@dataclass
class TrainConfig:
    run_dir: str = "runs/a2b"
    # One step = one paper iteration: n_critic critic updates then one generator update.
    steps: int = 400_000
    batch_size: int = 16          # global batch, split evenly over the processes
    seed: int = 0
    mixed_precision: str = "no"   # no | bf16 | fp16
    checkpoint_every: int = 5_000
    keep_last: int = 3
    log_every: int = 50
    sample_every: int = 2_000
    channels_last: bool = False
    compile: bool = False
    cpu: bool = False             # force CPU even where a GPU is present
    backend: str = "ddp"          # ddp | deepspeed (optional package; README "DeepSpeed")
    zero_stage: int = 1           # deepspeed only: 0 (replicated Adam state) or 1 (Adam state sharded)
    # Exponential moving average of the generator's weights (stylegan2-ada's G_ema), used for selection,
    # evaluation, samples and export; 0 = off (the paper). Decay at step t: min(ema_decay, (1+t)/(10+t)).
    ema_decay: float = 0.0


@dataclass
class EvalConfig:
    every: int = 0                # evaluate (model selection) every N steps and at the end; 0 = never
    metric: str = "val_auc"       # val_auc | fid
    select_from: int = 0          # evaluations before this step are logged but never become best/
    score: str = "mean"           # mean (the paper's) | topk | mask | smooth_topk | intermediate (losses.anomaly_score)
    topk_percent: float = 5.0
    batch_size: int = 32
    fid_samples: int = 1000
    fid_weights: Optional[str] = None   # path to pt_inception-2015-12-05 weights; else torch hub cache
    fid_dims: int = 2048


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# (low, high) inclusive bounds; None means unbounded on that side.
_RANGES: dict[str, tuple[Any, Any]] = {
    "data.image_size": (32, 512),
    "data.num_workers": (0, 64),
    "data.shuffle_buffer": (1, None),
    "model.width": (1, 1024),
    "model.res_blocks": (0, 32),
    "model.critic_width": (1, 1024),
    "model.critic_layers": (0, 8),
    "loss.lambda_gp": (0.0, None),
    "loss.lambda_id": (0.0, None),
    "loss.lambda_rec": (0.0, None),
    "loss.lambda_f": (0.0, None),
    "loss.lambda_fs": (0.0, None),
    "loss.lambda_fz": (0.0, None),
    "loss.focus_eps": (1e-8, 0.5),
    "loss.focus_warmup_steps": (0, None),
    "loss.lambda_id_out": (0.0, None),
    "optim.lr_g": (0.0, 1.0),
    "optim.lr_d": (0.0, 1.0),
    "optim.beta1": (0.0, 1.0),
    "optim.beta2": (0.0, 1.0),
    "optim.n_critic": (1, 100),
    "optim.decay_steps": (0, None),
    "train.steps": (1, None),
    "train.batch_size": (1, None),
    "train.seed": (0, 2**31 - 1),
    "train.checkpoint_every": (1, None),
    "train.keep_last": (1, None),
    "train.log_every": (1, None),
    "train.sample_every": (0, None),
    "train.ema_decay": (0.0, 0.99999),
    "eval.every": (0, None),
    "eval.select_from": (0, None),
    "eval.topk_percent": (0.01, 100.0),
    "eval.batch_size": (1, None),
    "eval.fid_samples": (2, None),
}
_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.channels": (1, 3),
    "data.verify": ("size", "count", "sha256"),
    "model.upsample": ("transpose", "nearest", "bilinear"),
    "model.mask_activation": ("sigmoid", "tanh"),
    "loss.focus_warmup_terms": ("both", "zero_one"),
    "loss.focus_size": ("image", "batch"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.backend": ("ddp", "deepspeed"),
    "eval.metric": ("val_auc", "fid"),
    "eval.score": ("mean", "topk", "mask", "smooth_topk", "intermediate"),
    "eval.fid_dims": (64, 192, 768, 2048),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Check every bounded field; raise ConfigError naming the first field out of range."""
    for name, (lo, hi) in _RANGES.items():
        check_number(name, _get(cfg, name), lo, hi, integer=isinstance(lo, int), error=ConfigError)
    for section in dataclasses.fields(cfg):          # NaN and infinity in a field without bounds too
        for field in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{field.name}={value!r} is not a finite number")
    for name, choices in _CHOICES.items():
        value = _get(cfg, name)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    if cfg.data.image_size % 4:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of 4 "
                          "(the generator downsamples twice by 2)")
    if cfg.model.critic_layers and cfg.data.image_size // 2 ** cfg.model.critic_layers < 1:
        raise ConfigError(f"model.critic_layers={cfg.model.critic_layers} halves a "
                          f"{cfg.data.image_size} px image below one pixel; use at most "
                          f"{int(cfg.data.image_size).bit_length() - 1}")
    if cfg.optim.decay_steps > cfg.train.steps:
        raise ConfigError(f"optim.decay_steps={cfg.optim.decay_steps} exceeds train.steps="
                          f"{cfg.train.steps}; the decay covers the last part of training")
    if cfg.eval.every and cfg.eval.select_from > cfg.train.steps:
        raise ConfigError(f"eval.select_from={cfg.eval.select_from} exceeds train.steps={cfg.train.steps}; "
                          "no evaluation could be selected as best")
    if cfg.train.zero_stage not in (0, 1):
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} is not allowed; choose 0 or 1 (ZeRO 2 and 3 "
                          "shard gradients and weights, untested with the critic's gradient penalty)")
    if cfg.train.backend == "deepspeed" and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 is not supported with train.backend=deepspeed; "
                          "choose bf16 or no (or train.backend=ddp)")
    if cfg.train.backend == "deepspeed" and cfg.train.ema_decay:
        raise ConfigError("train.ema_decay is not supported with train.backend=deepspeed yet; set "
                          "train.ema_decay=0 (or train.backend=ddp)")
    if cfg.train.backend == "deepspeed" and cfg.train.compile:
        raise ConfigError("train.compile=true is not supported with train.backend=deepspeed; "
                          "set train.compile=false (or train.backend=ddp)")
    return cfg


def _structured(data: dict, source: str) -> Config:
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:  # unknown key or wrong type
        raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"field {key}: {first}" if key else first


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["loss.lambda_rec=2", "train.seed=3"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like section.field=value "
                              "(for example loss.lambda_rec=2)")
        key, raw = item.split("=", 1)
        try:
            value = _load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return tree


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validation."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                data = _load_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, ...)")
    base = OmegaConf.create(data)
    if overrides:
        over = parse_overrides(overrides)
        base = OmegaConf.merge(base, OmegaConf.create(over))
        source += " + overrides"
    return validate(_structured(OmegaConf.to_container(base), source))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    return validate(_structured(data, source))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (atomically: temporary name, then rename)."""
    from a2b_dist.files import write_atomic

    write_atomic(path, to_yaml(cfg))
