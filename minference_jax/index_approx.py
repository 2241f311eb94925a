"""Jitted index approximation: each head's sparse index estimated from the prompt itself.

Everything is vectorised over batch and all heads of a layer: no Python loop over heads, no
host round trip. Heads with different patterns (and budgets) in one layer are handled by
computing each pattern family present once for the whole layer and selecting per head with masks.
Budgets are traced data (`plan_index` splits a layer into a static `IndexPlan` of bucketed
buffer widths and per-head budget arrays), so layers differing only in budgets share a program.

Right-padded batches (`lengths`, a SeqLengths): every estimate reads each sequence's own rows
and keys only. Vertical-Slash reads the last `last_q` rows before the sequence's query length
(a per-sequence gather), block scores pool only real rows and keys and never pick a key block
that lies wholly in the padding. Without lengths the programs are the unpadded ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from minference_jax.sparse_index import (
    SENTINEL,
    SeqLengths,
    SparseIndex,
    check_attention_inputs,
    check_block_sizes,
    check_patterns,
    check_positive_int,
    check_seq_lengths,
    diag_mask_from_slashes,
    finalize_index,
    num_blocks,
    resolve_softmax_scale,
    seq_lengths,
)
from pallas_kernels import antidiag_scores, vs_estimate
from pallas_kernels import sampled_scores as sampled_scores_kernel

# Above this many bytes of f32 estimation scores, loop over kv heads instead of vmapping.
_SCORE_BYTES_PER_STEP = 2 << 30
# Block-sparse scores per selection step: the radix selection holds a few arrays of that size.
_BLOCK_SCORE_BYTES_PER_STEP = 1 << 30
# The Pallas estimator's one large temporary is its skewed probability buffer, [B, Hq, 64, ~N]
# in the input dtype: 4.3 GB at 1M x 32 heads, run in one launch (as measured); above this
# (e.g. batch 2 at 1M) it loops over kv heads.
_SKEW_BYTES_PER_STEP = 8 << 30


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, T, Hkv, G, D]: contiguous GQA groups, no K/V repetition."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def _map_over_kv_heads(fn, q_grouped, k, one_at_a_time: bool):
    """fn(q [B,T,G,D], k [B,N,D]) -> pytree of [B, G, ...]; mapped over kv heads -> [B, Hq, ...].

    `one_at_a_time`: a sequential loop over kv heads (bounds memory) instead of vmap.
    """
    in_axes = (2, 2)
    if not one_at_a_time:
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


def _vertical_slash_scores(q_last, k, *, scale: float, lengths: SeqLengths | None = None):
    """q_last [B, R, G, D] (last R queries), k [B, N, D] -> column and diagonal scores [B, G, N].

    With `lengths`, q_last holds each sequence's last R rows before its query length (rows
    before position 0 and keys past the key length count for nothing)."""
    rows, n = q_last.shape[1], k.shape[1]
    logits = jnp.einsum("brgd,bnd->bgrn", q_last, k, preferred_element_type=jnp.float32) * scale
    if lengths is not None:
        return _padded_vertical_slash_scores(logits, lengths)
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]  # [R, N]
    logits = jnp.where(causal, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return probs.sum(axis=-2), _skew_diagonal_sums(probs)


def _last_row_positions(lengths: SeqLengths, rows: int) -> jax.Array:
    """[B, R] positions of each sequence's last R rows (negative: before the sequence)."""
    return lengths.queries[:, None] - rows + jnp.arange(rows, dtype=jnp.int32)


def _last_rows(q: jax.Array, lengths: SeqLengths, rows: int) -> jax.Array:
    """[B, R, H, D]: each sequence's last R rows before its query length (row 0 repeated where
    the sequence is shorter; `_last_row_positions` tells those apart)."""
    positions = jnp.maximum(_last_row_positions(lengths, rows), 0)
    return q[jnp.arange(q.shape[0])[:, None], positions]


def _padded_vertical_slash_scores(logits, lengths: SeqLengths):
    """Column and diagonal scores [B, G, N] of logits [B, G, R, N] of each sequence's last R
    rows (`_last_rows`)."""
    rows, n = logits.shape[2:]
    positions = _last_row_positions(lengths, rows)[:, None, :, None]  # [B, 1, R, 1]
    keys = jnp.arange(n)
    seen = (keys <= positions) & (keys < lengths.keys[:, None, None, None])  # [B, 1, R, N]
    probs = jax.nn.softmax(jnp.where(seen, logits, -jnp.inf), axis=-1)
    probs = jnp.where(seen, probs, 0.0)  # rows that see no key: zero, not NaN
    # The skew takes row r to sit at position N - R + r, N - length later than it does, so it
    # files the true offset o under o + (N - length).
    shifted = _skew_diagonal_sums(probs)
    offsets = keys + (n - lengths.queries)[:, None, None]  # [B, 1, N]
    diagonals = jnp.take_along_axis(shifted, jnp.minimum(offsets, n - 1), axis=-1)
    return probs.sum(axis=-2), jnp.where(offsets < n, diagonals, 0.0)


def _top_per_head(scores: jax.Array, budgets: jax.Array, k_max: int) -> jax.Array:
    """Top `budgets[h]` (<= k_max) indices of scores [B, H, N] per head, ascending, padded.

    Same set as `lax.top_k` (ties: lower index first) without its sort (see `_radix_select`).
    Scores must be >= 0 (or +inf): their f32 bit patterns then order like the values.
    """
    bits = jax.lax.bitcast_convert_type(jnp.where(scores > 0, scores, 0.0), jnp.uint32)
    return _radix_select(bits, jnp.asarray(budgets, jnp.int32)[None, :, None], k_max)


def _radix_select(bits: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Indices of the k (<= k_max) largest uint32 keys of each row of bits [..., M], ascending.

    k broadcasts against [..., 1]. Ties go to the lower index, as in `lax.top_k`; padding is
    SENTINEL. A radix search finds each row's k-th largest key (2 bits per step: 3 counting
    passes; on an H200 this beat 1, 4 and 8 bits), then a prefix count places the chosen indices
    in order: no sort.
    """
    threshold = jnp.zeros(bits.shape[:-1] + (1,), jnp.uint32)  # largest t: #(bits >= t) >= k
    for shift in range(30, -1, -2):
        digit = sum(
            (
                (bits >= threshold + jnp.uint32(d << shift)).sum(-1, keepdims=True, dtype=jnp.int32)
                >= k
            )
            for d in (1, 2, 3)
        )
        threshold = threshold + (digit.astype(jnp.uint32) << shift)
    above = bits > threshold
    ties_wanted = k - above.sum(axis=-1, keepdims=True, dtype=jnp.int32)
    tie_rank = jnp.cumsum(bits == threshold, axis=-1, dtype=jnp.int32)
    # rank[j] = how many chosen indices are <= j (all above the threshold, the first ties).
    rank = jnp.cumsum(above, axis=-1, dtype=jnp.int32) + jnp.minimum(tie_rank, ties_wanted)
    rank = jnp.where(k > 0, rank, 0)
    slots = jnp.arange(1, k_max + 1, dtype=jnp.int32)
    first_at = lambda r: jnp.searchsorted(r, slots, method="scan_unrolled")  # noqa: E731
    flat_rank = rank.reshape(-1, rank.shape[-1])
    position = jax.vmap(first_at)(flat_rank).reshape(rank.shape[:-1] + (k_max,))
    return jnp.where(slots <= rank[..., -1:], position, SENTINEL).astype(jnp.int32)


ESTIMATORS = ("pallas", "xla")


def _check_estimator(estimator) -> None:
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'pallas', 'xla' or None")


def default_estimator(dtype, seq_len: int, rows: int, head_dim: int, *, on_gpu: bool) -> str:
    """The VS estimator to use: pallas on GPU for bf16/f16 inputs it takes, else xla.

    f32 stays on XLA: the kernel's exact-f32 dots build as unrolled FMA code, and a mixed-pattern
    f32 index took minutes to compile on the H200 (benchmarks/NOTES.md, "Fused vertical-slash
    estimator").
    """
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    supported = vs_estimate.supports(seq_len, rows, head_dim)
    return "pallas" if on_gpu and sixteen_bit and supported else "xla"


def _sampled_rows_kernel(estimator, dtype, head_dim: int, lengths, *, on_gpu: bool) -> bool:
    """Whether sampled rows score with `pallas_kernels.sampled_scores` (else the XLA logits):
    "pallas" asks for it (interpreted off GPU); None takes it on GPU for bf16/f16 inputs of an
    unpadded batch with a power-of-two head_dim (Triton's tile shapes)."""
    supported = lengths is None and head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if estimator == "pallas" and not supported:
        raise ValueError(
            "the Pallas sampled-rows scorer takes an unpadded batch and a power-of-two head_dim "
            f"(got head_dim {head_dim}"
            + (", sequence lengths" if lengths is not None else "")
            + "): use estimator='xla' or None"
        )
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return estimator == "pallas" or (estimator is None and on_gpu and sixteen_bit and supported)


def vertical_slash_scores(
    q: jax.Array,
    k: jax.Array,
    *,
    scale: float,
    last_q: int = P.LAST_Q,
    estimator: str | None = None,
    lengths: SeqLengths | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Column and diagonal sums [B, Hq, N] of the last `last_q` queries' causal softmax.

    Each head's columns (and diagonals) sum to the number of rows used. `estimator`: see
    `estimate_vertical_slash`. `lengths`: a right-padded batch; each sequence's own last rows
    are read, and padding keys get nothing (the XLA estimator: the Pallas one has no lengths).
    """
    _check_estimator(estimator)
    n = q.shape[1]
    rows = min(last_q, n)
    on_gpu = jax.default_backend() == "gpu"
    if lengths is not None:
        if estimator == "pallas":
            raise ValueError(
                "the Pallas vertical-slash estimator takes no sequence lengths: use "
                "estimator='xla' or None for a padded batch"
            )
        return _map_over_kv_heads(
            functools.partial(_vertical_slash_scores, scale=scale, lengths=lengths),
            _grouped(_last_rows(q, lengths, rows), k.shape[2]),
            k,
            one_at_a_time=q.shape[0] * q.shape[2] * rows * n * 4 > _SCORE_BYTES_PER_STEP,
        )
    if estimator is None:
        estimator = default_estimator(q.dtype, n, rows, q.shape[-1], on_gpu=on_gpu)
    q_last = q[:, n - rows :]
    if estimator == "pallas":
        kernel = functools.partial(
            vs_estimate.vertical_slash_scores, scale=scale, interpret=not on_gpu
        )
        if q.shape[0] * q.shape[2] * rows * n * q.dtype.itemsize <= _SKEW_BYTES_PER_STEP:
            columns, diagonals = kernel(q_last, k)
        else:
            columns, diagonals = _map_over_kv_heads(
                lambda q_group, k_head: kernel(q_group, k_head[:, :, None]),
                _grouped(q_last, k.shape[2]),
                k,
                one_at_a_time=True,
            )
    else:
        columns, diagonals = _map_over_kv_heads(
            functools.partial(_vertical_slash_scores, scale=scale),
            _grouped(q_last, k.shape[2]),
            k,
            one_at_a_time=q.shape[0] * q.shape[2] * rows * n * 4 > _SCORE_BYTES_PER_STEP,
        )
    return columns, diagonals


def estimate_vertical_slash(
    q: jax.Array,
    k: jax.Array,
    budgets,
    *,
    scale: float,
    last_q: int = P.LAST_Q,
    max_budgets: tuple[int, int] | None = None,
    estimator: str | None = None,
    lengths: SeqLengths | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Estimate verticals and slashes for every query head.

    q [B, N, Hq, D], k [B, N, Hkv, D]; budgets [Hq, 2] = (n_vertical, n_slash) per head, may be
    traced when `max_budgets` (static top-k widths, >= every budget) is given.
    `estimator`: "pallas" (the fused kernel of pallas_kernels/vs_estimate.py; interpreted off
    GPU), "xla", or None (`default_estimator`). `lengths`: see `vertical_slash_scores`.
    Returns (verticals [B, Hq, max_v] key positions, slashes [B, Hq, max_s] offsets i - j), both
    ascending and SENTINEL-padded. The first 30 columns and the 100 most local offsets always win.
    """
    n = q.shape[1]
    columns, diagonals = vertical_slash_scores(
        q, k, scale=scale, last_q=last_q, estimator=estimator, lengths=lengths
    )
    positions = jnp.arange(n)
    columns = jnp.where(positions < P.N_SINK_COLUMNS, jnp.inf, columns)
    diagonals = jnp.where(positions < P.N_LOCAL_SLASHES, jnp.inf, diagonals)
    if max_budgets is None:
        max_budgets = tuple(int(x) for x in np.asarray(budgets).reshape(-1, 2).max(axis=0))
    budgets = jnp.minimum(jnp.asarray(budgets, jnp.int32).reshape(-1, 2), n)
    widths = [min(width, n) for width in max_budgets]
    num_heads = columns.shape[1]
    # One selection for both score kinds: half the launches of the radix passes.
    top = _top_per_head(
        jnp.concatenate([columns, diagonals], axis=1),
        jnp.concatenate([budgets[:, 0], budgets[:, 1]]),
        max(widths),
    )
    return top[:, :num_heads, : widths[0]], top[:, num_heads:, : widths[1]]


# Query-block chunks are scored in this many groups, each against only the key blocks its last
# query block can see (a static width per group): 37.5% fewer score FLOPs than scoring every
# chunk against every key, at the price of one compiled loop body per group.
_CAUSAL_GROUPS = 4


def _in_causal_groups(one_chunk, n_chunks: int, chunk: int, ratio: int, n_kv_blocks: int):
    """one_chunk(first_q_block, width) -> [B, H, chunk, ...] over every chunk of query blocks,
    in `_CAUSAL_GROUPS` groups whose static key width is what the group's last block sees.
    Returns [B, H, n_chunks * chunk, ...]."""
    bounds = np.unique(np.linspace(0, n_chunks, min(n_chunks, _CAUSAL_GROUPS) + 1).round())
    parts = []
    for lo, hi in zip(bounds[:-1].astype(int), bounds[1:].astype(int), strict=True):
        width = min(n_kv_blocks, hi * chunk * ratio)
        if hi - lo == 1:
            parts.append(one_chunk(lo * chunk, width)[None])
        else:
            firsts = jnp.arange(lo, hi) * chunk
            parts.append(jax.lax.map(functools.partial(one_chunk, width=width), firsts))
    out = jnp.moveaxis(jnp.concatenate(parts, axis=0), 0, 2)  # [B, H, chunks, chunk, ...]
    return out.reshape(*out.shape[:2], n_chunks * chunk, *out.shape[4:])


def _pool_blocks(x: jax.Array, block: int, length: jax.Array | None = None) -> jax.Array:
    """[B, N, H, D] -> [B, nb, H, D] mean over each block's real rows (a partial tail block too).

    `length` [B]: rows at or past it are padding and left out (a block of padding pools to 0).
    """
    b, n, h, d = x.shape
    nb = num_blocks(n, block)
    x = x.astype(jnp.float32)
    if length is not None:
        x = jnp.where(jnp.arange(n)[None, :, None, None] < length[:, None, None, None], x, 0.0)
    x = jnp.pad(x, ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
    sums = x.reshape(b, nb, block, h, d).sum(axis=2)
    if length is None:
        rows = jnp.minimum(n - jnp.arange(nb) * block, block).astype(jnp.float32)
        return sums / rows[None, :, None, None]
    rows = jnp.clip(length[:, None] - jnp.arange(nb) * block, 1, block).astype(jnp.float32)
    return sums / rows[:, :, None, None]


def _key_blocks(lengths: SeqLengths | None, block_kv: int) -> jax.Array | None:
    """[B] how many key blocks hold a key before each sequence's key length (None: all)."""
    return None if lengths is None else -(-lengths.keys // block_kv)


def estimate_block_sparse(
    q: jax.Array,
    k: jax.Array,
    top_k,
    *,
    scale: float,
    block_q: int,
    block_kv: int,
    max_top_k: int | None = None,
    lengths: SeqLengths | None = None,
) -> jax.Array:
    """Top key blocks per query block from mean-pooled q and k, excluding the diagonal blocks.

    q [B, N, Hq, D], k [B, N, Hkv, D]; top_k [Hq] counts all tiles incl. the r diagonal blocks
    (may be traced when the static `max_top_k` is given). `lengths`: a right-padded batch
    (blocks pool their real rows; key blocks wholly past the key length are never chosen).
    Returns [B, Hq, n_q_blocks, max(top_k) - r] key-block ids, ascending, SENTINEL-padded: the
    set lax.top_k would pick (equal scores: the lower block), selected without a sort.
    """
    n = q.shape[1]
    ratio = block_q // block_kv
    if max_top_k is None:
        max_top_k = int(np.max(top_k))
    extra = jnp.maximum(jnp.asarray(top_k, jnp.int32) - ratio, 0)
    n_q_blocks = num_blocks(n, block_q)
    k_max = int(min(max(max_top_k - ratio, 0), num_blocks(n, block_kv)))
    if k_max == 0:
        return jnp.full((q.shape[0], q.shape[2], n_q_blocks, 0), SENTINEL, jnp.int32)
    query_length, key_length = (None, None) if lengths is None else lengths
    pooled_q = _grouped(_pool_blocks(q, block_q, query_length), k.shape[2])  # [B, nqb, Hkv, G, D]
    pooled_k = _pool_blocks(k, block_kv, key_length)  # [B, nkb, Hkv, D]
    n_kv_blocks = pooled_k.shape[1]
    key_blocks = _key_blocks(lengths, block_kv)

    def top_blocks(first, width):
        chunk_q = jax.lax.dynamic_slice_in_dim(padded_q, first, chunk, axis=1)
        s = jnp.einsum(
            "bckgd,bmkd->bkgcm", chunk_q, pooled_k[:, :width], preferred_element_type=jnp.float32
        )
        s = s.reshape(s.shape[0], -1, *s.shape[3:]) * scale  # [B, Hq, C, width]
        q_blocks = first + jnp.arange(chunk)
        n_allowed = jnp.minimum(q_blocks * ratio, n_kv_blocks)  # strictly before the diagonal
        if key_blocks is None:
            allowed = jnp.arange(width)[None, :] < n_allowed[:, None]
        else:  # [B, 1, C, 1]: nor wholly in the padding
            n_allowed = jnp.minimum(n_allowed, key_blocks[:, None])[:, None, :, None]
            allowed = jnp.arange(width) < n_allowed
        # Allowed scores map to keys >= 1 (order kept), the rest to 0; k never exceeds the
        # allowed count, so a 0 key is never chosen.
        keys = jnp.where(allowed, _order_key(s), jnp.uint32(0))
        if key_blocks is None:
            k = jnp.minimum(extra[None, :, None, None], n_allowed[None, None, :, None])
        else:
            k = jnp.minimum(extra[None, :, None, None], n_allowed)
        return _radix_select(keys, k, k_max)

    # Chunk query blocks so the [B, Hq, chunk, nkb] scores (and the selection's few arrays of the
    # same size) stay bounded at 1M tokens.
    per_q_block = q.shape[0] * q.shape[2] * n_kv_blocks * 4
    chunk = max(1, min(n_q_blocks, _BLOCK_SCORE_BYTES_PER_STEP // per_q_block))
    n_chunks = num_blocks(n_q_blocks, chunk)
    padded_q = jnp.pad(
        pooled_q, ((0, 0), (0, n_chunks * chunk - n_q_blocks), (0, 0), (0, 0), (0, 0))
    )
    return _in_causal_groups(top_blocks, n_chunks, chunk, ratio, n_kv_blocks)[:, :, :n_q_blocks]


def _order_key(x: jax.Array) -> jax.Array:
    """f32 -> uint32 keys that order like the values (NaN excepted); -inf maps above 0.

    -0.0 becomes +0.0 first: the two compare equal, so they must tie.
    """
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 != 0, ~bits, bits | jnp.uint32(1 << 31))


# --- Budgets that follow the attention: threshold selection and the adaptive patterns ----------

# Relative slack on a cumulative target, so that f32 summation order never asks for one entry
# more than the exact mass needs (e.g. 5 of 10 equal scores at threshold 0.5).
_MASS_SLACK = 2.0**-16
# Per-head budgets that are fractions (the rest are int32 counts and flags).
_FLOAT_BUDGETS = ("threshold", "query_aware")


def _largest_reaching(x: jax.Array, weight: jax.Array, target: jax.Array) -> jax.Array:
    """bool [..., M]: the fewest largest entries of x >= 0 (ties to the lower index) whose
    weights sum to at least target [..., 1] (none when target <= 0).

    weight = x: cumulative mass; weight = 1: top-k. See `_largest_reaching_each`.
    """
    return _largest_reaching_each([(x, weight, target)])[0]


def _largest_reaching_each(searches) -> list[jax.Array]:
    """`_largest_reaching` for several (x, weight, target) of one shape, in one loop.

    Sort-free: a radix search over the f32 bit patterns (which order like the values) for the
    largest cut c with weight(x >= c) >= target, 2 bits a step, then the ties at the cut in index
    order. Each of the 16 steps is one reduction over [3 candidate digits, searches, ..., M]: one
    kernel a step on GPU, however many searches share the loop.
    """
    bits = jnp.stack([jax.lax.bitcast_convert_type(x, jnp.uint32) for x, _, _ in searches])
    weight = jnp.stack([jnp.broadcast_to(w, x.shape) for x, w, _ in searches])
    target = jnp.stack([jnp.broadcast_to(t, x.shape[:-1] + (1,)) for x, _, t in searches])
    digits = jnp.arange(1, 4, dtype=jnp.uint32).reshape((3,) + (1,) * target.ndim)

    def radix_step(step, cut):
        shift = (30 - 2 * step).astype(jnp.uint32)
        candidates = cut[None] + (digits << shift)  # [3, S, ..., 1]
        sums = jnp.where(bits[None] >= candidates, weight[None], 0.0).sum(-1, keepdims=True)
        digit = (sums >= target[None]).sum(0, dtype=jnp.uint32)
        return cut + (digit << shift)

    # A loop, not unrolled: unrolled steps made each selection's CPU compile take seconds.
    cut = jax.lax.fori_loop(0, 16, radix_step, jnp.zeros(target.shape, jnp.uint32))
    above = bits > cut
    missing = target - jnp.where(above, weight, 0.0).sum(axis=-1, keepdims=True)
    tie_weight = jnp.where(bits == cut, weight, 0.0)
    before = jnp.cumsum(tie_weight, axis=-1) - tie_weight  # tie weight earlier in the row
    chosen = above | ((bits == cut) & (before < missing))
    return list(chosen)


def threshold_keep(scores: jax.Array, threshold, rule: str) -> jax.Array:
    """bool [..., M]: each row's entries kept by a selection rule, before any capacity.

    scores [..., M] (entries <= 0 or NaN count as 0 and are never kept); `threshold`
    broadcastable to the leading shape [...], may be traced.
    - "cumulative": the fewest entries whose sum reaches `threshold` x the row total (largest
      first, ties to the lower index), up to a 2^-16 relative slack; 0 keeps none, 1 keeps every
      positive entry. Sort-free (`_largest_reaching`): 16 steps of one masked-sum reduction.
    - "relative": every positive entry >= `threshold` x the row maximum (one max, one compare).
    - "absolute": every positive entry >= `threshold` x the row total: the rule of the exact
      oracle, which keeps the tiles of largest mass over all rows and heads alike, so a row whose
      mass is spread keeps fewer entries than the cumulative rule would give it.
    """
    x = jnp.where(scores > 0, scores, 0.0).astype(jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), x.shape[:-1])[..., None]
    return _keep_and_search(x, t, rule)[0]


def _keep_and_search(x: jax.Array, t: jax.Array, rule: str, search=None):
    """(`threshold_keep` of x >= 0 at t [..., 1], the `_largest_reaching` mask of `search`, an
    (x, weight, target) of x's shape, or None). The cumulative rule runs `search` in its own
    radix loop (no second loop); the other rules have no loop, so they leave `search` (None)."""
    positive = x > 0
    if rule == "relative":
        return positive & (x >= t * x.max(axis=-1, keepdims=True)), None
    if rule == "absolute":
        return positive & (x >= t * x.sum(axis=-1, keepdims=True)), None
    if rule != "cumulative":
        raise ValueError(f"unknown selection rule {rule!r}; choose from {P.SELECTION_RULES}")
    target = t * x.sum(axis=-1, keepdims=True) * (1.0 - _MASS_SLACK)
    reaching, *found = _largest_reaching_each([(x, x, target)] + ([search] if search else []))
    return jnp.where(t >= 1, positive, reaching & positive), (found[0] if found else None)


def _compact(keep: jax.Array, capacity: int) -> jax.Array:
    """Indices of the first `capacity` True entries of each row, ascending, SENTINEL-padded."""
    rank = jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(keep & (rank < capacity), rank, capacity)  # the rest land in a spare slot
    out = jnp.full(keep.shape[:-1] + (capacity + 1,), SENTINEL, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(keep.shape[-1], dtype=jnp.int32), keep.shape)
    return jnp.put_along_axis(out, slot, positions, axis=-1, inplace=False)[..., :capacity]


def select_by_threshold(
    scores: jax.Array, threshold, capacity: int, rule: str, limit=None
) -> jax.Array:
    """[..., capacity] ascending SENTINEL-padded indices of each row's `threshold_keep` set.

    A row keeping more than `limit` entries (broadcastable to the leading shape, may be traced;
    default and at most the static `capacity`, <= M) keeps its `limit` largest instead (ties to
    the lower index); that branch only runs when some row overflows.
    """
    return _capped(scores, threshold_keep(scores, threshold, rule), capacity, limit)


def _capped(scores: jax.Array, keep: jax.Array, capacity: int, limit=None) -> jax.Array:
    """`select_by_threshold` from the kept set."""
    limit = jnp.minimum(capacity if limit is None else jnp.asarray(limit, jnp.int32), capacity)
    limit = jnp.broadcast_to(limit, keep.shape[:-1])
    overflow = keep.sum(axis=-1, dtype=jnp.int32) > limit

    def largest():
        x = jnp.where(scores > 0, scores, 0.0).astype(jnp.float32)
        top = _largest_reaching(x, jnp.ones_like(x), limit[..., None].astype(jnp.float32))
        return _compact(jnp.where(overflow[..., None], top, keep), capacity)

    return jax.lax.cond(overflow.any(), largest, lambda: _compact(keep, capacity))


def _heads(mask: jax.Array) -> jax.Array:
    """[Hq] bool -> broadcastable over [B, Hq, chunk, width] scores."""
    return mask[None, :, None, None]


def _strided_rows(x: jax.Array, stride: int, *, reverse: bool) -> jax.Array:
    """[B, N, H, D] (N a multiple of stride) -> [B, N / stride, H, stride * D]: each group of
    `stride` rows side by side (reversed within the group for queries: anti-diagonals)."""
    b, n, h, d = x.shape
    x = x.reshape(b, n // stride, stride, h, d)
    if reverse:
        x = x[:, :, ::-1]
    return jnp.moveaxis(x, 2, 3).reshape(b, n // stride, h, stride * d)


def _block_scores_by_chunk(
    q,
    k,
    *,
    scale,
    stride,
    pooled_heads,
    block_q,
    block_kv,
    sample_rows=0,
    sampled_heads=None,
    estimator=None,
    lengths=None,
):
    """(score_fn, n_q_blocks, chunk): score_fn(first_q_block, width) -> [B, Hq, chunk, width]
    attention mass of each query block on key blocks 0..width-1 (static; at least every key
    block the chunk's query blocks can see), rows summing to 1 (0 past the causal limit).

    Heads where `sampled_heads` [Hq] is True score from the exact softmax of `sample_rows` query
    rows spread over each query block (None: no such head); heads where `pooled_heads` [Hq] is
    True from mean-pooled q and k (softmax over key blocks; None: no such head); the others
    from strided anti-diagonals (`stride`; 0: no anti-diagonal head), by `estimator`
    ("pallas": `antidiag_scores`, interpreted off GPU, unpadded batches only; "xla" or None:
    the materialised strided logits. The kernel is opt-in until its GPU speed is measured:
    benchmarks/NOTES.md, "Anti-diagonal scores without the logits"). `lengths`: a right-padded
    batch (padding rows and keys score nothing)."""
    batch, n, num_heads, _ = q.shape
    query_length, key_length = (None, None) if lengths is None else lengths
    key_blocks = _key_blocks(lengths, block_kv)
    num_kv = k.shape[2]
    ratio = block_q // block_kv
    n_q_blocks, n_kv_blocks = num_blocks(n, block_q), num_blocks(n, block_kv)
    on_gpu = jax.default_backend() == "gpu"
    if estimator == "pallas" and lengths is not None:
        raise ValueError("the Pallas block scorers take no sequence lengths; use 'xla'")
    fused = bool(stride) and estimator == "pallas"
    fused_sampled = bool(sample_rows) and _sampled_rows_kernel(
        estimator, q.dtype, q.shape[-1], lengths, on_gpu=on_gpu
    )
    strided_cols = n_kv_blocks * block_kv // stride if stride else 0
    pooled_cols = 0 if pooled_heads is None else n_kv_blocks
    # Bytes per query block of what a chunk holds: the XLA path's f32 logits, or the kernel's
    # per-row sums (`group` columns each) and the selection's scores.
    anti_floats = block_q // max(stride, 1) * strided_cols
    if fused:
        group = antidiag_scores.column_group(block_kv // stride)
        anti_floats = anti_floats // group + n_kv_blocks
    # The sampled rows' f32 logits, or the kernel's per-block sums and maxima (their mass is
    # averaged over the rows in the same XLA fusion that computes it, never stored per row).
    sampled_floats = sample_rows * n_kv_blocks * (2 if fused_sampled else block_kv)
    per_q_block = batch * num_heads * 4 * (pooled_cols + anti_floats + sampled_floats)
    chunk = max(1, min(n_q_blocks, _SCORE_BYTES_PER_STEP // per_q_block))
    n_chunks = num_blocks(n_q_blocks, chunk)
    padded_rows = n_chunks * chunk * block_q

    if pooled_heads is not None:
        pooled_q = _grouped(_pool_blocks(q, block_q, query_length), num_kv)  # [B, nqb, Hkv, G, D]
        pooled_q = jnp.pad(pooled_q, ((0, 0), (0, n_chunks * chunk - n_q_blocks)) + ((0, 0),) * 3)
        pooled_k = _pool_blocks(k, block_kv, key_length)  # [B, nkb, Hkv, D]
    if stride and lengths is not None:  # padding rows and keys add nothing to a strided dot
        q = jnp.where(jnp.arange(n)[:, None, None] < query_length[:, None, None, None], q, 0)
        k = jnp.where(jnp.arange(n)[:, None, None] < key_length[:, None, None, None], k, 0)
    if fused:
        tile_rows, tile_cols = antidiag_scores.TILE_ROWS, antidiag_scores.TILE_COLS
        # Every chunk reads a whole number of row tiles, the last one past the padding too.
        total_rows = padded_rows + tile_rows * stride
        cols_pad = num_blocks(strided_cols, tile_cols) * tile_cols
        q_strided = antidiag_scores.strided_queries(
            jnp.pad(q, ((0, 0), (0, total_rows - n), (0, 0), (0, 0))), stride
        )
        k_strided = antidiag_scores.strided_keys(
            jnp.pad(k, ((0, 0), (0, cols_pad * stride - n), (0, 0), (0, 0))), stride
        )
    elif stride:
        pad_q = ((0, 0), (0, padded_rows - n), (0, 0), (0, 0))
        pad_k = ((0, 0), (0, n_kv_blocks * block_kv - n), (0, 0), (0, 0))
        q_strided = _grouped(_strided_rows(jnp.pad(q, pad_q), stride, reverse=True), num_kv)
        k_strided = _strided_rows(jnp.pad(k, pad_k), stride, reverse=False)

    def pooled_scores(first, width):
        q_blocks = first + jnp.arange(chunk)
        causal = jnp.arange(width)[None, :] <= ((q_blocks + 1) * ratio - 1)[:, None]  # [C, W]
        chunk_q = jax.lax.dynamic_slice_in_dim(pooled_q, first, chunk, axis=1)
        s = jnp.einsum("bckgd,bmkd->bkgcm", chunk_q, pooled_k[:, :width]) * scale
        if key_blocks is not None:  # [B, 1, 1, C, W]: nor wholly in the padding
            causal = causal & (jnp.arange(width) < key_blocks[:, None, None, None, None])
        pooled = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        if key_blocks is not None:  # a sequence without keys: zero, not NaN
            pooled = jnp.where(causal, pooled, 0.0)
        return pooled.reshape(batch, num_heads, chunk, width)

    def fused_probs(first, width):
        """[B, Hkv, G, chunk * rows_per_block, width * cols_per_block / group]: each strided
        row's softmax mass per group of columns, from the kernel."""
        rows = chunk * block_q // stride
        rows_pad = num_blocks(rows, tile_rows) * tile_rows
        cols = num_blocks(width * block_kv // stride, tile_cols) * tile_cols
        row0 = first * (block_q // stride)
        chunk_q = jax.lax.dynamic_slice_in_dim(q_strided, row0, rows_pad, axis=2)
        parts = antidiag_scores.antidiagonal_row_sums(
            chunk_q,
            k_strided[:, :, :cols],
            row0,
            scale=scale,
            seq_len=n,
            num_heads=num_heads,
            group=group,
            num_stages=antidiag_scores.NUM_STAGES,
            tile_rows=tile_rows,
            tile_cols=tile_cols,
            interpret=not on_gpu,
        )
        probs = antidiag_scores.combine_row_sums(*parts, group=group, tile_cols=tile_cols)
        probs = probs[:, :rows, : width * block_kv // stride // group]
        return probs.reshape(batch, num_kv, num_heads // num_kv, rows, -1)

    def xla_probs(first, width):
        """The same from the materialised f32 logits of the chunk."""
        rows_per_block, cols_per_block = block_q // stride, block_kv // stride
        chunk_q = jax.lax.dynamic_slice_in_dim(
            q_strided, first * rows_per_block, chunk * rows_per_block, axis=1
        )
        k_cols = k_strided[:, : width * cols_per_block]
        s = jnp.einsum("brkgd,bckd->bkgrc", chunk_q, k_cols, preferred_element_type=jnp.float32)
        row = first * rows_per_block + jnp.arange(chunk * rows_per_block)  # strided query rows
        col = jnp.arange(width * cols_per_block)
        allowed = (col[None, :] <= row[:, None]) & (col[None, :] * stride < n)
        if lengths is not None:  # [B, 1, 1, R, C]: this sequence's keys only
            allowed = allowed & (col * stride < key_length[:, None, None, None, None])
        probs = jax.nn.softmax(jnp.where(allowed, s * (scale / stride), -jnp.inf), axis=-1)
        return probs if lengths is None else jnp.where(allowed, probs, 0.0)  # no key: 0, not NaN

    if sample_rows:
        # Rows floor((j + 1) * block_q / r) - 1 of each query block: evenly spread, the last
        # row included (clamped into the sequence: its length, in a padded batch).
        row_offsets = (np.arange(1, sample_rows + 1) * block_q) // sample_rows - 1
        k_padded = jnp.pad(k, ((0, 0), (0, n_kv_blocks * block_kv - n), (0, 0), (0, 0)))
        last_row = jnp.full((batch,), n - 1) if lengths is None else query_length - 1
        if fused_sampled:  # head-major keys, once for every chunk
            k_heads = jnp.transpose(k_padded, (0, 2, 1, 3)).reshape(
                -1, *k_padded.shape[1:2], k.shape[-1]
            )

    def fused_sampled_scores(first, width):
        """As `sampled_scores`, from the kernel (an unpadded batch: every row at one position)."""
        rows = (first + jnp.arange(chunk))[:, None] * block_q + row_offsets[None, :]
        n_rows = chunk * sample_rows
        padded = (
            num_blocks(n_rows, sampled_scores_kernel.TILE_ROWS) * sampled_scores_kernel.TILE_ROWS
        )
        rows = jnp.pad(jnp.minimum(rows.reshape(-1), n - 1), (0, padded - n_rows), mode="edge")
        q_rows = jnp.transpose(q[:, rows], (0, 2, 1, 3)).reshape(batch * num_heads, padded, -1)
        parts = sampled_scores_kernel.sampled_row_block_sums(
            q_rows,
            k_heads[:, : width * block_kv],
            rows,
            scale=scale,
            seq_len=n,
            num_heads=num_heads,
            block_kv=block_kv,
            interpret=not on_gpu,
        )
        mass = sampled_scores_kernel.block_mass(*parts)[:, :, :n_rows]  # [B*Hq, W, C*r]
        mass = mass.reshape(batch, num_heads, width, chunk, sample_rows).mean(axis=-1)
        return jnp.swapaxes(mass, 2, 3)

    def sampled_scores(first, width):
        q_blocks = first + jnp.arange(chunk)
        rows = (q_blocks[:, None] * block_q + row_offsets[None, :]).reshape(-1)
        rows = jnp.clip(rows[None, :], 0, jnp.maximum(last_row, 0)[:, None])  # [B, chunk * r]
        q_rows = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)
        keys = k_padded[:, : width * block_kv]
        s = jnp.einsum(
            "brkgd,bnkd->bkgrn",
            _grouped(q_rows, num_kv),
            keys,
            preferred_element_type=jnp.float32,
        )
        key = jnp.arange(width * block_kv)
        limit = n if lengths is None else key_length[:, None, None]
        allowed = (key[None, None, :] <= rows[:, :, None]) & (key[None, None, :] < limit)
        allowed = allowed[:, None, None]  # [B, 1, 1, R, W * block_kv]
        # Softmax mass per key block without materialising the probabilities: the exp and the
        # block sum fuse into one pass over the logits after the row max (two reads of the
        # f32 logits instead of a softmax's reads and writes plus the sum's read).
        s = jnp.where(allowed, s * scale, -jnp.inf)
        row_max = s.max(axis=-1, keepdims=True)
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row without keys
        shape = (batch, num_kv, -1, chunk, sample_rows, width, block_kv)
        mass = jnp.exp(s - row_max).reshape(shape).sum(axis=-1)  # [B, Hkv, G, C, r, W]
        total = mass.sum(axis=-1, keepdims=True)
        mass = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)
        return mass.sum(axis=4).reshape(batch, num_heads, chunk, width) / sample_rows

    def scores(first, width):
        out = None
        if sample_rows:
            out = (fused_sampled_scores if fused_sampled else sampled_scores)(first, width)
        if not stride:
            if pooled_heads is None:
                return out
            pooled = pooled_scores(first, width)
            return pooled if out is None else jnp.where(_heads(sampled_heads), out, pooled)
        q_blocks = first + jnp.arange(chunk)
        rows_per_block = block_q // stride
        probs = (fused_probs if fused else xla_probs)(first, width)
        row = first * rows_per_block + jnp.arange(chunk * rows_per_block)  # strided query rows
        if lengths is None:
            probs = jnp.where((row * stride < n)[:, None], probs, 0.0)
            real_rows = jnp.ceil(jnp.clip(n - q_blocks * block_q, 1, block_q) / stride)[:, None]
        else:
            real_row = row[:, None] * stride < query_length[:, None, None, None, None]
            probs = jnp.where(real_row, probs, 0.0)
            real_rows = jnp.clip(query_length[:, None] - q_blocks * block_q, 1, block_q) / stride
            real_rows = jnp.ceil(real_rows)[:, None, None, :, None]  # [B, 1, 1, C, 1]
        sums = probs.reshape(
            batch, num_kv, -1, chunk, rows_per_block, width, probs.shape[-1] // width
        )
        anti = (sums.sum(axis=(4, 6)) / real_rows).reshape(batch, num_heads, chunk, width)
        if pooled_heads is not None:
            anti = jnp.where(_heads(pooled_heads), pooled_scores(first, width), anti)
        return anti if out is None else jnp.where(_heads(sampled_heads), out, anti)

    return scores, n_q_blocks, chunk


def select_key_blocks(
    q,
    k,
    thresholds,
    limits,
    *,
    scale,
    capacity,
    rule,
    stride,
    pooled_heads,
    block_q,
    block_kv,
    sample_rows=0,
    sampled_heads=None,
    estimator=None,
    lengths=None,
) -> jax.Array:
    """[B, Hq, n_q_blocks, capacity] key blocks per query block, chosen by threshold.

    thresholds, limits [Hq] (traced: the rule's threshold and at most how many blocks);
    scores as `_block_scores_by_chunk`; capacity static (>= every limit)."""
    score_fn, n_q_blocks, chunk = _block_scores_by_chunk(
        q,
        k,
        scale=scale,
        stride=stride,
        pooled_heads=pooled_heads,
        sample_rows=sample_rows,
        sampled_heads=sampled_heads,
        block_q=block_q,
        block_kv=block_kv,
        estimator=estimator,
        lengths=lengths,
    )
    n_kv_blocks = num_blocks(q.shape[1], block_kv)
    ratio = block_q // block_kv
    capacity = min(capacity, n_kv_blocks)
    t = jnp.asarray(thresholds, jnp.float32)[None, :, None]
    limit = jnp.asarray(limits, jnp.int32)[None, :, None]

    def one_chunk(first, width):
        s = score_fn(first, width)
        s = jnp.pad(s, ((0, 0),) * 3 + ((0, max(capacity - width, 0)),))  # zeros: never kept
        return select_by_threshold(s, t, capacity, rule, limit)

    n_chunks = num_blocks(n_q_blocks, chunk)
    return _in_causal_groups(one_chunk, n_chunks, chunk, ratio, n_kv_blocks)[:, :, :n_q_blocks]


def query_aware_distance(q, k, columns, *, scale, last_q, block_kv, lengths=None) -> jax.Array:
    """[B, Hq] Jensen-Shannon distance (sqrt of the base-2 divergence, in [0, 1]) between the
    last `last_q` queries' key-block attention (from their column sums `columns` [B, Hq, N]) and
    the same distribution estimated from mean-pooled q and k. `lengths`: a right-padded batch
    (each sequence's own last rows and keys)."""
    n = q.shape[1]
    rows = min(last_q, n)
    n_kv_blocks = num_blocks(n, block_kv)
    true = jnp.pad(columns, ((0, 0), (0, 0), (0, n_kv_blocks * block_kv - n)))
    true = true.reshape(*columns.shape[:2], n_kv_blocks, block_kv).sum(-1)
    true = true / jnp.maximum(true.sum(-1, keepdims=True), 1e-30)
    if lengths is None:
        q_mean = q[:, n - rows :].astype(jnp.float32).mean(axis=1, keepdims=True)
    else:
        real = (_last_row_positions(lengths, rows) >= 0)[:, :, None, None]  # [B, R, 1, 1]
        q_last = jnp.where(real, _last_rows(q, lengths, rows).astype(jnp.float32), 0.0)
        q_mean = q_last.sum(axis=1, keepdims=True) / jnp.maximum(real.sum(axis=1, keepdims=True), 1)
    q_mean = _grouped(q_mean, k.shape[2])
    pooled_k = _pool_blocks(k, block_kv, None if lengths is None else lengths.keys)
    logits = jnp.einsum("bqkgd,bmkd->bkgm", q_mean, pooled_k) * scale
    if lengths is None:
        estimate = jax.nn.softmax(logits, axis=-1).reshape(true.shape)
    else:  # key blocks wholly in the padding get nothing
        real_blocks = jnp.arange(n_kv_blocks) < _key_blocks(lengths, block_kv)[:, None, None, None]
        estimate = jax.nn.softmax(jnp.where(real_blocks, logits, -jnp.inf), axis=-1)
        estimate = jnp.where(real_blocks, estimate, 0.0).reshape(true.shape)
    middle = (true + estimate) / 2

    def kl(p):  # KL(p || middle) in bits, 0 log 0 = 0
        return jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0) / middle), 0.0).sum(-1)

    return jnp.sqrt(jnp.clip((kl(true) + kl(estimate)) / 2, 0.0, 1.0))


def estimate_adaptive_vertical_slash(
    columns, diagonals, thresholds, limits, *, max_vertical, max_slash, rule
) -> tuple[jax.Array, jax.Array]:
    """(verticals [B, H, max_vertical + 30], slashes [B, H, max_slash + 100]): the always-kept
    first 30 columns and 100 most local offsets, plus those chosen by threshold from column /
    diagonal scores [B, H, N] (`vertical_slash_scores`); ascending, SENTINEL-padded.

    thresholds [H], limits [H, 2] (traced): a head keeping more than its limit of verticals
    (slashes) besides the always-kept ones keeps its `limit` largest; max_vertical and max_slash
    static, >= every limit. Both score kinds go through one selection (one radix loop finds the
    threshold cut and, for the cumulative rule, the limit cut too), and one compaction: no sort.
    """
    heads, n = columns.shape[1:]
    x = jnp.concatenate([columns, diagonals], axis=1)  # [B, 2H, N]
    x = jnp.where(x > 0, x, 0.0).astype(jnp.float32)
    t = jnp.tile(jnp.asarray(thresholds, jnp.float32), 2)[None, :, None]
    sinks, local = min(P.N_SINK_COLUMNS, n), min(P.N_LOCAL_SLASHES, n)
    always_count = jnp.repeat(jnp.array([sinks, local], jnp.int32), heads)[None, :, None]
    always = jnp.arange(n, dtype=jnp.int32) < always_count  # [1, 2H, N]
    caps = jnp.repeat(jnp.array([min(max_vertical, n), min(max_slash, n)], jnp.int32), heads)
    limit = jnp.minimum(jnp.asarray(limits, jnp.int32).T.reshape(-1), caps)[None, :, None]
    others = jnp.where(always, 0.0, x)  # the capped candidates: all but the always-kept
    top_of_others = (others, jnp.ones_like(others), limit.astype(jnp.float32))  # limit largest
    keep, top = _keep_and_search(x, t, rule, top_of_others)
    rest = keep & ~always
    overflow = rest.sum(axis=-1, keepdims=True, dtype=jnp.int32) > limit
    if top is None:  # a rule without the radix loop: the limit cut only when some row overflows
        top = jax.lax.cond(
            overflow.any(), lambda: _largest_reaching(*top_of_others), lambda: jnp.zeros_like(rest)
        )
    chosen = always | jnp.where(overflow, top, rest)
    width_v, width_s = min(max_vertical + sinks, n), min(max_slash + local, n)
    selected = _compact(chosen, max(width_v, width_s))
    return selected[:, :heads, :width_v], selected[:, heads:, :width_s]


@dataclasses.dataclass(frozen=True)
class AdaptivePlan:
    """Static part of a layer's adaptive heads: one rule and stride per layer, capacities."""

    rule: str
    stride: int  # anti-diagonal stride (0: no AntiDiagonalBlockSparse head)
    sample_rows: int  # exact query rows per query block (0: no SampledBlockSparse head)
    max_blocks: int  # key-block capacity per query block (0: no head selects blocks)
    max_vertical: int
    max_slash: int
    query_aware: bool  # some AdaptiveVerticalSlash head may switch to blocks


def _plan_adaptive(patterns, seq_len: int, block_q: int, block_kv: int):
    """(AdaptivePlan or None, the adaptive heads' per-head budget arrays)."""
    adaptive = [(h, p) for h, p in enumerate(patterns) if isinstance(p, P.ADAPTIVE_TYPES)]
    if not adaptive:
        return None, {}
    num_heads = len(patterns)
    arrays = {
        "is_adb": np.zeros(num_heads, np.int32),
        "is_sbs": np.zeros(num_heads, np.int32),
        "is_avs": np.zeros(num_heads, np.int32),
        "threshold": np.zeros(num_heads, np.float32),
        "query_aware": np.zeros(num_heads, np.float32),
        "max_vertical": np.zeros(num_heads, np.int32),
        "max_slash": np.zeros(num_heads, np.int32),
        "max_blocks": np.zeros(num_heads, np.int32),
    }
    # plan_index has checked (check_layer_patterns) that they share one rule, one stride, one
    # row count and block_kv, which the stride divides.
    rules = {p.rule for _, p in adaptive}
    strides = {p.stride for _, p in adaptive if isinstance(p, P.AntiDiagonalBlockSparse)}
    rows = {min(p.rows, block_q) for _, p in adaptive if isinstance(p, P.SampledBlockSparse)}
    n_kv_blocks = num_blocks(seq_len, block_kv)
    for h, p in adaptive:
        arrays["threshold"][h] = p.threshold
        arrays["max_blocks"][h] = P.block_capacity(p, n_kv_blocks)
        if isinstance(p, P.AntiDiagonalBlockSparse):
            arrays["is_adb"][h] = 1
        elif isinstance(p, P.SampledBlockSparse):
            arrays["is_sbs"][h] = 1
        else:
            arrays["is_avs"][h] = 1
            arrays["query_aware"][h] = p.query_aware
            arrays["max_vertical"][h], arrays["max_slash"][h] = P.vertical_slash_capacities(
                p, seq_len
            )
    avs = [p for _, p in adaptive if isinstance(p, P.AdaptiveVerticalSlash)]
    block_heads = [p for _, p in adaptive if not isinstance(p, P.AdaptiveVerticalSlash)]
    block_heads += [p for p in avs if p.query_aware > 0]
    capacities = (P.block_capacity(p, n_kv_blocks) for p in block_heads)
    plan = AdaptivePlan(
        rule=rules.pop(),
        stride=strides.pop() if strides else 0,
        sample_rows=rows.pop() if rows else 0,
        max_blocks=min(_round_up_pow2(max(capacities, default=0)), n_kv_blocks),
        max_vertical=min(_round_up_pow2(int(arrays["max_vertical"].max())), seq_len),
        max_slash=min(_round_up_pow2(int(arrays["max_slash"].max())), seq_len),
        query_aware=any(p.query_aware > 0 for p in avs),
    )
    return plan, arrays


def _adaptive_parts(
    q, k, budgets, *, plan, scale, estimator, diag_mask, candidates, columns, lengths
):
    """The layer's (diag_mask, candidates, columns) with its adaptive heads' parts filled in."""
    adaptive = plan.adaptive
    batch, n, num_heads, _ = q.shape
    block_q, block_kv = plan.block_q, plan.block_kv
    ratio = block_q // block_kv
    thresholds = budgets["threshold"]
    block_heads = jnp.broadcast_to(
        (budgets["is_adb"] != 0) | (budgets["is_sbs"] != 0), (batch, num_heads)
    )
    # [H]: heads whose block scores come from pooled q, k (the query-aware switch's blocks)
    pooled_heads = (budgets["is_avs"] != 0) if adaptive.query_aware else None
    sampled_heads = (budgets["is_sbs"] != 0) if adaptive.sample_rows else None

    def pad_last(x, width):
        pad = [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])]
        return jnp.pad(x, pad, constant_values=SENTINEL)

    if "avs" in plan.families:
        column_scores, diagonal_scores = vertical_slash_scores(
            q, k, scale=scale, last_q=plan.last_q, estimator=estimator, lengths=lengths
        )
        verticals, slashes = estimate_adaptive_vertical_slash(
            column_scores,
            diagonal_scores,
            thresholds,
            jnp.stack([budgets["max_vertical"], budgets["max_slash"]], axis=-1),
            max_vertical=adaptive.max_vertical,
            max_slash=adaptive.max_slash,
            rule=adaptive.rule,
        )
        use_vs = jnp.broadcast_to(budgets["is_avs"] != 0, (batch, num_heads))
        if adaptive.query_aware:
            distance = query_aware_distance(
                q,
                k,
                column_scores,
                scale=scale,
                last_q=plan.last_q,
                block_kv=block_kv,
                lengths=lengths,
            )
            use_blocks = use_vs & (distance < budgets["query_aware"][None, :])
            use_vs = use_vs & ~use_blocks
            block_heads = block_heads | use_blocks
        vs_mask = diag_mask_from_slashes(slashes, diag_mask.shape[-1], block_kv, ratio)
        diag_mask = jnp.where(use_vs[..., None], vs_mask, diag_mask)
        width = max(columns.shape[-1], verticals.shape[-1])
        columns = jnp.where(use_vs[..., None], pad_last(verticals, width), pad_last(columns, width))

    if adaptive.max_blocks:
        blocks = select_key_blocks(
            q,
            k,
            thresholds,
            budgets["max_blocks"],
            scale=scale,
            capacity=adaptive.max_blocks,
            rule=adaptive.rule,
            stride=adaptive.stride,
            pooled_heads=pooled_heads,
            sample_rows=adaptive.sample_rows,
            sampled_heads=sampled_heads,
            block_q=block_q,
            block_kv=block_kv,
            estimator=estimator,
            lengths=lengths,
        )
        # Key block 0 (the sink) always; blocks are ascending, so blocks[..., 0] tells if it is in.
        sink = jnp.where(blocks[..., :1] == 0, SENTINEL, 0).astype(jnp.int32)
        blocks = jnp.concatenate([blocks, sink], axis=-1)
        width = max(candidates.shape[-1], blocks.shape[-1])
        candidates = jnp.where(
            block_heads[..., None, None], pad_last(blocks, width), pad_last(candidates, width)
        )
    return diag_mask, candidates, columns


KINDS = {
    P.Dense: "dense",
    P.AShape: "ashape",
    P.VerticalSlash: "vs",
    P.BlockSparse: "bs",
    P.AntiDiagonalBlockSparse: "adb",
    P.AdaptiveVerticalSlash: "avs",
    P.SampledBlockSparse: "sbs",
}


def _round_up_pow2(x: int, floor: int = 1) -> int:
    """0 stays 0; else the next power of two >= max(x, floor). Buckets static widths so layers
    whose budgets differ share one compiled program."""
    return 0 if x <= 0 else 1 << (max(x, floor) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """Static part of one layer's index construction: pattern families and bucketed widths.

    Which head has which pattern, and its budgets, are traced arrays (`plan_index`), so layers
    that differ only in those (e.g. every layer of a searched Llama config) compile once, and
    devices holding different heads run one program under `shard_map`.
    """

    families: tuple[str, ...]  # sorted subset of "adb", "ashape", "avs", "bs", "dense", "sbs", "vs"
    num_heads: int
    seq_len: int
    block_q: int
    block_kv: int
    last_q: int
    max_vertical: int
    max_slash: int
    max_top_k: int
    max_sink_blocks: int
    max_sink_columns: int
    max_diag: int
    adaptive: AdaptivePlan | None = (
        None  # the AntiDiagonalBlockSparse / AdaptiveVerticalSlash heads
    )


def plan_index(
    patterns: P.Pattern | Sequence[P.Pattern],
    seq_len: int,
    num_heads: int,
    *,
    block_q: int = 64,
    block_kv: int = 64,
    last_q: int = P.LAST_Q,
) -> tuple[IndexPlan, dict[str, np.ndarray]]:
    """Split a layer's patterns into a static IndexPlan and per-head budget arrays (int32
    counts and flags; float32 thresholds of the adaptive heads)."""
    check_block_sizes(block_q, block_kv)
    for name, value in (("seq_len", seq_len), ("num_heads", num_heads), ("last_q", last_q)):
        check_positive_int(name, value)  # last_q < 1 would estimate from no queries at all
    check_patterns(patterns)
    patterns = P.normalize_layer_patterns(patterns, num_heads)
    P.check_layer_patterns(patterns, block_kv=block_kv)
    ratio = block_q // block_kv
    n_slots = num_blocks(seq_len, block_q) * ratio
    fields = (
        "is_vs",
        "is_bs",
        "n_vertical",
        "n_slash",
        "top_k",
        "last_diag",
        "sink_blocks",
        "sink_lo",
        "sink_hi",
    )
    budgets = {name: np.zeros(num_heads, np.int32) for name in fields}
    budgets["last_diag"][:] = ratio - 1  # the causal diagonal blocks only
    for h, p in enumerate(patterns):
        if isinstance(p, P.Dense):
            budgets["last_diag"][h] = n_slots - 1
        elif isinstance(p, P.VerticalSlash):
            budgets["is_vs"][h] = 1
            budgets["n_vertical"][h], budgets["n_slash"][h] = p.budgets(seq_len)
        elif isinstance(p, P.BlockSparse):
            budgets["is_bs"][h] = 1
            budgets["top_k"][h] = p.top_k
        elif isinstance(p, P.SampledBlockSparse):
            # The query block before the diagonal always (the local window): on trained heads
            # it holds the largest share of the mass that sampled rows miss (NOTES.md).
            budgets["last_diag"][h] = 2 * ratio - 1
        elif isinstance(p, P.ADAPTIVE_TYPES):
            continue  # planned by _plan_adaptive
        else:  # A-shape: sinks as full key blocks + leftover columns, window as diagonals
            n_init, n_local = min(p.n_init, seq_len), min(p.n_local, seq_len)
            budgets["sink_blocks"][h] = n_init // block_kv
            budgets["sink_lo"][h], budgets["sink_hi"][h] = n_init // block_kv * block_kv, n_init
            budgets["last_diag"][h] = num_blocks(max(n_local - 1, 0), block_kv) + ratio - 1
    kinds = tuple(KINDS[type(p)] for p in patterns)
    adaptive, adaptive_budgets = _plan_adaptive(patterns, seq_len, block_q, block_kv)
    budgets.update(adaptive_budgets)
    max_slash = min(_round_up_pow2(int(budgets["n_slash"].max()), 64), seq_len)
    diag_bounds = [ratio]
    if "dense" in kinds:
        diag_bounds.append(n_slots)
    if "vs" in kinds:
        diag_bounds.append(max_slash * (ratio + 1) + ratio)
    if "avs" in kinds:
        diag_bounds.append((adaptive.max_slash + P.N_LOCAL_SLASHES) * (ratio + 1) + ratio)
    if "sbs" in kinds:
        diag_bounds.append(2 * ratio)
    if "ashape" in kinds:
        diag_bounds.append(
            _round_up_pow2(int(budgets["last_diag"][np.array(kinds) == "ashape"].max()) + 1)
        )
    plan = IndexPlan(
        families=tuple(sorted(set(kinds))),
        num_heads=num_heads,
        seq_len=seq_len,
        block_q=block_q,
        block_kv=block_kv,
        last_q=last_q,
        max_vertical=min(_round_up_pow2(int(budgets["n_vertical"].max()), 64), seq_len),
        max_slash=max_slash,
        max_top_k=_round_up_pow2(int(budgets["top_k"].max()), 64),
        max_sink_blocks=_round_up_pow2(int(budgets["sink_blocks"].max())),
        max_sink_columns=_round_up_pow2(int((budgets["sink_hi"] - budgets["sink_lo"]).max())),
        max_diag=min(n_slots, max(diag_bounds)),
        adaptive=adaptive,
    )
    return plan, budgets


def build_sparse_index(
    q: jax.Array,
    k: jax.Array,
    patterns: P.Pattern | Sequence[P.Pattern],
    *,
    softmax_scale: float | None = None,
    block_q: int = 64,
    block_kv: int = 64,
    last_q: int = P.LAST_Q,
    estimator: str | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
) -> SparseIndex:
    """Estimate the SparseIndex of one layer. q [B, N, Hq, D], k [B, N, Hkv, D]; jitted.

    `patterns`: one pattern for all heads or one per query head. Heads that pick key blocks
    (`patterns.key_block_size`) need `block_size == block_kv`. `softmax_scale`: as
    `sparse_attention`'s `scale`. `last_q` (>= 1): how many of the last queries the estimates
    read. `estimator`: the Vertical-Slash scorer as in `estimate_vertical_slash`; "pallas" also
    scores anti-diagonal heads with the fused kernel (`pallas_kernels.antidiag_scores`).
    `query_seq_lengths`, `key_value_seq_lengths`: int32 [batch] of a right-padded batch, as in
    `sparse_attention`: the estimates read each sequence's own rows and keys. Inputs are checked as
    `sparse_attention` checks them (TypeError / ValueError).
    """
    check_attention_inputs(q, k)
    _check_estimator(estimator)
    plan, budgets = plan_index(
        patterns, q.shape[1], q.shape[2], block_q=block_q, block_kv=block_kv, last_q=last_q
    )
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    batch, n = q.shape[:2]
    query_lengths = check_seq_lengths(query_seq_lengths, "query_seq_lengths", batch, n)
    kv_lengths = check_seq_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch, n)
    return build_planned_index(
        q,
        k,
        budgets,
        plan=plan,
        scale=scale,
        estimator=estimator,
        lengths=seq_lengths(query_lengths, kv_lengths, batch, n),
    )


@functools.partial(jax.jit, static_argnames=("plan", "scale", "estimator"))
def build_planned_index(
    q,
    k,
    budgets,
    *,
    plan: IndexPlan,
    scale: float,
    estimator: str | None = None,
    lengths: SeqLengths | None = None,
) -> SparseIndex:
    """The index of one layer from a static plan and traced per-head budgets (see plan_index).

    `lengths`: a right-padded batch (`SeqLengths`), or None."""
    batch, n, num_heads, _ = q.shape
    if (n, num_heads) != (plan.seq_len, plan.num_heads):
        raise ValueError(f"plan is for seq {plan.seq_len} x {plan.num_heads} heads, got {q.shape}")
    block_q, block_kv = plan.block_q, plan.block_kv
    ratio = block_q // block_kv
    n_q_blocks = num_blocks(n, block_q)
    n_slots = n_q_blocks * ratio
    budgets = {
        name: jnp.asarray(value, jnp.float32 if name in _FLOAT_BUDGETS else jnp.int32)
        for name, value in budgets.items()
    }

    def per_head(flag, ndim):  # traced [H] 0/1 -> bool broadcastable over [B, H, ...]
        return (budgets[flag] != 0).reshape((1, num_heads) + (1,) * (ndim - 2))

    # --- D (diagonal set): dense / A-shape / block-sparse from budgets, VS estimated ---------
    diag_mask = jnp.broadcast_to(
        jnp.arange(n_slots)[None, :] <= budgets["last_diag"][:, None], (batch, num_heads, n_slots)
    )
    columns = jnp.full((batch, num_heads, 0), SENTINEL, jnp.int32)
    if "vs" in plan.families:
        verticals, slashes = estimate_vertical_slash(
            q,
            k,
            jnp.stack([budgets["n_vertical"], budgets["n_slash"]], axis=-1),
            scale=scale,
            last_q=plan.last_q,
            max_budgets=(plan.max_vertical, plan.max_slash),
            estimator=estimator,
            lengths=lengths,
        )
        vs_mask = diag_mask_from_slashes(slashes, n_slots, block_kv, ratio)
        diag_mask = jnp.where(per_head("is_vs", 3), vs_mask, diag_mask)
        columns = jnp.where(per_head("is_vs", 3), verticals, SENTINEL)

    # --- listed blocks (A-shape sink blocks, block-sparse top-k) and sink columns -------------
    lanes = jnp.arange(plan.max_sink_blocks, dtype=jnp.int32)
    sinks = jnp.where(lanes[None, :] < budgets["sink_blocks"][:, None], lanes[None, :], SENTINEL)
    candidates = jnp.broadcast_to(
        sinks[None, :, None, :], (batch, num_heads, n_q_blocks, plan.max_sink_blocks)
    )
    if "bs" in plan.families:
        chosen = estimate_block_sparse(
            q,
            k,
            budgets["top_k"],
            scale=scale,
            block_q=block_q,
            block_kv=block_kv,
            max_top_k=plan.max_top_k,
            lengths=lengths,
        )
        width = max(candidates.shape[-1], chosen.shape[-1])
        pad = lambda x: jnp.pad(  # noqa: E731
            x, ((0, 0), (0, 0), (0, 0), (0, width - x.shape[-1])), constant_values=SENTINEL
        )
        candidates = jnp.where(per_head("is_bs", 4), pad(chosen), pad(candidates))
    if plan.max_sink_columns:
        offsets = budgets["sink_lo"][:, None] + jnp.arange(plan.max_sink_columns, dtype=jnp.int32)
        sink_columns = jnp.where(offsets < budgets["sink_hi"][:, None], offsets, SENTINEL)
        sink_columns = jnp.broadcast_to(sink_columns[None], (batch, *sink_columns.shape))
        columns = jnp.sort(jnp.concatenate([columns, sink_columns], axis=-1), axis=-1)

    if plan.adaptive is not None:
        diag_mask, candidates, columns = _adaptive_parts(
            q,
            k,
            budgets,
            plan=plan,
            scale=scale,
            estimator=estimator,
            diag_mask=diag_mask,
            candidates=candidates,
            columns=columns,
            lengths=lengths,
        )
    return finalize_index(
        diag_mask,
        candidates,
        columns,
        max_diag=plan.max_diag,
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )


def index_footprint_bytes(index: SparseIndex) -> int:
    """Bytes held by the index arrays (to check they scale with the budget, not with N^2)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(index))
