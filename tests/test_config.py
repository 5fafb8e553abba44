"""Config tree: paper defaults, presets, dotted overrides, validation messages naming the field."""
import re

import pytest

from a2b_dist.config import Config, ConfigError, from_dict, load_config, parse_overrides, to_dict

PRESETS = ["configs/test.yaml", "configs/demo.yaml", "configs/small.yaml", "configs/simulated.yaml",
           "configs/covid.yaml", "configs/cardiomegaly.yaml"]


def test_defaults_are_the_papers_values():
    cfg = Config()
    assert (cfg.loss.lambda_gp, cfg.loss.lambda_id, cfg.loss.lambda_rec, cfg.loss.lambda_f,
            cfg.loss.lambda_fz, cfg.loss.focus_eps) == (10, 1, 1, 0.1, 1, 0.01)
    assert (cfg.optim.lr_g, cfg.optim.lr_d, cfg.optim.beta1, cfg.optim.beta2) == (1e-4, 1e-4, 0.5, 0.999)
    assert cfg.optim.n_critic == 2 and cfg.train.batch_size == 16
    assert cfg.train.steps == 400_000 and cfg.optim.decay_steps == 100_000


@pytest.mark.parametrize("path", PRESETS)
def test_presets_load(path):
    """Every value a preset file sets is the value the loaded config holds (nothing is dropped or
    renamed on the way), and its networks run at its image size (on the meta device: shapes only)."""
    import torch

    from a2b_dist.config import _load_yaml   # the loader load_config reads presets with (YAML 1.2 booleans)
    from a2b_dist.nets import build_critic, build_generator

    cfg = load_config(path)
    with open(path) as f:
        written = _load_yaml(f)
    for section, fields in written.items():
        if section == "extends":   # its file's values: that preset's own entry; test_demo_is_small_plus_its_data
            continue
        for name, value in fields.items():
            assert getattr(getattr(cfg, section), name) == value, f"{path}: {section}.{name}"
    size, c = cfg.data.image_size, cfg.data.channels
    with torch.device("meta"):
        b_int, mask = build_generator(cfg.model, c)(torch.zeros(2, c, size, size))
        patches = build_critic(cfg.model, c, size)(b_int)
    assert b_int.shape == (2, c, size, size) and mask.shape == (2, 1, size, size)
    assert patches.shape[:2] == (2, 1) and patches.shape[-1] >= 1


def test_paper_presets_follow_section_4_4():
    sim = load_config("configs/simulated.yaml")
    assert sim.data.image_size == 128 and sim.loss.lambda_fs == 0.001
    for name in ("covid", "cardiomegaly"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.data.image_size == 256 and cfg.loss.lambda_fs == 1.0 and cfg.train.steps == 400_000


def test_overrides_apply_with_types():
    cfg = load_config("configs/test.yaml", ["loss.lambda_rec=2", "train.seed=3", "model.upsample=nearest"])
    assert cfg.loss.lambda_rec == 2.0 and cfg.train.seed == 3 and cfg.model.upsample == "nearest"
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, words", [
    (["loss.lambda_rec=-1"], ["loss.lambda_rec", "out of range"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "bf16"]),
    (["data.channels=2"], ["data.channels", "1, 3"]),
    (["data.image_size=16"], ["data.image_size", "32"]),
    (["optim.decay_steps=100", "train.steps=10"], ["optim.decay_steps", "train.steps"]),
    (["train.nonsense=1"], ["train.nonsense"]),
    (["train.steps=many"], ["train.steps"]),
    (["loss.lambda_rec"], ["section.field=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/test.yaml", override)
    for word in words:
        assert word in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))


def test_round_trip_through_dict():
    cfg = load_config("configs/demo.yaml", ["loss.lambda_f=0.2"])
    assert from_dict(to_dict(cfg)) == cfg


def test_yaml_no_is_a_string_not_false(tmp_path):
    """YAML 1.1 reads `no` as False; the config keeps 1.2 booleans so `mixed_precision: no` works."""
    assert load_config("configs/test.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  mixed_precision: no\n  channels_last: true\n")
    cfg = load_config(str(preset))
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last is True


# YAML aliases and oversized files (issue 26): refused before anything expands

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                 + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
                 + ["data: {root: *i}", ""])   # 9**9 (387 million) strings once expanded


def test_a_billion_laughs_config_fails_fast_with_one_line(tmp_path):
    """`a2b train --config BOMB` (a real process, which hung at 1.6 GB before): one line naming the
    file and the first alias, exit 2, nothing created. The timeout only stops a regression."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    proc = subprocess.run([sys.executable, "-m", "a2b_dist.cli", "train", "--config", str(bomb),
                           f"train.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config file {bomb}" in lines[0] and "aliases are not allowed" in lines[0]
    assert "*a at line 2" in lines[0]
    assert not (tmp_path / "run").exists()


def test_aliases_are_refused_in_overrides_and_search_spaces(tmp_path):
    from a2b_dist.sweeps import space as search_space

    with pytest.raises(ConfigError, match=r"override 'data.root=.*aliases are not allowed \(\*a at line 1\)"):
        load_config("configs/test.yaml", ["data.root=[&a [x, x], *a]"])
    space = tmp_path / "space.yaml"
    space.write_text("loss.lambda_rec: &r {dist: loguniform, low: 0.1, high: 10}\nloss.lambda_idt: *r\n")
    with pytest.raises(ConfigError, match=rf"--search-space {space}: YAML aliases are not allowed \(\*r at line 2\)"):
        search_space.load_space(space)
    # An anchor alone expands nothing and is allowed.
    (tmp_path / "anchor.yaml").write_text("optim: &o {decay_steps: 3}\ntrain: {steps: 3}\n")
    assert load_config(str(tmp_path / "anchor.yaml")).train.steps == 3


def test_an_oversized_config_is_refused_unread(tmp_path):
    from a2b_dist.config import MAX_YAML_BYTES

    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1) + "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match=rf"config file {big} is larger than 1 MiB"):
        load_config(str(big))


# Presets that extend another (issue 28)

# configs/demo.yaml as it was written out in full before it extended small.yaml (its comments cut),
# with eval.score=auto and model.mask_prior, which the presets took later.
OLD_DEMO = """\
data:
  root: data/demo
  image_size: 32
  channels: 1
  num_workers: 0
model:
  width: 32
  res_blocks: 3
  critic_width: 32
  mask_prior: 0.05         # added with the mask prior (small.yaml, so the demo too)
loss:
  lambda_id: 10.0
  lambda_id_out: 10.0
  lambda_fs: 1.0
  lambda_fz: 0.0
  pu_mask: 0.05            # added with the pooled positive-unlabelled mask (small.yaml, so the demo too)
optim:
  lr_g: 2.0e-4
  lr_d: 2.0e-4
  decay_steps: 167
train:
  run_dir: runs/demo
  steps: 500
  batch_size: 16
  checkpoint_every: 100
  log_every: 25
  sample_every: 100
  channels_last: true
eval:
  every: 33
  metric: val_auc
  select_from: 333
  normalize_images: 512    # added with the healthy_z score kinds (small.yaml, so the demo too)
  score: auto
"""


def test_demo_is_small_plus_its_data(tmp_path):
    """demo.yaml = small.yaml + data.root and train.run_dir: the loaded config is, value by value,
    the one the old written-out demo.yaml gave."""
    old = tmp_path / "old-demo.yaml"
    old.write_text(OLD_DEMO)
    new, expected = to_dict(load_config("configs/demo.yaml")), to_dict(load_config(str(old)))
    for section, fields in expected.items():
        for name, value in fields.items():
            assert new[section][name] == value, f"demo.yaml: {section}.{name} = {new[section][name]!r}, was {value!r}"
    assert new == expected
    small = to_dict(load_config("configs/small.yaml", ["data.root=data/demo", "train.run_dir=runs/demo"]))
    assert new == small


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def one_line_error(path, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_extends_is_relative_to_the_file_and_the_child_wins_field_by_field(tmp_path, monkeypatch):
    write(tmp_path / "presets" / "base" / "root.yaml", "data: {image_size: 64, channels: 3}\ntrain: {steps: 30}\n")
    write(tmp_path / "presets" / "mid.yaml",
          "extends: base/root.yaml\ntrain: {steps: 20, seed: 4}\noptim: {decay_steps: 5}\n")
    leaf = write(tmp_path / "presets" / "leaf.yaml", "extends: mid.yaml\ndata: {channels: 1}\n")
    monkeypatch.chdir(tmp_path / "presets" / "base")   # the working folder plays no part
    cfg = load_config(leaf, ["train.seed=7"])
    assert (cfg.data.image_size, cfg.data.channels) == (64, 1)            # a section merged field by field
    assert (cfg.train.steps, cfg.train.seed, cfg.optim.decay_steps) == (20, 7, 5)   # nearest file, then overrides
    assert cfg.loss == load_config().loss                                  # nobody set it: the defaults


def test_extends_cycles_and_missing_files_are_one_line(tmp_path):
    e = re.escape
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path / "b.yaml", "extends: a.yaml\ntrain: {steps: 3}\n")
    one_line_error(a, rf"config file {e(b)}: extends: a.yaml makes a cycle \({e(a)} -> {e(b)} -> {e(a)}\)")
    me = write(tmp_path / "me.yaml", "extends: ./me.yaml\n")
    one_line_error(me, rf"config file {e(me)}: extends: ./me.yaml makes a cycle \({e(me)} -> {e(me)}\)")
    lost = write(tmp_path / "lost.yaml", "extends: nowhere.yaml\n")
    nowhere = str(tmp_path / "nowhere.yaml")
    one_line_error(lost, rf"config file {e(lost)}: extends: nowhere.yaml does not exist \({e(nowhere)}\)")
    for value in ("[a.yaml, b.yaml]", "''", "3"):
        odd = write(tmp_path / "odd.yaml", f"extends: {value}\n")
        one_line_error(odd, rf"config file {e(odd)}: extends must name one YAML file, relative to this one")


def test_an_extended_file_gets_the_same_checks(tmp_path):
    """The 1 MiB cap, the alias refusal and the mapping check apply to the extended file, named."""
    from a2b_dist.config import MAX_YAML_BYTES

    child = write(tmp_path / "child.yaml", "extends: parent.yaml\ntrain: {steps: 3}\n")
    parent = write(tmp_path / "parent.yaml", "optim: &o {decay_steps: 3}\ntrain: *o\n")
    one_line_error(child, rf"config file {re.escape(parent)}: YAML aliases are not allowed \(\*o at line 2\)")
    write(tmp_path / "parent.yaml", "# padding\n" * (MAX_YAML_BYTES // 10 + 1) + "train: {steps: 3}\n")
    one_line_error(child, rf"config file {re.escape(parent)} is larger than 1 MiB")
    write(tmp_path / "parent.yaml", "- a list\n")
    one_line_error(child, rf"config file {re.escape(parent)} must hold a mapping of sections")
    write(tmp_path / "parent.yaml", "train: {nonsense: 1}\n")
    one_line_error(child, "train.nonsense")
