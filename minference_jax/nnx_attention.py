"""Sparse attention as the `attention_fn` of `flax.nnx.MultiHeadAttention`.

`nnx.MultiHeadAttention` calls its `attention_fn(query, key, value, **options)` with
[batch, length, heads, head_dim] arrays, the same layout `sparse_attention` takes, plus keyword
options (mask, dropout, dtype, ...). `nnx_attention_fn(patterns)` returns such a function. The
sparse attention is causal prefill self-attention, so the layer must be built with
`decode=False` (no KV cache: decoding is not supported) and called with `is_causal=True` or
with the causal mask itself (`nnx.make_causal_mask`), and without a bias, dropout or weight
sowing; anything else raises instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from minference_jax import patterns as P
from minference_jax.attention import sparse_attention
from minference_jax.sparse_index import check_patterns

# What `sparse_options` may hold: the rest of `sparse_attention`'s keywords come from the layer.
SPARSE_OPTIONS = (
    "scale",
    "implementation",
    "block_q",
    "block_kv",
    "index",
    "query_seq_lengths",
    "key_value_seq_lengths",
)


def nnx_attention_fn(patterns: P.Pattern | Sequence[P.Pattern], **sparse_options) -> Callable:
    """An `attention_fn` for `flax.nnx.MultiHeadAttention` that runs `sparse_attention`.

    Args:
      patterns: one pattern for all query heads, or one per query head (as `sparse_attention`).
      **sparse_options: passed on to `sparse_attention`: any of SPARSE_OPTIONS.

    The layer's `mask` may be None or the causal mask (`nnx.make_causal_mask`'s, any shape that
    broadcasts; with `is_causal=True`, any mask True wherever key <= query). It is checked on
    concrete masks: any other mask raises ValueError. A mask traced under jit cannot be checked
    and raises TypeError: call the layer with `is_causal=True` and no mask there.
    """
    check_patterns(patterns)
    unknown = sorted(set(sparse_options) - set(SPARSE_OPTIONS))
    if unknown:
        raise TypeError(
            f"nnx_attention_fn got unknown options {unknown}; it passes on {list(SPARSE_OPTIONS)}"
        )

    def attention_fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        promote_dtype=None,
        is_causal: bool = False,
    ) -> jax.Array:
        del broadcast_dropout, dropout_rng, promote_dtype  # only meaningful with dropout / mixed
        if query.shape[-3] != key.shape[-3]:  # decode: one query against the whole KV cache
            raise ValueError(
                "sparse attention is prefill-only (query length == key length): decode=True "
                "(autoregressive decoding with a KV cache) and cross-attention are not "
                f"supported; got query length {query.shape[-3]}, key length {key.shape[-3]}"
            )
        if not is_causal and mask is None:
            raise ValueError(
                "sparse attention is causal: call the layer with is_causal=True (or with "
                "mask=nnx.make_causal_mask(...))"
            )
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("sparse attention has no attention dropout: use dropout_rate=0")
        if module is not None:
            raise ValueError("sparse attention never forms the attention weights to sow")
        if precision is not None:
            raise ValueError(
                "sparse attention runs at its kernels' own precision: use precision=None"
            )
        if dtype is not None:
            query, key, value = (x.astype(dtype) for x in (query, key, value))
        else:
            common = jnp.result_type(query, key, value)
            query, key, value = (x.astype(common) for x in (query, key, value))
        if mask is not None:  # Flax masks are 0/1 floats by default: nonzero attends
            mask = jnp.asarray(mask).astype(bool)
        # sparse_attention refuses a bias and any mask that would make it other than causal.
        return sparse_attention(
            query, key, value, bias, mask, patterns=patterns, is_causal=is_causal, **sparse_options
        )

    return attention_fn
