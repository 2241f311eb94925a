"""Tokenizers for the prefill CLI: a checkpoint's tokenizer.json, or bytes (built-in model)."""

from __future__ import annotations

import pathlib


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the embedded default model's vocabulary)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library (no hub access)."""

    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def load_tokenizer(folder) -> HFTokenizer | None:
    path = pathlib.Path(folder) / "tokenizer.json"
    return HFTokenizer(path) if path.is_file() else None
