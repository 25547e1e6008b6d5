"""How many context tokens of a decode step are read by more than one of its requests, counted on
the host from SGLang 0.5.17's radix tree, for the dispatch cost model's ``distinct`` feature
(sglang_twilight/dispatch.py).

Requests that hit one cached prefix hold the same KV slots for it, so a dense decode step reads
those pages once per request, and the reads after the first come partly from L2: the step costs
less than its summed context lengths predict. The tree says which requests share what:

* after its prefill a request's prompt is in the tree and ``req.last_node`` is the node that
  ends it (``RadixCache.cache_unfinished_req``, ``mem_cache/radix_cache.py:521-553``); the
  request holds a lock on it, so it is not evicted while the request runs;
* the request's cached tokens are the keys on the path from that node up to the root
  (``TreeNode.parent`` / ``.key``, ``radix_cache.py:216-242``); a later split of a node
  (``_split_node``, ``:674-694``) inserts a new parent and shortens the old node's key, so a
  walk made at the step sees the tree as it is then.

The shared tokens of a step are the sum over its requests of their cached tokens, less the
tokens of the distinct nodes on all those paths (every node's tokens counted once). A request
without a tree node (radix cache disabled, or a prefill in progress) shares nothing.

One AFTER hook on ``ForwardBatch.init_new`` (``model_executor/forward_batch_info.py:706``; the
forward path calls it for each batch right before that batch's forward,
``managers/tp_worker.py:573``) counts them for every decode batch, but only while a backend in
the process asked for them (:func:`want`; its cost model prices shared prefixes) and the batch
has two requests or more. The graph runner hands the attention backend a view of the batch,
not the batch (``build_replay_fb_view``, ``decode_cuda_graph_runner.py:128``), so the count
travels beside it: the backend takes it with :func:`take` for a step of the same requests.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

from sglang_twilight.srt_patches import register_once
from sglang_twilight.srt_patches.request_top_p import INIT_NEW_TARGET
# the backends (TwilightDecoder) whose dispatch wants the count: any object, held weakly
_WANTED: "weakref.WeakSet[Any]" = weakref.WeakSet()
# the last decode batch's (requests, shared tokens), until a backend takes it
_pending: Optional[tuple[int, int]] = None


def shared_prefix_tokens(reqs: Iterable[Any]) -> int:
    """Tokens of the requests' cached prefixes that another of these requests also holds
    (each extra holder counts them again): sum of cached tokens less distinct cached tokens."""
    depth_of: dict[int, int] = {}  # id(node) -> tokens from the root to its end
    shared = 0
    for req in reqs:
        node = getattr(req, "last_node", None)
        chain = []
        while node is not None and getattr(node, "parent", None) is not None \
                and id(node) not in depth_of:
            chain.append(node)
            node = node.parent
        # node: the root (None parent), nothing, or a node another request reached first
        base = depth_of.get(id(node), 0) if node is not None else 0
        shared += base
        for n in reversed(chain):
            base += len(n.key)
            depth_of[id(n)] = base
    return shared


def want(backend: Any, on: bool) -> None:
    """``backend`` needs (``on``) or no longer needs the shared tokens of each decode step."""
    if on:
        _WANTED.add(backend)
    else:
        _WANTED.discard(backend)


def take(rows: int) -> int:
    """The shared tokens of the decode batch of ``rows`` requests whose forward is being
    prepared (0 if none was counted for such a batch); each count is taken once."""
    global _pending
    got, _pending = _pending, None
    return got[1] if got is not None and got[0] == rows else 0


def _init_new_hook(result: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ForwardBatch.init_new(batch, ...)``: count a decode batch's shared tokens."""
    global _pending
    if not _WANTED:
        return None
    mode = getattr(batch, "forward_mode", None)
    if mode is None or not mode.is_decode():
        return None
    reqs = getattr(batch, "reqs", None) or []
    _pending = (len(reqs), shared_prefix_tokens(reqs) if len(reqs) > 1 else 0)
    return None


def register() -> None:
    """Register the hook with SGLang's HookRegistry (once per process; ``load_plugins()``
    applies it)."""
    register_once(__name__, [(INIT_NEW_TARGET, _init_new_hook, "AFTER")])


__all__ = ["INIT_NEW_TARGET", "register", "shared_prefix_tokens", "take", "want"]
