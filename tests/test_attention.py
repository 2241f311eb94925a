from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.attention import default_blocks, sparse_attention
from minference_jax.index_approx import build_sparse_index
from minference_jax.reference import dense_attention_reference
from minference_jax.sparse_index import dense_mask_from_index, vertical_slash_index
from tests.oracles import block_rows_mask, masked_attention_f64, random_qkv, rel_err, rows_mask

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


MIXED = (P.VerticalSlash(40, 120), P.AShape(70, 100), P.BlockSparse(3), P.Dense())
CASES = [
    # (batch, n, heads, kv_heads, patterns)
    (1, 97, 4, 4, P.VerticalSlash(30, 50)),
    (2, 333, 4, 2, MIXED),
    (1, 1000, 8, 2, MIXED * 2),
    (2, 4096 // 16 + 17, 4, 1, P.BlockSparse(2)),
    (1, 200, 2, 1, P.VerticalSlash(5000, 5000)),  # budgets larger than N
    (1, 150, 2, 2, P.AShape(1000, 1000)),
    (1, 130, 2, 1, P.BlockSparse(1000)),
]


# bf16 on every case but the largest (its mixed patterns run in bf16 at N = 333 already).
DTYPE_CASES = [
    pytest.param(dtype, *case, id=f"{name}-{i}")
    for i, case in enumerate(CASES)
    for dtype, name in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))
    if not (dtype == jnp.bfloat16 and case[1] == 1000)
]


@pytest.mark.parametrize("dtype, batch, n, heads, kv_heads, patterns", DTYPE_CASES)
def test_xla_path_matches_masked_reference(dtype, batch, n, heads, kv_heads, patterns):
    q, k, v = random_qkv(n + heads, batch, n, heads, kv_heads, 32, dtype)
    index = build_sparse_index(q, k, patterns)
    ref = sparse_attention(q, k, v, patterns=patterns, index=index, implementation="reference")
    out = sparse_attention(q, k, v, patterns=patterns, index=index, implementation="xla")
    oracle = masked_attention_f64(q, k, v, np.asarray(dense_mask_from_index(index)))
    assert out.dtype == dtype and out.shape == q.shape
    assert not np.isnan(np.asarray(out, np.float32)).any()
    # The reference is the oracle for kernels: it must be tight to float64 under the same mask.
    assert rel_err(ref, oracle) < TOLERANCE[dtype] / 2
    assert rel_err(out, oracle) < TOLERANCE[dtype]


@pytest.mark.parametrize("block_q, block_kv", [(64, 64), (128, 64), (32, 16)])
@pytest.mark.parametrize("n", [97, 333])
def test_given_vertical_slash_index_against_brute_force_attention(block_q, block_kv, n):
    """Independent chain: verticals/slashes -> brute-force mask -> float64 attention."""
    batch, heads, kv_heads = 2, 4, 2
    rng = np.random.default_rng(n + block_q)
    verticals = rng.choice(n, size=(batch, heads, 20))
    slashes = rng.choice(n, size=(batch, heads, 7))
    q, k, v = random_qkv(n, batch, n, heads, kv_heads, 16, jnp.float32)
    index = vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )
    mask = np.stack(
        [
            np.stack(
                [
                    rows_mask(
                        block_rows_mask(
                            n, block_q, block_kv, slashes=slashes[b, h], verticals=verticals[b, h]
                        ),
                        block_q,
                        n,
                    )
                    for h in range(heads)
                ]
            )
            for b in range(batch)
        ]
    )
    oracle = masked_attention_f64(q, k, v, mask)
    for implementation in ("reference", "xla"):
        out = sparse_attention(
            q, k, v, patterns=P.VerticalSlash(1, 1), index=index, implementation=implementation
        )
        assert rel_err(out, oracle) < 1e-5, implementation


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads, n", [(4, 4, 97), (8, 2, 300)])
def test_dense_pattern_equals_dot_product_attention(dtype, heads, kv_heads, n):
    q, k, v = random_qkv(heads * n, 2, n, heads, kv_heads, 64, dtype)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    for implementation in (None, "xla", "reference"):
        out = sparse_attention(q, k, v, patterns=P.Dense(), implementation=implementation)
        assert rel_err(out, expected) < TOLERANCE[dtype], implementation
    assert rel_err(dense_attention_reference(q, k, v), expected) < TOLERANCE[dtype]
    oracle = masked_attention_f64(q, k, v, np.tril(np.ones((n, n), bool)))
    assert (
        rel_err(sparse_attention(q, k, v, patterns=P.Dense(), implementation="xla"), oracle)
        < TOLERANCE[dtype]
    )


def test_sparse_differs_from_dense_when_it_should():
    """A test that cannot fail is a defect: a narrow pattern must change the output."""
    q, k, v = random_qkv(0, 1, 500, 2, 2, 32, jnp.float32)
    dense = sparse_attention(q, k, v, patterns=P.Dense(), implementation="xla")
    sparse = sparse_attention(q, k, v, patterns=P.AShape(4, 64), implementation="xla")
    assert rel_err(sparse, dense) > 1e-2


def test_softmax_scale_is_honoured():
    q, k, v = random_qkv(1, 1, 100, 2, 2, 16, jnp.float32)
    out = sparse_attention(
        q, k, v, patterns=P.VerticalSlash(30, 50), scale=0.1, implementation="xla"
    )
    index = build_sparse_index(q, k, P.VerticalSlash(30, 50), softmax_scale=0.1)
    oracle = masked_attention_f64(q, k, v, np.asarray(dense_mask_from_index(index)), scale=0.1)
    assert rel_err(out, oracle) < 1e-5


@pytest.mark.parametrize(
    "shapes, dtype, message, error",
    [
        (
            ((1, 8, 2, 16), (1, 8, 2, 16), (1, 8, 2, 8)),
            jnp.float32,
            "k and v shapes differ",
            ValueError,
        ),
        (((1, 8, 2, 16), (1, 9, 2, 16), (1, 9, 2, 16)), jnp.float32, "q_len == kv_len", ValueError),
        (
            ((1, 8, 3, 16), (1, 8, 2, 16), (1, 8, 2, 16)),
            jnp.float32,
            "must divide query heads",
            ValueError,
        ),
        (
            ((1, 8, 2), (1, 8, 2), (1, 8, 2)),
            jnp.float32,
            "must be \\[batch, seq, heads, head_dim\\]",
            ValueError,
        ),
        (((1, 0, 2, 16), (1, 0, 2, 16), (1, 0, 2, 16)), jnp.float32, "empty sequence", ValueError),
        (((1, 8, 2, 16),) * 3, jnp.int32, "expected float32, bfloat16 or float16", TypeError),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, dtype, message, error):
    q, k, v = (jnp.ones(s, dtype) for s in shapes)
    with pytest.raises(error, match=message):
        sparse_attention(q, k, v, patterns=P.VerticalSlash(30, 50))


def test_other_bad_arguments():
    q = jnp.ones((1, 8, 2, 16))
    with pytest.raises(TypeError, match="dtypes differ"):
        sparse_attention(q, q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), patterns=P.Dense())
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        sparse_attention(q, q, q, patterns=P.Dense(), implementation="cuda")
    with pytest.raises(ValueError, match="1 per-head patterns for 2 query heads"):
        sparse_attention(q, q, q, patterns=[P.Dense()])
    index = build_sparse_index(q, q, P.Dense())
    with pytest.raises(ValueError, match="index is for seq 8"):
        sparse_attention(
            jnp.ones((1, 9, 2, 16)),
            jnp.ones((1, 9, 2, 16)),
            jnp.ones((1, 9, 2, 16)),
            patterns=P.Dense(),
            index=index,
        )


def test_estimated_index_is_jittable_without_recompiling_for_new_data():
    pattern = (P.VerticalSlash(30, 60), P.BlockSparse(2))
    fn = jax.jit(lambda q, k, v: sparse_attention(q, k, v, patterns=pattern))
    q, k, v = random_qkv(5, 1, 130, 2, 1, 16, jnp.float32)
    fn(q, k, v)
    q2, k2, v2 = random_qkv(6, 1, 130, 2, 1, 16, jnp.float32)
    out = fn(q2, k2, v2)
    assert fn._cache_size() == 1
    assert not np.isnan(np.asarray(out)).any()


@pytest.mark.parametrize("n_local, dense_expected", [(32, False), (700, True)])
def test_density_guard_runs_dense_only_for_dense_indices(n_local, dense_expected):
    from minference_jax.attention import _sparse_or_dense, dense_fallback_fraction

    n = 1024
    q, k, v = random_qkv(2, 1, n, 2, 1, 16, jnp.float32)
    index = build_sparse_index(q, k, P.AShape(16, n_local), block_q=32, block_kv=32)
    limit = dense_fallback_fraction(n, "pallas")
    assert (float(index.computed_fraction()) > limit) == dense_expected
    out = _sparse_or_dense(q, k, v, index, 16**-0.5, interpret=True)
    dense = masked_attention_f64(q, k, v, np.tril(np.ones((n, n), bool)))
    sparse = masked_attention_f64(q, k, v, np.asarray(dense_mask_from_index(index)))
    assert rel_err(sparse, dense) > 1e-3  # the two answers differ, so the branch is observable
    assert rel_err(out, dense if dense_expected else sparse) < 1e-5


@pytest.mark.gpu
def test_auto_dispatch_on_gpu_long_prompt():
    q, k, v = random_qkv(3, 1, 40000, 4, 2, 64, jnp.bfloat16)
    out = sparse_attention(q, k, v, patterns=P.AShape(64, 1024))
    # The same index on the XLA path: A-shape windows are whole blocks of the kernel's size.
    block_q, block_kv = default_blocks(P.AShape(64, 1024), None, q.dtype, q.shape[-1])
    ref = sparse_attention(
        q,
        k,
        v,
        patterns=P.AShape(64, 1024),
        implementation="xla",
        block_q=block_q,
        block_kv=block_kv,
    )
    assert rel_err(out, ref) < 1e-2


def test_shared_widths_keep_every_index_and_compile_fewer_programs():
    from minference_jax import attention
    from minference_jax.index_approx import build_planned_index

    layers = [
        (P.VerticalSlash(30, 60), P.VerticalSlash(100, 200)),
        (P.VerticalSlash(300, 500), P.VerticalSlash(30, 60)),
        (P.VerticalSlash(30, 60), P.BlockSparse(3)),
        None,  # a dense layer: no plan
    ]
    planned = [attention.layer_plan(p or P.Dense(), 500, 2, None) for p in layers]
    shared = attention.share_plan_widths([plan for plan, _ in planned])
    assert shared[3] is None and shared[0] == shared[1] != shared[2]  # 2 programs, not 3
    assert shared[0].max_slash == max(planned[0][0].max_slash, planned[1][0].max_slash)
    assert shared[2] == planned[2][0]  # alone in its family mix: unchanged
    q, k, _ = random_qkv(9, 1, 500, 2, 1, 16, jnp.float32)
    for (plan, budgets), wide in zip(planned[:2], shared[:2], strict=True):
        own = build_planned_index(q, k, budgets, plan=plan, scale=0.25)
        padded = build_planned_index(q, k, budgets, plan=wide, scale=0.25)
        np.testing.assert_array_equal(dense_mask_from_index(own), dense_mask_from_index(padded))


def test_layer_backend_names_what_ran(monkeypatch):
    from minference_jax import attention

    plan = lambda block_q: SimpleNamespace(block_q=block_q, block_kv=64)  # noqa: E731
    bf16, n = jnp.bfloat16, 4 * attention.DENSE_CROSSOVER_TOKENS
    assert attention.layer_backend(None, None, bf16, 128, n, 1.0) == "xla-dense"  # CPU
    assert attention.layer_backend(plan(64), None, bf16, 128, n, 0.2) == "xla"
    assert attention.layer_backend(plan(64), "pallas", bf16, 128, n, 0.2) == "triton"
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    monkeypatch.setattr(attention, "_hopper", lambda: True)
    assert attention.layer_backend(None, None, bf16, 128, n, 1.0) == "cudnn"
    assert attention.layer_backend(None, None, jnp.float32, 128, n, 1.0) == "xla-dense"
    assert attention.layer_backend(plan(128), None, bf16, 128, 2048, 0.2) == "cudnn"  # short
    assert attention.layer_backend(plan(128), None, bf16, 128, n, 0.2) == "mosaic"
    assert attention.layer_backend(plan(64), None, bf16, 128, n, 0.2) == "triton"
    assert attention.layer_backend(plan(128), None, jnp.float32, 128, n, 0.2) == "triton"
    assert attention.layer_backend(plan(128), None, bf16, 128, n, 1.0) == "cudnn"  # fell back
    assert attention.layer_backend(plan(128), "xla", bf16, 128, n, 0.2) == "xla"


def test_short_gpu_prompts_skip_index_planning(monkeypatch):
    """On GPU, prompts up to DENSE_CROSSOVER_TOKENS get no plan: the same dense program as
    Dense() layers (no per-layer host planning, no index estimation); longer ones are planned."""
    from minference_jax import attention

    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    vs = P.VerticalSlash(1000, 6096)
    n = attention.DENSE_CROSSOVER_TOKENS
    assert attention.layer_plan(vs, n, 4, None) == (None, None)
    plan, budgets = attention.layer_plan(vs, n + 1, 4, None)
    assert plan is not None and budgets["is_vs"].tolist() == [1, 1, 1, 1]
    plan, _ = attention.layer_plan(vs, 128, 4, "pallas")  # an explicit backend is obeyed
    assert plan is not None
    monkeypatch.setattr(attention, "_on_gpu", lambda: False)
    assert attention.layer_plan(vs, 128, 4, None)[0] is not None  # CPU: the XLA sparse path


@pytest.mark.parametrize(
    "batch, n, heads, kv_heads, lengths",
    [
        (1, 333, 4, 2, None),
        (2, 300, 4, 1, ((300, 170), (300, 170))),
        (2, 129, 2, 2, ((0, 5), (0, 5))),
    ],
)
def test_dense_path_in_query_slices_equals_dense_attention(
    monkeypatch, batch, n, heads, kv_heads, lengths
):
    """Past DENSE_SCORES_BYTES the CPU dense path slices the queries (each slice against the
    keys up to its last row); it must equal the whole-matrix attention, padding included."""
    from minference_jax import attention
    from minference_jax.sparse_index import SeqLengths

    q, k, v = random_qkv(n + batch, batch, n, heads, kv_heads, 32, jnp.float32)
    seq = None
    mask = np.tril(np.ones((n, n), bool))[None, None].repeat(batch, 0).repeat(heads, 1)
    if lengths is not None:
        seq = SeqLengths(*(jnp.asarray(x, jnp.int32) for x in lengths))  # (queries, keys)
        keys = np.arange(n)[None, :] < np.asarray(seq.keys)[:, None]  # [B, N]
        mask = mask & keys[:, None, None, :]
    whole = attention._dense_causal(q, k, v, 32**-0.5, seq)
    monkeypatch.setattr(attention, "DENSE_SCORES_BYTES", 4 * batch * heads * n * 128)
    assert attention.dense_query_rows(q.shape) == 128 < n  # 2 or 3 slices, the last ragged
    sliced = attention._dense_causal(q, k, v, 32**-0.5, seq)
    with np.errstate(invalid="ignore"):  # rows without keys: NaN in the oracle, zeroed below
        want = masked_attention_f64(q, k, v, mask, 32**-0.5)
    if seq is not None:  # padding rows and rows without keys are zero on every path
        rows = (np.arange(n)[None, :] < np.asarray(seq.queries)[:, None]) & (
            np.asarray(seq.keys)[:, None] > 0
        )
        want = np.where(rows[:, :, None, None], np.nan_to_num(want), 0)
    assert rel_err(sliced, want) < 1e-5 and rel_err(whole, want) < 1e-5
    np.testing.assert_allclose(sliced, whole, atol=2e-6)
