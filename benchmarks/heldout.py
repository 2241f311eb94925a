"""Held-out real text for evaluating pytext-12m: files it never trained on, as byte tokens.

`benchmarks/data/pytext_heldout.jsonl.gz` holds {"path", "text"} lines: Python sources and docs
that `benchmarks/train_longctx.py` held out by a hash of their path. They are joined as in
training (path, newline, text; documents separated by a NUL byte) into one byte stream, and
windows of it are the haystacks and perplexity documents of `benchmarks.niah`.

    python -m benchmarks.heldout --out DIR --tokens 8192   # prompt files for minference_jax.search
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import pathlib

import numpy as np

from benchmarks.device_guard import declare
from minference_jax import passkey

HELDOUT = pathlib.Path(__file__).parent / "data" / "pytext_heldout.jsonl.gz"
SEPARATOR = b"\x00"  # between documents, as in training


@functools.cache
def heldout_docs(path: pathlib.Path = HELDOUT) -> tuple[tuple[str, str], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return tuple((row["path"], row["text"]) for row in rows)


@functools.cache
def heldout_stream(path: pathlib.Path = HELDOUT) -> np.ndarray:
    """uint8 byte stream of every held-out document (path, newline, text; NUL-separated)."""
    joined = SEPARATOR.join(f"{p}\n{t}".encode() for p, t in heldout_docs(path))
    return np.frombuffer(joined, np.uint8)


def window(rng: np.random.Generator, length: int, path: pathlib.Path = HELDOUT) -> np.ndarray:
    """A random window of `length` tokens of the held-out stream (int32 byte ids)."""
    stream = heldout_stream(path)
    if length > len(stream):
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than {length}")
    start = int(rng.integers(0, len(stream) - length + 1))
    return stream[start : start + length].astype(np.int32)


def passkey_prompt(
    rng: np.random.Generator,
    length: int,
    depth: float,
    key: str | None = None,
    path: pathlib.Path = HELDOUT,
) -> tuple[np.ndarray, str]:
    """(token ids of exactly `length`, key): the passkey needle at `depth` of a held-out window,
    then the question — the format the model saw in training (bytes read as latin-1, so every
    byte passes through unchanged)."""
    text = bytes(window(rng, length, path).astype(np.uint8)).decode("latin-1")
    prompt, key = passkey.passkey_prompt(rng, length, depth, key=key, pool=text)
    return np.frombuffer(prompt.encode("latin-1"), np.uint8).astype(np.int32), key


def prompt_text(ids: np.ndarray) -> str:
    """Token ids of held-out text as a UTF-8 prompt-file text (NUL separators become newlines;
    a character cut at a window edge is dropped)."""
    data = bytes(np.asarray(ids, np.uint8)).replace(SEPARATOR, b"\n")
    return data.decode("utf-8", errors="ignore")


def passkey_prompt_file(tokens: int, depth: float, key: str, seed: int) -> str:
    """A UTF-8 prompt-file text of about `tokens` tokens: a held-out window with the passkey
    needle (`key`) at `depth` and the question at the end. The CLI's default prompt
    (minference_jax/checkpoints/pytext-12m/default_prompt.txt) is
    passkey_prompt_file(2048, 0.4, "71432", seed=0)."""
    rng = np.random.default_rng(seed)
    text = prompt_text(window(rng, tokens))
    prompt, _ = passkey.passkey_prompt(rng, len(text), depth, key=key, pool=text)
    return prompt


def write_prompt_files(out: pathlib.Path, tokens: int, seed: int = 0) -> list[pathlib.Path]:
    """Two search prompts of ~`tokens` tokens: plain held-out text, and held-out text with a
    passkey needle at 40% depth and the question at the end (so retrieval heads attend far)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    plain = out / f"heldout_{tokens}.txt"
    plain.write_text(prompt_text(window(rng, tokens)), encoding="utf-8")
    text = prompt_text(window(rng, tokens))
    prompt, _ = passkey.passkey_prompt(rng, len(text), 0.4, pool=text)
    with_key = out / f"heldout_passkey_{tokens}.txt"
    with_key.write_text(prompt, encoding="utf-8")
    return [plain, with_key]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="write held-out search prompt files")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder to write into")
    parser.add_argument("--tokens", type=int, default=8192, help="length of each prompt")
    parser.add_argument("--seed", type=int, default=0, help="which windows")
    declare(parser, "heldout")
    args = parser.parse_args(argv)
    for path in write_prompt_files(args.out, args.tokens, args.seed):
        print(path)


if __name__ == "__main__":
    main()
