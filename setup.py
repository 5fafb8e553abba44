"""a2b_dist: A2B-GAN anomaly detection for medical images, trained on clusters.

    pip install .                     # the core: train, evaluate, detect, export, SLURM jobs
    pip install '.[deepspeed]'        # train.backend=deepspeed
    pip install '.[sweeps]'           # sweeps/tune.py (Ray Tune)
    pip install '.[medical]'          # shards/build.py dicom / nifti
    pip install '.[mlflow]'           # train.log_with=mlflow
    pip install '.[http]'             # data.root=https://... (shards on a web server)
    pip install '.[s3]'               # data.root=s3://... (and S3-compatible stores: MinIO, Ceph)
    pip install '.[gcs]'              # data.root=gs://...
    pip install '.[onnx]'             # a2b export --format onnx; a .onnx as --checkpoint (ONNX Runtime)
    pip install '.[dev]'              # all of them and pytest (make test installs requirements.txt)

Versions come from requirements.txt, the one pinned list.
"""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
EXTRAS = {"deepspeed": ["deepspeed"], "sweeps": ["ray"], "medical": ["pydicom", "nibabel"],
          "mlflow": ["mlflow-skinny"], "http": ["aiohttp"], "s3": ["s3fs"], "gcs": ["gcsfs"],
          "onnx": ["onnx", "onnxscript", "onnxruntime"],
          "dev": ["pytest", "moto"]}


def requirements() -> dict[str, str]:
    """Package name -> its pinned requirement line from requirements.txt."""
    out = {}
    for line in (HERE / "requirements.txt").read_text().splitlines():
        req = line.split("#")[0].strip()
        if req and not req.startswith("-"):
            out[req.split("==")[0].split("[")[0].lower()] = req
    return out


PINNED = requirements()
extras = {name: [PINNED[p] for p in packages] for name, packages in EXTRAS.items()}
extras["dev"] = sorted({req for reqs in extras.values() for req in reqs})
optional = {p for packages in EXTRAS.values() for p in packages}

setup(
    name="a2b_dist",
    version="0.1.0",
    description="A2B-GAN anomaly detection for medical images: shards, DDP trainer, SLURM jobs, sweeps",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["a2b_dist", "a2b_dist.*"]),
    install_requires=[req for name, req in PINNED.items() if name not in optional],
    extras_require=extras,
    entry_points={"console_scripts": ["a2b = a2b_dist.cli:main"]},
)
