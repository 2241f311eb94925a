"""`sparse_attention` shaped like `jax.nn.dot_product_attention`: padded batches through the
sequence lengths on every implementation, the estimate reading each sequence's own rows, the
bias / mask / is_causal / lengths arguments, the deprecated spellings, and the NNX adapter's mask.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minference_jax import (
    AShape,
    BlockSparse,
    Dense,
    VerticalSlash,
    build_sparse_index,
    dense_mask_from_index,
    nnx_attention_fn,
    sparse_attention,
)
from minference_jax import patterns as P
from tests.oracles import masked_attention_f64, random_qkv, rel_err

BATCH, N, HEADS, KV_HEADS, DIM = 3, 150, 4, 2, 32  # N is not a multiple of any block size
QUERY_LENGTHS = (150, 97, 40)
LENGTHS = {
    "equal": (QUERY_LENGTHS, QUERY_LENGTHS),
    "kv shorter and longer": (QUERY_LENGTHS, (120, 97, 70)),  # row 0: keys stop before queries
}
COVERING = [Dense(), VerticalSlash(5000, 5000), AShape(1000, 1000), BlockSparse(1000)]
CPU_IMPLEMENTATIONS = [None, "xla", "reference", "pallas"]


def padded_qkv(seed, query_lengths, dtype=jnp.float32, batch=BATCH, n=N, heads=HEADS, dim=DIM):
    """Random q, k, v whose padding (rows at or past each query length) is large and unrelated
    to the sequence, so that any padding that leaks into a result shows."""
    q, k, v = random_qkv(seed, batch, n, heads, KV_HEADS, dim, jnp.float32)
    noise = random_qkv(seed + 1, batch, n, heads, KV_HEADS, dim, jnp.float32)
    real = jnp.arange(n)[None, :, None, None] < jnp.asarray(query_lengths)[:, None, None, None]
    return [
        jnp.where(real, x, 30 * x_noise).astype(dtype)
        for x, x_noise in zip((q, k, v), noise, strict=True)
    ]


def lengths_of(values):
    return jnp.asarray(values, jnp.int32)


def jax_nn_padded(q, k, v, query_lengths, kv_lengths, scale=None):
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        scale=scale,
        query_seq_lengths=lengths_of(query_lengths),
        key_value_seq_lengths=lengths_of(kv_lengths),
    )


def assert_padding_rows_are_zero(out, query_lengths):
    out = np.asarray(out, np.float32)
    assert not np.isnan(out).any()
    for b, length in enumerate(query_lengths):
        assert (out[b, length:] == 0).all(), f"sequence {b}: rows past {length} not zero"


# --- the padded batch equals jax.nn.dot_product_attention's ---------------------------------


@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("pattern", COVERING, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS, ids=str)
def test_padded_batch_equals_jax_nn(implementation, pattern, lengths):
    query_lengths, kv_lengths = lengths
    q, k, v = padded_qkv(7, query_lengths)
    scale = 0.3
    expected = jax_nn_padded(q, k, v, query_lengths, kv_lengths, scale=scale)
    out = sparse_attention(
        q,
        k,
        v,
        patterns=pattern,
        scale=scale,
        query_seq_lengths=lengths_of(query_lengths),
        key_value_seq_lengths=lengths_of(kv_lengths),
        implementation=implementation,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_padding_rows_are_zero(out, query_lengths)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)


def test_mosaic_interpreter_padded_batch_equals_jax_nn():
    """The Mosaic GPU kernel (its interpreter on CPU): bf16, head_dim 64, 128 x 64 tiles, a
    sequence whose keys stop before its queries."""
    query_lengths, kv_lengths = (300, 200), (150, 200)
    q, k, v = padded_qkv(11, query_lengths, jnp.bfloat16, batch=2, n=300, heads=2, dim=64)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = jax_nn_padded(*f32, query_lengths, kv_lengths)
    out = sparse_attention(
        q,
        k,
        v,
        patterns=Dense(),
        query_seq_lengths=lengths_of(query_lengths),
        key_value_seq_lengths=lengths_of(kv_lengths),
        implementation="mosaic",
        block_q=128,
        block_kv=64,
    )
    assert_padding_rows_are_zero(out, query_lengths)
    assert rel_err(out, expected) < 1e-2


def test_mosaic_kernel_with_lengths_lowers_for_cuda_without_a_gpu():
    """The key-length masks' layouts pass the Mosaic GPU lowering (checked on CPU, no compile)."""
    from minference_jax.sparse_index import SeqLengths
    from pallas_kernels.sparse_flash_mgpu import sparse_flash_attention_mgpu

    q, k, v = random_qkv(0, 2, 256, 2, 1, 64, jnp.bfloat16)
    index = build_sparse_index(q, k, VerticalSlash(16, 64), block_q=128, block_kv=64)
    lengths = SeqLengths(lengths_of((256, 100)), lengths_of((200, 50)))
    run = jax.jit(lambda *a: sparse_flash_attention_mgpu(*a[:4], lengths=a[4]))
    run.trace(q, k, v, index, lengths).lower(lowering_platforms=("cuda",))


def test_lengths_that_pad_nothing_give_the_unpadded_result():
    q, k, v = random_qkv(3, BATCH, N, HEADS, KV_HEADS, DIM, jnp.float32)
    full = lengths_of([N] * BATCH)
    plain = sparse_attention(q, k, v, patterns=VerticalSlash(30, 50))
    padded = sparse_attention(
        q, k, v, patterns=VerticalSlash(30, 50), query_seq_lengths=full, key_value_seq_lengths=full
    )
    np.testing.assert_array_equal(padded, plain)


def test_traced_lengths_match_concrete_ones_without_recompiling():
    query_lengths, kv_lengths = LENGTHS["kv shorter and longer"]
    q, k, v = padded_qkv(5, query_lengths)
    pattern = (VerticalSlash(30, 50), AShape(16, 40)) * 2

    def attend(q, k, v, query_lengths, kv_lengths):
        return sparse_attention(
            q,
            k,
            v,
            patterns=pattern,
            query_seq_lengths=query_lengths,
            key_value_seq_lengths=kv_lengths,
            implementation="xla",
        )

    jitted = jax.jit(attend)
    concrete = attend(q, k, v, lengths_of(query_lengths), lengths_of(kv_lengths))
    traced = jitted(q, k, v, lengths_of(query_lengths), lengths_of(kv_lengths))
    np.testing.assert_allclose(traced, concrete, atol=1e-6)
    jitted(q, k, v, lengths_of((150, 150, 150)), lengths_of((1, 150, 149)))
    assert jitted._cache_size() == 1
    # Traced lengths cannot be checked: they are clipped to [0, N].
    clipped = jitted(q, k, v, lengths_of((999, 97, 40)), lengths_of((120, 97, 70)))
    np.testing.assert_allclose(clipped, concrete, atol=1e-6)


# --- sparse patterns under padding: the masked oracle, rows left without keys ----------------


def padded_oracle(q, k, v, index, query_lengths, kv_lengths):
    """float64 attention under the index's mask, keys past the key length dropped; padding rows
    and rows left without a key are zero (numpy, independent of the library's padding code)."""
    mask = np.array(dense_mask_from_index(index))
    keys = np.arange(q.shape[1])
    for b, (q_len, kv_len) in enumerate(zip(query_lengths, kv_lengths, strict=True)):
        mask[b, :, :, kv_len:] = False
        mask[b, :, q_len:, :] = False
    kept = mask.any(axis=-1)  # [B, H, N]
    mask[~kept] = keys[None, :] == 0  # any key: the row is zeroed below
    out = masked_attention_f64(q, k, v, mask)
    return np.where(np.moveaxis(kept, 1, 2)[..., None], out, 0.0)


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_sparse_patterns_honour_lengths_and_empty_rows_are_zero(implementation):
    """AShape(0, 16) keeps no sink: the rows of sequence 1 past its few keys see none of them."""
    query_lengths, kv_lengths = (150, 140, 60), (150, 5, 60)
    q, k, v = padded_qkv(9, query_lengths)
    pattern = (AShape(0, 16), VerticalSlash(30, 40), BlockSparse(2, 32), AShape(8, 20))
    options = dict(
        query_seq_lengths=lengths_of(query_lengths), key_value_seq_lengths=lengths_of(kv_lengths)
    )
    index = build_sparse_index(q, k, pattern, block_q=32, block_kv=32, **options)
    out = sparse_attention(
        q, k, v, patterns=pattern, index=index, implementation=implementation, **options
    )
    expected = padded_oracle(q, k, v, index, query_lengths, kv_lengths)
    assert_padding_rows_are_zero(out, query_lengths)
    empty = np.abs(expected[1, 5:140]).sum(-1) == 0  # [rows, heads] without a key
    assert empty.any() and not empty.all()  # the case is there, and not everywhere
    assert rel_err(out, expected) < 1e-5


# --- the estimate reads each sequence's own rows and keys -------------------------------------

ESTIMATED = [
    VerticalSlash(40, 60),
    BlockSparse(3),
    P.AdaptiveVerticalSlash(threshold=0.5, max_vertical=64, max_slash=64),
    P.AdaptiveVerticalSlash(threshold=0.5, max_vertical=64, max_slash=64, query_aware=0.6),
    P.AntiDiagonalBlockSparse(threshold=0.6, stride=8, max_blocks=8),
    # 0.2: a threshold at which reading the padding changes some sequence's blocks
    P.SampledBlockSparse(threshold=0.2, rows=4, max_blocks=8),
]


@pytest.mark.parametrize("pattern", ESTIMATED, ids=lambda p: type(p).__name__)
def test_padded_index_is_each_sequences_own(pattern):
    """Each sequence of a padded batch gets the index it gets alone, unpadded (on its own rows
    and keys); ignoring the lengths gives another (so this test can tell)."""
    lengths, n = (300, 231, 190), 300
    q, k, _ = padded_qkv(13, lengths, n=n)
    lengths_array = lengths_of(lengths)
    padded = build_sparse_index(
        q, k, pattern, query_seq_lengths=lengths_array, key_value_seq_lengths=lengths_array
    )
    padded_mask = np.asarray(dense_mask_from_index(padded))
    unaware_mask = np.asarray(dense_mask_from_index(build_sparse_index(q, k, pattern)))
    fooled = 0
    for b, length in enumerate(lengths):
        alone = build_sparse_index(q[b : b + 1, :length], k[b : b + 1, :length], pattern)
        alone_mask = np.asarray(dense_mask_from_index(alone))[0]
        np.testing.assert_array_equal(padded_mask[b, :, :length, :length], alone_mask)
        fooled += not np.array_equal(unaware_mask[b, :, :length, :length], alone_mask)
    assert fooled >= 1


BLOCK_CHOOSING = [
    BlockSparse(3),
    P.AntiDiagonalBlockSparse(threshold=0.6, stride=8, max_blocks=8),
    # query_aware=1: every head takes the switch to key blocks scored from pooled q and k
    P.AdaptiveVerticalSlash(threshold=0.5, max_vertical=64, max_slash=64, query_aware=1.0),
    P.SampledBlockSparse(threshold=0.02, rows=4, max_blocks=8),
]


@pytest.mark.parametrize("pattern", BLOCK_CHOOSING, ids=lambda p: type(p).__name__)
def test_no_key_block_wholly_in_the_padding_is_chosen(pattern):
    """Keys stop before the queries (sequences 0 and 2): the blocks chosen for real query
    blocks all hold a real key."""
    query_lengths, kv_lengths, n = (300, 231, 190), (100, 231, 70), 300
    q, k, _ = padded_qkv(15, query_lengths, n=n)
    index = build_sparse_index(
        q,
        k,
        pattern,
        query_seq_lengths=lengths_of(query_lengths),
        key_value_seq_lengths=lengths_of(kv_lengths),
    )
    listed, count = np.asarray(index.block_index), np.asarray(index.block_count)
    chosen = 0
    for b, (q_len, kv_len) in enumerate(zip(query_lengths, kv_lengths, strict=True)):
        real_blocks = -(-kv_len // index.block_kv)
        for i in range(-(-q_len // index.block_q)):
            for h in range(HEADS):
                blocks = listed[b, h, i, : count[b, h, i]]
                assert (blocks < real_blocks).all(), (b, h, i, blocks, real_blocks)
                chosen += len(blocks)
    assert chosen > 0


def test_vertical_slash_and_query_aware_scores_are_each_sequences_own():
    """The scores behind the selection, not only what it selected: column and diagonal mass of
    each sequence's last 64 rows, and the query-aware distance."""
    from minference_jax.index_approx import query_aware_distance, vertical_slash_scores
    from minference_jax.sparse_index import SeqLengths

    lengths, n = (300, 231, 190), 300
    q, k, _ = padded_qkv(21, lengths, n=n)
    padded = SeqLengths(lengths_of(lengths), lengths_of(lengths))
    options = dict(scale=DIM**-0.5, last_q=64)
    columns, diagonals = vertical_slash_scores(q, k, lengths=padded, **options)
    distance = query_aware_distance(q, k, columns, block_kv=64, lengths=padded, **options)
    unaware = query_aware_distance(
        q, k, vertical_slash_scores(q, k, **options)[0], block_kv=64, **options
    )
    for b, length in enumerate(lengths):
        q1, k1 = q[b : b + 1, :length], k[b : b + 1, :length]
        own_columns, own_diagonals = vertical_slash_scores(q1, k1, **options)
        np.testing.assert_allclose(columns[b, :, :length], own_columns[0], atol=1e-5)
        np.testing.assert_allclose(diagonals[b, :, :length], own_diagonals[0], atol=1e-5)
        assert not np.asarray(columns[b, :, length:]).any()
        assert not np.asarray(diagonals[b, :, length:]).any()
        own = query_aware_distance(q1, k1, own_columns, block_kv=64, **options)
        np.testing.assert_allclose(distance[b], own[0], atol=1e-5)
    assert np.abs(np.asarray(unaware - distance)).max() > 1e-3  # padding would show


def test_pallas_estimator_is_refused_for_a_padded_batch():
    q, k, _ = padded_qkv(1, QUERY_LENGTHS)
    with pytest.raises(ValueError, match="Pallas vertical-slash estimator takes no sequence"):
        build_sparse_index(
            q, k, VerticalSlash(30, 50), estimator="pallas", query_seq_lengths=lengths_of((1, 2, 3))
        )


# --- deprecated spellings ---------------------------------------------------------------------


def test_softmax_scale_warns_and_still_works():
    q, k, v = random_qkv(2, 2, 100, 4, 2, 16, jnp.float32)
    expected = sparse_attention(q, k, v, patterns=VerticalSlash(30, 50), scale=0.2)
    with pytest.warns(DeprecationWarning, match="softmax_scale is deprecated: pass scale="):
        out = sparse_attention(q, k, v, patterns=VerticalSlash(30, 50), softmax_scale=0.2)
    np.testing.assert_array_equal(out, expected)
    other = sparse_attention(q, k, v, patterns=VerticalSlash(30, 50))
    assert rel_err(other, expected) > 1e-3  # the scale is used: the comparison can tell
    with pytest.raises(TypeError, match="give scale only"):
        sparse_attention(q, k, v, patterns=Dense(), scale=0.2, softmax_scale=0.2)


@pytest.mark.parametrize(
    "patterns", [VerticalSlash(30, 50), [AShape(4, 20), VerticalSlash(30, 50)] * 2], ids=str
)
def test_positional_patterns_warn_and_still_work(patterns):
    q, k, v = random_qkv(4, 2, 100, 4, 2, 16, jnp.float32)
    expected = sparse_attention(q, k, v, patterns=patterns)
    with pytest.warns(DeprecationWarning, match="pass patterns=... instead"):
        out = sparse_attention(q, k, v, patterns)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(TypeError, match="patterns given twice"):
        sparse_attention(q, k, v, patterns, patterns=patterns)


def test_current_spelling_does_not_warn():
    q, k, v = random_qkv(4, 2, 100, 4, 2, 16, jnp.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="(passing patterns positionally|softmax_scale)")
        sparse_attention(q, k, v, None, None, patterns=Dense(), scale=0.3, is_causal=True)


# --- bias, mask, is_causal, lengths refused ----------------------------------------------------


def small_qkv(batch=2, n=20):
    return random_qkv(0, batch, n, 4, 2, 16, jnp.float32)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(bias=jnp.zeros((2, 4, 20, 20))), ValueError, "adds no bias: bias must be None"),
        (dict(bias=[]), ValueError, "bias must be None"),
        (dict(is_causal=False), ValueError, "causal prefill only: pass is_causal=True"),
        (dict(is_causal=1), TypeError, "is_causal must be a bool, got int"),
        (
            dict(mask=jnp.ones((20, 20), bool), is_causal=False),
            ValueError,
            "differs at query 0, key 1",
        ),
        (
            dict(mask=jnp.tril(jnp.ones((20, 20), bool)).at[7, 3].set(False)),
            ValueError,
            "query 7, key 3",
        ),
        (dict(mask=jnp.tril(jnp.ones((20, 20)))), TypeError, "mask must be boolean .* float32"),
        (
            dict(mask=jnp.tril(jnp.ones((3, 1, 20, 20), bool))),
            ValueError,
            r"\(3, 1, 20, 20\) does not broadcast",
        ),
        (dict(mask=jnp.tril(jnp.ones((20, 19), bool))), ValueError, "does not broadcast"),
        (
            dict(mask=np.tril(np.ones((20, 20), bool)).tolist()),
            TypeError,
            "mask must be a boolean array, got list",
        ),
        (dict(query_seq_lengths=[20, 20]), TypeError, "query_seq_lengths must be an int32 array"),
        (
            dict(query_seq_lengths=jnp.array([20.0, 5.0])),
            TypeError,
            "must hold integers .* float32",
        ),
        (
            dict(key_value_seq_lengths=jnp.array([True, True])),
            TypeError,
            "must hold integers .* bool",
        ),
        (
            dict(query_seq_lengths=lengths_of([20, 5, 5])),
            ValueError,
            r"shape \(2,\), one length per sequence",
        ),
        (dict(key_value_seq_lengths=lengths_of([[20], [5]])), ValueError, r"got shape \(2, 1\)"),
        (
            dict(query_seq_lengths=lengths_of([20, -1])),
            ValueError,
            r"in \[0, 20\] .* got -1 for sequence 1",
        ),
        (
            dict(key_value_seq_lengths=lengths_of([21, 3])),
            ValueError,
            r"in \[0, 20\] .* got 21 for sequence 0",
        ),
    ],
)
def test_bad_arguments_are_refused_clearly(arguments, error, message):
    q, k, v = small_qkv()
    with pytest.raises(error, match=message):
        sparse_attention(q, k, v, patterns=Dense(), **arguments)


def test_patterns_are_required():
    q, k, v = small_qkv()
    with pytest.raises(TypeError, match="patterns must be a Pattern .* got NoneType"):
        sparse_attention(q, k, v)


def test_a_traced_mask_is_refused():
    q, k, v = small_qkv()
    causal = jnp.tril(jnp.ones((20, 20), bool))
    with pytest.raises(TypeError, match="traced value .* pass is_causal=True and no mask"):
        jax.jit(lambda mask: sparse_attention(q, k, v, mask=mask, patterns=Dense()))(causal)


@pytest.mark.parametrize(
    "mask, is_causal",
    [
        (jnp.tril(jnp.ones((20, 20), bool)), False),
        (np.tril(np.ones((2, 1, 20, 20), bool)), False),
        (jnp.tril(jnp.ones((1, 4, 20, 20), bool)), True),
        (jnp.ones((1, 1, 20, 20), bool), True),  # with is_causal, only key <= query matters
    ],
)
def test_masks_that_leave_it_causal_are_accepted(mask, is_causal):
    q, k, v = small_qkv()
    expected = sparse_attention(q, k, v, patterns=AShape(2, 8), implementation="xla")
    out = sparse_attention(
        q, k, v, None, mask, patterns=AShape(2, 8), is_causal=is_causal, implementation="xla"
    )
    np.testing.assert_array_equal(out, expected)


# --- the NNX adapter's mask ---------------------------------------------------------------------


def nnx_layer(attention_fn):
    return nnx.MultiHeadAttention(
        num_heads=4,
        num_kv_heads=2,
        in_features=32,
        attention_fn=attention_fn,
        decode=False,
        rngs=nnx.Rngs(0),
    )


def test_nnx_causal_mask_is_accepted():
    x = jax.random.normal(jax.random.key(1), (2, 70, 32))
    layer = nnx_layer(nnx_attention_fn(AShape(4, 16), block_q=16, block_kv=16))
    expected = layer(x, is_causal=True)
    tokens = jnp.ones((2, 70), jnp.int32)
    np.testing.assert_array_equal(layer(x, mask=nnx.make_causal_mask(tokens)), expected)
    np.testing.assert_array_equal(
        layer(x, mask=nnx.make_causal_mask(tokens), is_causal=True), expected
    )
    dense = nnx_layer(nnx.dot_product_attention)(x, is_causal=True)
    assert rel_err(expected, dense) > 1e-3  # the sparse pattern ran, not dense attention


def test_nnx_other_masks_are_refused():
    x = jnp.ones((2, 70, 32))
    layer = nnx_layer(nnx_attention_fn(AShape(4, 16)))
    padding = nnx.make_attention_mask(jnp.arange(70)[None] < 50, jnp.arange(70)[None] < 50)
    with pytest.raises(ValueError, match="takes no other mask: .* differs at query 50, key 0"):
        layer(x, mask=nnx.combine_masks(padding, nnx.make_causal_mask(jnp.ones((1, 70)))))
    with pytest.raises(ValueError, match="differs at query 0, key 1"):
        layer(x, mask=jnp.ones((1, 1, 70, 70), bool))  # without is_causal: not causal

    @nnx.jit
    def traced(layer, x):
        return layer(x, mask=nnx.make_causal_mask(jnp.ones((2, 70))))

    with pytest.raises(TypeError, match="traced value"):
        traced(layer, x)


def test_nnx_attention_fn_refuses_unknown_options():
    with pytest.raises(TypeError, match=r"unknown options \['mask'\]"):
        nnx_attention_fn(Dense(), mask=None)


# --- GPU: cuDNN dense and the kernels under padding ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", [None, "pallas", "mosaic"], ids=str)
def test_gpu_padded_batch_equals_jax_nn(implementation):
    query_lengths, kv_lengths = (4096 + 17, 3000, 1000), (4096 + 17, 3000, 700)
    q, k, v = padded_qkv(17, query_lengths, jnp.bfloat16, n=4096 + 17, heads=8, dim=128)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    expected = np.asarray(jax_nn_padded(*f32, query_lengths, kv_lengths))
    out = sparse_attention(
        q,
        k,
        v,
        patterns=Dense(),
        query_seq_lengths=lengths_of(query_lengths),
        key_value_seq_lengths=lengths_of(kv_lengths),
        implementation=implementation,
    )
    assert_padding_rows_are_zero(out, query_lengths)
    assert rel_err(out, expected) < 1e-2
