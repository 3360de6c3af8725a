"""Install: pip install torch==2.13.0 -e ".[dev]"  (CPU);  GPU users: see README."""
from setuptools import find_packages, setup

setup(
    name="dsv3-train",
    version="0.1.0",
    description="Train DeepSeek-V3-style MoE models and post-train them the DeepSeek-R1 way.",
    python_requires=">=3.10",
    packages=find_packages(include=["dsv3_train*", "parallel*", "launch*"]),
    install_requires=[
        # Any torch >= 2.6 works; the CPU wheel torch==2.13.0 satisfies this range, so installing
        # it first (README) keeps pip from pulling a multi-GB CUDA build.
        "torch>=2.6",
        "numpy",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "tokenizers>=0.19",
        "tqdm",
        "matplotlib",
        "wandb",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pytest-xdist", "transformers>=4.48", "safetensors",
                "hydra-submitit-launcher", "triton"],
        "slurm": ["hydra-submitit-launcher"],
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "dsv3-train=dsv3_train.train:main",
            "dsv3-plot=dsv3_train.plot:main",
            "dsv3-generate=dsv3_train.generate:main",
            "dsv3-launch=launch.cli:main",
            "dsv3-posttrain=dsv3_train.posttrain.cli:main",
        ],
    },
)
