"""Model folders for the tests: a tiny Llama config.json for the CPU tests (SGLang's ServerArgs /
ModelConfig read it; no weights are loaded), and ``pad_attention_heads``, which makes a real
checkpoint splittable for the TP=2 GPU test."""

from __future__ import annotations

import json
from pathlib import Path

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}


def write_tiny_llama(folder, **overrides) -> str:
    """Write ``TINY_LLAMA`` (with ``overrides``) as ``folder/config.json``; returns the folder."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, **overrides}))
    return str(d)


def pad_attention_heads(src, dst, num_heads: int, num_kv_heads: int) -> str:
    """Copy the HF Llama checkpoint ``src`` to ``dst`` with zero attention heads appended, so
    that tensor parallelism can split a model whose head counts it cannot (SmolLM2-135M: 9 q /
    3 KV heads; padded to 12 / 4 it splits over 2 GPUs). The GQA group size is kept, every new
    KV head serves only new q heads, and the new heads' o_proj columns are zero: the padded model
    computes exactly the original's outputs. Returns ``dst``."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    s, d = Path(src), Path(dst)
    cfg = json.loads((s / "config.json").read_text())
    h, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    dim = cfg.get("head_dim") or hidden // h
    if num_heads < h or num_kv_heads < kv or num_heads * kv != h * num_kv_heads:
        raise ValueError(f"pad {h}/{kv} heads to {num_heads}/{num_kv_heads}: the counts must not "
                         f"shrink and the group size {h // kv} must stay")
    files = sorted(s.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors")
    d.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    for name, w in list(state.items()):
        if ".self_attn." not in name:
            continue
        if ".q_proj." in name:
            extra = (num_heads - h) * dim
        elif ".k_proj." in name or ".v_proj." in name:
            extra = (num_kv_heads - kv) * dim
        elif name.endswith(".o_proj.weight"):
            state[name] = torch.cat([w, w.new_zeros(w.shape[0], (num_heads - h) * dim)], 1)
            continue
        else:
            continue
        state[name] = torch.cat([w, w.new_zeros(extra, *w.shape[1:])], 0).contiguous()
    for f in s.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, d / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.update(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=dim)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(d)


if __name__ == "__main__":  # python -m tests.models pad SRC DST NUM_HEADS NUM_KV_HEADS
    import sys

    if len(sys.argv) != 6 or sys.argv[1] != "pad":
        sys.exit("usage: python -m tests.models pad SRC DST NUM_HEADS NUM_KV_HEADS")
    print(pad_attention_heads(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
