"""Kept-token budget per layer: recorded on the device inside decode, reported every few steps.

Inside ``forward_decode`` (eager or a captured CUDA graph) the backend calls
``stats.record(layer_id, kept_counts, bs)`` once per sparse layer. That is pure tensor work
of fixed shape — no ``.item()``, no host sync: the kept counts per (request, KV head) are
bucketed into a fixed histogram per layer (exact for counts < 128, then geometric bins
2.2-2.7 % wide up to 2**21) plus an exact running sum, all in one int64 device tensor ``acc [layers, 1 + bins]``.

Outside the graph, once per real decode step, the backend calls ``stats.on_step()``. Every
``interval`` steps it starts a non-blocking copy of ``acc`` to pinned host memory and records
an event; a later ``on_step`` whose event has completed (``event.query()``, never a wait)
reads it. The stats over the last ``window`` steps are the difference of two such snapshots:
per layer the mean (exact), p50 and p99 (nearest rank; exact below 128 tokens, within one
< 3 % bin above) of the kept tokens per (request, KV head). They are logged at DEBUG on the
``sglang_twilight`` logger and, when SGLang's metrics are on (``--enable-metrics``), set as
the Prometheus gauge ``sglang_twilight_kept_tokens{tp_rank, layer, stat}`` (``stat`` in
mean / p50 / p99; ``multiprocess_mode="mostrecent"`` like SGLang's own gauges), which SGLang's
``/metrics`` endpoint serves through its multiprocess collector with no server change.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger("sglang_twilight")

GAUGE_NAME = "sglang_twilight_kept_tokens"
GAUGE_DOC = (
    "Twilight kept tokens per (request, KV head) after top-p, over the recent decode steps, "
    "per layer (stat: mean, p50, p99)"
)
STATS = ("mean", "p50", "p99")
EXACT_BELOW = 128  # one bin per count below this
BINS_PER_OCTAVE = 32  # above it: geometric bins, 2**(1/32) - 1 = 2.2 % (<= 2.7 % after rounding)
MAX_COUNT = 1 << 21  # > MAX_BUDGET_TOKENS; larger counts go to the last bin


def bin_edges(exact_below: int = EXACT_BELOW, per_octave: int = BINS_PER_OCTAVE,
              max_count: int = MAX_COUNT) -> list[int]:
    """Lower edges of the histogram bins (strictly increasing ints starting at 0); bin i
    holds counts in ``[edges[i], edges[i+1])``, the last one ``[edges[-1], inf)``."""
    edges = list(range(exact_below))
    k = 0
    while True:
        e = int(math.ceil(exact_below * 2.0 ** (k / per_octave)))
        if e > max_count:
            break
        if e > edges[-1]:
            edges.append(e)
        k += 1
    return edges


ROWS_GAUGE_NAME = "sglang_twilight_sidecar_prefill_rows"
ROWS_GAUGE_DOC = (
    "Sidecar rows (int4 key + scale/zero) written by prefill/extend batches since start, in the "
    "first sparse layer: one per new KV slot, none for slots of a cached prefix"
)

# (name, id(registry) or 0 for the default registry) -> Gauge, once per process
_GAUGES: dict[tuple[str, int], Any] = {}


def _gauge(registry: Any = None, name: str = GAUGE_NAME, doc: str = GAUGE_DOC,
           labels: tuple[str, ...] = ("tp_rank", "layer", "stat")) -> Any:
    key = (name, 0 if registry is None else id(registry))
    g = _GAUGES.get(key)
    if g is None:
        from prometheus_client import Gauge

        kw = {} if registry is None else {"registry": registry}
        g = Gauge(name, doc, labelnames=labels, multiprocess_mode="mostrecent", **kw)
        _GAUGES[key] = g
    return g


def metrics_enabled() -> bool:
    """SGLang's ``--enable-metrics`` as this process sees it: the published server args
    (scheduler and main processes), else whether ``PROMETHEUS_MULTIPROC_DIR`` is set (SGLang
    sets it before spawning when metrics are on)."""
    try:
        from sglang.srt.server_args import get_global_server_args

        sa = get_global_server_args()
        if sa is not None:
            return bool(getattr(sa, "enable_metrics", False))
    except Exception:
        pass
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class KeptStats:
    """Per-layer kept-token statistics; see the module docstring.

    ``layer_ids``: the (global) ids of the layers that record (the sparse ones).
    ``max_rows``: the largest batch (requests) a ``record`` call may pass.
    ``window``: report over the last ``window`` decode steps; ``interval``: every that many.
    ``metrics``: set the Prometheus gauge (``None``: :func:`metrics_enabled`).
    ``registry``: a prometheus_client registry (default: the global one; tests pass their own).
    """

    def __init__(self, layer_ids: Sequence[int], max_rows: int, num_kv_heads: int, device: Any,
                 window: int = 64, *, interval: int = 16, metrics: Optional[bool] = None,
                 registry: Any = None, tp_rank: int = 0):
        self.layer_ids = [int(x) for x in layer_ids]
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"duplicate layer ids {self.layer_ids}")
        if max_rows < 1 or num_kv_heads < 1 or window < 1 or interval < 1:
            raise ValueError("max_rows, num_kv_heads, window and interval must be >= 1")
        self._slot = {lid: i for i, lid in enumerate(self.layer_ids)}
        self.max_rows = int(max_rows)
        self.num_kv_heads = int(num_kv_heads)
        self.device = torch.device(device)
        self.window = int(window)
        self.interval = int(interval)
        self.tp_rank = str(tp_rank)

        edges = bin_edges()
        self.edges = edges
        self.num_bins = len(edges)
        L, n = len(self.layer_ids), self.max_rows * self.num_kv_heads
        self._edges = torch.tensor(edges, dtype=torch.int64, device=self.device)
        # acc[l, 0] = sum of kept counts, acc[l, 1:] = histogram; cumulative since reset
        self.acc = torch.zeros(L, 1 + self.num_bins, dtype=torch.int64, device=self.device)
        self._ones = torch.ones(n, dtype=torch.int64, device=self.device)
        self._row_ids = torch.arange(self.max_rows, dtype=torch.int64, device=self.device)

        self._on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(self.acc.shape, dtype=torch.int64,
                                 pin_memory=self._on_cuda)
        self._pending: Optional[tuple[int, Any]] = None  # (step, event) of the copy in flight
        self._step = 0
        self._started = False
        self._snaps: deque = deque()
        self.last: dict[int, dict[str, float]] = {}  # last report: layer -> stat -> value
        self.last_steps = 0  # steps the last report covers

        self._metrics = metrics_enabled() if metrics is None else bool(metrics)
        self._registry = registry
        self._gauge = _gauge(registry) if self._metrics else None

    # ------------------------------------------------------------------ device side
    def record(self, layer_id: int, kept_counts: torch.Tensor, bs: int,
               num_valid_rows: Optional[torch.Tensor] = None) -> None:
        """Add one layer's kept counts of this step. Device ops only, fixed shapes.

        ``kept_counts``: ``[rows >= bs, H_kv]`` (or flat ``[rows * H_kv]``), any int/float
        dtype; the first ``bs`` rows count. ``num_valid_rows``: optional device scalar — rows
        at or past it (padding of a graph batch) are not counted."""
        li = self._slot[layer_id]
        if bs > self.max_rows:
            raise ValueError(f"bs {bs} > max_rows {self.max_rows}")
        H = self.num_kv_heads
        n = bs * H
        kc = kept_counts.reshape(-1)[:n] if kept_counts.dim() == 1 else kept_counts[:bs].reshape(-1)
        kc = kc.to(torch.int64)
        bins = torch.bucketize(kc.clamp(min=0), self._edges, right=True) - 1
        if num_valid_rows is None:
            w = self._ones[:n]
        else:
            valid = self._row_ids[:bs] < num_valid_rows.reshape(-1)[:1].to(torch.int64)
            w = valid.to(torch.int64).unsqueeze(1).expand(bs, H).reshape(-1)
        row = self.acc[li]
        row[1:].index_add_(0, bins, w)
        row[:1].add_((kc * w).sum().reshape(1))

    def reset(self) -> None:
        """Zero the device accumulators (e.g. after graph capture) and the host window."""
        self.acc.zero_()
        self._pending = None
        self._snaps.clear()
        self._snaps.append((self._step, torch.zeros(self.acc.shape, dtype=torch.int64)))

    # ------------------------------------------------------------------ host side
    def on_step(self) -> Optional[dict[int, dict[str, float]]]:
        """Call once per real decode step, outside any graph (never during capture). The
        first call discards what was recorded before it (warm-up and capture runs). Returns
        the new report when one was made this call, else None. Never waits on the device."""
        if not self._started:
            self._started = True
            self.reset()
            return None
        self._step += 1
        report = None
        if self._pending is not None:
            step, event = self._pending
            if event is None or event.query():
                self._pending = None
                report = self._consume(step, self._host.clone())
        if self._pending is None and self._step % self.interval == 0:
            if self._on_cuda:
                self._host.copy_(self.acc, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._pending = (self._step, event)
            else:
                self._host.copy_(self.acc)
                report = self._consume(self._step, self._host.clone())
        return report

    def _consume(self, step: int, snap: torch.Tensor) -> dict[int, dict[str, float]]:
        snaps = self._snaps
        snaps.append((step, snap))
        # base = the newest snapshot at least `window` steps old (else the oldest one)
        while len(snaps) > 2 and snaps[1][0] <= step - self.window:
            snaps.popleft()
        base_step, base = snaps[0]
        diff = snap - base
        rows = stats_from_histogram(diff[:, 1:], diff[:, 0], self.edges)
        report = {lid: s for lid, s in zip(self.layer_ids, rows) if s is not None}
        self.last = report
        self.last_steps = step - base_step
        self._publish(report, self.last_steps)
        return report

    def _publish(self, report: dict[int, dict[str, float]], steps: int) -> None:
        if logger.isEnabledFor(logging.DEBUG) and report:
            body = "; ".join(
                f"L{lid} mean {s['mean']:.1f} p50 {s['p50']:.0f} p99 {s['p99']:.0f}"
                for lid, s in report.items()
            )
            logger.debug("twilight kept tokens per (request, KV head), last %d steps: %s",
                         steps, body)
        if self._gauge is not None:
            for lid, s in report.items():
                for stat in STATS:
                    self._gauge.labels(tp_rank=self.tp_rank, layer=str(lid), stat=stat).set(s[stat])


class PrefillRowCounter:
    """Sidecar rows written by prefill/extend batches (host-side count of new slots, exact: an
    extend's ``out_cache_loc`` length is known on the host). Published as the gauge
    ``sglang_twilight_sidecar_prefill_rows{tp_rank}`` when metrics are on, so a client can see
    that a prefix-cache hit writes rows only for the request's new tokens."""

    def __init__(self, *, metrics: Optional[bool] = None, registry: Any = None, tp_rank: int = 0):
        self.total = 0
        self.tp_rank = str(tp_rank)
        on = metrics_enabled() if metrics is None else bool(metrics)
        self._gauge = _gauge(registry, ROWS_GAUGE_NAME, ROWS_GAUGE_DOC, ("tp_rank",)) if on else None

    def add(self, n: int) -> None:
        self.total += int(n)
        if self._gauge is not None:
            self._gauge.labels(tp_rank=self.tp_rank).set(self.total)


def stats_from_histogram(hist: torch.Tensor, totals: torch.Tensor,
                         edges: Sequence[int]) -> list[Optional[dict[str, float]]]:
    """Per row of ``hist [L, bins]`` (counts over ``edges``) and its exact sum ``totals [L]``:
    ``{"mean", "p50", "p99", "count"}`` (percentiles by nearest rank; in a bin wider than 1
    interpolated linearly by rank), or ``None`` for an empty row. Vectorised (host, cheap)."""
    hist = hist.to(torch.int64).cpu()
    if hist.dim() == 1:
        hist = hist.unsqueeze(0)
    totals = torch.as_tensor(totals, dtype=torch.float64).reshape(-1).cpu()
    B = hist.shape[1]
    lo_e = torch.tensor(list(edges), dtype=torch.float64)
    hi_e = torch.cat([lo_e[1:], lo_e[-1:] * 2])
    n = hist.sum(1)
    cum = hist.cumsum(1)
    cols = {}
    for name, q in (("p50", 0.50), ("p99", 0.99)):
        rank = torch.clamp(torch.ceil(q * n.to(torch.float64)).to(torch.int64), min=1)
        idx = torch.searchsorted(cum, rank.unsqueeze(1)).squeeze(1).clamp(max=B - 1)
        c = hist.gather(1, idx.unsqueeze(1)).squeeze(1).clamp(min=1).to(torch.float64)
        before = (cum.gather(1, idx.unsqueeze(1)).squeeze(1) - hist.gather(1, idx.unsqueeze(1)).squeeze(1))
        lo, hi = lo_e[idx], hi_e[idx]
        interp = lo + (hi - lo) * (rank - before).to(torch.float64).sub(0.5) / c
        cols[name] = torch.where(hi - lo <= 1, lo, interp)
    out: list[Optional[dict[str, float]]] = []
    for i in range(hist.shape[0]):
        ni = int(n[i])
        if ni == 0:
            out.append(None)
            continue
        out.append({"mean": float(totals[i]) / ni, "p50": float(cols["p50"][i]),
                    "p99": float(cols["p99"][i]), "count": float(ni)})
    return out


__all__ = ["GAUGE_NAME", "KeptStats", "PrefillRowCounter", "ROWS_GAUGE_NAME", "bin_edges", "metrics_enabled", "stats_from_histogram"]
