"""Pallas (Triton lowering): sampled query rows' softmax mass per key block, without the logits.

The sampled-blocks estimator (`SampledBlockSparse`) scores each (query block, key block) pair
by the exact causal softmax of a few query rows of the block, summed per key block. The XLA
path materialises those rows' f32 logits ([rows, N] per head) and reads them twice (row max,
then exp and block sum). Here one program per (tile of sampled rows, query head) walks its
causal key blocks once with an online max:
  - per key block it writes each row's exp-sum over the block under the running max of that
    moment, and that max;
  - at the end, the row's final max and exp-sum.
Key blocks that every row of the tile sees whole (nearly all of them) run without the causal
mask, with the scale folded into the exp's argument; only the last few are masked.
`block_mass` rescales every block to the final max and normalises (XLA, on arrays block_kv times
smaller than the logits): the same softmax mass the XLA path computes.

Work per query head: rows x (causal keys) x d multiply-adds and one exp per logit, as many as
attention spends on those rows' QK^T and softmax; K tiles come from L2 for the query heads of one
kv head. Rows are given by position (any ascending positions), so one kernel serves every
spacing of sampled rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.constants import LOG2E, MASK_VALUE

TILE_ROWS = 64  # sampled rows per program
NUM_STAGES = 2  # tiles, warps and stages timed on an H100: this default the fastest (NOTES)
NUM_WARPS = 4


def _kernel(
    pos_ref,  # [TILE_ROWS] int32: the rows' query positions, ascending
    q_ref,  # [TILE_ROWS, D]
    k_ref,  # [C, D]: this head's kv head, C a multiple of block_kv
    sums_ref,  # [C // block_kv, TILE_ROWS]
    tile_max_ref,  # [C // block_kv, TILE_ROWS]
    row_max_ref,  # [TILE_ROWS]
    row_sum_ref,  # [TILE_ROWS]
    *,
    qk_scale: float,
    seq_len: int,
    block_kv: int,
    precision,
):
    tile_rows = q_ref.shape[0]
    pos = pos_ref[...]
    n_kv_blocks = tile_max_ref.shape[0]
    # Causal: key c is seen by rows at positions >= c, so the tile needs keys <= its last row.
    n_tiles = jnp.minimum(jnp.max(pos) // block_kv + 1, n_kv_blocks)
    # Key blocks every row sees whole (all keys <= the first row and < seq_len) need no mask:
    # all but the last ~tile_rows / rows-per-block of a tile's causal blocks.
    n_whole = jnp.minimum(jnp.minimum(jnp.min(pos) + 1, seq_len) // block_kv, n_tiles)
    q = q_ref[...]

    def logits(t):
        return jax.lax.dot_general(
            q,
            k_ref[pl.ds(t * block_kv, block_kv), :],
            (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=precision,
        )

    def finish(t, row_max, row_sum, new_max, block_sum):
        sums_ref[t, :] = block_sum
        tile_max_ref[t, :] = new_max
        return new_max, row_sum * jnp.exp2(row_max - new_max) + block_sum

    def whole_step(t, carry):
        # The scale goes into the exp's argument (one FMA per logit); maxima are kept scaled.
        s = logits(t)
        new_max = jnp.maximum(carry[0], s.max(axis=1) * qk_scale)
        block_sum = jnp.exp2(s * qk_scale - new_max[:, None]).sum(axis=1)
        return finish(t, *carry, new_max, block_sum)

    def masked_step(t, carry):
        keys = t * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
        valid = (keys[None, :] <= pos[:, None]) & (keys[None, :] < seq_len)
        s = jnp.where(valid, logits(t) * qk_scale, MASK_VALUE)
        new_max = jnp.maximum(carry[0], s.max(axis=1))
        block_sum = jnp.where(valid, jnp.exp2(s - new_max[:, None]), 0.0).sum(axis=1)
        return finish(t, *carry, new_max, block_sum)

    start = (jnp.full((tile_rows,), MASK_VALUE, jnp.float32), jnp.zeros((tile_rows,), jnp.float32))
    carry = jax.lax.fori_loop(0, n_whole, whole_step, start)
    row_max, row_sum = jax.lax.fori_loop(n_whole, n_tiles, masked_step, carry)

    @pl.loop(n_tiles, n_kv_blocks)
    def _(t):  # blocks past the causal limit: zero sums, any max <= the final one
        sums_ref[t, :] = jnp.zeros((tile_rows,), jnp.float32)
        tile_max_ref[t, :] = row_max

    row_max_ref[...] = row_max
    row_sum_ref[...] = row_sum


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "seq_len",
        "num_heads",
        "block_kv",
        "num_warps",
        "num_stages",
        "tile_rows",
        "interpret",
    ),
)
def sampled_row_block_sums(
    q_rows: jax.Array,
    k_heads: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    seq_len: int,
    num_heads: int,
    block_kv: int,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    tile_rows: int = TILE_ROWS,
    interpret: bool = False,
):
    """Per sampled row and key block: the exp-sum under the running max, that max, and the
    row's final max and exp-sum (base 2, logits scaled by scale * log2(e)).

    q_rows [B * Hq, R, D] (R a multiple of tile_rows), k_heads [B * Hkv, C, D] (C a multiple of
    block_kv), positions [R] int32: each row's query position (ascending, the same for every
    head; a row sees keys <= its position and < seq_len). Returns (sums [B*Hq, C / block_kv, R],
    tile_max [B*Hq, C / block_kv, R], row_max, row_sum [B*Hq, R]); `block_mass` turns them into
    each row's softmax mass per key block.
    """
    bh, rows, head_dim = q_rows.shape
    bkv, cols, _ = k_heads.shape
    if rows % tile_rows or cols % block_kv or positions.shape != (rows,):
        raise ValueError(
            f"sampled rows ({rows}) must be a multiple of {tile_rows}, keys ({cols}) of "
            f"block_kv ({block_kv}), and positions {positions.shape} must be ({rows},)"
        )
    batch = bh // num_heads
    heads_per_kv = num_heads // (bkv // batch)
    n_row_tiles = rows // tile_rows
    n_kv_blocks = cols // block_kv

    def kv_of(head):  # [B * Hq] -> [B * Hkv]
        return head // num_heads * (bkv // batch) + head % num_heads // heads_per_kv

    kernel = functools.partial(
        _kernel,
        qk_scale=scale * LOG2E,
        seq_len=seq_len,
        block_kv=block_kv,
        precision=jax.lax.Precision.HIGHEST if q_rows.dtype == jnp.float32 else None,
    )
    flip = lambda t: n_row_tiles - 1 - t  # noqa: E731 - longest (last) row tiles launch first
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((bh, n_kv_blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((bh, n_kv_blocks, rows), jnp.float32),
            jax.ShapeDtypeStruct((bh, rows), jnp.float32),
            jax.ShapeDtypeStruct((bh, rows), jnp.float32),
        ),
        grid=(n_row_tiles, bh),
        in_specs=[
            pl.BlockSpec((tile_rows,), lambda t, h: (flip(t),)),
            pl.BlockSpec((None, tile_rows, head_dim), lambda t, h: (h, flip(t), 0)),
            pl.BlockSpec((None, cols, head_dim), lambda t, h: (kv_of(h), 0, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, n_kv_blocks, tile_rows), lambda t, h: (h, 0, flip(t))),
            pl.BlockSpec((None, n_kv_blocks, tile_rows), lambda t, h: (h, 0, flip(t))),
            pl.BlockSpec((None, tile_rows), lambda t, h: (h, flip(t))),
            pl.BlockSpec((None, tile_rows), lambda t, h: (h, flip(t))),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="minference_sampled_row_scores",
    )(positions.astype(jnp.int32), q_rows, k_heads)


def block_mass(sums, tile_max, row_max, row_sum) -> jax.Array:
    """[B*Hq, C / block_kv, R]: each sampled row's softmax mass per key block (rows sum to 1)."""
    # A block's sum was taken under the running max of that moment (<= the final one).
    rescale = jnp.exp2(jnp.minimum(tile_max - row_max[:, None, :], 0.0))
    return sums * rescale / row_sum[:, None, :]
