"""Reading and writing per-head pattern configs in the reference implementation's JSON format.

The file is a list with one object per layer, mapping the query-head number (a string) to
`[type, v_size, s_size, score]`:

- `"vertical_and_slash"`: `VerticalSlash(n_vertical=v_size, n_slash=s_size)`
- `"stream_llm"`: `AShape(n_init=v_size, n_local=s_size)`
- `"block_sparse"`: `BlockSparse(top_k=v_size)`; the reference tool ignores both sizes and uses
  100 blocks, so a `v_size` of 0 reads as 100.
- `"dense"` (our extension; the reference tool does not know it): full causal attention.
- `"anti_diagonal_block_sparse"`, `"adaptive_vertical_and_slash"` (our extensions): the
  adaptive patterns, as `[type, {field: value, ...}, 0, score]` with the pattern's fields
  (`AntiDiagonalBlockSparse`, `AdaptiveVerticalSlash`; omitted fields take their defaults).

`score` is what the offline search measured for the chosen pattern; it is kept, never used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence

from minference_jax.patterns import (
    AdaptiveVerticalSlash,
    AntiDiagonalBlockSparse,
    AShape,
    BlockSparse,
    Dense,
    HeadPatterns,
    Pattern,
    VerticalSlash,
)

REFERENCE_BLOCK_SPARSE_TOP_K = 100
# The reference implementation's published configs, shipped with the package.
SHIPPED_CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


class PatternConfigError(ValueError):
    """A pattern config file is malformed or does not fit the model."""


ADAPTIVE_TYPE_NAMES = {
    "anti_diagonal_block_sparse": AntiDiagonalBlockSparse,
    "adaptive_vertical_and_slash": AdaptiveVerticalSlash,
}


def _adaptive_from_entry(entry, where: str) -> tuple[Pattern, float]:
    kind, fields, unused, score = entry
    if not isinstance(fields, dict) or unused != 0:
        raise PatternConfigError(f"{where}: expected [{kind!r}, {{field: value}}, 0, score]")
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
    """Parse the decoded JSON (a list per layer) into patterns and the per-head scores."""
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
        try:
            heads = sorted(int(h) for h in layer)
        except ValueError as err:
            raise PatternConfigError(f"layer {layer_id}: head keys must be integers") from err
        if heads != list(range(len(heads))):
            raise PatternConfigError(
                f"layer {layer_id}: heads must be numbered 0..{len(heads) - 1}, got {heads}"
            )
        parsed = [_pattern_from_entry(layer[str(h)], f"layer {layer_id} head {h}") for h in heads]
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
        with open(path) as f:
            layers_json = json.load(f)
    except FileNotFoundError as err:
        raise PatternConfigError(f"pattern config not found: {path}") from err
    except json.JSONDecodeError as err:
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


def dump_pattern_config(
    patterns: HeadPatterns, scores: Sequence[Sequence[float]] | None = None
) -> list[dict[str, list]]:
    """The JSON-ready list-per-layer form of `patterns` (scores default to 0)."""
    out = []
    for layer_id, layer in enumerate(patterns.layers):
        layer_scores = scores[layer_id] if scores is not None else (0.0,) * len(layer)
        if len(layer_scores) != len(layer):
            raise ValueError(f"layer {layer_id}: {len(layer_scores)} scores for {len(layer)} heads")
        out.append(
            {
                str(h): _entry_from_pattern(p, s)
                for h, (p, s) in enumerate(zip(layer, layer_scores, strict=True))
            }
        )
    return out


def save_pattern_config(
    patterns: HeadPatterns,
    path: str | os.PathLike,
    scores: Sequence[Sequence[float]] | None = None,
) -> None:
    with open(path, "w") as f:
        json.dump(dump_pattern_config(patterns, scores), f)


def shipped_configs() -> dict[str, pathlib.Path]:
    """Name (file stem) -> path of each pattern config shipped with the package."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIG_DIR.glob("*.json"))}
