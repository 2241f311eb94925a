"""Pure-JAX attention paths: the masked-dense oracle and a gathered sparse path for any backend.

Layout [batch, seq, heads, head_dim]; causal prefill (q_len == kv_len, query i sees keys <= i);
GQA with contiguous groups (query head h reads kv head h // (Hq // Hkv)), never repeating K/V.
`lengths` (a SeqLengths, optional): a right-padded batch; rows past a sequence's query length,
and rows left without any key before its key length, are zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minference_jax.sparse_index import (
    SeqLengths,
    SparseIndex,
    check_index_matches_inputs,
    column_is_covered,
    dense_mask_from_index,
)

# Finite so that a fully masked row would give a uniform row, never NaN (none should exist).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _grouped_masked_attention(q, k, v, mask, scale):
    """q [B, T, Hq, D], k/v [B, S, Hkv, D], mask [B, Hq, T, S] -> [B, T, Hq, D] in f32 math."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = (
        jnp.einsum(
            "btkgd,bskd->bkgts",
            qg,
            k,
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        * scale
    )
    logits = jnp.where(mask.reshape(b, hkv, hq // hkv, t, -1), logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return out.reshape(b, t, hq, d)


def _padded_masked_attention(q, k, v, mask, scale, lengths: SeqLengths | None):
    """`_grouped_masked_attention`, keys past `lengths.keys` masked and rows that are padding or
    keep no key set to zero (a fully masked row would otherwise average every value)."""
    if lengths is None:
        return _grouped_masked_attention(q, k, v, mask, scale)
    n = q.shape[1]
    mask = mask & (jnp.arange(n) < lengths.keys[:, None, None, None])
    rows = (jnp.arange(n) < lengths.queries[:, None, None]) & mask.any(axis=-1)  # [B, H, N]
    out = _grouped_masked_attention(q, k, v, mask, scale)
    return jnp.where(jnp.moveaxis(rows, 1, 2)[..., None], out, 0.0)


def dense_attention_reference(
    q, k, v, *, softmax_scale: float | None = None, lengths: SeqLengths | None = None
) -> jax.Array:
    """Causal attention in f32 math; returns q.dtype."""
    n = q.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    mask = jnp.broadcast_to(causal, (q.shape[0], q.shape[2], n, n))
    return _padded_masked_attention(q, k, v, mask, scale, lengths).astype(q.dtype)


def sparse_attention_reference(
    q,
    k,
    v,
    index: SparseIndex,
    *,
    softmax_scale: float | None = None,
    lengths: SeqLengths | None = None,
) -> jax.Array:
    """The oracle: dense attention under the index's [B, H, N, N] mask. O(N^2) memory."""
    check_index_matches_inputs(index, q)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    mask = dense_mask_from_index(index)
    return _padded_masked_attention(q, k, v, mask, scale, lengths).astype(q.dtype)


def _tile_positions(index: SparseIndex, q_block: jax.Array):
    """Key positions [B, H, P] and validity for one query block: diag, listed blocks, columns."""
    bk, r = index.block_kv, index.ratio
    lane = jnp.arange(bk, dtype=jnp.int32)

    diag_blocks = (q_block + 1) * r - 1 - index.diag_offset  # [B, H, max_diag]
    diag_ok = jnp.arange(index.diag_offset.shape[-1]) < index.diag_count[:, :, q_block, None]
    listed = index.block_index[:, :, q_block]  # [B, H, max_blocks]
    listed_ok = jnp.arange(listed.shape[-1]) < index.block_count[:, :, q_block, None]
    blocks = jnp.concatenate([diag_blocks, listed], axis=-1)
    blocks_ok = jnp.concatenate([diag_ok, listed_ok], axis=-1)
    block_pos = (blocks[..., None] * bk + lane).reshape(*blocks.shape[:2], -1)
    block_ok = jnp.repeat(blocks_ok, bk, axis=-1)

    columns = index.column_index
    col_ok = jnp.arange(columns.shape[-1]) < index.column_count[:, :, q_block, None]
    col_ok &= ~column_is_covered(index, columns[:, :, None, :], q_block)[:, :, 0]
    positions = jnp.concatenate([block_pos, columns], axis=-1)
    valid = jnp.concatenate([block_ok, col_ok], axis=-1) & (positions < index.seq_len)
    return jnp.where(valid, positions, 0), valid


def sparse_attention_xla(
    q,
    k,
    v,
    index: SparseIndex,
    *,
    softmax_scale: float | None = None,
    query_blocks=None,
    lengths: SeqLengths | None = None,
) -> jax.Array:
    """Gathered sparse attention in plain XLA, one query block at a time (the no-GPU fallback).

    Memory per step is B x H x block_q x (tiles x block_kv), so it suits moderate N on CPU.
    `query_blocks` (int array): compute only these query blocks and return their rows
    [B, len(query_blocks) * block_q, H, D] (rows past N included) — spot checks at 1M tokens.
    """
    check_index_matches_inputs(index, q)
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    bq = index.block_q
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    n_q_blocks = index.num_q_blocks
    q_pad = jnp.pad(q, ((0, 0), (0, n_q_blocks * bq - n), (0, 0), (0, 0)))
    k_heads = jnp.moveaxis(k, 2, 1)  # [B, Hkv, N, D]
    v_heads = jnp.moveaxis(v, 2, 1)
    # f32 inputs get true f32 matmuls (GPUs default to TF32); 16-bit inputs use the tensor cores.
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    batch_idx = jnp.arange(b)[:, None, None]
    kv_head_idx = (jnp.arange(hq) // (hq // hkv))[None, :, None]

    def one_block(q_block):
        positions, valid = _tile_positions(index, q_block)  # [B, H, P]
        rows = q_block * bq + jnp.arange(bq)
        valid = valid[:, :, None, :] & (positions[:, :, None, :] <= rows[None, None, :, None])
        if lengths is not None:
            valid &= positions[:, :, None, :] < lengths.keys[:, None, None, None]
        k_tiles = k_heads[batch_idx, kv_head_idx, positions]  # [B, H, P, D]
        v_tiles = v_heads[batch_idx, kv_head_idx, positions]
        q_rows = jax.lax.dynamic_slice_in_dim(q_pad, q_block * bq, bq, axis=1)  # [B, bq, H, D]
        logits = (
            jnp.einsum(
                "bqhd,bhpd->bhqp",
                q_rows,
                k_tiles,
                preferred_element_type=jnp.float32,
                precision=precision,
            )
            * scale
        )
        probs = jax.nn.softmax(jnp.where(valid, logits, MASK_VALUE), axis=-1)
        out = jnp.einsum(
            "bhqp,bhpd->bqhd",
            probs.astype(v.dtype),
            v_tiles,
            preferred_element_type=jnp.float32,
            precision=precision,
        )
        if lengths is not None:  # padding rows, and rows left without a key: zero
            kept = valid.any(axis=-1) & (rows < lengths.queries[:, None, None])  # [B, H, bq]
            out = jnp.where(jnp.moveaxis(kept, 1, 2)[..., None], out, 0.0)
        return out.astype(q.dtype)

    if query_blocks is not None:
        out = jax.lax.map(one_block, jnp.asarray(query_blocks, jnp.int32))
        return jnp.moveaxis(out, 0, 1).reshape(b, -1, hq, d)
    out = jax.lax.map(one_block, jnp.arange(n_q_blocks, dtype=jnp.int32))  # [nqb, B, bq, H, D]
    out = jnp.moveaxis(out, 0, 1).reshape(b, n_q_blocks * bq, hq, d)
    return out[:, :n]
