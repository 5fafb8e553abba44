"""a2b_dist: A2B-GAN anomaly detection for medical images, trained on clusters."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip() and not ln.startswith("-")]


setup(
    name="a2b_dist",
    version="0.1.0",
    description="A2B-GAN anomaly detection for medical images: shards, DDP trainer, SLURM jobs, sweeps",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["a2b_dist", "a2b_dist.*"]),
    install_requires=requirements(),
    entry_points={"console_scripts": ["a2b = a2b_dist.cli:main"]},
)
