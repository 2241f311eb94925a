"""HF tensor name <-> our parameter path, one readable table per family (HF folders -> our models).

Our paths name the Flax NNX state of `minference_jax.models.CausalLM`:
`embed`, `layers.{i}.input_norm.scale`, `layers.{i}.attn.{q,k,v,o}_proj.{kernel,bias}`,
`layers.{i}.post_attn_norm.scale`, `layers.{i}.mlp.{gate,up,down}_proj.kernel`,
`final_norm.scale`, `lm_head.kernel`. HF linear weights are [out, in]; our kernels are [in, out].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from minference_jax.models.config import ModelConfig

# (array, config) -> one array per target path; and back.
Split = Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]
Join = Callable[[tuple[np.ndarray, ...], ModelConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # regex over the HF name; "(\d+)" captures the layer number
    ours: tuple[str, ...]  # our path(s), "{layer}" filled from the capture
    split: Split
    join: Join


def _same(x, _):
    return (x,)


def _same_back(xs, _):
    return xs[0]


def _transpose(x, _):
    return (x.T,)


def _transpose_back(xs, _):
    return xs[0].T


def _split_qkv(x, c: ModelConfig):  # Phi-3 qkv_proj [(H + 2 Hkv) D, hidden]
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q, k, v = np.split(x, [q_rows, q_rows + kv_rows], axis=0)
    if v.shape[0] != kv_rows:
        raise ValueError(f"qkv_proj has {x.shape[0]} rows, expected {q_rows + 2 * kv_rows}")
    return q.T, k.T, v.T


def _join_qkv(xs, _):
    return np.concatenate([x.T for x in xs], axis=0)


def _split_halves(x, c: ModelConfig):  # Phi-3 gate_up_proj [2 I, hidden]: gate first
    if x.shape[0] != 2 * c.intermediate_size:
        raise ValueError(f"gate_up_proj has {x.shape[0]} rows, expected {2 * c.intermediate_size}")
    gate, up = np.split(x, 2, axis=0)
    return gate.T, up.T


def _layer(hf: str, ours: str, split=_transpose, join=_transpose_back) -> Rule:
    return Rule(rf"model\.layers\.(\d+)\.{hf}", (f"layers.{{layer}}.{ours}",), split, join)


_COMMON = [
    Rule(r"model\.embed_tokens\.weight", ("embed",), _same, _same_back),
    Rule(r"model\.norm\.weight", ("final_norm.scale",), _same, _same_back),
    Rule(r"lm_head\.weight", ("lm_head.kernel",), _transpose, _transpose_back),
    _layer(r"input_layernorm\.weight", "input_norm.scale", _same, _same_back),
    _layer(r"post_attention_layernorm\.weight", "post_attn_norm.scale", _same, _same_back),
    _layer(r"self_attn\.o_proj\.weight", "attn.o_proj.kernel"),
    _layer(r"mlp\.down_proj\.weight", "mlp.down_proj.kernel"),
]
_SEPARATE_QKV_MLP = [
    _layer(r"self_attn\.q_proj\.weight", "attn.q_proj.kernel"),
    _layer(r"self_attn\.k_proj\.weight", "attn.k_proj.kernel"),
    _layer(r"self_attn\.v_proj\.weight", "attn.v_proj.kernel"),
    _layer(r"mlp\.gate_proj\.weight", "mlp.gate_proj.kernel"),
    _layer(r"mlp\.up_proj\.weight", "mlp.up_proj.kernel"),
]
_QKV_BIAS = [
    _layer(r"self_attn\.q_proj\.bias", "attn.q_proj.bias", _same, _same_back),
    _layer(r"self_attn\.k_proj\.bias", "attn.k_proj.bias", _same, _same_back),
    _layer(r"self_attn\.v_proj\.bias", "attn.v_proj.bias", _same, _same_back),
]
_PHI3_FUSED = [
    Rule(
        r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight",
        tuple(f"layers.{{layer}}.attn.{p}_proj.kernel" for p in "qkv"),
        _split_qkv,
        _join_qkv,
    ),
    Rule(
        r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight",
        ("layers.{layer}.mlp.gate_proj.kernel", "layers.{layer}.mlp.up_proj.kernel"),
        _split_halves,
        _join_qkv,
    ),
]

RULES = {
    "llama": _COMMON + _SEPARATE_QKV_MLP + _QKV_BIAS,  # biases only where attention_bias
    "qwen2": _COMMON + _SEPARATE_QKV_MLP + _QKV_BIAS,
    "phi3": _COMMON + _PHI3_FUSED,
}
# Buffers some checkpoints carry that are recomputed here.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def match(name: str, family: str) -> tuple[Rule, tuple[str, ...]] | None:
    """The rule for an HF tensor name and its concrete target paths (None if no rule)."""
    for rule in RULES[family]:
        m = re.fullmatch(rule.hf, name)
        if m:
            layer = m.group(1) if m.groups() else None
            return rule, tuple(p.format(layer=layer) for p in rule.ours)
    return None
