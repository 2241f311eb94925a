"""Recall of a sparse index: the share of each query row's dense softmax mass that it keeps.

Exact per row, for sampled query rows anywhere in the sequence (not only the last ones the
estimators look at): the dense causal softmax of those rows in f32, masked by the keys the
index gives them. The mask is built for the sampled rows only, from the same fields the kernels
read (`SparseIndex` diagonal offsets, listed blocks and columns), never as an N x N array, so
it runs at 128K tokens and beyond.

    recall = row_recall(q, k, index, sample_rows(n, 64))   # [B, H, R]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax.reference import _tile_positions
from minference_jax.sparse_index import SparseIndex

# Rows per step: bounds the [B, H, rows, N] f32 probabilities (268 MB at 128K x 32 heads).
ROWS_PER_STEP = 16


def sample_rows(seq_len: int, num_rows: int) -> np.ndarray:
    """`num_rows` query rows spread evenly over [0, seq_len), last row included, ascending."""
    if seq_len < 1 or num_rows < 1:
        raise ValueError(f"need seq_len >= 1 and num_rows >= 1, got {seq_len}, {num_rows}")
    return np.unique(np.linspace(0, seq_len - 1, num_rows).round().astype(np.int32))


def index_row_mask(index: SparseIndex, rows: jax.Array) -> jax.Array:
    """[B, H, R, N] bool: the keys the index gives query rows `rows` [R] (causal applied)."""
    n = index.seq_len
    positions, valid = jax.vmap(lambda row: _tile_positions(index, row // index.block_q))(rows)
    positions = jnp.where(valid & (positions <= rows[:, None, None, None]), positions, n)
    r, b, h, p = positions.shape
    mask = jnp.zeros((b, h, r, n), bool)
    bi, hi, ri = np.meshgrid(np.arange(b), np.arange(h), np.arange(r), indexing="ij")
    return mask.at[bi[..., None], hi[..., None], ri[..., None], jnp.moveaxis(positions, 0, 2)].set(
        True, mode="drop"
    )


@functools.partial(jax.jit, static_argnames=("softmax_scale",))
def _recall_of_rows(q_rows, k, index, rows, softmax_scale):
    """q_rows [B, R, Hq, D] at positions rows [R] -> [B, Hq, R] kept dense softmax mass."""
    b, r, hq, d = q_rows.shape
    hkv = k.shape[2]
    qg = q_rows.astype(jnp.float32).reshape(b, r, hkv, hq // hkv, d)
    logits = jnp.einsum(
        "brkgd,bnkd->bkgrn",
        qg,
        k.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    ).reshape(b, hq, r, -1)
    causal = jnp.arange(k.shape[1])[None, :] <= rows[:, None]
    probs = jax.nn.softmax(jnp.where(causal, logits * softmax_scale, -jnp.inf), axis=-1)
    return jnp.where(index_row_mask(index, rows), probs, 0.0).sum(-1)


def row_recall(
    q: jax.Array,
    k: jax.Array,
    index: SparseIndex,
    rows,
    *,
    softmax_scale: float | None = None,
) -> jax.Array:
    """[B, Hq, R]: for each sampled query row, the share of its dense causal softmax mass (f32)
    on the keys the index gives it. q [B, N, Hq, D], k [B, N, Hkv, D]; rows: positions [R]."""
    rows = np.asarray(rows, np.int32)
    n = q.shape[1]
    if (index.seq_len, index.num_heads) != (n, q.shape[2]):
        raise ValueError(
            f"index is for seq {index.seq_len} x {index.num_heads} heads, q is {q.shape}"
        )
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"rows must be a non-empty list of positions in [0, {n})")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    parts = []
    for start in range(0, rows.size, ROWS_PER_STEP):
        chunk = rows[start : start + ROWS_PER_STEP]
        padded = np.pad(chunk, (0, ROWS_PER_STEP - chunk.size), mode="edge")  # one program
        kept = _recall_of_rows(q[:, padded], k, index, jnp.asarray(padded), scale)
        parts.append(kept[:, :, : chunk.size])
    return jnp.concatenate(parts, axis=-1)
