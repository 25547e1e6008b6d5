"""Compile, at image build time, the FlashInfer kernels the twilight backend runs, for A100 (sm80)
and H100 (sm90), and install them where FlashInfer loads prebuilt modules from, so that no
request waits for nvcc.

    python docker/flashinfer_aot.py plan  [--archs "8.0 9.0"] [--head-dims 64,128] [--dtypes bfloat16,float16]
    python docker/flashinfer_aot.py build [same options]

What the backend runs through FlashInfer (SGLang 0.5.17's FlashInferAttnBackend, which the
twilight backend extends) for a model of head_dim D in dtype T (page size 16, no sliding window,
no logits soft cap, int32 indices):

* ragged prefill (``BatchPrefillWithRaggedKVCacheWrapper``, backend ``auto``): FA3 on sm90, FA2
  on sm80 -> ``batch_prefill`` fa2 and fa3;
* paged prefill (``BatchPrefillWithPagedKVCacheWrapper``, backend ``fa2``) and the dense decode
  of the first layers (``BatchDecodeWithPagedKVCacheWrapper``, backend ``fa2``): with GQA groups
  of 4 or more SGLang decodes on tensor cores through the FA2 prefill module, below that through
  ``batch_decode`` -> ``batch_prefill`` fa2 and ``batch_decode``;
* ``merge_state`` (prefix + new tokens of an extend) -> ``cascade``; sampling -> ``sampling``.

FA2 modules are compiled for every listed arch, FA3 for sm90a only (FlashInfer's own flags).
``plan`` generates the modules' sources and ninja files and checks each module's name against
the one FlashInfer's wrappers ask for at run time, without nvcc; ``build`` also compiles them
(nvcc from CUDA_HOME or PATH) and copies each ``.so`` into FlashInfer's AOT directory
(``flashinfer/data/aot/<name>/<name>.so``), which ``JitSpec.build_and_load`` loads before it
would build anything. A server run with ``FLASHINFER_DISABLE_JIT=1`` then fails loudly on any
module missing from the list.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128)  # SmolLM2-135M (the default model), Llama-3.x-8B and most 7-70B models
ARCHS = ("8.0", "9.0")


def _arch_list(archs) -> str:
    """FLASHINFER_CUDA_ARCH_LIST: sm90 as 9.0a (FlashInfer's FA3 needs the 'a' features)."""
    out = []
    for a in archs:
        major, minor = a.split(".")
        out.append(f"{major}.{minor}a" if major == "9" and not minor.endswith("a") else a)
    return " ".join(out)


def module_specs(archs=ARCHS, head_dims=HEAD_DIMS, dtypes=DTYPES):
    """(JitSpec, the name FlashInfer's runtime asks for) of every module the backend runs.
    Sets FLASHINFER_CUDA_ARCH_LIST before FlashInfer is imported (its compile flags are fixed
    at import)."""
    if "flashinfer" in sys.modules:
        raise RuntimeError("import flashinfer after module_specs sets FLASHINFER_CUDA_ARCH_LIST")
    os.environ["FLASHINFER_CUDA_ARCH_LIST"] = _arch_list(archs)
    import torch
    from flashinfer.jit.attention.modules import (
        gen_batch_decode_module,
        gen_batch_prefill_module,
        get_batch_decode_uri,
        get_batch_prefill_uri,
    )
    from flashinfer.jit.cascade import gen_cascade_module
    from flashinfer.jit.sampling import gen_sampling_module

    sm90 = any(a.startswith("9.") for a in archs)
    specs = [(gen_cascade_module(), "cascade"), (gen_sampling_module(), "sampling")]
    for name in dtypes:
        dt = getattr(torch, name)
        for d in head_dims:
            # (q, kv, o, idx, head_dim_qk, head_dim_vo, pos_encoding NONE, sliding window,
            #  logits soft cap[, fp16 qk reduction]) as the wrappers' plan() passes them
            args = (dt, dt, dt, torch.int32, d, d, 0, False, False)
            for backend in ("fa2", "fa3") if sm90 else ("fa2",):
                specs.append((gen_batch_prefill_module(backend, *args, False),
                              get_batch_prefill_uri(backend, *args, False)))
            specs.append((gen_batch_decode_module(*args), get_batch_decode_uri(*args)))
    return specs


def gpu_codes(spec) -> list[str]:
    """The GPU code (sm_80, sm_90a, ...) the module's ninja file has nvcc generate."""
    return sorted(set(re.findall(r"-gencode=arch=compute_\w+,code=(sm_\w+)",
                                 spec.ninja_path.read_text())))


def plan(specs) -> list[str]:
    """Write each module's ninja file; one line per module: name and the GPU code it builds.
    Raises if a module's name is not the one the runtime asks for."""
    lines = []
    for spec, runtime_name in specs:
        if spec.name != runtime_name:
            raise RuntimeError(f"{spec.name}: the runtime asks for {runtime_name}")
        spec.write_ninja()
        lines.append(f"{spec.name}: {' '.join(gpu_codes(spec))}")
    return lines


def build(specs) -> list[Path]:
    """Compile every module (ninja + nvcc) and install it in FlashInfer's AOT directory."""
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.core import build_jit_specs

    only = [s for s, _ in specs]
    build_jit_specs(only, verbose=os.environ.get("FLASHINFER_JIT_VERBOSE") == "1",
                    skip_prebuilt=False)
    installed = []
    for spec in only:
        src = spec.jit_library_path
        dst = Path(jit_env.FLASHINFER_AOT_DIR) / spec.name / f"{spec.name}.so"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        if not spec.is_aot:
            raise RuntimeError(f"{spec.name}: not found in FlashInfer's AOT directory after install")
        installed.append(dst)
    return installed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python docker/flashinfer_aot.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("plan", "build"))
    ap.add_argument("--archs", default=" ".join(ARCHS), help="compute capabilities (default: %(default)s)")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="(default: %(default)s)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="(default: %(default)s)")
    ap.add_argument("--build-dir", default=None,
                    help="where sources and objects go (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    archs = args.archs.replace(",", " ").split()
    head_dims = [int(x) for x in args.head_dims.split(",") if x]
    dtypes = [x for x in args.dtypes.split(",") if x]
    for a in archs:
        if a.split(".")[0] not in ("8", "9"):
            ap.error(f"--archs: invalid value {a} (allowed: 8.x and 9.x compute capabilities)")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: invalid value {d} (allowed: {', '.join(DTYPES)})")

    tmp = None
    build_dir = args.build_dir
    if build_dir is None:
        tmp = build_dir = tempfile.mkdtemp(prefix="flashinfer-aot-")
    # FlashInfer's workspace (generated sources, ninja files, objects) goes to the build dir
    os.environ["FLASHINFER_WORKSPACE_BASE"] = str(build_dir)
    try:
        specs = module_specs(archs, head_dims, dtypes)
        for line in plan(specs):
            print(line, flush=True)
        if args.mode == "build":
            for path in build(specs):
                print(f"installed {path}", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
