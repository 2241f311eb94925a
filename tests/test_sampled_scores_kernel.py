"""The fused sampled-rows scorer (pallas_kernels/sampled_scores.py, interpreted on CPU) gives the
exact block scores of sampled query rows: against a float64 oracle, the XLA path, and on GPU."""

import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import index_approx
from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index
from pallas_kernels import sampled_scores
from tests.oracles import moving_max_qk, sampled_rows_scores_oracle


def _all_scores(q, k, estimator, *, rows, block_q, block_kv):
    """[B, Hq, n_q_blocks, n_kv_blocks] from every chunk of `_block_scores_by_chunk`."""
    score_fn, n_q_blocks, chunk = index_approx._block_scores_by_chunk(
        q,
        k,
        scale=q.shape[-1] ** -0.5,
        stride=0,
        pooled_heads=None,
        sample_rows=rows,
        block_q=block_q,
        block_kv=block_kv,
        estimator=estimator,
    )
    n_kv_blocks = -(-q.shape[1] // block_kv)
    parts = [score_fn(first, n_kv_blocks) for first in range(0, n_q_blocks, chunk)]
    return np.concatenate([np.asarray(p) for p in parts], axis=2)[:, :, :n_q_blocks]


@pytest.mark.parametrize(
    "batch, n, heads, kv_heads, head_dim, rows, block_q, block_kv",
    [
        (1, 2000, 2, 2, 32, 8, 64, 64),  # 4 row tiles: most key blocks seen whole, unmasked
        (2, 700, 4, 2, 16, 4, 64, 64),  # N not a multiple of any block, GQA, batch 2
        (1, 1100, 6, 2, 32, 8, 128, 64),  # two key blocks per query block, 3 heads a kv head
        (1, 600, 2, 1, 64, 1, 128, 128),  # one row per query block: a single-row tile tail
        (1, 333, 2, 2, 32, 16, 64, 32),  # more rows than a tile's worth of query blocks
    ],
)
def test_fused_scores_equal_the_oracle_and_the_xla_path(
    batch, n, heads, kv_heads, head_dim, rows, block_q, block_kv
):
    q, k = moving_max_qk(n + rows, batch, n, heads, kv_heads, head_dim)
    kw = dict(rows=rows, block_q=block_q, block_kv=block_kv)
    got = _all_scores(q, k, "pallas", **kw)
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    want = sampled_rows_scores_oracle(q64, k64, rows, block_q, head_dim**-0.5, block_kv)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got, _all_scores(q, k, "xla", **kw), rtol=1e-4, atol=1e-6)


def test_fused_scores_keep_peaked_rows():
    """Logits in the thousands: a running max kept at the wrong scale underflows every exp."""
    q, k = moving_max_qk(11, 1, 1500, 2, 1, 32)
    q = q * 60.0
    kw = dict(rows=8, block_q=64, block_kv=64)
    got = _all_scores(q, k, "pallas", **kw)
    want = sampled_rows_scores_oracle(
        np.asarray(q, np.float64), np.asarray(k, np.float64), 8, 64, 32**-0.5
    )
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_fused_scores_in_chunks(monkeypatch):
    q, k = moving_max_qk(3, 1, 900, 4, 2, 32)
    kw = dict(rows=8, block_q=64, block_kv=64)
    whole = _all_scores(q, k, "pallas", **kw)
    monkeypatch.setattr(index_approx, "_SCORE_BYTES_PER_STEP", 1)  # one query block a chunk
    chunked = _all_scores(q, k, "pallas", **kw)
    want = sampled_rows_scores_oracle(
        np.asarray(q, np.float64), np.asarray(k, np.float64), 8, 64, 32**-0.5
    )
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(chunked, want, rtol=1e-4, atol=1e-6)


def test_index_from_the_kernel_equals_the_xla_one():
    q, k = moving_max_qk(5, 2, 1000, 4, 2, 32)
    heads = tuple(P.SampledBlockSparse(t, rows=4, max_blocks=16) for t in (0.0, 0.01, 0.05, 0.2))
    indices = [
        build_sparse_index(q, k, heads, block_q=64, block_kv=64, estimator=estimator)
        for estimator in ("xla", "pallas")
    ]
    for field in ("block_index", "block_count"):
        np.testing.assert_array_equal(getattr(indices[0], field), getattr(indices[1], field))
    tiles = np.asarray(indices[1].num_tiles())
    assert tiles.min() < tiles.max()  # the thresholds chose different budgets


def test_kernel_is_asked_for_only_where_it_runs():
    q, k = moving_max_qk(7, 1, 256, 2, 2, 48)  # head_dim 48: not a Triton tile
    pattern = P.SampledBlockSparse(0.01, rows=4)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        build_sparse_index(q, k, pattern, estimator="pallas")
    build_sparse_index(q, k, pattern, estimator=None)  # the XLA path, without a word
    q, k = moving_max_qk(7, 2, 256, 2, 2, 32)
    with pytest.raises(ValueError, match="no sequence lengths"):
        build_sparse_index(
            q, k, pattern, estimator="pallas", query_seq_lengths=jnp.array([256, 100])
        )


def test_kernel_refuses_rows_it_cannot_tile():
    q = jnp.zeros((2, 100, 32))
    k = jnp.zeros((1, 128, 32))
    with pytest.raises(ValueError, match="multiple of 64"):
        sampled_scores.sampled_row_block_sums(
            q, k, jnp.arange(100), scale=1.0, seq_len=128, num_heads=2, block_kv=64, interpret=True
        )


@pytest.mark.gpu
@pytest.mark.parametrize("n, block_q, block_kv", [(8192, 128, 128), (5000, 64, 64)])
def test_fused_scores_on_gpu_equal_the_xla_path(n, block_q, block_kv):
    q, k = moving_max_qk(11, 1, n, 8, 2, 128, jnp.bfloat16)
    kw = dict(rows=8, block_q=block_q, block_kv=block_kv)
    got = _all_scores(q, k, "pallas", **kw)
    want = _all_scores(q, k, "xla", **kw)
    assert np.isfinite(got).all()
    # The same bf16 products, summed in another order: block masses agree to f32 rounding.
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-4)
