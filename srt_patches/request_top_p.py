"""SGLang hooks for the per-request p (``custom_params["top_p_attn"]``), sglang 0.5.17.

All four are registered through SGLang's own ``HookRegistry`` (``load_plugins()`` applies
them once per process, right after the plugins ran):

* AFTER ``SamplingParams.verify`` (``sampling/sampling_params.py:151``), called by
  ``TokenizerManager._create_tokenized_object`` (``managers/tokenizer_manager.py:1341``) in
  the HTTP / Engine process for ``/generate`` and the OpenAI endpoints, before the request
  reaches the scheduler: a bad ``top_p_attn`` raises ``ValueError`` naming the field, which
  SGLang answers with HTTP 400 (``entrypoints/http_server.py:912-919``,
  ``entrypoints/openai/serving_base.py:114-119``). The OpenAI streaming handlers run the
  request generator up to its first chunk before they answer 200
  (``serving_completions.py:197-204``, ``serving_chat.py:1442-1450``), so this check gives
  their streams a 400 too.
* BEFORE ``TokenizerManager.create_abort_task(obj)`` (``managers/tokenizer_manager.py:2134``):
  a streaming ``/generate`` builds its ``StreamingResponse`` (status 200) before the request
  generator, hence ``verify``, ever runs, and SGLang then reports a ``ValueError`` as an error
  event inside the 200 stream (``entrypoints/http_server.py:878-910``). ``create_abort_task``
  is the one call every streaming endpoint makes synchronously while building that response
  (``/generate``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/messages``); a bad
  ``top_p_attn`` raises ``HTTPException(400)`` there, which SGLang's handlers answer with 400
  (``entrypoints/http_server.py:523-576``, ``serving_base.py:111-113``). Nothing has been sent
  to the scheduler at that point.
* AROUND ``ORJSONRequest.json`` (``entrypoints/http_server.py:433-442``; every route's body
  goes through it, ``:445-459``), in the launching process only (where SGLang serves HTTP;
  the scheduler processes never parse a body, and importing ``http_server`` there would only
  cost start-up time): orjson refuses ``NaN``, ``Infinity``, ``1e400`` and integers beyond 64
  bits anywhere in a body, and FastAPI answers 400 with a byte offset. When such a body holds
  a bad ``top_p_attn`` (e.g. ``NaN`` or ``10**400``), the 400 names the field instead
  (``HTTPException``, re-raised by FastAPI's body reader, ``fastapi/routing.py:504-506``). A
  body orjson reads is never touched.
* AFTER ``ForwardBatch.init_new`` (``model_executor/forward_batch_info.py:706``, a classmethod
  taking the ``ScheduleBatch``), called once per batch on the forward path
  (``managers/tp_worker.py:573``; under the overlap scheduler inside the forward stream,
  ``managers/scheduler.py:3565-3594``): for every batch that is not decode/idle (extend,
  mixed, split prefill — every request passes one with the ``req_pool_idx`` it then decodes
  with), the requests' p go into the live ``RequestTopP`` tables. ``Req.__init__`` copies
  ``custom_params`` and adds ``"__req__"`` (``managers/schedule_batch.py:876-881``); only our
  key is read.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from sglang_twilight.srt_patches import register_once

VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
INIT_NEW_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
ABORT_TASK_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager.create_abort_task"
JSON_TARGET = "sglang.srt.entrypoints.http_server.ORJSONRequest.json"


def _verify_hook(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``SamplingParams.verify``: check ``custom_params["top_p_attn"]`` if present."""
    custom = getattr(self, "custom_params", None)
    if isinstance(custom, dict):
        from sglang_twilight.config import REQUEST_TOP_P_FIELD, validate_request_top_p

        if REQUEST_TOP_P_FIELD in custom:
            validate_request_top_p(custom[REQUEST_TOP_P_FIELD])  # ValueError -> HTTP 400
    return None


def _abort_task_hook(self: Any, obj: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``TokenizerManager.create_abort_task(obj)`` (streaming endpoints, before the
    200): a bad ``top_p_attn`` in ``obj.sampling_params`` is an HTTP 400 naming the field."""
    from sglang_twilight.request_params import check_sampling_params

    try:
        check_sampling_params(getattr(obj, "sampling_params", None))
    except ValueError as e:
        from fastapi import HTTPException

        raise HTTPException(status_code=400, detail=str(e)) from None
    return None


async def _json_hook(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``ORJSONRequest.json``: a body orjson refuses is a 400 naming ``top_p_attn``
    when that is what is wrong with it; otherwise SGLang's own error stands."""
    import json

    try:
        return await original(self, *args, **kwargs)
    except json.JSONDecodeError:  # orjson.JSONDecodeError subclasses it
        from sglang_twilight.request_params import top_p_error_in_body

        detail = top_p_error_in_body(await self.body())
        if detail is None:
            raise
        from fastapi import HTTPException

        raise HTTPException(status_code=400, detail=detail) from None


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
    """Register the hooks with SGLang's HookRegistry (once per process; never applies
    them — ``load_plugins()`` does)."""
    hooks = [(VERIFY_TARGET, _verify_hook, "AFTER"),
             (ABORT_TASK_TARGET, _abort_task_hook, "BEFORE"),
             (INIT_NEW_TARGET, _init_new_hook, "AFTER")]
    if multiprocessing.parent_process() is None:  # the launching process serves HTTP
        hooks.append((JSON_TARGET, _json_hook, "AROUND"))
    register_once(__name__, hooks)


__all__ = ["ABORT_TASK_TARGET", "INIT_NEW_TARGET", "JSON_TARGET", "VERIFY_TARGET", "register_hooks"]
