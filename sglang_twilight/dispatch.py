"""Dense or sparse, per decode step: the cost model behind ``--twilight-dispatch auto``.

A Twilight step pays a fixed chain of small kernels per sparse layer (select, estimate, top-p,
union, attend) whatever the context; FlashInfer's dense decode pays for every KV byte. So short
contexts and small batches are faster dense, long contexts sparse. Before every decode step the
backend asks :meth:`DispatchPolicy.sparse_step` on the host, from the step's context lengths
(SGLang's ``seq_lens_cpu``, known before a CUDA-graph replay), and the step runs one way or the
other for all its sparse layers. Under CUDA graphs both ways are captured for every batch size
(``srt_patches/graph_variants.py``) and the replay picks one, so the choice costs no sync.

The model (:class:`StepCostModel`) predicts the whole decode step's time, in ms, of each way
as a linear function of five features of the step (:func:`step_features`):

============  ==================================================================================
``one``       1 (per-step constant: weights, launches, the layers' latency chains)
``rows``      requests in the step (the graph's padded batch)
``tokens``    sum of context lengths (dense: K and V read; sparse: the Quest page bounds,
              one page per ``page_size`` tokens, read by the select)
``cands``     sum of min(context, B0 capacity) (sparse: int4 keys read by the estimate)
``distinct``  ``tokens`` counted once: less the tokens of a cached prefix that another request
              of the step also reads (``srt_patches/shared_prefix.py`` counts them on the host
              from the radix tree). Requests on one long prefix read the same KV pages, and a
              page read again comes partly from L2: such a dense step costs less than its
              ``tokens`` predict.
============  ==================================================================================

Its coefficients are fitted by ``benchmarks/bench_decode_step.py --fit`` from step times measured
in one process for both ways at a grid of (batch, context), and stored in
``dispatch_profiles.json`` beside this module, keyed by GPU and attention geometry (KV heads,
GQA group, head dim, layers, B0, max budget). ``distinct`` is fitted only from a grid with
shared-prefix cells (``--shared-cells``); without them (and in a profile written before the
feature existed) its coefficients are 0, and a shared prefix costs what its ``tokens`` say.
A step goes sparse when the model predicts it at least ``margin`` (relative) faster than dense.
A model whose exact geometry was not measured uses the closest profile of the same GPU and
attention shape (KV heads, GQA group, head dim; logged at start-up). With none, ``auto``
decodes every step densely: a step time never measured on this GPU cannot be promised to be no
slower than dense (on a small model a sparse step's fixed chain of kernels can cost more than
the whole dense attention), so Twilight waits for a profile; the start-up log names the command
that measures one, and ``--twilight-dispatch sparse`` runs Twilight regardless. Both ways are
still captured, so ``bench_decode_step.py`` can time them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence

logger = logging.getLogger(__name__)

FEATURES = ("one", "rows", "tokens", "cands", "distinct")
PROFILES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_profiles.json")
#: a JSON file of profiles to use instead of the shipped ones (same format)
PROFILES_ENV = "SGLANG_TWILIGHT_DISPATCH_PROFILES"
DEFAULT_MARGIN = 0.03


def step_features(seq_lens: Sequence[int] | Any, capacity: int, rows: Optional[int] = None,
                  tokens: Optional[int] = None, shared: int = 0) -> list[float]:
    """The features of a decode step (:data:`FEATURES`, see the module docstring).

    ``seq_lens``: the context length of every row of the step (a CPU tensor, a list, or None);
    without them, ``rows`` and ``tokens`` (their sum) stand in, each row then taken to hold
    ``tokens / rows`` tokens. ``shared``: tokens the step reads more than once (a cached prefix
    of several of its requests, counted once per extra reader); ``distinct`` is ``tokens``
    less them."""
    if seq_lens is not None:
        try:
            import torch

            if isinstance(seq_lens, torch.Tensor):
                # host side, before every decode step: 8 us for 64 rows where torch took 19
                import numpy as np

                a = (seq_lens if seq_lens.device.type == "cpu" else seq_lens.cpu()).numpy()
                total = float(a.sum(dtype=np.int64))
                return [1.0, float(a.size), total,
                        float(np.minimum(a, capacity).sum(dtype=np.int64)),
                        max(0.0, total - shared)]
        except ImportError:  # pragma: no cover
            pass
        lens = [int(x) for x in seq_lens]
        total = float(sum(lens))
        return [1.0, float(len(lens)), total, float(sum(min(x, capacity) for x in lens)),
                max(0.0, total - shared)]
    if rows is None or tokens is None:
        raise ValueError("step_features needs seq_lens, or rows and tokens")
    rows = max(1, int(rows))
    return [1.0, float(rows), float(tokens), float(rows * min(tokens / rows, capacity)),
            max(0.0, float(tokens) - shared)]


@dataclass(frozen=True)
class StepCostModel:
    """Decode-step time (ms) of each way, linear in :data:`FEATURES`; one per GPU and geometry."""

    card: str
    num_kv_heads: int
    group: int
    head_dim: int
    num_layers: int
    num_sparse_layers: int
    capacity: int
    max_budget: int
    page_size: int
    dense: tuple  # coefficients over FEATURES, ms
    sparse: tuple
    margin: float = DEFAULT_MARGIN
    fit: dict = field(default_factory=dict)  # how well it fits: points, errors, command

    def predict(self, feats: Sequence[float]) -> tuple[float, float]:
        """(dense ms, sparse ms) of a step with these features."""
        d = sum(c * x for c, x in zip(self.dense, feats))
        s = sum(c * x for c, x in zip(self.sparse, feats))
        return d, s

    def prefers_sparse(self, feats: Sequence[float]) -> bool:
        d, s = self.predict(feats)
        return s <= (1.0 - self.margin) * d

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense"], d["sparse"] = list(self.dense), list(self.sparse)
        d["features"] = list(FEATURES)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepCostModel":
        feats = tuple(d.get("features", FEATURES))
        unknown = [f for f in feats if f not in FEATURES]
        if unknown or any(len(d[way]) != len(feats) for way in ("dense", "sparse")):
            raise ValueError(f"dispatch profile has features {feats} and {len(d['dense'])} / "
                             f"{len(d['sparse'])} coefficients; known features: {FEATURES}")
        kw = {k: d[k] for k in ("card", "num_kv_heads", "group", "head_dim", "num_layers",
                                "num_sparse_layers", "capacity", "max_budget", "page_size")}

        def coefs(way: str) -> tuple:  # a feature the profile lacks costs nothing in it
            by_name = dict(zip(feats, d[way]))
            return tuple(float(by_name.get(f, 0.0)) for f in FEATURES)

        return cls(dense=coefs("dense"), sparse=coefs("sparse"),
                   margin=float(d.get("margin", DEFAULT_MARGIN)), fit=dict(d.get("fit", {})), **kw)

    @property
    def sees_shared(self) -> bool:
        """The model prices a shared prefix (its ``distinct`` coefficients are not both 0)."""
        i = FEATURES.index("distinct")
        return bool(self.dense[i] or self.sparse[i])

    def geometry(self) -> dict:
        return dict(num_kv_heads=self.num_kv_heads, group=self.group, head_dim=self.head_dim,
                    num_layers=self.num_layers, num_sparse_layers=self.num_sparse_layers,
                    capacity=self.capacity, max_budget=self.max_budget,
                    page_size=self.page_size)


def fit_step_models(points: Iterable[dict], **geometry: Any) -> StepCostModel:
    """Least-squares fit of both ways from measured steps. Each point: ``features`` (list over
    :data:`FEATURES`), ``dense_ms`` and ``sparse_ms``. Coefficients are kept non-negative
    (every feature costs time), by dropping a feature whose coefficient comes out negative and
    refitting. ``geometry``: the :class:`StepCostModel` fields other than the coefficients."""
    import numpy as np

    pts = list(points)
    X = np.array([p["features"] for p in pts], dtype=np.float64).reshape(len(pts), -1)
    columns = list(range(len(FEATURES)))
    fit: dict = {"points": len(pts)}
    i_tok, i_dis = FEATURES.index("tokens"), FEATURES.index("distinct")
    if len(pts) and not (X[:, i_dis] < X[:, i_tok]).any():
        # no step with a shared prefix: distinct == tokens everywhere, so the two cannot be
        # told apart; the shared prefix stays unpriced rather than guessed
        columns.remove(i_dis)
        fit["not_fitted"] = {"distinct": "no measured step with a shared prefix"}
    if len(pts) < len(columns):
        raise ValueError(f"need at least {len(columns)} measured steps, got {len(pts)}")
    coefs = {}
    for way in ("dense", "sparse"):
        y = np.array([p[f"{way}_ms"] for p in pts], dtype=np.float64)
        coefs[way] = _nonneg_lstsq(X, y, columns)
        pred = X @ coefs[way]
        rel = np.abs(pred - y) / y
        fit[f"{way}_max_rel_err"] = float(rel.max())
        fit[f"{way}_mean_rel_err"] = float(rel.mean())
    model = StepCostModel(dense=tuple(coefs["dense"].tolist()),
                          sparse=tuple(coefs["sparse"].tolist()), fit=fit, **geometry)
    # how the choice would have done on the measured points
    regret = []
    for p in pts:
        best = min(p["dense_ms"], p["sparse_ms"])
        took = p["sparse_ms"] if model.prefers_sparse(p["features"]) else p["dense_ms"]
        regret.append(took / best)
    fit["max_regret"] = float(max(regret))  # chosen / best over the measured steps
    return model


def _nonneg_lstsq(X, y, columns):
    """Weighted least squares (relative error: each row divided by its y) over ``columns`` of
    ``X`` (the others get 0), with coefficients >= 0, by active-set elimination of negative
    ones (a few columns: a handful of refits)."""
    import numpy as np

    w = 1.0 / y
    Xw, yw = X * w[:, None], y * w
    active = list(columns)
    while True:
        sol, *_ = np.linalg.lstsq(Xw[:, active], yw, rcond=None)
        if (sol >= 0).all() or len(active) == 1:
            out = np.zeros(X.shape[1])
            out[active] = np.maximum(sol, 0.0)
            return out
        active.pop(int(np.argmin(sol)))


def load_profiles(path: Optional[str] = None) -> list[StepCostModel]:
    """The profiles in ``path`` (default ``$SGLANG_TWILIGHT_DISPATCH_PROFILES``, else the shipped
    ``dispatch_profiles.json``); [] if the file does not exist."""
    path = path or os.environ.get(PROFILES_ENV) or PROFILES_FILE
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return [StepCostModel.from_dict(d) for d in data.get("profiles", [])]


def save_profile(model: StepCostModel, path: str = PROFILES_FILE) -> None:
    """Add ``model`` to the profiles file, replacing one of the same card and geometry."""
    profiles = load_profiles(path) if os.path.exists(path) else []
    key = (model.card, tuple(sorted(model.geometry().items())))
    kept = [m for m in profiles if (m.card, tuple(sorted(m.geometry().items()))) != key]
    kept.append(model)
    kept.sort(key=lambda m: (m.card, m.num_kv_heads, m.group, m.head_dim, m.capacity))
    with open(path, "w") as f:
        json.dump({"about": "decode-step cost models for --twilight-dispatch auto; written by "
                            "benchmarks/bench_decode_step.py --fit (sglang_twilight/dispatch.py)",
                   "profiles": [m.to_dict() for m in kept]}, f, indent=1)
        f.write("\n")


def _distance(m: StepCostModel, geo: dict) -> float:
    """How far a profile's geometry is from ``geo`` (0 = the same); log-ratios of sizes."""
    d = 0.0
    for k in ("num_kv_heads", "group", "head_dim", "num_sparse_layers", "capacity"):
        a, b = max(1, getattr(m, k)), max(1, int(geo[k]))
        d += abs(math.log(a / b))
    mb_a, mb_b = m.max_budget or m.capacity, int(geo["max_budget"]) or int(geo["capacity"])
    d += 0.5 * abs(math.log(max(1, mb_a) / max(1, mb_b)))
    d += abs(math.log(m.page_size / int(geo["page_size"])))
    return d


def pick_profile(profiles: Sequence[StepCostModel], card: str, geo: dict
                 ) -> tuple[Optional[StepCostModel], str]:
    """The profile for this GPU (``card``, e.g. "NVIDIA H100 80GB HBM3") and geometry: the
    same geometry if measured, else the closest one on the same GPU with the same attention
    shape (KV heads, GQA group, head dim: what a step's bytes per token and kernel shapes follow;
    layers and budgets may differ); (None, why) without one."""
    same_card = [m for m in profiles if m.card == card]
    shape = (int(geo["num_kv_heads"]), int(geo["group"]), int(geo["head_dim"]))
    same = [m for m in same_card if (m.num_kv_heads, m.group, m.head_dim) == shape]
    if not same:
        known = sorted({f"{m.card} ({m.num_kv_heads} KV heads x G{m.group} x D{m.head_dim})"
                        for m in profiles})
        return None, (f"no dispatch profile for {card!r} with {shape[0]} KV heads x G{shape[1]} "
                      f"x D{shape[2]} (measured: {', '.join(known) or 'none'}; run "
                      "benchmarks/bench_decode_step.py --fit with this model on this GPU)")
    best = min(same, key=lambda m: _distance(m, geo))
    if _distance(best, geo) == 0:
        return best, "measured for this GPU and geometry"
    return best, (f"closest profile on this GPU (measured for {best.geometry()}; this model "
                  f"{geo}); run benchmarks/bench_decode_step.py --fit for an exact one")


class DispatchPolicy:
    """The per-step choice for one backend. ``mode``: the config's ``dispatch``."""

    def __init__(self, mode: str, model: Optional[StepCostModel], capacity: int,
                 reason: str = ""):
        if mode not in ("auto", "sparse", "dense"):
            raise ValueError(f"dispatch mode must be auto, sparse or dense, got {mode!r}")
        self.mode = mode
        self.model = model
        self.capacity = int(capacity)
        self.reason = reason
        # auto mode only: a way every step takes regardless of the model (benchmarks time both
        # ways of a step in one process, whose graphs were captured for both); None = the model
        self.force: Optional[bool] = None

    @classmethod
    def for_backend(cls, mode: str, card: str, geo: dict,
                    profiles: Optional[Sequence[StepCostModel]] = None) -> "DispatchPolicy":
        model, reason = None, ""
        if mode == "auto":
            model, reason = pick_profile(load_profiles() if profiles is None else profiles,
                                         card, geo)
        return cls(mode, model, geo["capacity"], reason)

    @property
    def both_ways(self) -> bool:
        """Steps may go either way (CUDA graphs must be captured for both)."""
        return self.mode == "auto"

    @property
    def wants_shared(self) -> bool:
        """Its answers depend on the step's shared prefix tokens (worth counting them)."""
        return self.mode == "auto" and self.model is not None and self.model.sees_shared

    def sparse_step(self, seq_lens_cpu: Any = None, rows: Optional[int] = None,
                    tokens: Optional[int] = None, shared: int = 0) -> bool:
        """Host side, before a decode step: run its sparse layers through Twilight?
        ``shared``: the step's tokens read more than once (see :func:`step_features`)."""
        if self.mode != "auto":
            return self.mode == "sparse"
        if self.force is not None:
            return self.force
        if self.model is None:  # never measured on this GPU and attention shape: dense
            return False
        if seq_lens_cpu is None and (not rows or tokens is None):
            return True  # nothing known about the step: the sparse path (short rows keep all)
        feats = step_features(seq_lens_cpu, self.capacity, rows, tokens, shared)
        return self.model.prefers_sparse(feats)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.mode != "auto":
            return f"dispatch={self.mode} (forced)"
        if self.model is None:
            return f"dispatch=auto without a cost model, every decode step dense: {self.reason}"
        m = self.model
        shared = "prices shared prefixes" if m.sees_shared else "shared prefixes not measured"
        return (f"dispatch=auto, cost model of {m.card} ({m.num_kv_heads} KV heads x G{m.group} x "
                f"D{m.head_dim}, B0 {m.capacity}, margin {m.margin:.0%}, {shared}): "
                f"{self.reason}")


__all__ = [
    "DispatchPolicy",
    "FEATURES",
    "StepCostModel",
    "fit_step_models",
    "load_profiles",
    "pick_profile",
    "save_profile",
    "step_features",
]
