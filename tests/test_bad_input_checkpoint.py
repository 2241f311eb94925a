"""Broken checkpoints are refused where they are loaded (prefill, search, convert share the
loader): config fields of the wrong type or range, NaN or integer weights, a tensor stored
twice, a layer count that disagrees with the tensors, a tokenizer that does not fit the model.
A model that still computes NaN logits is reported with exit code 3, never a silent result."""

import json
import pathlib
import shutil
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minference_jax.models.checkpoint import CheckpointError, load_model
from minference_jax.models.config import ModelConfig, ModelConfigError
from minference_jax.models.defaults import PASSKEY_TINY
from minference_jax.models.memory import DoesNotFitError, check_fits
from minference_jax.tokenization import TokenizerError, load_tokenizer
from tests.test_bad_input_prefill import assert_one_line_error, run_main

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"


def _hf_config() -> dict:
    return json.loads((LLAMA / "config.json").read_text())


def _copy(tmp_path, source=LLAMA) -> pathlib.Path:
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    return folder


def _edit_config(folder: pathlib.Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_parameters": {"rope_theta": 0.0, "rope_type": "default"}}, "rope theta"),
        ({"rope_parameters": {"rope_theta": -5.0, "rope_type": "default"}}, "rope theta"),
        ({"rope_parameters": {"rope_theta": float("nan"), "rope_type": "default"}}, "rope theta"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 0.0}}, "scaling factor"),
        ({"rms_norm_eps": float("nan")}, "malformed field 'rms_norm_eps': must be a finite number"),
        ({"rms_norm_eps": -1e-6}, "'rms_norm_eps' must be in (0, 1)"),
        ({"rms_norm_eps": "1e-6"}, "malformed field 'rms_norm_eps': must be a finite number"),
        (
            {"tie_word_embeddings": "false"},
            "malformed field 'tie_word_embeddings': must be true or false",
        ),
        ({"attention_bias": 1}, "'attention_bias': must be true or false"),
        ({"model_type": ["llama"]}, "unsupported architecture"),
        ({"partial_rotary_factor": "abc"}, "'partial_rotary_factor': must be a finite number"),
        ({"partial_rotary_factor": None}, "'partial_rotary_factor': must be a finite number"),
        ({"partial_rotary_factor": 0.5}, "partial rotary embeddings are not supported"),
    ],
)
def test_config_fields_of_wrong_type_or_range(changes, message):
    with pytest.raises(ModelConfigError) as caught:
        ModelConfig.from_hf_dict({**_hf_config(), **changes})
    assert message in str(caught.value)


def test_deeply_nested_config_json(capsys, tmp_path):
    folder = _copy(tmp_path)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_main(capsys, ["--model", str(folder), "--synthetic-tokens", "8"])
    assert_one_line_error(code, err, "nested too deeply")


def test_nan_and_integer_weights(tmp_path):
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][3] = np.nan
    tensors["model.layers.0.mlp.up_proj.weight"] = np.ones_like(
        tensors["model.layers.0.mlp.up_proj.weight"], dtype=np.int32
    )
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        load_model(folder)
    message = str(caught.value)
    assert "model.norm.weight: 1 non-finite value(s)" in message
    assert "model.layers.0.mlp.up_proj.weight: stored as int32" in message


def test_float32_weight_that_overflows_float16(tmp_path):
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], 1e6)
    save_file(tensors, folder / "model.safetensors")
    load_model(folder)  # finite in float32
    import jax.numpy as jnp

    with pytest.raises(CheckpointError, match="non-finite value.*float16"):
        load_model(folder, jnp.float16)


def test_tensor_stored_in_two_shards(tmp_path):
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[: len(names) // 2 + 1]}, folder / "model-1.safetensors")
    save_file({n: tensors[n] for n in names[len(names) // 2 :]}, folder / "model-2.safetensors")
    with pytest.raises(CheckpointError, match="stored twice, in model-1.safetensors and model-2"):
        load_model(folder)


@pytest.mark.parametrize("layers", [1, 3, 100_000])
def test_layer_count_mismatch_is_reported_at_once(capsys, tmp_path, layers):
    folder = _copy(tmp_path)
    _edit_config(folder, num_hidden_layers=layers)
    start = time.perf_counter()
    code, err = run_main(capsys, ["--model", str(folder), "--synthetic-tokens", "8"])
    assert time.perf_counter() - start < 20
    assert_one_line_error(code, err, f"num_hidden_layers={layers}, the stored tensors hold 2")


def test_tokenizer_with_ids_past_vocab_size(capsys, tmp_path):
    folder = _copy(tmp_path, PASSKEY_TINY)
    _edit_config(folder, vocab_size=200)  # the byte tokenizer produces ids up to 255
    with pytest.raises(TokenizerError, match="token ids up to 255, but the model's vocab_size"):
        load_tokenizer(folder, 200)
    code, err = run_main(capsys, ["--model", str(folder), "--prompt", "hello"])
    # The embedding table no longer matches either; whichever is found first is named.
    assert_one_line_error(code, err, str(folder))


def test_word_level_tokenizer_without_its_unknown_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "world": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"unknown token '\[UNK\]' is not in its vocabulary"):
        load_tokenizer(tmp_path)


def test_nan_logits_exit_3_with_one_line(capsys, tmp_path):
    folder = _copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    for name in ("q_proj", "k_proj"):  # scores overflow to inf, softmax gives NaN
        key = f"model.layers.0.self_attn.{name}.weight"
        tensors[key] = np.full_like(tensors[key], 1e25)
    save_file(tensors, folder / "model.safetensors")
    for extra in ([], ["--json"]):
        argv = ["--model", str(folder), "--synthetic-tokens", "16", "--mode", "dense", *extra]
        code, err = run_main(capsys, argv)
        assert code == 3, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "logits are NaN or inf" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "100000000000"], "exceed the int32 position range"),
        (["--synthetic-tokens", "100000000000", "--allow-long"], "int32 position range"),
        (["--synthetic-tokens", "2000000000", "--allow-long"], "GiB (weights and KV cache)"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_up_front(capsys, argv, message):
    assert_one_line_error(*run_main(capsys, argv), message)


def test_memory_estimate_refuses_only_what_cannot_fit():
    config = ModelConfig.from_hf_dict(_hf_config())
    check_fits(config, 4096, np.float32, what="x")  # tiny model, small prompt: fits
    with pytest.raises(DoesNotFitError, match="need at least"):
        check_fits(config, 2**31 - 1, np.float32, what="x", batch=10**6)


@pytest.mark.parametrize("prompt", ["\ufeff", "\u200b\u200b \u200d", "\ufeff\u2060\n"])
def test_prompt_of_only_invisible_characters_is_empty(capsys, prompt):
    assert_one_line_error(*run_main(capsys, ["--prompt", prompt]), "empty prompt")


def test_byte_order_mark_of_a_prompt_file_is_not_text(capsys, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"\xef\xbb\xbf")
    assert_one_line_error(*run_main(capsys, ["--prompt-file", str(path)]), "empty prompt")
