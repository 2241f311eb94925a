"""GGUF files (llama.cpp's format) -> our converted format.

A GGUF file holds the weights (often quantised), the model's hyper-parameters and its tokenizer
in one file. `convert_gguf` dequantises every tensor with the `gguf` package, maps llama.cpp's
tensor names onto Hugging Face's (then through the same family tables as an HF folder), undoes
the Q/K row permutation llama.cpp applies to Llama-architecture models, builds config.json from
the metadata and tokenizer.json from the vocabulary, and writes the folder with the same safety
rules as `convert.checkpoint.convert_folder` (atomic; a non-empty destination is refused).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from convert.checkpoint import (
    DTYPES,
    CheckpointError,
    check_destination,
    save_converted,
    with_rope_scaling,
    write_atomically,
)
from minference_jax.models.checkpoint import map_hf_tensors
from minference_jax.models.config import ModelConfig, ModelConfigError

GGUF_MAGIC = b"GGUF"
# llama.cpp architecture -> HF model_type (our families read it from there).
ARCHITECTURES = {"qwen2": "qwen2", "llama": "llama"}
# Tensor types read here; the gguf package dequantises each to float32.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp tensor name -> HF tensor name (regex substitutions, tried in order).
GGUF_TO_HF = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
)
# rope scaling types of GGUF metadata that our configs read (as HF's rope_scaling "type").
ROPE_SCALING_TYPES = ("linear", "yarn")


def hf_name(gguf_name: str) -> str | None:
    for pattern, replacement in GGUF_TO_HF:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, replacement, gguf_name)
    return None


def open_gguf(path):
    """A `gguf.GGUFReader` over the file (memory-mapped), or a one-line CheckpointError."""
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # truncated or corrupt: struct, numpy and value errors alike
        raise CheckpointError(
            f"cannot read GGUF file {path} (corrupt or truncated?): {err}"
        ) from err


def field(reader, key: str, default=None):
    """A metadata value as a Python value (str, int, float, bool or list), or `default`."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def hf_config_from_gguf(reader) -> dict:
    """An HF-style config.json dict from the metadata (what `ModelConfig.from_hf_dict` reads)."""
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )

    def meta(key, default=None):
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError(
            "this GGUF stores its RoPE scaling as a rope_freqs tensor (Llama 3.1 style), which "
            "is not read here; convert the Hugging Face safetensors folder instead"
        )
    if "token_embd.weight" not in names:
        raise CheckpointError("GGUF file has no token_embd.weight tensor")
    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // max(heads, 1)))
    rotary = int(meta("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(
            f"partial rotary embeddings ({rotary} of {head_dim} dims) are not supported"
        )
    config = {
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": int(names["token_embd.weight"].shape[1]),  # GGUF shape: [hidden, vocab]
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta("context_length")),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    for ours, key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if field(reader, key) is not None:
            config[ours] = int(field(reader, key))
    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", *ROPE_SCALING_TYPES):
        raise CheckpointError(f"GGUF rope scaling {scaling!r} is not supported")
    if scaling != "none":
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        config["rope_scaling"] = {
            "type": scaling,
            "factor": float(meta("rope.scaling.factor")),
            **({"original_max_position_embeddings": int(original)} if original else {}),
        }
    return config


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama Q/K permutation (per head, rows interleaved pairwise for its RoPE
    layout) back to HF's rotate-half order; works on weights [rows, in] and biases [rows]."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantised(tensor, hf: str, config: ModelConfig):
    """A function reading one GGUF tensor as float32 in HF's layout ([out, in] for weights)."""
    from gguf import quants

    def read() -> np.ndarray:
        try:
            array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        except Exception as err:  # bytes cut short by a truncated file
            raise CheckpointError(f"cannot dequantise GGUF tensor {tensor.name}: {err}") from err
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))  # GGUF: [in, out]
        if config.family == "llama":
            if ".q_proj." in hf:
                array = _unpermute_rows(array, config.num_heads)
            elif ".k_proj." in hf:
                array = _unpermute_rows(array, config.num_kv_heads)
        return array

    return read


def read_gguf_params(reader, config: ModelConfig, dtype, *, progress: bool = True, source=None):
    """Every tensor dequantised, renamed, mapped and cast; all problems reported together."""
    unsupported = sorted(
        {
            f"{t.name} ({t.tensor_type.name})"
            for t in reader.tensors
            if t.tensor_type.name not in SUPPORTED_TYPES
        }
    )
    if unsupported:
        raise CheckpointError(
            f"GGUF tensor types not supported: {', '.join(unsupported[:4])}"
            f"{' ...' if len(unsupported) > 4 else ''}; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    unknown = [t.name for t in reader.tensors if hf_name(t.name) is None]
    if unknown:
        raise CheckpointError(f"GGUF tensors with no known mapping: {', '.join(unknown[:8])}")
    tensors = [(hf_name(t.name), _dequantised(t, hf_name(t.name), config)) for t in reader.tensors]
    return map_hf_tensors(
        tensors,
        config,
        dtype,
        source=source or "GGUF file",
        against="its metadata",
        total=len(tensors),
        progress=progress,
    )


def convert_gguf(
    src,
    dst,
    dtype_name: str = "bfloat16",
    *,
    progress: bool = True,
    overwrite: bool = False,
    rope_scaling: dict | None = None,
) -> None:
    """GGUF file -> converted folder (weights, config.json, tokenizer and chat template).

    `rope_scaling` (an HF `rope_scaling` dict, e.g. Qwen2.5's YaRN) is written into config.json.
    """
    from convert.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

    if dtype_name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    src = pathlib.Path(src)
    check_destination(src, dst, overwrite=overwrite)
    reader = open_gguf(src)
    hf_config = hf_config_from_gguf(reader)
    if rope_scaling is not None:
        hf_config = with_rope_scaling(hf_config, rope_scaling)
    try:
        config = ModelConfig.from_hf_dict(hf_config)
    except ModelConfigError as err:
        raise CheckpointError(f"{src}: {err}") from err
    try:
        tokenizer, tokenizer_files = tokenizer_from_gguf(reader)
    except GGUFTokenizerError as err:
        raise CheckpointError(f"{src}: {err}") from err
    params = read_gguf_params(reader, config, DTYPES[dtype_name], progress=progress, source=src)

    def write(staging: pathlib.Path) -> None:
        save_converted(params, hf_config, staging, dtype_name)
        tokenizer.save(str(staging / "tokenizer.json"))
        for name, content in tokenizer_files.items():  # tokenizer_config, generation_config
            (staging / f"{name}.json").write_text(json.dumps(content, indent=1, ensure_ascii=False))

    write_atomically(dst, write, overwrite=overwrite)
