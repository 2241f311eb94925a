"""Pattern-config files: a bad save never touches an existing file, a bad file never loads."""

import dataclasses
import json
import os
import re
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
from minference_jax.index_approx import plan_index

LAYER = (P.VerticalSlash(30, 50), P.AShape(4, 64), P.BlockSparse(7), P.Dense())
PATTERNS = P.HeadPatterns((LAYER, LAYER[::-1]))
EXISTING = b'[{"0": ["stream_llm", 1, 2, 0.5]}]'
VS = ["vertical_and_slash", 30, 50, 0.9]
ADB, AVS = P.AntiDiagonalBlockSparse, P.AdaptiveVerticalSlash
BLOCK_32 = ".block_size=32 must be one of (64, 128), the key-block sizes of the default index plans"
SHARE = "adaptive heads of one layer must share the rule and the stride; got rules "


@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(EXISTING)
    return path


def _one_layer(*heads):
    return P.HeadPatterns((heads,))


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
        (
            _one_layer(ADB(stride=8, block_size=32)),
            None,
            "layer 0: head 0: AntiDiagonalBlockSparse" + BLOCK_32,
        ),
        (_one_layer(AVS(query_aware=0.5, block_size=32)), None, "AdaptiveVerticalSlash" + BLOCK_32),
        (
            _one_layer(ADB(stride=16), ADB()),
            None,
            "layer 0: " + SHARE + "['cumulative'], strides [8, 16]",
        ),
        (_one_layer(ADB(), AVS(rule="relative")), None, "got rules ['cumulative', 'relative']"),
        (_one_layer(P.BlockSparse(4), ADB(block_size=128)), None, "sizes (64 and 128)"),
        ([[P.Dense()]], None, "expected HeadPatterns, got list"),
    ],
)
def test_bad_save_leaves_the_existing_file_byte_identical(existing, patterns, scores, message):
    with pytest.raises(PatternConfigError, match=re.escape(message)):
        save_pattern_config(patterns, existing, scores)
    assert existing.read_bytes() == EXISTING
    assert [p.name for p in existing.parent.iterdir()] == ["config.json"]


def test_save_into_a_directory_or_missing_folder_fails_cleanly(tmp_path):
    with pytest.raises(PatternConfigError, match="is a directory"):
        save_pattern_config(PATTERNS, tmp_path)
    missing = tmp_path / "missing" / "c.json"
    with pytest.raises(FileNotFoundError) as info:
        save_pattern_config(PATTERNS, missing)
    assert info.value.filename == str(missing)  # the user's path, not the temporary file
    assert ".tmp" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_save_through_a_symlink_writes_its_target(tmp_path, existing):
    links = tmp_path / "links"
    links.mkdir()
    link = links / "link.json"
    link.symlink_to(os.path.join("..", existing.name))  # relative, from another folder
    save_pattern_config(PATTERNS, link)
    assert link.is_symlink() and link.resolve() == existing.resolve()
    assert load_pattern_config(existing) == PATTERNS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "links"]
    assert [p.name for p in links.iterdir()] == ["link.json"]


def test_save_through_a_dangling_symlink_creates_its_target(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    save_pattern_config(PATTERNS, link)
    assert link.is_symlink() and load_pattern_config(tmp_path / "target.json") == PATTERNS


def test_resave_keeps_the_existing_files_mode(existing):
    existing.chmod(0o600)
    save_pattern_config(PATTERNS, existing)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert load_pattern_config(existing) == PATTERNS


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


def _adaptive(kind, **fields):
    name = "anti_diagonal_block_sparse" if kind is ADB else "adaptive_vertical_and_slash"
    return [name, fields, 0, 0.9]


DENSE = ["dense", 0, 0, 0.5]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            [{"0": _adaptive(ADB, block_size=32)}],
            "layer 0: head 0: AntiDiagonalBlockSparse" + BLOCK_32,
        ),
        (
            [{"0": DENSE}, {"0": _adaptive(AVS, query_aware=0.5, block_size=32)}],
            "layer 1: head 0: AdaptiveVerticalSlash" + BLOCK_32,
        ),
        (
            [{"0": _adaptive(ADB, stride=8), "1": DENSE, "2": _adaptive(ADB, stride=32)}],
            "layer 0: " + SHARE + "['cumulative'], strides [8, 32]",
        ),
        (
            [{"0": _adaptive(ADB), "1": _adaptive(AVS, rule="relative")}],
            "layer 0: " + SHARE + "['cumulative', 'relative'], strides [8]",
        ),
        (
            [
                {
                    "0": ["block_sparse", 4, 0, 0.9],
                    "1": _adaptive(AVS, query_aware=1, block_size=128),
                }
            ],
            "layer 0: heads 0 and 1 select key blocks of different sizes (64 and 128)",
        ),
        (
            [{"0": _adaptive(AVS, max_vertical=2**40)}],
            "AdaptiveVerticalSlash.max_vertical must be <= 2147483647, got 1099511627776",
        ),
        (
            [{"0": _adaptive(ADB, max_blocks=2**31)}],
            "AntiDiagonalBlockSparse.max_blocks must be <= 2147483647, got 2147483648",
        ),
        (
            b'[{"0": ["dense", 0, 0, 0], "1": ["dense", 0, 0, 0]},'
            b' {"0": ["dense", 0, 0, 0], "1": ["dense", 0, 0, 0], "1": ["dense", 0, 0, 0]}]',
            "layer 1: head '1' is given twice",
        ),
        (
            b'[{"0": ["anti_diagonal_block_sparse", {"stride": 8, "stride": 16}, 0, 0.9]}]',
            "layer 0 head 0: field 'stride' is given twice",
        ),
    ],
)
def test_configs_that_cannot_plan_are_refused_at_load(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(PatternConfigError, match=re.escape(message)) as info:
        load_pattern_config(path)
    assert str(info.value).startswith(f"{path}: layer ")


def test_adaptive_configs_the_planner_takes_still_load(tmp_path):
    layer = {
        "0": _adaptive(AVS, block_size=32, rule="relative"),  # token-level: any key tile
        "1": _adaptive(ADB, block_size=128, stride=16, rule="relative"),
        "2": _adaptive(AVS, query_aware=0.5, block_size=128, rule="relative"),
        "3": ["vertical_and_slash", 2**31 - 1, 2**31 - 1, 0.9],
    }
    patterns = load_pattern_config(_write(tmp_path, [layer]))
    assert patterns[0][:2] == (
        AVS(block_size=32, rule="relative"),
        ADB(block_size=128, stride=16, rule="relative"),
    )


def test_a_bad_config_is_one_line_from_prefill(capsys, tmp_path):
    from minference_jax.prefill import main

    heads = {"0": _adaptive(ADB, stride=8), "1": _adaptive(ADB, stride=16), "2": VS, "3": VS}
    path = _write(tmp_path, [heads] * 2)  # the embedded model: 2 layers x 4 heads
    code = main(["--pattern-config", str(path), "--max-new-tokens", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert SHARE + "['cumulative'], strides [8, 16]" in err


def _int_fields(kind):
    """Size fields: ints, or ints where None derives the size (`block_capacity`)."""
    return [f.name for f in dataclasses.fields(kind) if f.type in ("int", "int | None")]


def _required(kind):
    """The fields without a default, each at a valid value."""
    return {f.name: 1 for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING}


SIZED = [(kind, name) for kind in P.PATTERN_TYPES for name in _int_fields(kind)]


def test_every_pattern_has_its_sizes_checked():
    assert len(SIZED) == 16  # a new size field gets a row here, and the checks below


@pytest.mark.parametrize("kind, field", SIZED, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("value", [2**31, 2**40, 2**63])
def test_pattern_sizes_past_int32_are_refused(kind, field, value):
    fields = _required(kind)
    message = f"{kind.__name__}.{field} must be <= 2147483647, got {value}"
    with pytest.raises(ValueError, match=re.escape(message)):
        kind(**{**fields, field: value})


@pytest.mark.parametrize("kind, field", SIZED, ids=lambda x: getattr(x, "__name__", x))
def test_pattern_sizes_keep_their_lower_bounds(kind, field):
    fields = _required(kind)
    minimum = 0 if kind in (P.AShape, P.VerticalSlash) else 1
    with pytest.raises(ValueError, match=f"{kind.__name__}.{field} must be >= {minimum}"):
        kind(**{**fields, field: minimum - 1})
    with pytest.raises(TypeError, match=f"{kind.__name__}.{field} must be an int"):
        kind(**{**fields, field: 2.0})
    largest = {field: P.MAX_SIZE}
    if kind is ADB and field in ("stride", "block_size"):  # the stride must divide the block
        largest = {"stride": P.MAX_SIZE, "block_size": P.MAX_SIZE}
    assert getattr(kind(**{**fields, **largest}), field) == P.MAX_SIZE


# Layers the index planner refuses or takes, at every key-block size.
PLANNER_LAYERS = [
    (ADB(stride=8), ADB(stride=16)),
    (ADB(), P.Dense(), AVS(rule="relative")),
    (P.BlockSparse(4), ADB(block_size=128)),
    (P.VerticalSlash(30, 50), ADB(stride=8, block_size=32)),
    (AVS(query_aware=0.5, block_size=32),),
    (AVS(block_size=32), P.BlockSparse(4, block_size=32), ADB(stride=32, block_size=32)),
    (P.Dense(), AVS(max_vertical=7), ADB(stride=16, rule="cumulative"), P.AShape(4, 64)),
    (ADB(block_size=128, stride=16), AVS(query_aware=0.1, block_size=128)),
]


@pytest.mark.parametrize("block_kv", [32, 64, 128])
@pytest.mark.parametrize("layer", PLANNER_LAYERS, ids=str)
def test_check_layer_patterns_holds_the_planners_rules(layer, block_kv):
    try:
        plan_index(layer, 300, len(layer), block_q=128, block_kv=block_kv)
    except ValueError as err:
        with pytest.raises(ValueError, match=re.escape(str(err))):
            P.check_layer_patterns(layer, block_kv=block_kv)
    else:
        P.check_layer_patterns(layer, block_kv=block_kv)


def test_check_layer_patterns_without_block_kv_takes_the_default_plans_sizes():
    P.check_layer_patterns(PLANNER_LAYERS[-1])  # 128-token key blocks: the Mosaic plans
    P.check_layer_patterns(ADB(block_size=128))  # one pattern for every head
    P.check_layer_patterns([AVS(block_size=16)] * 3)  # token-level: block_size unused
    with pytest.raises(ValueError, match=re.escape("head 1: BlockSparse" + BLOCK_32)):
        P.check_layer_patterns([P.Dense(), P.BlockSparse(2, block_size=32)])
    with pytest.raises(TypeError, match="head 1: expected a pattern, got str"):
        P.check_layer_patterns([P.Dense(), "dense"])
