"""Adaptive patterns: threshold selection rules, their indices, attention, config, recall."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.attention import sparse_attention
from minference_jax.config_io import PatternConfigError, load_pattern_config, save_pattern_config
from minference_jax.index_approx import (
    build_sparse_index,
    estimate_adaptive_vertical_slash,
    plan_index,
    query_aware_distance,
    select_by_threshold,
    threshold_keep,
    vertical_slash_scores,
)
from minference_jax.recall import oracle_curves, row_recall, sample_block_rows, sample_rows
from minference_jax.sparse_index import SENTINEL, block_mask_from_index, dense_mask_from_index
from tests.oracles import (
    block_rows_mask,
    masked_attention_f64,
    random_qkv,
    rel_err,
    sampled_rows_scores_oracle,
)

SLACK = 2.0**-16  # the cumulative rule's relative slack (index_approx._MASS_SLACK)


def keep_oracle(row, threshold, rule):
    """Brute force for one row: sort, accumulate (f64), cut."""
    x = np.where(row > 0, row, 0).astype(np.float32)
    if rule == "relative":
        return (x > 0) & (x >= np.float32(threshold) * x.max())
    if rule == "absolute":
        return (x > 0) & (x >= np.float32(threshold) * x.sum(dtype=np.float32))
    if threshold >= 1:
        return x > 0
    order = np.argsort(-x, kind="stable")  # largest first, ties to the lower index
    target = threshold * x.astype(np.float64).sum() * (1 - SLACK)
    keep = np.zeros(x.shape, bool)
    if target > 0:
        count = np.searchsorted(np.cumsum(x[order].astype(np.float64)), target) + 1
        keep[order[:count]] = True
    return keep & (x > 0)


def top_oracle(row, keep, capacity):
    """Indices selected under a capacity: the kept set, or the `capacity` largest."""
    if keep.sum() <= capacity:
        chosen = np.flatnonzero(keep)
    else:
        x = np.where(row > 0, row, 0).astype(np.float32)
        chosen = np.sort(np.argsort(-x, kind="stable")[:capacity])
    return np.concatenate([chosen, np.full(capacity - chosen.size, SENTINEL)])


def score_rows(kind, seed, shape):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(shape, np.float32) ** 3
    if kind == "ties":  # few distinct values, exact sums in f32
        return rng.integers(0, 4, shape).astype(np.float32) / 4
    if kind == "all_equal":
        return np.full(shape, 0.375, np.float32)
    if kind == "dominant":
        x = rng.random(shape, np.float32) * 1e-3
        x[..., rng.integers(shape[-1])] = 10.0
        return x
    x = rng.standard_normal(shape).astype(np.float32)  # "signed": negatives count as 0
    x[..., : shape[-1] // 3] = 0
    return x


THRESHOLDS = np.array([0.0, 0.3, 0.5, 0.9, 1.0], np.float32)


@pytest.mark.parametrize("rule", P.SELECTION_RULES)
@pytest.mark.parametrize("kind", ["random", "ties", "all_equal", "dominant", "signed"])
def test_threshold_keep_matches_brute_force(rule, kind):
    scores = score_rows(kind, 7, (2, len(THRESHOLDS), 3, 77))  # batch 2, per-head thresholds
    got = np.asarray(threshold_keep(jnp.asarray(scores), THRESHOLDS[None, :, None], rule))
    for b, h, r in np.ndindex(scores.shape[:-1]):
        want = keep_oracle(scores[b, h, r], THRESHOLDS[h], rule)
        np.testing.assert_array_equal(got[b, h, r], want, err_msg=f"{kind} {b} {h} {r}")


def test_threshold_extremes():
    scores = jnp.asarray(score_rows("signed", 3, (4, 50)))
    positive = np.asarray(scores) > 0
    assert not np.asarray(threshold_keep(scores, 0.0, "cumulative")).any()
    np.testing.assert_array_equal(threshold_keep(scores, 1.0, "cumulative"), positive)
    np.testing.assert_array_equal(threshold_keep(scores, 0.0, "relative"), positive)
    maxima = np.asarray(scores) == np.asarray(scores).max(-1, keepdims=True)
    np.testing.assert_array_equal(threshold_keep(scores, 1.0, "relative"), maxima)
    np.testing.assert_array_equal(threshold_keep(scores, 0.0, "absolute"), positive)
    one = jnp.zeros((2, 9)).at[:, 4].set(0.5)  # a row's only positive entry is its whole mass
    np.testing.assert_array_equal(threshold_keep(one, 1.0, "absolute"), np.asarray(one) > 0)
    assert not np.asarray(threshold_keep(scores, 1.0, "absolute")[scores.sum(-1) > 0]).all()


@pytest.mark.parametrize("capacity", [1, 5, 40])
def test_select_by_threshold_caps_to_the_largest(capacity):
    scores = score_rows("ties", 11, (2, 3, 61))
    thresholds = np.array([0.2, 0.7, 1.0], np.float32)
    got = np.asarray(
        select_by_threshold(jnp.asarray(scores), thresholds[None, :], capacity, "cumulative")
    )
    for b, h in np.ndindex(scores.shape[:-1]):
        keep = keep_oracle(scores[b, h], thresholds[h], "cumulative")
        np.testing.assert_array_equal(got[b, h], top_oracle(scores[b, h], keep, capacity))


# --- the indices, against first-principles oracles (numpy, float64) ---------------------------


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def anti_diagonal_scores_oracle(q, k, stride, block, scale):
    """[B, Hq, nqb, nkb] block scores by strided anti-diagonals, with loops (one query block
    per row of blocks, one strided row at a time)."""
    b, n, hq, d = q.shape
    group = hq // k.shape[2]
    nb = -(-n // block)
    qp = np.zeros((b, nb * block, hq, d))
    kp = np.zeros((b, nb * block, k.shape[2], d))
    qp[:, :n], kp[:, :n] = q, k
    rows = nb * block // stride
    out = np.zeros((b, hq, nb, nb))
    for bi, h in np.ndindex(b, hq):
        logits = np.full((rows, rows), -np.inf)
        for i in range(rows):
            if i * stride >= n:
                continue
            for j in range(min(i + 1, -(-n // stride))):
                s = sum(
                    qp[bi, i * stride + stride - 1 - t, h] @ kp[bi, j * stride + t, h // group]
                    for t in range(stride)
                )
                logits[i, j] = s * scale / stride
        for i in range(rows):
            if i * stride < n:
                p = softmax(logits[i])
                out[bi, h, i * stride // block] += p.reshape(nb, block // stride).sum(-1)
    return out


def vs_scores_oracle(q, k, last_q, scale):
    """Column and diagonal sums [B, Hq, N] of the last queries' causal softmax."""
    b, n, hq, _ = q.shape
    group = hq // k.shape[2]
    rows = range(n - min(last_q, n), n)
    cols, diags = np.zeros((b, hq, n)), np.zeros((b, hq, n))
    for bi, h in np.ndindex(b, hq):
        for i in rows:
            logits = np.where(
                np.arange(n) <= i, k[bi, :, h // group] @ q[bi, i, h] * scale, -np.inf
            )
            p = softmax(logits)
            cols[bi, h] += p
            diags[bi, h, : i + 1] += p[i::-1]
    return cols, diags


def block_sets(index):
    """[B, H, nqb, nkb] bool: key blocks each query block touches (from the kernel fields)."""
    mask = np.asarray(block_mask_from_index(index))
    bk = index.block_kv
    pad = (-mask.shape[-1]) % bk
    mask = np.pad(mask, [(0, 0)] * 3 + [(0, pad)])
    return mask.reshape(*mask.shape[:3], -1, bk).any(-1)


N, BLOCK = 200, 32  # N not a multiple of the block; 7 query blocks


@pytest.fixture(scope="module")
def qkv():
    return [np.asarray(x, np.float64) for x in random_qkv(21, 2, N, 4, 2, 16, jnp.float32)]


def assert_blocks_match_oracle(qkv, heads, scores, thresholds, rule, local=0):
    """The key blocks each head's index keeps: the rule applied to `scores` (the oracle's),
    plus the sink block, the diagonal block and the `local` blocks before it."""
    q, k, _ = qkv
    index = build_sparse_index(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        heads,
        block_q=BLOCK,
        block_kv=BLOCK,
    )
    got = block_sets(index)
    nb = scores.shape[-1]
    for b, h, i in np.ndindex(scores.shape[:3]):
        want = keep_oracle(scores[b, h, i].astype(np.float32), thresholds[h], rule)
        want[0] = True  # the sink block, the diagonal block and the local window, always
        want[max(i - local, 0) : i + 1] = True
        np.testing.assert_array_equal(got[b, h, i, :nb], want, err_msg=f"{rule} {b} {h} {i}")


@pytest.mark.parametrize("rule", ["cumulative", "absolute"])
def test_anti_diagonal_index_matches_oracle(qkv, rule):
    """The relative rule runs end to end in the `mixed` layer."""
    thresholds = (0.3, 0.6, 0.9, 1.0) if rule == "cumulative" else (0.0, 0.05, 0.15, 0.3)
    heads = tuple(
        P.AntiDiagonalBlockSparse(t, stride=4, max_blocks=64, rule=rule, block_size=BLOCK)
        for t in thresholds
    )
    scores = anti_diagonal_scores_oracle(*qkv[:2], 4, BLOCK, 16**-0.5)
    assert_blocks_match_oracle(qkv, heads, scores, thresholds, rule)


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_sampled_block_sparse_index_matches_oracle(qkv, rows):
    thresholds = (0.0, 0.02, 0.1, 0.3)
    heads = tuple(
        P.SampledBlockSparse(t, rows=rows, max_blocks=64, block_size=BLOCK) for t in thresholds
    )
    scores = sampled_rows_scores_oracle(*qkv[:2], rows, BLOCK, 16**-0.5)
    assert_blocks_match_oracle(qkv, heads, scores, thresholds, "absolute", local=1)


def test_capacity_from_the_threshold_keeps_every_block_that_passes(qkv):
    """max_blocks=None: the capacity never binds (at most 1 / threshold blocks pass)."""
    thresholds = (0.0, 0.02, 0.1, 0.3)
    heads = tuple(
        P.SampledBlockSparse(t, rows=4, max_blocks=None, block_size=BLOCK) for t in thresholds
    )
    scores = sampled_rows_scores_oracle(*qkv[:2], 4, BLOCK, 16**-0.5)
    assert_blocks_match_oracle(qkv, heads, scores, thresholds, "absolute", local=1)


def test_block_capacity_follows_the_threshold_not_the_length():
    derived = P.SampledBlockSparse(0.0003, max_blocks=None)
    assert P.block_capacity(derived, 16384) == 3334  # 1M tokens in 64-key blocks
    assert P.block_capacity(derived, 2048) == 2048  # 128K: every key block
    assert P.block_capacity(P.SampledBlockSparse(0.0, max_blocks=None), 77) == 77
    assert P.block_capacity(P.SampledBlockSparse(0.0003), 16384) == 512  # the default
    layer = (derived, P.SampledBlockSparse(0.01, max_blocks=None))
    plan, budgets = plan_index(layer, 1 << 20, 2, block_q=128, block_kv=64)
    assert plan.adaptive.max_blocks == 4096  # 3334, bucketed to a power of two
    np.testing.assert_array_equal(budgets["max_blocks"], [3334, 101])
    with pytest.raises(ValueError, match="needs rule='absolute'"):
        P.AntiDiagonalBlockSparse(0.9, max_blocks=None)
    with pytest.raises(TypeError, match="max_blocks must be an int"):
        P.SampledBlockSparse(0.01, max_blocks=2.5)


def test_layer_mixing_sampled_rows_is_rejected():
    heads = (P.SampledBlockSparse(rows=4), P.SampledBlockSparse(rows=8))
    with pytest.raises(ValueError, match="must share rows"):
        P.check_layer_patterns(heads)


def test_chunked_block_scores_select_the_same_blocks(qkv, monkeypatch):
    """Chunks of query blocks, scored in groups against only the keys they can see (what bounds
    memory and skips non-causal work at long N), give the blocks of the one-chunk pass."""
    from minference_jax import index_approx

    q, k, _ = (jnp.asarray(x, jnp.float32) for x in qkv)
    kwargs = dict(
        scale=16**-0.5,
        capacity=4,
        rule="cumulative",
        stride=4,
        pooled_heads=jnp.array([False, True, False, True]),
        block_q=BLOCK,
        block_kv=BLOCK,
    )
    thresholds, limits = jnp.array([0.3, 0.6, 0.9, 1.0]), jnp.array([4, 2, 3, 4])
    whole = index_approx.select_key_blocks(q, k, thresholds, limits, **kwargs)
    monkeypatch.setattr(index_approx, "_SCORE_BYTES_PER_STEP", 1)  # one query block a chunk
    chunked = index_approx.select_key_blocks(q, k, thresholds, limits, **kwargs)
    np.testing.assert_array_equal(chunked, whole)
    counts = (np.asarray(whole) < SENTINEL).sum(-1)
    assert counts.max() == 4 and (counts[:, 1] <= 2).all() and counts.min() >= 1


def test_adaptive_vertical_slash_index_matches_oracle(qkv):
    q, k, _ = qkv
    heads = tuple(
        P.AdaptiveVerticalSlash(t, max_vertical=40, max_slash=60, block_size=BLOCK)
        for t in (0.0, 0.5, 0.8, 0.95)
    )
    index = build_sparse_index(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        heads,
        block_q=BLOCK,
        block_kv=BLOCK,
    )
    # Selection checked on the estimator's own f32 scores (checked against the brute force in
    # test_vs_scores_and_query_aware_distance_match_brute_force): no f32/f64 near-ties.
    scores = vertical_slash_scores(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), scale=16**-0.5, estimator="xla"
    )
    cols, diags = (np.asarray(x) for x in scores)
    causal = np.arange(N)[None, :] < (np.arange(-(-N // BLOCK))[:, None] + 1) * BLOCK
    got = np.asarray(block_mask_from_index(index))[..., :N] & causal
    for b, h in np.ndindex(2, 4):
        t = heads[h].threshold
        verticals = with_always_kept_oracle(cols[b, h], t, 40, 30)
        slashes = with_always_kept_oracle(diags[b, h], t, 60, 100)
        want = block_rows_mask(N, BLOCK, BLOCK, slashes=slashes, verticals=verticals)
        np.testing.assert_array_equal(got[b, h], want & causal, err_msg=f"{b} {h}")


def test_adaptive_vertical_slash_capacities_from_the_threshold(qkv):
    """max_vertical=max_slash=None under the absolute rule: every column and diagonal holding
    >= threshold of the estimated mass is kept, however many (no static cap binds)."""
    q, k, _ = qkv
    thresholds = (0.0, 0.002, 0.01, 0.05)
    heads = tuple(
        P.AdaptiveVerticalSlash(
            t, max_vertical=None, max_slash=None, rule="absolute", block_size=BLOCK
        )
        for t in thresholds
    )
    qj, kj = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    index = build_sparse_index(qj, kj, heads, block_q=BLOCK, block_kv=BLOCK)
    cols, diags = (
        np.asarray(x) for x in vertical_slash_scores(qj, kj, scale=16**-0.5, estimator="xla")
    )
    causal = np.arange(N)[None, :] < (np.arange(-(-N // BLOCK))[:, None] + 1) * BLOCK
    got = np.asarray(block_mask_from_index(index))[..., :N] & causal
    for b, h in np.ndindex(2, 4):
        t = thresholds[h]
        verticals = with_always_kept_oracle(cols[b, h], t, N, 30, "absolute")
        slashes = with_always_kept_oracle(diags[b, h], t, N, 100, "absolute")
        want = block_rows_mask(N, BLOCK, BLOCK, slashes=slashes, verticals=verticals)
        np.testing.assert_array_equal(got[b, h], want & causal, err_msg=f"{b} {h}")
    assert got[0, 1].sum() > got[0, 3].sum()  # the thresholds set different budgets


def test_vertical_slash_capacities_follow_the_threshold_not_the_length(tmp_path):
    derived = P.AdaptiveVerticalSlash(1e-4, max_vertical=None, max_slash=None, rule="absolute")
    assert P.vertical_slash_capacities(derived, 1 << 20) == (10001, 10001)
    assert P.vertical_slash_capacities(derived, 4096) == (4096, 4096)
    capped = P.AdaptiveVerticalSlash(1e-4, max_slash=None, rule="absolute")
    assert P.vertical_slash_capacities(capped, 1 << 20) == (4096, 10001)
    layer = (derived, P.AdaptiveVerticalSlash(0.01, max_vertical=None, rule="absolute"))
    plan, budgets = plan_index(layer, 1 << 20, 2, block_q=128, block_kv=64)
    assert (plan.adaptive.max_vertical, plan.adaptive.max_slash) == (16384, 16384)
    np.testing.assert_array_equal(budgets["max_vertical"], [10001, 101])
    np.testing.assert_array_equal(budgets["max_slash"], [10001, 8192])
    with pytest.raises(ValueError, match="max_slash=None .* needs rule='absolute'"):
        P.AdaptiveVerticalSlash(0.9, max_slash=None)
    path = tmp_path / "derived.json"
    save_pattern_config(P.HeadPatterns((layer,)), path)
    assert load_pattern_config(path).layers == (layer,)  # None written as null and read back


def with_always_kept_oracle(row, threshold, limit, always, rule="cumulative"):
    """Indices: the first `always`, plus the kept others (at most their `limit` largest)."""
    x = np.where(row > 0, row, 0).astype(np.float32)
    others = np.flatnonzero(keep_oracle(x, threshold, rule)[always:]) + always
    if others.size > limit:
        others = np.argsort(-np.where(np.arange(x.size) < always, 0, x), kind="stable")[:limit]
    return sorted(set(range(min(always, x.size))) | set(others.tolist()))


@pytest.mark.parametrize("rule", P.SELECTION_RULES)
@pytest.mark.parametrize("kind", ["random", "ties", "all_equal", "dominant", "signed"])
def test_adaptive_vertical_slash_selection_matches_brute_force(rule, kind):
    """Threshold, limit and always-kept entries together, on both score kinds, N % 64 != 0."""
    heads, n = 5, 150
    columns, diagonals = (score_rows(kind, seed, (2, heads, n)) for seed in (3, 4))
    thresholds = THRESHOLDS if rule == "cumulative" else np.array([0, 0.1, 0.5, 0.9, 1], np.float32)
    limits = np.array([[1, 90], [10, 5], [50, 20], [120, 1], [3, 3]], np.int32)
    verticals, slashes = estimate_adaptive_vertical_slash(
        jnp.asarray(columns),
        jnp.asarray(diagonals),
        jnp.asarray(thresholds),
        jnp.asarray(limits),
        max_vertical=128,
        max_slash=128,
        rule=rule,
    )
    for got, scores, kind_index, always in (
        (verticals, columns, 0, 30),
        (slashes, diagonals, 1, 100),
    ):
        got = np.asarray(got)
        assert got.shape[-1] == min(128 + always, n)
        for b, h in np.ndindex(2, heads):
            want = with_always_kept_oracle(
                scores[b, h], thresholds[h], limits[h, kind_index], always, rule
            )
            row = got[b, h]
            np.testing.assert_array_equal(row[: len(want)], want, err_msg=f"{kind} {b} {h}")
            assert (row[len(want) :] == SENTINEL).all()


def test_vs_scores_and_query_aware_distance_match_brute_force(qkv):
    q, k, _ = qkv
    qj, kj = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    cols, diags = vertical_slash_scores(qj, kj, scale=16**-0.5, estimator="xla")
    want_cols, want_diags = vs_scores_oracle(q, k, P.LAST_Q, 16**-0.5)
    np.testing.assert_allclose(cols, want_cols, atol=1e-5)
    np.testing.assert_allclose(diags, want_diags, atol=1e-5)
    got = np.asarray(
        query_aware_distance(qj, kj, cols, scale=16**-0.5, last_q=P.LAST_Q, block_kv=BLOCK)
    )
    nb = -(-N // BLOCK)
    for b, h in np.ndindex(2, 4):
        true = np.pad(want_cols[b, h], (0, nb * BLOCK - N)).reshape(nb, BLOCK).sum(-1)
        true /= true.sum()
        pooled_k = [k[b, j * BLOCK : (j + 1) * BLOCK, h // 2].mean(0) for j in range(nb)]
        estimate = softmax(np.array(pooled_k) @ q[b, -P.LAST_Q :, h].mean(0) * 16**-0.5)
        middle = (true + estimate) / 2
        js = sum((p[p > 0] * np.log2(p[p > 0] / middle[p > 0])).sum() / 2 for p in (true, estimate))
        assert abs(got[b, h] - np.sqrt(js)) < 1e-4


def test_query_aware_switch_picks_blocks_or_vertical_slash(qkv):
    q, k, _ = qkv
    qj, kj = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    common = dict(threshold=0.7, max_vertical=40, max_slash=60, block_size=BLOCK)
    vs = build_sparse_index(
        qj, kj, P.AdaptiveVerticalSlash(**common), block_q=BLOCK, block_kv=BLOCK
    )
    blocks = build_sparse_index(
        qj, kj, P.AdaptiveVerticalSlash(query_aware=1.0, **common), block_q=BLOCK, block_kv=BLOCK
    )
    assert int(vs.block_count.sum()) == 0 and int(vs.column_count.sum()) > 0
    assert int(blocks.column_count.sum()) == 0 and int(blocks.block_count.sum()) > 0
    assert np.asarray(blocks.diag_count).max() == 1  # the causal diagonal only


@pytest.fixture(scope="module")
def mixed():
    """A layer mixing every adaptive kind (relative rule) with a fixed one, its inputs and its
    estimated index."""
    q, k, v = random_qkv(4, 2, 150, 4, 2, 16, jnp.float32)
    relative = dict(rule="relative", block_size=16)
    layer = (
        P.AntiDiagonalBlockSparse(0.5, stride=4, max_blocks=4, **relative),
        P.AdaptiveVerticalSlash(0.5, max_vertical=16, max_slash=32, **relative),
        P.AdaptiveVerticalSlash(
            0.5, max_vertical=16, max_slash=32, query_aware=1.0, max_blocks=4, **relative
        ),
        P.VerticalSlash(30, 60),
    )
    return q, k, v, layer, build_sparse_index(q, k, layer, block_q=16, block_kv=16)


def test_adaptive_vertical_slash_fits_any_key_tile_unless_query_aware():
    q, k, v = random_qkv(5, 1, 1000, 4, 2, 16, jnp.float32)
    tokens = P.AdaptiveVerticalSlash(0.9, rule="relative", max_vertical=16, max_slash=32)
    index = build_sparse_index(q, k, tokens, block_q=32, block_kv=32)  # block_size stays 64
    mask = np.asarray(dense_mask_from_index(index))
    assert mask.sum() < 0.6 * 4 * 1000 * 1001 / 2  # sparse: the test can tell
    out = sparse_attention(q, k, v, patterns=tokens, implementation="xla", index=index)
    assert rel_err(out, masked_attention_f64(q, k, v, mask)) < 1e-5
    aware = dataclasses.replace(tokens, query_aware=0.5)  # block_size 64 for both
    with pytest.raises(ValueError, match="block_size=64 must equal block_kv=32"):
        build_sparse_index(q, k, aware, block_q=32, block_kv=32)


def test_patterns_against_reference_attention_on_every_implementation(mixed):
    q, k, v, layer, index = mixed
    mask = np.asarray(dense_mask_from_index(index))
    assert mask.any(-1).all()  # no empty row
    block_heads = mask[:, [0, 2]].sum(axis=(-1, -2))
    assert block_heads.max() < 0.8 * 150 * 151 / 2  # sparse: the test can tell
    want = masked_attention_f64(q, k, v, mask)
    for implementation in ("reference", "xla", "pallas"):
        out = sparse_attention(q, k, v, patterns=layer, implementation=implementation, index=index)
        assert rel_err(out, want) < 1e-5, implementation
    # The planned path (estimation inside the jitted attention) builds the same index.
    out = sparse_attention(q, k, v, patterns=layer, implementation="xla", block_q=16, block_kv=16)
    assert rel_err(out, want) < 1e-5


def test_threshold_zero_keeps_only_the_minimum_and_one_keeps_every_causal_block(qkv):
    q, k, _ = qkv
    heads = tuple(
        P.AntiDiagonalBlockSparse(t, stride=4, max_blocks=64, block_size=BLOCK)
        for t in (0.0, 1.0, 0.0, 1.0)
    )
    index = build_sparse_index(
        jnp.asarray(q, jnp.float32),
        jnp.asarray(k, jnp.float32),
        heads,
        block_q=BLOCK,
        block_kv=BLOCK,
    )
    sets = block_sets(index)
    nb = -(-N // BLOCK)
    minimum = np.eye(nb, dtype=bool)
    minimum[:, 0] = True
    for b in range(2):
        np.testing.assert_array_equal(sets[b, 0], minimum)
        np.testing.assert_array_equal(sets[b, 1], np.tril(np.ones((nb, nb), bool)))


def test_layer_mixing_rules_or_strides_is_rejected():
    q, k, _ = random_qkv(0, 1, 64, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="share the rule"):
        build_sparse_index(
            q, k, (P.AdaptiveVerticalSlash(rule="relative"), P.AntiDiagonalBlockSparse())
        )
    with pytest.raises(ValueError, match="block_kv"):
        build_sparse_index(q, k, P.AntiDiagonalBlockSparse(), block_q=32, block_kv=32)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: P.AntiDiagonalBlockSparse(1.5), "threshold"),
        (lambda: P.AntiDiagonalBlockSparse(0.9, stride=3), "divide"),
        (lambda: P.AdaptiveVerticalSlash(0.9, rule="sorted"), "rule"),
        (lambda: P.AdaptiveVerticalSlash(0.9, max_slash=0), "max_slash"),
        (lambda: P.AdaptiveVerticalSlash(0.9, query_aware=2.0), "query_aware"),
    ],
)
def test_bad_adaptive_patterns_raise(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_pattern_for_mode():
    assert P.pattern_for_mode("minference") == P.VerticalSlash(1000, 6096)
    assert P.pattern_for_mode("anti-diagonal", (0.8,)) == P.AntiDiagonalBlockSparse(0.8, 8)
    assert P.pattern_for_mode("adaptive-vs", (0.95, 0.1)) == P.AdaptiveVerticalSlash(
        0.95, query_aware=0.1
    )
    assert P.pattern_for_mode("sampled-blocks", (0.01,)) == P.SampledBlockSparse(0.01, 8)
    with pytest.raises(ValueError, match="unknown mode"):
        P.pattern_for_mode("sorted")
    with pytest.raises(ValueError, match="1 to 2"):
        P.pattern_for_mode("anti-diagonal", (0.8, 8, 1))


def test_json_round_trip_with_adaptive_types(tmp_path):
    layer = (
        P.AntiDiagonalBlockSparse(0.85, stride=16, rule="relative"),
        P.AdaptiveVerticalSlash(0.9, max_vertical=128, query_aware=0.2, rule="relative"),
        P.VerticalSlash(10, 20),
        P.Dense(),
    )
    table = P.HeadPatterns((layer, layer[::-1]))
    path = tmp_path / "adaptive.json"
    save_pattern_config(table, path)
    assert load_pattern_config(path) == table
    raw = json.loads(path.read_text())
    assert raw[0]["0"][0] == "anti_diagonal_block_sparse" and raw[0]["0"][2] == 0
    # defaults fill in
    raw[0]["1"] = ["adaptive_vertical_and_slash", {"threshold": 0.5, "rule": "relative"}, 0, 1.0]
    path.write_text(json.dumps(raw))
    assert load_pattern_config(path)[0][1] == P.AdaptiveVerticalSlash(0.5, rule="relative")
    for bad in ({"threshold": 2.0}, {"gamma": 0.5}, [0.5]):
        raw[0]["1"] = ["adaptive_vertical_and_slash", bad, 0, 1.0]
        path.write_text(json.dumps(raw))
        with pytest.raises(PatternConfigError, match="layer 0 head 1"):
            load_pattern_config(path)


def test_recall_matches_brute_force_full_matrix(mixed):
    q, k, _, _, index = mixed
    n = q.shape[1]
    rows = sample_rows(n, 20)
    assert rows[0] == 0 and rows[-1] == n - 1 and rows.size == 20
    got = np.asarray(row_recall(q, k, index, rows))  # [B, H, R]
    mask = np.asarray(dense_mask_from_index(index))  # [B, H, N, N]
    qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * 16**-0.5
    probs = softmax(np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf))
    want = (probs * mask).sum(-1)[:, :, rows]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert want.min() < 0.9  # some rows lose mass: the test can tell


def oracle_tile_masses_f64(q, k, rows, block):
    """Brute force for `oracle_curves`: per sampled query block and head, the block's dense
    mass per aligned key tile and per gathered tile of its heaviest keys, causal tiles only."""
    n = q.shape[1]
    group = q.shape[2] // k.shape[2]
    qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * q.shape[-1] ** -0.5
    probs = softmax(np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf))
    aligned, gathered = [], []
    for first in np.unique(rows // block):
        block_rows = rows[rows // block == first]
        mass = probs[:, :, block_rows].sum(2)  # [B, H, N]
        tiles = first + 1
        padded = np.pad(mass, ((0, 0), (0, 0), (0, -n % block)))
        aligned.append(padded[..., : tiles * block].reshape(*mass.shape[:2], tiles, block).sum(-1))
        heaviest = -np.sort(-padded, axis=-1)[..., : tiles * block]
        gathered.append(heaviest.reshape(*mass.shape[:2], tiles, block).sum(-1))
    return aligned, gathered


def test_oracle_curves_match_brute_force_and_bound_every_index(mixed):
    q, k, _, _, index = mixed
    n, block = q.shape[1], index.block_q
    rows = sample_block_rows(n, 4, block)
    blocks = np.unique(rows // block)
    assert blocks[0] == 0 and blocks[-1] == (n - 1) // block and n % block  # a partial block
    curves = oracle_curves(q, k, rows, block=block)
    total_rows = rows.size * q.shape[0] * q.shape[2]
    for name, masses in zip(
        ("blocks", "keys"), oracle_tile_masses_f64(q, k, rows, block), strict=True
    ):
        flat = np.sort(np.concatenate([m.ravel() for m in masses]))[::-1]
        want = np.concatenate([[0.0], np.cumsum(flat)]) / total_rows
        np.testing.assert_allclose(curves[name].recall, want, atol=1e-5)
        np.testing.assert_allclose(curves[name].tiles, np.arange(flat.size + 1) / flat.size)
        assert curves[name].recall_at(1.0) == pytest.approx(1.0, abs=1e-5)
    keys, aligned = curves["keys"], curves["blocks"]
    assert keys.recall_at(0.3) > aligned.recall_at(0.3) + 0.01  # gathering keys pays here
    assert aligned.tiles_for(aligned.recall_at(0.3)) <= 0.3

    # No index keeps more than the oracle with as many tiles on the same query blocks.
    block_sparse = build_sparse_index(
        q, k, P.BlockSparse(3, block_size=block), block_q=block, block_kv=block
    )
    for candidate, bound in ((index, keys), (block_sparse, keys), (block_sparse, aligned)):
        kept = float(np.asarray(row_recall(q, k, candidate, rows)).mean())
        spent = np.asarray(candidate.num_tiles())[:, :, blocks].sum()
        fraction = spent / (q.shape[0] * q.shape[2] * (blocks + 1).sum())
        assert kept <= bound.recall_at(fraction) + 1e-5
        assert kept < 0.999  # the indices drop mass: the bound is not met trivially

    for bad in (rows[1:], rows[:0]):
        with pytest.raises(ValueError, match="whole query blocks"):
            oracle_curves(q, k, bad, block=block)


def test_gpu_dispatch_threshold_depends_on_length(monkeypatch):
    from minference_jax import attention

    short, long = attention.SHORT_PROMPT_TOKENS, attention.SHORT_PROMPT_TOKENS + 1
    assert attention.dense_fallback_fraction(short) == attention.SHORT_PROMPT_FALLBACK_FRACTION
    assert attention.dense_fallback_fraction(long) == attention.DENSE_FALLBACK_FRACTION
    mosaic_short = attention.dense_fallback_fraction(short, "mosaic")
    assert mosaic_short == attention.MOSAIC_SHORT_PROMPT_FALLBACK_FRACTION
    assert attention.SHORT_PROMPT_FALLBACK_FRACTION < mosaic_short
    assert mosaic_short < attention.dense_fallback_fraction(long, "mosaic")
    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    pattern = P.AntiDiagonalBlockSparse()
    assert attention.layer_plan(pattern, attention.DENSE_CROSSOVER_TOKENS, 4, None)[0] is None
    plan, budgets = attention.layer_plan(pattern, attention.DENSE_CROSSOVER_TOKENS + 1, 4, None)
    assert plan.adaptive.stride == 8 and np.allclose(budgets["threshold"], 0.9)


@pytest.mark.slow
def test_recall_benchmark_smoke(tmp_path):
    from benchmarks import recall

    rows = recall.main(
        ["--seq-lens", "300", "--query-blocks", "3", "--families", "AdaptiveVS relative"]
        + ["Oracle keys", "--out", str(tmp_path)]
    )
    assert {r["family"] for r in rows} == {"VerticalSlash", "AdaptiveVS relative", "Oracle keys"}
    assert all(0 <= r["recall_mean"] <= 1 + 1e-6 for r in rows)
    reference = rows[0]
    bound = next(r for r in rows if r["param"] == "at VerticalSlash(1000,6096)")
    assert bound["recall_mean"] >= reference["recall_mean"]
    assert bound["measured_blocks_fraction"] <= reference["measured_blocks_fraction"]
    report = (tmp_path / f"recall_{rows[0]['device'].replace(':', '_')}.md").read_text()
    assert "the 172 rows of 3 query blocks" in report and "; Oracle keys " in report
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md", ".png"}


def test_short_prompt_benchmark_smoke(tmp_path):
    from benchmarks import short_prompts

    rows = short_prompts.main(
        ["--seq-lens", "256", "--repeats", "1", "--inputs", "structured"]
        + ["--patterns", "avs:0.95", "--out", str(tmp_path)]
    )
    assert [(r["pattern"], r["dispatch_runs"], r["kernel"]) for r in rows] == [
        ("avs:0.95", "xla", "xla")  # on CPU the dispatch runs the XLA sparse path
    ]
    assert 0 < rows[0]["computed_fraction"] <= 1 and rows[0]["dispatch_limit"] is None
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".md"}
    with pytest.raises(SystemExit) as exit_info:
        short_prompts.main(["--patterns", "avs:2.0"])  # a mass above 1: refused before any run
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_kernel_benchmark_runs_adaptive_cases(tmp_path):
    from benchmarks import kernels

    cases = ["anti_diagonal:0.8", "adaptive_vs_relative:0.01"]
    kernels.main(
        ["--seq-lens", "128", "--interpret", "--repeats", "1", "--cases", *cases]
        + ["--out", str(tmp_path)]
    )
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())
    assert [r["case"] for r in rows] == cases
    assert all(r["spot_rel_err"] < 1e-2 and r["index_ms"] > 0 for r in rows)


def test_e2e_benchmark_modes():
    import argparse

    from benchmarks import e2e_prefill

    assert e2e_prefill.parse_mode("anti-diagonal:0.8") == "anti-diagonal:0.8"
    spec = e2e_prefill.attention_spec("adaptive-vs:0.95", e2e_prefill.TINY)
    assert spec.patterns[0][0] == P.AdaptiveVerticalSlash(0.95)
    for bad in ("adaptive-vs:1.5", "anti-diagonal:x", "sparse"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e_prefill.parse_mode(bad)


def test_recall_benchmark_on_dumped_layers(tmp_path, capsys):
    """--inputs dump: dump_qkv layer files stacked as heads, cut to each length, with the dumped
    model's config (picked per layer) as the reference."""
    from benchmarks import recall
    from benchmarks.dump_qkv import save_qkv
    from minference_jax.config_io import save_pattern_config

    dumps = tmp_path / "dumps"
    for layer in (0, 2):  # layers 0 and 2 of a 3-layer model
        q, k, v = random_qkv(layer, 1, 320, 4, 2, 16, jnp.bfloat16)
        save_qkv(dumps / f"layer{layer:02d}.npz", q, k, v, layer=layer)
    layers = [[P.VerticalSlash(10 * (i + 1), 64)] * 4 for i in range(3)]
    save_pattern_config(P.HeadPatterns(tuple(map(tuple, layers))), tmp_path / "cfg.json")
    argv = ["--inputs", "dump", "--dumps", str(dumps), "--seq-lens", "256", "--query-blocks"]
    argv += ["2", "--families", "Config", "Oracle blocks", "--out", str(tmp_path / "out")]
    rows = recall.main([*argv, "--dump-config", str(tmp_path / "cfg.json")])
    config = next(r for r in rows if r["family"] == "Config")
    assert config["input"] == "dump" and config["seq_len"] == 256
    assert config["param"] == "cfg, layers 0,2"
    q, k, (_, patterns) = recall.dump_inputs(dumps, 256, str(tmp_path / "cfg.json"))
    assert q.shape == (1, 256, 8, 16) and k.shape == (1, 256, 4, 16) and q.dtype == jnp.float32
    assert patterns == (P.VerticalSlash(10, 64),) * 4 + (P.VerticalSlash(30, 64),) * 4
    _, _, (label, default) = recall.dump_inputs(dumps, 256)
    assert default == (recall.REFERENCE,) * 8 and label.endswith("layers 0,2")
    with pytest.raises(ValueError, match="holds 320 tokens, fewer than 512"):
        recall.dump_inputs(dumps, 512)
    with pytest.raises(ValueError, match="no layerLL.npz files"):
        recall.dump_inputs(tmp_path / "out", 256)
    with pytest.raises(SystemExit):
        recall.main(["--inputs", "dump", "--seq-lens", "256"])  # no --dumps
    assert "--inputs dump and --dumps DIR go together" in capsys.readouterr().err
