"""A hand-written Flax NNX attention stack (RoPE, GQA) with per-layer patterns from a config.

Each layer's query heads follow their own pattern, read from a pattern config in the original
MInference JSON format; here the shipped `passkey_tiny_searched` config (2 layers x 4 query
heads, Vertical-Slash budgets per head). The stack is run once with those patterns and once
with every head Dense (same weights), under `nnx.jit`.

    .venv/bin/python examples/nnx_rope_gqa_block.py   # CPU, a few seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minference_jax import Dense, HeadPatterns, load_pattern_config, sparse_attention
from minference_jax.config_io import shipped_configs


def rope(x: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding of [batch, length, heads, head_dim] at positions 0..length-1."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs  # [length, half]
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]  # broadcast over heads
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE; `num_kv_heads` < `num_heads` gives grouped queries."""

    def __init__(self, hidden, num_heads, num_kv_heads, head_dim, patterns, *, rngs: nnx.Rngs):
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.patterns = tuple(patterns)  # one pattern per query head (static)
        self.q = nnx.Linear(hidden, num_heads * head_dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(hidden, num_kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(hidden, num_kv_heads * head_dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(num_heads * head_dim, hidden, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        num_heads, num_kv_heads, head_dim = self.shape
        batch, length, _ = x.shape
        q = rope(self.q(x).reshape(batch, length, num_heads, head_dim))
        k = rope(self.k(x).reshape(batch, length, num_kv_heads, head_dim))
        v = self.v(x).reshape(batch, length, num_kv_heads, head_dim)
        # [batch, length, num_heads, head_dim]
        out = sparse_attention(q, k, v, patterns=self.patterns)
        return self.o(out.reshape(batch, length, num_heads * head_dim))


class Stack(nnx.Module):
    """Pre-norm residual attention layers, layer l using `patterns[l]`."""

    def __init__(self, patterns: HeadPatterns, hidden=128, num_kv_heads=1, head_dim=32, seed=0):
        rngs = nnx.Rngs(seed)
        self.norms = nnx.List([nnx.RMSNorm(hidden, rngs=rngs) for _ in patterns.layers])
        self.layers = nnx.List(
            [
                Attention(hidden, patterns.num_heads, num_kv_heads, head_dim, heads, rngs=rngs)
                for heads in patterns.layers
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for norm, layer in zip(self.norms, self.layers, strict=True):
            x = x + layer(norm(x))
        return x


def main(seq_len: int = 2048) -> float:
    config = load_pattern_config(shipped_configs()["passkey_tiny_searched"])
    dense = HeadPatterns.uniform(Dense(), config.num_layers, config.num_heads)
    x = jax.random.normal(jax.random.key(0), (2, seq_len, 128))
    outputs = {}
    for name, patterns in (("searched config", config), ("dense", dense)):
        model = Stack(patterns)  # same seed: same weights
        outputs[name] = nnx.jit(lambda m, x: m(x))(model, x)
    for layer, heads in enumerate(config.layers):
        print(f"layer {layer}: {', '.join(map(str, heads))}")
    difference = outputs["searched config"] - outputs["dense"]
    relative = float(jnp.linalg.norm(difference) / jnp.linalg.norm(outputs["dense"]))
    print(f"{seq_len} tokens, batch 2: relative difference to dense {relative:.2e}")
    return relative


if __name__ == "__main__":
    main()
