"""The search space of a sweep and its base config (submit side: runs in ``a2b tune`` only).

The default space: log-uniform over a decade either side of each loss weight of the config, a
factor 3 either side of its learning rate, and a choice for each detection lever; or a YAML file
(``sweeps/search_space.yaml`` is the default written out), checked against the config before Ray
starts.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from a2b_dist.config import Config, ConfigError, NoAliasLoader, from_dict, get_field, read_yaml_file, to_dict
from a2b_dist.data.manifest import role_exists
from a2b_dist.data.storage import Storage, absolute, join
from a2b_dist.errors import UserError
from a2b_dist.sweeps.trial import LR, apply_params

LOSS_WEIGHTS = ("loss.lambda_rec", "loss.lambda_id", "loss.lambda_f", "loss.lambda_fs")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
# Default space: log-uniform over a decade either side of each weight, a factor 3 for the rate.
WEIGHT_FACTOR, LR_FACTOR = 10.0, 3.0
# The detection levers (benchmarks/README.md, "Detection quality"), each with its off value (the
# paper's) among the choices, so a sweep can tell on a user's own data whether a lever helps there.
LEVERS = {
    "loss.lambda_fz": (0.0, 0.1, 1.0),          # the 0/1 focus term: off in the toolkit's defaults
    "loss.lambda_id_out": (0.0, 1.0, 10.0),
    "train.ema_decay": (0.0, 0.999),
    "loss.focus_size": ("image", "batch"),
    "data.hflip": (False, True),
}


@dataclass(frozen=True)
class Param:
    """One searched config field: a distribution and its bounds (or its values, for choice)."""
    key: str
    dist: str
    low: Optional[float] = None
    high: Optional[float] = None
    values: tuple = ()

    def domain(self):
        """The Ray Tune sampling domain."""
        from ray import tune

        if self.dist == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.dist == "uniform":
            return tune.uniform(self.low, self.high)
        if self.dist == "randint":
            return tune.randint(int(self.low), int(self.high))
        return tune.choice(list(self.values))

    def extremes(self) -> list:
        """Values that must all be valid settings of the field (bounds, or every choice)."""
        if self.dist == "choice":
            return list(self.values)
        if self.dist == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def as_yaml(self) -> dict:
        if self.dist == "choice":
            return {"dist": "choice", "values": list(self.values)}
        return {"dist": self.dist, "low": self.low, "high": self.high}


def default_space(cfg: Config) -> dict[str, Param]:
    """The four loss weights and the learning rate, log-uniform around the config's values
    (the paper's, for the presets; a weight set to 0 is centred on the paper's default instead),
    and a choice for each detection lever in LEVERS."""
    paper = Config()
    space = {}
    for key in LOSS_WEIGHTS:
        centre = get_field(cfg, key) or get_field(paper, key)
        space[key] = Param(key, "loguniform", _round(centre / WEIGHT_FACTOR), _round(centre * WEIGHT_FACTOR))
    lr = cfg.optim.lr_g or paper.optim.lr_g
    space[LR] = Param(LR, "loguniform", _round(lr / LR_FACTOR), _round(min(lr * LR_FACTOR, 1.0)))
    for key, values in LEVERS.items():
        space[key] = Param(key, "choice", values=values)
    return space


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def parse_space(data: Any, source: str) -> dict[str, Param]:
    """A mapping ``section.field: {dist: loguniform, low: .., high: ..}`` (or ``{dist: choice,
    values: [..]}``) into Params; every mistake names the entry and what is allowed."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: a search space is a non-empty mapping of section.field to "
                          "{dist: loguniform|uniform|randint|choice, low: .., high: ..} or {dist: choice, values: [..]}")
    space = {}
    for key, spec in data.items():
        where = f"{source}: {key}"
        if not isinstance(spec, dict) or spec.get("dist") not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: give dist: one of {', '.join(DISTRIBUTIONS)} (got {spec!r})")
        dist = spec["dist"]
        if dist == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values or set(spec) - {"dist", "values"}:
                raise ConfigError(f"{where}: dist: choice takes a non-empty list `values` and nothing else")
            space[key] = Param(key, dist, values=tuple(values))
            continue
        if set(spec) != {"dist", "low", "high"}:
            raise ConfigError(f"{where}: dist: {dist} takes exactly low and high (got {', '.join(spec)})")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
                or low >= high:
            raise ConfigError(f"{where}: low and high must be finite numbers with low < high (got {low!r}, {high!r})")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0 (got {low})")
        if dist == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: randint needs integer low and high (high excluded)")
        space[key] = Param(key, dist, float(low), float(high))
    return space


def load_space(path: str | os.PathLike) -> dict[str, Param]:
    """Read a search-space YAML file (see sweeps/search_space.yaml)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--search-space {p} does not exist")
    data = read_yaml_file(p, f"--search-space {p}", NoAliasLoader)   # size capped, aliases refused
    return parse_space(data, f"--search-space {p}")


def check_space(space: dict[str, Param], base: dict) -> None:
    """Every key must be a config field (or optim.lr) and every bound a valid value for it."""
    for key, param in space.items():
        for value in param.extremes():
            try:
                apply_params(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"search space entry {key} ({param.dist}, value {value!r}): {e}") from None


def prepare_base(cfg: Config, *, metric: str, seed: int, max_steps: Optional[int]) -> Config:
    """The config every trial starts from: paths absolute (trials run in other folders and on other
    nodes), eval.metric set, an evaluation (and the checkpoint Ray keeps) every eval.every steps,
    and train.steps cut to --max-steps with the learning-rate decay scaled to match."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root = absolute(cfg.data.root)   # a URL stays as it is
    if cfg.eval.fid_weights:
        cfg.eval.fid_weights = str(Path(cfg.eval.fid_weights).expanduser().resolve())
    cfg.eval.metric = metric
    cfg.train.seed = seed
    if max_steps is not None:
        cfg.optim.decay_steps = min(max_steps, round(cfg.optim.decay_steps * max_steps / cfg.train.steps))
        cfg.train.steps = max_steps
    if not cfg.eval.every or cfg.eval.every > cfg.train.steps:
        # Schedulers need several reports per trial; four evaluations unless the config says otherwise.
        cfg.eval.every = max(1, cfg.train.steps // 4)
    cfg.train.checkpoint_every = cfg.eval.every   # so each report carries the checkpoint of its step
    return from_dict(to_dict(cfg), source="sweep base config")


def check_data(cfg: Config) -> None:
    """Fail before starting Ray when the shards (or, for FID, the Inception weights) are missing."""
    storage = Storage.from_config(cfg.data)
    roles = ("mixed", "healthy") + (("val",) if cfg.eval.metric == "val_auc" else ())
    for role in roles:
        if not role_exists(cfg.data.root, role, storage):
            raise UserError(f"no {role} shards at {join(cfg.data.root, role)} (data.root={cfg.data.root}); build "
                            f"them with python shards/build.py ... --out {cfg.data.root}"
                            + ("; --metric val_auc needs a labelled val role" if role == "val" else ""))
    if cfg.eval.metric == "fid":
        from a2b_dist import fid
        fid.find_weights(cfg.eval.fid_weights)
