import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import index_approx, sparse_index
from minference_jax import patterns as P
from minference_jax.index_approx import (
    _top_per_head,
    build_sparse_index,
    estimate_block_sparse,
    estimate_vertical_slash,
)
from minference_jax.sparse_index import (
    SENTINEL,
    SparseIndex,
    dense_mask_from_index,
    gather_columns,
    vertical_slash_index,
)
from pallas_kernels import vs_estimate
from tests.oracles import block_rows_mask, rows_mask

S = SENTINEL


def test_vertical_slash_index_hand_written():
    # N=10, blocks of 2: slash 0 -> d {0}; slash 5 -> keys 5 before the block: d {2, 3}.
    index = vertical_slash_index(
        jnp.array([[[7, 1]]]), jnp.array([[[5, 0]]]), seq_len=10, block_q=2, block_kv=2
    )
    np.testing.assert_array_equal(index.diag_offset[0, 0], [0, 2, 3, S, S])
    np.testing.assert_array_equal(index.diag_count[0, 0], [1, 1, 2, 3, 3])
    np.testing.assert_array_equal(index.column_index[0, 0], [1, 7])
    # Local run of D is {0}: block i counts columns < 2i; column 1 is covered for blocks 2, 3.
    np.testing.assert_array_equal(index.column_count[0, 0], [0, 1, 1, 1, 2])
    expected_rows = np.array(
        [
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # column 1 + own block
            [1, 1, 0, 0, 1, 1, 0, 0, 0, 0],  # slash 5 -> blocks 0 (d=2) + own
            [1, 1, 1, 1, 0, 0, 1, 1, 0, 0],  # d=2 -> block 1, d=3 -> block 0 (covers column 1)
            [0, 1, 1, 1, 1, 1, 0, 1, 1, 1],  # blocks 1, 2 + columns 1, 7 + own
        ],
        bool,
    )
    mask = np.asarray(dense_mask_from_index(index))[0, 0]
    np.testing.assert_array_equal(mask, rows_mask(expected_rows, 2, 10))


@pytest.mark.parametrize("n", [10, 97, 200, 333])
@pytest.mark.parametrize("block_q, block_kv", [(64, 64), (16, 16), (32, 16), (64, 16)])
def test_vertical_slash_index_matches_brute_force(n, block_q, block_kv):
    rng = np.random.default_rng(n * 1000 + block_q + block_kv)
    batch, heads = 2, 3
    verticals = rng.integers(0, n + 20, size=(batch, heads, 12))  # includes out-of-range + repeats
    slashes = rng.integers(0, n + 20, size=(batch, heads, 9))
    slashes[..., 0] = SENTINEL  # padding entry
    index = vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )
    mask = np.asarray(dense_mask_from_index(index))
    for b in range(batch):
        for h in range(heads):
            rows = block_rows_mask(
                n,
                block_q,
                block_kv,
                slashes=[o for o in slashes[b, h] if o < n],
                verticals=[j for j in verticals[b, h] if j < n],
            )
            np.testing.assert_array_equal(
                mask[b, h], rows_mask(rows, block_q, n), err_msg=f"{b=} {h=}"
            )
    assert mask.sum(-1).min() >= 1
    # Columns are never counted twice: counted columns are unique and outside D's local run.
    counted = np.asarray(index.column_count)
    cols = np.asarray(index.column_index)
    for b in range(batch):
        for h in range(heads):
            assert len(set(cols[b, h, : counted[b, h].max()])) == counted[b, h].max()


def _static_pattern_mask(pattern, n, block):
    """Brute-force block-row mask of an A-shape / block-sparse-free static pattern."""
    if isinstance(pattern, P.AShape):
        n_init, n_local = min(pattern.n_init, n), min(pattern.n_local, n)
        return block_rows_mask(n, block, block, slashes=range(n_local), verticals=range(n_init))
    if isinstance(pattern, P.Dense):
        return np.ones((-(-n // block), n), bool)
    raise TypeError(pattern)


@pytest.mark.parametrize("n", [50, 97, 300])
@pytest.mark.parametrize(
    "pattern",
    [
        P.AShape(4, 16),
        P.AShape(70, 100),
        P.AShape(0, 1),
        P.AShape(64, 0),
        P.AShape(5000, 5000),
        P.Dense(),
    ],
)
def test_static_patterns_match_brute_force(n, pattern):
    block = 16
    q = jnp.zeros((1, n, 2, 8))
    index = build_sparse_index(q, q[:, :, :1], pattern, block_q=block, block_kv=block)
    mask = np.asarray(dense_mask_from_index(index))
    expected = rows_mask(_static_pattern_mask(pattern, n, block), block, n)
    for h in range(2):
        np.testing.assert_array_equal(mask[0, h], expected)


def _random_qk(seed, batch, n, heads, kv_heads, dim):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(kq, (batch, n, heads, dim), jnp.float32),
        jax.random.normal(kk, (batch, n, kv_heads, dim), jnp.float32),
    )


def _vs_scores_numpy(q, k, last_q=64):
    """Brute-force column and diagonal scores of the last queries (float64, per q head)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, n, heads, dim = q.shape
    k = np.repeat(k, heads // k.shape[2], axis=2)
    rows = min(last_q, n)
    logits = np.einsum("brhd,bnhd->bhrn", q[:, n - rows :], k) / np.sqrt(dim)
    for r in range(rows):
        logits[:, :, r, n - rows + r + 1 :] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    columns = p.sum(-2)
    diagonals = np.zeros((batch, heads, n))
    for r in range(rows):
        for j in range(n - rows + r + 1):
            diagonals[:, :, n - rows + r - j] += p[:, :, r, j]
    return columns, diagonals


@pytest.mark.parametrize("estimator", ["xla", "pallas"])
@pytest.mark.parametrize("n, heads, kv_heads", [(150, 4, 2), (333, 4, 4), (80, 2, 1)])
def test_vertical_slash_estimation_matches_brute_force(n, heads, kv_heads, estimator):
    q, k = _random_qk(n, 2, n, heads, kv_heads, 16)
    budgets = [(40, 100), (35, 120), (60, 130), (31, 100)][:heads]
    verticals, slashes = estimate_vertical_slash(q, k, budgets, scale=16**-0.5, estimator=estimator)
    columns, diagonals = _vs_scores_numpy(q, k)
    columns[..., :30] = np.inf
    diagonals[..., :100] = np.inf
    for b in range(2):
        for h, (nv, ns) in enumerate(budgets):
            nv, ns = min(nv, n), min(ns, n)
            want_v = set(np.argsort(-columns[b, h], kind="stable")[:nv])
            want_s = set(np.argsort(-diagonals[b, h], kind="stable")[:ns])
            got_v = np.asarray(verticals[b, h])
            got_s = np.asarray(slashes[b, h])
            assert set(got_v[got_v < SENTINEL]) == want_v
            assert set(got_s[got_s < SENTINEL]) == want_s
            for got in (got_v, got_s):
                real = got[got < SENTINEL]
                assert np.all(np.diff(real) > 0) and np.all(got[len(real) :] == SENTINEL)


@pytest.mark.parametrize(
    "batch, n, heads, kv_heads, dim, block_k, dtype, tol",
    [
        (2, 200, 4, 2, 16, 64, jnp.float32, 1e-5),  # N not a multiple of the tile, GQA, B > 1
        (1, 64, 3, 1, 32, 128, jnp.float32, 1e-5),  # one partial tile, group of 3
        (1, 333, 2, 2, 64, 16, jnp.bfloat16, 2e-2),  # bf16 logits and bf16 skew buffer
    ],
)
def test_vs_scores_kernel_matches_brute_force(batch, n, heads, kv_heads, dim, block_k, dtype, tol):
    q, k = _random_qk(n + dim, batch, n, heads, kv_heads, dim)
    q, k = q.astype(dtype), k.astype(dtype)
    columns, diagonals = vs_estimate.vertical_slash_scores(
        q[:, -64:],
        k,
        scale=dim**-0.5,
        block_k=block_k,
        interpret=True,
    )
    want_columns, want_diagonals = _vs_scores_numpy(q, k)
    # Each head's scores sum to the 64 rows' total mass: errors are relative to 1 per entry.
    np.testing.assert_allclose(np.asarray(columns), want_columns, atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(diagonals), want_diagonals, atol=tol, rtol=tol)


def test_vs_scores_kernel_rejects_unsupported_shapes():
    q, k = _random_qk(0, 1, 100, 2, 1, 24)
    with pytest.raises(ValueError, match="head_dim 24"):
        vs_estimate.vertical_slash_scores(q[:, -64:], k, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_vertical_slash(q, k, [(30, 50)] * 2, scale=1.0, estimator="triton")


@pytest.mark.parametrize("ties", [False, True])
def test_top_per_head_equals_lax_top_k(ties):
    rng = np.random.default_rng(int(ties))
    for _ in range(4):  # each new (n, k_max) compiles: 4 draws, 8 over both cases
        n = int(rng.integers(1, 300))
        scores = rng.random((2, 3, n)).astype(np.float32)
        if ties:  # many equal values, zeros and forced +inf entries
            scores = np.round(scores * 4) / 4
            scores[..., : min(n, 5)] = np.inf
        k_max = int(rng.integers(1, n + 1))
        budgets = rng.integers(0, k_max + 1, 3)
        got = np.asarray(_top_per_head(jnp.asarray(scores), jnp.asarray(budgets), k_max))
        _, best = jax.lax.top_k(jnp.asarray(scores), k_max)  # ties: lower index first
        for b in range(2):
            for h in range(3):
                want = np.sort(np.asarray(best[b, h, : budgets[h]]))
                np.testing.assert_array_equal(got[b, h, : budgets[h]], want)
                assert np.all(got[b, h, budgets[h] :] == SENTINEL)


@pytest.mark.parametrize("estimator", ["xla", "pallas"])
def test_estimation_one_kv_head_at_a_time_is_the_same(monkeypatch, estimator):
    """Above the memory bound (1M tokens) the scores are built per kv head: same result."""
    q, k = _random_qk(11, 2, 190, 6, 3, 16)
    budgets = [(40, 60), (31, 50), (50, 70), (35, 55), (45, 65), (30, 50)]
    estimate = functools.partial(
        estimate_vertical_slash, q, k, budgets, scale=0.25, estimator=estimator
    )
    whole = estimate()
    monkeypatch.setattr(index_approx, "_SCORE_BYTES_PER_STEP", 1)
    monkeypatch.setattr(index_approx, "_SKEW_BYTES_PER_STEP", 1)
    for got, want in zip(estimate(), whole, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_small_slash_budget_picks_only_forced_local_offsets():
    q, k = _random_qk(3, 1, 400, 2, 2, 16)
    _, slashes = estimate_vertical_slash(q, k, [(30, 50), (30, 50)], scale=0.25)
    got = np.asarray(slashes)
    assert np.all(got < 100) and got.shape[-1] == 50


@pytest.mark.parametrize("n, block", [(200, 16), (97, 32), (256, 64)])
def test_block_sparse_estimation_matches_brute_force(n, block):
    heads, kv_heads, dim = 4, 2, 8
    q, k = _random_qk(7 + n, 2, n, heads, kv_heads, dim)
    top_k = [3, 5, 1, 100]
    chosen = np.asarray(
        estimate_block_sparse(q, k, top_k, scale=0.3, block_q=block, block_kv=block)
    )
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    nb = -(-n // block)
    pq = np.stack([qn[:, i * block : (i + 1) * block].mean(1) for i in range(nb)], 1)
    pk = np.stack([kn[:, i * block : (i + 1) * block].mean(1) for i in range(nb)], 1)
    pk = np.repeat(pk, heads // kv_heads, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", pq, pk)
    for b in range(2):
        for h in range(heads):
            for i in range(nb):
                want = set(np.argsort(-scores[b, h, i, :i], kind="stable")[: top_k[h] - 1])
                got = chosen[b, h, i]
                assert set(got[got < SENTINEL]) == want, (b, h, i)


def test_mixed_layer_index_rows_never_empty_and_budget_sized():
    n, heads = 333, 8
    q, k = _random_qk(11, 2, n, heads, 2, 16)
    layer = (
        P.VerticalSlash(40, 60),
        P.AShape(100, 64),
        P.BlockSparse(3),
        P.Dense(),
        P.VerticalSlash(3000, 3000),
        P.AShape(0, 0),
        P.BlockSparse(1000),
        P.VerticalSlash(1, 1),
    )
    index = jax.jit(lambda q, k: build_sparse_index(q, k, layer))(q, k)
    mask = np.asarray(dense_mask_from_index(index))
    assert mask.sum(-1).min() >= 1
    np.testing.assert_array_equal(
        mask[:, 3], np.broadcast_to(np.tril(np.ones((n, n), bool)), (2, n, n))
    )
    # Buffers follow the budgets (clamped to N), not N^2.
    assert index.column_index.shape[-1] <= n + 100
    assert index.block_index.shape[-1] <= -(-n // 64)


def test_block_sparse_block_size_must_match():
    q = jnp.zeros((1, 64, 1, 8))
    with pytest.raises(ValueError, match="block_size=32 must equal block_kv=64"):
        build_sparse_index(q, q, P.BlockSparse(2, block_size=32))
    with pytest.raises(ValueError, match="multiple of block_kv"):
        build_sparse_index(q, q, P.Dense(), block_q=48, block_kv=32)


def test_layers_differing_only_in_budgets_share_one_plan():
    """Budgets are traced data: a searched config's layers compile once per bucketed width."""
    from minference_jax.index_approx import plan_index

    n, heads = 100_000, 4
    a, budgets_a = plan_index([P.VerticalSlash(1000, 6096), P.VerticalSlash(30, 800)] * 2, n, heads)
    b, budgets_b = plan_index([P.VerticalSlash(700, 5000), P.VerticalSlash(100, 100)] * 2, n, heads)
    assert a == b and hash(a) == hash(b)
    assert list(budgets_a["n_vertical"]) == [1000, 30, 1000, 30]
    assert list(budgets_b["n_slash"]) == [5000, 100, 5000, 100]
    c, _ = plan_index(P.VerticalSlash(3500, 100), n, heads)
    assert c.max_vertical == 4096 and c != a


def test_computed_fraction_of_a_dense_million_token_index():
    """32 heads x 1M tokens hold 4.3e9 causal 64x64 tiles: more than int32 counts."""
    heads, n_q_blocks = 32, (1 << 20) // 64
    counts = jnp.broadcast_to(
        jnp.arange(1, n_q_blocks + 1, dtype=jnp.int32), (1, heads, n_q_blocks)
    )
    zeros = jnp.zeros_like(counts)
    index = SparseIndex(
        diag_offset=jnp.zeros((1, heads, 1), jnp.int32),
        diag_count=counts,
        diag_mask=jnp.ones((1, heads, n_q_blocks), bool),
        block_index=jnp.zeros((1, heads, n_q_blocks, 0), jnp.int32),
        block_count=zeros,
        column_index=jnp.zeros((1, heads, 0), jnp.int32),
        column_count=zeros,
        seq_len=1 << 20,
        block_q=64,
        block_kv=64,
    )
    assert index.causal_tiles * heads > 2**32
    assert abs(float(index.computed_fraction()) - 1.0) < 1e-6
    half = dataclasses.replace(index, diag_count=(counts + 1) // 2)
    assert abs(float(half.computed_fraction()) - 0.5) < 1e-3


def test_default_estimator_choice():
    choose = index_approx.default_estimator
    assert choose(jnp.bfloat16, 131072, 64, 128, on_gpu=True) == "pallas"
    assert choose(jnp.float16, 1000, 64, 64, on_gpu=True) == "pallas"
    assert choose(jnp.float32, 131072, 64, 128, on_gpu=True) == "xla"  # slow f32 kernel build
    assert choose(jnp.bfloat16, 131072, 64, 96, on_gpu=True) == "xla"  # head_dim not pow2
    assert choose(jnp.bfloat16, 131072, 64, 128, on_gpu=False) == "xla"


def _token_mask_of_selection(n, block_q, block_kv, verticals, slashes):
    """[n, n] causal mask the selected key columns and slash offsets imply, in absolute key
    blocks (independent of the index's relative-offset form): vectorised `block_rows_mask`."""
    n_q_blocks = -(-n // block_q)
    n_kv_blocks = n_q_blocks * block_q // block_kv
    first = np.arange(n_q_blocks)[:, None] * block_q - np.asarray(slashes)[None, :]  # [nqb, S]
    last = first + block_q - 1
    reach = last >= 0
    lo = np.where(reach, np.maximum(first, 0) // block_kv, n_kv_blocks)
    hi = np.where(reach, last // block_kv + 1, n_kv_blocks)
    starts = np.zeros((n_q_blocks, n_kv_blocks + 1), int)
    rows = np.broadcast_to(np.arange(n_q_blocks)[:, None], lo.shape)
    np.add.at(starts, (rows, lo), 1)
    np.add.at(starts, (rows, hi), -1)
    blocks = np.cumsum(starts, axis=-1)[:, :n_kv_blocks] > 0
    blocks |= np.repeat(np.eye(n_q_blocks, dtype=bool), block_q // block_kv, axis=1)  # own
    keys = np.repeat(blocks, block_kv, axis=1)[:, :n]
    keys[:, np.asarray(verticals)] = True
    return rows_mask(keys, block_q, n)


def test_vertical_slash_index_keeps_every_selected_slash_when_block_q_is_twice_block_kv():
    """Spread slashes each touch ratio + 1 = 3 relative key-block offsets (odd offsets with
    block_kv 2), so the diagonal set outgrows `ratio * max_slash + ratio` entries: the index must
    still hold every one. Checked against the mask the selected columns/offsets imply."""
    block_q, block_kv, ratio = 4, 2, 2
    n_vertical, n_slash = 64, 512
    # Offsets 0..99 are always selected (slots 0..51); the 412 other slashes are planted at odd
    # offsets whose 3-slot bands are disjoint, with one free slot between neighbours.
    planted = 2 * (52 + 4 * np.arange(n_slash - P.N_LOCAL_SLASHES)) + 1
    n = int(planted.max()) + 42  # 3435: not a multiple of block_q
    # One query row (last_q=1) ranks slash offset o by its attention to key n-1-o: give the
    # planted keys large, distinct logits and the others small random ones.
    rng = np.random.default_rng(19)
    logit = rng.normal(size=n) * 0.1
    logit[n - 1 - planted] = 40 + rng.permutation(len(planted)) * 0.01
    q = np.zeros((1, n, 1, 8), np.float32)
    q[..., 0] = 1.0
    k = np.zeros((1, n, 1, 8), np.float32)
    k[0, :, 0, 0] = logit
    # The selection, from the attention of the one query row (float64 numpy).
    p = np.exp(logit - logit.max())
    column_score = np.where(np.arange(n) < P.N_SINK_COLUMNS, np.inf, p)
    slash_score = np.where(np.arange(n) < P.N_LOCAL_SLASHES, np.inf, p[::-1])  # offset n-1-j
    verticals = np.argsort(-column_score, kind="stable")[:n_vertical]
    slashes = np.argsort(-slash_score, kind="stable")[:n_slash]
    assert set(planted) <= set(slashes)
    slots = set()
    for o in slashes:  # relative key-block offsets each slash's band covers
        slots.update(range(o // block_kv, -(-o // block_kv) + ratio))
    assert len(slots) > n_slash * ratio + ratio  # max_slash == n_slash here

    index = build_sparse_index(
        jnp.asarray(q),
        jnp.asarray(k),
        P.VerticalSlash(n_vertical, n_slash),
        softmax_scale=1.0,
        block_q=block_q,
        block_kv=block_kv,
        last_q=1,
    )
    want = _token_mask_of_selection(n, block_q, block_kv, verticals, slashes)
    np.testing.assert_array_equal(np.asarray(dense_mask_from_index(index))[0, 0], want)


def test_token_mask_of_selection_equals_block_rows_oracle():
    rng = np.random.default_rng(5)
    n, block_q, block_kv = 75, 8, 4
    verticals, slashes = rng.integers(0, n, 6), rng.integers(0, n, 9)
    rows = block_rows_mask(n, block_q, block_kv, slashes=slashes, verticals=verticals)
    np.testing.assert_array_equal(
        _token_mask_of_selection(n, block_q, block_kv, verticals, slashes),
        rows_mask(rows, block_q, n),
    )


def test_capacity_check_raises_instead_of_dropping_offsets(monkeypatch):
    diag_mask = jnp.ones((1, 1, 8), bool)  # 8 offsets, room for 5
    build = functools.partial(
        sparse_index.finalize_index,
        diag_mask,
        jnp.full((1, 1, 4, 0), SENTINEL, jnp.int32),
        jnp.full((1, 1, 0), SENTINEL, jnp.int32),
        max_diag=5,
        seq_len=32,
        block_q=8,
        block_kv=4,
    )
    monkeypatch.setattr(sparse_index, "CHECK_CAPACITY", True)
    with pytest.raises(Exception, match="holds 8 offsets but the index keeps max_diag=5"):
        jax.block_until_ready(jax.jit(lambda: build())())
    monkeypatch.setattr(sparse_index, "CHECK_CAPACITY", False)  # the default: no host callback
    assert int(jax.jit(lambda: build())().diag_count.max()) == 5


def test_gather_columns_reads_each_query_heads_kv_head():
    batch, n, heads, kv_heads, dim, block_kv = 2, 50, 6, 2, 4, 8
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, n, kv_heads, dim)).astype(np.float32)
    columns = np.sort(rng.integers(0, n, size=(batch, heads, 11)), axis=-1).astype(np.int32)
    columns[0, 1, 7:] = SENTINEL
    got = np.asarray(gather_columns(jnp.asarray(x), jnp.asarray(columns), block_kv))
    assert got.shape == (batch, heads, 16, dim)  # 11 columns padded to 2 tiles of 8
    for b in range(batch):
        for h in range(heads):
            for c in range(11):
                col = columns[b, h, c]
                want = x[b, col, h // 3] if col < SENTINEL else x[b, 0, h // 3]
                np.testing.assert_array_equal(got[b, h, c], want)
