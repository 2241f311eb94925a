"""A `tokenizers.Tokenizer` built from a GGUF file's metadata, without transformers.

A GGUF carries no `tokenizer.json`: the vocabulary, merges, token types and special ids are stored
as `tokenizer.*` metadata under llama.cpp's names. This rebuilds the tokenizer the way transformers'
GGUF loader does (transformers/integrations/gguf/gguf_tokenizer_mapping.py; `AutoTokenizer`
with `gguf_file=`), so the ids match it:

    tokenizer, extras = tokenizer_from_gguf(gguf.GGUFReader(path))
    extras["tokenizer_config"]   # bos/eos/pad/unk strings, add_bos_token, chat_template, ...
    extras["generation_config"]  # bos_token_id, eos_token_id, pad_token_id

Supported `tokenizer.ggml.model` values: "gpt2" (byte-level BPE; the split regex is picked by
`tokenizer.ggml.pre`) and "llama" (SentencePiece-style BPE with byte fallback).
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = ["GGUFTokenizerError", "tokenizer_from_gguf"]

# llama.cpp token types (llama_token_type / gguf.TokenType).
CONTROL, USER_DEFINED = 3, 4

# Split regexes by `tokenizer.ggml.pre`, as transformers maps them (GGUF_PRE_TOKENIZER_SPLITS).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
}
_SPM_SPECIAL_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")
# Files without a `pre` (older converts) or marked GPT-2 keep ByteLevel's own GPT-2 regex.
_GPT2_DEFAULT_PRE = (None, "default", "gpt-2")


class GGUFTokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing or describes a tokenizer we cannot build."""


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _merges(tokens: list[str], merges: list[str] | None, scores: list[float] | None):
    """The file's merges, or (SentencePiece files store none) the ones its scores imply.

    The derivation is transformers' `generate_merges`: every split of a token into two vocabulary
    tokens, ordered by the merged token's score (best first), ties by the pieces' lengths.
    """
    if merges is not None:
        return [tuple(m.split(" ")) for m in merges]
    if scores is None:
        raise GGUFTokenizerError("GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in dict(zip(tokens, scores, strict=True)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _byte_level(reader, tokens: list[str]) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens outside the byte alphabet are re-spelled from their UTF-8 bytes, as transformers does.
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    merges = _merges(tokens, _field(reader, "tokenizer.ggml.merges"), None)
    tok = Tokenizer(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="")
    )
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _GPT2_DEFAULT_PRE:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise GGUFTokenizerError(
            f"unknown tokenizer.ggml.pre {pre!r}; supported: {sorted(_PRE_SPLITS)} and gpt-2"
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(reader, tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _merges(
        tokens, _field(reader, "tokenizer.ggml.merges"), _field(reader, "tokenizer.ggml.scores")
    )
    tok = Tokenizer(BPE(vocab, merges, dropout=None, fuse_unk=True, byte_fallback=True))
    # transformers' LlamaTokenizer (legacy=False): "▁" before the first word only, no split.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    return tok


def tokenizer_from_gguf(reader) -> tuple[Tokenizer, dict]:
    """`(tokenizer, extras)` for the tokenizer `reader` (a `gguf.GGUFReader`) describes.

    extras = {"tokenizer_config": {...}, "generation_config": {...}}: the contents worth saving
    as tokenizer_config.json and as generation_config.json ids beside tokenizer.json.
    """
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model not in ("gpt2", "llama"):
        raise GGUFTokenizerError(
            f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
            "supported: 'gpt2', 'llama'"
        )
    if not tokens:
        raise GGUFTokenizerError("GGUF has no tokenizer.ggml.tokens")
    arch = _field(reader, "general.architecture")
    if model == "llama" and arch in _SPM_SPECIAL_ARCHS:
        # transformers builds these differently (respelled tokens, merges by file order, ...).
        raise GGUFTokenizerError(f"SentencePiece GGUF tokenizer of {arch!r} is not supported")
    tok = _byte_level(reader, tokens) if model == "gpt2" else _sentencepiece(reader, tokens)

    # Control tokens become special added tokens, user-defined ones plain added tokens, so both
    # are matched whole in text. A byte-level "control" token spelled outside the byte alphabet
    # is a llama.cpp mislabel that transformers skips; so do we.
    types = _field(reader, "tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if model == "gpt2" else None
    control = [
        t
        for t, kind in zip(tokens, types, strict=False)
        if kind == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == USER_DEFINED]
    user = [t for t in user if tok.token_to_id(t) is not None]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    ids = {
        name: _field(reader, f"tokenizer.ggml.{key}")
        for name, key in (
            ("bos", "bos_token_id"),
            ("eos", "eos_token_id"),
            ("unk", "unknown_token_id"),
            ("pad", "padding_token_id"),
        )
    }
    strings = {name: None if i is None else tokens[i] for name, i in ids.items()}
    # transformers also registers bos/eos/unk/pad as special tokens (e.g. llama's <unk>).
    named = [s for s in strings.values() if s is not None]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in named])

    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    add_bos, add_eos = add_bos and ids["bos"] is not None, add_eos and ids["eos"] is not None
    # The post-processor transformers' update_post_processor() builds: [bos] $A [eos].
    special = [(strings[n], ids[n]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on]
    bos, eos = ([strings["bos"]] if add_bos else []), ([strings["eos"]] if add_eos else [])
    single = [*bos, "$A", *eos]
    pair = single + [*bos, "$B", *eos]
    tok.post_processor = processors.TemplateProcessing(
        single=[f"{t}:0" for t in single],
        pair=[f"{t}:{int(i >= len(single))}" for i, t in enumerate(pair)],
        special_tokens=special,
    )

    config: dict[str, Any] = {
        "bos_token": strings["bos"],
        "eos_token": strings["eos"],
        "unk_token": strings["unk"],
        "pad_token": strings["pad"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template  # verbatim
    context = _field(reader, f"{arch}.context_length") if arch else None
    if context is not None:
        config["model_max_length"] = int(context)
    generation = {f"{name}_token_id": ids[name] for name in ("bos", "eos", "pad")}
    return tok, {"tokenizer_config": config, "generation_config": generation}
