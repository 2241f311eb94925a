"""Pallas (Triton lowering) vertical-slash scores: column and diagonal attention mass of the
last R queries, without an f32 [H, R, N] probability array.

The estimator needs, per query head, softmax(q_last k^T) summed down each key column and along
each diagonal (offset o = query position - key). Two passes over K, one program per
(key tile, batch, kv head), all G query heads of the kv head in the program (K read once per
group, never repeated). A loop over several tiles per program measured slower on an H200 (its
pipelined q and K buffers also overflow shared memory), see benchmarks/NOTES.md.

1. row statistics: each row's max and sum of exp2 over this tile's keys; XLA combines the tiles
   into a log-sum-exp per row (a [B, Hkv, n_tiles, G, R] array: tiny).
2. probabilities p = exp2(s - lse): column sums are written per tile; p is also scattered (in
   the input dtype: bf16 like the PyTorch original, f32 for f32 inputs) into a skewed
   [B, Hkv, G, R, ~N] buffer at u = key + (R - 1 - row), so one XLA sum over rows gives the
   diagonal sums (offset o = N - 1 - u). Triton has no in-register skew; the skewed store is
   contiguous along a row, so the skew costs one write and one read of that buffer.

Cost at 128K tokens, 32 heads, R = 64, d = 128: 2 x 69 GFLOP of logits, K read twice (2 x 268
MB), the bf16 buffer written and read once (2 x 537 MB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.constants import LOG2E, MASK_VALUE


def supports(seq_len: int, rows: int, head_dim: int) -> bool:
    """Shapes the kernels take: power-of-two rows and head_dim (Triton tensor shapes)."""
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    return pow2(rows) and pow2(head_dim) and head_dim <= 256 and seq_len >= rows


def _tile_logits(q_ref, k, g, qk_scale, precision):
    """[R, T] base-2 logits of query head g of the group against the key tile k [T, D]."""
    s = jax.lax.dot_general(
        q_ref[g],
        k,
        (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    return s * qk_scale


def _load_tile(k_ref, n, block_k):
    """This program's key tile of the whole (unpadded) K [N, D]: rows past N masked to zero."""
    start = pl.program_id(0) * block_k
    keys = start + jnp.arange(block_k, dtype=jnp.int32)
    k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=(keys < n)[:, None], other=0.0)
    return keys, k


def _causal(keys, n, rows):
    """[R, T] bool: row r (query position n - R + r) may see the key."""
    positions = n - rows + jnp.arange(rows, dtype=jnp.int32)
    return keys[None, :] <= positions[:, None]


def _row_stats_kernel(q_ref, k_ref, max_ref, sum_ref, *, n, group, block_k, qk_scale, precision):
    rows = q_ref.shape[1]
    keys, k = _load_tile(k_ref, n, block_k)
    valid = _causal(keys, n, rows)
    for g in range(group):
        s = jnp.where(valid, _tile_logits(q_ref, k, g, qk_scale, precision), MASK_VALUE)
        row_max = s.max(axis=1)
        max_ref[g, :] = row_max
        # A row with no visible key in this tile gets sum 0 (MASK_VALUE is finite: no inf - inf).
        sum_ref[g, :] = jnp.where(valid, jnp.exp2(s - row_max[:, None]), 0.0).sum(axis=1)


def _probs_kernel(
    q_ref, lse_ref, k_ref, col_ref, skew_ref, *, n, group, block_k, qk_scale, precision
):
    rows = q_ref.shape[1]
    keys, k = _load_tile(k_ref, n, block_k)
    valid = _causal(keys, n, rows)
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    # Skewed column of (row, key): u = key + R - 1 - row. Only causal entries (u <= N - 1) are
    # stored; entries with key < 0 (u < R - 1 - row) are never written and masked on the read.
    # The buffer is wider than N so that masked-off lanes also address real memory.
    u = keys[None, :] + (rows - 1 - row_ids)[:, None]
    row_index = jnp.broadcast_to(row_ids[:, None], u.shape)
    for g in range(group):
        s = _tile_logits(q_ref, k, g, qk_scale, precision)
        p = jnp.where(valid, jnp.exp2(s - lse_ref[g][:, None]), 0.0)
        col_ref[g, :] = p.sum(axis=0)
        plgpu.store(skew_ref.at[g, row_index, u], p.astype(skew_ref.dtype), mask=valid)


def _specs(params, rows, head_dim):
    group = params["group"]
    q_spec = pl.BlockSpec((None, None, group, rows, head_dim), lambda t, b, h: (b, h, 0, 0, 0))
    k_spec = pl.BlockSpec((None, params["n"], None, head_dim), lambda t, b, h: (b, 0, h, 0))
    return q_spec, k_spec


def _row_log_sum_exp(q_grouped, k, params, launch):
    """Pass 1: [B, Hkv, G, R] base-2 log-sum-exp of each row's causal logits."""
    batch, num_kv_heads, group, rows, head_dim = q_grouped.shape
    n_tiles = launch["grid"][0]
    stats_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, n_tiles, group, rows), jnp.float32)
    stats_spec = pl.BlockSpec((None, None, None, group, rows), lambda t, b, h: (b, h, t, 0, 0))
    tile_max, tile_sum = pl.pallas_call(
        functools.partial(_row_stats_kernel, **params),
        out_shape=(stats_shape, stats_shape),
        in_specs=list(_specs(params, rows, head_dim)),
        out_specs=(stats_spec, stats_spec),
        name="minference_vs_row_stats",
        **launch,
    )(q_grouped, k)
    row_max = tile_max.max(axis=2)  # every row sees key 0, so some tile has a real max
    return row_max + jnp.log2((tile_sum * jnp.exp2(tile_max - row_max[:, :, None])).sum(axis=2))


def _probabilities(q_grouped, lse, k, params, launch):
    """Pass 2: column sums [B, Hkv, G, n_tiles * T] and the skewed probabilities."""
    batch, num_kv_heads, group, rows, head_dim = q_grouped.shape
    block_k, n_tiles = params["block_k"], launch["grid"][0]
    q_spec, k_spec = _specs(params, rows, head_dim)
    lse_spec = pl.BlockSpec((None, None, group, rows), lambda t, b, h: (b, h, 0, 0))
    col_spec = pl.BlockSpec((None, None, group, block_k), lambda t, b, h: (b, h, 0, t))
    width = n_tiles * block_k + rows
    skew_spec = pl.BlockSpec((None, None, group, rows, width), lambda t, b, h: (b, h, 0, 0, 0))
    return pl.pallas_call(
        functools.partial(_probs_kernel, **params),
        out_shape=(
            jax.ShapeDtypeStruct((batch, num_kv_heads, group, n_tiles * block_k), jnp.float32),
            jax.ShapeDtypeStruct((batch, num_kv_heads, group, rows, width), q_grouped.dtype),
        ),
        in_specs=[q_spec, lse_spec, k_spec],
        out_specs=(col_spec, skew_spec),
        name="minference_vs_probs",
        **launch,
    )(q_grouped, lse, k)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_k", "num_warps", "num_stages", "interpret")
)
def vertical_slash_scores(
    q_last: jax.Array,
    k: jax.Array,
    *,
    scale: float,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q_last [B, R, Hq, D] (the last R queries), k [B, N, Hkv, D] -> (columns, diagonals).

    columns[b, h, j] = sum over the R rows of softmax(q k^T * scale)[row, j] (causal);
    diagonals[b, h, o] = the same summed along offset o = query position - j. Both [B, Hq, N] f32.
    """
    batch, rows, num_heads, head_dim = q_last.shape
    n, num_kv_heads = k.shape[1], k.shape[2]
    if not supports(n, rows, head_dim) or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(
            f"unsupported: rows {rows}, head_dim {head_dim}, seq {n}, block_k {block_k} (powers "
            "of two >= 16 wanted, seq >= rows)"
        )
    group = num_heads // num_kv_heads
    n_tiles = -(-n // block_k)
    qk_scale = scale * LOG2E
    precision = jax.lax.Precision.HIGHEST if q_last.dtype == jnp.float32 else None
    # [B, Hkv, G, R, D]: the group's queries, contiguous per program (tiny transpose).
    q_grouped = q_last.reshape(batch, rows, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    params = dict(
        n=n,
        group=group,
        block_k=block_k,
        qk_scale=qk_scale,
        precision=precision,
    )
    launch = dict(
        grid=(n_tiles, batch, num_kv_heads),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )
    lse = _row_log_sum_exp(q_grouped, k, params, launch)
    columns, skewed = _probabilities(q_grouped, lse, k, params, launch)
    written = jnp.arange(n)[None, :] >= (rows - 1 - jnp.arange(rows))[:, None]  # [R, N]
    by_u = jnp.where(written, skewed[..., :n], 0).sum(axis=-2, dtype=jnp.float32)  # [B,Hkv,G,N]
    diagonals = by_u[..., ::-1]  # o = N - 1 - u
    columns = columns[..., :n]
    return (
        columns.reshape(batch, num_heads, n),
        diagonals.reshape(batch, num_heads, n),
    )
