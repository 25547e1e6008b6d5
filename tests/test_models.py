"""The head-padding helper the TP=2 serving test relies on: the padded checkpoint must compute
exactly the original model's logits (CPU, a tiny random Llama through transformers)."""

from __future__ import annotations

import json

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
