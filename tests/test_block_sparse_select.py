"""Block-sparse selection without a sort: exactly lax.top_k's set, ties to the lower index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import index_approx
from minference_jax.index_approx import _order_key, _radix_select, estimate_block_sparse
from minference_jax.sparse_index import SENTINEL


def _chosen_sets(chosen):
    rows = chosen.reshape(-1, chosen.shape[-1])
    return [set(int(x) for x in row[row < SENTINEL]) for row in rows]


def test_radix_select_matches_top_k_on_signed_scores_with_ties():
    rng = np.random.default_rng(0)
    # Coarse values: many exact ties; negatives, -0.0, +-inf and huge values too.
    scores = np.round(rng.normal(size=(3, 5, 97)) * 2) / 2 + 0.0  # + 0.0: no -0.0 but row 1
    scores[0, 0] = 1.0  # all equal
    scores[0, 1, ::3] = -0.0
    scores[0, 1, 1::3] = 0.0
    scores[1, 2, :5] = [np.inf, -np.inf, 3e38, -3e38, 1e-40]
    scores = scores.astype(np.float32)
    k = rng.integers(0, 98, size=(3, 5, 1)).astype(np.int32)
    k[0, :2] = 40
    k_max = 97
    got = np.asarray(_radix_select(_order_key(jnp.asarray(scores)), jnp.asarray(k), k_max))
    _, top = jax.lax.top_k(jnp.asarray(scores), k_max)
    top = np.asarray(top)
    for b in range(3):
        for h in range(5):
            row, kk = got[b, h], k[b, h, 0]
            # Values that compare equal tie, -0.0 and +0.0 too (lax.top_k orders those by bits).
            want = sorted(np.argsort(-scores[b, h], kind="stable")[:kk])
            assert list(row[:kk]) == want, (b, h)
            assert np.all(row[kk:] == SENTINEL)
            if not np.any((scores[b, h] == 0) & np.signbit(scores[b, h])):
                assert want == sorted(top[b, h, :kk])


def _exact_qk(seed, batch, n, heads, kv_heads, dim, levels):
    """Small integers: block means over power-of-two rows and their dots are exact in f32, so the
    numpy oracle sees the very same scores, ties included."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-levels, levels + 1, size=(batch, n, heads, dim)).astype(np.float32)
    k = rng.integers(-levels, levels + 1, size=(batch, n, kv_heads, dim)).astype(np.float32)
    return q, k


def _brute_force(q, k, top_k, scale, block_q, block_kv):
    """[B, H, nqb] sets: top (top_k[h] - r) earlier key blocks by pooled score, stable ties."""
    batch, n, heads, _ = q.shape
    group, ratio = heads // k.shape[2], block_q // block_kv

    def pool(x, blk):
        return np.stack([x[:, i : i + blk].mean(1) for i in range(0, n, blk)], 1)

    pq, pk = pool(q.astype(np.float64), block_q), pool(k.astype(np.float64), block_kv)
    scores = np.einsum("bihd,bjhd->bhij", pq, np.repeat(pk, group, axis=2)) * scale
    out = []
    for b in range(batch):
        for h in range(heads):
            extra = max(top_k[h] - ratio, 0)
            for i in range(pq.shape[1]):
                allowed = scores[b, h, i, : i * ratio]
                out.append(set(np.argsort(-allowed, kind="stable")[:extra].tolist()))
    return out


@pytest.mark.parametrize(
    "n, block_q, block_kv, levels",
    [(200, 16, 16, 1), (200, 32, 16, 1), (136, 16, 8, 2)],  # tails of 8 rows: exact means
)
def test_estimate_block_sparse_matches_brute_force_with_ties(n, block_q, block_kv, levels):
    heads, kv_heads = 4, 2
    q, k = _exact_qk(n + block_q, 2, n, heads, kv_heads, 8, levels)
    ratio = block_q // block_kv
    top_k = [ratio + 3, ratio + 7, 1, 1000]  # one under the diagonal count, one over every row
    chosen = np.asarray(
        estimate_block_sparse(
            jnp.asarray(q), jnp.asarray(k), top_k, scale=0.25, block_q=block_q, block_kv=block_kv
        )
    )
    assert chosen.shape[:3] == (2, heads, -(-n // block_q))
    assert _chosen_sets(chosen) == _brute_force(q, k, top_k, 0.25, block_q, block_kv)
    # Ascending, padding last.
    steps = np.diff(chosen.astype(np.int64), axis=-1)
    assert np.all((steps > 0) | (chosen[..., 1:] == SENTINEL))


def test_all_equal_scores_take_the_first_blocks():
    n, block = 160, 16
    q = np.zeros((2, n, 2, 8), np.float32)
    q[1] = 1.0
    k = np.ones((2, n, 1, 8), np.float32)
    k[0, (np.arange(n) // block) % 2 == 1] = -1.0  # batch 0: scores +0.0 and -0.0 alternate
    chosen = np.asarray(estimate_block_sparse(q, k, [4, 6], scale=1.0, block_q=16, block_kv=16))
    for h, extra in enumerate((3, 5)):
        for i in range(n // block):
            want = list(range(min(i, extra)))
            row = chosen[:, h, i]
            np.testing.assert_array_equal(row[:, : len(want)], [want, want])
            assert np.all(row[:, len(want) :] == SENTINEL)


def test_chunked_selection_matches_one_step(monkeypatch):
    q, k = _exact_qk(5, 2, 300, 4, 1, 8, 2)
    estimate = lambda: np.asarray(  # noqa: E731
        estimate_block_sparse(q, k, [5, 2, 9, 30], scale=0.5, block_q=32, block_kv=16)
    )
    whole = estimate()
    monkeypatch.setattr(index_approx, "_BLOCK_SCORE_BYTES_PER_STEP", 1)
    np.testing.assert_array_equal(estimate(), whole)
