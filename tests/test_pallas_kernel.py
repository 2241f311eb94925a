"""The Pallas kernels against their references: CPU interpret mode in CI, GPU marked."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.index_approx import (
    _grouped,
    _map_over_kv_heads,
    _vertical_slash_scores,
    build_sparse_index,
)
from minference_jax.reference import sparse_attention_reference
from minference_jax.sparse_index import SENTINEL, vertical_slash_index
from pallas_kernels import vs_estimate
from pallas_kernels.sparse_flash import sparse_flash_attention
from tests.million_tokens import check_one_million_tokens
from tests.oracles import random_qkv, rel_err

# rel_err (norm-wise) against the f32 HIGHEST-precision reference. The f32 bound is what catches
# a GPU kernel whose f32 dots run as TF32 (e.g. `Precision.HIGHEST` dropped: Triton then uses
# TF32 tensor cores): TF32 keeps 10 mantissa bits, which gives 3.6e-4 (inputs rounded to
# nearest) to 1.2e-3 (truncated) at the GPU cases' shapes (D 64-128, N 1000-4113; emulated in
# float64 numpy), 36-120x this bound, while true f32 stays near 1e-6. Keep it at least 10x below
# TF32's error: test_f32_tolerance_is_far_below_tf32_error checks that on CPU.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}
MIXED = (P.VerticalSlash(40, 120), P.AShape(70, 100), P.BlockSparse(3), P.Dense())


def _check(q, k, v, index, dtype, interpret, pregather_columns=False):
    out = sparse_flash_attention(
        q, k, v, index, interpret=interpret, poison=True, pregather_columns=pregather_columns
    )
    ref = sparse_attention_reference(q, k, v, index)
    out_np = np.asarray(out.astype(jnp.float32))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(out_np).any(), "unwritten (NaN-poisoned) or NaN output elements"
    assert rel_err(out, ref) < TOLERANCE[dtype]


INTERPRET_CASES = [
    # batch, n, heads, kv_heads, head_dim, patterns, block_q, block_kv
    (2, 300, 4, 2, 32, MIXED, 64, 64),
    (1, 97, 2, 1, 64, P.VerticalSlash(30, 50), 64, 64),
    (
        1,
        200,
        4,
        2,
        24,
        (P.VerticalSlash(40, 120), P.AShape(70, 100), P.BlockSparse(3, 16), P.Dense()),
        32,
        16,
    ),  # head_dim padded to 32, ratio 2
    (1, 1000, 2, 1, 16, (P.BlockSparse(4, 32), P.AShape(40, 100)), 64, 32),
    (1, 4096 + 17, 2, 1, 16, (P.VerticalSlash(100, 300), P.AShape(128, 512)), 64, 64),
    (
        1,
        150,
        2,
        2,
        16,
        (P.VerticalSlash(5000, 5000), P.BlockSparse(1000, 32)),
        32,
        32,
    ),  # budgets > N
]


# Both dtypes for every case but the long one (interpret mode is slow; f32 is the stricter check).
INTERPRET_PARAMS = [
    pytest.param(dtype, *case, id=f"{name}-n{case[1]}-{i}")
    for i, case in enumerate(INTERPRET_CASES)
    for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))
    if case[1] < 2000 or dtype == jnp.float32
]


@pytest.mark.parametrize(
    "dtype, batch, n, heads, kv_heads, dim, patterns, block_q, block_kv", INTERPRET_PARAMS
)
def test_kernel_interpret_matches_reference(
    dtype, batch, n, heads, kv_heads, dim, patterns, block_q, block_kv
):
    q, k, v = random_qkv(n + dim, batch, n, heads, kv_heads, dim, dtype)
    index = build_sparse_index(q, k, patterns, block_q=block_q, block_kv=block_kv)
    _check(q, k, v, index, dtype, interpret=True)


def test_kernel_interpret_pregathered_columns_batch_2_gqa():
    batch, n, heads, kv_heads, dim, patterns, block_q, block_kv = INTERPRET_CASES[0]
    q, k, v = random_qkv(7, batch, n, heads, kv_heads, dim, jnp.bfloat16)
    index = build_sparse_index(q, k, patterns, block_q=block_q, block_kv=block_kv)
    _check(q, k, v, index, jnp.bfloat16, interpret=True, pregather_columns=True)


def _crafted_runs_index(seed, n, heads, block_q, block_kv):
    """VS index whose D has runs of 1-6 adjacent blocks at both parities, up to the start."""
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // block_kv)
    slashes = []
    for _ in range(heads):
        starts = rng.choice(np.arange(2, n_blocks), size=min(6, n_blocks - 2), replace=False)
        lengths = rng.integers(1, 5, size=starts.shape)
        shifted = rng.integers(0, 2, size=starts.shape)
        # Aligned slashes at blocks d .. d + L - 1 cover a run of L + r - 1 blocks from d; a
        # slash 1 past a block boundary lengthens it by one (both parities of run lengths).
        row = [
            (d + j) * block_kv + extra
            for d, length, extra in zip(starts, lengths, shifted, strict=True)
            for j in range(length)
        ]
        row += list(range(0, rng.integers(1, 3 * block_kv)))  # a local band of random length
        slashes.append(sorted(set(row)))
    width = max(map(len, slashes))
    slashes = np.array([s + [SENTINEL] * (width - len(s)) for s in slashes])[None]
    verticals = rng.integers(0, n, (1, heads, 7))
    return vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )


@pytest.mark.parametrize(
    "block_q, block_kv, pregather_columns", [(64, 64, False), (32, 16, False), (32, 16, True)]
)
def test_kernel_interpret_on_crafted_runs(block_q, block_kv, pregather_columns):
    """Runs of adjacent diagonal blocks of both parities reaching the sequence start, N % block;
    columns inside and outside D, read in place or from the per-head pre-gathered copies."""
    n, heads, kv_heads, dim = 700, 4, 2, 16
    q, k, v = random_qkv(5, 1, n, heads, kv_heads, dim, jnp.float32)
    index = _crafted_runs_index(3, n, heads, block_q, block_kv)
    _check(q, k, v, index, jnp.float32, interpret=True, pregather_columns=pregather_columns)


def test_kernel_rejects_bad_inputs():
    q, k, v = random_qkv(0, 1, 64, 2, 1, 16, jnp.float32)
    index = build_sparse_index(q, k, P.Dense())
    with pytest.raises(TypeError, match="share a dtype"):
        sparse_flash_attention(q, k.astype(jnp.bfloat16), v, index, interpret=True)
    with pytest.raises(ValueError, match="index is for"):
        sparse_flash_attention(q[:, :32], k[:, :32], v[:, :32], index, interpret=True)
    small = build_sparse_index(q, k, P.Dense(), block_q=8, block_kv=8)
    with pytest.raises(ValueError, match="power of two >= 16"):
        sparse_flash_attention(q, k, v, small, interpret=True)


GPU_CASES = [
    (2, 1000, 32, 8, 128, MIXED * 8, 64, 64),
    (1, 4096 + 17, 32, 8, 128, MIXED * 8, 64, 64),
    (2, 4096 + 17, 8, 2, 64, (P.VerticalSlash(100, 300), P.AShape(128, 512)) * 4, 128, 64),
    (1, 1000, 4, 4, 96, (P.VerticalSlash(5000, 5000), P.BlockSparse(1000)) * 2, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
@pytest.mark.parametrize("batch, n, heads, kv_heads, dim, patterns, block_q, block_kv", GPU_CASES)
def test_kernel_gpu_matches_reference(
    dtype, batch, n, heads, kv_heads, dim, patterns, block_q, block_kv
):
    q, k, v = random_qkv(n + dim, batch, n, heads, kv_heads, dim, dtype)
    index = build_sparse_index(q, k, patterns, block_q=block_q, block_kv=block_kv)
    _check(q, k, v, index, dtype, interpret=False)
    if dtype == jnp.bfloat16:
        _check(q, k, v, index, dtype, interpret=False, pregather_columns=True)


@pytest.mark.gpu
def test_kernel_gpu_one_million_tokens_32_heads():
    check_one_million_tokens(sparse_flash_attention, block_q=64)


@pytest.mark.gpu
def test_vs_scores_kernel_gpu_one_million_tokens():
    """64-bit addressing of the skewed buffer (32 heads x 64 rows x 1M bf16 = 4.3 GB > 4 GiB)."""
    n, heads, kv_heads, dim = 1 << 20, 32, 8, 128
    # Only the last 64 queries are read: draw just those (a 1M-row q and its f32 draw would
    # take 24 GiB beside the other GPU tests).
    key_q, key_k = jax.random.split(jax.random.PRNGKey(2))
    q_last = jax.random.normal(key_q, (1, 64, heads, dim), jnp.bfloat16)
    k = jax.random.normal(key_k, (1, n, kv_heads, dim), jnp.bfloat16)
    columns, diagonals = vs_estimate.vertical_slash_scores(q_last, k, scale=dim**-0.5)
    want_columns, want_diagonals = _map_over_kv_heads(
        functools.partial(_vertical_slash_scores, scale=dim**-0.5),
        _grouped(q_last, kv_heads),
        k,
        one_at_a_time=True,
    )
    # Columns sum f32 probabilities in both; diagonals sum bf16 ones in the kernel.
    assert float(jnp.abs(columns - want_columns).max()) < 1e-4
    assert float(jnp.abs(diagonals - want_diagonals).max()) < 5e-3
    np.testing.assert_allclose(np.asarray(diagonals.sum(-1)), 64.0, rtol=1e-2)


def _round_to_tf32(x):
    """float32 -> the nearest TF32 value (10 explicit mantissa bits), as float64."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64) + 0x1000
    return (bits & ~np.uint64(0x1FFF)).astype(np.uint32).view(np.float32).astype(np.float64)


def test_f32_tolerance_is_far_below_tf32_error():
    """The f32 tolerance must fail a kernel whose f32 dots run in TF32 (only visible on GPU)."""
    rng = np.random.default_rng(7)
    n, dim = 300, 128  # the error hardly depends on N; D as in GPU_CASES

    def causal_attention(q, k, v, rounding):
        s = rounding(q) @ rounding(k).T * dim**-0.5
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        return rounding(p) @ rounding(v) / p.sum(-1, keepdims=True)

    q, k, v = (rng.standard_normal((n, dim)).astype(np.float32) for _ in range(3))
    exact = causal_attention(q, k, v, lambda x: np.asarray(x, np.float64))
    tf32 = causal_attention(q, k, v, _round_to_tf32)
    assert rel_err(tf32, exact) > 10 * TOLERANCE[jnp.float32]
