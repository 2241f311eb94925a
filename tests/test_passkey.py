"""Passkey data generator and the byte-level tokenizer.json."""

import numpy as np
import pytest

from minference_jax import passkey
from minference_jax.tokenization import ByteTokenizer, HFTokenizer, save_byte_tokenizer


@pytest.mark.parametrize("length", [200, 1000, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_has_exact_length_needle_at_depth_and_question_last(length, depth):
    rng = np.random.default_rng([length, int(depth * 100)])
    prompt, key = passkey.passkey_prompt(rng, length, depth)
    assert len(prompt) == length and len(passkey.encode(prompt)) == length
    assert prompt.endswith(passkey.QUESTION)
    assert len(key) == passkey.KEY_DIGITS and key.isdigit()
    start = prompt.index(passkey.needle(key))
    assert prompt.count(key) == 2  # the needle states it twice, nothing else has digits
    room = length - len(passkey.needle(key)) - len(passkey.QUESTION)
    assert abs(start - depth * room) <= 200  # snapped back to a sentence start at most 200 chars


def test_training_batch_marks_the_answer():
    rng = np.random.default_rng(0)
    ids, answer = passkey.training_batch(rng, 3, 513)
    assert ids.shape == answer.shape == (3, 513)
    assert np.all(answer[:, -passkey.KEY_DIGITS :] == 1) and answer.sum() == 3 * passkey.KEY_DIGITS
    for row in ids:
        text = bytes(row.astype(np.uint8)).decode("ascii")
        key = text[-passkey.KEY_DIGITS :]
        assert passkey.needle(key) in text and text[: -passkey.KEY_DIGITS].endswith(
            passkey.QUESTION
        )


def test_pool_slices_and_bad_input():
    rng = np.random.default_rng(1)
    pool = passkey.haystack(rng, 5000)
    assert len(pool) == 5000
    assert passkey.haystack(rng, 100, pool) in pool
    with pytest.raises(ValueError, match="shorter"):
        passkey.haystack(rng, 6000, pool)
    with pytest.raises(ValueError, match="needs >="):
        passkey.passkey_prompt(rng, 50, 0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_prompt(rng, 500, 1.5)


def test_byte_tokenizer_json_matches_byte_ids(tmp_path):
    path = tmp_path / "tokenizer.json"
    save_byte_tokenizer(path)
    hf, ours = HFTokenizer(path), ByteTokenizer()
    rng = np.random.default_rng(2)
    for text in [
        "The pass key is 12345.",
        " leading space\n\ttabs\x00nul",
        "".join(chr(c) for c in rng.integers(1, 0x3000, 300)),
    ]:
        assert hf.encode(text) == ours.encode(text)
        assert hf.decode(hf.encode(text)) == text
