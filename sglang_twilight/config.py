"""Twilight configuration: CLI flags, validation, and hand-over to SGLang's processes.

Pure standard library on purpose: the launcher parses and validates these flags before
anything heavy (torch, SGLang) is imported, so a bad value fails in a fraction of a second
with one line on stderr.

The launcher puts the validated config into the environment variable
``SGLANG_TWILIGHT_CONFIG`` (JSON). SGLang spawns its scheduler processes, which inherit the
environment, and the backend there calls :func:`get_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

ENV_VAR = "SGLANG_TWILIGHT_CONFIG"

#: the attention backend's name in SGLang (``--attention-backend twilight``)
BACKEND_NAME = "twilight"

SELECTORS = ("quest", "none")
DISPATCH_MODES = ("auto", "sparse", "dense")
PAGE_SIZES = (8, 16, 32, 64)
MAX_BUDGET_TOKENS = 1 << 20  # 1048576

# flag name per field; the one place that ties the two together
FLAGS = {
    "top_p": "--top-p-attn",
    "selector": "--twilight-selector",
    "budget": "--twilight-budget",
    "page_size": "--twilight-page-size",
    "dense_layers": "--twilight-dense-layers",
    "min_sparse_len": "--twilight-min-seq-len",
    "min_budget": "--twilight-min-budget",
    "max_budget": "--twilight-max-budget",
    "dispatch": "--twilight-dispatch",
}

# the per-request field name (HTTP / sampling params), for error messages
REQUEST_TOP_P_FIELD = "top_p_attn"

TOP_P_RANGE = "0 < p <= 1"


class TwilightConfigError(ValueError):
    """A Twilight setting is out of range. ``str()`` is one line:
    ``--top-p-attn: invalid value 1.5 (allowed: 0 < p <= 1)``."""

    def __init__(self, flag: str, value: Any, allowed: str):
        self.flag = flag
        self.value = value
        self.allowed = allowed
        super().__init__(f"{flag}: invalid value {_show(value)} (allowed: {allowed})")


def _show(value: Any) -> str:
    s = value if isinstance(value, str) else repr(value)
    s = s.replace("\n", "\\n")
    return s if s else "''"


# --------------------------------------------------------------------------- parsing
# One parser per field. Each takes the raw value (a string from the command line, or a
# number from JSON / Python) and returns the converted value or raises TwilightConfigError.
# Range checks that need no other field live here too, so argparse reports them at once.


def _to_float(field: str, raw: Any, allowed: str) -> float:
    if isinstance(raw, bool):
        raise TwilightConfigError(FLAGS[field], raw, allowed)
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise TwilightConfigError(FLAGS[field], raw, allowed) from None


def _to_int(field: str, raw: Any, allowed: str) -> int:
    if isinstance(raw, bool):
        raise TwilightConfigError(FLAGS[field], raw, allowed)
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip(), 10)
        except ValueError:
            pass
    raise TwilightConfigError(FLAGS[field], raw, allowed)


def parse_top_p(raw: Any) -> float:
    p = _to_float("top_p", raw, TOP_P_RANGE)
    if not (0.0 < p <= 1.0):  # also rejects nan
        raise TwilightConfigError(FLAGS["top_p"], raw, TOP_P_RANGE)
    return p


def parse_selector(raw: Any) -> str:
    allowed = " | ".join(SELECTORS)
    if not isinstance(raw, str) or raw not in SELECTORS:
        raise TwilightConfigError(FLAGS["selector"], raw, allowed)
    return raw


def parse_page_size(raw: Any) -> int:
    allowed = " | ".join(str(x) for x in PAGE_SIZES)
    v = _to_int("page_size", raw, allowed)
    if v not in PAGE_SIZES:
        raise TwilightConfigError(FLAGS["page_size"], raw, allowed)
    return v


def parse_budget(raw: Any) -> int:
    # the range depends on the page size, so validate() checks it
    return _to_int("budget", raw, _budget_allowed(None))


def _budget_allowed(page_size: Optional[int]) -> str:
    # B0 > one page: the capacity (B0 rounded up to pages) must hold both pages the selection
    # always keeps, the sink page and the current one; one page would hold the sink alone and
    # the newest tokens would never be attended
    lo = "page size" if page_size is None else f"{page_size} (page size)"
    return f"integer, {lo} < n <= {MAX_BUDGET_TOKENS}"


def _non_negative(field: str) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        allowed = "integer >= 0"
        v = _to_int(field, raw, allowed)
        if v < 0:
            raise TwilightConfigError(FLAGS[field], raw, allowed)
        return v

    parse.__name__ = f"parse_{field}"
    return parse


parse_dense_layers = _non_negative("dense_layers")
parse_min_sparse_len = _non_negative("min_sparse_len")


def parse_min_budget(raw: Any) -> int:
    allowed = "integer >= 1"
    v = _to_int("min_budget", raw, allowed)
    if v < 1:
        raise TwilightConfigError(FLAGS["min_budget"], raw, allowed)
    return v


def parse_max_budget(raw: Any) -> int:
    allowed = "integer >= 0 (0 = no cap)"
    v = _to_int("max_budget", raw, allowed)
    if v < 0:
        raise TwilightConfigError(FLAGS["max_budget"], raw, allowed)
    return v


def parse_dispatch(raw: Any) -> str:
    allowed = " | ".join(DISPATCH_MODES)
    if not isinstance(raw, str) or raw not in DISPATCH_MODES:
        raise TwilightConfigError(FLAGS["dispatch"], raw, allowed)
    return raw


PARSERS: dict[str, Callable[[Any], Any]] = {
    "top_p": parse_top_p,
    "selector": parse_selector,
    "budget": parse_budget,
    "page_size": parse_page_size,
    "dense_layers": parse_dense_layers,
    "min_sparse_len": parse_min_sparse_len,
    "min_budget": parse_min_budget,
    "max_budget": parse_max_budget,
    "dispatch": parse_dispatch,
}


def validate_request_top_p(x: Any) -> float:
    """Check a per-request p (field ``top_p_attn``); return it as float.

    Allowed: a real number (int, float, not bool) with 0 < p <= 1. Anything else raises
    ``ValueError("top_p_attn: invalid value 1.5 (allowed: a number, 0 < p <= 1)")``: bools,
    None, strings (also numeric ones such as ``"0.9"``: a JSON request sends a number), lists,
    dicts, nan, +-inf, and integers too large for a float (JSON ``10**400``). Callers turn
    that into an HTTP 400.

    A p below 2**-126 (the smallest normal fp32, ~1.18e-38; e.g. 1e-300) is returned as
    2**-126: the per-request table on the device is fp32, where such a p would become a
    subnormal or 0, outside (0, 1]. The kept set does not change: the heaviest candidate's
    estimated weight is at least 1 / B0 >= 2**-20, so every p at or below it keeps the same
    smallest set (the heaviest token alone, before the min-budget clamp).
    """
    import numbers

    fp32_min_normal = 2.0**-126
    try:
        shown = repr(x)
    except ValueError:  # an int beyond Python's int-to-str digit limit
        shown = f"<integer of {x.bit_length()} bits>"
    shown = shown.replace("\n", "\\n")
    if len(shown) > 48:
        shown = f"{shown[:24]}...({len(shown)} characters)"
    bad = ValueError(
        f"{REQUEST_TOP_P_FIELD}: invalid value {shown} (allowed: a number, {TOP_P_RANGE})"
    )
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise bad
    try:
        p = float(x)
    except (OverflowError, TypeError, ValueError):  # 10**400 overflows a float
        raise bad from None
    if not (0.0 < p <= 1.0):  # also nan
        raise bad
    return max(p, fp32_min_normal)


def round_to_pages(tokens: int, page_size: int) -> int:
    """``tokens`` rounded up to whole pages: a candidate budget B0 becomes its capacity."""
    return -(-int(tokens) // int(page_size)) * int(page_size)


def uses_twilight(server_args: Any) -> bool:
    """Does this SGLang ``ServerArgs`` (or anything with its three backend fields) select the
    twilight backend for prefill or decode?"""
    return BACKEND_NAME in (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
    )


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TwilightConfig:
    """Validated Twilight settings (see README's flag table)."""

    top_p: float = 0.95  # --top-p-attn: kept attention mass per query head
    selector: str = "quest"  # --twilight-selector: base candidate selector
    budget: int = 8192  # --twilight-budget: B0, candidate tokens per (request, KV head)
    page_size: int = 16  # --twilight-page-size: Quest page = SGLang KV page
    dense_layers: int = 2  # --twilight-dense-layers: leading layers that stay dense
    min_sparse_len: int = 1024  # --twilight-min-seq-len: shorter contexts decode dense
    min_budget: int = 64  # --twilight-min-budget: kept tokens per row, at least
    max_budget: int = 0  # --twilight-max-budget: kept tokens per row, at most (0 = no cap)
    dispatch: str = "auto"  # --twilight-dispatch: per decode step, sparse or dense (dispatch.py)

    @property
    def capacity(self) -> int:
        """Candidate capacity C: ``budget`` rounded up to a multiple of ``page_size``."""
        return round_to_pages(self.budget, self.page_size)

    # -- validation
    def validate(self) -> "TwilightConfig":
        """Raise TwilightConfigError (one line, names the flag) if any value is out of
        range; return self so calls can chain."""
        for name, parse in PARSERS.items():
            parse(getattr(self, name))
        if not (self.page_size < self.budget <= MAX_BUDGET_TOKENS):
            raise TwilightConfigError(
                FLAGS["budget"], self.budget, _budget_allowed(self.page_size)
            )
        if self.min_sparse_len > self.budget:
            raise TwilightConfigError(
                FLAGS["min_sparse_len"],
                self.min_sparse_len,
                f"0 <= n <= {FLAGS['budget']} ({self.budget})",
            )
        if self.min_budget > self.budget:
            raise TwilightConfigError(
                FLAGS["min_budget"],
                self.min_budget,
                f"1 <= n <= {FLAGS['budget']} ({self.budget})",
            )
        if self.max_budget and self.max_budget < self.min_budget:
            raise TwilightConfigError(
                FLAGS["max_budget"],
                self.max_budget,
                f"0 (no cap) or n >= {FLAGS['min_budget']} ({self.min_budget})",
            )
        return self

    # -- construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TwilightConfig":
        """Build from a mapping of field names; converts and validates every value."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown Twilight config field(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        kwargs = {k: PARSERS[k](v) for k, v in d.items()}
        return cls(**kwargs).validate()

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "TwilightConfig":
        """Build from a namespace filled by a parser that had :func:`add_twilight_args`."""
        vals = {}
        for name, flag in FLAGS.items():
            dest = _dest(flag)
            if hasattr(ns, dest):
                vals[name] = getattr(ns, dest)
        return cls.from_dict(vals)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- hand-over to spawned processes
    def to_env(self, environ: Optional[dict] = None) -> str:
        """Store this config (JSON) in ``SGLANG_TWILIGHT_CONFIG`` of ``environ``
        (default ``os.environ``); return the JSON string."""
        s = json.dumps(self.to_dict(), sort_keys=True)
        (os.environ if environ is None else environ)[ENV_VAR] = s
        return s

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["TwilightConfig"]:
        """The config stored by :meth:`to_env`, validated; ``None`` if the variable is unset."""
        env = os.environ if environ is None else environ
        s = env.get(ENV_VAR)
        if not s:
            return None
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV_VAR}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{ENV_VAR}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d)


def get_config(environ: Optional[Mapping[str, str]] = None) -> TwilightConfig:
    """The config of this process: from ``SGLANG_TWILIGHT_CONFIG`` if set (the launcher sets
    it, spawned processes inherit it), else the defaults. Always validated."""
    cfg = TwilightConfig.from_env(environ)
    return cfg if cfg is not None else TwilightConfig().validate()


# --------------------------------------------------------------------------- argparse


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class _ArgType:
    """argparse ``type=``: converts with the field's parser; on a bad value raises
    ArgumentTypeError whose message is the tail of the one-line TwilightConfigError."""

    def __init__(self, field: str):
        self.field = field
        self.__name__ = field  # argparse uses it in some messages

    def __call__(self, raw: str) -> Any:
        try:
            return PARSERS[self.field](raw)
        except TwilightConfigError as e:
            err = argparse.ArgumentTypeError(
                f"invalid value {_show(e.value)} (allowed: {e.allowed})"
            )
            err.twilight_error = e  # type: ignore[attr-defined]
            raise err from None

    def __repr__(self) -> str:
        return f"<twilight {self.field}>"


def add_twilight_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the Twilight flags to ``parser`` as the group "Twilight sparse decode attention"."""
    d = TwilightConfig()
    g = parser.add_argument_group(
        "Twilight sparse decode attention",
        "Budget-adaptive sparse decode (Quest candidates, int4 estimate, top-p pruning). "
        "Prefill and the first --twilight-dense-layers layers stay dense.",
    )
    g.add_argument(
        FLAGS["top_p"],
        type=_ArgType("top_p"),
        default=d.top_p,
        metavar="P",
        help="Attention mass each query head keeps: the smallest set of candidate tokens "
        f"whose estimated weights sum to at least P ({TOP_P_RANGE}). 1 keeps every "
        "candidate. (default: %(default)s)",
    )
    g.add_argument(
        FLAGS["selector"],
        type=_ArgType("selector"),
        default=d.selector,
        metavar="{" + ",".join(SELECTORS) + "}",
        help="Base selector for the candidate set: 'quest' keeps the top pages by Quest "
        "score up to --twilight-budget tokens; 'none' takes every token as a candidate. "
        "(default: %(default)s)",
    )
    g.add_argument(
        FLAGS["budget"],
        type=_ArgType("budget"),
        default=d.budget,
        metavar="B0",
        help="Candidate tokens per request and KV head (B0), rounded up to a multiple of "
        f"the page size; page size < B0 <= {MAX_BUDGET_TOKENS} (the candidates always hold the "
        "first page and the current one). (default: %(default)s)",
    )
    g.add_argument(
        FLAGS["page_size"],
        type=_ArgType("page_size"),
        default=d.page_size,
        metavar="{" + ",".join(str(x) for x in PAGE_SIZES) + "}",
        help="Quest page size in tokens; also SGLang's KV page size (--page-size is set "
        "to it). (default: %(default)s)",
    )
    g.add_argument(
        FLAGS["dense_layers"],
        type=_ArgType("dense_layers"),
        default=d.dense_layers,
        metavar="N",
        help="Number of leading layers that always decode densely (>= 0). "
        "(default: %(default)s)",
    )
    g.add_argument(
        FLAGS["min_sparse_len"],
        type=_ArgType("min_sparse_len"),
        default=d.min_sparse_len,
        metavar="N",
        help="Requests with a shorter context decode densely; 0 <= N <= --twilight-budget. "
        "(default: %(default)s)",
    )
    g.add_argument(
        FLAGS["min_budget"],
        type=_ArgType("min_budget"),
        default=d.min_budget,
        metavar="N",
        help="Keep at least N tokens per request and KV head after top-p (the heaviest "
        "by estimate); 1 <= N <= --twilight-budget. (default: %(default)s)",
    )
    g.add_argument(
        FLAGS["max_budget"],
        type=_ArgType("max_budget"),
        default=d.max_budget,
        metavar="N",
        help="Keep at most N tokens per request and KV head after top-p; 0 = no cap, "
        "else N >= --twilight-min-budget. (default: %(default)s)",
    )
    g.add_argument(
        FLAGS["dispatch"],
        type=_ArgType("dispatch"),
        default=d.dispatch,
        metavar="{" + ",".join(DISPATCH_MODES) + "}",
        help="Which decode path each step takes: 'auto' picks Twilight or FlashInfer's dense "
        "decode per step from a cost model of (batch, context, budget) measured on this GPU, "
        "so that Twilight never costs time where dense is faster (dense throughout on a GPU "
        "and attention shape with no measured model); 'sparse' always runs "
        "Twilight (over --twilight-min-seq-len); 'dense' always runs FlashInfer's dense decode "
        "(the sidecar is still written). (default: %(default)s)",
    )
    return g


__all__ = [
    "BACKEND_NAME",
    "DISPATCH_MODES",
    "ENV_VAR",
    "FLAGS",
    "PAGE_SIZES",
    "SELECTORS",
    "TwilightConfig",
    "TwilightConfigError",
    "add_twilight_args",
    "get_config",
    "round_to_pages",
    "uses_twilight",
    "validate_request_top_p",
]
