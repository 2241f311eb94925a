"""Jitted index approximation: each head's sparse index estimated from the prompt itself.

Everything is vectorised over batch and all heads of a layer: no Python loop over heads, no
host round trip. Heads with different patterns (and budgets) in one layer are handled by
computing each pattern family once for the whole layer and selecting per head with static masks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from minference_jax.sparse_index import (
    SENTINEL,
    SparseIndex,
    check_block_sizes,
    diag_mask_from_slashes,
    finalize_index,
    num_blocks,
)

# Above this many bytes of f32 estimation scores, loop over kv heads instead of vmapping.
_SCORE_BYTES_PER_STEP = 2 << 30


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, T, Hkv, G, D]: contiguous GQA groups, no K/V repetition."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def _map_over_kv_heads(fn, q_grouped, k, score_bytes: int):
    """fn(q [B,T,G,D], k [B,N,D]) -> pytree of [B, G, ...]; mapped over kv heads -> [B, Hq, ...]."""
    in_axes = (2, 2)
    if score_bytes <= _SCORE_BYTES_PER_STEP:
        out = jax.vmap(fn, in_axes=in_axes, out_axes=1)(q_grouped, k)
    else:  # bound memory at 1M tokens: one kv head (G query heads) at a time
        out = jax.lax.map(
            lambda qk: fn(*qk), (jnp.moveaxis(q_grouped, 2, 0), jnp.moveaxis(k, 2, 0))
        )
        out = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), out)
    # [B, Hkv, G, ...] -> [B, Hq, ...]
    return jax.tree.map(lambda x: x.reshape(x.shape[0], -1, *x.shape[3:]), out)


def _skew_diagonal_sums(probs: jax.Array) -> jax.Array:
    """probs [..., R, N] of the last R queries -> [..., N] sums along each offset o = i - j.

    Row r is query position N-R+r. Entry [.., o] sums probs[r, N-R+r-o] over rows where the key
    exists. Done by a flatten/reshape skew (no gather): row r shifted left by r+1 after padding.
    """
    *lead, rows, n = probs.shape
    width = n + rows
    padded = jnp.pad(probs, [(0, 0)] * len(lead) + [(0, 0), (rows, 0)])  # [..., R, N+R]
    flat = padded.reshape(*lead, rows * width)
    flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, rows + 1)])
    skewed = flat[..., 1 : 1 + rows * (width + 1)].reshape(*lead, rows, width + 1)[..., :n]
    by_u = skewed.sum(axis=-2)  # u = N-1-o
    return by_u[..., ::-1]


def _vertical_slash_scores(q_last, k, *, scale: float):
    """q_last [B, R, G, D] (last R queries), k [B, N, D] -> column and diagonal scores [B, G, N]."""
    rows, n = q_last.shape[1], k.shape[1]
    logits = jnp.einsum("brgd,bnd->bgrn", q_last, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]  # [R, N]
    logits = jnp.where(causal, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return probs.sum(axis=-2), _skew_diagonal_sums(probs)


def _top_per_head(scores: jax.Array, budgets: np.ndarray) -> jax.Array:
    """Top `budgets[h]` indices of scores [B, H, N] per head, ascending, SENTINEL-padded."""
    k_max = int(budgets.max())
    _, idx = jax.lax.top_k(scores, k_max)  # [B, H, k_max], best first
    in_budget = jnp.arange(k_max)[None, :] < jnp.asarray(budgets)[:, None]  # [H, k_max]
    return jnp.sort(jnp.where(in_budget, idx, SENTINEL), axis=-1).astype(jnp.int32)


def estimate_vertical_slash(
    q: jax.Array,
    k: jax.Array,
    budgets: Sequence[tuple[int, int]],
    *,
    scale: float,
    last_q: int = P.LAST_Q,
) -> tuple[jax.Array, jax.Array]:
    """Estimate verticals and slashes for every query head.

    q [B, N, Hq, D], k [B, N, Hkv, D]; budgets[h] = (n_vertical, n_slash), already clamped.
    Returns (verticals [B, Hq, max_v] key positions, slashes [B, Hq, max_s] offsets i - j), both
    ascending and SENTINEL-padded. The first 30 columns and the 100 most local offsets always win.
    """
    n = q.shape[1]
    rows = min(last_q, n)
    q_last = _grouped(q[:, n - rows :], k.shape[2])
    score_bytes = q.shape[0] * q.shape[2] * rows * n * 4
    columns, diagonals = _map_over_kv_heads(
        functools.partial(_vertical_slash_scores, scale=scale), q_last, k, score_bytes
    )
    positions = jnp.arange(n)
    columns = jnp.where(positions < P.N_SINK_COLUMNS, jnp.inf, columns)
    diagonals = jnp.where(positions < P.N_LOCAL_SLASHES, jnp.inf, diagonals)
    budgets = np.minimum(np.asarray(budgets, dtype=np.int64).reshape(-1, 2), n)
    return _top_per_head(columns, budgets[:, 0]), _top_per_head(diagonals, budgets[:, 1])


def _pool_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, N, H, D] -> [B, nb, H, D] mean over each block's real rows (a partial tail block too)."""
    b, n, h, d = x.shape
    nb = num_blocks(n, block)
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
    sums = x.reshape(b, nb, block, h, d).sum(axis=2)
    rows = jnp.minimum(n - jnp.arange(nb) * block, block).astype(jnp.float32)
    return sums / rows[None, :, None, None]


def estimate_block_sparse(
    q: jax.Array,
    k: jax.Array,
    top_k: Sequence[int],
    *,
    scale: float,
    block_q: int,
    block_kv: int,
) -> jax.Array:
    """Top key blocks per query block from mean-pooled q and k, excluding the diagonal blocks.

    q [B, N, Hq, D], k [B, N, Hkv, D]; top_k[h] counts all tiles incl. the r diagonal blocks.
    Returns [B, Hq, n_q_blocks, max(top_k) - r] key-block ids (SENTINEL-padded).
    """
    n = q.shape[1]
    ratio = block_q // block_kv
    extra = np.maximum(np.asarray(top_k, dtype=np.int64) - ratio, 0)
    n_q_blocks = num_blocks(n, block_q)
    k_max = int(min(extra.max(), n_q_blocks * ratio))
    if k_max == 0:
        return jnp.full((q.shape[0], q.shape[2], n_q_blocks, 0), SENTINEL, jnp.int32)
    pooled_q = _grouped(_pool_blocks(q, block_q), k.shape[2])  # [B, nqb, Hkv, G, D]
    pooled_k = _pool_blocks(k, block_kv)  # [B, nkb, Hkv, D]
    n_kv_blocks = pooled_k.shape[1]
    kv_blocks = jnp.arange(n_kv_blocks)

    def top_blocks(q_chunk, first_q_block):  # q_chunk [B, C, Hkv, G, D]
        s = jnp.einsum("bckgd,bmkd->bkgcm", q_chunk, pooled_k, preferred_element_type=jnp.float32)
        q_blocks = first_q_block + jnp.arange(q_chunk.shape[1])
        allowed = kv_blocks[None, :] < (q_blocks * ratio)[:, None]  # strictly before the diagonal
        s = jnp.where(allowed, s * scale, -jnp.inf)
        s = s.reshape(s.shape[0], -1, *s.shape[3:])  # [B, Hq, C, nkb]
        top_scores, idx = jax.lax.top_k(s, k_max)
        return jnp.where(jnp.isfinite(top_scores), idx, SENTINEL)

    # Chunk query blocks so the [B, Hq, chunk, nkb] scores stay bounded at 1M tokens.
    per_q_block = q.shape[0] * q.shape[2] * n_kv_blocks * 4
    chunk = max(1, min(n_q_blocks, _SCORE_BYTES_PER_STEP // per_q_block))
    n_chunks = num_blocks(n_q_blocks, chunk)
    padded_q = jnp.pad(
        pooled_q, ((0, 0), (0, n_chunks * chunk - n_q_blocks), (0, 0), (0, 0), (0, 0))
    )
    if n_chunks == 1:
        idx = top_blocks(padded_q, 0)
    else:
        chunks = jnp.moveaxis(
            padded_q.reshape(q.shape[0], n_chunks, chunk, *pooled_q.shape[2:]), 1, 0
        )
        idx = jax.lax.map(lambda a: top_blocks(a[0], a[1] * chunk), (chunks, jnp.arange(n_chunks)))
        idx = jnp.moveaxis(idx, 0, 2).reshape(q.shape[0], q.shape[2], -1, k_max)
    idx = idx[:, :, :n_q_blocks]
    in_budget = jnp.arange(k_max)[None, :] < jnp.asarray(extra)[:, None]  # [Hq, k_max]
    return jnp.where(in_budget[None, :, None, :], idx, SENTINEL).astype(jnp.int32)


def _diag_bound(pattern: P.Pattern, seq_len: int, n_slots: int, block_kv: int, ratio: int) -> int:
    """Static upper bound on |D| for one head."""
    if isinstance(pattern, P.Dense):
        return n_slots
    if isinstance(pattern, P.VerticalSlash):
        _, n_slash = pattern.budgets(seq_len)
        return min(n_slots, n_slash * (ratio + 1) + ratio)
    if isinstance(pattern, P.AShape):
        return min(n_slots, num_blocks(max(min(pattern.n_local, seq_len) - 1, 0), block_kv) + ratio)
    return min(n_slots, ratio)


def _ashape_parts(pattern: P.AShape, seq_len: int, block_kv: int):
    """(full sink blocks, leftover sink columns, max local offset) of an A-shape head."""
    n_init = min(pattern.n_init, seq_len)
    full_blocks = n_init // block_kv
    columns = np.arange(full_blocks * block_kv, n_init)
    return full_blocks, columns, min(pattern.n_local, seq_len)


def build_sparse_index(
    q: jax.Array,
    k: jax.Array,
    patterns: P.Pattern | Sequence[P.Pattern],
    *,
    softmax_scale: float | None = None,
    block_q: int = 64,
    block_kv: int = 64,
    last_q: int = P.LAST_Q,
) -> SparseIndex:
    """Estimate the SparseIndex of one layer. q [B, N, Hq, D], k [B, N, Hkv, D]; jitted.

    `patterns`: one pattern for all heads or one per query head (static). Block-sparse heads
    need `block_size == block_kv`.
    """
    check_block_sizes(block_q, block_kv)
    patterns = P.normalize_layer_patterns(patterns, q.shape[2])
    for h, p in enumerate(patterns):
        if isinstance(p, P.BlockSparse) and p.block_size != block_kv:
            raise ValueError(
                f"head {h}: BlockSparse.block_size={p.block_size} must equal block_kv={block_kv}"
            )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _build_sparse_index(
        q, k, patterns, scale=scale, block_q=block_q, block_kv=block_kv, last_q=last_q
    )


@functools.partial(jax.jit, static_argnames=("patterns", "scale", "block_q", "block_kv", "last_q"))
def _build_sparse_index(q, k, patterns, *, scale, block_q, block_kv, last_q) -> SparseIndex:
    batch, n, num_heads, _ = q.shape
    ratio = block_q // block_kv
    n_q_blocks = num_blocks(n, block_q)
    n_slots = n_q_blocks * ratio

    def heads_of(kind):
        return np.array([isinstance(p, kind) for p in patterns])

    is_vs, is_bs = heads_of(P.VerticalSlash), heads_of(P.BlockSparse)

    # --- D (diagonal set) per head: static for dense / A-shape / block-sparse heads ------------
    last_diag = np.full(num_heads, ratio - 1)  # the diagonal blocks only
    for h, p in enumerate(patterns):
        if isinstance(p, P.Dense):
            last_diag[h] = n_slots - 1
        elif isinstance(p, P.AShape):
            n_local = _ashape_parts(p, n, block_kv)[2]
            last_diag[h] = num_blocks(max(n_local - 1, 0), block_kv) + ratio - 1
    static_mask = np.arange(n_slots)[None, :] <= last_diag[:, None]
    diag_mask = jnp.broadcast_to(jnp.asarray(static_mask), (batch, num_heads, n_slots))

    columns = jnp.full((batch, num_heads, 0), SENTINEL, jnp.int32)
    if is_vs.any():
        budgets = [p.budgets(n) if isinstance(p, P.VerticalSlash) else (1, 1) for p in patterns]
        verticals, slashes = estimate_vertical_slash(q, k, budgets, scale=scale, last_q=last_q)
        vs_mask = diag_mask_from_slashes(slashes, n_slots, block_kv, ratio)
        diag_mask = jnp.where(jnp.asarray(is_vs)[None, :, None], vs_mask, diag_mask)
        columns = jnp.where(jnp.asarray(is_vs)[None, :, None], verticals, SENTINEL)

    # --- listed blocks (block-sparse top-k, A-shape sink blocks) and sink columns ---------------
    parts = [
        _ashape_parts(p, n, block_kv) if isinstance(p, P.AShape) else (0, np.zeros(0), 0)
        for p in patterns
    ]
    sink_width = max(full for full, _, _ in parts)
    sink_blocks = np.full((num_heads, sink_width), SENTINEL, np.int64)
    sink_col_width = max(len(cols) for _, cols, _ in parts)
    sink_columns = np.full((num_heads, sink_col_width), SENTINEL, np.int64)
    for h, (full, cols, _) in enumerate(parts):
        sink_blocks[h, :full] = np.arange(full)
        sink_columns[h, : len(cols)] = cols
    candidates = jnp.broadcast_to(
        jnp.asarray(sink_blocks, jnp.int32)[None, :, None, :],
        (batch, num_heads, n_q_blocks, sink_width),
    )
    if is_bs.any():
        top_k = [p.top_k if isinstance(p, P.BlockSparse) else 0 for p in patterns]
        chosen = estimate_block_sparse(q, k, top_k, scale=scale, block_q=block_q, block_kv=block_kv)
        width = max(sink_width, chosen.shape[-1])
        pad = lambda x: jnp.pad(  # noqa: E731
            x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])), constant_values=SENTINEL
        )
        candidates = jnp.where(
            jnp.asarray(is_bs)[None, :, None, None], pad(chosen), pad(candidates)
        )
    if sink_col_width:
        sink_columns = jnp.broadcast_to(
            jnp.asarray(sink_columns, jnp.int32)[None], (batch, num_heads, sink_col_width)
        )
        columns = jnp.sort(jnp.concatenate([columns, sink_columns], axis=-1), axis=-1)

    max_diag = max(_diag_bound(p, n, n_slots, block_kv, ratio) for p in patterns)
    return finalize_index(
        diag_mask,
        candidates,
        columns,
        max_diag=max_diag,
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )


def index_footprint_bytes(index: SparseIndex) -> int:
    """Bytes held by the index arrays (to check they scale with the budget, not with N^2)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(index))
