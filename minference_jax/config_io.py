"""Reading and writing per-head pattern configs in the reference implementation's JSON format.

The file is a list with one object per layer, mapping the query-head number (a string) to
`[type, v_size, s_size, score]`:

- `"vertical_and_slash"`: `VerticalSlash(n_vertical=v_size, n_slash=s_size)`
- `"stream_llm"`: `AShape(n_init=v_size, n_local=s_size)`
- `"block_sparse"`: `BlockSparse(top_k=v_size)`; the reference tool ignores both sizes and uses
  100 blocks, so a `v_size` of 0 reads as 100.
- `"dense"` (our extension; the reference tool does not know it): full causal attention.
- `"anti_diagonal_block_sparse"`, `"adaptive_vertical_and_slash"`, `"sampled_block_sparse"`
  (our extensions): the adaptive patterns, as `[type, {field: value, ...}, 0, score]` with
  the pattern's fields (`AntiDiagonalBlockSparse`, `AdaptiveVerticalSlash`,
  `SampledBlockSparse`; omitted fields take their defaults).

`score` is what the offline search measured for the chosen pattern; it is kept, never used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pathlib
import re
import stat
import uuid
from collections.abc import Sequence

from minference_jax.patterns import (
    MAX_SIZE,
    AdaptiveVerticalSlash,
    AntiDiagonalBlockSparse,
    AShape,
    BlockSparse,
    Dense,
    HeadPatterns,
    Pattern,
    SampledBlockSparse,
    VerticalSlash,
    check_layer_patterns,
)

REFERENCE_BLOCK_SPARSE_TOP_K = 100
HEAD_KEY = re.compile(r"0|[1-9][0-9]{0,8}")  # "3", never "03", " 3", "+3" or 5000 digits
# The reference implementation's published configs, shipped with the package.
SHIPPED_CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


class PatternConfigError(ValueError):
    """A pattern config file is malformed or does not fit the model."""


ADAPTIVE_TYPE_NAMES = {
    "anti_diagonal_block_sparse": AntiDiagonalBlockSparse,
    "adaptive_vertical_and_slash": AdaptiveVerticalSlash,
    "sampled_block_sparse": SampledBlockSparse,
}


class _JsonObject(dict):
    """A decoded JSON object that remembers the first key given twice (JSON parsers keep the
    last value silently, so a head pasted twice would lose its first entry unnoticed)."""

    duplicate: str | None = None


def _object_from_pairs(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) < len(pairs):
        seen = set()
        obj.duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
    return obj


def _adaptive_from_entry(entry, where: str) -> tuple[Pattern, float]:
    kind, fields, unused, score = entry
    if not isinstance(fields, dict) or unused != 0:
        raise PatternConfigError(f"{where}: expected [{kind!r}, {{field: value}}, 0, score]")
    if getattr(fields, "duplicate", None) is not None:
        raise PatternConfigError(f"{where}: field {fields.duplicate!r} is given twice")
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise PatternConfigError(f"{where}: score must be a finite number, got {score!r}")
    try:
        return ADAPTIVE_TYPE_NAMES[kind](**fields), float(score)
    except (TypeError, ValueError) as err:
        raise PatternConfigError(f"{where}: bad {kind} fields {fields!r}: {err}") from err


def _pattern_from_entry(entry, where: str) -> tuple[Pattern, float]:
    if not isinstance(entry, list | tuple) or len(entry) != 4:
        raise PatternConfigError(f"{where}: expected [type, v_size, s_size, score], got {entry!r}")
    if isinstance(entry[0], str) and entry[0] in ADAPTIVE_TYPE_NAMES:
        return _adaptive_from_entry(entry, where)
    kind, v_size, s_size, score = entry
    for name, size in (("v_size", v_size), ("s_size", s_size)):
        if not isinstance(size, int) or isinstance(size, bool):
            raise PatternConfigError(f"{where}: {name} must be an integer, got {size!r}")
        if size < 0:
            raise PatternConfigError(f"{where}: {name} must be >= 0, got {size}")
        if size > MAX_SIZE:
            raise PatternConfigError(f"{where}: {name} must be <= {MAX_SIZE}, got {size}")
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise PatternConfigError(f"{where}: score must be a finite number, got {score!r}")
    if kind == "vertical_and_slash":
        pattern = VerticalSlash(v_size, s_size)
    elif kind == "stream_llm":
        pattern = AShape(v_size, s_size)
    elif kind == "block_sparse":
        pattern = BlockSparse(v_size or REFERENCE_BLOCK_SPARSE_TOP_K)
    elif kind == "dense":
        pattern = Dense()
    else:
        raise PatternConfigError(
            f"{where}: unknown pattern type {kind!r}; expected one of "
            "'vertical_and_slash', 'stream_llm', 'block_sparse', 'dense', "
            + ", ".join(repr(name) for name in ADAPTIVE_TYPE_NAMES)
        )
    return pattern, float(score)


def parse_pattern_config(
    layers_json, *, num_layers: int | None = None, num_heads: int | None = None
) -> tuple[HeadPatterns, tuple[tuple[float, ...], ...]]:
    """Parse the decoded JSON (a list per layer) into patterns and the per-head scores.

    Every pattern is checked as it is made, and every layer's heads together
    (`patterns.check_layer_patterns`: they must fit one index plan of the default block sizes).
    A key given twice in one object (`load_pattern_config` decodes objects to remember it) is
    refused rather than the last value kept."""
    if not isinstance(layers_json, list) or not layers_json:
        raise PatternConfigError(
            "a pattern config is a non-empty JSON list with one entry per layer"
        )
    layers, scores = [], []
    for layer_id, layer in enumerate(layers_json):
        if not isinstance(layer, dict) or not layer:
            raise PatternConfigError(
                f"layer {layer_id}: expected a non-empty {{head: entry}} object"
            )
        if getattr(layer, "duplicate", None) is not None:
            raise PatternConfigError(f"layer {layer_id}: head {layer.duplicate!r} is given twice")
        bad_keys = [h for h in layer if not HEAD_KEY.fullmatch(h)]
        if bad_keys:
            raise PatternConfigError(
                f"layer {layer_id}: head keys must be integers written without leading zeros "
                f"or signs, got {bad_keys[0]!r}"
            )
        heads = sorted(int(h) for h in layer)
        if heads != list(range(len(heads))):
            raise PatternConfigError(
                f"layer {layer_id}: heads must be numbered 0..{len(heads) - 1}, got {heads}"
            )
        parsed = [_pattern_from_entry(layer[str(h)], f"layer {layer_id} head {h}") for h in heads]
        try:
            check_layer_patterns([p for p, _ in parsed])
        except ValueError as err:
            raise PatternConfigError(f"layer {layer_id}: {err}") from err
        layers.append(tuple(p for p, _ in parsed))
        scores.append(tuple(s for _, s in parsed))
    widths = {len(layer) for layer in layers}
    if len(widths) != 1:
        raise PatternConfigError(f"layers have different head counts: {sorted(widths)}")
    patterns = HeadPatterns(tuple(layers))
    if num_layers is not None or num_heads is not None:
        expected = (
            patterns.num_layers if num_layers is None else num_layers,
            patterns.num_heads if num_heads is None else num_heads,
        )
        try:
            patterns.check_model(*expected)
        except ValueError as err:
            raise PatternConfigError(str(err)) from err
    return patterns, tuple(scores)


def load_pattern_config(
    path: str | os.PathLike, *, num_layers: int | None = None, num_heads: int | None = None
) -> HeadPatterns:
    """Load a pattern config; with `num_layers`/`num_heads`, also check it fits the model."""
    try:
        with open(path, "rb") as f:
            layers_json = json.loads(f.read().decode("utf-8"), object_pairs_hook=_object_from_pairs)
    except FileNotFoundError as err:
        raise PatternConfigError(f"pattern config not found: {path}") from err
    except IsADirectoryError as err:
        raise PatternConfigError(f"pattern config {path} is a directory, not a file") from err
    except OSError as err:
        raise PatternConfigError(f"cannot read pattern config {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise PatternConfigError(f"pattern config {path} is not UTF-8 JSON text: {err}") from err
    except (json.JSONDecodeError, RecursionError) as err:
        raise PatternConfigError(f"pattern config {path} is not valid JSON: {err}") from err
    try:
        patterns, _ = parse_pattern_config(layers_json, num_layers=num_layers, num_heads=num_heads)
    except PatternConfigError as err:
        raise PatternConfigError(f"{path}: {err}") from err
    return patterns


def _entry_from_pattern(pattern: Pattern, score: float) -> list:
    if isinstance(pattern, VerticalSlash):
        return ["vertical_and_slash", pattern.n_vertical, pattern.n_slash, score]
    if isinstance(pattern, AShape):
        return ["stream_llm", pattern.n_init, pattern.n_local, score]
    if isinstance(pattern, BlockSparse):
        if pattern.block_size != 64:
            raise PatternConfigError("the JSON format only expresses 64-token block-sparse blocks")
        return ["block_sparse", pattern.top_k, 0, score]
    if isinstance(pattern, Dense):
        return ["dense", 0, 0, score]
    for name, kind in ADAPTIVE_TYPE_NAMES.items():
        if isinstance(pattern, kind):
            return [name, dataclasses.asdict(pattern), 0, score]
    raise TypeError(f"not a pattern: {pattern!r}")


def _checked_score(score, where: str) -> float | int:
    """A finite real number as a plain Python number (numpy scalars included)."""
    if isinstance(score, numbers.Real) and not isinstance(score, bool):
        value = score.item() if hasattr(score, "item") else score
        if math.isfinite(value):
            return value
    raise PatternConfigError(f"{where}: score must be a finite number, got {score!r}")


def dump_pattern_config(
    patterns: HeadPatterns, scores: Sequence[Sequence[float]] | None = None
) -> list[dict[str, list]]:
    """The JSON-ready list-per-layer form of `patterns` (scores default to 0).

    Raises PatternConfigError unless the result is a config `load_pattern_config` accepts:
    scores must be finite, one per (layer, head).
    """
    if not isinstance(patterns, HeadPatterns):
        raise PatternConfigError(f"expected HeadPatterns, got {type(patterns).__name__}")
    if scores is not None and len(scores) != patterns.num_layers:
        raise PatternConfigError(f"{len(scores)} rows of scores for {patterns.num_layers} layers")
    out = []
    for layer_id, layer in enumerate(patterns.layers):
        layer_scores = scores[layer_id] if scores is not None else (0.0,) * len(layer)
        if len(layer_scores) != len(layer):
            raise PatternConfigError(
                f"layer {layer_id}: {len(layer_scores)} scores for {len(layer)} heads"
            )
        out.append(
            {
                str(h): _entry_from_pattern(p, _checked_score(s, f"layer {layer_id} head {h}"))
                for h, (p, s) in enumerate(zip(layer, layer_scores, strict=True))
            }
        )
    parse_pattern_config(out)  # what is written must load back
    return out


def save_pattern_config(
    patterns: HeadPatterns,
    path: str | os.PathLike,
    scores: Sequence[Sequence[float]] | None = None,
) -> None:
    """Validate, then write atomically: a failed call leaves an existing file untouched.

    A symbolic link is written through: its target gets the new config and the link stays. An
    existing file keeps its permission bits; a new one gets the umask's, as with open(path, "w").
    OS errors name `path`, never the temporary file written next to the target.
    """
    text = json.dumps(dump_pattern_config(patterns, scores))
    target = pathlib.Path(os.path.realpath(path))
    if target.is_dir():
        raise PatternConfigError(f"{path} is a directory, not a file")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:  # no file yet (or none reachable: os.open below says why)
        mode = None
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # 0o666 lets the umask set a new file's mode, as open(path, "w") would.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from None
    try:
        with os.fdopen(fd, "w") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def shipped_configs() -> dict[str, pathlib.Path]:
    """Name (file stem) -> path of each pattern config shipped with the package."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIG_DIR.glob("*.json"))}
