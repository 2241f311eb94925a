"""Recall of a sparse index: the share of each query row's dense softmax mass that it keeps.

Exact per row, for sampled query rows anywhere in the sequence (not only the last ones the
estimators look at): the dense causal softmax of those rows in f32, masked by the keys the
index gives them. The mask is built for the sampled rows only, from the same fields the kernels
read (`SparseIndex` diagonal offsets, listed blocks and columns), never as an N x N array, so
it runs at 128K tokens and beyond.

    recall = row_recall(q, k, index, sample_rows(n, 64))   # [B, H, R]

`oracle_curves` bounds every index from above: knowing the dense attention of whole query
blocks, it gives the most mass that *any* index could keep with a given number of tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax.reference import _tile_positions
from minference_jax.sparse_index import SparseIndex, num_blocks

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


def _causal_probs(q_rows, k, rows, softmax_scale):
    """q_rows [B, R, Hq, D] at positions rows [R] -> [B, Hq, R, N] dense causal softmax, f32."""
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
    return jax.nn.softmax(jnp.where(causal, logits * softmax_scale, -jnp.inf), axis=-1)


@functools.partial(jax.jit, static_argnames=("softmax_scale",))
def _recall_of_rows(q_rows, k, index, rows, softmax_scale):
    """q_rows [B, R, Hq, D] at positions rows [R] -> [B, Hq, R] kept dense softmax mass."""
    probs = _causal_probs(q_rows, k, rows, softmax_scale)
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


def sample_block_rows(seq_len: int, num_query_blocks: int, block: int = 64) -> np.ndarray:
    """Every row of `num_query_blocks` query blocks of `block` rows spread evenly over the
    sequence (first and last included), ascending: the rows `oracle_curves` needs whole."""
    if num_query_blocks < 1 or block < 1:
        raise ValueError(f"need num_query_blocks >= 1, block >= 1; got {num_query_blocks}, {block}")
    blocks = np.unique(sample_rows(num_blocks(seq_len, block), num_query_blocks))
    rows = (blocks[:, None] * block + np.arange(block)).ravel()
    return rows[rows < seq_len].astype(np.int32)


@dataclasses.dataclass(frozen=True)
class OracleCurve:
    """Best reachable mean recall against the fraction of causal tiles computed (both ascending,
    from (0, 0) to (1, 1)), over the sampled query blocks' rows."""

    tiles: np.ndarray
    recall: np.ndarray

    def tiles_for(self, recall: float) -> float:
        """The fewest tiles (a fraction of the causal tiles) that keep mean recall >= `recall`."""
        i = min(int(np.searchsorted(self.recall, recall - 1e-9)), self.recall.size - 1)
        return float(self.tiles[i])

    def recall_at(self, tiles: float) -> float:
        """The most mean recall any selection of at most `tiles` (a fraction) can keep."""
        i = int(np.searchsorted(self.tiles, tiles + 1e-12, side="right")) - 1
        return float(self.recall[max(i, 0)])


@functools.partial(jax.jit, static_argnames=("block", "softmax_scale"))
def _block_tile_masses(q_block, k, start, block, softmax_scale):
    """Dense causal softmax mass, summed over the rows of one query block (q_block [B, block,
    Hq, D], rows start.. ; rows past N contribute nothing), per key tile of `block` keys two
    ways: aligned tiles [B, Hq, T], and the block's keys sorted by mass, gathered `block` per
    tile [B, Hq, T] (descending)."""
    b, _, hq, _ = q_block.shape
    n = k.shape[1]
    tiles = num_blocks(n, block)
    chunk = ROWS_PER_STEP if block % ROWS_PER_STEP == 0 else block
    rows = start + jnp.arange(block)

    def chunk_mass(i):
        q_rows = jax.lax.dynamic_slice_in_dim(q_block, i * chunk, chunk, axis=1)
        row = jax.lax.dynamic_slice_in_dim(rows, i * chunk, chunk)
        probs = _causal_probs(q_rows, k, row, softmax_scale)
        return jnp.where((row < n)[:, None], probs, 0.0).sum(axis=2)  # [B, Hq, N]

    mass = jax.lax.map(chunk_mass, jnp.arange(block // chunk)).sum(0)
    mass = jnp.pad(mass, ((0, 0), (0, 0), (0, tiles * block - n)))
    aligned = mass.reshape(b, hq, tiles, block).sum(-1)
    gathered = (-jnp.sort(-mass, axis=-1)).reshape(b, hq, tiles, block).sum(-1)
    return aligned, gathered


def _greedy_curve(tile_masses: list[np.ndarray], total_tiles: int, total_rows: int):
    """The curve of taking tiles in descending mass over all (query block, head) pairs."""
    masses = np.sort(np.concatenate([m.ravel() for m in tile_masses]))[::-1]
    recall = np.concatenate([[0.0], np.cumsum(masses, dtype=np.float64) / total_rows])
    tiles = np.arange(masses.size + 1) / total_tiles
    return OracleCurve(tiles=tiles, recall=np.minimum(recall, 1.0))


def oracle_curves(
    q: jax.Array,
    k: jax.Array,
    rows,
    *,
    block: int = 64,
    softmax_scale: float | None = None,
) -> dict[str, OracleCurve]:
    """The most recall an index can keep per tile budget, knowing the exact dense attention.

    rows: whole query blocks of `block` rows (`sample_block_rows`). Recall is the mean over
    those rows and all heads, as `row_recall(...).mean()` on the same rows; tiles are counted
    over the same query blocks, as a fraction of their causal tiles. Two curves:
    - "blocks": each query block keeps its key tiles (aligned, `block` keys) of largest mass:
      the best block-sparse index there is;
    - "keys": each query block keeps its keys of largest mass, `block` per tile, wherever they
      lie: no index of diagonal tiles, listed tiles and gathered columns can do better with as
      many tiles (any `t` of its tiles hold at most `t * block` keys).
    Tiles go to the (query block, head) pairs where they add the most mass, over all of them:
    greedy is optimal because each pair's gathered tiles come in descending mass and aligned
    tiles are independent.
    """
    rows = np.asarray(rows, np.int32)
    n = q.shape[1]
    starts = np.unique(rows // block) * block
    whole = (starts[:, None] + np.arange(block)).ravel()
    if rows.ndim != 1 or rows.size == 0 or not np.array_equal(np.sort(rows), whole[whole < n]):
        raise ValueError(f"rows must be whole query blocks of {block} rows (sample_block_rows)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    aligned, gathered = [], []
    for start in starts:
        causal = num_blocks(min(start + block, n), block)  # tiles with a key <= the block's rows
        q_rows = q[:, start : start + block]
        q_rows = jnp.pad(q_rows, ((0, 0), (0, block - q_rows.shape[1]), (0, 0), (0, 0)))
        a, g = _block_tile_masses(q_rows, k, jnp.int32(start), block, scale)
        aligned.append(np.asarray(a[..., :causal], np.float64))
        gathered.append(np.asarray(g[..., :causal], np.float64))
    batch, heads = q.shape[0], q.shape[2]
    total_tiles = sum(m.size for m in aligned)
    total_rows = rows.size * batch * heads
    return {
        "blocks": _greedy_curve(aligned, total_tiles, total_rows),
        "keys": _greedy_curve(gathered, total_tiles, total_rows),
    }
