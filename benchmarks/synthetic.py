"""Structured synthetic q/k whose attention looks like long-context LLM heads.

Random i.i.d. q/k make every head near-uniform, so an estimated vertical-slash index comes out
near-dense and says nothing about real speed. Real heads show attention sinks (a few first
tokens), a local band that decays with distance, and a few heavy tokens anywhere. This generator
builds exactly those three from named directions, per kv head, deterministic given the key:

- dims [0, D/2) carry RoPE (base 500000, as Llama-3) of a shared content vector c plus noise:
  q_i . k_j then holds |c|^2 sum_f cos((i - j) theta_f), largest at i = j and decaying with
  distance (slashes);
- dims [D/2, D) are position-free: every query holds a sink direction u and a heavy direction w;
  the first `n_sinks` keys hold u (verticals at the start), `n_heavy` random keys hold w
  (verticals anywhere);
- everything else is unit Gaussian noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _rope(x, positions, base=500000.0):
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]  # [N, half]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def structured_qk(
    key,
    batch: int,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 128,
    dtype=jnp.bfloat16,
    *,
    n_sinks: int = 4,
    n_heavy: int = 32,
    local: float = 0.8,
    sink: float = 0.9,
    heavy: float = 1.2,
):
    """(q [B, N, Hq, D], k [B, N, Hkv, D]) with sinks, local decay and heavy tokens."""
    rope_dim = nope_dim = head_dim // 2
    keys = jax.random.split(key, 7)
    group = num_heads // num_kv_heads
    content = jax.random.normal(keys[0], (batch, 1, num_kv_heads, rope_dim))
    sink_dir = jax.random.normal(keys[1], (batch, 1, num_kv_heads, nope_dim))
    heavy_dir = jax.random.normal(keys[2], (batch, 1, num_kv_heads, nope_dim))
    positions = jnp.arange(seq_len)

    k_rope = local * content + jax.random.normal(keys[3], (batch, seq_len, num_kv_heads, rope_dim))
    is_sink = (positions < n_sinks)[None, :, None, None]
    heavy_pos = jax.random.choice(keys[4], seq_len, (n_heavy,), replace=False)
    is_heavy = jnp.zeros(seq_len, bool).at[heavy_pos].set(True)[None, :, None, None]
    k_nope = jax.random.normal(keys[5], (batch, seq_len, num_kv_heads, nope_dim)) * 0.5
    k_nope += jnp.where(is_sink, sink * sink_dir, 0.0) + jnp.where(is_heavy, heavy * heavy_dir, 0.0)
    k = jnp.concatenate([_rope(k_rope, positions), k_nope], axis=-1)

    def per_query_head(x):  # [B, 1, Hkv, d] -> [B, 1, Hq, d]
        return jnp.repeat(x, group, axis=2)

    noise = jax.random.normal(keys[6], (batch, seq_len, num_heads, head_dim))
    q_rope = local * per_query_head(content) + noise[..., :rope_dim]
    q_nope = (
        sink * per_query_head(sink_dir)
        + heavy * per_query_head(heavy_dir)
        + 0.5 * noise[..., rope_dim:]
    )
    q = jnp.concatenate([_rope(q_rope, positions), q_nope], axis=-1)
    return q.astype(dtype), k.astype(dtype)


def structure_attention(model, *, sink_token: int = 0, local: float = 10.0, sink: float = 11.0):
    """Give a random-weight model attention shaped like a long-context LLM's, in place.

    Random weights make every head near-uniform, so estimated sparse indices come out dense and
    an end-to-end benchmark measures nothing. With q/k biases (the model needs
    `attention_bias=True`):
    - local band: every query and key gets the same content vector c on mid RoPE frequencies
      (pairs f in [D/4, 3D/8)), so q_i . k_j holds |c|^2-weighted cos((i - j) theta_f): a
      diagonal band decaying over ~1/theta_f tokens (slashes);
    - sinks: token `sink_token`'s key gets a direction u on the lowest RoPE frequency (nearly
      unrotated), which every query's bias also holds (a vertical line at each occurrence; put
      that token first);
    - everything else stays random (the noise real heads have too).
    `local` is |c|, `sink` the size of u on both sides. Returns the model.
    """
    config = model.config
    d, half = config.head_dim, config.head_dim // 2
    band = np.arange(half // 2, 3 * half // 4)
    content = np.zeros(d)
    content[band] = content[band + half] = local / np.sqrt(2 * len(band))
    u = np.zeros(d)
    u[half - 1] = u[d - 1] = 1 / np.sqrt(2)
    embed = np.array(model.embed[...], np.float32)
    e_sink = np.zeros(config.hidden_size)
    e_sink[0] = 1.0
    embed[sink_token] = e_sink * np.sqrt(config.hidden_size)  # after RMSNorm: ~e_sink*sqrt(H)
    model.embed[...] = jnp.asarray(embed, model.embed[...].dtype)
    for layer in model.layers:
        attn = layer.attn
        if attn.q_proj.bias is None:
            raise ValueError("structure_attention needs a config with attention_bias=True")
        dtype = attn.q_proj.kernel[...].dtype
        attn.q_proj.bias[...] = jnp.asarray(np.tile(content + sink * u, config.num_heads), dtype)
        attn.k_proj.bias[...] = jnp.asarray(np.tile(content, config.num_kv_heads), dtype)
        sink_key = (
            np.outer(e_sink, np.tile(u, config.num_kv_heads)) * sink / np.sqrt(config.hidden_size)
        )
        attn.k_proj.kernel[...] = attn.k_proj.kernel[...] + jnp.asarray(sink_key, dtype)
    return model
