"""One config tree for A2B-GAN: dataclasses whose defaults are the paper's values (section 4.4).

Load a YAML preset, apply dotted overrides (``loss.lambda_rec=2``), validate:

    cfg = load_config("configs/demo.yaml", ["train.steps=100"])

A preset may build on another with ``extends: small.yaml`` (relative to it) and set only what
differs; its values win field by field.

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


MAX_YAML_BYTES = 1 << 20   # a config or search space is a few KB; a bigger file is a mistake


class _AliasRefused(Exception):
    """A YAML alias (``*name``); carries where it is."""


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases as it composes, before anything is expanded: a config has no
    use for them, and a few lines of nested aliases (the billion-laughs document) expand to billions
    of values in whatever copies the loaded tree (OmegaConf does)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _AliasRefused(f"*{self.peek_event().anchor} at line {mark.line + 1}")
        return super().compose_node(parent, index)


class _Yaml12Loader(NoAliasLoader):
    """No aliases, and YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load_yaml(text, source: str = "YAML", loader: type = _Yaml12Loader):
    """YAML ``text`` from ``source`` (named in the error) with ``loader``; an alias is a ConfigError."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except _AliasRefused as e:
        raise ConfigError(f"{source}: YAML aliases are not allowed ({e}); write the value out in full") from None


def read_yaml_file(path: str | os.PathLike, what: str, loader: type = _Yaml12Loader) -> Any:
    """A YAML file of at most MAX_YAML_BYTES, aliases refused; every problem is one ConfigError
    naming ``what`` (e.g. "config file configs/x.yaml")."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_YAML_BYTES // 2**20} MiB; a config is a few KB")
    try:
        return _load_yaml(raw, what, loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None


class ConfigError(UserError, ValueError):
    """A config value a user has to fix; the message names the field and the allowed values."""


TRACKERS = ("tensorboard", "mlflow", "wandb")   # train.log_with: Accelerate's names


def trackers(cfg: "Config") -> list[str]:
    """The trackers train.log_with names (none: an empty list)."""
    return [t.strip() for t in cfg.train.log_with.split(",") if t.strip() and t.strip() != "none"]


def bounded(default: Any, low: Any = None, high: Any = None) -> Any:
    """A numeric field with inclusive bounds (None: unbounded on that side), checked by validate();
    an int low bound makes the field an integer field."""
    return field(default=default, metadata={"range": (low, high)})


def one_of(default: Any, choices: tuple) -> Any:
    """A field whose value must be one of ``choices``, checked by validate()."""
    assert default in choices, (default, choices)
    return field(default=default, metadata={"choices": choices})


@dataclass
class DataConfig:
    # A folder holding the roles healthy/ mixed/ val/ test/ as shards/build.py writes them, or a URL
    # to one: https://host/path, s3://bucket/prefix, gs://bucket/prefix (credentials from the
    # environment or the provider's config files, never in the URL).
    root: str = "data/simulated-128"
    image_size: int = bounded(128, 32, 512)
    channels: int = one_of(1, (1, 3))
    num_workers: int = bounded(2, 0, 64)          # loader processes per training process
    shuffle_buffer: int = bounded(256, 1, None)   # samples held for shuffling, per loader worker
    skip_corrupt: bool = False    # skip and count undecodable samples and damaged shards instead of failing
    # Checks of each shard against its manifest on open: size, count (size and tar headers), sha256
    # (also the hash: reads every shard once).
    verify: str = one_of("count", ("size", "count", "sha256"))
    # data.root a URL: seconds a request may wait for the server (connecting, or between bytes),
    # and retries of a failed request with backoff (1, 2, 4, ... s) before the run fails.
    timeout_s: float = bounded(60.0, 1.0, 3600.0)
    retries: int = bounded(4, 0, 20)
    # data.root a URL: a folder on this node's local disk keeping downloaded shards (by sha256) for
    # later passes and resumed jobs ("": stream every read), and its size cap in GiB.
    cache_dir: str = ""
    cache_gb: float = bounded(50.0, 0.0, None)
    hflip: bool = False           # random horizontal flip of training images (the authors' augmentation;
                                  # off by default: laterality matters in many medical images)


@dataclass
class ModelConfig:
    width: int = bounded(64, 1, 1024)             # generator channels after the first conv (StarGAN conv_dim)
    res_blocks: int = bounded(6, 0, 32)           # residual blocks at the bottleneck
    critic_width: int = bounded(64, 1, 1024)      # critic channels after its first conv
    critic_layers: int = bounded(0, 0, 8)         # stride-2 convs in the critic; 0 = from image size (6 at 128 px and up)
    # transpose (StarGAN) | nearest | bilinear (resize, then conv)
    upsample: str = one_of("transpose", ("transpose", "nearest", "bilinear"))
    # sigmoid | tanh ((tanh + 1) / 2, as the authors' code)
    mask_activation: str = one_of("sigmoid", ("sigmoid", "tanh"))
    # 0: off (the paper). Else M starts near this value on every pixel instead of near 0.5 (a learnt
    # bias on the mask's logit, nets.Generator), so the mask grows only where the losses ask for it.
    mask_prior: float = bounded(0.0, 0.0, 0.99)


@dataclass
class LossConfig:
    lambda_gp: float = bounded(10.0, 0.0, None)
    lambda_id: float = bounded(1.0, 0.0, None)
    lambda_rec: float = bounded(1.0, 0.0, None)
    lambda_f: float = bounded(0.1, 0.0, None)
    lambda_fs: float = bounded(1.0, 0.0, None)    # the paper uses 1 for the X-ray sets and 0.001 for the simulated set
    lambda_fz: float = bounded(1.0, 0.0, None)
    focus_eps: float = bounded(0.01, 1e-8, 0.5)
    focus_warmup_steps: int = bounded(0, 0, None)  # ramp the focus loss linearly from 0 over this many steps
    # both | zero_one (ramp only the 0/1 term; the size term acts from step 0)
    focus_warmup_terms: str = one_of("both", ("both", "zero_one"))
    # image: (mean M)^2 per image, averaged | batch: (mean M over the batch)^2 (the authors' code),
    # which lets single anomalous images keep big masks
    focus_size: str = one_of("image", ("image", "batch"))
    # Fixed-Point GAN identity on the output: L1(B'(b), b) for healthy b (0: the paper)
    lambda_id_out: float = bounded(0.0, 0.0, None)
    # Synthetic restoration on healthy images (0: off, the paper): this share of each generator batch's
    # healthy images gets a soft patch of another healthy image pasted in (losses.foreign_patches); the
    # identity terms then ask for the original back, and the mask is supervised with the pasted region
    # (binary cross-entropy, weight lambda_mask, on every healthy image of the batch).
    restore_prob: float = bounded(0.0, 0.0, 1.0)
    lambda_mask: float = bounded(1.0, 0.0, None)
    # The mixed set ranked by the model itself (0: off): from pseudo_after x train.steps on, the share
    # pseudo_fraction of each mixed batch that the current generator scores lowest (mean |a - B'|) also
    # takes the identity terms as healthy images do; the rest are judged adversarially only (plus Eq. 7).
    pseudo_fraction: float = bounded(0.0, 0.0, 1.0)
    pseudo_after: float = bounded(0.2, 0.0, 1.0)
    # The mask trained on the mixed set as a positive-unlabelled classifier (0: off, the paper): every
    # healthy pixel's M pulled towards 0, every mixed pixel's towards 1 with this weight (losses.
    # pu_mask_loss, in the generator's loss with weight lambda_mask). What both sets share settles
    # near M = pu_mask; what only the mixed set has (its anomalies) is pulled up alone, so M learns
    # where a mixed image differs from every healthy one, and B' replaces exactly that. No label and
    # no anomalous share is read; at share 0 nothing sets the sets apart and M stays flat.
    pu_mask: float = bounded(0.0, 0.0, 1.0)
    # 0: every pixel an example; else each image one, its M the mean of its top pu_topk percent pixels
    pu_topk: float = bounded(2.0, 0.0, 100.0)
    # The critic told what the mixed set looks like (0: off, the paper): this share of each critic
    # batch's fakes are the mixed images as they are instead of their translations B', so the critic
    # keeps rating what sets the mixed set apart from the healthy one (its anomalies: learning from
    # positive and unlabelled data) and the generator is pushed to remove exactly that.
    critic_mixed: float = bounded(0.0, 0.0, 1.0)
    # StarGAN's domain classification (0: off, the paper): the critic gets a second head that tells,
    # patch by patch, a mixed image from a healthy one (binary cross-entropy on real images of both
    # sets, weight lambda_cls in the critic's loss); the generator is asked, with the same weight, to
    # make the translations B' of mixed images classed healthy. The patches only the mixed set has
    # (its anomalies) are the ones the head learns to find, so the mixed set tells G what to remove.
    lambda_cls: float = bounded(0.0, 0.0, None)


@dataclass
class OptimConfig:
    lr_g: float = bounded(1e-4, 0.0, 1.0)
    lr_d: float = bounded(1e-4, 0.0, 1.0)
    beta1: float = bounded(0.5, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)
    n_critic: int = bounded(2, 1, 100)            # critic updates per generator update
    # Linear decay of both learning rates to 0 over the last decay_steps steps (paper: last 100,000).
    decay_steps: int = bounded(100_000, 0, None)


@dataclass
class TrainConfig:
    run_dir: str = "runs/a2b"
    # One step = one paper iteration: n_critic critic updates then one generator update.
    steps: int = bounded(400_000, 1, None)
    batch_size: int = bounded(16, 1, None)        # global batch, split evenly over the processes
    seed: int = bounded(0, 0, 2**31 - 1)
    mixed_precision: str = one_of("no", ("no", "bf16", "fp16"))
    checkpoint_every: int = bounded(5_000, 1, None)
    keep_last: int = bounded(3, 1, None)
    log_every: int = bounded(50, 1, None)
    sample_every: int = bounded(2_000, 0, None)
    channels_last: bool = False
    compile: bool = False
    # Trackers, through Accelerate's tracker API, beside metrics.jsonl: a comma-separated list of
    # tensorboard (RUN/tb), mlflow (MLFLOW_TRACKING_URI, else a file store in RUN/mlruns), wandb
    # (offline unless WANDB_MODE or WANDB_API_KEY says otherwise), or none.
    log_with: str = "tensorboard"
    cpu: bool = False             # force CPU even where a GPU is present
    backend: str = one_of("ddp", ("ddp", "deepspeed"))   # deepspeed: optional package (README "DeepSpeed")
    zero_stage: int = 1           # deepspeed only: 0 (replicated Adam state) or 1 (Adam state sharded)
    # Exponential moving average of the generator's weights (stylegan2-ada's G_ema), used for selection,
    # evaluation, samples and export; 0 = off (the paper). Decay at step t: min(ema_decay, (1+t)/(10+t)).
    ema_decay: float = bounded(0.0, 0.0, 0.99999)


@dataclass
class EvalConfig:
    every: int = bounded(0, 0, None)              # evaluate (model selection) every N steps and at the end; 0 = never
    metric: str = one_of("val_auc", ("val_auc", "fid"))
    select_from: int = bounded(0, 0, None)        # evaluations before this step are logged but never become best/
    # mean (the paper's) | topk | mask | smooth_topk | intermediate | healthy_z | healthy_z_mask | healthy_z_int
    # (losses.anomaly_score) | auto: the kind with the best validation AUROC at the selected
    # checkpoint (selection itself by the mean score), recorded with the checkpoint and used by
    # a2b evaluate, detect and export
    score: str = one_of("mean", ("mean", "topk", "mask", "smooth_topk", "intermediate", "healthy_z",
                                 "healthy_z_mask", "healthy_z_int", "auto"))
    # healthy images (the first of the healthy role) whose maps give the per-pixel statistics of the
    # healthy_z kinds, taken at every evaluation and kept with the checkpoint; 0 = none (those kinds off)
    normalize_images: int = bounded(0, 0, None)
    topk_percent: float = bounded(5.0, 0.01, 100.0)
    batch_size: int = bounded(32, 1, None)
    fid_samples: int = bounded(1000, 2, None)
    fid_weights: Optional[str] = None   # path to pt_inception-2015-12-05 weights; else torch hub cache
    fid_dims: int = one_of(2048, (64, 192, 768, 2048))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def get_field(cfg: Config, dotted: str) -> Any:
    """The value of ``section.field`` in a Config."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def field_rules() -> dict[str, dict]:
    """``section.field`` -> the rule declared on the field ({"range": (low, high)} or
    {"choices": (...)}), for every field that has one."""
    rules = {}
    defaults = Config()
    for section in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            if f.metadata:
                rules[f"{section.name}.{f.name}"] = dict(f.metadata)
    return rules


def validate(cfg: Config) -> Config:
    """Check every field's declared bounds or choices; raise ConfigError naming the first that fails."""
    for name, rule in field_rules().items():
        value = get_field(cfg, name)
        if "range" in rule:
            lo, hi = rule["range"]
            check_number(name, value, lo, hi, integer=isinstance(lo, int), error=ConfigError)
        elif value not in rule["choices"]:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of "
                              f"{', '.join(map(str, rule['choices']))}")
    for section in dataclasses.fields(cfg):          # NaN and infinity in a field without bounds too
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}={value!r} is not a finite number")
    from a2b_dist.data.storage import DataError, check_location

    try:   # the one location check (credentials, protocols) for every location a config names
        check_location(cfg.data.root, "data.root")
        check_location(cfg.data.cache_dir, "data.cache_dir", local="the cache is a folder on this node's local disk")
        check_location(cfg.train.run_dir, "train.run_dir",
                       local="the run folder is on a file system every rank can write")
    except DataError as e:
        raise ConfigError(str(e)) from None
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
    if cfg.eval.score == "auto" and cfg.eval.metric != "val_auc":
        raise ConfigError(f"eval.score=auto chooses the score kind on validation AUROC, which eval.metric="
                          f"{cfg.eval.metric} does not compute; set eval.metric=val_auc or name a kind "
                          "(mean, topk, mask, smooth_topk, intermediate)")
    if cfg.eval.score in ("healthy_z", "healthy_z_mask", "healthy_z_int") and not (cfg.eval.normalize_images
                                                                  and cfg.eval.metric == "val_auc"):
        raise ConfigError(f"eval.score={cfg.eval.score} standardises maps by healthy images' statistics, taken "
                          "with the validation AUROC: set eval.normalize_images (e.g. 256) with eval.metric=val_auc, "
                          "or name another kind (mean, topk, mask, smooth_topk, intermediate)")
    named = [t.strip() for t in cfg.train.log_with.split(",") if t.strip()]
    if any(t not in TRACKERS + ("none",) for t in named) or ("none" in named and len(named) > 1):
        raise ConfigError(f"train.log_with={cfg.train.log_with!r}: choose a comma-separated list of "
                          f"{', '.join(TRACKERS)}, or none")
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


def dotted_tree(values: dict[str, Any], what: str = "override") -> dict:
    """``{"loss.lambda_rec": 2, "train.seed": 3}`` -> ``{"loss": {"lambda_rec": 2}, "train": {"seed": 3}}``.

    The one place dotted keys become config sections (the CLI's overrides, the sweep's sampled
    values); merge() then checks that each names a field.
    """
    tree: dict = {}
    for key, value in values.items():
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"{what} {key!r} must name a field as section.field (for example loss.lambda_rec)")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{what} {key!r} conflicts with an earlier {what} of {part}")
        node[parts[-1]] = value
    return tree


def override_values(overrides: Sequence[str]) -> dict[str, Any]:
    """``["loss.lambda_rec=2", "train.seed=3"]`` -> ``{"loss.lambda_rec": 2, "train.seed": 3}``
    (values parsed as YAML 1.2: numbers, true/false, null, lists; anything else stays text). A field
    given twice takes the later value, so a script's defaults can be overridden after them."""
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like section.field=value "
                              "(for example loss.lambda_rec=2)")
        key, raw = item.split("=", 1)
        try:
            value = _load_yaml(raw, f"override {item[:80]!r}") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        values.pop(key.strip(), None)   # a later override of the same field wins
        values[key.strip()] = value
    return values


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["loss.lambda_rec=2", "train.seed=3"]`` into a nested dict (values parsed as YAML)."""
    return dotted_tree(override_values(overrides))


# What a command that scores with a trained generator (a2b evaluate, a2b detect) may change in the
# checkpoint's config: how it scores and reads, never what shaped the networks.
SCORING_FIELDS = ("eval.", "data.num_workers", "data.skip_corrupt", "data.verify", "data.timeout_s",
                  "data.retries", "data.cache_dir", "data.cache_gb")


def apply_overrides(cfg: Config, overrides: Sequence[str], *, allowed: Sequence[str],
                    source: str) -> tuple[Config, dict[str, Any]]:
    """``cfg`` with dotted ``overrides`` (validated like any config), limited to the fields or
    sections named in ``allowed`` ("eval." for a section); also returns the values given."""
    values = override_values(overrides)
    for key in values:
        if not any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            shown = ", ".join(a + "*" if a.endswith(".") else a for a in allowed)
            raise ConfigError(f"{source}: {key} cannot be set here; allowed: {shown}")
    return merge(cfg, values, source), values


def merge(base: dict | Config, values: dict[str, Any], source: str) -> Config:
    """``base`` (a Config or its dict) with the dotted ``values`` set, validated; an unknown field or
    a value of the wrong type is a ConfigError naming ``source`` and the field."""
    data = to_dict(base) if isinstance(base, Config) else base
    tree = dotted_tree(values, what="value")
    try:
        merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.create(tree))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    return validate(_structured(OmegaConf.to_container(merged), source))


EXTENDS = "extends"   # a preset's key naming the preset it builds on


def _overlay(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s values set: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_preset(path: str, chain: tuple[tuple[str, str], ...] = ()) -> dict:
    """A preset's sections, with the preset it ``extends:`` (a file relative to it, which may extend
    another) underneath. Each file is read by read_yaml_file (the size cap, no aliases); a missing
    file or a cycle is one ConfigError naming the file that says ``extends:``."""
    data = read_yaml_file(path, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, ...)")
    if EXTENDS not in data:
        return data
    data = dict(data)
    parent = data.pop(EXTENDS)
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"config file {path}: {EXTENDS} must name one YAML file, relative to this one "
                          f"(got {parent!r})")
    target = os.path.normpath(os.path.join(os.path.dirname(path), parent))
    here = chain + ((os.path.realpath(path), path),)   # (real path, as named) of each file so far
    real = [r for r, _ in here]
    if os.path.realpath(target) in real:
        cycle = [shown for _, shown in here[real.index(os.path.realpath(target)):]] + [target]
        raise ConfigError(f"config file {path}: {EXTENDS}: {parent} makes a cycle ({' -> '.join(cycle)})")
    if not os.path.isfile(target):
        raise ConfigError(f"config file {path}: {EXTENDS}: {parent} does not exist ({target})")
    return _overlay(_read_preset(target, here), data)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (over the presets it extends) <- dotted overrides, then validation."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        data = _read_preset(str(path))
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
