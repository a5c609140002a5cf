"""The optimized routing path: packed gathers, SDPA, batched, per-layer KV cache, ``generate``.

Same semantics as ``rerouting.reference`` (same host adapter, configs and Trace); only speed and memory differ.

    from rerouting.optimized import route, routed_prefill, greedy_generate

    result = routed_prefill(model, config, input_ids, attention_mask, pixel_values)  # logits, cache, trace
    tokens, result = greedy_generate(model, config, **inputs, max_new_tokens=16)
    with route(model, config) as router:                  # the unmodified HF calls, routed
        out = model(**inputs)
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    router.last_trace

Modules: ``routing`` (the prefill), ``scoring`` (the query-row probe), ``selection`` (top-k), ``packing``
(layouts, gathers, masks), ``cache`` (the per-layer KV cache), ``decode``, ``hf`` (the context manager),
``bench`` (``rerouting bench``).
"""

from .cache import RoutedCache
from .decode import decode_step, greedy_generate
from .hf import Router, route
from .routing import PrefillResult, routed_prefill

__all__ = [
    "PrefillResult",
    "RoutedCache",
    "Router",
    "decode_step",
    "greedy_generate",
    "route",
    "routed_prefill",
]
