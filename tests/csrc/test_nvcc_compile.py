"""The CUDA side of csrc/ (the dispatch/combine kernels and the EP transport's) compiles, without torch
and without a GPU, for the GPUs we target (A100 sm_80, L40/4090 sm_89, H100 sm_90a), and ptxas reports
no register spills for any kernel.

A spill means local-memory traffic in what should be a bandwidth-bound copy/reduce loop. (A small
stack frame is expected: the device-side bad-index report passes printf arguments through it.)
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCHS = {"sm_80": "compute_80", "sm_89": "compute_89", "sm_90a": "compute_90a"}
# One kernel per body type in DSV3_FOR_EACH_KERNEL (dispatch_kernels.cuh) and
# DSV3_FOR_EACH_TRANSPORT_KERNEL (transport_kernels.cuh).
BODIES = ["LayoutCount", "LayoutScan", "LayoutOffsets", "LayoutWrite", "InvertIndex", "GatherCopy",
          "GatherScaled", "GatherFp8", "Combine", "CombineWeightGrad", "RowAddresses", "Signal", "WaitFlags"]
N_KERNELS = 40 + 29  # dispatch: 5 untyped + 5 GatherCopy units + 3 input dtypes x (3 + 3 + 3 + 1);
#                      transport: 3 untyped + 5 GatherCopy units + 3 input dtypes x (3 + 3 + 1), over AddressedRows


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit) on PATH")
def test_cuda_kernels_compile_for_sm80_sm89_sm90a_without_spills(tmp_path):
    gencode = [f"-gencode=arch={virt},code={real}" for real, virt in ARCHS.items()]
    cmd = ["nvcc", "-std=c++17", "-O3", "-c", str(CSRC / "launch_cuda.cu"), "-o", str(tmp_path / "k.o"),
           "-Xptxas", "-v", *gencode]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"

    # ptxas -v prints, per kernel and architecture: "Compiling entry function 'NAME' for 'sm_XX'",
    # then "N bytes stack frame, S bytes spill stores, L bytes spill loads".
    per_arch: dict[str, dict[str, tuple[int, int]]] = {arch: {} for arch in ARCHS}
    current = None
    for line in done.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line):
            current = (m.group(2), m.group(1))
        elif (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and current:
            per_arch[current[0]][current[1]] = (int(m.group(1)), int(m.group(2)))
            current = None
    for arch, kernels in per_arch.items():
        assert len(kernels) == N_KERNELS, f"{arch}: expected {N_KERNELS} kernels, ptxas reported {len(kernels)}"
        for body in BODIES:  # as it appears in an Itanium-mangled name: length-prefixed
            pattern = rf"(?<!\d){len(body)}{body}[IE]"
            assert any(re.search(pattern, name) for name in kernels), f"{arch}: no kernel for {body}"
        # The row kernels that write straight into peers' buffers (the EP transport) are there too.
        for body in ["GatherCopy", "GatherScaled", "GatherFp8", "Combine"]:
            assert any(re.search(rf"(?<!\d){len(body)}{body}I.*13AddressedRows", name) for name in kernels), \
                f"{arch}: no {body} over AddressedRows"
        spilling = {name: s for name, s in kernels.items() if s != (0, 0)}
        assert not spilling, f"{arch}: kernels spill registers (stores, loads): {spilling}"
