"""Launch helpers shared by the kernel modules."""

from __future__ import annotations

import functools
import os

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    triton = None


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1): Triton block sizes."""
    return 1 << max(0, int(x) - 1).bit_length()


def interpreting() -> bool:
    """Triton's CPU interpreter is on: it has no bf16 dot, so kernels upcast their dot operands."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _pdl_device(index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t) -> bool:
    """Launch the kernels on ``t``'s device with programmatic dependent launch: on Hopper and
    newer, a kernel's programs start while the kernel before it in the stream finishes, and wait
    for it in ``_pdl_prologue``, so the launch gap between the step's kernels is hidden (inside
    a CUDA graph too). ``TWILIGHT_PDL=0`` turns it off; never in the interpreter."""
    if interpreting() or not getattr(t, "is_cuda", False) or os.environ.get("TWILIGHT_PDL") == "0":
        return False
    return _pdl_device(t.device.index if t.device.index is not None else 0)


if triton is not None:

    @triton.jit
    def _pdl_prologue(PDL: tl.constexpr):
        """First thing every kernel does when launched with ``pdl``: wait until the kernel
        before it has finished and its writes are visible (before any load *or* store, and
        before any early return, so that a kernel is never done before the one it follows),
        then let the next kernel launch. Everything a kernel reads was written by a kernel that
        has finished by then, however far back in the stream."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
