"""Triton/CUDA kernels of the Twilight decode pipeline, each beside its plain-torch reference."""
