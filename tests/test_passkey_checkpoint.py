"""The shipped passkey checkpoint: conversion, retrieval on CPU, pattern search on it."""

import collections
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from convert.checkpoint import convert_folder, load_model
from minference_jax import passkey
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, save_pattern_config, shipped_configs
from minference_jax.models import AttentionSpec
from minference_jax.models.defaults import PASSKEY_TINY_SEARCH_CANDIDATES as SEARCH_CANDIDATES
from minference_jax.models.generation import generate
from minference_jax.search import search_patterns
from minference_jax.tokenization import load_tokenizer

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "passkey-tiny"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted")
    convert_folder(CHECKPOINT, dst, "float32", progress=False)
    model, config = load_model(dst)
    return model, config


def _prompts(length, depths, seed):
    rng = np.random.default_rng(seed)
    return [passkey.passkey_prompt(rng, length, d) for d in depths]


def test_converted_checkpoint_answers_the_passkey_dense_and_sparse(converted):
    length = 4096  # budgets far below the prompt: the sparse modes skip most tiles
    model, config = converted
    tokenizer = load_tokenizer(CHECKPOINT)
    searched = load_pattern_config(
        shipped_configs()["passkey_tiny_searched"],
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )
    prompts = _prompts(length, [0.1, 0.5, 0.9], seed=length)
    ids = jnp.asarray([tokenizer.encode(p) for p, _ in prompts])
    assert ids.shape == (3, length)
    assert searched.layers != P.HeadPatterns.uniform(searched[0][0], 2, 4).layers
    specs = {
        "dense": AttentionSpec(),
        "minference": AttentionSpec(searched, implementation="xla"),
        "vs": AttentionSpec(
            P.HeadPatterns.uniform(P.VerticalSlash(64, 256), config.num_layers, config.num_heads),
            implementation="xla",
        ),
    }
    for mode, spec in specs.items():
        tokens, _ = generate(model, ids, passkey.KEY_DIGITS, spec)
        answers = [tokenizer.decode(t) for t in np.asarray(tokens)]
        assert answers == [key for _, key in prompts], mode


def test_search_on_the_checkpoint_keeps_mass_at_no_more_cost(converted, tmp_path):
    model, config = converted
    prompts = [passkey.encode(p) for p, _ in _prompts(2048, [0.3, 0.7], seed=5)]
    result = search_patterns(model, prompts, candidates=SEARCH_CANDIDATES)
    save_pattern_config(result.patterns, tmp_path / "searched.json", result.recall.tolist())
    loaded = load_pattern_config(tmp_path / "searched.json", num_layers=2, num_heads=4)
    assert loaded == result.patterns
    kinds = collections.Counter(p for layer in loaded.layers for p in layer)
    assert len(kinds) >= 2, f"every head got the same pattern: {kinds}"
    assert np.all(result.recall >= result.reference_recall - 1e-9)
    assert np.all(result.cost <= result.reference_cost + 1e-9)
    assert result.cost.mean() < 1.0  # sparse at all: fewer tiles than dense causal
