"""Model configs for CPU tests: SGLang's ServerArgs / ModelConfig read a model folder's
config.json, so the tests write a tiny Llama one (no weights are ever loaded)."""

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
