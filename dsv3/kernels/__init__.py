"""Compute kernels: plain-PyTorch references, Triton kernels, the csrc extension, and `ops` which picks one."""
