"""Offline pattern search on a tiny checkpoint (CPU)."""

import argparse
import collections
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from convert.checkpoint import load_hf
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config
from minference_jax.search import main, parse_candidate, search_patterns

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"
CANDIDATES = (
    P.AShape(16, 48),  # the reference: every head may cost at most this
    P.AShape(4, 32),
    P.VerticalSlash(30, 50),
    P.BlockSparse(4, 16),
    P.AShape(32, 16),
)


def _search(seed):
    model, config = load_hf(LLAMA, jnp.float32)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, config.vocab_size, 240) for _ in range(2)]
    return search_patterns(model, prompts, candidates=CANDIDATES, score_queries=32, block=16)


def test_search_beats_reference_per_head_at_no_more_cost():
    result = _search(0)
    kinds = collections.Counter(p for layer in result.patterns.layers for p in layer)
    assert len(kinds) >= 2, "every head got the same pattern"
    assert np.all(result.recall >= result.reference_recall - 1e-9)
    assert np.all(result.cost <= result.reference_cost + 1e-9)
    assert np.all((result.recall > 0) & (result.recall <= 1 + 1e-6))


def test_search_is_deterministic():
    a, b = _search(1), _search(1)
    assert a.patterns == b.patterns
    np.testing.assert_array_equal(a.recall, b.recall)


def test_search_cli_writes_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "searched.json"
    out.write_text("an earlier config, replaced whole")
    argv = ["--model", str(LLAMA), "--out", str(out), "--num-prompts", "1"]
    # 300 tokens: past the fixture's 256 positions, which the search runs but warns about.
    assert main([*argv, "--synthetic-tokens", "300", "--score-queries", "32"]) == 0
    patterns = load_pattern_config(out, num_layers=2, num_heads=4)
    assert patterns.num_layers == 2
    captured = capsys.readouterr()
    assert "mean recall" in captured.out
    assert "warning: prompts of up to 300 tokens run past the model's max_position" in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["searched.json"]  # no temp file left


def test_min_recall_upgrades_only_the_heads_below_it():
    model, config = load_hf(LLAMA, jnp.float32)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, config.vocab_size, 240) for _ in range(2)]
    kwargs = dict(candidates=CANDIDATES, score_queries=32, block=16)
    plain = search_patterns(model, prompts, **kwargs)
    floor = float(np.median(plain.recall))  # about half the heads fall below it
    lifted = search_patterns(model, prompts, min_recall=floor, **kwargs)
    below = plain.recall < floor
    assert below.any() and (~below).any()
    assert np.all(lifted.recall[below] >= floor - 1e-9)  # reached it, by a candidate or Dense
    np.testing.assert_array_equal(lifted.recall[~below], plain.recall[~below])
    for layer in range(config.num_layers):
        for head in range(config.num_heads):
            if not below[layer, head]:
                assert lifted.patterns[layer][head] == plain.patterns[layer][head]
            elif lifted.patterns[layer][head] == P.Dense():
                assert lifted.cost[layer, head] == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("vs:1000,6096", P.VerticalSlash(1000, 6096)),
        ("ashape:64,256", P.AShape(64, 256)),
        ("block:8", P.BlockSparse(8)),
        ("adb:0.9", P.AntiDiagonalBlockSparse(0.9)),
        ("adbr:0.1,16", P.AntiDiagonalBlockSparse(0.1, 16, rule="relative")),
        ("avs:0.95", P.AdaptiveVerticalSlash(0.95)),
        ("avsr:0.01,0.2", P.AdaptiveVerticalSlash(0.01, query_aware=0.2, rule="relative")),
        (
            "avsa:1e-4",
            P.AdaptiveVerticalSlash(1e-4, max_vertical=None, max_slash=None, rule="absolute"),
        ),
        ("sbs:0.0003,4", P.SampledBlockSparse(0.0003, rows=4)),
    ],
)
def test_parse_candidate_kinds(text, expected):
    assert parse_candidate(text) == expected


@pytest.mark.parametrize("text", ["block:4,32", "vs:1000", "adb:", "avs:0.9,0,1", "vs:1.5,3"])
def test_parse_candidate_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_candidate(text)


def _brute_force_cost(recall, cost, target):
    """The fewest mean tiles over every choice of one candidate per head reaching target."""
    import itertools

    c, heads = recall.shape
    best = np.inf
    for choice in itertools.product(range(c), repeat=heads):
        r = recall[list(choice), np.arange(heads)].mean()
        if r >= target - 1e-12:
            best = min(best, cost[list(choice), np.arange(heads)].mean())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_for_recall_is_within_one_step_of_the_best(seed):
    from minference_jax.search import allocate_for_recall

    rng = np.random.default_rng(seed)
    c, heads = 4, 5
    cost = rng.uniform(0.05, 1.0, (c, heads))
    recall = np.clip(0.5 + 0.5 * cost + rng.normal(0, 0.1, (c, heads)), 0, 1)  # noisy trade-off
    for target in np.linspace(recall.min(0).mean(), recall.max(0).mean(), 7):
        choice = allocate_for_recall(recall, cost, target)
        got_r = recall[choice, np.arange(heads)].mean()
        got_c = cost[choice, np.arange(heads)].mean()
        assert got_r >= target - 1e-9
        # One head's last step is all the greedy can overspend (an integral knapsack).
        step = (cost.max(0) - cost.min(0)).max() / heads
        assert got_c <= _brute_force_cost(recall, cost, target) + step + 1e-12
    unreachable = allocate_for_recall(recall, cost, 1.5)
    np.testing.assert_array_equal(recall[unreachable, np.arange(heads)], recall.max(0))
    np.testing.assert_array_equal(allocate_for_recall(recall, cost, 0.0), cost.argmin(0))


def test_allocate_for_recall_spends_tiles_where_they_buy_the_most():
    """Two heads, one cheap to satisfy: the target is reached on it, not on the other."""
    from minference_jax.search import allocate_for_recall

    recall = np.array([[0.5, 0.5], [0.99, 0.6], [1.0, 0.99]])  # [C, H]
    cost = np.array([[0.1, 0.1], [0.2, 0.5], [0.9, 0.9]])
    np.testing.assert_array_equal(allocate_for_recall(recall, cost, 0.79), [1, 1])
    np.testing.assert_array_equal(allocate_for_recall(recall, cost, 0.74), [1, 0])


def test_recall_target_search_on_spread_rows(tmp_path, capsys):
    """A mean recall target over every head, scored on query blocks spread over the prompt."""
    from minference_jax.search import scored_rows

    np.testing.assert_array_equal(scored_rows(240, 32, "last", 16), np.arange(208, 240))
    spread = scored_rows(240, 32, "spread", 16)
    assert spread.size == 32 and spread.min() == 0 and spread.max() == 239
    model, config = load_hf(LLAMA, jnp.float32)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, config.vocab_size, 240) for _ in range(2)]
    candidates = tuple(P.SampledBlockSparse(t, rows=4, block_size=16) for t in (0.2, 0.05, 0.0))
    kwargs = dict(candidates=candidates, score_queries=32, block=16, score_rows="spread")
    cheapest = search_patterns(model, prompts, recall_target=0.0, **kwargs)
    target = float(cheapest.recall.mean() + 1.0) / 2
    result = search_patterns(model, prompts, recall_target=target, **kwargs)
    assert result.recall.mean() >= target - 1e-9
    assert result.cost.mean() > cheapest.cost.mean()
    assert len({p for layer in result.patterns.layers for p in layer}) >= 2  # per-head thresholds
    with pytest.raises(ValueError, match="not both"):
        search_patterns(model, prompts, recall_target=0.9, min_recall=0.5, **kwargs)
    out = tmp_path / "target.json"
    argv = ["--model", str(LLAMA), "--out", str(out), "--num-prompts", "1", "--score-rows"]
    argv += ["spread", "--synthetic-tokens", "240", "--score-queries", "32", "--candidates"]
    argv += ["sbs:0.2,4", "sbs:0.0,4", "--recall-target", "0.9"]
    assert main(argv) == 0
    assert load_pattern_config(out, num_layers=2, num_heads=4).num_layers == 2
    assert main([*argv, "--min-recall", "0.5"]) == 2
    assert "pass --min-recall or --recall-target, not both" in capsys.readouterr().err
