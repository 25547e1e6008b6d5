"""A decode step's shared prefix tokens, counted on the host from SGLang's real radix tree
(srt_patches/shared_prefix.py), against the truth of the KV slots themselves: a token is read
more than once by the step when several of its requests hold its slot in ``req_to_token``.

SGLang's real ``RadixCache``, pools and ``Req`` on CPU tensors, driven as the scheduler drives
them (tests/test_sidecar_radix.py's harness)."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from sglang_twilight.srt_patches import shared_prefix as sp
from tests.test_sidecar_radix import PREFIX, Harness, _tokens

from sglang.srt.mem_cache.radix_cache import TreeNode
from sglang.srt.model_executor.forward_batch_info import ForwardMode


def _slot_truth(h, reqs):
    """Sum of the requests' context lengths less their distinct KV slots."""
    slots = [h.slots(r) for r in reqs]
    return sum(len(s) for s in slots) - len(set(torch.cat(slots).tolist()))


@pytest.fixture
def running():
    """Four requests decoding at once: r1 = the 3-page prefix + 20 own tokens; r2 = r1's first
    4 pages + 5 own; r3 = the prefix + 10 own; r4 = nothing in common. r3's arrival splits
    the tree node r1 and r2 end in."""
    h = Harness(seed=5)
    own1 = _tokens(5000, 20)
    r1 = h.new_req(PREFIX + own1)
    h.prefill(r1)
    h.decode(r1, 3)
    r2 = h.new_req(PREFIX + own1[:16] + _tokens(6000, 5))
    h.prefill(r2)
    assert h.matched == 64
    r3 = h.new_req(PREFIX + _tokens(7000, 10))
    h.prefill(r3)
    assert h.matched == 48
    r4 = h.new_req(_tokens(9000, 20))
    h.prefill(r4)
    assert h.matched == 0
    for r in (r1, r2, r3, r4):
        h.decode(r, 2)
    return h, [r1, r2, r3, r4]


def test_shared_tokens_equal_the_slots_read_more_than_once(running):
    h, reqs = running
    # the prefix (48) is read by r1, r2, r3; r1's fourth page (16) also by r2
    assert sp.shared_prefix_tokens(reqs) == 2 * 48 + 16 == _slot_truth(h, reqs)
    for n in (1, 2, 3):
        for sub in itertools.permutations(reqs, n):
            assert sp.shared_prefix_tokens(sub) == _slot_truth(h, sub), [r.rid for r in sub]


def test_shared_tokens_after_a_request_finishes_and_without_a_tree(running):
    h, (r1, r2, r3, r4) = running
    h.finish(r1)  # its nodes stay cached; r2 and r3 still share the prefix
    assert sp.shared_prefix_tokens([r2, r3, r4]) == 48 == _slot_truth(h, [r2, r3, r4])
    # requests that were never in a tree (radix cache disabled) share nothing
    bare = [types.SimpleNamespace(last_node=None), types.SimpleNamespace()]
    assert sp.shared_prefix_tokens(bare + [r2]) == 0


def _chain(*lens):
    """A path of real TreeNodes under a root, keys of these lengths; returns its last node."""
    node = TreeNode()
    for n in lens:
        child = TreeNode()
        child.parent, child.key = node, list(range(n))
        node = child
    return node


def test_hook_counts_decode_batches_only_while_wanted():
    leaf = _chain(300, 20)
    other = TreeNode()
    other.parent, other.key = leaf.parent, list(range(7))  # 300 shared, own 7
    reqs = [types.SimpleNamespace(last_node=leaf), types.SimpleNamespace(last_node=other)]
    decode = types.SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=reqs)
    extend = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=reqs)
    class Backend:  # what wants the counts; held weakly
        pass

    owner = Backend()
    sp.take(0)
    sp._init_new_hook(None, None, decode)
    assert sp.take(2) == 0  # nobody wants it: not counted
    sp.want(owner, True)
    try:
        sp._init_new_hook(None, None, extend)
        assert sp.take(2) == 0  # prefill batches are not decode steps
        sp._init_new_hook(None, None, decode)
        assert sp.take(3) == 0  # another batch's count is not this step's
        sp._init_new_hook(None, None, decode)
        assert sp.take(2) == 300
        assert sp.take(2) == 0  # taken once
    finally:
        sp.want(owner, False)
    sp._init_new_hook(None, None, decode)
    assert sp.take(2) == 0


def test_plugin_registers_the_hook_once():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_twilight import plugin

    for _ in range(3):
        plugin.register()
    hooks = [h for _, h, _ in HookRegistry._hooks.get(sp.INIT_NEW_TARGET, [])]
    assert hooks.count(sp._init_new_hook) == 1
