"""Dense and sparse decode graphs per batch size (srt_patches/graph_variants.py) on SGLang 0.5.17's
real DecodeCudaGraphRunner methods: the capture hook records both ways under their labels with the
backend set to each way, the replay key follows the way the step chose, and everything else is
left as SGLang keys it. (Capturing a real graph needs CUDA: tests/test_serving_gpu.py serves with
--twilight-dispatch auto.)"""

from __future__ import annotations

import types

import pytest

from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

from sglang_twilight.dispatch import DispatchPolicy
from sglang_twilight.srt_patches import graph_variants as gv


class _Decoder:
    """What the hooks read of a TwilightDecoder: its policy and the way of the step."""

    def __init__(self, mode):
        self.policy = DispatchPolicy(mode, None, 8192)
        self.step_sparse = mode != "dense"
        self.capture_ways = []

    def set_capture_way(self, sparse):
        self.step_sparse = sparse
        self.capture_ways.append(sparse)


def _runner(mode="auto", lora=False):
    backend = types.SimpleNamespace(twilight=_Decoder(mode)) if mode else types.SimpleNamespace()
    return types.SimpleNamespace(attn_backend=backend, record_nolora_graph=lora)


@pytest.fixture(scope="module", autouse=True)
def hooks_applied():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_twilight import plugin

    plugin.register()
    HookRegistry.apply_hooks()


def test_capture_records_both_ways_under_their_labels():
    runner = _runner("auto")
    calls = []

    def original(self, size, forward, stream_idx, label):
        calls.append((size, stream_idx, label, self.attn_backend.twilight.step_sparse))

    gv.capture_one_shape_hook(original, runner, 8, None, None, None)
    gv.capture_one_shape_hook(original, runner, 4, None, 1, "lora")
    assert calls == [(8, None, "twilight-dense", False), (8, None, "twilight-sparse", True),
                     (4, 1, "lora+twilight-dense", False), (4, 1, "lora+twilight-sparse", True)]


@pytest.mark.parametrize("mode", ["sparse", "dense", None])
def test_capture_unchanged_for_forced_ways_and_other_backends(mode):
    runner = _runner(mode)
    calls = []
    gv.capture_one_shape_hook(lambda self, *a: calls.append(a), runner, 8, "fwd", None, None)
    assert calls == [(8, "fwd", None, None)]


def test_replay_key_follows_the_step_on_the_real_runner_method():
    """SGLang's own _resolve_lora_variant, hooked: the label is the step's way."""
    fb = types.SimpleNamespace(lora_ids=None)
    runner = _runner("auto")
    runner.attn_backend.twilight.step_sparse = True
    assert DecodeCudaGraphRunner._resolve_lora_variant(runner, fb) == "twilight-sparse"
    runner.attn_backend.twilight.step_sparse = False
    assert DecodeCudaGraphRunner._resolve_lora_variant(runner, fb) == "twilight-dense"
    lora = _runner("auto", lora=True)
    lora.attn_backend.twilight.step_sparse = True
    assert DecodeCudaGraphRunner._resolve_lora_variant(lora, fb) == "nolora+twilight-sparse"
    for mode in ("sparse", "dense", None):
        assert DecodeCudaGraphRunner._resolve_lora_variant(_runner(mode), fb) is None


def test_labels_are_distinct_shape_keys():
    from sglang.srt.model_executor.runner.shape_key import ShapeKey

    keys = {ShapeKey(8, None, gv.variant_label(base, way))
            for base in (None, "lora", "nolora") for way in (False, True)}
    assert len(keys) == 6
