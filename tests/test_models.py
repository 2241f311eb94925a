"""Our Flax models against transformers (PyTorch) reference logits committed as fixtures.

Fixtures: tests/fixtures/make_hf_fixtures.py (needs torch; not run in CI) wrote tiny random HF
models (config.json + safetensors, one sharded) and their float32 logits + greedy tokens.
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.__main__ import main as convert_main
from convert.checkpoint import CheckpointError, export_hf, load_hf, load_model
from minference_jax import patterns as P
from minference_jax.models import AttentionSpec, ModelConfigError, generation
from minference_jax.models.config import ModelConfig, read_hf_config
from minference_jax.models.generation import generate, prefill
from minference_jax.models.rope import decode_rope_tables, rope_tables
from tests.oracles import rel_err

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())


def _reference(case):
    return load_file(str(FIXTURES / case / "reference.safetensors"))


def test_fixture_cases_cover_every_family():
    model_types = {read_hf_config(FIXTURES / c)["model_type"] for c in CASES}
    assert {"llama", "mistral", "qwen2", "phi3"} <= model_types
    assert any((FIXTURES / c / "model.safetensors.index.json").is_file() for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    ref = _reference(case)
    model, _ = load_hf(FIXTURES / case, jnp.float32)
    logits = model(jnp.asarray(ref["input_ids"]))
    assert rel_err(logits, ref["logits"]) < 1e-4


@pytest.mark.parametrize("case", ["llama", "phi3_longrope", "qwen2"])
def test_greedy_generation_matches_transformers(case):
    ref = _reference(case)
    model, _ = load_hf(FIXTURES / case, jnp.float32)
    tokens, result = generate(model, ref["input_ids"][:1], ref["greedy_tokens"].shape[1])
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])
    assert rel_err(result.last_logits, ref["logits"][:1, -1]) < 1e-4


BOUNDARY_CASES = ["llama_dynamic_rope", "phi3_longrope"]


def _boundary(case):
    """Prompts of the original context's length, one past it, and three short of it (whose
    greedy generation crosses it) with transformers' logits and tokens."""
    ref = load_file(str(FIXTURES / case / "boundary.safetensors"))
    lengths = [int(n) for n in ref["boundary_lengths"]]
    config = read_hf_config(FIXTURES / case)
    original = (config.get("rope_parameters") or {}).get(
        "original_max_position_embeddings"
    ) or config.get("original_max_position_embeddings", config["max_position_embeddings"])
    assert {original - 3, original, original + 1} <= set(lengths)
    return ref, lengths


@pytest.mark.parametrize("case", BOUNDARY_CASES)
def test_prompts_at_past_and_across_the_original_context_match_transformers(case):
    """Last-token logits and greedy tokens of prompts at, one past and three short of the
    original context. Decoding rotates each token for the length it ends (and Phi-3 LongRoPE
    re-prefills with the long factors at the crossing), as transformers' cached generation does,
    and the decode step compiles once per cache length although its RoPE rows change."""
    ref, lengths = _boundary(case)
    model, _ = load_hf(FIXTURES / case, jnp.float32)
    compiled = generation._decode_step.jitted_fn._cache_size
    before = compiled()
    for length in lengths:
        want = ref[f"greedy_tokens_{length}"]
        tokens, result = generate(model, ref["input_ids"][:1, :length], want.shape[1])
        assert rel_err(result.last_logits, ref[f"logits_{length}"][:1, -1]) < 1e-4, length
        np.testing.assert_array_equal(tokens, want, err_msg=f"prompt of {length}")
    assert compiled() - before <= len(lengths)


@pytest.mark.parametrize("case", BOUNDARY_CASES)
def test_decode_rope_rows_use_the_length_each_token_ends(case):
    config = ModelConfig.from_hf_folder(FIXTURES / case)
    positions = [0, 31, 32, 40]
    cos, sin = decode_rope_tables(config, positions)
    for row, position in enumerate(positions):
        want_cos, want_sin = rope_tables(config, jnp.array([position]), position + 1)
        np.testing.assert_array_equal(cos[row], want_cos[0])
        np.testing.assert_array_equal(sin[row], want_sin[0])
    assert decode_rope_tables(config, [])[0].shape == (0, config.head_dim)


@pytest.mark.parametrize("case", ["llama", "phi3", "qwen2"])
def test_round_trip_through_hf_export_and_converted_format(case, tmp_path):
    ref = _reference(case)
    ids = jnp.asarray(ref["input_ids"])
    model, _ = load_hf(FIXTURES / case, jnp.float32)
    export_hf(model, read_hf_config(FIXTURES / case), tmp_path / "exported")
    again, _ = load_hf(tmp_path / "exported", jnp.float32)
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
    assert (
        convert_main(
            [str(FIXTURES / case), str(tmp_path / "conv"), "--dtype", "float32", "--quiet"]
        )
        == 0
    )
    converted, _ = load_model(tmp_path / "conv")
    np.testing.assert_array_equal(np.asarray(converted(ids)), np.asarray(model(ids)))


def test_bf16_conversion_stays_close(tmp_path):
    ref = _reference("llama")
    assert convert_main([str(FIXTURES / "llama"), str(tmp_path), "--quiet"]) == 0
    model, _ = load_model(tmp_path)
    assert model.embed[...].dtype == jnp.bfloat16
    assert rel_err(model(jnp.asarray(ref["input_ids"])), ref["logits"]) < 5e-2


def test_prefill_and_sparse_modes_run_on_a_real_layout():
    ref = _reference("llama3_rope")
    model, config = load_hf(FIXTURES / "llama3_rope", jnp.float32)
    ids = jnp.asarray(ref["input_ids"])
    dense = prefill(model, ids, chunk_size=16)
    assert rel_err(dense.last_logits, ref["logits"][:, -1]) < 1e-4
    layer = (P.VerticalSlash(30, 50), P.AShape(4, 16), P.BlockSparse(1), P.Dense())
    spec = AttentionSpec(P.HeadPatterns((layer,) * config.num_layers))
    sparse = prefill(model, ids, spec, chunk_size=16)
    assert not np.isnan(np.asarray(sparse.last_logits)).any()
    wrong = AttentionSpec(
        P.HeadPatterns.uniform(P.Dense(), config.num_layers + 1, config.num_heads)
    )
    with pytest.raises(ValueError, match="layers x"):
        prefill(model, ids, wrong)
    with pytest.raises(ValueError, match="seq >= 1"):
        prefill(model, jnp.zeros((1, 0), jnp.int32))


def _copy(case, tmp_path):
    dst = tmp_path / case
    shutil.copytree(FIXTURES / case, dst)
    return dst


def test_missing_config(tmp_path):
    folder = _copy("llama", tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_hf(folder)


def test_unsupported_architecture(tmp_path):
    folder = _copy("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="unsupported architecture.*gpt2"):
        load_hf(folder)


def test_missing_shard(tmp_path):
    folder = _copy("qwen2", tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_hf(folder)


def test_tensor_shape_mismatch(tmp_path):
    folder = _copy("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp.gate_proj.kernel.*config expects"):
        load_hf(folder)


def test_corrupt_safetensors_header(tmp_path):
    folder = _copy("llama", tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_hf(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = _copy("llama", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights.*safe_serialization=True"):
        load_hf(folder)
    assert convert_main([str(folder), str(tmp_path / "out"), "--quiet"]) == 2
