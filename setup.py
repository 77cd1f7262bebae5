"""Packaging for visionpeft.

``kernels/`` is installed as ``visionpeft.kernels`` (the top-level name ``kernels`` is taken on PyPI).
"""

from setuptools import find_packages, setup

_base = find_packages(include=["visionpeft", "visionpeft.*"])
_kernels = ["visionpeft.kernels"] + [
    "visionpeft.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="visionpeft",
    version="0.1.0",
    description="Vision-first parameter-efficient fine-tuning for timm backbones and SAM",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_base + _kernels,
    package_dir={"visionpeft.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision",
        "timm>=1.0.9",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        "mlxtend>=0.23",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "peft>=0.13",
            "mlxtend>=0.23",
            "pillow",
            "ruff",
        ],
    },
    entry_points={},
)
