"""Prune: Twilight's pruner as one call: estimate -> top-p -> union.

Stages 3 to 5 of a decode step chained over one set of candidates: ``estimate`` scores every
candidate (q . int4 keys) and writes each program's softmax partials, ``topp`` marks each q
head's kept entries, ``union`` merges the group's marks, applies the budget clamps and writes
the kept slots. ``sglang_twilight.ops`` reaches the three stages through this module; the
workspace sizes and Quest alone's expansion are re-exported here for it.

Shapes: ``q`` ``[R, Hq, D]``; ``kq``, ``kscale``, ``kzero`` as in ``store``; candidates as page
lists int32 ``[R, H, K]`` with ``page_size > 0`` (or slot lists ``[R, H, C]``) and counts int32
``[R, H]``; ``p`` a float or fp32 ``[R]``. Out: ``kept_slots`` int32 ``[R, H, C]`` (candidate
order) and ``kept_counts`` int32 ``[R, H]``.
"""

from __future__ import annotations

import torch

from . import launch
from .estimate import (_check_parts, estimate_span, int4_scores_ref, int4_scores_triton,
                       score_parts_width)
from .topp import _rows_p, topp_heads_ref, topp_mask_ref, topp_marks_triton, topp_scratch_width
from .union import expand_candidates_triton, union_compact_triton, union_ref

__all__ = [
    "prune_from_scores_ref", "twilight_prune_ref", "prune_from_scores_triton",
    "twilight_prune_triton",
    # used by sglang_twilight.ops through this module
    "int4_scores_ref", "int4_scores_triton", "topp_mask_ref", "_rows_p", "topp_scratch_width",
    "score_parts_width", "expand_candidates_triton",
]


def prune_from_scores_ref(scores, cand_slots, cand_counts, p, min_budget, max_budget):
    """Top-p per q head, then the union, clamps and compaction of each row (the definition):
    ``topp.topp_heads_ref`` then ``union.union_ref``. ``scores`` fp32 ``[R, H, G, C]`` (``-inf``
    past the count), ``cand_slots`` int ``[R, H, C]``, the rest as in ``union.union_ref``."""
    probs, kept = topp_heads_ref(scores, p)
    return union_ref(probs, kept, cand_slots, cand_counts, p, min_budget, max_budget)


def twilight_prune_ref(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget,
                       max_budget):
    """The whole prune in torch: ``estimate.int4_scores_ref`` then ``prune_from_scores_ref``."""
    scores = int4_scores_ref(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale)
    return prune_from_scores_ref(scores, cand_slots, cand_counts, p, min_budget, max_budget)


def prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                             kept_slots=None, kept_counts=None, lo=None, tot=None, page_size=0,
                             scratch=None, mx=None, marks=None, step_heads=None, parts=None,
                             parts_span=0):
    """Top-p per q head (``topp.topp_marks_triton``), then union, clamps and compaction per KV
    head (``union.union_compact_triton``); ``scores`` fp32 ``[R, H, G, C]`` is only read.

    The workspace (allocated when None): ``kept_slots`` int32 ``[R, H, C]``, ``kept_counts``
    int32 ``[R, H]``; ``lo``, ``tot``, ``mx`` (``R * H * G`` each) receive each head's threshold
    key, sum of ``e = exp(s - max)`` and row max; ``scratch`` int32, at least ``2 * R * H * G *
    topp_scratch_width(C)`` entries; ``marks`` int8 ``[R, H, C]``, all zero (and left so).
    ``step_heads``: q heads of the whole decode step when these rows are one of its row groups
    (the launch shape). ``parts``: the estimate's partials of these scores, one per
    ``parts_span`` candidates (``estimate.int4_scores_triton``): each head's max and sum come
    from them."""
    R, H, G, C = scores.shape
    dev = scores.device
    pr = _rows_p(p, R, dev)
    if kept_slots is None:
        kept_slots = torch.zeros(R, H, C, dtype=torch.int32, device=dev)
    if kept_counts is None:
        kept_counts = torch.empty(R, H, dtype=torch.int32, device=dev)
    if lo is None:
        lo = torch.empty(R * H * G, dtype=torch.int32, device=dev)
    if tot is None:
        tot = torch.empty(R * H * G, dtype=torch.float32, device=dev)
    if mx is None:
        mx = torch.empty(R * H * G, dtype=torch.float32, device=dev)
    if marks is None:
        marks = torch.zeros(R, H, C, dtype=torch.int8, device=dev)
    width = topp_scratch_width(C)
    if scratch is None:
        scratch = torch.empty(2 * R * H * G * width, dtype=torch.int32, device=dev)
    elif scratch.numel() < 2 * R * H * G * width:
        raise ValueError(
            f"top-p scratch holds {scratch.numel()} entries, needs {2 * R * H * G * width}")
    if parts is not None:
        if parts_span <= 0:
            raise ValueError(f"parts_span must be > 0 with parts, got {parts_span}")
        _check_parts(parts, R, H, G, C, parts_span)
    topp_marks_triton(scores, cand_counts, pr, lo, tot, mx, scratch, marks, parts, parts_span,
                      step_heads)
    union_compact_triton(scores, marks, mx, tot, cand_slots, cand_counts, pr, kept_slots,
                         kept_counts, min_budget, max_budget, page_size, step_heads)
    return kept_slots, kept_counts


def twilight_prune_triton(q, kq, kscale, kzero, cand_slots, cand_counts, p, sm_scale, min_budget,
                          max_budget, scores=None, kept_slots=None, kept_counts=None, lo=None,
                          tot=None, page_size=0, scratch=None, mx=None, marks=None,
                          step_heads=None, parts=None):
    """The whole prune on the GPU: the estimate (``estimate.int4_scores_triton`` into
    ``scores``, fp32 ``[R, H, G, C]``), then ``prune_from_scores_triton``. ``page_size > 0``:
    ``cand_slots`` holds page lists (``select.quest_select_pages_triton``). ``parts``: the
    buffer of the estimate's partials, fp32 ``[R, H, G, 2, score_parts_width(C)]`` (allocated
    when None), used when ``launch.get("topp_from_parts")``."""
    R, H, C = cand_slots.shape[0], cand_slots.shape[1], cand_slots.shape[-1] * max(page_size, 1)
    G = q.shape[1] // H
    if not launch.get("topp_from_parts"):
        parts = None
    elif parts is None:
        parts = torch.empty(R, H, G, 2, score_parts_width(C), dtype=torch.float32,
                            device=q.device)
    scores = int4_scores_triton(q, kq, kscale, kzero, cand_slots, cand_counts, sm_scale, out=scores,
                                page_size=page_size, parts=parts)
    return prune_from_scores_triton(scores, cand_slots, cand_counts, p, min_budget, max_budget,
                                    kept_slots, kept_counts, lo, tot, page_size, scratch, mx,
                                    marks, step_heads, parts, estimate_span(R * H))
