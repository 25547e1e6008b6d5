"""Store: the sidecar of every KV slot, written with the KV (int4 keys and Quest page bounds).

Stage 1 of a decode step (and of every extend): for each new token, its key quantized to int4,
and for each page it touches, the page's Quest bounds recomputed and stored as int8 codes.

Layouts (``S`` slots of the KV pool, ``H`` KV heads, ``D`` head_dim, ``P`` page size):

* ``kq`` uint8 ``[S, H, D // 2]``: int4 codes, element ``2i`` in the low nibble, ``2i + 1`` in
  the high one (``code_buffer``: head-major in memory);
* ``kscale``, ``kzero`` fp16 ``[S, H]``: ``k ~= code * scale + zero`` per (slot, head)
  (``scale_zero_buffers``: views of one interleaved buffer, read as one 32-bit word);
* ``kmax``, ``kmin`` int8 ``[S // P, H, D]`` and ``kbscale`` fp32 ``[S // P, H]``: the page
  bounds as codes, ``bound ~= code * kbscale`` (``bounds_buffers``: kmax and kmin are the two
  halves of one ``[S // P, H, 2, D]`` buffer).

Quantization is asymmetric per row of D: ``zero`` is the row min rounded *down* to fp16 and
``scale = (max - zero) / 15`` rounded *up* to fp16, so every value of the row is reachable and
comes back within ``scale / 2``. The bounds' scale is ``max |bound| / 127`` over the page's D
channels; max codes are rounded up and min codes down, so the dequantized bounds contain every
key of the page. A page is filled in order by one request (SGLang's paged allocator), so the
last token a call writes in a page recomputes the page's bounds over offsets ``0..its own``:
a reused page never keeps stale bounds, and chunked prefill works.

Plain-torch references (``*_ref``) beside the Triton kernel; ``sglang_twilight.ops`` picks one.
"""

from __future__ import annotations

import torch

from . import launch

try:  # Triton is a dependency of torch on Linux; keep the references importable without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# ----------------------------------------------------------------------------------------------
# fp16 directed rounding (shared by the reference; the kernel does the same bit steps)
# ----------------------------------------------------------------------------------------------

def _f16_step(h: torch.Tensor, down: bool) -> torch.Tensor:
    """One fp16 ulp toward -inf (down) or +inf, for finite values."""
    bits = h.view(torch.int16).to(torch.int32)
    if down:
        stepped = torch.where(h > 0, bits - 1, torch.where(h < 0, bits + 1, 0x8001 - 0x10000))
    else:
        stepped = torch.where(h > 0, bits + 1, torch.where(h < 0, bits - 1, 1))
    return stepped.to(torch.int16).view(torch.float16)


def f16_round_down(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() > x, _f16_step(h, down=True), h)


def f16_round_up(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() < x, _f16_step(h, down=False), h)


def code_buffer(num_slots: int, num_heads: int, head_dim: int, device=None):
    """Zeroed int4 codes: uint8 ``[num_slots, num_heads, head_dim // 2]``, stored head-major (a
    ``[H, S, D // 2]`` buffer viewed as ``[S, H, D // 2]``), so the candidates of one head's page
    are one contiguous run and the estimate's gathers touch fewer, fuller sectors (21.3 vs 27.1
    us at batch 8 x 32k on the H100 against slot-major). Every kernel takes strides."""
    return torch.zeros(num_heads, num_slots, head_dim // 2, dtype=torch.uint8,
                       device=device).transpose(0, 1)


def scale_zero_buffers(num_slots: int, num_heads: int, device=None):
    """Zeroed ``(kscale, kzero)``, fp16 ``[num_slots, num_heads]`` each: views of one interleaved
    head-major buffer (``[H, S, 2]`` viewed as ``[S, H, 2]``), so the estimate reads a
    candidate's scale and zero as one 32-bit word."""
    both = torch.zeros(num_heads, num_slots, 2, dtype=torch.float16, device=device)
    both = both.permute(1, 0, 2)
    return both[..., 0], both[..., 1]


def bounds_buffers(num_pages: int, H: int, D: int, device):
    """Zeroed Quest bounds of ``num_pages`` pages: ``(kmax, kmin, kbscale)``, int8 ``[pages, H,
    D]`` twice and fp32 ``[pages, H]`` (ones). kmax and kmin are views of one ``[pages, H, 2, D]``
    buffer, so a page's max and min codes of one head are one run (256 bytes at D = 128) instead
    of two runs far apart: page scores 109.8 vs 113.4 us at batch 64 x 32k on the H100, 11.9 vs
    12.1 at batch 8. Every kernel takes their strides."""
    both = torch.zeros(num_pages, H, 2, D, dtype=torch.int8, device=device)
    return (both[:, :, 0], both[:, :, 1],
            torch.ones(num_pages, H, dtype=torch.float32, device=device))


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def quantize_int4_ref(k: torch.Tensor):
    """int4 quantization of the last dimension.

    Parameters
    ----------
    k : torch.Tensor
        Keys, shape ``[..., D]`` (D even), any float dtype.

    Returns
    -------
    (packed, scale, zero) : (torch.Tensor, torch.Tensor, torch.Tensor)
        uint8 ``[..., D // 2]`` codes (element ``2i`` in the low nibble), fp16 ``[...]`` scale
        and fp16 ``[...]`` zero, ``k ~= code * scale + zero`` within ``scale / 2``.
    """
    if k.shape[-1] % 2:
        raise ValueError(f"quantize_int4: head_dim must be even, got {k.shape[-1]}")
    kf = k.float()
    zero = f16_round_down(kf.amin(-1))
    scale = f16_round_up((kf.amax(-1) - zero.float()) / 15.0)
    sf = scale.float()
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, 1.0), 0.0)
    codes = torch.floor((kf - zero.float()[..., None]) * inv[..., None] + 0.5).clamp_(0, 15)
    codes = codes.to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale, zero


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., D // 2]`` -> codes uint8 ``[..., D]`` (element 2i low nibble, 2i+1 high)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def dequantize_int4_ref(packed, scale, zero, dtype=torch.float32):
    """Inverse of ``quantize_int4_ref``: uint8 ``[..., D // 2]``, fp16 ``[...]`` twice -> ``[...,
    D]`` in ``dtype``."""
    codes = int4_codes(packed).float()
    out = codes * scale.float()[..., None] + zero.float()[..., None]
    return out.to(dtype)


def gather_heads(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Per-(request, KV head) rows of a per-slot buffer: ``buf`` ``[S, H, ...]`` and ``slots``
    int ``[R, H, C]`` -> ``[R, H, C, ...]``, row ``h`` reading head ``h``."""
    H = buf.shape[1]
    h = torch.arange(H, device=slots.device)[None, :, None]
    return buf[slots.long(), h]


def page_bounds_ref(k_buffer, pages, last_offsets, page_size):
    """Exact bounds of the given pages over offsets ``0..last_offsets``: ``k_buffer`` ``[S, H,
    D]``, ``pages`` and ``last_offsets`` int ``[n]`` -> ``(kmax, kmin)`` fp32 ``[n, H, D]``."""
    pages = pages.long()
    offs = torch.arange(page_size, device=k_buffer.device)
    slots = pages[:, None] * page_size + offs[None, :]  # [n, P]
    valid = offs[None, :] <= last_offsets.long()[:, None]
    k = k_buffer[slots.clamp_max(k_buffer.shape[0] - 1)].float()  # [n, P, H, D]
    v = valid[:, :, None, None]
    kmax = torch.where(v, k, float("-inf")).amax(1)
    kmin = torch.where(v, k, float("inf")).amin(1)
    return kmax, kmin


BOUND_CODE_MAX = 127  # Quest bounds: int8 codes in [-127, 127] times one scale a (page, head)


def quantize_bounds_ref(bmax: torch.Tensor, bmin: torch.Tensor):
    """fp32 page bounds ``[..., D]`` (max and min) -> (int8 codes of the max, int8 codes of the
    min, fp32 scale ``[...]``): s = max |bound| / 127 over the page's D channels (1 where all are
    0), max codes rounded up and min codes down, so ``codes * s`` bound every key of the page from
    outside (up to the rounding of one fp32 product). Half the bytes of bf16 bounds; the pages
    Quest picks barely move (``benchmarks/quest_bounds_precision.py``). s = max |bound| *
    fp32(1/127)."""
    amax = torch.maximum(bmax.abs(), bmin.abs()).amax(-1)
    # times the fp32 constant 1/127, not divided by 127: torch divides by a scalar as a product
    # with its reciprocal on CUDA, so only the product is the same everywhere
    inv = torch.tensor(1.0 / BOUND_CODE_MAX, dtype=torch.float32, device=amax.device)
    scale = torch.where(amax > 0, amax * inv, torch.ones_like(amax))
    hi = torch.ceil(bmax / scale[..., None]).clamp(-BOUND_CODE_MAX, BOUND_CODE_MAX)
    lo = torch.floor(bmin / scale[..., None]).clamp(-BOUND_CODE_MAX, BOUND_CODE_MAX)
    return hi.to(torch.int8), lo.to(torch.int8), scale


def dequantize_bounds_ref(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[..., D]`` and their fp32 scale ``[...]`` -> fp32 bounds ``[..., D]``."""
    return codes.float() * scale.float()[..., None]


def last_in_page(loc: torch.Tensor, page_size: int) -> torch.Tensor:
    """True where loc[i] is the last slot this call writes in its page (runs are in order)."""
    pages = loc // page_size
    last = torch.ones_like(loc, dtype=torch.bool)
    if loc.numel() > 1:
        last[:-1] = pages[1:] != pages[:-1]
    return last


def store_sidecar_ref(k_buffer, loc, kq, kscale, kzero, kmax, kmin, kbscale, page_size):
    """Write the sidecar of the slots ``loc``, in place.

    Parameters
    ----------
    k_buffer : torch.Tensor
        One layer's keys of the KV pool, ``[S, H, D]``, bf16 or fp16, already holding the new
        keys at ``loc``.
    loc : torch.Tensor
        Slots written by this call, int ``[n]``; each request's run in order (a page is filled
        in order by one request).
    kq, kscale, kzero : torch.Tensor
        int4 codes uint8 ``[S, H, D // 2]``, fp16 scale and zero ``[S, H]`` (``code_buffer``,
        ``scale_zero_buffers``); ``kq[loc]``, ``kscale[loc]``, ``kzero[loc]`` are written.
    kmax, kmin, kbscale : torch.Tensor
        Page bounds, int8 ``[S // P, H, D]`` twice and fp32 ``[S // P, H]`` (``bounds_buffers``);
        every page ``loc`` touches gets the bounds of its offsets up to the last one written.
    page_size : int
        ``P``, the KV page size (= the Quest page).
    """
    _check_bounds(kmax, kmin, kbscale)
    loc = loc.long()
    if loc.numel() == 0:
        return
    packed, scale, zero = quantize_int4_ref(k_buffer[loc])
    kq[loc] = packed
    kscale[loc] = scale
    kzero[loc] = zero
    last = last_in_page(loc, page_size)
    tail = loc[last]
    pages = tail // page_size
    hi, lo, bscale = quantize_bounds_ref(*page_bounds_ref(k_buffer, pages, tail % page_size,
                                                          page_size))
    kmax[pages] = hi
    kmin[pages] = lo
    kbscale[pages] = bscale


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _f16_bits_step(h, down: tl.constexpr):
        bits = h.to(tl.int16, bitcast=True).to(tl.int32)
        if down:
            s = tl.where(h > 0, bits - 1, tl.where(h < 0, bits + 1, 0x8001 - 0x10000))
        else:
            s = tl.where(h > 0, bits + 1, tl.where(h < 0, bits - 1, 1))
        return s.to(tl.int16).to(tl.float16, bitcast=True)

    @triton.jit
    def _store_row(
        k_ptr, loc_ptr, kq_ptr, ks_ptr, kz_ptr, kmax_ptr, kmin_ptr, kb_ptr, i, h, n,
        stride_ks, stride_kh, stride_qs, stride_qh, stride_ss, stride_sh, stride_bp, stride_bh,
        stride_bsp, stride_bsh, D: tl.constexpr, P: tl.constexpr, CODE_MAX: tl.constexpr,
    ):
        """The sidecar of new token ``i`` (slot ``loc[i]``), KV head ``h``, of one layer."""
        slot = tl.load(loc_ptr + i).to(tl.int64)
        half = tl.arange(0, D // 2)
        kbase = k_ptr + slot * stride_ks + h * stride_kh
        ke = tl.load(kbase + 2 * half).to(tl.float32)
        ko = tl.load(kbase + 2 * half + 1).to(tl.float32)
        mn = tl.minimum(tl.min(ke, 0), tl.min(ko, 0))
        mx = tl.maximum(tl.max(ke, 0), tl.max(ko, 0))
        z = mn.to(tl.float16)
        z = tl.where(z.to(tl.float32) > mn, _f16_bits_step(z, True), z)
        sc32 = (mx - z.to(tl.float32)) / 15.0
        sc = sc32.to(tl.float16)
        sc = tl.where(sc.to(tl.float32) < sc32, _f16_bits_step(sc, False), sc)
        sf = sc.to(tl.float32)
        inv = tl.where(sf > 0, tl.math.div_rn(1.0, tl.where(sf > 0, sf, 1.0)), 0.0)
        zf = z.to(tl.float32)
        ce = tl.minimum(tl.maximum(tl.floor((ke - zf) * inv + 0.5), 0.0), 15.0).to(tl.uint8)
        co = tl.minimum(tl.maximum(tl.floor((ko - zf) * inv + 0.5), 0.0), 15.0).to(tl.uint8)
        tl.store(kq_ptr + slot * stride_qs + h * stride_qh + half, ce | (co << 4))
        tl.store(ks_ptr + slot * stride_ss + h * stride_sh, sc)
        tl.store(kz_ptr + slot * stride_ss + h * stride_sh, z)
        # Quest bounds: the last slot this call writes in a page recomputes the page's bounds
        # over offsets 0..its own offset (a page is filled in order by one request).
        page = slot // P
        nxt = tl.load(loc_ptr + tl.minimum(i + 1, n - 1)).to(tl.int64)
        is_last = (i == n - 1) | ((nxt // P) != page)
        if is_last:
            off = slot % P
            offs = tl.arange(0, P)
            d = tl.arange(0, D)
            ptrs = k_ptr + (page * P + offs)[:, None] * stride_ks + h * stride_kh + d[None, :]
            valid = (offs <= off)[:, None]
            kp = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
            bmax = tl.max(tl.where(valid, kp, float("-inf")), 0)
            bmin = tl.min(tl.where(valid, kp, float("inf")), 0)
            # int8 codes and one scale (quantize_bounds_ref: the same fp32 operations, the
            # divisions IEEE-rounded, so the same codes and scale)
            amax = tl.maximum(tl.max(tl.abs(bmax), 0), tl.max(tl.abs(bmin), 0))
            bs = tl.where(amax > 0, amax * tl.full([], 1.0 / CODE_MAX, tl.float32), 1.0)
            hi = tl.minimum(tl.maximum(tl.ceil(tl.math.div_rn(bmax, bs + tl.zeros_like(bmax))),
                                       -CODE_MAX), CODE_MAX)
            lo = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(bmin, bs + tl.zeros_like(bmin))),
                                       -CODE_MAX), CODE_MAX)
            bptr = page * stride_bp + h * stride_bh + d
            tl.store(kmax_ptr + bptr, hi.to(tl.int8))
            tl.store(kmin_ptr + bptr, lo.to(tl.int8))
            tl.store(kb_ptr + page * stride_bsp + h * stride_bsh, bs)

    @triton.jit
    def _store_sidecar_kernel(
        k_ptr, loc_ptr, kq_ptr, ks_ptr, kz_ptr, kmax_ptr, kmin_ptr, kb_ptr, n,
        stride_ks, stride_kh, stride_qs, stride_qh, stride_ss, stride_sh, stride_bp, stride_bh,
        stride_bsp, stride_bsh, D: tl.constexpr, P: tl.constexpr, CODE_MAX: tl.constexpr,
    ):
        _store_row(k_ptr, loc_ptr, kq_ptr, ks_ptr, kz_ptr, kmax_ptr, kmin_ptr, kb_ptr,
                   tl.program_id(0), tl.program_id(1), n, stride_ks, stride_kh, stride_qs,
                   stride_qh, stride_ss, stride_sh, stride_bp, stride_bh, stride_bsp, stride_bsh,
                   D, P, CODE_MAX)

    @triton.jit
    def _store_sidecar_layers_kernel(
        addr_ptr, loc_ptr, n,
        stride_ks, stride_kh, stride_qs, stride_qh, stride_ss, stride_sh, stride_bp, stride_bh,
        stride_bsp, stride_bsh, K_DTYPE: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
        CODE_MAX: tl.constexpr,
    ):
        """``_store_sidecar_kernel`` for many layers: program axis 2 is the layer, whose buffers'
        addresses are row ``l`` of ``addr_ptr`` (int64 ``[L, 7]``, :class:`LayerAddresses`)."""
        row = addr_ptr + tl.program_id(2) * 7
        _store_row(tl.load(row).to(tl.pointer_type(K_DTYPE)), loc_ptr,
                   tl.load(row + 1).to(tl.pointer_type(tl.uint8)),
                   tl.load(row + 2).to(tl.pointer_type(tl.float16)),
                   tl.load(row + 3).to(tl.pointer_type(tl.float16)),
                   tl.load(row + 4).to(tl.pointer_type(tl.int8)),
                   tl.load(row + 5).to(tl.pointer_type(tl.int8)),
                   tl.load(row + 6).to(tl.pointer_type(tl.float32)),
                   tl.program_id(0), tl.program_id(1), n, stride_ks, stride_kh, stride_qs,
                   stride_qh, stride_ss, stride_sh, stride_bp, stride_bh, stride_bsp, stride_bsh,
                   D, P, CODE_MAX)


def store_sidecar_triton(k_buffer, loc, kq, kscale, kzero, kmax, kmin, kbscale, page_size):
    """``store_sidecar_ref`` as one kernel launch, grid (new tokens, KV heads); any strides with
    a contiguous last dimension."""
    n = loc.numel()
    if n == 0:
        return
    S, H, D = k_buffer.shape
    assert k_buffer.stride(2) == 1 and kq.stride(2) == 1 and kmax.stride(2) == 1
    assert kscale.stride() == kzero.stride() and kmax.stride() == kmin.stride()
    _check_bounds(kmax, kmin, kbscale)
    cfg = launch.get("store")
    _store_sidecar_kernel[(n, H)](
        k_buffer, loc, kq, kscale, kzero, kmax, kmin, kbscale, n,
        *_strides(k_buffer, kq, kscale, kmax, kbscale), D=D, P=page_size,
        CODE_MAX=float(BOUND_CODE_MAX),
        num_warps=cfg["small_head_num_warps"] if D <= 64 else cfg["num_warps"],
    )


def _strides(k_buffer, kq, kscale, kmax, kbscale) -> tuple:
    return (k_buffer.stride(0), k_buffer.stride(1), kq.stride(0), kq.stride(1), kscale.stride(0),
            kscale.stride(1), kmax.stride(0), kmax.stride(1), kbscale.stride(0),
            kbscale.stride(1))


class LayerAddresses:
    """The device addresses of several layers' K buffers and sidecars, for one launch that
    stores them all (:func:`store_sidecar_layers_triton`): int64 ``[L, 7]`` on the device, a
    row per layer (k_buffer, kq, kscale, kzero, kmax, kmin, kbscale), plus the strides they all
    share. Built once; the buffers must not move while it is used (SGLang's KV pool and the
    sidecar are allocated once; ``--enable-memory-saver`` keeps their addresses).

    ``layers``: ``(k_buffer, (kq, kscale, kzero, kmax, kmin, kbscale))`` per layer, each as
    :func:`store_sidecar_ref` takes them, all of one shape, dtype and strides."""

    def __init__(self, layers):
        layers = [(k, tuple(side)) for k, side in layers]
        if not layers:
            raise ValueError("LayerAddresses: no layers")
        k0, side0 = layers[0]
        self.strides = _strides(k0, side0[0], side0[1], side0[3], side0[5])
        self.k_dtype = k0.dtype
        self.shape = tuple(k0.shape)
        for k, side in layers:
            _check_bounds(side[3], side[4], side[5])
            if (k.dtype, tuple(k.shape)) != (self.k_dtype, self.shape) or \
                    _strides(k, side[0], side[1], side[3], side[5]) != self.strides or \
                    side[1].stride() != side[2].stride() or side[3].stride() != side[4].stride():
                raise ValueError("LayerAddresses: the layers' buffers differ in shape, dtype or "
                                 "strides")
            assert k.stride(2) == 1 and side[0].stride(2) == 1 and side[3].stride(2) == 1
        self.ptrs = self.pointers(layers)
        self.table = torch.tensor(self.ptrs, dtype=torch.int64, device=k0.device)
        self.num_layers = len(layers)

    @staticmethod
    def pointers(layers) -> tuple:
        """The addresses a table of ``layers`` holds (compare with ``.ptrs``: moved buffers)."""
        return tuple(tuple(t.data_ptr() for t in (k, *side)) for k, side in layers)


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                  torch.float32: tl.float32}


def store_sidecar_layers_ref(layers, loc, page_size):
    """:func:`store_sidecar_ref` for each of ``layers`` (``(k_buffer, (kq, ..., kbscale))``)."""
    for k_buffer, side in layers:
        store_sidecar_ref(k_buffer, loc, *side, page_size)


def store_sidecar_layers_triton(addresses: LayerAddresses, loc, page_size):
    """:func:`store_sidecar_layers_ref` as one kernel launch, grid (new tokens, KV heads,
    layers): the same rows as one :func:`store_sidecar_triton` per layer, for one launch's
    cost (a decode step that runs dense attention writes every sparse layer's sidecar so)."""
    n = loc.numel()
    if n == 0:
        return
    S, H, D = addresses.shape
    cfg = launch.get("store")
    _store_sidecar_layers_kernel[(n, H, addresses.num_layers)](
        addresses.table, loc, n, *addresses.strides, K_DTYPE=_TL_DTYPES[addresses.k_dtype],
        D=D, P=page_size, CODE_MAX=float(BOUND_CODE_MAX),
        num_warps=cfg["small_head_num_warps"] if D <= 64 else cfg["num_warps"],
    )


def _check_bounds(kmax, kmin, kbscale):
    if kmax.dtype != torch.int8 or kmin.dtype != torch.int8 or kbscale.dtype != torch.float32:
        raise TypeError(f"Quest bounds must be int8 codes with an fp32 scale (bounds_buffers), "
                        f"got {kmax.dtype}, {kmin.dtype}, {kbscale.dtype}")
