"""The reference implementation: the executable spec, slow and obvious (fp32/fp64, eager attention).

Every function implementing a spec rule names the rule ID in the first line of its docstring.
"""

from . import (  # noqa: F401  (register the "twig" and "clse" scorers and the "ssd" strategy)
    compat,  # first: refuses an unsupported transformers before anything else touches it
    scoring_clse,
    scoring_twig,
    ssd,
)
from .decode import decode_step, greedy_generate
from .host import (
    HOSTS,
    AttentionParts,
    Host,
    ImageSpan,
    LlavaHost,
    RotaryIds,
    SampleLayout,
    host_for,
    register_host,
)
from .host_qwen import Qwen2_5_VLHost
from .host_qwen2 import Qwen2VLHost
from .host_qwen3 import Qwen3_5Host, Qwen3VLHost
from .nuwa import NuwaParams
from .presets import PRESETS, preset
from .routing import PrefillResult, Reference, SampleCache, run_block
from .schedule import POLICIES, ClseParams, RoutingConfig, RoutingError, Schedule, Scorer
from .selection import ForcedSelection, candidate_pool, capped_k, forced_choice, select_topk
from .trace import Decision, SampleTrace, Trace
from .twig import Twig

__all__ = [
    "HOSTS",
    "POLICIES",
    "PRESETS",
    "AttentionParts",
    "ClseParams",
    "Decision",
    "ForcedSelection",
    "Host",
    "ImageSpan",
    "LlavaHost",
    "NuwaParams",
    "PrefillResult",
    "Qwen2VLHost",
    "Qwen2_5_VLHost",
    "Qwen3VLHost",
    "Qwen3_5Host",
    "Reference",
    "RotaryIds",
    "RoutingConfig",
    "RoutingError",
    "SampleCache",
    "SampleLayout",
    "SampleTrace",
    "Schedule",
    "Scorer",
    "Trace",
    "Twig",
    "candidate_pool",
    "capped_k",
    "compat",
    "decode_step",
    "forced_choice",
    "greedy_generate",
    "host_for",
    "preset",
    "register_host",
    "run_block",
    "select_topk",
]
