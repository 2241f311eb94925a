"""Independent brute-force oracles for the tests (numpy, float64, loops where clearer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def random_qkv(seed, batch, n, heads, kv_heads, dim, dtype):
    """Fresh normal q [B, N, Hq, D], k, v [B, N, Hkv, D] in `dtype`."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = [(batch, n, heads, dim), (batch, n, kv_heads, dim), (batch, n, kv_heads, dim)]
    return [
        jax.random.normal(key, shape, jnp.float32).astype(dtype)
        for key, shape in zip(keys, shapes, strict=True)
    ]


def block_rows_mask(n, block_q, block_kv, *, slashes=(), verticals=(), listed=None):
    """[n_q_blocks, n] bool: keys each query block may attend, from first principles.

    A slash offset o over query block i covers the key blocks its band of keys
    [i*bq - o, (i+1)*bq - 1 - o] touches; the query block's own key blocks are always kept;
    `listed[i]` are extra key blocks; verticals are single keys.
    """
    n_q_blocks = -(-n // block_q)
    n_keys = n_q_blocks * block_q
    mask = np.zeros((n_q_blocks, n_keys), bool)
    for i in range(n_q_blocks):
        first, last = i * block_q, (i + 1) * block_q - 1
        mask[i, first : last + 1] = True  # own key blocks (block_q is a multiple of block_kv)
        for o in slashes:
            lo, hi = first - o, last - o
            if hi < 0:
                continue
            for kb in range(max(lo, 0) // block_kv, hi // block_kv + 1):
                mask[i, kb * block_kv : (kb + 1) * block_kv] = True
        if listed is not None:
            for kb in listed[i]:
                mask[i, kb * block_kv : (kb + 1) * block_kv] = True
        mask[i, list(verticals)] = True
    return mask[:, :n]


def rows_mask(block_rows, block_q, n):
    """Per-query-block mask -> [n, n] causal row mask."""
    rows = np.repeat(block_rows, block_q, axis=0)[:n]
    return rows & np.tril(np.ones((n, n), bool))


def masked_attention_f64(q, k, v, mask, scale=None):
    """q [B, N, Hq, D], k/v [B, N, Hkv, D], mask [B, Hq, N, N] -> float64 [B, N, Hq, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def sampled_rows_scores_oracle(q, k, rows, block, scale, block_kv=None):
    """[B, Hq, nqb, nkb] block scores from the exact causal softmax of `rows` query rows spread
    over each query block of `block` rows (rows floor((j + 1) * block / rows) - 1, clamped into
    the sequence), summed per key block of `block_kv` (default `block`), averaged over the rows."""
    block_kv = block_kv or block
    b, n, hq, _ = q.shape
    group = hq // k.shape[2]
    nqb, nkb = -(-n // block), -(-n // block_kv)
    out = np.zeros((b, hq, nqb, nkb))
    for bi, h, i in np.ndindex(b, hq, nqb):
        for j in range(rows):
            row = min(i * block + ((j + 1) * block) // rows - 1, n - 1)
            logits = k[bi, : row + 1, h // group] @ q[bi, row, h] * scale
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            out[bi, h, i] += np.bincount(np.arange(row + 1) // block_kv, probs, nkb) / rows
    return out


def moving_max_qk(seed, batch, n, heads, kv_heads, head_dim, dtype=jnp.float32):
    """(q [B, N, Hq, D], k [B, N, Hkv, D]) with strong keys at the start (sinks) and every 97
    tokens: a row's maximum often moves to a later key tile, which a kernel's running-max
    rescaling must follow."""
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (batch, n, heads, head_dim), jnp.float32) * 1.5
    k = jax.random.normal(kk, (batch, n, kv_heads, head_dim), jnp.float32)
    k = k.at[:, :5].multiply(3.0).at[:, 97::97].multiply(4.0)
    return q.astype(dtype), k.astype(dtype)
