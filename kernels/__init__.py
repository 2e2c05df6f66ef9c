"""Fused kernels (Triton) with plain-torch references; imported as megaevo.kernels."""
