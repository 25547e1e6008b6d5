"""Test-session set-up shared by every test.

* No CUDA: ``TRITON_INTERPRET=1`` is set here, before any test module imports Triton, so
  the Triton kernels run (slowly) on CPU tensors through Triton's interpreter. A value the
  user already set is kept.
* Tests marked ``gpu`` are skipped without CUDA, each with the reason shown (``-rs``); they
  never pass silently.
* ``twilight_cfg``: sets the process's Twilight config for one test.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_CUDA = _cuda_available()

if not HAS_CUDA:
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        warnings.warn("triton was imported before conftest set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU_SKIP_REASON = "needs CUDA (torch.cuda.is_available() is False); run on a GPU with: pytest -m gpu"


def pytest_report_header(config):
    return (
        f"sglang-twilight: CUDA available: {HAS_CUDA}; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"
    )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def twilight_cfg(monkeypatch):
    """Set the process's Twilight config (what the launcher puts in the environment):
    ``twilight_cfg(**fields)`` -> the validated ``TwilightConfig``."""
    from sglang_twilight.config import ENV_VAR, TwilightConfig

    def set_cfg(**kw):
        cfg = TwilightConfig(**kw).validate()
        monkeypatch.setenv(ENV_VAR, json.dumps(cfg.to_dict()))
        return cfg

    return set_cfg
