"""The Triton kernels on A100 (sm80) and H100 (sm90), compiled here without a GPU.

Triton compiles for a named target without a device: this module runs the backend's own calls
(``ops.store_sidecar`` as the sidecar writes it, ``ops.twilight_decode`` with a per-row p as
the backend's decoder calls it) on CPU tensors with Triton's driver replaced by one that only
names the target, and every kernel launch turned into a compile (``warmup``): the kernels are
specialized exactly as on the GPU (argument dtypes, 16-byte alignment and divisibility, the
constexprs and launch options the Python side picks for that shape), compiled through ptxas
to a cubin, and never run. The interpreter (``TRITON_INTERPRET``) is not a compile, so the
subprocess runs without it.

For each compiled kernel and target:

* the cubin exists (ptxas assembled the PTX for that sm);
* for sm80, the PTX holds no Hopper-only instruction (wgmma, TMA / bulk copies, mbarrier
  transaction counts, setmaxnreg, async proxy fences, clusters, stmatrix, ...);
* it fits the card: dynamic shared memory within the per-block limit (A100 163 KiB, H100
  227 KiB), registers x threads within the 64K registers of a block, and a ``maxnreg`` launch
  option honoured by ptxas (the registers ``cuobjdump`` reports are at most the cap).

The shapes cover each launch-shape branch the kernels' Python side takes: SmolLM2-135M (3 KV
heads x 3, head_dim 64, 8k context) and Llama-3.1-8B (8 x 4, head_dim 128, 128k context), bf16
at batch sizes that cross the row-group, wide top-p, register-cap and wide-estimate thresholds,
fp16, a smaller and a larger budget, every page size, ``--twilight-selector none``, and the
sidecar writes of 1, 16, 17 and a prefill chunk of tokens. ``python -m tests.test_sm80 80``
prints the table for one target.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Hopper (sm90) instructions and state spaces that do not exist on sm80
HOPPER_ONLY = {
    "wgmma": r"\bwgmma\.",
    "TMA / bulk copy": r"\bcp\.(reduce\.)?async\.bulk\b",
    "tensor map": r"\btensormap\b|\bprefetch\.tensormap\b",
    "mbarrier tx count": r"\bmbarrier\.[a-z_.]*expect_tx|\.complete_tx\b",
    "setmaxnreg": r"\bsetmaxnreg\b",
    "async proxy fence": r"\bfence\.proxy\.async\b",
    "cluster": r"%cluster|\bbarrier\.cluster\b|\.shared::cluster\b|\bmapa\b",
    "elect.sync": r"\belect\.sync\b",
    "stmatrix": r"\bstmatrix\b",
    "griddepcontrol": r"\bgriddepcontrol\b",
}

# per-block limits of the cards (CUDA occupancy tables): opt-in dynamic shared memory, registers
LIMITS = {80: dict(card="A100", sms=108, shared=166912, regs=65536),
          90: dict(card="H100", sms=132, shared=232448, regs=65536)}

MODELS = {  # name: (KV heads, group, head_dim, context)
    "smollm2": (3, 3, 64, 8192),
    "llama8b": (8, 4, 128, 131072),
}

# (model, dtype, batch, budget, page size, selector)
CASES = (
    [("smollm2", "bf16", r, 8192, 16, "quest") for r in (1, 8, 64, 128, 384)]
    + [("llama8b", "bf16", r, 8192, 16, "quest") for r in (1, 8, 16, 32, 128)]
    + [(m, "fp16", 8, 8192, 16, "quest") for m in MODELS]
    + [("llama8b", "bf16", 8, b, 16, "quest") for b in (512, 32768)]
    + [("smollm2", "bf16", 8, 8192, p, "quest") for p in (8, 32, 64)]
    + [("smollm2", "bf16", 8, 8192, 16, "none")]
)
STORE_TOKENS = (1, 16, 17, 8192)


# --------------------------------------------------------------------------- the compile run


def _compile_all(cap: int) -> list[dict]:
    """Run every case with launches turned into compiles for sm``cap``; one record per distinct
    compiled kernel."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the interpreter compiles nothing"
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class TargetOnly:
        """What Triton's JIT asks the driver for before a compile; nothing here touches a GPU."""

        def __init__(self, target):
            self.target = target

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(TargetOnly(GPUTarget("cuda", cap, 32)))
    compiled: dict = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(kernel.hash, (f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}", kernel))
        return kernel

    JITFunction.run = compile_only

    from sglang_twilight import ops
    from sglang_twilight.sidecar import TwilightSidecarPool

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    sms = LIMITS[cap]["sms"]
    for model, dt, R, budget, page, selector in CASES:
        H, G, D, ctx = MODELS[model]
        dtype = dtypes[dt]
        slots = 64 * page + page
        kbuf = torch.empty(slots, H, D, dtype=dtype)
        vbuf = torch.empty(slots, H, D, dtype=dtype)
        side = TwilightSidecarPool(slots, H, D, dtype, [0], page, "cpu")
        for n in STORE_TOKENS:
            side.write(0, torch.zeros(n, dtype=torch.int64), kbuf, backend="triton")
        cap_budget = -(-ctx // page) * page if selector == "none" else budget
        ws = _workspace(ops, R, H, G, D, cap_budget, page, ctx, sms)
        req_to_token = torch.zeros(R + 1, ctx, dtype=torch.int32)
        q = torch.empty(R, H * G, D, dtype=dtype)
        ops.twilight_decode(
            q, kbuf, vbuf, side.layer(0), req_to_token,
            torch.arange(1, R + 1, dtype=torch.int64), torch.full((R,), 2000, dtype=torch.int64),
            torch.full((R,), 0.95), budget=cap_budget, page_size=page, sm_scale=1 / math.sqrt(D),
            min_budget=64, max_budget=0, min_sparse_len=min(1024, budget), selector=selector,
            backend="triton",
            workspace=ws, out=torch.empty_like(q))
    return [_check(cap, name, k) for name, k in compiled.values()]


def _workspace(ops, R, H, G, D, budget, page, ctx, sms):
    """The decode workspace as the backend allocates it on a card with ``sms`` SMs (the
    attention's split count, a constexpr of its reduction, follows the SM count)."""
    import torch

    ws = ops.DecodeWorkspace.allocate(R, H, G, D, budget, page, ctx, "cpu")
    ws.num_sms = sms
    # the attention partials, sized for this SM count (the CPU workspace assumes 8 SMs): room for
    # the most splits a row may take (16); nothing runs, so more room than used costs nothing
    rows = R * H * G * 16
    if ws.mid_lse.numel() < rows:
        ws.mid_o = torch.empty(rows, D, dtype=torch.float32)
        ws.mid_lse = torch.empty(rows, dtype=torch.float32)
    return ws


def _registers(cubin: bytes) -> int:
    from triton.backends.nvidia import compiler as nvc

    tool = Path(nvc.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = [int(x) for x in re.findall(r"\bREG:(\d+)", out)]
    assert len(regs) == 1, out
    return regs[0]


def _check(cap: int, name: str, kernel) -> dict:
    md = kernel.metadata
    ptx = kernel.asm["ptx"]
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    regs = _registers(kernel.asm["cubin"]) if kernel.asm.get("cubin") else None
    threads = md.num_warps * 32
    lim = LIMITS[cap]
    problems = []
    if regs is None:
        problems.append("no cubin")
    if not target.startswith(f"sm_{cap}"):
        problems.append(f"PTX target {target}")
    if cap < 90:
        problems += [f"Hopper-only {what}" for what, pat in HOPPER_ONLY.items() if re.search(pat, ptx)]
    if md.shared > lim["shared"]:
        problems.append(f"{md.shared} B shared memory > {lim['shared']} ({lim['card']})")
    if regs is not None and regs * threads > lim["regs"]:
        problems.append(f"{regs} registers x {threads} threads > {lim['regs']}")
    if md.maxnreg is not None and (regs is None or regs > md.maxnreg or ".maxnreg" not in ptx):
        problems.append(f"maxnreg {md.maxnreg} not honoured ({regs} registers)")
    return dict(kernel=name, target=target, warps=md.num_warps, stages=md.num_stages,
                maxnreg=md.maxnreg, shared=md.shared, regs=regs, problems=problems)


def main(argv=None) -> int:
    """``python -m tests.test_sm80 CAP``: compile for sm``CAP`` and print one JSON line per kernel."""
    cap = int((argv or sys.argv[1:] or ["80"])[0])
    for rec in _compile_all(cap):
        print(json.dumps(rec), flush=True)
    return 0


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Both targets' compile runs, side by side (one subprocess each: a compile is one core)."""
    procs = {}
    for cap in LIMITS:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton-sm{cap}"))
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine compiles the same way
        out = tmp_path_factory.mktemp(f"out-sm{cap}")
        procs[cap] = (subprocess.Popen([sys.executable, "-m", "tests.test_sm80", str(cap)],
                                       stdout=open(out / "stdout", "w"),
                                       stderr=open(out / "stderr", "w"), env=env, cwd=ROOT), out)
    results = {}
    for cap, (p, out) in procs.items():
        rc = p.wait(timeout=1800)
        assert rc == 0, (out / "stderr").read_text()[-4000:]
        lines = (out / "stdout").read_text().splitlines()
        results[cap] = [json.loads(line) for line in lines if line.startswith("{")]
    return results


@pytest.fixture(params=sorted(LIMITS), ids=[f"sm{c}" for c in sorted(LIMITS)])
def compiled(request, compiles):
    return request.param, compiles[request.param]


def test_every_launched_kernel_compiles_and_fits(compiled):
    cap, recs = compiled
    names = {r["kernel"] for r in recs}
    print(f"sm{cap}: {len(recs)} kernel variants of {len(names)} kernels: {sorted(names)}")
    # the store, select, estimate, top-p, union and attention stages all compiled
    assert len(names) >= 6, sorted(names)
    bad = [f"{r['kernel']} ({r['warps']} warps, {r['shared']} B, {r['regs']} regs): {r['problems']}"
           for r in recs if r["problems"]]
    assert not bad, "\n".join(bad)


def test_register_caps_reach_the_compiler(compiled):
    """The kernels launched with a ``maxnreg`` cap (the wide top-p shape, the union kernel of
    big steps) were among the compiled ones, and ptxas kept them within it."""
    cap, recs = compiled
    capped = [r for r in recs if r["maxnreg"] is not None]
    assert capped, "no kernel was launched with maxnreg: the thresholds moved, update CASES"
    assert all(r["regs"] <= r["maxnreg"] for r in capped)


def test_hopper_patterns_catch_hopper_code():
    """The sm80 check can fail: each pattern matches the instruction it stands for."""
    samples = {
        "wgmma": "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, 1, 1, 1, 1, 1;",
        "TMA / bulk copy": "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];",
        "tensor map": "prefetch.tensormap [%rd1];",
        "mbarrier tx count": "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%r1], 4096;",
        "setmaxnreg": "setmaxnreg.inc.sync.aligned.u32 240;",
        "async proxy fence": "fence.proxy.async.shared::cta;",
        "cluster": "mov.u32 %r1, %cluster_ctarank;",
        "elect.sync": "elect.sync %r1|%p1, -1;",
        "stmatrix": "stmatrix.sync.aligned.m8n8.x4.shared.b16 [%r1], {%r2, %r3, %r4, %r5};",
        "griddepcontrol": "griddepcontrol.wait;",
    }
    assert set(samples) == set(HOPPER_ONLY)
    for what, line in samples.items():
        assert re.search(HOPPER_ONLY[what], line), what
    ampere = "cp.async.cg.shared.global [%r1], [%rd1], 16;\nmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    assert not any(re.search(p, ampere) for p in HOPPER_ONLY.values())


if __name__ == "__main__":
    raise SystemExit(main())
