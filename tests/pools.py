"""Random paged KV layouts for kernel tests: shuffled physical pages, ragged lengths, real sidecar."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_twilight import ops
from sglang_twilight.kernels import store as store_k


@dataclass
class Layout:
    q: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    kq: torch.Tensor
    kscale: torch.Tensor
    kzero: torch.Tensor
    kmax: torch.Tensor
    kmin: torch.Tensor
    kbscale: torch.Tensor
    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    page_size: int

    @property
    def sidecar(self) -> ops.SidecarLayer:
        return ops.SidecarLayer(self.kq, self.kscale, self.kzero, self.kmax, self.kmin,
                                self.kbscale)

    def dense(self, sm_scale):
        """fp32 dense decode attention over every token of every request."""
        R, Hq, D = self.q.shape
        H = self.k_buffer.shape[1]
        out = torch.empty(R, Hq, D, dtype=torch.float32, device=self.q.device)
        for r in range(R):
            n = int(self.seq_lens[r])
            slots = self.req_to_token[self.req_pool_indices[r], :n].long()
            k = self.k_buffer[slots].float().repeat_interleave(Hq // H, dim=1)  # [n, Hq, D]
            v = self.v_buffer[slots].float().repeat_interleave(Hq // H, dim=1)
            s = torch.einsum("hd,nhd->hn", self.q[r].float(), k) * sm_scale
            out[r] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
        return out


def make_layout(seq_lens, num_kv_heads, group, head_dim, *, page_size=16, dtype=torch.bfloat16,
                device="cpu", peaked=0.0, seed=None, backend="torch") -> Layout:
    """Requests with the given lengths on shuffled physical pages (page 0 kept as padding).

    ``peaked`` > 0 plants a few keys aligned with the query so attention is realistically peaked.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.randint(0, 2**31, ()).item() if seed is None else seed)
    R = len(seq_lens)
    H, G, D, P = num_kv_heads, group, head_dim, page_size
    pages_per = [-(-int(n) // P) for n in seq_lens]
    total_pages = sum(pages_per) + 3
    perm = torch.randperm(total_pages - 1, generator=g) + 1  # physical page 0 never used
    max_ctx = max(pages_per) * P + P
    pool_rows = R + 2
    req_to_token = torch.zeros(pool_rows, max_ctx, dtype=torch.int32)
    rpi = torch.randperm(pool_rows, generator=g)[:R].to(torch.int32)
    at = 0
    for r, n in enumerate(seq_lens):
        phys = perm[at: at + pages_per[r]]
        at += pages_per[r]
        slots = (phys[:, None] * P + torch.arange(P)[None, :]).reshape(-1)[: int(n)]
        req_to_token[rpi[r], : int(n)] = slots.to(torch.int32)
    S = total_pages * P
    k = torch.randn(S, H, D, generator=g)
    v = torch.randn(S, H, D, generator=g)
    q = torch.randn(R, H * G, D, generator=g)
    if peaked:
        # a few "needle" keys per request and head that the whole group's queries point at
        base = q.view(R, H, G, D)[:, :, :1]
        q = (base + 0.3 * q.view(R, H, G, D)).reshape(R, H * G, D)
        for r, n in enumerate(seq_lens):
            n = int(n)
            for h in range(H):
                idx = torch.randint(0, n, (max(1, n // 64),), generator=g)
                slots = req_to_token[rpi[r], idx].long()
                k[slots, h] += peaked * q[r, h * G].unsqueeze(0) / q[r, h * G].norm()
    lay_dev = dict(device=device)
    k_buffer = k.to(dtype).to(**lay_dev)
    v_buffer = v.to(dtype).to(**lay_dev)
    kq = store_k.code_buffer(S, H, D, device)
    ks, kz = store_k.scale_zero_buffers(S, H, device)
    kmax, kmin, kbs = store_k.bounds_buffers(total_pages, H, D, device)
    lay = Layout(q.to(dtype).to(**lay_dev), k_buffer, v_buffer, kq, ks, kz, kmax, kmin, kbs,
                 req_to_token.to(**lay_dev), rpi.to(**lay_dev),
                 torch.tensor(list(seq_lens), dtype=torch.int32, device=device), P)
    for r, n in enumerate(seq_lens):  # prefill each request as one extend
        loc = lay.req_to_token[rpi[r], : int(n)].to(torch.int64)
        ops.store_sidecar(k_buffer, loc, ops.SidecarLayer(kq, ks, kz, kmax, kmin, kbs), P,
                          backend=backend)
    return lay
