"""The fused anti-diagonal scorer (pallas_kernels/antidiag_scores.py, interpreted on CPU) gives
the block scores of the XLA path, which materialises the strided logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import index_approx
from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index
from pallas_kernels import antidiag_scores
from tests.oracles import moving_max_qk


def _all_scores(q, k, estimator, *, stride, block_q, block_kv, pooled_heads=None):
    """[B, Hq, n_q_blocks, n_kv_blocks] from every chunk of `_block_scores_by_chunk`."""
    score_fn, n_q_blocks, chunk = index_approx._block_scores_by_chunk(
        q,
        k,
        scale=q.shape[-1] ** -0.5,
        stride=stride,
        pooled_heads=pooled_heads,
        block_q=block_q,
        block_kv=block_kv,
        estimator=estimator,
    )
    n_kv_blocks = -(-q.shape[1] // block_kv)
    parts = [
        score_fn(first, n_kv_blocks) for first in range(0, n_q_blocks, chunk)
    ]  # the widest width: every chunk sees at most all key blocks
    return np.concatenate([np.asarray(p) for p in parts], axis=2)[:, :, :n_q_blocks]


@pytest.mark.parametrize(
    "batch, n, heads, kv_heads, stride, block_q, block_kv",
    [
        (1, 512, 2, 2, 8, 64, 64),
        (2, 700, 4, 2, 4, 64, 64),  # N not a multiple of any block, GQA, batch 2
        (1, 1100, 4, 1, 8, 128, 64),  # two key blocks per query block, many column tiles
        (1, 600, 2, 1, 16, 128, 128),  # 8 strided columns per key block
        (1, 300, 2, 2, 2, 64, 64),  # 32 columns per key block: groups of 8
    ],
)
def test_fused_scores_match_the_xla_path(batch, n, heads, kv_heads, stride, block_q, block_kv):
    q, k = moving_max_qk(n + stride, batch, n, heads, kv_heads, 32)
    kw = dict(stride=stride, block_q=block_q, block_kv=block_kv)
    want = _all_scores(q, k, "xla", **kw)
    got = _all_scores(q, k, "pallas", **kw)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    # Rows are distributions over the key blocks a query block can see.
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-4)


def test_fused_scores_in_chunks_and_with_pooled_heads(monkeypatch):
    q, k = moving_max_qk(3, 1, 900, 4, 2, 32)
    kw = dict(stride=8, block_q=64, block_kv=64, pooled_heads=jnp.array([True, False] * 2))
    want = _all_scores(q, k, "xla", **kw)
    whole = _all_scores(q, k, "pallas", **kw)
    monkeypatch.setattr(index_approx, "_SCORE_BYTES_PER_STEP", 1)  # one query block a chunk
    chunked = _all_scores(q, k, "pallas", **kw)
    np.testing.assert_allclose(whole, want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(chunked, want, rtol=2e-4, atol=1e-6)


def test_bf16_index_from_the_kernel_matches_the_xla_one():
    q, k = moving_max_qk(5, 1, 1000, 4, 2, 64, jnp.bfloat16)
    pattern = P.AntiDiagonalBlockSparse(0.9, stride=8)
    indices = [
        build_sparse_index(q, k, pattern, block_q=64, block_kv=64, estimator=estimator)
        for estimator in ("xla", "pallas")
    ]
    tiles = [np.asarray(ix.num_tiles()) for ix in indices]
    # bf16 logits summed in another order can swap a block at the threshold, no more.
    assert np.abs(tiles[0] - tiles[1]).sum() <= 2
    assert tiles[0].sum() > 0


def test_kernel_refuses_shapes_it_cannot_tile():
    q = jnp.zeros((2, 8, 100, 32))
    k = jnp.zeros((1, 8, 128, 32))
    with pytest.raises(ValueError, match="multiple of 64"):
        antidiag_scores.antidiagonal_row_sums(
            q, k, 0, scale=1.0, seq_len=800, num_heads=2, group=8, interpret=True
        )


def test_column_group_divides_a_key_block():
    groups = [antidiag_scores.column_group(c) for c in (1, 2, 4, 8, 16, 32)]
    assert groups == [1, 2, 4, 8, 8, 8]
