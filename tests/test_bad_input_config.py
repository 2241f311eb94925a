"""Pattern-config files: a bad save never touches an existing file, a bad file never loads."""

import json
import os
import stat

import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.config_io import (
    PatternConfigError,
    load_pattern_config,
    parse_pattern_config,
    save_pattern_config,
)

LAYER = (P.VerticalSlash(30, 50), P.AShape(4, 64), P.BlockSparse(7), P.Dense())
PATTERNS = P.HeadPatterns((LAYER, LAYER[::-1]))
EXISTING = b'[{"0": ["stream_llm", 1, 2, 0.5]}]'
VS = ["vertical_and_slash", 30, 50, 0.9]


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(EXISTING)
    return path


def _scores(value):
    return [[0.5, 0.5, 0.5, value], [0.5] * 4]


@pytest.mark.parametrize(
    "patterns, scores, message",
    [
        (PATTERNS, _scores(float("nan")), "layer 0 head 3: score must be a finite number"),
        (PATTERNS, _scores(float("inf")), "score must be a finite number"),
        (PATTERNS, _scores("0.5"), "score must be a finite number"),
        (PATTERNS, _scores(None), "score must be a finite number"),
        (PATTERNS, _scores(True), "score must be a finite number"),
        (PATTERNS, [[0.5] * 4], "1 rows of scores for 2 layers"),
        (PATTERNS, [[0.5] * 4] * 3, "3 rows of scores for 2 layers"),
        (PATTERNS, [[0.5] * 3, [0.5] * 4], "layer 0: 3 scores for 4 heads"),
        (P.HeadPatterns(((P.BlockSparse(2, 32),),)), None, "64-token block-sparse blocks"),
        (P.HeadPatterns(((P.AShape(4, 2**31),),)), None, "s_size must be <= 2147483647"),
        ([[P.Dense()]], None, "expected HeadPatterns, got list"),
    ],
)
def test_bad_save_leaves_the_existing_file_byte_identical(existing, patterns, scores, message):
    with pytest.raises(PatternConfigError, match=message):
        save_pattern_config(patterns, existing, scores)
    assert existing.read_bytes() == EXISTING
    assert [p.name for p in existing.parent.iterdir()] == ["config.json"]


def test_save_into_a_directory_or_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(PatternConfigError, match="is a directory"):
        save_pattern_config(PATTERNS, tmp_path)
    with pytest.raises(FileNotFoundError):
        save_pattern_config(PATTERNS, tmp_path / "missing" / "c.json")
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_atomically_with_the_usual_file_mode(existing):
    scores = np.random.default_rng(0).random((2, 4)).astype(np.float32)  # numpy scores are fine
    save_pattern_config(PATTERNS, existing, scores)
    assert load_pattern_config(existing) == PATTERNS
    _, loaded = parse_pattern_config(json.loads(existing.read_text()))
    np.testing.assert_array_equal(np.float32(loaded), scores)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in existing.parent.iterdir()] == ["config.json"]


def test_save_writes_the_same_bytes_as_json_dump(tmp_path):
    """The file format did not change: json.dump of the list-per-layer form."""
    save_pattern_config(PATTERNS, tmp_path / "c.json", [[0.25, 1, 0.0, 0.5]] * 2)
    expected = json.dumps(
        [
            {
                "0": ["vertical_and_slash", 30, 50, 0.25],
                "1": ["stream_llm", 4, 64, 1],
                "2": ["block_sparse", 7, 0, 0.0],
                "3": ["dense", 0, 0, 0.5],
            },
            {
                "0": ["dense", 0, 0, 0.25],
                "1": ["block_sparse", 7, 0, 1],
                "2": ["stream_llm", 4, 64, 0.0],
                "3": ["vertical_and_slash", 30, 50, 0.5],
            },
        ]
    )
    assert (tmp_path / "c.json").read_text() == expected


def _write(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (bytes(range(256)), "is not UTF-8 JSON text"),
        (b"\x00\x01\x02", "is not valid JSON"),
        (b"[" * 100000, "is not valid JSON"),
        (b"[NaN]", "non-empty"),
        ([{"0": VS, "01": VS}], "got '01'"),
        ([{"00": VS}], "got '00'"),
        ([{"+0": VS}], "got '\\+0'"),
        ([{" 0": VS}], "got ' 0'"),
        ([{"1" * 5000: VS}], "head keys must be integers"),
        ([{"0": ["block_sparse", 10**12, 0, 0.9]}], "v_size must be <= 2147483647"),
        ([{"0": ["stream_llm", 1, 2**31, 0.9]}], "s_size must be <= 2147483647"),
        ([{"0": ["vertical_and_slash", 1, 2, float("nan")]}], "score must be a finite number"),
    ],
)
def test_bad_files_raise_pattern_config_errors(tmp_path, content, message):
    with pytest.raises(PatternConfigError, match=message):
        load_pattern_config(_write(tmp_path, content))


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(PatternConfigError, match="is a directory"):
        load_pattern_config(tmp_path)


def test_largest_sizes_still_load(tmp_path):
    big = 2**31 - 1
    patterns = load_pattern_config(_write(tmp_path, [{"0": ["block_sparse", big, 0, 1.0]}]))
    assert patterns[0][0] == P.BlockSparse(big)
