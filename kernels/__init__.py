"""Fused Triton kernels with plain-torch references. Knows nothing of `engine`."""
