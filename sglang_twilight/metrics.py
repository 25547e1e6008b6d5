"""Kept-token budget per layer and KV head: recorded on the device inside decode, reported on the
host every few steps.

Inside a sparse decode step (eager or a captured CUDA graph) the backend calls
``stats.stage(layer_id, kept_counts, bs)`` once per sparse layer (one copy of the layer's kept
counts per (request, KV head) into a per-step buffer) and ``stats.commit(bs, valid_rows,
seq_lens)`` once, after the last sparse layer: one batch of tensor ops over all layers, not one
per layer. That is pure tensor work of fixed shape — no ``.item()``, no host sync. It adds to one
int64 device tensor, cumulative since the last reset:

* per layer: the exact sum of kept counts, a fixed histogram of them (exact for counts < 128,
  then geometric bins 2.2-2.7 % wide up to 2**21), and the sum per KV head;
* once: the (request, step) rows counted and the sum of their context lengths.

``record(layer_id, kept_counts, bs)`` does stage + commit for one layer (tests, one-layer users).

Outside the graph, once per real decode step, the backend calls ``stats.on_step()``. Every
``interval`` steps (``$SGLANG_TWILIGHT_METRICS_INTERVAL``, default 16) it starts a non-blocking
copy of the counters to pinned host memory and records an event; a later ``on_step`` whose event
has completed (``event.query()``, never a wait) reads it. When every step since the last snapshot
went dense (``--twilight-dispatch``, counted by ``count_step``) the counters have not moved: no
copy is made and only the step counts are published, so dense-way steps pay no snapshot.
Published from each snapshot:

* over the last ``window`` steps (the difference of two snapshots), per layer: the mean (exact),
  p50 and p99 (nearest rank; exact below 128 tokens, within one < 3 % bin above) of the kept
  tokens per (request, KV head): the gauge ``sglang_twilight_kept_tokens{tp_rank, layer, stat}``
  (``stat`` in mean / p50 / p99) and a DEBUG line on the ``sglang_twilight`` logger;
* cumulative since start (gauges holding running totals, so a client takes differences over any
  interval): ``sglang_twilight_kept_tokens_sum{tp_rank, layer, kv_head}``,
  ``sglang_twilight_kept_rows{tp_rank}`` (rows counted per layer),
  ``sglang_twilight_context_tokens_sum{tp_rank}`` and
  ``sglang_twilight_decode_steps{tp_rank, path}`` (path = sparse | dense, the per-step choice of
  ``--twilight-dispatch``). :func:`read_kept` parses them from ``/metrics`` text.

Gauges use ``multiprocess_mode="mostrecent"`` like SGLang's own, so SGLang's ``/metrics`` endpoint
(``--enable-metrics``) serves them through its multiprocess collector with no server change.
"""

from __future__ import annotations

import logging
import math
import os
import re
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
INTERVAL_ENV = "SGLANG_TWILIGHT_METRICS_INTERVAL"
DEFAULT_INTERVAL = 16

SUM_GAUGE_NAME = "sglang_twilight_kept_tokens_sum"
SUM_GAUGE_DOC = ("Twilight kept tokens summed over requests and sparse decode steps since start, per "
                 "layer and KV head")
ROWS_COUNT_GAUGE_NAME = "sglang_twilight_kept_rows"
ROWS_COUNT_GAUGE_DOC = ("(request, sparse decode step) rows counted since start, the same in every "
                        "sparse layer; mean kept per (request, KV head) = kept_tokens_sum / "
                        "(kept_rows * KV heads)")
CONTEXT_GAUGE_NAME = "sglang_twilight_context_tokens_sum"
CONTEXT_GAUGE_DOC = "context length summed over the rows counted in sglang_twilight_kept_rows"
STEPS_GAUGE_NAME = "sglang_twilight_decode_steps"
STEPS_GAUGE_DOC = ("decode steps since start by path (sparse: Twilight, dense: FlashInfer), as "
                   "--twilight-dispatch chose them")
# name -> (doc, label names) of every gauge KeptStats publishes
_GAUGE_SPECS = {
    GAUGE_NAME: (GAUGE_DOC, ("tp_rank", "layer", "stat")),
    SUM_GAUGE_NAME: (SUM_GAUGE_DOC, ("tp_rank", "layer", "kv_head")),
    ROWS_COUNT_GAUGE_NAME: (ROWS_COUNT_GAUGE_DOC, ("tp_rank",)),
    CONTEXT_GAUGE_NAME: (CONTEXT_GAUGE_DOC, ("tp_rank",)),
    STEPS_GAUGE_NAME: (STEPS_GAUGE_DOC, ("tp_rank", "path")),
}


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
                 window: int = 64, *, interval: Optional[int] = None,
                 metrics: Optional[bool] = None, registry: Any = None, tp_rank: int = 0):
        if interval is None:
            interval = int(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
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
        L, H, B = len(self.layer_ids), self.num_kv_heads, len(edges)
        self._edges = torch.tensor(edges, dtype=torch.int64, device=self.device)
        # Every counter in one tensor (one copy to the host), cumulative since reset:
        # counters[l] = [sum of kept, histogram (B), sum per KV head (H)] of sparse layer l;
        # counters[L, 0] = rows counted (per layer), counters[L, 1] = their context tokens.
        self.counters = torch.zeros(L + 1, 1 + B + H, dtype=torch.int64, device=self.device)
        self.acc = self.counters[:L, :1 + B]  # [sum, histogram] per layer
        self.head_sums = self.counters[:L, 1 + B:]
        self._totals = self.counters[L, :2]
        # a step's kept counts, staged per layer: [layers, rows, KV heads]
        self.staged = torch.zeros(L, self.max_rows, H, dtype=torch.int32, device=self.device)
        self._row_ids = torch.arange(self.max_rows, dtype=torch.int64, device=self.device)
        self._bin_base = (torch.arange(L, dtype=torch.int64, device=self.device)
                          * self.counters.shape[1] + 1).view(L, 1)
        self.steps = {"sparse": 0, "dense": 0}  # host-side, real decode steps
        self._steps_at_snap = dict(self.steps)  # self.steps when the last snapshot was taken

        self._on_cuda = self.device.type == "cuda"
        self._host = torch.zeros(self.counters.shape, dtype=torch.int64,
                                 pin_memory=self._on_cuda)
        self._pending: Optional[tuple[int, Any]] = None  # (step, event) of the copy in flight
        self._step = 0
        self._started = False
        self._snaps: deque = deque()
        self.last: dict[int, dict[str, float]] = {}  # last report: layer -> stat -> value
        self.last_steps = 0  # steps the last report covers

        self._metrics = metrics_enabled() if metrics is None else bool(metrics)
        self._registry = registry
        if self._metrics:  # declared now, as before any snapshot; its series are set by _child
            _gauge(registry)
        self._children: dict[tuple, Any] = {}  # (gauge name, labels) -> its child

    # ------------------------------------------------------------------ device side
    def stage(self, layer_id: int, kept_counts: torch.Tensor, bs: int) -> None:
        """Keep one sparse layer's kept counts of this step for :meth:`commit` (one copy).
        ``kept_counts``: ``[rows >= bs, H_kv]`` (or flat ``[rows * H_kv]``), any int dtype."""
        if bs > self.max_rows:
            raise ValueError(f"bs {bs} > max_rows {self.max_rows}")
        H = self.num_kv_heads
        kc = kept_counts.reshape(-1)[:bs * H].view(bs, H) if kept_counts.dim() == 1 \
            else kept_counts[:bs]
        self.staged[self._slot[layer_id], :bs].copy_(kc)

    def commit(self, bs: int, num_valid_rows: Optional[torch.Tensor] = None,
               seq_lens: Optional[torch.Tensor] = None, layers: Optional[slice] = None) -> None:
        """Add the staged counts of this step (``layers``: a slice of the sparse layers, default
        all) to the counters. Device ops only, fixed shapes. ``num_valid_rows``: optional
        device scalar — rows at or past it (padding of a graph batch) are not counted.
        ``seq_lens``: the rows' context lengths (``[>= bs]``), summed into the context
        counter."""
        layers = layers or slice(0, len(self.layer_ids))
        kc = self.staged[layers, :bs].to(torch.int64).clamp_(min=0)  # [l, bs, H]
        if num_valid_rows is None:
            w = torch.ones(bs, dtype=torch.int64, device=self.device)
        else:
            w = (self._row_ids[:bs] < num_valid_rows.reshape(-1)[:1].to(torch.int64)).to(torch.int64)
        kw = kc * w.view(1, bs, 1)
        bins = torch.bucketize(kc, self._edges, right=True) - 1 + self._bin_base[layers].view(-1, 1, 1)
        self.counters.view(-1).index_add_(0, bins.reshape(-1),
                                          w.view(1, bs, 1).expand_as(bins).reshape(-1))
        head = kw.sum(1)  # [l, H]
        self.acc[layers, 0].add_(head.sum(1))
        self.head_sums[layers].add_(head)
        if layers.start in (0, None):  # rows and context once per step
            self._totals[0].add_(w.sum())
            if seq_lens is not None:
                self._totals[1].add_((seq_lens[:bs].to(torch.int64) * w).sum())

    def record(self, layer_id: int, kept_counts: torch.Tensor, bs: int,
               num_valid_rows: Optional[torch.Tensor] = None) -> None:
        """:meth:`stage` and :meth:`commit` of one layer (its rows counted as a step of its own
        only for the first sparse layer)."""
        self.stage(layer_id, kept_counts, bs)
        li = self._slot[layer_id]
        self.commit(bs, num_valid_rows, layers=slice(li, li + 1))

    def count_step(self, sparse: bool) -> None:
        """Host side: one real decode step went ``sparse`` (Twilight) or dense."""
        self.steps["sparse" if sparse else "dense"] += 1

    def reset(self) -> None:
        """Zero the device counters (e.g. after graph capture) and the host window."""
        self.counters.zero_()
        self._pending = None
        self._snaps.clear()
        self._snaps.append((self._step, torch.zeros(self.counters.shape, dtype=torch.int64)))

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
            dense_only = self._dense_only_since_snapshot()
            self._steps_at_snap = dict(self.steps)
            if dense_only:  # the counters have not moved: only the step counts are new
                if self._metrics:
                    self._publish_steps()
                return report
            if self._on_cuda:
                self._host.copy_(self.counters, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._pending = (self._step, event)
            else:
                self._host.copy_(self.counters)
                report = self._consume(self._step, self._host.clone())
        return report

    def _dense_only_since_snapshot(self) -> bool:
        """Every decode step counted since the last snapshot went dense: no sparse layer ran, so
        the device counters are unchanged and a snapshot would only cost host time (the
        dense-way steps of ``--twilight-dispatch auto`` are the short, host-bound ones). The
        report and the per-layer gauges then keep describing the latest sparse steps."""
        last = self._steps_at_snap
        return self.steps["sparse"] == last["sparse"] and self.steps["dense"] > last["dense"]

    def _consume(self, step: int, snap: torch.Tensor) -> dict[int, dict[str, float]]:
        snaps = self._snaps
        snaps.append((step, snap))
        # base = the newest snapshot at least `window` steps old (else the oldest one)
        while len(snaps) > 2 and snaps[1][0] <= step - self.window:
            snaps.popleft()
        base_step, base = snaps[0]
        L, B = len(self.layer_ids), self.num_bins
        diff = (snap - base)[:L]
        rows = stats_from_histogram(diff[:, 1:1 + B], diff[:, 0], self.edges)
        report = {lid: s for lid, s in zip(self.layer_ids, rows) if s is not None}
        self.last = report
        self.last_steps = step - base_step
        self.totals = {"head_sums": snap[:L, 1 + B:].clone(), "rows": int(snap[L, 0]),
                       "context_tokens": int(snap[L, 1])}
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
        if self._metrics:
            for lid, s in report.items():
                for stat in STATS:
                    self._child(GAUGE_NAME, str(lid), stat).set(s[stat])
            self._publish_totals()

    def _child(self, name: str, *labels: str) -> Any:
        """The gauge ``name``'s child for (this rank, ``labels``), looked up once: a snapshot
        sets a few hundred of them on the scheduler's thread, and prometheus_client's
        ``labels()`` lookup cost as much as the ``set()``."""
        key = (name, labels)
        child = self._children.get(key)
        if child is None:
            doc, names = _GAUGE_SPECS[name]
            child = _gauge(self._registry, name, doc, names).labels(self.tp_rank, *labels)
            self._children[key] = child
        return child

    def _publish_totals(self) -> None:
        totals = getattr(self, "totals", None)
        if totals is not None:
            sums = totals["head_sums"].tolist()
            for li, lid in enumerate(self.layer_ids):
                for h, v in enumerate(sums[li]):
                    self._child(SUM_GAUGE_NAME, str(lid), str(h)).set(v)
            self._child(ROWS_COUNT_GAUGE_NAME).set(totals["rows"])
            self._child(CONTEXT_GAUGE_NAME).set(totals["context_tokens"])
        self._publish_steps()

    def _publish_steps(self) -> None:
        for path, n in self.steps.items():
            self._child(STEPS_GAUGE_NAME, path).set(n)


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


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition (``/metrics``): ``(name, labels, value)``;
    comments, blank lines and values that are not numbers are skipped."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL_RE.findall(m.group(2) or "")), value))
    return out


def read_kept(text: str) -> dict:
    """The cumulative Twilight counters in a ``/metrics`` text (Prometheus exposition format):
    ``{"kept_sum": {(layer, kv_head): tokens}, "rows": n, "context_tokens": n,
    "steps": {"sparse": n, "dense": n}, "num_kv_heads": H}``. With tensor parallelism every rank
    counts the same rows over its own KV heads: heads are numbered rank by rank, rows, context
    and steps come from the lowest rank. :func:`mean_kept` turns two reads into a mean."""
    per_rank: dict[int, dict] = {}
    for name, labels, value in parse_prometheus(text):
        if not name.startswith("sglang_twilight_"):
            continue
        r = per_rank.setdefault(int(labels.get("tp_rank", 0)),
                                {"kept_sum": {}, "rows": 0, "context_tokens": 0, "steps": {}})
        if name == SUM_GAUGE_NAME:
            r["kept_sum"][(int(labels["layer"]), int(labels["kv_head"]))] = value
        elif name == ROWS_COUNT_GAUGE_NAME:
            r["rows"] = int(value)
        elif name == CONTEXT_GAUGE_NAME:
            r["context_tokens"] = int(value)
        elif name == STEPS_GAUGE_NAME:
            r["steps"][labels.get("path", "?")] = int(value)
    out = {"kept_sum": {}, "rows": 0, "context_tokens": 0, "steps": {"sparse": 0, "dense": 0},
           "num_kv_heads": 0}
    offset = 0
    for rank in sorted(per_rank):
        r = per_rank[rank]
        heads = sorted({h for _, h in r["kept_sum"]})
        for (layer, h), v in r["kept_sum"].items():
            out["kept_sum"][(layer, offset + heads.index(h))] = v
        offset += len(heads)
    out["num_kv_heads"] = offset
    if per_rank:
        low = per_rank[min(per_rank)]
        out["rows"], out["context_tokens"] = low["rows"], low["context_tokens"]
        out["steps"].update(low["steps"])
    return out


def mean_kept(before: dict, after: dict) -> Optional[float]:
    """Mean kept tokens per (request, KV head) between two :func:`read_kept` results, over all
    sparse layers; None when no row was counted in between."""
    rows = after["rows"] - before["rows"]
    H = after["num_kv_heads"]
    layers = {layer for layer, _ in after["kept_sum"]}
    if rows <= 0 or not H or not layers:
        return None
    total = sum(after["kept_sum"].values()) - sum(before["kept_sum"].values())
    return total / (rows * H * len(layers))


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


__all__ = ["CONTEXT_GAUGE_NAME", "GAUGE_NAME", "KeptStats", "PrefillRowCounter",
           "ROWS_COUNT_GAUGE_NAME", "ROWS_GAUGE_NAME", "STEPS_GAUGE_NAME", "SUM_GAUGE_NAME",
           "bin_edges", "mean_kept", "metrics_enabled", "parse_prometheus", "read_kept",
           "stats_from_histogram"]
