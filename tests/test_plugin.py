"""The SGLang plugin: entry point, registration in fresh and spawned processes, config
hand-over, page-size default, version guard (CPU)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import types
from importlib.metadata import entry_points

import pytest

from sglang_twilight.config import ENV_VAR, TwilightConfig
from tests.models import write_tiny_llama



@pytest.fixture
def tiny_model(tmp_path):
    return write_tiny_llama(tmp_path / "tiny-llama")


def _env(**extra):
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    env.update(extra)
    return env


def _run_script(code: str, *args: str, env=None, timeout=300):
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, env=env or _env(), timeout=timeout,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_entry_point_is_discoverable():
    """Needs the package installed (pip install -e .): that is how SGLang finds it."""
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "twilight"]
    assert len(eps) == 1, "sglang-twilight is not installed: run pip install -e ."
    ep = eps[0]
    assert ep.value == "sglang_twilight.plugin:register"
    assert ep.dist is not None and ep.dist.name.replace("_", "-") == "sglang-twilight"
    from sglang_twilight import plugin

    assert ep.load() is plugin.register
    assert plugin.entry_point_installed()


def test_fresh_process_plain_sglang_args(tiny_model):
    """What `python -m sglang.launch_server --attention-backend twilight ...` does before it
    starts serving: load_plugins(), then prepare_server_args(argv)."""
    res = _run_script(
        """
        import json, sys
        from sglang.srt.server_args import prepare_server_args, ServerArgs
        model = sys.argv[1]
        argv = ["--model-path", model, "--device", "cpu", "--attention-backend", "twilight"]
        out = {}
        try:                      # before the plugin: not a valid choice
            prepare_server_args(argv)
            out["before"] = "accepted"
        except SystemExit as e:
            out["before"] = "exit %s" % e.code
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang_twilight import plugin
        sa = prepare_server_args(argv)
        out["attention_backend"] = sa.attention_backend
        out["page_size"] = sa.page_size
        out["factory"] = ATTENTION_BACKENDS["twilight"] is plugin.create_twilight_backend
        sa = prepare_server_args(argv + ["--page-size", "16"])
        out["explicit_page_size"] = sa.page_size
        try:
            prepare_server_args(argv + ["--page-size", "1"])
            out["conflict"] = None
        except ValueError as e:
            out["conflict"] = str(e)
        # other backends keep SGLang's own page-size default
        out["other_backend_page_size"] = ServerArgs(model_path=model, device="cpu").page_size
        print(json.dumps(out))
        """,
        tiny_model,
    )
    assert res["before"] == "exit 2"
    assert res["attention_backend"] == "twilight"
    assert res["page_size"] == 16
    assert res["factory"] is True
    assert res["explicit_page_size"] == 16
    assert res["conflict"].startswith("--page-size: invalid value 1 (allowed: 16")
    assert res["other_backend_page_size"] == 1


def test_fresh_process_page_size_follows_env_config(tiny_model):
    env = _env()
    TwilightConfig(page_size=32, budget=4096).to_env(env)
    res = _run_script(
        """
        import json, sys
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang.srt.server_args import ServerArgs
        sa = ServerArgs(model_path=sys.argv[1], device="cpu", attention_backend="twilight")
        print(json.dumps({"page_size": sa.page_size}))
        """,
        tiny_model,
        env=env,
    )
    assert res["page_size"] == 32


def test_plugin_whitelist_respected():
    """SGLANG_PLUGINS set without 'twilight': SGLang skips us (so the launcher adds us)."""
    res = _run_script(
        """
        import json
        from sglang.srt.plugins import load_plugins
        load_plugins()
        from sglang_twilight import plugin
        print(json.dumps({"registered": plugin.is_registered()}))
        """,
        env=_env(SGLANG_PLUGINS="someone_else"),
    )
    assert res["registered"] is False


def test_launcher_keeps_plugin_in_whitelist(monkeypatch):
    from sglang_twilight import launch_server as L

    monkeypatch.setenv("SGLANG_PLUGINS", "a, b")
    L._allow_plugin_in_children()
    assert os.environ["SGLANG_PLUGINS"] == "a,b,twilight"
    monkeypatch.setenv("SGLANG_PLUGINS", "")
    L._allow_plugin_in_children()
    assert os.environ["SGLANG_PLUGINS"] == ""  # empty = no whitelist = all plugins


# --------------------------------------------------------------------------- spawned child


def _spawned_child(expected: dict, conn) -> None:
    """Runs in a *spawned* process: nothing registered in the parent exists here."""
    try:
        from sglang_twilight.config import get_config

        out = {"config": get_config().to_dict() == expected}
        from sglang_twilight import plugin

        out["registered_before"] = plugin.is_registered()
        from sglang.srt.plugins import load_plugins

        load_plugins()  # SGLang's own, as the scheduler process runs it first thing
        out["registered_after"] = plugin.is_registered()
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

        out["factory"] = ATTENTION_BACKENDS.get("twilight") is plugin.create_twilight_backend
        conn.send(out)
    except BaseException as e:  # report, never hang the parent
        conn.send({"error": repr(e)})
    finally:
        conn.close()


def test_config_and_registration_reach_a_spawned_child(monkeypatch):
    cfg = TwilightConfig(top_p=0.8, selector="quest", budget=2048, page_size=32, dense_layers=3,
                         min_sparse_len=512, min_budget=16, max_budget=1024)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    # what the launcher does before SGLang spawns its schedulers, undone after the test (the
    # config left in os.environ would change every later test's ServerArgs page size)
    monkeypatch.setenv(ENV_VAR, cfg.to_env({}))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_spawned_child, args=(cfg.to_dict(), child))
    p.start()
    child.close()
    assert parent.poll(300), "spawned child did not answer"
    out = parent.recv()
    p.join(60)
    assert "error" not in out, out
    assert out == {"config": True, "registered_before": False, "registered_after": True, "factory": True}


# --------------------------------------------------------------------------- in-process


def test_register_is_idempotent():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    from sglang_twilight import plugin

    for _ in range(3):
        plugin.register()
    assert ATTENTION_BACKEND_CHOICES.count("twilight") == 1
    assert ATTENTION_BACKENDS["twilight"] is plugin.create_twilight_backend
    from sglang_twilight.srt_patches import server_args

    hooks = [h for _, h, _ in HookRegistry._hooks.get(server_args.TARGET, [])]
    assert hooks.count(server_args.post_init_hook) == 1
    assert plugin.is_registered()


def test_factory_imports_backend_lazily(monkeypatch):
    from sglang_twilight import plugin

    made = []

    class FakeBackend:
        def __init__(self, runner):
            made.append(runner)

    fake = types.ModuleType("sglang_twilight.backend")
    fake.TwilightAttnBackend = FakeBackend
    monkeypatch.setitem(sys.modules, "sglang_twilight.backend", fake)
    runner = object()
    backend = plugin.create_twilight_backend(runner)
    assert isinstance(backend, FakeBackend) and made == [runner]


def test_importing_plugin_module_is_cheap():
    res = _run_script(
        """
        import json, sys
        import sglang_twilight.plugin
        print(json.dumps(sorted(m for m in ("torch", "sglang") if m in sys.modules)))
        """
    )
    assert res == []


def test_sglang_version_guard(monkeypatch):
    import sglang_twilight.srt_patches as sp

    assert sp.SGLANG_VERSION == "0.5.17"
    assert sp.check_sglang_version().split("+")[0] == "0.5.17"
    monkeypatch.delenv(sp.SKIP_CHECK_ENV, raising=False)
    monkeypatch.setattr(sp, "installed_sglang_version", lambda: "0.5.16")
    with pytest.raises(sp.SGLangVersionError) as ei:
        sp.check_sglang_version()
    msg = str(ei.value)
    assert "0.5.16" in msg and "0.5.17" in msg and "\n" not in msg
    monkeypatch.setattr(sp, "installed_sglang_version", lambda: "0.5.17+cu130")
    assert sp.check_sglang_version() == "0.5.17+cu130"
    monkeypatch.setattr(sp, "installed_sglang_version", lambda: None)
    with pytest.raises(sp.SGLangVersionError, match="not installed"):
        sp.check_sglang_version()
    monkeypatch.setattr(sp, "installed_sglang_version", lambda: "0.6.0")
    monkeypatch.setenv(sp.SKIP_CHECK_ENV, "1")
    assert sp.check_sglang_version() == "0.6.0"
