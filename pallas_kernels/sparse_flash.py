"""Pallas (Triton lowering) flash attention over a SparseIndex: A100 (sm_80) and H100 (sm_90).

One program per (query block, batch, query head). It walks, with one online softmax:
  1. the diagonal key blocks of the head's set D: the first r (d = 0..r-1, always present) are
     the causal diagonal and get the causal mask, the rest are unmasked dense tiles;
  2. the listed key blocks of this query block (dense tiles);
  3. the columns, gathered `block_kv` at a time, skipping padding and columns D covers.
The index layout is documented in `minference_jax/sparse_index.py`. No policy lives here: the
launch wrapper pads and checks; dispatch is in `minference_jax.attention`. For a right-padded
batch (`lengths`), every key tile is also masked at the sequence's key length (a static switch:
the unpadded program is unchanged).

Addressing: the kernel forms only int32 *row* indices (tokens < 2^30); the Triton lowering turns
(batch, row, head, col) into element offsets and uses 64-bit offsets for arrays over 4 GiB, so
1M tokens x 32 heads x 128 dims (8.6 GB of q) is addressed in 64 bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from minference_jax.sparse_index import (
    SENTINEL,
    SeqLengths,
    SparseIndex,
    check_index_matches_inputs,
    clip_index_to_lengths,
    gather_columns,
    zero_unattended_rows,
)
from pallas_kernels.constants import LOG2E, MASK_VALUE

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _sparse_flash_kernel(
    diag_offset_ref,  # [max_diag]
    diag_count_ref,  # [n_q_blocks]
    block_index_ref,  # [n_q_blocks, max_blocks]
    block_count_ref,  # [n_q_blocks]
    column_index_ref,  # [max_columns], a multiple of block_kv
    column_count_ref,  # [n_q_blocks]
    diag_mask_ref,  # [n_slots] int32
    q_ref,  # [block_q, D]
    k_ref,  # [N_pad, D]
    v_ref,  # [N_pad, D]
    *rest,  # (key_length [1],) (k_col, v_col [C_pad, D] when pregathered,) (poison,) o_ref
    scale: float,
    block_q: int,
    block_kv: int,
    n_q_blocks: int,
    precision,
    pregathered: bool,
    padded: bool,
):
    o_ref = rest[-1]
    key_length = rest[0][0] if padded else None  # keys at or past it are padding
    column_refs = rest[int(padded) : int(padded) + 2]
    ratio = block_q // block_kv
    n_slots = diag_mask_ref.shape[0]
    i = n_q_blocks - 1 - pl.program_id(0)  # longest (last) query blocks are launched first
    q = q_ref[...]
    head_dim = q.shape[-1]
    qk_scale = scale * LOG2E
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    lanes = jnp.arange(block_kv, dtype=jnp.int32)

    def attend(carry, k, v, mask):
        acc, m, row_sum = carry
        s = (
            jax.lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=precision,
            )
            * qk_scale
        )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        row_sum = correction * row_sum + p.sum(axis=-1)
        pv = jax.lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
            precision=precision,
        )
        return correction[:, None] * acc + pv, m_new, row_sum

    def attend_block(carry, key_block, causal=False):
        start = key_block * block_kv
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        mask = rows[:, None] >= (start + lanes)[None, :] if causal else None
        if padded:
            real = (start + lanes < key_length)[None, :]
            mask = real if mask is None else mask & real
        return attend(carry, k, v, mask)

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    last_block = (i + 1) * ratio - 1
    for d in range(ratio):  # causal diagonal: D always starts with 0..r-1
        carry = attend_block(carry, last_block - d, causal=True)

    def diag_body(t, carry):
        return attend_block(carry, last_block - diag_offset_ref[t])

    carry = jax.lax.fori_loop(ratio, diag_count_ref[i], diag_body, carry)

    def listed_body(t, carry):
        return attend_block(carry, block_index_ref[i, t])

    carry = jax.lax.fori_loop(0, block_count_ref[i], listed_body, carry)

    n_columns = column_count_ref[i]

    def column_body(t, carry):
        slot = t * block_kv + lanes
        columns = column_index_ref[pl.ds(t * block_kv, block_kv)]
        rel = last_block - jax.lax.div(columns, block_kv)
        covered = (diag_mask_ref[jnp.clip(rel, 0, n_slots - 1)] != 0) & (rel >= 0)
        valid = (slot < n_columns) & ~covered
        if pregathered:  # contiguous tiles of this head's gathered columns
            k_col_ref, v_col_ref = column_refs
            tile = pl.ds(t * block_kv, block_kv)
            return attend(carry, k_col_ref[tile, :], v_col_ref[tile, :], valid[None, :])
        safe = jnp.where(valid, columns, 0)
        return attend(carry, k_ref[safe, :], v_ref[safe, :], valid[None, :])

    n_column_tiles = jax.lax.div(n_columns + block_kv - 1, block_kv)
    carry = jax.lax.fori_loop(0, n_column_tiles, column_body, carry)

    acc, _, row_sum = carry
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=(
        "softmax_scale",
        "num_warps",
        "num_stages",
        "interpret",
        "poison",
        "pregather_columns",
    ),
)
def sparse_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: SparseIndex,
    *,
    softmax_scale: float | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    poison: bool = False,
    pregather_columns: bool = False,
    lengths: SeqLengths | None = None,
) -> jax.Array:
    """Sparse causal prefill attention. q [B, N, Hq, D], k/v [B, N, Hkv, D] -> [B, N, Hq, D].

    Query head h reads kv head h // (Hq // Hkv) (no repeated K/V). Any N (padded here to the
    query block), head_dim padded to a power of two >= 16. `poison=True` starts from a NaN
    output buffer (tests use it to prove every element is written). `pregather_columns=True`
    reads column tiles from per-head K/V copies of the columns (`gather_columns`, as the Mosaic
    kernel does) instead of gathering rows of K and V inside the kernel. `lengths`: a
    right-padded batch (see `SeqLengths`); padding rows and rows left without a key are zero.
    """
    batch, n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q/k/v must share a dtype among bf16/f16/f32, got {q.dtype}/{k.dtype}/{v.dtype}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"kv heads ({num_kv_heads}) must divide query heads ({num_heads})")
    check_index_matches_inputs(index, q)
    if lengths is not None:  # columns and listed blocks past the lengths: never loaded
        index = clip_index_to_lengths(index, lengths.keys)
    block_q, block_kv = index.block_q, index.block_kv
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"the kernel needs {name} a power of two >= 16, got {size}")
    group = num_heads // num_kv_heads
    n_q_blocks = index.num_q_blocks
    n_pad = n_q_blocks * block_q
    d_pad = max(16, pl.next_power_of_2(head_dim))
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    q_p, k_p, v_p = (_pad_axis(_pad_axis(x, 1, n_pad), 3, d_pad) for x in (q, k, v))
    columns = index.column_index
    columns = _pad_axis(
        columns, 2, max(block_kv, -(-columns.shape[2] // block_kv) * block_kv), SENTINEL
    )
    block_index = _pad_axis(index.block_index, 3, max(1, index.block_index.shape[3]), SENTINEL)

    def whole(x):  # per-(batch, head) slice of an index array
        trailing = x.shape[2:]
        return pl.BlockSpec((None, None, *trailing), lambda i, b, h: (b, h) + (0,) * len(trailing))

    index_arrays = (
        index.diag_offset,
        index.diag_count,
        block_index,
        index.block_count,
        columns,
        index.column_count,
        index.diag_mask.astype(jnp.int32),
    )
    row_block = pl.BlockSpec(
        (None, block_q, None, d_pad), lambda i, b, h: (b, n_q_blocks - 1 - i, h, 0)
    )
    kv_spec = pl.BlockSpec((None, n_pad, None, d_pad), lambda i, b, h: (b, 0, h // group, 0))
    in_specs = [whole(x) for x in index_arrays] + [row_block, kv_spec, kv_spec]
    inputs = [*index_arrays, q_p, k_p, v_p]
    if lengths is not None:  # [B, H, 1]: read like the index arrays
        key_length = jnp.broadcast_to(lengths.keys[:, None, None], (batch, num_heads, 1))
        in_specs.append(whole(key_length))
        inputs.append(key_length.astype(jnp.int32))
    if pregather_columns:
        c_pad = columns.shape[2]
        col_spec = pl.BlockSpec((None, None, c_pad, d_pad), lambda i, b, h: (b, h, 0, 0))
        for x in (k, v):
            in_specs.append(col_spec)
            inputs.append(_pad_axis(gather_columns(x, index.column_index, block_kv), 3, d_pad))
    aliases = {}
    if poison:
        in_specs.append(row_block)
        inputs.append(jnp.full(q_p.shape, jnp.nan, q.dtype))
        aliases = {len(inputs) - 1: 0}

    kernel = functools.partial(
        _sparse_flash_kernel,
        scale=scale,
        block_q=block_q,
        block_kv=block_kv,
        n_q_blocks=n_q_blocks,
        precision=jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
        pregathered=pregather_columns,
        padded=lengths is not None,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
        grid=(n_q_blocks, batch, num_heads),
        in_specs=in_specs,
        out_specs=row_block,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or (4 if block_q <= 64 else 8), num_stages=num_stages or 2
        ),
        interpret=interpret,
        name="minference_sparse_flash",
    )(*inputs)
    out = out[:, :n, :, :head_dim]
    return out if lengths is None else zero_unattended_rows(out, index, lengths)
