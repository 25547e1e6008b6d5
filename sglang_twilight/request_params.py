"""Per-request Twilight p (``top_p_attn``) on the device, indexed by SGLang's req-pool slot.

A request may carry its own p as ``sampling_params.custom_params["top_p_attn"]`` (``/generate``)
or ``extra_body={"custom_params": {"top_p_attn": 0.9}}`` (OpenAI endpoints). It travels like
this (hooks in :mod:`sglang_twilight.srt_patches.request_top_p`, registered by
:func:`sglang_twilight.plugin.register`):

1. HTTP / tokenizer process: ``SamplingParams.verify`` also checks ``top_p_attn`` with
   :func:`sglang_twilight.config.validate_request_top_p`; a bad value is a ``ValueError``,
   which SGLang answers with HTTP 400 (the server keeps serving). A streaming ``/generate``
   would already have answered 200 by then, so the streaming endpoints check first
   (:func:`check_sampling_params`, before SGLang builds the streaming response) and answer 400.
2. Scheduler process: when a batch that admits requests (extend / prefill / mixed) becomes a
   ``ForwardBatch``, every request's p (or the server default ``--top-p-attn``) is written
   into the live :class:`RequestTopP` table at the request's ``req_pool_idx`` — one tiny
   host-to-device copy per extend batch, on the forward stream, so it is ordered before
   the batch's forward and after every earlier forward that used the same slot.
3. Decode (eager or CUDA graph): ``RequestTopP.rows(forward_batch.req_pool_indices)`` gathers
   the p of each row on the device — no host work per step, nothing to refresh at replay.
   Padding rows of a graph batch use req-pool slot 0, which always holds the default.

The backend creates one table per scheduler process:
``RequestTopP(req_to_token.shape[0], cfg.top_p, device)``; the constructor registers it, so
the admission hook finds it (:func:`active_tables`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Iterable, Optional, Sequence

import torch

from sglang_twilight.config import REQUEST_TOP_P_FIELD, validate_request_top_p

logger = logging.getLogger("sglang_twilight")

# Live tables of this process. Normally one (one backend per scheduler process); a few
# SGLang setups build more than one attention backend (two-batch overlap), each may own a
# table: all live ones get the writes. Weak, so a dropped backend's table goes away.
_ACTIVE: "weakref.WeakValueDictionary[int, RequestTopP]" = weakref.WeakValueDictionary()


class RequestTopP:
    """Device table ``[num_req_slots]`` (fp32) of the Twilight p per req-pool slot.

    ``num_req_slots`` is ``req_to_token_pool.req_to_token.shape[0]`` (pool size + the
    padding row 0). Every entry starts at ``default_p``; slot 0 is never written.
    """

    def __init__(self, num_req_slots: int, default_p: float, device: Any, *, register: bool = True):
        num_req_slots = int(num_req_slots)
        if num_req_slots < 1:
            raise ValueError(f"num_req_slots must be >= 1, got {num_req_slots}")
        self.num_req_slots = num_req_slots
        self.default_p = validate_request_top_p(default_p)
        self.device = torch.device(device)
        self.table = torch.full((num_req_slots,), self.default_p, dtype=torch.float32, device=self.device)
        self._warned_bad = False
        if register:
            register_active(self)

    # ------------------------------------------------------------------ device side
    def rows(self, req_pool_indices: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """p of each batch row, ``[bs]`` fp32: a gather on the device (no host sync, fixed
        shape, safe inside a captured CUDA graph). ``out``: optional ``[bs]`` fp32 buffer
        (e.g. a static graph workspace) to write into."""
        idx = req_pool_indices if req_pool_indices.dtype == torch.int64 else req_pool_indices.long()
        if out is None:
            return torch.index_select(self.table, 0, idx)
        return torch.index_select(self.table, 0, idx, out=out)

    # ------------------------------------------------------------------ host side
    def set(self, req_pool_index: int, p: float) -> None:
        """Set one slot (host call, e.g. at admission). ``p`` is validated."""
        i = int(req_pool_index)
        if not 0 <= i < self.num_req_slots:
            raise IndexError(f"req_pool_index {i} out of range [0, {self.num_req_slots})")
        self.table[i] = validate_request_top_p(p)

    def set_many(self, req_pool_indices: Sequence[int], ps: Sequence[float]) -> None:
        """Set several slots with one host-to-device copy (indices and values packed in one
        fp64 tensor: slot numbers are far below 2**53). Values must already be valid."""
        n = len(req_pool_indices)
        if n == 0:
            return
        if len(ps) != n:
            raise ValueError(f"{n} indices but {len(ps)} values")
        packed = torch.tensor([list(req_pool_indices), list(ps)], dtype=torch.float64)
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        else:
            packed = packed.to(self.device)
        self.table.index_copy_(0, packed[0].long(), packed[1].float())

    def p_of(self, custom_params: Any) -> float:
        """The p for a request whose ``sampling_params.custom_params`` is given: its
        ``top_p_attn`` if present, else the default. A bad value (only possible when the
        tokenizer-side check was bypassed) falls back to the default, with one warning."""
        if not isinstance(custom_params, dict):
            return self.default_p
        raw = custom_params.get(REQUEST_TOP_P_FIELD)
        if raw is None:
            return self.default_p
        try:
            return validate_request_top_p(raw)
        except ValueError as e:
            if not self._warned_bad:
                logger.warning("sglang-twilight: %s; using the default p %s", e, self.default_p)
                self._warned_bad = True
            return self.default_p

    def admit(self, reqs: Iterable[Any]) -> int:
        """Write the p of every request (``req.req_pool_idx``, ``req.sampling_params``) into
        the table; return how many were written. Requests without a slot are skipped."""
        idx: list[int] = []
        ps: list[float] = []
        for req in reqs:
            slot = getattr(req, "req_pool_idx", None)
            if slot is None:
                continue
            sp = getattr(req, "sampling_params", None)
            idx.append(int(slot))
            ps.append(self.p_of(getattr(sp, "custom_params", None)))
        self.set_many(idx, ps)
        return len(idx)

    def __repr__(self) -> str:
        return f"RequestTopP(num_req_slots={self.num_req_slots}, default_p={self.default_p}, device={self.device})"


# ---------------------------------------------------------------------- HTTP side


def check_sampling_params(sampling_params: Any) -> None:
    """Validate ``custom_params["top_p_attn"]`` in a request's ``sampling_params`` as it comes
    over HTTP (``GenerateReqInput.sampling_params``): one dict, a list of them (a batch), or
    None. Raises the ``ValueError`` of :func:`validate_request_top_p` for the first bad value;
    anything else (no ``custom_params``, no ``top_p_attn``, a non-dict) is left to SGLang."""
    items = sampling_params if isinstance(sampling_params, list) else [sampling_params]
    for sp in items:
        custom = sp.get("custom_params") if isinstance(sp, dict) else None
        if isinstance(custom, dict) and REQUEST_TOP_P_FIELD in custom:
            validate_request_top_p(custom[REQUEST_TOP_P_FIELD])


def top_p_error_in_body(body: bytes) -> Optional[str]:
    """The message of a bad ``top_p_attn`` in a request body that SGLang's JSON parser
    (orjson) refused, or None. orjson refuses ``NaN``, ``Infinity``, numbers beyond a double
    (``1e400``) and integers beyond 64 bits (``10**400``) anywhere in the body, with a message
    that names only a byte offset; Python's ``json`` reads all of them, so that a bad
    ``top_p_attn`` can be named. Looks where the endpoints carry it:
    ``sampling_params.custom_params`` (``/generate``, one dict or a list) and the top-level
    ``custom_params`` (OpenAI endpoints)."""
    import json

    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON even to Python (or > 4300-digit ints)
        return None
    if not isinstance(doc, dict):
        return None
    try:
        check_sampling_params(doc.get("sampling_params"))
        check_sampling_params({"custom_params": doc.get("custom_params")})
    except ValueError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------- registry


def register_active(table: RequestTopP) -> RequestTopP:
    """Make ``table`` receive admissions in this process (done by the constructor)."""
    _ACTIVE[id(table)] = table
    return table


def unregister_active(table: RequestTopP) -> None:
    _ACTIVE.pop(id(table), None)


def active_tables() -> list[RequestTopP]:
    """The live tables of this process (normally one)."""
    return list(_ACTIVE.values())


def admit_requests(reqs: Sequence[Any]) -> int:
    """Write the p of ``reqs`` into every live table; called by the scheduler-side hook for
    each batch that admits requests. Returns the number of (table, request) writes."""
    tables = active_tables()
    if not tables or not reqs:
        return 0
    return sum(t.admit(reqs) for t in tables)


__all__ = [
    "RequestTopP",
    "active_tables",
    "admit_requests",
    "check_sampling_params",
    "top_p_error_in_body",
    "register_active",
    "unregister_active",
]
