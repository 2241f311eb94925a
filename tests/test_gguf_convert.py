"""GGUF import (`python -m convert model.gguf DST`) against transformers' own GGUF loading.

Tiny GGUF files are written here with `gguf.GGUFWriter` (tests/gguf_models.py: quantised and
float tensors, Llama Q/K rows permuted as llama.cpp stores them); transformers' token ids and
logits for the same files were recorded by tests/fixtures/make_gguf_fixtures.py (needs torch).
"""

from __future__ import annotations

import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.__main__ import main as convert_main
from convert.checkpoint import CheckpointError
from convert.gguf import _unpermute_rows, convert_gguf, hf_name
from minference_jax.models.checkpoint import flat_params, load_model
from minference_jax.tokenization import load_tokenizer
from tests import gguf_models
from tests.oracles import rel_err

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "gguf" / "models_reference.safetensors"
FIXTURE_CASES = {
    "qwen2": ("qwen2", 0, False),
    "llama": ("llama", 1, False),
    "qwen2_tied": ("qwen2", 2, True),
}


def _convert(tmp_path, arch="qwen2", seed=0, tied=False, dtype="float32", extra=()):
    src = tmp_path / f"{arch}-{seed}.gguf"
    gguf_models.write_tiny_gguf(src, arch, seed, tied=tied)
    dst = tmp_path / f"out-{arch}-{seed}"
    assert convert_main([str(src), str(dst), "--dtype", dtype, "--quiet", *extra]) == 0
    return src, dst


def test_fixture_script_covers_the_cases():
    import tests.fixtures.make_gguf_fixtures as script

    assert script.CASES == FIXTURE_CASES


@pytest.mark.parametrize("case", sorted(FIXTURE_CASES))
def test_tokens_and_logits_match_transformers(tmp_path, case):
    ref = load_file(str(REFERENCE))
    arch, seed, tied = FIXTURE_CASES[case]
    _, dst = _convert(tmp_path, arch, seed, tied)
    from tests.fixtures.make_gguf_fixtures import TEXTS

    tokenizer = load_tokenizer(dst)
    expected_ids = ref[f"{case}.input_ids"]
    for text, ids in zip(TEXTS, expected_ids, strict=True):
        assert tokenizer.encode(text)[: len(ids)] == ids.tolist()
    model, config = load_model(dst, jnp.float32)
    assert config.tie_word_embeddings == tied
    logits = model(jnp.asarray(expected_ids))
    assert rel_err(logits, ref[f"{case}.logits"]) < 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_weights_equal_the_dequantised_tensors(tmp_path, arch):
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh random weights every run
    src, dst = _convert(tmp_path, arch, seed)
    model, config = load_model(dst, jnp.float32)
    ours = {k: np.asarray(v) for k, v in flat_params(model).items()}
    reader = gguf.GGUFReader(src)
    checked = set()
    for tensor in reader.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = hf_name(tensor.name)
        if arch == "llama" and ".q_proj." in name:
            expected = _unpermute_rows(expected, config.num_heads)
        if arch == "llama" and ".k_proj." in name:
            expected = _unpermute_rows(expected, config.num_kv_heads)
        path = _our_path(name)
        got = ours[path]
        np.testing.assert_array_equal(got, expected.T if path.endswith("kernel") else expected)
        checked.add(path)
    assert checked == set(ours)


def _our_path(hf: str) -> str:
    from minference_jax.models import hf_tables

    found = hf_tables.match(hf, "llama")
    assert found is not None, hf
    return found[1][0]


def test_llama_rows_come_back_in_hf_order():
    rng = np.random.default_rng()
    for heads, head_dim, cols in [(4, 64, 32), (2, 128, 8), (8, 16, 1)]:
        weight = rng.standard_normal((heads * head_dim, cols))
        permuted = gguf_models.llama_cpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(_unpermute_rows(permuted, heads), weight)
        bias = weight[:, 0]
        np.testing.assert_array_equal(
            _unpermute_rows(gguf_models.llama_cpp_permute(bias, heads), heads), bias
        )


def test_tokenizer_files_and_chat_template(tmp_path):
    _, dst = _convert(tmp_path, dtype="bfloat16")
    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert config["chat_template"] == gguf_models.CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == gguf_models.vocabulary()[0].index("<|im_end|>")
    assert load_tokenizer(dst).encode("<|im_start|>") == [generation["eos_token_id"] - 1]


def test_yarn_rope_scaling_is_written(tmp_path):
    yarn = '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}'
    _, dst = _convert(tmp_path, extra=["--rope-scaling", yarn])
    _, config = load_model(dst, jnp.float32)
    assert config.rope.rope_type == "yarn" and config.rope.factor == 4.0
    assert config.max_position_embeddings == 1024


def _rewrite(src, dst, *, drop=(), retype=None, arch=None, extra_tensor=None):
    """A copy of a GGUF file with some tensors dropped or re-typed, another architecture name,
    or one more tensor."""
    reader = gguf.GGUFReader(src)
    arch = arch or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        old_arch = reader.fields["general.architecture"].contents()
        key = key.replace(f"{old_arch}.", f"{arch}.", 1)
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    for tensor in reader.tensors:
        if tensor.name in drop:
            continue
        if retype and tensor.name == retype[0]:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(
                tensor.name, gguf.quants.quantize(values, retype[1]), raw_dtype=retype[1]
            )
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    if extra_tensor:
        writer.add_tensor(*extra_tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _error(src, dst, capsys) -> str:
    assert convert_main([str(src), str(dst), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not dst.exists()  # nothing half-written
    return err


def test_bad_files_are_refused_with_one_line(tmp_path, capsys):
    good = tmp_path / "good.gguf"
    gguf_models.write_tiny_gguf(good, "qwen2", 0)
    dst = tmp_path / "dst"

    assert "GGUF file not found" in _error(tmp_path / "missing.gguf", dst, capsys)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert "is not a GGUF file" in _error(not_gguf, dst, capsys)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in _error(truncated, dst, capsys)

    odd = tmp_path / "odd_type.gguf"
    _rewrite(good, odd, retype=("blk.1.ffn_up.weight", gguf.GGMLQuantizationType.Q4_1))
    err = _error(odd, dst, capsys)
    assert "blk.1.ffn_up.weight (Q4_1)" in err and "Q4_K" in err

    gemma = tmp_path / "gemma.gguf"
    _rewrite(good, gemma, arch="gemma")
    assert "architecture 'gemma' is not supported" in _error(gemma, dst, capsys)

    missing = tmp_path / "missing_tensor.gguf"
    _rewrite(good, missing, drop=("blk.1.attn_k.weight",))
    assert "missing tensors for: layers.1.attn.k_proj.kernel" in _error(missing, dst, capsys)

    freqs = tmp_path / "rope_freqs.gguf"
    _rewrite(good, freqs, extra_tensor=("rope_freqs.weight", np.ones(32, np.float32)))
    assert "rope_freqs" in _error(freqs, dst, capsys)


def test_destination_rules_as_for_hf_folders(tmp_path, capsys):
    src = tmp_path / "m.gguf"
    gguf_models.write_tiny_gguf(src, "qwen2", 0)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert_main([str(src), str(dst), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    convert_gguf(src, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="unknown dtype"):
        convert_gguf(src, tmp_path / "other", "int8")
