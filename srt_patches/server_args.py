"""The page size of a twilight server: SGLang's ``ServerArgs`` gets the Twilight page size.

An AROUND hook on ``ServerArgs.__post_init__`` (``sglang/srt/server_args.py``), registered with
SGLang's ``HookRegistry`` and applied by ``load_plugins()`` in every process. With the twilight
backend chosen and no ``--page-size`` given it sets ``page_size`` to the Twilight page size before
SGLang resolves its arguments — the same as passing ``--page-size`` — so that plain ``python -m
sglang.launch_server --attention-backend twilight`` gets the page size the sidecar is indexed by.
A different explicit ``--page-size``, or one SGLang changes while resolving, is an error.
"""

from __future__ import annotations

from sglang_twilight.config import FLAGS, get_config, uses_twilight
from sglang_twilight.srt_patches import register_once

TARGET = "sglang.srt.server_args.ServerArgs.__post_init__"


def post_init_hook(original_fn, self, *args, **kwargs):
    """AROUND ``ServerArgs.__post_init__``: the Twilight page size (see the module docstring)."""
    if not uses_twilight(self):
        return original_fn(self, *args, **kwargs)
    cfg = get_config()
    allowed = (
        f"{cfg.page_size}, the Twilight page size ({FLAGS['page_size']}); "
        "leave --page-size out to get it"
    )
    if self.page_size is None:
        self.page_size = cfg.page_size
    elif self.page_size != cfg.page_size:
        raise ValueError(f"--page-size: invalid value {self.page_size} (allowed: {allowed})")
    result = original_fn(self, *args, **kwargs)
    if self.page_size != cfg.page_size:
        raise ValueError(
            f"--page-size: SGLang resolved it to {self.page_size} for this model/backend "
            f"setup (allowed with the twilight backend: {allowed})"
        )
    return result


def register() -> None:
    """Register the hook (once per process; ``load_plugins()`` applies it right after every
    plugin ran — never applied here, or the target would be marked patched before other
    plugins registered their hooks)."""
    register_once(__name__, [(TARGET, post_init_hook, "AROUND")])


__all__ = ["TARGET", "post_init_hook", "register"]
