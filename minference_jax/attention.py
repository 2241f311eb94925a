"""Public attention API: `sparse_attention(q, k, v, patterns, *, implementation=...)`.

Dispatch lives here and only here: which backend runs, and when a layer is plain dense.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from minference_jax import patterns as P
from minference_jax.index_approx import IndexPlan, build_planned_index, plan_index
from minference_jax.reference import (
    sparse_attention_reference,
    sparse_attention_xla,
)
from minference_jax.sparse_index import SparseIndex
from pallas_kernels.sparse_flash import sparse_flash_attention

# GPU dispatch (implementation=None), decided from the estimated index, not the prompt length:
# - up to DENSE_CROSSOVER_TOKENS a layer runs dense cuDNN without estimating an index (the
#   estimate would cost more than any sparse gain could return);
# - longer, the index is estimated on device and the layer runs the sparse kernel only if it
#   computes at most `dense_fallback_fraction(seq_len)` of the causal tiles, else cuDNN (per
#   layer, no host round trip). The sparse kernel computes a tile at ~60-80% of cuDNN's dense
#   rate, and up to SHORT_PROMPT_TOKENS the estimate weighs more against the quadratic part, so
#   short prompts need a sparser index. Tune all three from an e2e GPU run at 8K-32K: a layer
#   that estimates and then falls back costs the estimate (<= ~3% of the layer is the goal).
DENSE_CROSSOVER_TOKENS = 8192
SHORT_PROMPT_TOKENS = 32768
SHORT_PROMPT_FALLBACK_FRACTION = 0.3
DENSE_FALLBACK_FRACTION = 0.5


def dense_fallback_fraction(seq_len: int) -> float:
    """Largest computed-tile fraction at which a GPU layer of `seq_len` tokens runs sparse."""
    if seq_len <= SHORT_PROMPT_TOKENS:
        return SHORT_PROMPT_FALLBACK_FRACTION
    return DENSE_FALLBACK_FRACTION


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _short_gpu_prompt(seq_len: int) -> bool:
    return _on_gpu() and seq_len <= DENSE_CROSSOVER_TOKENS


IMPLEMENTATIONS = ("pallas", "xla", "reference")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_attention_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Raise a clear error for inputs the attention paths do not accept."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    b, n, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, n, d):
        raise ValueError(
            f"q {q.shape} and k {k.shape} must agree on batch, seq (causal prefill: q_len == "
            "kv_len) and head_dim"
        )
    if n == 0:
        raise ValueError("empty sequence: seq length must be >= 1")
    if hq % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({hq})")


def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    patterns: P.Pattern | Sequence[P.Pattern],
    *,
    softmax_scale: float | None = None,
    implementation: str | None = None,
    block_q: int = 64,
    block_kv: int = 64,
    index: SparseIndex | None = None,
) -> jax.Array:
    """Causal prefill attention where each query head follows its sparse pattern.

    Args:
      q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim] with kv_heads
        dividing q_heads (query head h reads kv head h // (q_heads // kv_heads)). Causal with
        q_len == kv_len: query i attends keys j <= i that its pattern selects.
      patterns: one pattern for all heads, or one per query head (static).
      softmax_scale: defaults to head_dim ** -0.5.
      implementation: "pallas" (the Pallas-Triton kernel; GPU, or CPU in interpret mode),
        "xla" (gathered sparse in plain XLA, any backend), "reference" (masked dense, O(N^2)
        memory, the oracle) or None: layers whose heads are all Dense, and on GPU prompts
        of at most DENSE_CROSSOVER_TOKENS, go to `jax.nn.dot_product_attention` (cuDNN);
        on GPU the rest run "pallas" unless the estimated index computes more than
        `dense_fallback_fraction(seq_len)` of the causal tiles (then cuDNN); elsewhere "xla".
      index: a precomputed SparseIndex (otherwise estimated from q and k here).
    Returns:
      [batch, seq, q_heads, head_dim] in q.dtype.
    """
    check_attention_inputs(q, k, v)
    patterns = P.normalize_layer_patterns(patterns, q.shape[2])
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}"
        )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if index is not None:
        if (index.seq_len, index.num_heads) != (q.shape[1], q.shape[2]):
            raise ValueError(
                f"index is for seq {index.seq_len} x {index.num_heads} heads, inputs have "
                f"seq {q.shape[1]} x {q.shape[2]} heads"
            )
        return _attend_jit(q, k, v, index, scale=scale, implementation=implementation)
    plan, budgets = layer_plan(
        patterns, q.shape[1], q.shape[2], implementation, block_q=block_q, block_kv=block_kv
    )
    return _planned_jit(q, k, v, budgets, plan=plan, scale=scale, implementation=implementation)


def layer_plan(patterns, seq_len, num_heads, implementation, *, block_q=64, block_kv=64):
    """(IndexPlan, budgets) of a layer, or (None, None) when it simply runs dense attention."""
    patterns = P.normalize_layer_patterns(patterns, num_heads)
    if implementation is None and (
        all(isinstance(p, P.Dense) for p in patterns) or _short_gpu_prompt(seq_len)
    ):
        return None, None
    return plan_index(patterns, seq_len, num_heads, block_q=block_q, block_kv=block_kv)


def planned_attention(q, k, v, budgets, *, plan: IndexPlan | None, scale: float, implementation):
    """Jit-friendly core: static plan (None: every head dense), traced per-head budgets.

    Models call this inside their jitted layer step, so layers whose patterns differ only in
    budgets share one compiled program.
    """
    if plan is None or (implementation is None and _short_gpu_prompt(q.shape[1])):
        return _dense_causal(q, k, v, scale)
    index = build_planned_index(q, k, budgets, plan=plan, scale=scale)
    return attend_with_index(q, k, v, index, scale=scale, implementation=implementation)


def attend_with_index(q, k, v, index: SparseIndex, *, scale: float, implementation):
    """Attention under a given index with the chosen backend (None: pallas-or-cuDNN / xla)."""
    if implementation is None:
        n = q.shape[1]
        if not _on_gpu():
            return sparse_attention_xla(q, k, v, index, softmax_scale=scale)
        return _sparse_or_dense(q, k, v, index, scale, max_fraction=dense_fallback_fraction(n))
    if implementation == "reference":
        return sparse_attention_reference(q, k, v, index, softmax_scale=scale)
    if implementation == "pallas":
        return sparse_flash_attention(q, k, v, index, softmax_scale=scale, interpret=not _on_gpu())
    return sparse_attention_xla(q, k, v, index, softmax_scale=scale)


def _sparse_or_dense(
    q, k, v, index, scale, interpret=False, max_fraction: float = DENSE_FALLBACK_FRACTION
):
    """The Pallas kernel, or cuDNN when the index computes more than `max_fraction` of the
    causal tiles (decided on device: the kernel computes a tile at ~60-80% of cuDNN's rate)."""
    return jax.lax.cond(
        index.computed_fraction() > max_fraction,
        lambda: _dense_causal(q, k, v, scale),
        lambda: sparse_flash_attention(q, k, v, index, softmax_scale=scale, interpret=interpret),
    )


def _dense_causal(q, k, v, scale):
    """Dense causal attention: cuDNN flash attention on GPU for 16-bit inputs.

    `jax.nn.dot_product_attention` with implementation=None picks XLA, which materialises the
    [B, H, N, N] scores (128 GiB at 32K tokens x 32 heads): never let a GPU prefill go there.
    """
    use_cudnn = _on_gpu() and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, implementation="cudnn" if use_cudnn else None
    )


_planned_jit = jax.jit(planned_attention, static_argnames=("plan", "scale", "implementation"))
_attend_jit = jax.jit(attend_with_index, static_argnames=("scale", "implementation"))
