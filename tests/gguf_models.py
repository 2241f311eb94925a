"""Tiny random GGUF models written with `gguf.GGUFWriter` (tests and their fixture script).

`write_tiny_gguf(path, arch, seed)` is deterministic: the same seed writes the same bytes, so
tests regenerate the file that `tests/fixtures/make_gguf_fixtures.py` ran transformers on. The
weights come in llama.cpp's layout (Llama Q/K rows permuted for its RoPE) and in a mix of tensor
types: quantised (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0) and float (F32, F16, BF16). K-quant blocks are
random bytes with sane scales (the gguf package cannot quantise to them).
"""

from __future__ import annotations

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # K-quants: rows of 256
HEAD_DIM = HIDDEN // HEADS
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("Ġ t", "h e", "Ġt he")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Tensor type of each weight (by llama.cpp name suffix); norms and biases stay F32.
TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q6_K",
    "attn_q.weight": "Q4_K",
    "attn_k.weight": "Q5_K",
    "attn_v.weight": "Q6_K",
    "attn_output.weight": "F16",
    "ffn_gate.weight": "Q4_0",
    "ffn_up.weight": "BF16",
    "ffn_down.weight": "Q4_K",
}


def byte_tokens() -> list[str]:
    """The byte-level BPE alphabet (GPT-2's bytes -> printable characters), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def vocabulary() -> tuple[list[str], list[int]]:
    merged = ["Ġt", "he", "Ġthe"]
    tokens = byte_tokens() + merged + list(SPECIAL)
    types = [1] * (256 + len(merged)) + [3] * len(SPECIAL)  # 1 normal, 3 control
    return tokens, types


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert: HF rotate-half rows -> interleaved pairs, per head."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _k_quant_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant bytes [rows, blocks * type_size] whose f16 scales are small and finite."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = rng.uniform(0.002, 0.02, (rows, cols // block)).astype(np.float16).view(np.uint8)
    d = d.reshape(rows, cols // block, 2)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[..., -2:] = d  # d is the block's last field
    else:  # Q4_K, Q5_K: d, dmin first
        raw[..., 0:2] = d
        raw[..., 2:4] = (d.view(np.float16) / 2).view(np.uint8)
    return raw.reshape(rows, -1)


def _encode(rng, name: str, weight: np.ndarray, type_name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; weight in HF layout [out, in] or [n]."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in ("Q4_K", "Q5_K", "Q6_K"):
        return _k_quant_blocks(rng, *weight.shape, qtype), qtype
    if type_name == "F32":
        return weight.astype(np.float32), None
    if type_name == "F16":
        return weight.astype(np.float16), None
    return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype


def write_tiny_gguf(path, arch: str = "qwen2", seed: int = 0, *, tied: bool = False) -> None:
    """A 2-layer random `arch` ("qwen2": q/k/v biases; "llama": permuted Q/K rows) model with a
    byte-level BPE tokenizer and a chat template in its metadata."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, weight: np.ndarray, type_name: str = "F32") -> None:
        data, raw = _encode(rng, name, weight, type_name)
        if raw is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=raw)

    def normal(*shape, scale=0.05):
        return rng.standard_normal(shape).astype(np.float32) * scale

    add("token_embd.weight", normal(vocab, HIDDEN, scale=0.5), TYPES["token_embd.weight"])
    add("output_norm.weight", 1 + normal(HIDDEN, scale=0.1))
    if not tied:
        add("output.weight", normal(vocab, HIDDEN), TYPES["output.weight"])
    kv_rows = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        q, k = normal(HIDDEN, HIDDEN), normal(kv_rows, HIDDEN)
        if arch == "llama":
            q, k = llama_cpp_permute(q, HEADS), llama_cpp_permute(k, KV_HEADS)
        add(f"blk.{i}.attn_norm.weight", 1 + normal(HIDDEN, scale=0.1))
        add(f"blk.{i}.attn_q.weight", q, TYPES["attn_q.weight"])
        add(f"blk.{i}.attn_k.weight", k, TYPES["attn_k.weight"])
        add(f"blk.{i}.attn_v.weight", normal(kv_rows, HIDDEN), TYPES["attn_v.weight"])
        if arch == "qwen2":
            add(f"blk.{i}.attn_q.bias", normal(HIDDEN, scale=0.5))
            add(f"blk.{i}.attn_k.bias", normal(kv_rows, scale=0.5))
            add(f"blk.{i}.attn_v.bias", normal(kv_rows, scale=0.5))
        add(f"blk.{i}.attn_output.weight", normal(HIDDEN, HIDDEN), TYPES["attn_output.weight"])
        add(f"blk.{i}.ffn_norm.weight", 1 + normal(HIDDEN, scale=0.1))
        add(f"blk.{i}.ffn_gate.weight", normal(INTERMEDIATE, HIDDEN), TYPES["ffn_gate.weight"])
        add(f"blk.{i}.ffn_up.weight", normal(INTERMEDIATE, HIDDEN), TYPES["ffn_up.weight"])
        add(f"blk.{i}.ffn_down.weight", normal(HIDDEN, INTERMEDIATE), TYPES["ffn_down.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
