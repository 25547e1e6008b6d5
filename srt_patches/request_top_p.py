"""SGLang hooks for the per-request p (``custom_params["top_p_attn"]``), sglang 0.5.17.

Both are AFTER hooks registered through SGLang's own ``HookRegistry`` (``load_plugins()``
applies them once per process, right after the plugins ran):

* ``SamplingParams.verify`` (``sampling/sampling_params.py:151``), called by
  ``TokenizerManager._create_tokenized_object`` (``managers/tokenizer_manager.py:1341``) in
  the HTTP / Engine process for ``/generate`` and the OpenAI endpoints: a bad ``top_p_attn``
  raises ``ValueError`` naming the field, which SGLang answers with HTTP 400
  (``entrypoints/http_server.py:912-919``, ``entrypoints/openai/serving_base.py:114-119``).
* ``ForwardBatch.init_new`` (``model_executor/forward_batch_info.py:706``, a classmethod
  taking the ``ScheduleBatch``), called once per batch on the forward path
  (``managers/tp_worker.py:573``; under the overlap scheduler inside the forward stream,
  ``managers/scheduler.py:3565-3594``): for every batch that is not decode/idle (extend,
  mixed, split prefill — every request passes one with the ``req_pool_idx`` it then decodes
  with), the requests' p go into the live ``RequestTopP`` tables. ``Req.__init__`` copies
  ``custom_params`` and adds ``"__req__"`` (``managers/schedule_batch.py:876-881``); only our
  key is read.
"""

from __future__ import annotations

from typing import Any

from sglang_twilight.srt_patches import check_sglang_version

VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
INIT_NEW_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"

_registered = False


def _verify_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``SamplingParams.verify``: check ``custom_params["top_p_attn"]`` if present."""
    custom = getattr(self, "custom_params", None)
    if isinstance(custom, dict):
        from sglang_twilight.config import REQUEST_TOP_P_FIELD, validate_request_top_p

        if REQUEST_TOP_P_FIELD in custom:
            validate_request_top_p(custom[REQUEST_TOP_P_FIELD])  # ValueError -> HTTP 400
    return None


def _init_new_hook(result: Any, cls: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``ForwardBatch.init_new(batch, model_runner, ...)``: admit the batch's requests
    into the per-request p tables (extend-type batches only)."""
    from sglang_twilight.request_params import _ACTIVE, admit_requests

    if not _ACTIVE:  # twilight backend not in this process: nothing to do
        return None
    mode = getattr(batch, "forward_mode", None)
    if mode is None or mode.is_decode_or_idle():
        return None
    admit_requests(getattr(batch, "reqs", None) or [])
    return None


def register_hooks() -> None:
    """Register both hooks with SGLang's HookRegistry (once per process; never applies
    them — ``load_plugins()`` does)."""
    global _registered
    if _registered:
        return
    check_sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(VERIFY_TARGET, _verify_hook, HookType.AFTER)
    HookRegistry.register(INIT_NEW_TARGET, _init_new_hook, HookType.AFTER)
    _registered = True


__all__ = ["INIT_NEW_TARGET", "VERIFY_TARGET", "register_hooks"]
