"""Every launch shape of the decode kernels, in one table, each with the reason it won.

The kernels read their shapes from here at every launch (``get(name)``); nothing else holds
one. A sweep or a test changes them only for a while, through ``override``::

    from sglang_twilight.kernels import launch
    with launch.override(topp=dict(CHUNK=64, num_warps=4), estimate_wide_rows=1 << 30):
        ...  # launches in here use the changed shapes; the table is restored on exit

``override`` merges a dict into a dict entry (keys that are names must exist already; integer
keys, the sizes of the per-size tables, may be added) and replaces any other value. The times
below are per layer at Llama-3.1-8B shapes (32 q heads, 8 KV heads, head_dim 128, bf16), 32k
context, B0 = 8192, p = 0.95, on one H100 80GB HBM3 (``benchmarks/tune_kernels.py`` sweeps
them; docs/KERNELS.md tells the story). Another card may want other values: rerun the sweep
there.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

__all__ = ["get", "override", "version", "rows", "maxnreg", "row_warps", "next_pow2",
           "interpreting"]

# name: (default, why). Microseconds (us) are one kernel or stage in a CUDA graph, "step" the
# whole sparse decode step of one layer; "batch N" is N requests x 32k tokens.
_TABLE: dict[str, tuple[Any, str]] = {
    # store (int4 K + page bounds): a program per (new token, KV head)
    "store": (dict(num_warps=2, small_head_num_warps=1),
              "one token's D values and one page's bounds a program; 1 warp for head_dim <= 64; "
              "not swept: the stage takes 3.5-4.6 us a step"),
    # select: Quest page scores, then the top-K pages
    "page_scores": (dict(BLOCK_P=32, ITERS=4, STAGES=3, num_warps=2),
                    "4 blocks of 32 pages at 2 warps: 12.1 / 30.8 / 108.8 us at batch 8 / 16 / "
                    "64 against 17.7 / 34.7 / 128.5 for the best shape of bf16 bounds (32 x 2, "
                    "4 warps); 4 stages 28.4 vs 26.9 us at batch 8; no shape better at every "
                    "batch inside the step"),
    "select": (dict(num_warps=4, wide_num_warps=8, wide_from_pages=2048, by_pages={}),
               "top-K pages: 4 warps up to 1024 (padded) pages, 8 above; 1 / 2 warps: select "
               "46.3 / 29.6 vs 22.5 us at batch 8; by_pages: a fixed count per padded size"),
    "select_tiers": ((256, 2048),
                     "a row of at most 256 (then 2048) pages is chosen in a block that wide, not "
                     "in one as wide as the server's longest context: in a served Llama-3.1-8B "
                     "step (131072-token context, 8192-page blocks) the select took 56 us a call "
                     "at 28k x 12 and 33 us at 2k x 1, the largest Twilight kernel"),
    # estimate: q . int4 keys over the candidates
    "estimate": (dict(BLOCK_N=64, ITERS=8, STAGES=6, num_warps=2, SLOTS_FIRST=False),
                 "8 blocks of 64 at 2 warps, 6 stages (3: 21.3 vs 18.7 us at batch 8, 43.3 vs "
                 "39.4 at 16); slots read before the loop slowed batch 8 (23.0 vs 20.3 us)"),
    "estimate_wide": (dict(BLOCK_N=64, ITERS=4, STAGES=5, num_warps=1, SLOTS_FIRST=True),
                      "enough programs to fill the GPU many times: 4 blocks at 1 warp, 82.5 -> "
                      "80.0 us at batch 32, 161.4 -> 152.2 at 64; 5 stages 151.4 -> 140.1 at 64; "
                      "slots first 76.5 -> 75.0 at 32"),
    "estimate_wide_rows": (256,
                           "(request, KV head) rows from which the wide estimate runs: at "
                           "batch 16 (128 rows) it lost, 44.3 vs 43.2 us"),
    "estimate_unpack": ("asm",
                        "int4 -> bf16/fp16 by inline PTX (_unpack_nibbles): 30.4 -> 21.1 us at "
                        "batch 8, 189.2 -> 160.2 at 64 against Triton's integer ops "
                        "(\"convert\", always taken in the CPU interpreter)"),
    # top-p: softmax, threshold search, per-head kept marks
    "topp": (dict(CHUNK=1024, SMALL=2048, MID=4096, STAGES=3, num_warps=8, REFLOOR=True,
                  RAISE=2),
             "8 warps, 1024-chunks, 3 stages (4-6: 107.5-112.9 vs 105.7 us prune at batch 16; "
             "16 warps 66.9 vs 53.5 at 8); RAISE 0 / 1 / 2 / 3: prune 54.3 / 53.8 / 51.6 / "
             "59.3 us at batch 8, 334.3 / 326.2 / 323.3 / 342.4 at 64; REFLOOR 105.6 vs 116.1 "
             "at 16"),
    "topp_wide": (dict(CHUNK=1024, num_warps=4, maxnreg=128),
                  "over 'topp' from topp_wide_heads on: 4 warps capped at 128 registers (four "
                  "programs an SM instead of two at 189): prune 135.5 -> 128.6 us at batch 32, "
                  "249.6 -> 238.8 at 64; 1024-chunks (512: 142.2 vs 140.4 us at 32)"),
    "topp_wide_heads": (512,
                        "q heads in the whole step from which top-p takes its wide shape: "
                        "batch 16 (512 programs fit at once) prune 79.7 -> 71.9 us; batch 8 "
                        "stays narrow (44.0 vs 45.7)"),
    "topp_from_parts": (True,
                        "each head's max and sum from the estimate's per-program partials, not "
                        "a pass over the row: prune 54.3 -> 53.5 us at batch 8, 340.7 -> 319.3 "
                        "at 64"),
    "overflow_per_kv": (True,
                        "the overflow kernel a program per (request, KV head), which exits "
                        "when none of its G heads is flagged: prune 54.9 vs 55.2 us at batch 8, "
                        "340.1 vs 344.8 at 64"),
    "overflow_warps": ({},
                       "warps by padded row; rows not listed as the union kernel (4 / 8 / 16 "
                       "within 0.5 us)"),
    # union: GQA union, budget clamps, compaction
    "union_warps": ({8192: 16},
                    "warps by padded row, else 4 up to 2048 and 8 above: 16 for 8192 saved "
                    "about 4 us at batch 8; 4 warps prune 75.4 vs 54.3 us, 32 warps 57.1 vs 54.4"),
    "union_cap": (dict(from_heads=1024, maxnreg=64),
                  "union capped at 64 registers from 1024 q heads in the step: prune 234.4 vs "
                  "238.2 us at batch 64, 126.7 vs 128.1 at 32, but 44.6 vs 44.0 at 8"),
    "maxnreg": (dict(topp=None, union=None, overflow=None),
                "a fixed register cap a kernel (None: the shapes above decide); none won: top-p "
                "wide at 96 / 80 / 72 / 64: 241.7-248.3 vs 238.6 us prune at batch 64"),
    # attend: split-K decode over the kept slots
    "attend": (dict(waves=32, waves_keep_all=4, BLOCK_N=0, num_warps=4, num_stages=2),
               "splits to fill the GPU 32 times (at most 16): 70.2 -> 60.3 us at batch 64 "
               "against 2; BLOCK_N 0: 64 for head_dim >= 128, else 128; Quest alone: the fewest "
               "splits filling it 4 times (728.7 vs 738.6 us at 64)"),
    "attend_reduce": (dict(num_warps=4, small_head_num_warps=2),
                      "a program per (row, q head) over at most 16 splits; 2 warps for head_dim "
                      "<= 64; not swept: 2-8 us a step"),
    # the step: its requests in row groups, one CUDA stream (a branch of the graph) each
    "decode_groups": (dict(min_requests=8, groups=4, keep_all_groups=1),
                      "from 8 requests on, 4 groups, so one group's latency-bound kernels (top-K "
                      "pages, top-p, union) overlap another's bandwidth-bound ones (page scores, "
                      "estimate): the step with 4 groups against 1, 185.6 vs 200.5 us at batch "
                      "16, 320.6 vs 349.3 at 32, 614.3 vs 648.1 at 64, 109.7 vs 111.2 at 8 (a "
                      "second sweep: 180.7 vs 185.4, 315.6 vs 331.0, 615.3 vs 629.9, 110.5 vs "
                      "110.8); Quest alone gained nothing at any batch and lost with 4 (994.9 vs "
                      "969.8 us at 64), so it keeps 1. The grouped step's time varies more "
                      "between processes than one group's"),
}

_current: dict[str, Any] = {name: copy.deepcopy(v) for name, (v, _) in _TABLE.items()}
_version = 0  # bumped whenever the table changes (what is derived from it may be cached by it)


def version() -> int:
    """A number that changes whenever the table does (an ``override`` begins or ends)."""
    return _version


def get(name: str) -> Any:
    """The shape ``name`` as it is now (a copy: changing it changes nothing)."""
    try:
        return copy.deepcopy(_current[name])
    except KeyError:
        raise KeyError(f"no launch shape named {name!r}; known: {', '.join(_TABLE)}") from None


def _merged(name: str, value: Any) -> Any:
    old = _current[name]
    if not isinstance(old, dict):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"launch shape {name!r} is a dict; override it with a dict, got {value!r}")
    for k in value:
        if isinstance(k, str) and k not in old:
            known = ", ".join(map(str, old))
            raise KeyError(f"launch shape {name!r} has no entry {k!r}; known: {known}")
    return {**old, **value}


@contextlib.contextmanager
def override(**entries: Any) -> Iterator[None]:
    """Change table entries until the ``with`` block ends (nested overrides restore in turn)."""
    for name in entries:
        if name not in _current:
            raise KeyError(f"no launch shape named {name!r}; known: {', '.join(_TABLE)}")
    global _version
    saved = {name: _current[name] for name in entries}
    try:
        for name, value in entries.items():
            _current[name] = _merged(name, copy.deepcopy(value))
        _version += 1
        yield
    finally:
        _current.update(saved)
        _version += 1


def rows() -> list[dict]:
    """The table as rows (name, value now, default, why), e.g. for a results file."""
    return [dict(name=n, value=copy.deepcopy(_current[n]), default=copy.deepcopy(v), why=why)
            for n, (v, why) in _TABLE.items()]


def maxnreg(kernel: str) -> dict:
    """Launch option of the fixed register cap of ``kernel`` (``maxnreg`` entry), or {}."""
    n = _current["maxnreg"].get(kernel)
    return {} if n is None else dict(maxnreg=int(n))


def row_warps(c_pad: int, table: str = "union_warps") -> int:
    """Warps of a kernel with a program per row of ``c_pad`` (padded) candidates: the entry of
    ``table`` for that size, else the union's (``union_warps``), else 4 up to 2048 and 8 above."""
    union = _current["union_warps"]
    default = union.get(c_pad, 4 if c_pad <= 2048 else 8)
    return _current[table].get(c_pad, default)


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1): Triton block sizes."""
    return 1 << max(0, int(x) - 1).bit_length()


def interpreting() -> bool:
    """Triton's CPU interpreter is on: it has no bf16 dot, so kernels upcast their dot operands."""
    return os.environ.get("TRITON_INTERPRET") == "1"
