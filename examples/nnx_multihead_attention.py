"""Sparse attention inside `flax.nnx.MultiHeadAttention`, compared with its dense attention.

Two layers with the same weights (same seed): one keeps nnx's dense `dot_product_attention`,
the other gets `attention_fn=nnx_attention_fn(pattern)`. Both are called with `is_causal=True`
on the same input. A pattern whose budget covers the whole prompt reproduces dense attention;
a small one computes a fraction of the causal tiles and differs from dense by what it skips.

    .venv/bin/python examples/nnx_multihead_attention.py   # CPU, a few seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minference_jax import AShape, BlockSparse, build_sparse_index, nnx_attention_fn


def make_layer(attention_fn=nnx.dot_product_attention) -> nnx.MultiHeadAttention:
    # 8 query heads sharing 2 kv heads (GQA), head_dim 32; the same seed gives the same weights.
    return nnx.MultiHeadAttention(
        num_heads=8,
        num_kv_heads=2,
        in_features=256,
        attention_fn=attention_fn,
        decode=False,
        rngs=nnx.Rngs(0),
    )


def relative_difference(a: jax.Array, b: jax.Array) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(seq_len: int = 2000) -> dict[str, float]:
    x = jax.random.normal(jax.random.key(1), (2, seq_len, 256))  # [batch, length, features]
    dense = make_layer()(x, is_causal=True)
    results = {}
    for name, pattern in {
        "whole-prompt A-shape": AShape(n_init=0, n_local=seq_len),
        "AShape(64, 256)": AShape(n_init=64, n_local=256),
        "BlockSparse(top_k=4)": BlockSparse(top_k=4),
    }.items():
        layer = make_layer(nnx_attention_fn(pattern))
        sparse = layer(x, is_causal=True)
        index = build_sparse_index(layer.query(x), layer.key(x), pattern)
        results[name] = relative_difference(sparse, dense)
        print(
            f"{name:>24}: {float(index.computed_fraction()):6.1%} of the causal tiles, "
            f"relative difference to dense {results[name]:.2e}"
        )
    return results


if __name__ == "__main__":
    main()
