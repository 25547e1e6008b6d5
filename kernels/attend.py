"""Stage 8: exact decode attention over the kept slots of each (request, KV head).

The Triton kernel is a split-K flash-decoding kernel that reads its row lengths (kept counts) and
indices from device memory and splits each row evenly over a fixed number of programs, so its
launch shape depends only on (R, H) - it is safe to capture in a CUDA graph, unlike a FlashInfer
plan() whose work partition is made on the host from host-side lengths.
"""

from __future__ import annotations

import torch

from ._launch import interpreting, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from .topp import gather_heads


def sparse_decode_attention_ref(q, k_buffer, v_buffer, kept_slots, kept_counts, sm_scale):
    R, Hq, D = q.shape
    H = k_buffer.shape[1]
    G = Hq // H
    k = gather_heads(k_buffer, kept_slots).float()  # [R, H, C, D]
    v = gather_heads(v_buffer, kept_slots).float()
    s = torch.einsum("rhgd,rhcd->rhgc", q.float().view(R, H, G, D), k) * sm_scale
    C = kept_slots.shape[-1]
    valid = torch.arange(C, device=q.device)[None, None, :] < kept_counts.long()[:, :, None]
    s = torch.where(valid[:, :, None, :], s, float("-inf"))
    o = torch.einsum("rhgc,rhcd->rhgd", torch.softmax(s, -1), v)
    return o.reshape(R, Hq, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _attend_split_kernel(
        q_ptr, k_ptr, v_ptr, kept_ptr, count_ptr, mid_o_ptr, mid_lse_ptr, sm_scale,
        stride_qr, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_cr, stride_ch,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        rh = tl.program_id(0)
        sp = tl.program_id(1)
        r = rh // H
        h = rh % H
        count = tl.load(count_ptr + r * H + h)
        chunk = tl.cdiv(tl.cdiv(count, SPLITS), BLOCK_N) * BLOCK_N
        start = sp * chunk
        end = tl.minimum(start + chunk, count)
        g = tl.arange(0, G_PAD)
        gm = g < G
        d = tl.arange(0, D)
        mid = (rh * SPLITS + sp) * G  # G rows per (row, split): the dot's padding is not kept
        if start >= end:
            tl.store(mid_lse_ptr + mid + g, tl.full([G_PAD], float("-inf"), tl.float32), mask=gm)
            return
        q = tl.load(q_ptr + r * stride_qr + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=gm[:, None], other=0.0)
        if DOT_F32:  # the CPU interpreter has no bf16 dot
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < end
            slot = tl.load(kept_ptr + r * stride_cr + h * stride_ch + n, mask=nm, other=0).to(tl.int64)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :],
                        mask=nm[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale
            s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            pexp = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pexp, 1)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + h * stride_vh + d[None, :],
                        mask=nm[:, None], other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pexp.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        tl.store(mid_o_ptr + (mid + g)[:, None] * D + d[None, :], acc / l_i[:, None],
                 mask=gm[:, None])
        tl.store(mid_lse_ptr + mid + g, m_i + tl.log(l_i), mask=gm)

    @triton.jit
    def _attend_reduce_kernel(
        mid_o_ptr, mid_lse_ptr, o_ptr, stride_or, stride_oh,
        H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        rh = tl.program_id(0)
        g = tl.program_id(1)
        r = rh // H
        h = rh % H
        d = tl.arange(0, D)
        sp = tl.arange(0, SPLITS)
        lse = tl.load(mid_lse_ptr + (rh * SPLITS + sp) * G + g)
        m = tl.max(lse, 0)
        wgt = tl.exp(lse - m)  # empty splits: exp(-inf) = 0
        o = tl.load(mid_o_ptr + ((rh * SPLITS + sp) * G + g)[:, None] * D + d[None, :],
                    mask=(lse > float("-inf"))[:, None], other=0.0)
        out = tl.sum(o * wgt[:, None], 0) / tl.sum(wgt, 0)
        tl.store(o_ptr + r * stride_or + (h * G + g) * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def attend_splits(num_rows: int, num_sms: int = 132, keep_all: bool = False) -> int:
    """Splits per row: enough programs to fill the GPU ATTEND_CONFIG["waves"] times (gathers
    need many loads in flight), at most 16 (a power of two). ``keep_all``: every candidate is
    attended (Quest alone, known on the host), so rows are long and the fewest splits win: at
    most ``waves_keep_all`` GPU fills, rounded down to a power of two."""
    if keep_all:
        fit = max(1, ATTEND_CONFIG["waves_keep_all"] * num_sms // max(num_rows, 1))
        return min(16, 1 << (fit.bit_length() - 1))
    want = max(1, -(-ATTEND_CONFIG["waves"] * num_sms // max(num_rows, 1)))
    return min(16, next_pow2(want))


# launch shape of the attend split kernel (tuned on the H100 by benchmarks/tune_kernels.py);
# BLOCK_N 0: 64 for head_dim >= 128, else 128. waves 32 gives 16 splits up to 264 (request, KV
# head) rows and 8 up to 528: at 32k, 16 splits were the fastest or within 0.4 us of it at
# every batch 8-64 (batch 64: 60.3 vs 70.2 us with the 2 splits of waves 4). Quest alone keeps
# every candidate: over its B0-long rows the fewest splits that fill the GPU 4 times were the
# fastest at every batch (8, 4, 2, 1 at batch 8, 16, 32, 64; 728.7 vs 738.6 us with 2 at 64)
ATTEND_CONFIG = dict(waves=32, waves_keep_all=4, BLOCK_N=0, num_warps=4, num_stages=2)


def sparse_decode_attention_triton(q, k_buffer, v_buffer, kept_slots, kept_counts, sm_scale,
                                   out=None, splits=None, mid_o=None, mid_lse=None):
    R, Hq, D = q.shape
    H = k_buffer.shape[1]
    G = Hq // H
    G_PAD = max(16, next_pow2(G))
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = attend_splits(R * H, sms)
    if out is None:
        out = torch.empty_like(q)
    if mid_o is None:
        mid_o = torch.empty(R * H * splits * G, D, dtype=torch.float32, device=q.device)
    if mid_lse is None:
        mid_lse = torch.empty(R * H * splits * G, dtype=torch.float32, device=q.device)
    cfg = ATTEND_CONFIG
    BLOCK_N = cfg["BLOCK_N"] or (64 if D >= 128 else 128)
    _attend_split_kernel[(R * H, splits)](
        q, k_buffer, v_buffer, kept_slots, kept_counts, mid_o, mid_lse, float(sm_scale),
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0),
        v_buffer.stride(1), kept_slots.stride(0), kept_slots.stride(1),
        H=H, G=G, G_PAD=G_PAD, D=D, SPLITS=splits, BLOCK_N=BLOCK_N,
        DOT_F32=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _attend_reduce_kernel[(R * H, G)](
        mid_o, mid_lse, out, out.stride(0), out.stride(1),
        H=H, G=G, G_PAD=G_PAD, D=D, SPLITS=splits, num_warps=2 if D <= 64 else 4,
    )
    return out
