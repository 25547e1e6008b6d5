"""Two CUDA graphs per decode batch size: one where the sparse layers run Twilight, one where they
run FlashInfer's dense decode (``--twilight-dispatch auto``, sglang_twilight/dispatch.py).

SGLang 0.5.17's decode graph runner already keys its graphs by a ``ShapeKey(size, stream_idx,
variant_label)`` and records LoRA / no-LoRA variants of each batch size
(``model_executor/runner/decode_cuda_graph_runner.py``: ``_capture_one_stream`` calls
``capture_one_shape(bs, forward, stream_idx, variant_label)`` once per variant, and ``load_batch``
picks the replay key through ``_resolve_lora_variant(forward_batch)`` right after the attention
backend's ``init_forward_metadata_out_graph``). Two AROUND hooks extend that:

* ``capture_one_shape``: when the runner's attention backend is twilight with both ways live,
  capture the shape twice, first with the backend set to the dense way, then to the sparse way,
  under the labels ``twilight-dense`` / ``twilight-sparse`` (appended to a LoRA label if any).
* ``_resolve_lora_variant``: append the label of the way the backend chose for this step in
  ``init_forward_metadata_out_graph`` (host side, from ``seq_lens_cpu``), so the replay takes
  that graph. No device work, no sync.

Any other backend, or a forced ``--twilight-dispatch``, is left exactly as SGLang records it.
"""

from __future__ import annotations

from typing import Any, Optional

from sglang_twilight.srt_patches import register_once

_RUNNER = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
CAPTURE_TARGET = f"{_RUNNER}.capture_one_shape"
VARIANT_TARGET = f"{_RUNNER}._resolve_lora_variant"
LABELS = {False: "twilight-dense", True: "twilight-sparse"}


def _twilight_of(runner: Any) -> Optional[Any]:
    """The runner's TwilightDecoder when its steps may go either way, else None."""
    decoder = getattr(getattr(runner, "attn_backend", None), "twilight", None)
    policy = getattr(decoder, "policy", None)
    return decoder if policy is not None and policy.both_ways else None


def variant_label(base: Optional[str], sparse: bool) -> str:
    """The graph label of a way, after SGLang's own label (LoRA) if any."""
    return LABELS[bool(sparse)] if base is None else f"{base}+{LABELS[bool(sparse)]}"


def capture_one_shape_hook(original, self, size, forward, stream_idx=None, variant_label_=None,
                           **kwargs):
    """AROUND ``capture_one_shape``: both ways of a twilight backend, else unchanged."""
    if "variant_label" in kwargs:
        variant_label_ = kwargs.pop("variant_label")
    decoder = _twilight_of(self)
    if decoder is None:
        return original(self, size, forward, stream_idx, variant_label_, **kwargs)
    out = None
    for sparse in (False, True):
        decoder.set_capture_way(sparse)
        out = original(self, size, forward, stream_idx, variant_label(variant_label_, sparse),
                       **kwargs)
    return out


def resolve_variant_hook(original, self, forward_batch):
    """AROUND ``_resolve_lora_variant``: add the label of the way this step runs."""
    label = original(self, forward_batch)
    decoder = _twilight_of(self)
    return label if decoder is None else variant_label(label, decoder.step_sparse)


def register() -> None:
    """Register both hooks with SGLang's HookRegistry (once per process; ``load_plugins()``
    applies them)."""
    register_once(__name__, [(CAPTURE_TARGET, capture_one_shape_hook, "AROUND"),
                             (VARIANT_TARGET, resolve_variant_hook, "AROUND")])


__all__ = ["CAPTURE_TARGET", "LABELS", "VARIANT_TARGET", "register", "variant_label"]
