"""Passkey retrieval data: haystack text with one needle, for training and evaluation.

A document is haystack sentences with the needle "The pass key is 12345. Remember it. 12345 is
the pass key." at a chosen depth, then the question "What is the pass key? The pass key is" and
(for training) the 5-digit answer. The haystack mixes the classic passkey filler sentences with
sentences of pseudo-words drawn from a fixed Zipfian vocabulary, so it is neither trivially
repetitive nor free of local structure. Lengths are in tokens of the byte tokenizer (UTF-8 bytes,
all ASCII here), so a document of N tokens is exactly N characters.
"""

from __future__ import annotations

import numpy as np

FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
QUESTION = " What is the pass key? The pass key is "
KEY_DIGITS = 5
_SYLLABLES = tuple(c + v for c in "bdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou"))


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def _vocabulary(size: int = 512) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(1234)  # fixed: the same words in training and evaluation
    candidates = {"".join(rng.choice(_SYLLABLES, rng.integers(1, 4))) for _ in range(size * 2)}
    words = sorted(candidates)[:size]
    order = rng.permutation(len(words))
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf over a random order of the words
    return [words[i] for i in order], weights / weights.sum()


_WORDS, _WORD_P = _vocabulary()


def random_key(rng: np.random.Generator) -> str:
    return str(rng.integers(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))


def haystack(rng: np.random.Generator, length: int, pool: str | None = None) -> str:
    """Exactly `length` characters of sentences (the last one cut).

    With `pool` (a long haystack made once, e.g. for training), a random slice of it instead:
    fast, and a different pool seed keeps evaluation text out of the training text.
    """
    if pool is not None:
        if length > len(pool):
            raise ValueError(f"pool of {len(pool)} characters is shorter than {length}")
        start = int(rng.integers(0, len(pool) - length + 1))
        return pool[start : start + length]
    parts, size = [], 0
    while size < length:
        if rng.random() < 0.3:
            sentence = FILLER[rng.integers(len(FILLER))]
        else:
            words = rng.choice(_WORDS, size=rng.integers(4, 12), p=_WORD_P)
            sentence = " ".join(words).capitalize() + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:length]


def passkey_prompt(
    rng: np.random.Generator,
    length: int,
    depth: float,
    key: str | None = None,
    pool: str | None = None,
) -> tuple[str, str]:
    """(prompt of exactly `length` characters ending with the question, answer key).

    depth in [0, 1]: where the needle starts, as a fraction of the haystack.
    """
    key = key or random_key(rng)
    text_needle = needle(key)
    room = length - len(text_needle) - len(QUESTION)
    if room < 0:
        raise ValueError(f"a passkey prompt needs >= {length - room} characters, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    filler = haystack(rng, room, pool)
    cut = int(round(depth * room))
    # Start the needle at a sentence boundary near the requested depth when there is one.
    boundary = filler.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 and cut - boundary < 200 else cut
    return filler[:cut] + text_needle + filler[cut:] + QUESTION, key


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), np.uint8).astype(np.int32)


def training_batch(
    rng: np.random.Generator, batch: int, length: int, pool: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [batch, length] (prompt + answer) and a 0/1 mask of the answer tokens."""
    ids = np.empty((batch, length), np.int32)
    for row in range(batch):
        prompt, key = passkey_prompt(rng, length - KEY_DIGITS, rng.random(), pool=pool)
        ids[row] = encode(prompt + key)
    answer = np.zeros((batch, length), np.float32)
    answer[:, length - KEY_DIGITS :] = 1.0
    return ids, answer


def multikey_needle(name: str, key: str) -> str:
    return f"The number of {name} is {key}. "


def multikey_question(name: str) -> str:
    return f" What is the number of {name}? The number of {name} is "


def multikey_prompt(
    rng: np.random.Generator, length: int, num_keys: int, pool: str | None = None
) -> tuple[str, str]:
    """(prompt of exactly `length` characters, answer key): `num_keys` needles
    "The number of <name> is <key>." with distinct pseudo-word names at random depths, then a
    question about one of them. Harder than one passkey: the model must match the name too.
    """
    if num_keys < 1:
        raise ValueError(f"num_keys must be >= 1, got {num_keys}")
    names = [_WORDS[i] for i in rng.choice(len(_WORDS), num_keys, replace=False)]
    keys = [random_key(rng) for _ in names]
    target = int(rng.integers(num_keys))
    needles = [multikey_needle(n, k) for n, k in zip(names, keys, strict=True)]
    question = multikey_question(names[target])
    room = length - sum(map(len, needles)) - len(question)
    if room < 0:
        raise ValueError(
            f"a {num_keys}-key prompt needs >= {length - room} characters, got {length}"
        )
    filler = haystack(rng, room, pool)
    cuts = np.sort(rng.integers(0, room + 1, num_keys))
    parts, previous = [], 0
    for cut, text in zip(cuts, needles, strict=True):
        parts += [filler[previous:cut], text]
        previous = int(cut)
    return "".join(parts) + filler[previous:] + question, keys[target]
