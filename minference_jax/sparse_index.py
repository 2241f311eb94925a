"""The one sparse representation every pattern lowers to, and its dense mask.

Queries are cut into blocks of `block_q` rows, keys into blocks of `block_kv` columns, with
`block_q = r * block_kv`. For query block i, the keys it attends are the union of

1. **diagonal key blocks**: key block `(i + 1) * r - 1 - d` for every relative offset d of the
   head's sorted set D (`diag_offset`; `diag_count[i]` of them exist for block i). D always holds
   0..r-1, the key blocks under the query block itself, so no query row is ever empty. Slash
   lines, local windows and the causal diagonal all live here. D is the same for every query
   block, so it costs O(N / block_kv) per head whatever the slash budget is.
2. **listed key blocks** (`block_index[i, :block_count[i]]`): key blocks chosen per query block
   (block-sparse top-k, attention-sink blocks); never one that D already covers.
3. **columns** (`column_index[:column_count[i]]`): single keys, sorted, per head. A column whose
   key block D covers for block i is *covered* and must be skipped (`diag_mask`); the count
   already stops before the contiguous local run of D, so only the rare far-away covered column
   needs the check. Columns never fall in a listed block and always lie before block i's rows.

Plus causality: query row q attends key j only if j <= q (aligned prefill, q_len == kv_len).

Padding entries of every list hold `SENTINEL`, which sorts after every real index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from pallas_kernels.constants import LOG2E

SENTINEL = 2**30

# MINFERENCE_JAX_CHECK_CAPACITY=1 (the test suite sets it) makes `finalize_index` raise when a
# capacity bound would drop a diagonal offset of the set D: a buffer sized too small would
# otherwise lose slashes silently. Off by default: it adds a host callback to every index build.
# Read when a function is traced; set it before the first call.
CHECK_CAPACITY = os.environ.get("MINFERENCE_JAX_CHECK_CAPACITY", "0") not in ("", "0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseIndex:
    diag_offset: jax.Array  # [B, H, max_diag] int32, ascending
    diag_count: jax.Array  # [B, H, n_q_blocks] int32
    diag_mask: jax.Array  # [B, H, n_diag_slots] bool: d is in D
    block_index: jax.Array  # [B, H, n_q_blocks, max_blocks] int32 key blocks, ascending
    block_count: jax.Array  # [B, H, n_q_blocks] int32
    column_index: jax.Array  # [B, H, max_columns] int32 key positions, ascending
    column_count: jax.Array  # [B, H, n_q_blocks] int32
    seq_len: int = dataclasses.field(metadata=dict(static=True))
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))

    @property
    def ratio(self) -> int:
        return self.block_q // self.block_kv

    @property
    def num_q_blocks(self) -> int:
        return self.diag_count.shape[-1]

    @property
    def num_heads(self) -> int:
        return self.diag_count.shape[1]

    def num_tiles(self) -> jax.Array:
        """[B, H, n_q_blocks] key tiles each query block computes (columns in tiles of block_kv)."""
        column_tiles = -(-self.column_count // self.block_kv)
        return self.diag_count + self.block_count + column_tiles

    @property
    def causal_tiles(self) -> int:
        """Key tiles a dense causal kernel computes for one (batch, head), same tile shape."""
        return self.ratio * self.num_q_blocks * (self.num_q_blocks + 1) // 2

    def computed_fraction(self) -> jax.Array:
        """Scalar: key tiles computed / tiles a dense causal kernel computes (same tile shape)."""
        batch, heads = self.diag_count.shape[:2]
        # A Python float: the tile count of 32 heads at 1M tokens (4.3e9) overflows int32.
        return self.num_tiles().sum(dtype=jnp.float32) / float(self.causal_tiles * batch * heads)


def check_block_sizes(block_q: int, block_kv: int) -> None:
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
        _check_int(name, value)
    if block_q < 1 or block_kv < 1 or block_q % block_kv:
        raise ValueError(
            f"block_q ({block_q}) must be a positive multiple of block_kv ({block_kv})"
        )


def check_index_matches_inputs(index: SparseIndex, q: jax.Array) -> None:
    """Raise ValueError unless `index` was built for inputs shaped like q [B, N, Hq, D].

    Every implementation relies on this: an index of another batch size, head count, length or
    block size would otherwise be applied to the wrong rows without a word.
    """
    if not isinstance(index, SparseIndex):
        raise TypeError(f"index must be a SparseIndex, got {type(index).__name__}")
    batch, n, heads, _ = q.shape
    index_batch, index_heads = index.diag_count.shape[:2]
    if (index_batch, index_heads, index.seq_len) != (batch, heads, n):
        raise ValueError(
            f"index is for seq {index.seq_len} x {index_heads} heads x batch {index_batch}; "
            f"inputs have seq {n} x {heads} heads x batch {batch}"
        )
    check_block_sizes(index.block_q, index.block_kv)
    n_q_blocks = num_blocks(n, index.block_q)
    expected = {
        "diag_offset": (batch, heads, None),
        "diag_count": (batch, heads, n_q_blocks),
        "diag_mask": (batch, heads, n_q_blocks * index.ratio),
        "block_index": (batch, heads, n_q_blocks, None),
        "block_count": (batch, heads, n_q_blocks),
        "column_index": (batch, heads, None),
        "column_count": (batch, heads, n_q_blocks),
    }
    for field, dims in expected.items():
        shape = getattr(index, field).shape
        fits = len(shape) == len(dims) and all(
            e is None or e == s for e, s in zip(dims, shape, strict=True)
        )
        if not fits:
            want = "[" + ", ".join("*" if e is None else str(e) for e in dims) + "]"
            raise ValueError(
                f"index.{field} has shape {tuple(shape)}, expected {want} for block_q "
                f"{index.block_q} / block_kv {index.block_kv} at seq {n}"
            )


# --- argument checks shared by the public entry points (static: shapes, dtypes, Python values) ---

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_attention_inputs(q: jax.Array, k: jax.Array, v: jax.Array | None = None) -> None:
    """Raise TypeError / ValueError for q [B, N, Hq, D], k and v [B, N, Hkv, D] that the
    attention paths do not take (v None: the index builders read q and k only).

    Lists are refused rather than converted, as `jax.numpy` refuses them: an implicit
    conversion would pick a dtype the caller never chose.
    """
    arrays = {"q": q, "k": k} | ({} if v is None else {"v": v})
    for name, x in arrays.items():
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a jax.Array or numpy array [batch, seq, heads, head_dim], "
                f"got {type(x).__name__}"
            )
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        heads = "query heads" if name == "q" else "kv heads"
        for axis, what in enumerate(("batch size", "seq length", heads, "head_dim")):
            if x.shape[axis] == 0:
                empty = "empty sequence: " if axis == 1 else ""
                raise ValueError(
                    f"{empty}{name} has {what} 0 (shape {x.shape}); every dimension must be >= 1"
                )
    if len({x.dtype for x in arrays.values()}) > 1:
        dtypes = ", ".join(str(x.dtype) for x in arrays.values())
        raise TypeError(f"{', '.join(arrays)} dtypes differ: {dtypes}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    seq = "seq length (causal prefill: q_len == kv_len)"
    for axis, what in ((0, "batch size"), (1, seq), (3, "head_dim")):
        if q.shape[axis] != k.shape[axis]:
            raise ValueError(f"q {q.shape} and k {k.shape} differ in {what}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]}): each kv head "
            "serves a contiguous group of q_heads / kv_heads query heads"
        )


def resolve_softmax_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    """The scale to use: head_dim ** -0.5 for None, else `softmax_scale` once checked (`name`:
    what error messages call it).

    It must be a concrete real number (the kernels compile it in), finite and > 0 (0 would weigh
    every key alike, a negative scale prefer the least similar keys), not rounding to 0 in
    float32 (the kernels' precision), and at most float32_max / (head_dim * log2(e)): the
    kernels fold log2(e) into the scale, and the logit of q and k rows of ones,
    scale * head_dim * log2(e), must stay finite in float32.
    """
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete number, not a traced value: the kernels compile "
            "it in (pass it as a static argument of jax.jit)"
        )
    if not _is_real_number(softmax_scale):
        raise TypeError(f"{name} must be a real number, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    largest = _FLOAT32_MAX / (head_dim * LOG2E)
    if scale > largest:
        raise ValueError(
            f"{name} {scale:g} is too large for head_dim {head_dim}: at most {largest:.3g}"
            ", so that scale * head_dim * log2(e) (the logit of q and k rows of ones, as the "
            "kernels compute it) stays finite in float32"
        )
    if np.float32(scale) == 0:
        raise ValueError(f"{name} {scale!r} rounds to 0 in float32, the kernels' precision")
    return scale


def _is_real_number(x) -> bool:
    if isinstance(x, (np.ndarray, jax.Array)) and x.shape == ():  # concrete: tracers are refused
        return jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_patterns(patterns) -> None:
    """TypeError unless `patterns` is one pattern or a sequence of them (one per query head).

    Strings and mappings are sequences or iterables of something else: without this, "dense"
    would read as five per-head patterns.
    """
    if isinstance(patterns, P.PATTERN_TYPES):
        return
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        raise TypeError(
            "patterns must be a Pattern (Dense(), VerticalSlash(...), ...) or a sequence of "
            f"patterns, one per query head; got {type(patterns).__name__}"
        )


class SeqLengths(NamedTuple):
    """Per-sequence lengths of a right-padded batch, int32 [batch] each.

    Query rows at or past `queries` are padding (their output is zero); keys at or past `keys`
    are never attended. A valid causal row sees only keys before `queries`, so `keys` holds
    min(key length, query length): what any row that counts can see.
    """

    queries: jax.Array
    keys: jax.Array


def check_seq_lengths(lengths, name: str, batch: int, seq_len: int) -> jax.Array | None:
    """`lengths` as int32 [batch], or None. Raise TypeError / ValueError for anything else.

    Concrete lengths must lie in [0, seq_len]; traced ones (under jit) cannot be checked and
    are clipped to that range.
    """
    if lengths is None:
        return None
    if not isinstance(lengths, (jax.Array, np.ndarray)):
        raise TypeError(f"{name} must be an int32 array [batch], got {type(lengths).__name__}")
    if lengths.dtype == bool or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integers (int32 [batch]), got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},), one length per sequence of the batch; "
            f"got shape {lengths.shape}"
        )
    if isinstance(lengths, jax.core.Tracer):
        return jnp.clip(lengths, 0, seq_len).astype(jnp.int32)
    values = np.asarray(lengths)
    bad = (values < 0) | (values > seq_len)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"{name} must lie in [0, {seq_len}] (the padded sequence length); "
            f"got {values[row]} for sequence {row}"
        )
    return jnp.asarray(lengths, jnp.int32)


def seq_lengths(query_lengths, kv_lengths, batch: int, seq_len: int) -> SeqLengths | None:
    """SeqLengths of checked query / key-value lengths (None: unpadded), or None if both are."""
    if query_lengths is None and kv_lengths is None:
        return None
    queries = jnp.full((batch,), seq_len, jnp.int32) if query_lengths is None else query_lengths
    keys = queries if kv_lengths is None else jnp.minimum(kv_lengths, queries)
    return SeqLengths(queries, keys)


def check_causal_mask(mask, batch: int, heads: int, seq_len: int, is_causal: bool) -> None:
    """Accept a boolean mask, broadcastable to [batch, heads, seq_len, seq_len], that leaves the
    attention causal: the causal mask itself (True where key <= query), or with `is_causal`
    (which masks the keys after the query anyway) any mask True wherever key <= query. Raise
    TypeError / ValueError otherwise.

    The values of a traced mask (under jit) cannot be read, so such a mask is refused.
    """
    if isinstance(mask, jax.core.Tracer):
        raise TypeError(
            "mask is a traced value (inside jax.jit), so it cannot be checked to be causal; "
            "the attention is causal anyway: pass is_causal=True and no mask"
        )
    if not isinstance(mask, (jax.Array, np.ndarray)):
        raise TypeError(f"mask must be a boolean array, got {type(mask).__name__}")
    if mask.dtype != bool:
        raise TypeError(f"mask must be boolean (True: attend), got dtype {mask.dtype}")
    full = (batch, heads, seq_len, seq_len)
    fits = 2 <= mask.ndim <= 4 and all(
        m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1], strict=False)
    )
    if not fits:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to [batch, heads, query, key] = "
            f"{list(full)}"
        )
    values = np.broadcast_to(np.asarray(mask), mask.shape[:-2] + (seq_len, seq_len))
    causal = np.tril(np.ones((seq_len, seq_len), bool))
    differs = (values != causal) & (causal | (not is_causal))
    if differs.any():
        *_, query, key = np.unravel_index(np.argmax(differs), differs.shape)
        raise ValueError(
            "sparse attention is causal and takes no other mask: the mask must be True where "
            "key <= query (and, without is_causal=True, False elsewhere); this one differs at "
            f"query {query}, key {key}"
        )


def check_positive_int(name: str, value) -> None:
    _check_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def compact_ascending(values: jax.Array, size: int) -> jax.Array:
    """Sort the last axis ascending (SENTINEL last) and keep the first `size` entries."""
    values = jnp.sort(values, axis=-1)
    if values.shape[-1] >= size:
        return values[..., :size]
    pad = [(0, 0)] * (values.ndim - 1) + [(0, size - values.shape[-1])]
    return jnp.pad(values, pad, constant_values=SENTINEL)


def diag_mask_from_slashes(
    offsets: jax.Array, n_slots: int, block_kv: int, ratio: int
) -> jax.Array:
    """[..., n_slots] bool set D of relative key-block offsets covering the slash lines.

    `offsets`: [..., S] int32 diagonal offsets i - j >= 0 (SENTINEL = unused). The band of slash o
    over query block i spans key blocks `(i+1)r-1-d` for d in [o // bk, ceil(o / bk) + r - 1].
    The diagonal blocks 0..r-1 are always included.
    """
    valid = offsets < SENTINEL
    first = jnp.where(valid, offsets // block_kv, n_slots)
    last = jnp.where(valid, -(-offsets // block_kv) + ratio - 1, n_slots)
    lead = offsets.shape[:-1]
    diff = jnp.zeros(lead + (n_slots + 1,), jnp.int32)
    flat_diff = diff.reshape(-1, n_slots + 1)
    rows = jnp.arange(flat_diff.shape[0])[:, None]
    flat_first = jnp.minimum(first, n_slots).reshape(-1, offsets.shape[-1])
    flat_end = jnp.minimum(last + 1, n_slots).reshape(-1, offsets.shape[-1])
    flat_diff = flat_diff.at[rows, flat_first].add(1).at[rows, flat_end].add(-1)
    covered = jnp.cumsum(flat_diff, axis=-1)[:, :n_slots] > 0
    covered = covered.reshape(lead + (n_slots,))
    return covered | (jnp.arange(n_slots) < ratio)


def finalize_index(
    diag_mask: jax.Array,
    block_candidates: jax.Array,
    columns: jax.Array,
    *,
    max_diag: int,
    seq_len: int,
    block_q: int,
    block_kv: int,
) -> SparseIndex:
    """Build the SparseIndex from per-head parts.

    diag_mask: [B, H, n_slots] bool, the set D (must contain 0..r-1).
    block_candidates: [B, H, n_q_blocks, K] int32 key blocks (SENTINEL = none); those covered by D
      or not causal for their query block are dropped, the rest sorted.
    columns: [B, H, C] int32 key positions, unique, ascending (SENTINEL = none), never inside a
      listed block.
    """
    ratio = block_q // block_kv
    n_q_blocks = num_blocks(seq_len, block_q)
    n_slots = diag_mask.shape[-1]
    assert n_slots == n_q_blocks * ratio, (n_slots, n_q_blocks, ratio)

    slots = jnp.arange(n_slots, dtype=jnp.int32)
    diag_offset = compact_ascending(jnp.where(diag_mask, slots, SENTINEL), max_diag)
    cumulative = jnp.cumsum(diag_mask.astype(jnp.int32), axis=-1)
    diag_count = cumulative[..., ratio - 1 :: ratio]  # d <= (i+1)r-1 for block i
    diag_count = jnp.minimum(diag_count, max_diag)
    if CHECK_CAPACITY:
        check = functools.partial(_raise_if_dropped, max_diag=max_diag)  # bound: stays an int
        jax.debug.callback(check, cumulative[..., -1].max())

    # Listed blocks: drop covered and non-causal ones.
    last_block = (jnp.arange(n_q_blocks, dtype=jnp.int32) + 1) * ratio - 1  # [n_q_blocks]
    rel = last_block[:, None] - block_candidates  # [B, H, n_q_blocks, K]
    in_range = (block_candidates < SENTINEL) & (rel >= 0)
    covered = jnp.take_along_axis(
        diag_mask[:, :, None, :].astype(jnp.int32),
        jnp.clip(rel, 0, n_slots - 1),
        axis=-1,
    ).astype(bool)
    keep = in_range & ~covered
    block_index = jnp.sort(jnp.where(keep, block_candidates, SENTINEL), axis=-1)
    block_count = jnp.sum(keep, axis=-1, dtype=jnp.int32)

    # Columns: count those before the contiguous local run of D.
    local_run = jnp.argmin(diag_mask, axis=-1).astype(jnp.int32)  # first d not in D
    local_run = jnp.where(jnp.all(diag_mask, axis=-1), n_slots, local_run)  # [B, H]
    limit = jnp.maximum(last_block[None, None, :] + 1 - local_run[..., None], 0) * block_kv
    column_count = jax.vmap(jax.vmap(jnp.searchsorted))(columns, limit).astype(jnp.int32)

    return SparseIndex(
        diag_offset=diag_offset.astype(jnp.int32),
        diag_count=diag_count.astype(jnp.int32),
        diag_mask=diag_mask,
        block_index=block_index.astype(jnp.int32),
        block_count=block_count,
        column_index=columns.astype(jnp.int32),
        column_count=column_count,
        seq_len=seq_len,
        block_q=block_q,
        block_kv=block_kv,
    )


class IndexCapacityError(RuntimeError):
    """An index buffer was sized too small for what was estimated (see CHECK_CAPACITY)."""


def _raise_if_dropped(diag_size, *, max_diag: int) -> None:
    # Host-side numpy only: a JAX op dispatched from inside a callback can deadlock the runtime.
    diag_size = int(np.asarray(diag_size))
    if diag_size > max_diag:
        raise IndexCapacityError(
            f"a head's diagonal set holds {diag_size} offsets but the index keeps "
            f"max_diag={max_diag}: {diag_size - max_diag} would be dropped"
        )


def block_mask_from_index(index: SparseIndex) -> jax.Array:
    """[B, H, n_q_blocks, n_keys_padded] bool: keys each query block attends (before causality).

    Built only from the fields a kernel reads (offsets + counts), so it checks them. O(N^2 / bq).
    """
    bk, r = index.block_kv, index.ratio
    batch, heads, n_q_blocks = index.diag_count.shape
    n_kv_blocks = n_q_blocks * r
    q_blocks = jnp.arange(n_q_blocks, dtype=jnp.int32)

    def scatter_blocks(blocks, valid):  # [B, H, nqb, T] key blocks -> [B, H, nqb, n_kv_blocks]
        blocks = jnp.where(valid, blocks, n_kv_blocks)  # out of range -> dropped
        out = jnp.zeros((batch, heads, n_q_blocks, n_kv_blocks), bool)
        b, h, i = jnp.meshgrid(jnp.arange(batch), jnp.arange(heads), q_blocks, indexing="ij")
        return out.at[b[..., None], h[..., None], i[..., None], blocks].set(True, mode="drop")

    max_diag = index.diag_offset.shape[-1]
    diag_blocks = (q_blocks[:, None] + 1) * r - 1 - index.diag_offset[:, :, None, :]
    diag_valid = jnp.arange(max_diag) < index.diag_count[..., None]
    mask = scatter_blocks(diag_blocks, diag_valid)
    max_blocks = index.block_index.shape[-1]
    listed_valid = jnp.arange(max_blocks) < index.block_count[..., None]
    mask |= scatter_blocks(index.block_index, listed_valid)
    keys = jnp.repeat(mask, bk, axis=-1)  # [B, H, nqb, n_kv_blocks * bk]

    columns = jnp.broadcast_to(
        index.column_index[:, :, None, :], (batch, heads, n_q_blocks, index.column_index.shape[-1])
    )
    col_valid = jnp.arange(columns.shape[-1]) < index.column_count[..., None]
    col_valid &= ~column_is_covered(index, columns, q_blocks[:, None])
    cols = jnp.where(col_valid, columns, keys.shape[-1])
    b, h, i = jnp.meshgrid(jnp.arange(batch), jnp.arange(heads), q_blocks, indexing="ij")
    return keys.at[b[..., None], h[..., None], i[..., None], cols].set(True, mode="drop")


def clip_index_to_lengths(index: SparseIndex, keys: jax.Array) -> SparseIndex:
    """The index without the listed key blocks and columns that start at or past each
    sequence's key length `keys` [B]: no row may attend them. Blocks straddling the length stay
    (the kernels mask their keys); so do diagonal blocks, which D holds for every query block."""
    bound = keys[:, None, None]
    key_blocks = -(-bound // index.block_kv)  # blocks holding a key below the length
    listed = jnp.sum(index.block_index < key_blocks[..., None], axis=-1, dtype=jnp.int32)
    columns = jnp.sum(index.column_index < bound, axis=-1, dtype=jnp.int32)  # ascending
    return dataclasses.replace(
        index,
        block_count=jnp.minimum(index.block_count, listed),
        column_count=jnp.minimum(index.column_count, columns[..., None]),
    )


def attended_rows(index: SparseIndex, lengths: SeqLengths) -> jax.Array:
    """[B, N, H] bool: rows before their query length that attend at least one key before
    their key length under `index` (every other row's output is zero).

    A row below the key length attends itself (D holds the diagonal blocks). A row at or past
    it sees every key its query block lists below the length (they all precede the row), so
    it attends one exactly when the smallest key of its query block's index is below it.
    """
    bk, r = index.block_kv, index.ratio
    q_blocks = jnp.arange(index.num_q_blocks, dtype=jnp.int32)
    last_diag = jnp.maximum(index.diag_count - 1, 0)
    farthest = jnp.take_along_axis(index.diag_offset, last_diag, axis=-1)  # [B, H, nqb]
    first_key = ((q_blocks + 1) * r - 1 - farthest) * bk
    if index.block_index.shape[-1]:
        has_listed = index.block_count > 0
        listed = jnp.where(has_listed, index.block_index[..., 0], 0) * bk  # ascending
        first_key = jnp.where(has_listed, jnp.minimum(first_key, listed), first_key)
    if index.column_index.shape[-1]:
        has_column = index.column_count > 0
        column = jnp.where(has_column, index.column_index[..., :1], SENTINEL)  # ascending
        first_key = jnp.where(has_column, jnp.minimum(first_key, column), first_key)
    rows = jnp.arange(index.seq_len, dtype=jnp.int32)
    first_key = first_key[:, :, rows // index.block_q]  # [B, H, N]
    keys = lengths.keys[:, None, None]
    valid = (rows < lengths.queries[:, None, None]) & ((rows < keys) | (first_key < keys))
    return jnp.moveaxis(valid, 1, 2)


def zero_unattended_rows(out: jax.Array, index: SparseIndex, lengths: SeqLengths) -> jax.Array:
    """out [B, N, H, D] with the rows `attended_rows` rules out set to zero."""
    return jnp.where(attended_rows(index, lengths)[..., None], out, 0).astype(out.dtype)


def column_is_covered(index: SparseIndex, columns: jax.Array, q_blocks: jax.Array) -> jax.Array:
    """Whether key positions lie in a diagonal key block of their query block.

    columns: [B, H, X, C] key positions; q_blocks: int array broadcastable to it.
    """
    rel = (q_blocks + 1) * index.ratio - 1 - columns // index.block_kv
    n_slots = index.diag_mask.shape[-1]
    hit = jnp.take_along_axis(
        index.diag_mask[:, :, None, :], jnp.clip(rel, 0, n_slots - 1), axis=-1
    )
    return hit & (rel >= 0) & (rel < n_slots)


def gather_columns(x: jax.Array, column_index: jax.Array, block_kv: int) -> jax.Array:
    """K or V rows of each query head's columns, contiguous: [B, Hq, C_pad, D].

    x: [B, N, Hkv, D]; column_index: [B, Hq, C] key positions (SENTINEL = padding; gathers row 0,
    which the kernel's mask drops). Query head h reads kv head h // (Hq // Hkv). C_pad is C
    rounded up to a multiple of block_kv (at least one tile).
    """
    batch, _, num_kv_heads, _ = x.shape
    num_heads, n_columns = column_index.shape[1:]
    c_pad = max(block_kv, -(-n_columns // block_kv) * block_kv)
    rows = jnp.where(column_index < SENTINEL, column_index, 0)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, c_pad - n_columns)))
    kv_head = jnp.arange(num_heads) // (num_heads // num_kv_heads)
    b = jnp.arange(batch)[:, None, None]
    return x[b, rows, kv_head[None, :, None]]


@jax.jit
def dense_mask_from_index(index: SparseIndex) -> jax.Array:
    """[B, H, N, N] bool attention mask (causal applied) of the index. For small N only."""
    n = index.seq_len
    per_block = block_mask_from_index(index)[..., :n]  # [B, H, nqb, N]
    rows = jnp.repeat(per_block, index.block_q, axis=2)[:, :, :n]  # [B, H, N, N]
    causal = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
    return rows & causal


def unique_ascending(values: jax.Array) -> jax.Array:
    """Sort the last axis and replace repeated entries by SENTINEL (which then sort last)."""
    values = jnp.sort(values, axis=-1)
    repeated = jnp.concatenate(
        [jnp.zeros_like(values[..., :1], bool), values[..., 1:] == values[..., :-1]], axis=-1
    )
    return jnp.sort(jnp.where(repeated, SENTINEL, values), axis=-1)


@functools.partial(jax.jit, static_argnames=("seq_len", "block_q", "block_kv"))
def vertical_slash_index(
    verticals: jax.Array,
    slashes: jax.Array,
    *,
    seq_len: int,
    block_q: int = 64,
    block_kv: int = 64,
) -> SparseIndex:
    """Index of given key columns [B, H, V] and slash offsets [B, H, S] (SENTINEL = unused).

    Out-of-range entries (>= seq_len) and repeats are dropped.
    """
    check_block_sizes(block_q, block_kv)
    ratio = block_q // block_kv
    n_slots = num_blocks(seq_len, block_q) * ratio
    slashes = jnp.where(slashes < seq_len, slashes, SENTINEL)
    diag_mask = diag_mask_from_slashes(slashes, n_slots, block_kv, ratio)
    batch, heads = verticals.shape[:2]
    return finalize_index(
        diag_mask,
        jnp.full((batch, heads, num_blocks(seq_len, block_q), 0), SENTINEL, jnp.int32),
        unique_ascending(jnp.where(verticals < seq_len, verticals, SENTINEL)),
        max_diag=min(n_slots, slashes.shape[-1] * (ratio + 1) + ratio),
        seq_len=seq_len,
        block_q=block_q,
        block_kv=block_kv,
    )
