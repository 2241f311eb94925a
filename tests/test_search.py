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
