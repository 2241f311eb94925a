"""Jitted index approximation: each head's sparse index estimated from the prompt itself.

Everything is vectorised over batch and all heads of a layer: no Python loop over heads, no
host round trip. Heads with different patterns (and budgets) in one layer are handled by
computing each pattern family present once for the whole layer and selecting per head with masks.
Budgets are traced data (`plan_index` splits a layer into a static `IndexPlan` of bucketed
buffer widths and per-head budget arrays), so layers differing only in budgets share a program.
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
    SparseIndex,
    check_block_sizes,
    diag_mask_from_slashes,
    finalize_index,
    num_blocks,
)
from pallas_kernels import vs_estimate

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


def _vertical_slash_scores(q_last, k, *, scale: float):
    """q_last [B, R, G, D] (last R queries), k [B, N, D] -> column and diagonal scores [B, G, N]."""
    rows, n = q_last.shape[1], k.shape[1]
    logits = jnp.einsum("brgd,bnd->bgrn", q_last, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]  # [R, N]
    logits = jnp.where(causal, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return probs.sum(axis=-2), _skew_diagonal_sums(probs)


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


def default_estimator(dtype, seq_len: int, rows: int, head_dim: int, *, on_gpu: bool) -> str:
    """The VS estimator to use: pallas on GPU for bf16/f16 inputs it takes, else xla.

    f32 stays on XLA: the kernel's exact-f32 dots build as unrolled FMA code, and a mixed-pattern
    f32 index took minutes to compile on the H200 (NOTES.md, session 4).
    """
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    supported = vs_estimate.supports(seq_len, rows, head_dim)
    return "pallas" if on_gpu and sixteen_bit and supported else "xla"


def estimate_vertical_slash(
    q: jax.Array,
    k: jax.Array,
    budgets,
    *,
    scale: float,
    last_q: int = P.LAST_Q,
    max_budgets: tuple[int, int] | None = None,
    estimator: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Estimate verticals and slashes for every query head.

    q [B, N, Hq, D], k [B, N, Hkv, D]; budgets [Hq, 2] = (n_vertical, n_slash) per head, may be
    traced when `max_budgets` (static top-k widths, >= every budget) is given.
    `estimator`: "pallas" (the fused kernel of pallas_kernels/vs_estimate.py; interpreted off
    GPU), "xla", or None (`default_estimator`).
    Returns (verticals [B, Hq, max_v] key positions, slashes [B, Hq, max_s] offsets i - j), both
    ascending and SENTINEL-padded. The first 30 columns and the 100 most local offsets always win.
    """
    n = q.shape[1]
    rows = min(last_q, n)
    on_gpu = jax.default_backend() == "gpu"
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
    elif estimator == "xla":
        columns, diagonals = _map_over_kv_heads(
            functools.partial(_vertical_slash_scores, scale=scale),
            _grouped(q_last, k.shape[2]),
            k,
            one_at_a_time=q.shape[0] * q.shape[2] * rows * n * 4 > _SCORE_BYTES_PER_STEP,
        )
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'pallas', 'xla' or None")
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
    top_k,
    *,
    scale: float,
    block_q: int,
    block_kv: int,
    max_top_k: int | None = None,
) -> jax.Array:
    """Top key blocks per query block from mean-pooled q and k, excluding the diagonal blocks.

    q [B, N, Hq, D], k [B, N, Hkv, D]; top_k [Hq] counts all tiles incl. the r diagonal blocks
    (may be traced when the static `max_top_k` is given).
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
    pooled_q = _grouped(_pool_blocks(q, block_q), k.shape[2])  # [B, nqb, Hkv, G, D]
    pooled_k = _pool_blocks(k, block_kv)  # [B, nkb, Hkv, D]
    n_kv_blocks = pooled_k.shape[1]
    kv_blocks = jnp.arange(n_kv_blocks)

    def top_blocks(q_chunk, first_q_block):  # q_chunk [B, C, Hkv, G, D]
        s = jnp.einsum("bckgd,bmkd->bkgcm", q_chunk, pooled_k, preferred_element_type=jnp.float32)
        s = s.reshape(s.shape[0], -1, *s.shape[3:]) * scale  # [B, Hq, C, nkb]
        q_blocks = first_q_block + jnp.arange(q_chunk.shape[1])
        n_allowed = jnp.minimum(q_blocks * ratio, n_kv_blocks)  # strictly before the diagonal
        allowed = kv_blocks[None, :] < n_allowed[:, None]
        # Allowed scores map to keys >= 1 (order kept), the rest to 0; k never exceeds the
        # allowed count, so a 0 key is never chosen.
        keys = jnp.where(allowed, _order_key(s), jnp.uint32(0))
        k = jnp.minimum(extra[None, :, None, None], n_allowed[None, None, :, None])
        return _radix_select(keys, k, k_max)

    # Chunk query blocks so the [B, Hq, chunk, nkb] scores (and the selection's few arrays of the
    # same size) stay bounded at 1M tokens.
    per_q_block = q.shape[0] * q.shape[2] * n_kv_blocks * 4
    chunk = max(1, min(n_q_blocks, _BLOCK_SCORE_BYTES_PER_STEP // per_q_block))
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
    return idx[:, :, :n_q_blocks]


def _order_key(x: jax.Array) -> jax.Array:
    """f32 -> uint32 keys that order like the values (NaN excepted); -inf maps above 0.

    -0.0 becomes +0.0 first: the two compare equal, so they must tie.
    """
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 != 0, ~bits, bits | jnp.uint32(1 << 31))


KINDS = {P.Dense: "dense", P.AShape: "ashape", P.VerticalSlash: "vs", P.BlockSparse: "bs"}


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

    families: tuple[str, ...]  # sorted subset of "ashape", "bs", "dense", "vs" present
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


def plan_index(
    patterns: P.Pattern | Sequence[P.Pattern],
    seq_len: int,
    num_heads: int,
    *,
    block_q: int = 64,
    block_kv: int = 64,
    last_q: int = P.LAST_Q,
) -> tuple[IndexPlan, dict[str, np.ndarray]]:
    """Split a layer's patterns into a static IndexPlan and per-head int32 budget arrays."""
    check_block_sizes(block_q, block_kv)
    patterns = P.normalize_layer_patterns(patterns, num_heads)
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
            if p.block_size != block_kv:
                raise ValueError(
                    f"head {h}: BlockSparse.block_size={p.block_size} "
                    f"must equal block_kv={block_kv}"
                )
            budgets["is_bs"][h] = 1
            budgets["top_k"][h] = p.top_k
        else:  # A-shape: sinks as full key blocks + leftover columns, window as diagonals
            n_init, n_local = min(p.n_init, seq_len), min(p.n_local, seq_len)
            budgets["sink_blocks"][h] = n_init // block_kv
            budgets["sink_lo"][h], budgets["sink_hi"][h] = n_init // block_kv * block_kv, n_init
            budgets["last_diag"][h] = num_blocks(max(n_local - 1, 0), block_kv) + ratio - 1
    kinds = tuple(KINDS[type(p)] for p in patterns)
    max_slash = min(_round_up_pow2(int(budgets["n_slash"].max()), 64), seq_len)
    diag_bounds = [ratio]
    if "dense" in kinds:
        diag_bounds.append(n_slots)
    if "vs" in kinds:
        diag_bounds.append(max_slash * (ratio + 1) + ratio)
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
) -> SparseIndex:
    """Estimate the SparseIndex of one layer. q [B, N, Hq, D], k [B, N, Hkv, D]; jitted.

    `patterns`: one pattern for all heads or one per query head. Block-sparse heads need
    `block_size == block_kv`. `estimator`: see `estimate_vertical_slash`.
    """
    plan, budgets = plan_index(
        patterns, q.shape[1], q.shape[2], block_q=block_q, block_kv=block_kv, last_q=last_q
    )
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return build_planned_index(q, k, budgets, plan=plan, scale=scale, estimator=estimator)


@functools.partial(jax.jit, static_argnames=("plan", "scale", "estimator"))
def build_planned_index(
    q, k, budgets, *, plan: IndexPlan, scale: float, estimator: str | None = None
) -> SparseIndex:
    """The index of one layer from a static plan and traced per-head budgets (see plan_index)."""
    batch, n, num_heads, _ = q.shape
    if (n, num_heads) != (plan.seq_len, plan.num_heads):
        raise ValueError(f"plan is for seq {plan.seq_len} x {plan.num_heads} heads, got {q.shape}")
    block_q, block_kv = plan.block_q, plan.block_kv
    ratio = block_q // block_kv
    n_q_blocks = num_blocks(n, block_q)
    n_slots = n_q_blocks * ratio
    budgets = {name: jnp.asarray(value, jnp.int32) for name, value in budgets.items()}

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
