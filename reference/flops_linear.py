"""FLOPs and state bytes of a linear-attention (Gated DeltaNet) layer (spec/budget.md, Qwen3.5).

The true count of a hybrid decoder's linear layers ([budget.flops.linear]) and the bytes of their
fixed-size cache state ([budget.kv.state-bytes]). Shapes from :class:`~rerouting.reference.archs.ArchSpec`:
d hidden, m intermediate, H_k / H_v key / value heads of d_k / d_v dims, K the conv kernel,
C = 2·H_k·d_k + H_v·d_v the conv channels. Source: transformers 5.24 ``Qwen3_5GatedDeltaNet``.
"""

from __future__ import annotations

import torch

from .archs import ArchSpec
from .flops import _count

LINEAR_COMPONENTS: tuple[str, ...] = ("proj_in", "conv", "recurrence", "proj_out", "mlp")
#: The recurrent state's element size: transformers keeps it in float32 whatever the model dtype.
RECURRENT_STATE_DTYPE = torch.float32


def conv_channels(arch: ArchSpec) -> int:
    """C = 2·H_k·d_k + H_v·d_v: the q, k and v channels the causal conv runs over."""
    return 2 * arch.linear_key_heads * arch.linear_key_dim + arch.linear_value_heads * arch.linear_value_dim


def linear_layer_flops_true(arch: ArchSpec, n: int) -> dict[str, int]:
    """[budget.flops.linear] True FLOPs of one Gated DeltaNet layer over n tokens, by component (2 per MAC).

    - ``proj_in`` 2·n·d·(C + H_v·d_v + 2·H_v): ``in_proj_qkv``, ``in_proj_z`` and the two per-head scalars
      ``in_proj_b``/``in_proj_a``;
    - ``conv`` 2·n·C·K: the depthwise causal convolution;
    - ``recurrence`` 6·n·H_v·d_k·d_v: per token and value head, the delta rule's read ``Sᵀk``, its rank-1
      update and the output read ``Sᵀq`` (d_k·d_v multiply-adds each), the recurrent form's count (the
      chunked kernel computes the same result);
    - ``proj_out`` 2·n·H_v·d_v·d; ``mlp`` 3·2·n·d·m (SwiGLU).

    Linear in n: no n² term. Not counted: norms, gates, the l2-norm of q/k, the decay and β activations.
    """
    n = _count(n)
    d, m = arch.hidden_size, arch.intermediate_size
    values = arch.linear_value_heads * arch.linear_value_dim
    channels = conv_channels(arch)
    return {
        "proj_in": 2 * n * d * (channels + values + 2 * arch.linear_value_heads),
        "conv": 2 * n * channels * arch.linear_conv_kernel,
        "recurrence": 6 * n * arch.linear_value_heads * arch.linear_key_dim * arch.linear_value_dim,
        "proj_out": 2 * n * values * d,
        "mlp": 3 * 2 * n * d * m,
    }


def linear_state_bytes(arch: ArchSpec, dtype: torch.dtype = torch.float16) -> int:
    """[budget.kv.state-bytes] Bytes of one linear layer's cache for one sample, whatever the tokens it ran on.

    The conv state C·K in ``dtype`` (the model's) plus the recurrent state H_v·d_k·d_v in float32.
    Qwen3.5-9B (C = 8192, K = 4; 32·128·128), bf16: 65536 + 2097152 = 2162688 bytes per layer.
    """
    conv = conv_channels(arch) * arch.linear_conv_kernel * dtype.itemsize
    recurrent = arch.linear_value_heads * arch.linear_key_dim * arch.linear_value_dim
    return conv + recurrent * RECURRENT_STATE_DTYPE.itemsize
