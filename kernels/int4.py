"""The sidecar's buffers under this module's former name, for the modules that still import them
from here; they live in ``sglang_twilight.kernels.store``, which new code imports."""

from .store import bounds_buffers, code_buffer, scale_zero_buffers  # noqa: F401
