"""Multimodal CoCoNuT: continuous latent reasoning (Coconut) for InternVL vision-language models."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
requirements = [
    line.strip()
    for line in (ROOT / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="multimodal-coconut",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    # the library is every module at the root and every package beside it (models/), found here rather than listed
    # by hand; tools/, bench/ and tests/ are scripts run from a checkout and are not installed
    py_modules=sorted(path.stem for path in ROOT.glob("*.py") if path.stem != "setup"),
    packages=find_packages(include=["models", "models.*"]),
    install_requires=requirements,
    extras_require={
        "dev": ["pytest>=7.4", "ruff>=0.6"],
        "flash": ["flash-attn>=2.3.6"],
        "wandb": ["wandb>=0.17"],
        "tensorboard": ["tensorboard>=2.16"],
    },
)
