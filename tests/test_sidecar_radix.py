"""The Twilight sidecar beside SGLang's real KV pool, paged allocator and radix cache.

Runs on CPU (CI) and, unchanged, on the GPU when there is one.

Everything SGLang here is the real 0.5.17 class on CPU tensors -- ``ReqToTokenPool``,
``MHATokenToKVPool``, ``PagedTokenToKVPoolAllocator`` (its Triton allocation kernels run through
Triton's interpreter, which ``tests/conftest.py`` switches on without CUDA), ``RadixCache`` and
``Req``. The harness below drives them in the order SGLang's scheduler does (file:line in
0.5.17 named at each step), writes random K/V for exactly the slots the allocator hands out,
and calls the sidecar for those slots, as the attention backend does after ``set_kv_buffer``.

What must hold (issue 2 point 5, issue 4 point 2, DESIGN "Radix-cache awareness"):
* a request that hits a cached prefix gets the prefix's slot indices, and the sidecar rows of
  those slots are written once (by the request that computed them), never again;
* the sidecar of every slot of a sequence equals a fresh recomputation from ``k_buffer``
  (int4 rows, and Quest bounds over exactly the slots filled so far in each page);
* pages freed and handed out again carry no stale bounds or int4 rows.
"""

from __future__ import annotations

from array import array

import pytest
import torch

from sglang_twilight import ops
from sglang_twilight.kernels import store as store_k
from sglang_twilight.sidecar import POOL_ATTR, TwilightSidecarPool, attach_sidecar

from sglang.srt.managers.schedule_batch import Req, ReqKvInfo
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.sampling.sampling_params import SamplingParams

P = 16  # page size = Quest page
H = 2  # KV heads
D = 64  # head dim
LAYERS = 3  # layer 0 dense, layers 1 and 2 sparse
DENSE = 1
NUM_PAGES = 16  # allocator pages (page 0, the padding page, comes on top)
SIZE = NUM_PAGES * P
DTYPE = torch.bfloat16
# the same tests run on the GPU when there is one (real Triton kernels, CUDA KV store)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _t(values):
    return torch.tensor(values, dtype=torch.int64, device=DEV)


class Cfg:
    """The two TwilightConfig fields attach_sidecar reads."""

    page_size = P
    dense_layers = DENSE


def _require_allocator_kernels():
    """The paged allocator's alloc_extend / alloc_decode are Triton kernels: they need CUDA or
    Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)."""
    if torch.cuda.is_available():
        return
    from sglang.kernels.ops.memory.allocator import alloc_decode_kernel, alloc_extend_kernel
    from triton.runtime.interpreter import InterpretedFunction

    if not (isinstance(alloc_extend_kernel, InterpretedFunction)
            and isinstance(alloc_decode_kernel, InterpretedFunction)):
        pytest.fail("SGLang's allocator kernels were imported before TRITON_INTERPRET=1 was set; "
                    "run the suite through tests/conftest.py (pytest from the repo root)")


class Harness:
    """SGLang's real pools + radix cache, driven like the scheduler drives them."""

    def __init__(self, seed=0, backend="torch"):
        _require_allocator_kernels()
        self.g = torch.Generator().manual_seed(seed)
        self.backend = backend
        self.rtp = ReqToTokenPool(size=8, max_context_len=NUM_PAGES * P, device=DEV,
                                  enable_memory_saver=False)
        self.kv = MHATokenToKVPool(SIZE, page_size=P, dtype=DTYPE, head_num=H, head_dim=D,
                                   layer_num=LAYERS, device=DEV, enable_memory_saver=False)
        self.alloc = PagedTokenToKVPoolAllocator(SIZE, page_size=P, dtype=DTYPE, device=DEV,
                                                 kvcache=self.kv, need_sort=False)
        self.tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=self.rtp,
                                               token_to_kv_pool_allocator=self.alloc,
                                               page_size=P))
        self.side = attach_sidecar(self.kv, Cfg)
        self.k_scale = 1.0  # K values written are randn * k_scale + k_shift
        self.k_shift = 0.0
        self.nreq = 0

    # -- requests
    def new_req(self, token_ids, max_new_tokens=64):
        self.nreq += 1
        return Req(f"r{self.nreq}", "", array("q", token_ids),
                   SamplingParams(max_new_tokens=max_new_tokens))

    def slots(self, req, n=None):
        n = req.kv_committed_len if n is None else n
        return self.rtp.req_to_token[req.req_pool_idx, :n].long().clone()

    # -- KV + sidecar write, as the backend does for every layer
    def write_kv(self, loc):
        n = loc.numel()
        for lid in range(LAYERS):
            k = (torch.randn(n, H, D, generator=self.g) * self.k_scale + self.k_shift).to(DEV)
            v = torch.randn(n, H, D, generator=self.g).to(DEV)
            # FlashInferAttnBackend.forward_extend/forward_decode (flashinfer_backend.py:1288,
            # 1419): set_kv_buffer(layer, KVWriteLoc(out_cache_loc, ...), k, v, ...)
            self.kv.set_kv_buffer(None, KVWriteLoc(loc), k, v, layer_id_override=lid)
            wrote = self.side.write(lid, loc, backend=self.backend)
            assert wrote == (lid >= DENSE)

    # -- scheduler steps
    def prefill(self, req, chunk=None):
        """One extend of ``req`` (a chunk of at most ``chunk`` tokens); returns out_cache_loc."""
        if req.req_pool_idx is None:
            # Scheduler: req.init_next_round_input(tree_cache) (scheduler.py:3228) matches the
            # prefix (schedule_batch.py:1316); PrefillAdder locks the matched node.
            req.init_next_round_input(self.tree)
            self.tree.inc_lock_ref(req.last_node)
        else:
            # the chunked request continues (scheduler.py:3178): keeps its prefix_indices
            req.init_next_round_input()
        prefix = req.prefix_indices
        pl = len(prefix)
        self.matched = pl  # prefix length this extend starts from
        total = len(req.full_untruncated_fill_ids)
        end = total if chunk is None else min(total, pl + chunk)
        req.set_extend_range(pl, end)  # schedule_policy.py:844
        # alloc_for_extend (allocation.py:303): req slot, paged KV slots, req_to_token
        self.rtp.alloc([req])
        last_loc = prefix[-1:].clone().to(DEV) if pl else _t([-1])
        loc = self.alloc.alloc_extend(
            _t([pl]), torch.tensor([pl]), _t([end]), torch.tensor([end]), last_loc, end - pl,
        )
        assert loc is not None, "out of KV pages"
        self.rtp.write((req.req_pool_idx, slice(0, pl)), prefix.to(DEV, torch.int32))
        self.rtp.write((req.req_pool_idx, slice(pl, end)), loc.to(torch.int32))
        req.kv = ReqKvInfo(kv_allocated_len=end, swa_evicted_seqlen=0)
        req.kv_committed_len = end  # schedule_batch.py:2353
        self.write_kv(loc)
        if end < total:
            # Scheduler.stash_chunked_request (scheduler.py:2837)
            self.tree.cache_unfinished_req(req, chunked=True)
        else:
            req.output_ids.append(7)  # the sampled token (batch_result_processor.py:267)
            req._refresh_fill_ids()
            # batch_result_processor.py:278: maybe_cache_unfinished_req
            self.tree.cache_unfinished_req(req)
        return loc

    def decode(self, req, steps=1):
        """``steps`` decode steps: alloc_for_decode (allocation.py:539) + KV/sidecar write."""
        locs = []
        for _ in range(steps):
            n = req.kv_committed_len
            last_loc = self.rtp.req_to_token[req.req_pool_idx, n - 1:n].long()
            loc = self.alloc.alloc_decode(_t([n + 1]), torch.tensor([n + 1]), last_loc)
            assert loc is not None, "out of KV pages"
            self.rtp.write((req.req_pool_idx, n), loc.to(torch.int32))
            req.kv.kv_allocated_len += 1
            req.kv_committed_len += 1
            self.write_kv(loc)
            req.output_ids.append(8)
            locs.append(loc)
        return torch.cat(locs)

    def finish(self, req):
        """release_kv_cache (common.py:132): cache_finished_req + free the req slot."""
        self.tree.cache_finished_req(req, kv_len_to_handle=req.kv_committed_len)
        self.rtp.free(req)
        req.kv = None

    def evict_all(self):
        self.tree.evict(EvictParams(num_tokens=SIZE))

    # -- checks
    def snapshot(self, slots):
        """Copies of the sidecar rows of ``slots`` and of the bounds of their pages."""
        pages = torch.unique(slots // P)
        out = {}
        for lid in self.side.sparse_layer_ids:
            lay = self.side.layer(lid)
            out[lid] = (lay.kq[slots].clone(), lay.kscale[slots].clone(),
                        lay.kzero[slots].clone(), lay.kmax[pages].clone(),
                        lay.kmin[pages].clone(), lay.kbscale[pages].clone())
        return out

    def assert_matches_recompute(self, req):
        """Sidecar of every slot of ``req``'s sequence == recomputation from k_buffer."""
        n = req.kv_committed_len
        slots = self.slots(req, n)
        for lid in self.side.sparse_layer_ids:
            lay = self.side.layer(lid)
            kb = self.kv.get_key_buffer(lid)
            packed, scale, zero = ops.quantize_int4(kb[slots])
            assert torch.equal(lay.kq[slots], packed), f"layer {lid}: int4 rows differ"
            assert torch.equal(lay.kscale[slots], scale), f"layer {lid}: scales differ"
            assert torch.equal(lay.kzero[slots], zero), f"layer {lid}: zeros differ"
            # the int4 rows decode back within half a step of K
            back = ops.dequantize_int4(lay.kq[slots], lay.kscale[slots], lay.kzero[slots])
            err = (back - kb[slots].float()).abs()
            assert (err <= lay.kscale[slots].float()[..., None] / 2 + 1e-6).all()
            # Quest bounds: per logical page of the request, over the slots filled so far
            for p0 in range(0, n, P):
                page_slots = slots[p0:p0 + P]
                page = int(page_slots[0]) // P
                assert bool((page_slots // P == page).all()), "a logical page spans 2 pages"
                # the slots filled so far in this page are its first offsets, in order
                assert torch.equal(page_slots % P, torch.arange(len(page_slots), device=DEV))
                k = kb[page_slots].float()
                hi, lo, sc = store_k.quantize_bounds_ref(k.amax(0), k.amin(0))
                assert torch.equal(lay.kmax[page], hi), f"layer {lid} page {page}: kmax"
                assert torch.equal(lay.kmin[page], lo), f"layer {lid} page {page}: kmin"
                assert torch.equal(lay.kbscale[page], sc), f"layer {lid} page {page}: scale"


def _tokens(start, n):
    return list(range(start, start + n))


PREFIX = _tokens(1000, 48)  # 3 pages shared


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    return request.param


def test_shared_prefix_sidecar_written_once(backend):
    h = Harness(seed=1, backend=backend)
    sparse = h.side.sparse_layer_ids
    assert sparse == [1, 2]

    # request 1: 48 shared + 10 own tokens, prefilled, then 8 decode steps (crosses page 4)
    r1 = h.new_req(PREFIX + _tokens(5000, 10))
    loc1 = h.prefill(r1)
    assert loc1.numel() == 58
    h.decode(r1, 8)
    assert h.side.rows_written() == {1: 66, 2: 66}
    h.assert_matches_recompute(r1)
    prefix_slots = h.slots(r1, 48)
    before = h.snapshot(prefix_slots)

    # request 2 arrives while request 1 still runs: its prefix hits the 3 cached pages
    r2 = h.new_req(PREFIX + _tokens(7000, 20))
    loc2 = h.prefill(r2)
    assert h.matched == 48
    assert torch.equal(h.slots(r2, 48), prefix_slots), "prefix must reuse request 1's slots"
    # the allocator handed request 2 only its own 20 tokens, all on fresh pages
    assert loc2.numel() == 20
    assert not set((loc2 // P).tolist()) & set((prefix_slots // P).tolist())
    assert not set(loc2.tolist()) & set(h.slots(r1).tolist())
    # ... and exactly those rows were written: prefix rows not again
    assert h.side.rows_written() == {1: 66 + 20, 2: 66 + 20}
    h.decode(r2, 5)
    assert h.side.rows_written() == {1: 66 + 25, 2: 66 + 25}
    after = h.snapshot(prefix_slots)
    for lid in sparse:
        for a, b in zip(before[lid], after[lid]):
            assert torch.equal(a, b), "prefix sidecar rows changed"
    h.assert_matches_recompute(r2)
    h.assert_matches_recompute(r1)

    # request 1 finishes, request 3 shares the prefix with both; still no prefix rewrite
    h.finish(r1)
    r3 = h.new_req(PREFIX + _tokens(9000, 3))
    h.prefill(r3)
    assert h.matched == 48
    assert torch.equal(h.slots(r3, 48), prefix_slots)
    assert h.side.rows_written() == {1: 66 + 25 + 3, 2: 66 + 25 + 3}
    h.assert_matches_recompute(r3)
    h.assert_matches_recompute(r2)


def test_write_all_equals_a_write_per_layer(backend):
    """A dense-way decode step writes every sparse layer's sidecar in one call (one launch with
    Triton) after all layers' K are in the pool: the same rows as a write per layer."""
    h = Harness(seed=6, backend=backend)
    r1 = h.new_req(PREFIX + _tokens(5000, 10))
    h.prefill(r1)
    r2 = h.new_req(_tokens(8000, 31))
    h.prefill(r2)
    for _ in range(3):  # decode steps: K of every layer first, then the sidecars at once
        loc = []
        for r in (r1, r2):
            n = r.kv_committed_len
            last = h.rtp.req_to_token[r.req_pool_idx, n - 1:n].long()
            slot = h.alloc.alloc_decode(_t([n + 1]), torch.tensor([n + 1]), last)
            h.rtp.write((r.req_pool_idx, n), slot.to(torch.int32))
            r.kv.kv_allocated_len += 1
            r.kv_committed_len += 1
            loc.append(slot)
        loc = torch.cat(loc)
        for lid in range(LAYERS):
            k = torch.randn(loc.numel(), H, D, generator=h.g).to(DEV)
            v = torch.randn(loc.numel(), H, D, generator=h.g).to(DEV)
            h.kv.set_kv_buffer(None, KVWriteLoc(loc), k, v, layer_id_override=lid)
        before = h.side.rows_written()
        h.side.write_all(loc, backend=backend)
        assert h.side.rows_written() == {lid: n + 2 for lid, n in before.items()}
    h.assert_matches_recompute(r1)  # every slot of both requests, every sparse layer
    h.assert_matches_recompute(r2)


def test_prefix_rows_are_not_rewritten_sentinel():
    """Plant a sentinel in the prefix's sidecar rows: a request that reuses the prefix must
    leave it alone (a rewrite from k_buffer would erase it)."""
    h = Harness(seed=2)
    r1 = h.new_req(PREFIX + _tokens(5000, 10))
    h.prefill(r1)
    prefix_slots = h.slots(r1, 48)
    pages = torch.unique(prefix_slots // P)
    for lid in h.side.sparse_layer_ids:
        lay = h.side.layer(lid)
        lay.kq[prefix_slots] = 0xA5
        lay.kscale[prefix_slots] = 3.0
        lay.kzero[prefix_slots] = -3.0
        lay.kmax[pages] = 42
        lay.kmin[pages] = -42
        lay.kbscale[pages] = 0.5
    r2 = h.new_req(PREFIX + _tokens(7000, 30))
    h.prefill(r2)
    h.decode(r2, 3)
    assert torch.equal(h.slots(r2, 48), prefix_slots)
    for lid in h.side.sparse_layer_ids:
        lay = h.side.layer(lid)
        assert bool((lay.kq[prefix_slots] == 0xA5).all())
        assert bool((lay.kscale[prefix_slots] == 3.0).all())
        assert bool((lay.kzero[prefix_slots] == -3.0).all())
        assert bool((lay.kmax[pages] == 42).all())
        assert bool((lay.kmin[pages] == -42).all())
        assert bool((lay.kbscale[pages] == 0.5).all())
    # request 2's own slots are right
    own = h.slots(r2)[48:]
    for lid in h.side.sparse_layer_ids:
        lay = h.side.layer(lid)
        packed, scale, zero = ops.quantize_int4(h.kv.get_key_buffer(lid)[own])
        assert torch.equal(lay.kq[own], packed)
        assert torch.equal(lay.kscale[own], scale)


def test_freed_pages_reused_without_stale_data(backend):
    h = Harness(seed=3, backend="torch")
    # fill most of the pool with large K values, then free everything
    h.k_shift = 50.0
    old = []
    for i in range(3):
        r = h.new_req(_tokens(10000 * (i + 1), 60))
        h.prefill(r)
        h.decode(r, 4)
        old.append(r)
    old_pages = set()
    for r in old:
        old_pages |= set((h.slots(r) // P).tolist())
        h.finish(r)
    h.evict_all()
    assert h.alloc.available_size() == SIZE, "every page must be free again"

    # a new request gets (some of) those pages back; its K is small and centred at -50
    h.k_shift = -50.0
    h.backend = backend
    r = h.new_req(_tokens(90000, 37))  # 2 full pages + 5 tokens in the last page
    h.prefill(r)
    new_pages = set((h.slots(r) // P).tolist())
    assert new_pages & old_pages, "test must reuse freed pages to mean anything"
    last_page = int(h.slots(r)[-1]) // P
    assert last_page in old_pages, "the partial last page should be a reused one"
    # stale rows of old requests sit at offsets 5..15 of the last page; bounds ignore them
    h.assert_matches_recompute(r)
    for lid in h.side.sparse_layer_ids:
        lay = h.side.layer(lid)
        assert float(lay.kmax[last_page].float().max()) < 0.0, "stale (+50) values in kmax"
    # decode fills the partial page one slot at a time, crossing into a fresh page
    for _ in range(13):
        h.decode(r, 1)
        h.assert_matches_recompute(r)


def test_chunked_prefill_unaligned_chunks(backend):
    """Chunked prefill with a chunk boundary inside a page: the page's bounds cover both
    chunks' slots, and a later request reusing the inserted pages sees them."""
    h = Harness(seed=4, backend=backend)
    toks = PREFIX + _tokens(3000, 30)  # 78 tokens
    r = h.new_req(toks)
    h.prefill(r, chunk=40)  # slots 0..39: page 2 filled up to offset 7
    assert r.kv_committed_len == 40
    h.assert_matches_recompute(r)
    h.prefill(r, chunk=40)  # 40..77: continues page 2 in place
    assert h.matched == 40
    assert r.kv_committed_len == 78
    h.assert_matches_recompute(r)
    assert h.side.rows_written() == {1: 78, 2: 78}
    h.decode(r, 3)
    h.assert_matches_recompute(r)
    h.finish(r)
    r2 = h.new_req(toks[:64] + _tokens(4000, 9))
    h.prefill(r2)
    assert h.matched == 64
    assert h.side.rows_written() == {1: 81 + 9, 2: 81 + 9}
    h.assert_matches_recompute(r2)


def test_attach_reads_sglang_pool_geometry():
    kv = MHATokenToKVPool(SIZE, page_size=P, dtype=DTYPE, head_num=H, head_dim=D, layer_num=3,
                          device=DEV, enable_memory_saver=False, start_layer=2, end_layer=5)
    cfg = type("C", (), {"page_size": P, "dense_layers": 3})
    side = attach_sidecar(kv, cfg)
    assert getattr(kv, POOL_ATTR) is side
    assert attach_sidecar(kv, cfg) is side  # idempotent
    assert side.sparse_layer_ids == [3, 4]
    assert side.num_slots == kv.k_buffer[0].shape[0] == SIZE + P
    assert side.num_pages == (SIZE + P) // P
    lay = side.layer(3)
    assert lay.kq.shape == (SIZE + P, H, D // 2) and lay.kq.dtype == torch.uint8
    assert lay.kscale.shape == (SIZE + P, H) and lay.kscale.dtype == torch.float16
    assert lay.kzero.shape == (SIZE + P, H) and lay.kzero.dtype == torch.float16
    assert lay.kmax.shape == ((SIZE + P) // P, H, D) and lay.kmax.dtype == torch.int8
    assert lay.kmin.shape == lay.kmax.shape and lay.kmin.dtype == torch.int8
    assert lay.kbscale.shape == ((SIZE + P) // P, H) and lay.kbscale.dtype == torch.float32
    with pytest.raises(KeyError):
        side.layer(2)
    assert side.write(2, _t([16])) is False
    # write() reads the K of the right layer (global id 4 = local buffer 2)
    loc = torch.arange(16, 21, device=DEV)
    g = torch.Generator().manual_seed(5)
    for lid in (2, 3, 4):
        k = (torch.randn(5, H, D, generator=g) + 10 * lid).to(DEV)
        kv.set_kv_buffer(None, KVWriteLoc(loc), k, torch.zeros_like(k), layer_id_override=lid)
    assert side.write(4, loc)
    packed, scale, zero = ops.quantize_int4(kv.k_buffer[2][loc])
    assert torch.equal(side.layer(4).kq[loc], packed)
    assert torch.equal(side.layer(4).kzero[loc], zero)
    kl = kv.k_buffer[2][loc].float()
    hi, lo, sc = store_k.quantize_bounds_ref(kl.amax(0), kl.amin(0))
    assert torch.equal(side.layer(4).kmax[1], hi) and torch.equal(side.layer(4).kbscale[1], sc)
    assert side.rows_written() == {3: 0, 4: 5}
    # a page size that differs from SGLang's is refused
    kv2 = MHATokenToKVPool(SIZE, page_size=8, dtype=DTYPE, head_num=H, head_dim=D, layer_num=1,
                           device=DEV, enable_memory_saver=False)
    with pytest.raises(ValueError, match="page size"):
        attach_sidecar(kv2, Cfg)


def test_bytes_per_token_is_what_is_allocated():
    # D=128, page 16, bf16: (64 + 4 + ceil((2 * 128 + 4) / 16)) / 512 of the layer's K+V bytes
    ratio = TwilightSidecarPool.overhead_ratio(128, 16, 2)
    assert ratio == pytest.approx((68 + 17) / 512)
    assert ratio <= 0.20
    assert TwilightSidecarPool.overhead_ratio(64, 16, 2) <= 0.25
    for heads, dim, layers in [(2, 64, 2), (8, 128, 30), (3, 64, 28)]:
        side = TwilightSidecarPool(num_slots=20 * P, head_num=heads, head_dim=dim, dtype=DTYPE,
                                   sparse_layer_ids=range(2, 2 + layers), page_size=P,
                                   device="cpu")
        per_tok = TwilightSidecarPool.bytes_per_token(heads, dim, P, layers)
        assert side.nbytes() == per_tok * 20 * P
    assert TwilightSidecarPool.bytes_per_token(8, 128, 16, 0) == 0


def test_server_args_accept_twilight_backend():
    from sglang_twilight import plugin

    plugin.register()
    assert plugin.is_registered()
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path="dummy", attention_backend="twilight")
    assert args.attention_backend == "twilight"
