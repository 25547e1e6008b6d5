"""Launch-size helpers shared by the kernel modules."""

from __future__ import annotations

import os


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1): Triton block sizes."""
    return 1 << max(0, int(x) - 1).bit_length()


def interpreting() -> bool:
    """Triton's CPU interpreter is on: it has no bf16 dot, so kernels upcast their dot operands."""
    return os.environ.get("TRITON_INTERPRET") == "1"
