"""`kernels.grouped_gemm` resolution: what `auto` picks, and that impossible choices fail loudly.

Runs with Triton in compiler mode (see conftest): a CPU process that cannot run Triton kernels.
GPU capabilities are simulated by patching the capability query.
"""
import pytest
import torch

from dsv3.kernels import ops
from dsv3.kernels import triton as tk

ALLOWED = "('auto', 'triton', 'torch', 'reference')"


def test_auto_picks_torch_on_cpu_and_the_fp8_emulation_for_fp8():
    assert ops.resolve_grouped_gemm_impl("auto", "cpu", torch.bfloat16) == "torch"
    assert ops.resolve_grouped_gemm_impl("auto", "cpu", torch.float32, fp8=True) == "reference"
    for impl in ("torch", "reference"):
        assert ops.resolve_grouped_gemm_impl(impl, "cpu", torch.float32) == impl


def test_unknown_names_list_the_allowed_values():
    with pytest.raises(ValueError, match=r"kernels.grouped_gemm='cutlass' is not one of \('auto', 'triton'"):
        ops.resolve_grouped_gemm_impl("cutlass", "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"with FP8 experts='torch' is not one of \('auto', 'triton', 'reference'\)"):
        ops.resolve_grouped_gemm_impl("torch", "cpu", torch.float32, fp8=True)


def test_triton_on_cpu_without_the_interpreter_is_an_error_not_a_fallback():
    with pytest.raises(ValueError, match="kernels.grouped_gemm='triton' cannot run here: device cpu is not CUDA.*"
                                         "TRITON_INTERPRET=1.*" + ALLOWED.replace("(", r"\(").replace(")", r"\)")):
        ops.resolve_grouped_gemm_impl("triton", "cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.grouped_linear(torch.randn(4, 8), torch.randn(1, 8, 8), torch.tensor([4], dtype=torch.int32))


@pytest.mark.parametrize("capability,fp8,message", [
    ((7, 5), False, "compute capability 7.5; the Triton grouped GEMMs need 8.0"),
    ((8, 6), True, "compute capability 8.6; FP8 tensor cores need 8.9"),
])
def test_triton_on_a_too_old_gpu_is_an_error(monkeypatch, capability, fp8, message):
    monkeypatch.setattr(ops, "_capability", lambda device: capability)
    with pytest.raises(ValueError, match=message):
        ops.resolve_grouped_gemm_impl("triton", "cuda", torch.bfloat16, fp8=fp8)


def test_auto_on_gpus(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_capability", lambda device: (8, 0))
    assert ops.resolve_grouped_gemm_impl("auto", "cuda", torch.bfloat16) == "triton"
    assert ops.resolve_grouped_gemm_impl("auto", "cuda", torch.float32) == "triton"  # IEEE fp32 dot products
    with pytest.raises(ValueError, match="FP8 GEMMs need 8.9"):
        ops.resolve_grouped_gemm_impl("auto", "cuda", torch.bfloat16, fp8=True)
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    assert ops.resolve_grouped_gemm_impl("auto", "cuda", torch.bfloat16, fp8=True) == "triton"
    assert not caplog.records
    monkeypatch.setattr(ops, "_capability", lambda device: (7, 5))  # Turing: no Triton grouped GEMMs
    with caplog.at_level("WARNING", logger="dsv3"):
        assert ops.resolve_grouped_gemm_impl("auto", "cuda", torch.float16) == "reference"
    assert "the Triton kernels cannot run here (cuda has compute capability 7.5" in caplog.text
    assert "'reference' loop instead" in caplog.text


def test_torch_grouped_mm_is_refused_on_cuda(monkeypatch):
    monkeypatch.setattr(ops, "_capability", lambda device: (9, 0))
    with pytest.raises(ValueError, match="'torch' cannot run on CUDA: torch._grouped_mm's weight gradient"):
        ops.resolve_grouped_gemm_impl("torch", "cuda", torch.bfloat16)
