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


class TokenizerError(ValueError):
    """A tokenizer.json that the `tokenizers` library cannot read."""


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library (no hub access)."""

    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception for every bad file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TokenizerError(f"cannot read {path}: {reason}") from err
        unknown = getattr(self._tokenizer.model, "unk_token", None)
        if unknown and self._tokenizer.token_to_id(unknown) is None:
            # The library would raise a bare Exception at the first unseen word.
            raise TokenizerError(f"{path}: its unknown token {unknown!r} is not in its vocabulary")
        self.path = path

    @property
    def id_limit(self) -> int:
        """One past the largest id the tokenizer can produce (added tokens included)."""
        return max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def check_vocab_size(self, vocab_size: int) -> None:
        """Refuse a tokenizer whose ids run past the model's embedding table."""
        if self.id_limit > vocab_size:
            raise TokenizerError(
                f"{self.path} produces token ids up to {self.id_limit - 1}, but the model's "
                f"vocab_size is {vocab_size}: tokenizer and checkpoint do not belong together"
            )

    def encode(self, text: str) -> list[int]:
        try:
            return self._tokenizer.encode(text).ids
        except Exception as err:  # the library raises bare Exceptions
            raise TokenizerError(f"{self.path} cannot encode the prompt: {err}") from err

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100.."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return table


def save_byte_tokenizer(path) -> None:
    """Write a `tokenizer.json` whose ids are the UTF-8 bytes (the same ids as ByteTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


def load_tokenizer(folder, vocab_size: int | None = None) -> HFTokenizer | None:
    """The folder's tokenizer.json, or None when it has none.

    TokenizerError if it is unreadable, or, given the model's `vocab_size`, if it can produce
    ids outside the embedding table (they would index out of range silently under jit).
    """
    path = pathlib.Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = HFTokenizer(path)
    if vocab_size is not None:
        tokenizer.check_vocab_size(vocab_size)
    return tokenizer
