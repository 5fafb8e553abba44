"""The optional parts name their extra when its package is missing (DeepSpeed's case is in
test_deepspeed.py, through the CLI). A missing package is stood in
for by `sys.modules[name] = None` in a fresh interpreter (Python then raises ImportError on import,
as it does when the package is not installed); everything else is the real code path.
setup.py's extras are read from the real setup.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def run_without(mods: list[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(mods=mods) + code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mods,code,words", [
    (["ray"], "import sys\nsys.argv = ['sweeps/tune.py', '--config', 'configs/test.yaml', '--metric', 'val_auc']\n"
              "from a2b_dist.cli import script\nsys.exit(script('tune', 'sweeps/tune.py'))",
     "pip install 'a2b_dist[sweeps]'"),
    (["pydicom"], "from a2b_dist.sources import medical\nmedical._require('pydicom')", "pip install 'a2b_dist[medical]'"),
    (["mlflow"], "from a2b_dist.config import load_config\nfrom a2b_dist.tracking import prepare_tracker_env\n"
                 "prepare_tracker_env(load_config('configs/test.yaml', ['train.log_with=tensorboard,mlflow']))",
     "pip install 'a2b_dist[mlflow]'"),
])
def test_a_missing_extra_is_named(mods, code, words):
    proc = run_without(mods, code)
    assert proc.returncode != 0 and words in proc.stderr, proc.stderr[-2000:]
    if "run_guarded" in code:   # through the command: one line, no traceback
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr


def test_setup_keeps_the_optional_packages_out_of_the_core():
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "EXTRAS")
    proc = subprocess.run([sys.executable, "-c",
                           "import runpy, sys, setuptools\n"
                           "captured = {}\nsetuptools.setup = lambda **kw: captured.update(kw)\n"
                           "runpy.run_path('setup.py')\n"
                           "print(repr((captured['install_requires'], captured['extras_require'])))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    core, extras_require = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    names = {r.split("==")[0].split("[")[0].lower() for r in core}
    assert {"torch", "accelerate", "webdataset", "scikit-learn", "pytorch-fid", "submitit"} <= names
    assert not names & {"deepspeed", "ray", "pytest", "pydicom", "nibabel", "mlflow-skinny"}
    assert set(extras_require) == set(extras) and any(r.startswith("deepspeed==") for r in extras_require["deepspeed"])
    assert any(r.startswith("ray[tune,train]==") for r in extras_require["sweeps"])


@pytest.fixture
def venv_path(tmp_path):
    """Where the core-install test puts its venv, removed when the test ends whatever its outcome:
    with torch it holds several GB, which on a CI machine with a small /tmp left the later tests no
    room to create their folders."""
    import shutil

    venv = tmp_path / "venv"
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def test_core_install_trains_evaluates_and_detects(sim_shards, tmp_path, venv_path):
    """A fresh venv with `pip install .` and no extras (real pip, the package registry this machine
    has): a2b train, evaluate and detect run on the test preset; the sweep names its extra."""
    venv = venv_path
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    assert "torch==" in listed and not any(f"{p}==" in listed for p in ("deepspeed", "ray", "pytest", "pydicom"))
    a2b = str(venv / "bin" / "a2b")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    run = lambda *args: subprocess.run([a2b, *args], cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                       text=True, timeout=900)
    steps = run("train", "--config", str(ROOT / "configs" / "test.yaml"), f"data.root={sim_shards}",
                "train.run_dir=run", "train.steps=2", "optim.decay_steps=1", "train.sample_every=0")
    assert steps.returncode == 0, steps.stderr[-3000:]
    scored = run("evaluate", "--checkpoint", "run", "--shards", str(sim_shards / "test"), "--out", "eval")
    assert scored.returncode == 0 and (tmp_path / "eval" / "report.html").is_file(), scored.stderr[-3000:]
    # The page of this 2-step run shows metrics.json's AUROC and renders in a real browser.
    import json

    import numpy as np
    from PIL import Image

    from conftest import chromium_screenshot

    auroc = json.loads((tmp_path / "eval" / "metrics.json").read_text())["auroc"]
    assert f'id="image">{auroc:.4f}<' in (tmp_path / "eval" / "report.html").read_text()
    grey = np.asarray(Image.open(chromium_screenshot(tmp_path / "eval" / "report.html", tmp_path / "page.png"))
                      .convert("L"), dtype=np.float64)
    assert grey.std() > 20 and (grey < 200).mean() > 0.02
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((ROOT / "docs" / "masks-defaults.png").read_bytes())
    found = run("detect", "--checkpoint", "run", "--images", "images", "--out", "detect")
    assert found.returncode == 0 and (tmp_path / "detect" / "scores.csv").is_file(), found.stderr[-3000:]
    sweep = subprocess.run([str(py), str(ROOT / "sweeps" / "tune.py"), "--config", str(ROOT / "configs" / "test.yaml"),
                            "--metric", "val_auc"], env=env, capture_output=True, text=True, timeout=300)
    assert sweep.returncode == 2 and "pip install 'a2b_dist[sweeps]'" in sweep.stderr, sweep.stderr[-2000:]
