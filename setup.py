"""Build and install dsv3, including the `csrc/` dispatch/combine extension `dsv3._dispatch_ext`.

The extension is compiled against the torch that is already installed, so install torch first and
build without isolation (an isolated build would download its own, CUDA, torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

On a CUDA build of torch (with nvcc found) it is a CUDAExtension running on cpu and cuda tensors;
on a CPU build of torch, which cannot link CUDA extensions, a CppExtension of the same kernels
(the host launcher, an OpenMP loop). DSV3_BUILD_CUDA=0 forces the CPU-only build; =1 requires CUDA.
"""
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "dsv3 builds the C++ extension dsv3._dispatch_ext against the installed torch, but torch is not "
        "importable here. Install torch first, then build without isolation:\n"
        "    pip install torch==2.13.0 && pip install --no-build-isolation -e ."
    )


def dispatch_extension():
    """The csrc/ extension: CUDA where torch and the toolkit have it, else the host build."""
    want = os.environ.get("DSV3_BUILD_CUDA", "auto")
    if want not in ("auto", "0", "1"):
        sys.exit(f"DSV3_BUILD_CUDA={want!r} is not one of auto, 0, 1")
    torch_cuda = torch.version.cuda is not None
    if want == "1" and not (torch_cuda and CUDA_HOME):
        sys.exit(f"DSV3_BUILD_CUDA=1 but torch {torch.__version__} has CUDA {torch.version.cuda} and "
                 f"CUDA_HOME is {CUDA_HOME}: both are needed for the CUDA build")
    if want == "auto" and torch_cuda and not CUDA_HOME:
        sys.exit(f"torch {torch.__version__} is a CUDA build but no CUDA toolkit (nvcc) was found: install "
                 "it (or set CUDA_HOME), or set DSV3_BUILD_CUDA=0 for the CPU-only kernels")
    with_cuda = want != "0" and torch_cuda

    # -ffp-contract=off: no fused multiply-adds on the host, so the host kernels round exactly like
    # the plain-PyTorch twins and the tests can compare bit for bit.
    # (No -std flag: torch's headers set the standard they need; the kernels are C++17.)
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    # The rpath lets `import dsv3._dispatch_ext` find libc10/libtorch (and torch's libgomp, so both
    # share one OpenMP runtime and torch.set_num_threads governs the kernels) before torch is imported.
    link = ["-fopenmp", f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
    sources = ["csrc/dispatch_binding.cpp", "csrc/transport_binding.cpp", "csrc/launch_host.cpp"]
    if with_cuda:
        return CUDAExtension(
            "dsv3._dispatch_ext",
            sources + ["csrc/launch_cuda.cu"],
            define_macros=[("DSV3_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    return CppExtension("dsv3._dispatch_ext", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


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
        # rewards of mathematical answers (dsv3/rl/rewards.py); the extra pins the ANTLR runtime that
        # hydra-core's grammar also needs (4.9.3)
        "math-verify[antlr4_9_3]>=0.7,<1",
        # ZeRO-1/2 and CPU Adam (dsv3/parallel/zero.py); ninja builds DeepSpeed's CPU Adam op on first use
        "deepspeed>=0.19,<0.20",
        "ninja>=1.11",
    ],
    extras_require={
        # reading .parquet and saved `datasets` directories (pyarrow), .zst files (zstandard) in prepare_data
        "data": ["pyarrow>=14", "zstandard>=0.22"],
        # triton: the kernels are tested compiled with 3.6 (on an H200) and interpreted with 3.6 and 3.9;
        # 3.6's interpreter needs numpy < 2.4 (see docs/gpu.md).
        # datasets: the tests write real `save_to_disk` directories for prepare_data to read
        # trl: its GRPOTrainer's loss is the reference of ours (tests/rl/test_grpo_loss.py, tested with 1.16)
        # wandb: the tests run logging.wandb=true in offline mode
        "test": ["pytest>=8", "transformers>=4.57", "triton>=3.6", "matplotlib>=3.7", "pyarrow>=14",
                 "zstandard>=0.22", "datasets>=2.14", "trl>=1.16,<2", "wandb>=0.17"],
        "bench": ["transformers>=4.57", "matplotlib>=3.7"],
        "plot": ["matplotlib>=3.7"],  # launch/plot.py
        "wandb": ["wandb>=0.17"],  # logging.wandb=true
    },
    ext_modules=[dispatch_extension()],
    cmdclass={"build_ext": BuildExtension},
)
