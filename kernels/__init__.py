"""The kernels of a Twilight decode step, one module per stage, in the order the data flows.

Each stage module holds its Triton kernel(s), the plain-torch reference that defines what they
compute (``*_ref``, runs anywhere), and a docstring with the shapes and dtypes of its arguments.
``sglang_twilight.ops`` is the functional API over them; ``sglang_twilight.backend`` calls it
from SGLang.

==============  ==========================================================================
module          stage
==============  ==========================================================================
``store``       int4 keys and the Quest page bounds of every KV slot, written with the KV
``select``      Quest page scores (a GQA upper bound of q . k per page), the top-K pages
``estimate``    q . int4 keys over the candidates, and each program's softmax partials
``topp``        softmax, the threshold search, each q head's kept set (marked per row)
``union``       union over the GQA group, the min / max budget clamps, the compaction
``attend``      exact split-K attention over the kept slots
``prune``       ``estimate`` -> ``topp`` -> ``union`` as one call (Twilight's pruner)
``launch``      every launch shape, one table, each with the measurement that chose it
==============  ==========================================================================

Imports follow the data path: a stage imports only from stages before it, ``launch`` and
``store`` (its buffers), except that ``select`` and ``union`` use the threshold search of
``topp`` for their top-K. docs/KERNELS.md describes the kernels and why each design won.
"""
