"""Multimodal CoCoNuT: continuous latent reasoning (Coconut) for InternVL vision-language models."""

from pathlib import Path

from setuptools import setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="multimodal-coconut",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    py_modules=[
        "checkpoint",
        "coconut",
        "config",
        "convert",
        "curriculum",
        "dataset",
        "demo_data",
        "distributed",
        "evaluate",
        "images",
        "infer",
        "internvl",
        "models",
        "prepare_data",
        "records",
        "report",
        "run",
        "scoring",
        "trainer",
        "utils",
        "validate",
    ],
    install_requires=requirements,
    extras_require={"dev": ["pytest>=7.4", "ruff>=0.6"], "flash": ["flash-attn>=2.3.6"]},
)
