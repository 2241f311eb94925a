"""Pallas (Triton lowering) strided anti-diagonal scores (XAttention) without the score matrix.

The anti-diagonal estimator scores each (query block, key block) pair by the softmax mass of
strided rows: strided query row r holds queries r*S + S-1-j and strided key column c holds keys
c*S + j (j = 0..S-1, S = stride), their logit is sum_j q[r*S+S-1-j] . k[c*S+j] * scale / S, and
each strided row is a softmax over the columns it may see (c <= r, c*S < N). The XLA path
materialises the f32 [rows, columns] logits of a chunk and runs the softmax over it: N^2/S^2
floats written and read several times. Here one program per (tile of strided rows, query head)
walks its causal column tiles once with an online max:
  - per column tile it writes the row's exp-sums of each group of `group` columns under the
    running max of that moment, and that max;
  - at the end, the row's final max and exp-sum.
`combine_row_sums` rescales each tile to the final max and normalises (XLA, memory-bound on
arrays S*group times smaller than the logits), which is the softmax the XLA path computes.

Work: N^2 d / S multiply-adds per query head (causal half), the same as the XLA einsum, and no
logits in memory. K tiles are read once per query head (the query heads of one kv head read the
same tiles, which L2 serves).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.constants import LOG2E, MASK_VALUE

TILE_ROWS = 64  # strided query rows per program
TILE_COLS = 64  # strided key columns per loop step
# Triton's pipelining depth: 2 keeps every stride slot's K tile twice in shared memory (530 KB
# and more at d = 128, past Hopper's 227 KB); 1 fits. Tiles and warps timed on an H100 (NOTES).
NUM_STAGES = 1
NUM_WARPS = 4
MAX_GROUP = 8  # at most this many strided columns summed into one output group


def column_group(columns_per_block: int) -> int:
    """Strided columns summed per output group: divides a key block's columns (both powers of
    two) and leaves at least TILE_COLS / MAX_GROUP groups per column tile."""
    return min(columns_per_block, MAX_GROUP)


def _kernel(
    row0_ref,  # [1] int32: the first strided row of this call (absolute)
    q_ref,  # [S, TILE_ROWS, D]
    k_ref,  # [S, C_pad, D]
    sums_ref,  # [TILE_ROWS, C_pad // group]
    tile_max_ref,  # [C_pad // TILE_COLS, TILE_ROWS]
    row_max_ref,  # [TILE_ROWS]
    row_sum_ref,  # [TILE_ROWS]
    *,
    qk_scale: float,
    stride: int,
    seq_len: int,
    n_row_tiles: int,
    group: int,
    precision,
    tile_cols: int,
):
    tile_rows = q_ref.shape[1]
    i = n_row_tiles - 1 - pl.program_id(0)  # longest (last) row tiles are launched first
    rows = row0_ref[0] + i * tile_rows + jnp.arange(tile_rows, dtype=jnp.int32)
    n_col_tiles = tile_max_ref.shape[0]
    groups = tile_cols // group
    # Sums each `group` consecutive columns of a tile with one small matmul (no reshapes).
    to_groups = (
        jnp.arange(tile_cols, dtype=jnp.int32)[:, None] // group
        == jnp.arange(groups, dtype=jnp.int32)[None, :]
    ).astype(jnp.float32)
    # Causal: column c is seen by rows >= c, so this tile needs columns <= its last row.
    n_tiles = jnp.minimum((row0_ref[0] + (i + 1) * tile_rows - 1) // tile_cols + 1, n_col_tiles)

    def step(t, carry):
        row_max, row_sum = carry
        cols = t * tile_cols + jnp.arange(tile_cols, dtype=jnp.int32)
        s = jnp.zeros((tile_rows, tile_cols), jnp.float32)
        for j in range(stride):
            s += jax.lax.dot_general(
                q_ref[j],
                k_ref[j, pl.ds(t * tile_cols, tile_cols), :],
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=precision,
            )
        valid = (cols[None, :] <= rows[:, None]) & (cols[None, :] * stride < seq_len)
        s = jnp.where(valid, s * qk_scale, MASK_VALUE)
        new_max = jnp.maximum(row_max, s.max(axis=1))
        p = jnp.where(valid, jnp.exp2(s - new_max[:, None]), 0.0)
        row_sum = row_sum * jnp.exp2(row_max - new_max) + p.sum(axis=1)
        sums_ref[:, pl.ds(t * groups, groups)] = jax.lax.dot_general(
            p,
            to_groups,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        tile_max_ref[t, :] = new_max
        return new_max, row_sum

    start = (jnp.full((tile_rows,), MASK_VALUE, jnp.float32), jnp.zeros((tile_rows,), jnp.float32))
    row_max, row_sum = jax.lax.fori_loop(0, n_tiles, step, start)

    @pl.loop(n_tiles, n_col_tiles)
    def _(t):  # tiles past the causal limit: zero sums, any max <= the final one
        sums_ref[:, pl.ds(t * groups, groups)] = jnp.zeros((tile_rows, groups), jnp.float32)
        tile_max_ref[t, :] = row_max

    row_max_ref[...] = row_max
    row_sum_ref[...] = row_sum


def strided_queries(q: jax.Array, stride: int) -> jax.Array:
    """[B, N, Hq, D] (N a multiple of stride and TILE_ROWS * stride) -> [B * Hq, S, N / S, D]:
    slot j of strided row r is query r*S + S-1-j (anti-diagonal order)."""
    b, n, h, d = q.shape
    q = q.reshape(b, n // stride, stride, h, d)[:, :, ::-1]
    return jnp.transpose(q, (0, 3, 2, 1, 4)).reshape(b * h, stride, n // stride, d)


def strided_keys(k: jax.Array, stride: int) -> jax.Array:
    """[B, N, Hkv, D] -> [B * Hkv, S, N / S, D]: slot j of strided column c is key c*S + j."""
    b, n, h, d = k.shape
    k = k.reshape(b, n // stride, stride, h, d)
    return jnp.transpose(k, (0, 3, 2, 1, 4)).reshape(b * h, stride, n // stride, d)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "seq_len",
        "num_heads",
        "group",
        "num_warps",
        "num_stages",
        "tile_rows",
        "tile_cols",
        "interpret",
    ),
)
def antidiagonal_row_sums(
    q_strided: jax.Array,
    k_strided: jax.Array,
    first_row: jax.Array,
    *,
    scale: float,
    seq_len: int,
    num_heads: int,
    group: int,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    tile_rows: int = TILE_ROWS,
    tile_cols: int = TILE_COLS,
    interpret: bool = False,
):
    """Per strided row: exp-sums of each `group` columns per column tile, the tile maxima, the
    row max and the row exp-sum (base 2, logits scaled by scale / S * log2(e)).

    q_strided [B * Hq, S, R, D] (R a multiple of TILE_ROWS: rows first_row .. first_row + R - 1),
    k_strided [B * Hkv, S, C, D] (C a multiple of TILE_COLS), first_row int32 (may be traced).
    Returns (sums [B*Hq, R, C / group], tile_max [B*Hq, C / TILE_COLS, R], row_max, row_sum
    [B*Hq, R]); `combine_row_sums` turns them into softmax mass per group.
    """
    bh, stride, rows, head_dim = q_strided.shape
    bkv, _, cols, _ = k_strided.shape
    if rows % tile_rows or cols % tile_cols or tile_cols % group:
        raise ValueError(
            f"strided rows ({rows}) must be a multiple of {tile_rows}, columns ({cols}) of "
            f"{tile_cols}, and group ({group}) must divide {tile_cols}"
        )
    heads_per_kv = num_heads // (bkv // (bh // num_heads))
    n_row_tiles = rows // tile_rows

    def kv_of(row_tile, head):  # [B * Hq] -> [B * Hkv]
        batch, h = head // num_heads, head % num_heads
        return batch * (bkv // (bh // num_heads)) + h // heads_per_kv

    kernel = functools.partial(
        _kernel,
        qk_scale=scale / stride * LOG2E,
        stride=stride,
        seq_len=seq_len,
        n_row_tiles=n_row_tiles,
        group=group,
        tile_cols=tile_cols,
        precision=jax.lax.Precision.HIGHEST if q_strided.dtype == jnp.float32 else None,
    )
    flip = lambda t: n_row_tiles - 1 - t  # noqa: E731 - the kernel's launch order
    n_col_tiles = cols // tile_cols
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bh, rows, cols // group), jnp.float32),
            jax.ShapeDtypeStruct((bh, n_col_tiles, rows), jnp.float32),
            jax.ShapeDtypeStruct((bh, rows), jnp.float32),
            jax.ShapeDtypeStruct((bh, rows), jnp.float32),
        ),
        grid=(n_row_tiles, bh),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (0,)),
            pl.BlockSpec((None, stride, tile_rows, head_dim), lambda t, h: (h, 0, flip(t), 0)),
            pl.BlockSpec((None, stride, cols, head_dim), lambda t, h: (kv_of(t, h), 0, 0, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, tile_rows, cols // group), lambda t, h: (h, flip(t), 0)),
            pl.BlockSpec((None, n_col_tiles, tile_rows), lambda t, h: (h, 0, flip(t))),
            pl.BlockSpec((None, tile_rows), lambda t, h: (h, flip(t))),
            pl.BlockSpec((None, tile_rows), lambda t, h: (h, flip(t))),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="minference_antidiagonal_scores",
    )(jnp.reshape(first_row, (1,)).astype(jnp.int32), q_strided, k_strided)


def combine_row_sums(
    sums, tile_max, row_max, row_sum, *, group: int, tile_cols: int = TILE_COLS
) -> jax.Array:
    """[B*Hq, R, C / group]: each row's softmax mass per group of columns (rows sum to 1)."""
    per_tile = tile_cols // group
    # A tile's sums were taken under the running max of that moment (<= the final one).
    scale = jnp.exp2(jnp.minimum(tile_max - row_max[:, None, :], 0.0)) / row_sum[:, None, :]
    scale = jnp.repeat(jnp.swapaxes(scale, 1, 2), per_tile, axis=2)
    return sums * scale
