"""convert.gguf_tokenizer against the ids transformers' GGUF tokenizer gives on tiny GGUF files.

The fixtures and the recorded ids come from tests/fixtures/make_gguf_tokenizer_fixtures.py
(AutoTokenizer.from_pretrained(dir, gguf_file=name) under torch + transformers).
"""

import json
import pathlib

import gguf
import numpy as np
import pytest

from convert.gguf_tokenizer import GGUFTokenizerError, tokenizer_from_gguf

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "gguf"
RECORD = json.loads((FIXTURES / "tokenizer_ids.json").read_text())
FILES = sorted(RECORD["files"])


def _load(name):
    reader = gguf.GGUFReader(str(FIXTURES / name))
    return (reader, *tokenizer_from_gguf(reader))


@pytest.fixture(scope="module", params=FILES)
def built(request):
    return request.param, *_load(request.param)


def test_fixtures_are_small_and_cover_both_models():
    assert FILES == ["llama3_bpe.gguf", "llama_spm.gguf", "qwen2_bpe.gguf"]
    assert sum((FIXTURES / name).stat().st_size for name in FILES) < 200_000
    assert "" in RECORD["strings"] and "12345 678" in RECORD["strings"]


def test_ids_match_transformers(built):
    name, _, tok, _ = built
    record = RECORD["files"][name]
    for text, ids, plain in zip(
        RECORD["strings"], record["ids"], record["ids_no_special"], strict=True
    ):
        assert tok.encode(text).ids == ids, text
        assert tok.encode(text, add_special_tokens=False).ids == plain, text
    # merges are actually applied: some string encodes to fewer ids than it has bytes
    pairs = zip(RECORD["strings"], record["ids_no_special"], strict=True)
    assert any(0 < len(p) < len(s.encode()) for s, p in pairs)


def test_decode_matches_transformers(built):
    name, _, tok, _ = built
    record = RECORD["files"][name]
    for ids, text in zip(record["ids"], record["decoded"], strict=True):
        assert tok.decode(ids, skip_special_tokens=False) == text
    for ids, text in zip(record["ids_no_special"], record["decoded_no_special"], strict=True):
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_byte_level_round_trip():
    _, tok, _ = _load("qwen2_bpe.gguf")
    for text in RECORD["strings"] + ["\x00\x7f\u200b tab\t  x", "🙂" * 3 + "\n" * 5]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "name, token",
    [
        ("qwen2_bpe.gguf", "<|im_start|>"),
        ("qwen2_bpe.gguf", "<|im_end|>"),
        ("qwen2_bpe.gguf", "<|endoftext|>"),
        ("qwen2_bpe.gguf", "<think>"),
        ("llama_spm.gguf", "<s>"),
        ("llama_spm.gguf", "</s>"),
        ("llama_spm.gguf", "<unk>"),
    ],
)
def test_special_tokens_are_single_ids(name, token):
    reader, tok, _ = _load(name)
    index = reader.fields["tokenizer.ggml.tokens"].contents().index(token)
    assert tok.encode(f"a{token}b", add_special_tokens=False).ids.count(index) == 1
    assert tok.encode(token, add_special_tokens=False).ids == [index]


def test_extras_qwen2():
    reader, tok, extras = _load("qwen2_bpe.gguf")
    config = extras["tokenizer_config"]
    template = reader.fields["tokenizer.chat_template"].contents()
    assert config["chat_template"] == template and "<|im_start|>" in template
    assert template.endswith("{%- endif %}\n")  # kept verbatim, trailing newline included
    assert config["bos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["model_max_length"] == 64
    ids = extras["generation_config"]
    assert ids == {
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
    }


def test_extras_llama_adds_bos_by_default():
    _, tok, extras = _load("llama_spm.gguf")
    assert extras["tokenizer_config"]["add_bos_token"] is True
    assert "chat_template" not in extras["tokenizer_config"]
    assert extras["generation_config"] == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }
    assert tok.encode("hi").ids[0] == 1 and tok.encode("hi", add_special_tokens=False).ids[0] != 1


def _write_gguf(path, model, pre=None):
    tokens = ["a", "b", "ab", "<|endoftext|>"]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def test_written_gguf_builds(tmp_path):
    tok, _ = tokenizer_from_gguf(_write_gguf(tmp_path / "ok.gguf", "gpt2", "qwen2"))
    assert tok.encode("ab<|endoftext|>a").ids == [2, 3, 0]


def test_unsupported_model_raises(tmp_path):
    reader = _write_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(GGUFTokenizerError, match="'bert'"):
        tokenizer_from_gguf(reader)


def test_unknown_pre_raises(tmp_path):
    reader = _write_gguf(tmp_path / "pre.gguf", "gpt2", "made-up-pre")
    with pytest.raises(GGUFTokenizerError, match="'made-up-pre'"):
        tokenizer_from_gguf(reader)
    assert issubclass(GGUFTokenizerError, ValueError)
