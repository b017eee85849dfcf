"""Build and install dsv3.

The `csrc/` dispatch/combine extension is added here once it exists (expert-parallel issue): on a
CUDA build of torch as a CUDAExtension, on a CPU build as a CppExtension of the same sources.
"""
from setuptools import find_packages, setup

setup(
    name="dsv3",
    version="0.1.0",
    description="DeepSeek-V3 / R1 training recipe, from one RTX card to a cluster",
    packages=find_packages(include=["dsv3", "dsv3.*"]),
    package_data={"dsv3": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        # A range, never a pin: torch 2.13.0 (the CPU build on our machines) must satisfy it.
        "torch>=2.6,<2.15",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "numpy>=1.24",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=4.57", "triton>=3.2"],
        "bench": ["transformers>=4.57", "matplotlib>=3.7"],
    },
)
