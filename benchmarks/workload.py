"""The decode-attention workload the kernel benchmarks share: one layer of Llama-3.1-8B (32 q
heads, 8 KV heads, head_dim 128, bf16) over a paged KV pool, and how a step is timed.

Keys: ``k_t = noise_t + c_t * qhat`` with ``c_t = a * u_page(t) + b * Exp(1)``: the exponential
term gives the softmax a power-law tail, as in real decode attention (a few hundred to a few
thousand tokens of 32k carry 95% of the mass, varying by head), and the per-page term gives the
locality Quest relies on. Every q head of a group shares the direction ``qhat`` (plus noise).
Import it as ``benchmarks.workload`` (or ``workload`` with benchmarks/ on sys.path).
"""

from __future__ import annotations

import contextlib
import math

import torch

from sglang_twilight import ops
from sglang_twilight.kernels import launch, store

PAGE = 16  # KV page = Quest page
LLAMA8B = dict(H=8, G=4, D=128, dtype=torch.bfloat16)  # KV heads, q heads a KV head, head_dim


def make_inputs(bs, ctx, H, G, D, dtype, device, tail=1.3, page_locality=1.0, seed=0):
    """A batch of ``bs`` requests of ``ctx`` tokens each, pages scattered over the pool, with the
    sidecar written: a dict of q ``[bs, H * G, D]``, k and v ``[S, H, D]``, the sidecar (``side``,
    an ``ops.SidecarLayer``, and its buffers kq, ks, kz, kmax, kmin, kbs), r2t (req_to_token),
    rpi (req_pool_indices), seq (seq_lens) and slots ``[bs, ctx]``. ``tail`` scales the
    exponential term of the keys, ``page_locality`` the per-page one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    pages_per = ctx // PAGE
    total_pages = bs * pages_per + 1
    S = total_pages * PAGE
    perm = torch.randperm(total_pages - 1, generator=gen, device=device) + 1
    phys = perm.view(bs, pages_per)
    slots = (phys[:, :, None] * PAGE + torch.arange(PAGE, device=device)).reshape(bs, ctx)
    req_to_token = slots.to(torch.int32).contiguous()
    rpi = torch.arange(bs, dtype=torch.int32, device=device)
    seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=device)
    qhat = torch.randn(bs, H, 1, D, generator=gen, device=device)
    qhat = qhat / qhat.norm(dim=-1, keepdim=True)
    q = (qhat * math.sqrt(D) + 0.5 * torch.randn(bs, H, G, D, generator=gen, device=device))
    q = q.reshape(bs, H * G, D).to(dtype)
    k = torch.empty(S, H, D, dtype=dtype, device=device)
    v = torch.randn(S, H, D, generator=gen, device=device).to(dtype)
    for b in range(bs):  # per request to bound the temporary memory
        s = slots[b].long()
        noise = torch.randn(ctx, H, D, generator=gen, device=device)
        u = torch.randn(ctx // PAGE, H, generator=gen, device=device).repeat_interleave(PAGE, 0)
        c = page_locality * u + tail * torch.empty(ctx, H, device=device).exponential_(generator=gen)
        k[s] = (noise + c[..., None] * qhat[b, :, 0][None]).to(dtype)
    kq = store.code_buffer(S, H, D, device)
    ks, kz = store.scale_zero_buffers(S, H, device)
    kmax, kmin, kbs = store.bounds_buffers(total_pages, H, D, device)
    side = ops.SidecarLayer(kq, ks, kz, kmax, kmin, kbs)
    ops.store_sidecar(k, slots.reshape(-1), side, PAGE,
                      backend="triton" if device != "cpu" else "torch")
    return dict(q=q, k=k, v=v, side=side, kq=kq, ks=ks, kz=kz, kmax=kmax, kmin=kmin, kbs=kbs,
                r2t=req_to_token, rpi=rpi, seq=seq_lens, slots=slots)


def graph_ms(fn, reps=200):
    """Median ms of fn replayed in a CUDA graph (launch costs as in SGLang's graph decode)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


@contextlib.contextmanager
def row_groups(n: int):
    """A decode step's requests in ``n`` row groups from one request on, for Twilight and Quest
    alone alike, until the block ends (``n`` 0: the default plan, the launch table's
    ``decode_groups``)."""
    if not n:
        yield
        return
    with launch.override(decode_groups=dict(min_requests=1, groups=n, keep_all_groups=n)):
        yield
