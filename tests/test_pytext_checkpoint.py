"""The shipped pytext-12m checkpoint on CPU: stored logits, and a passkey in held-out real text
answered in dense and in its searched config."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import heldout
from convert.checkpoint import load_model
from minference_jax import passkey
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.models import AttentionSpec
from minference_jax.models.generation import generate, prefill

ROOT = pathlib.Path(__file__).parents[1]
CHECKPOINT = ROOT / "minference_jax" / "checkpoints" / "pytext-12m"
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "pytext_12m_logits.json"


@pytest.fixture(scope="module")
def model():
    return load_model(CHECKPOINT, jnp.float32)


def test_last_token_logits_match_the_stored_ones(model):
    model, config = model
    stored = json.loads(FIXTURE.read_text())
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (8, 6, 2)
    ids = jnp.asarray([list(stored["prompt"].encode())])
    logits = np.asarray(prefill(model, ids).last_logits[0])
    top = np.argsort(-logits)[: len(stored["top_ids"])]
    assert top.tolist() == stored["top_ids"]
    np.testing.assert_allclose(logits[top], stored["top_logits"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(logits.mean(), stored["mean_logit"], rtol=0, atol=2e-3)


def test_answers_a_passkey_in_heldout_text_dense_and_searched(model):
    model, config = model
    stored = json.loads(FIXTURE.read_text())["retrieval"]
    rng = np.random.default_rng(stored["seed"])
    prompts = [heldout.passkey_prompt(rng, stored["length"], d) for d in stored["depths"]]
    ids = jnp.asarray(np.stack([p for p, _ in prompts]))
    assert [k for _, k in prompts] == stored["keys"]  # the held-out data gave the pinned prompts
    searched = load_pattern_config(
        shipped_configs()["pytext_12m_searched"],
        num_layers=config.num_layers,
        num_heads=config.num_heads,
    )
    assert len({p for layer in searched.layers for p in layer}) > 1  # per-head, not uniform
    for mode, spec in (
        ("dense", AttentionSpec()),
        ("searched", AttentionSpec(searched, implementation="xla")),
    ):
        tokens, result = generate(model, ids, passkey.KEY_DIGITS, spec)
        answers = [bytes(t.astype(np.uint8)).decode("latin-1") for t in tokens]
        assert answers == stored["keys"], mode
        if mode == "searched":  # the sparse path ran and skipped tiles
            assert np.mean([layer.computed_fraction for layer in result.layers]) < 0.95


def test_heads_figure_names_every_head(tmp_path):
    from benchmarks import pytext_heads

    result = pytext_heads.main(["--tokens", "1024", "--out", str(tmp_path)])
    shares = np.asarray(result["shares_sink_local_far_needle"])
    assert shares.shape == (8, 6, 4) and shares.min() >= 0 and shares.max() <= 1 + 1e-5
    assert sum(result["kind_counts"].values()) == 48
    assert result["kind_counts"]["local"] > 0  # a byte-level model of code has local heads
    assert (tmp_path / "heads.png").stat().st_size > 10_000


def test_default_prompt_is_the_heldout_prompt_it_says():
    from minference_jax.models.defaults import DEFAULT_KEY, default_prompt

    text = default_prompt()
    assert text == heldout.passkey_prompt_file(2048, 0.4, DEFAULT_KEY, seed=0)
    assert len(text.encode()) == 2048 and text.rstrip().endswith("The pass key is")
