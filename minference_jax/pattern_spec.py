"""One pattern written as text, `KIND:VALUES`: `vs:1000,6096`, `a-shape:64,256`, `avs:0.95`.

The search's candidates, `minference_jax.load(attention=...)` and the benchmarks read this one
syntax. Every kind has a short name and the prefill's `--mode` name as an alias, so
`ashape:64,256` and `a-shape:64,256` are the same pattern. VALUES fill the pattern's leading
fields in order; the adaptive kinds may leave out trailing fields (they keep their defaults).
"""

from __future__ import annotations

import dataclasses
import math

from minference_jax import patterns as P

INT32_MAX = 2**31 - 1  # pattern sizes live in int32 index arrays


@dataclasses.dataclass(frozen=True)
class SpecKind:
    pattern: type
    fields: tuple[str, ...]  # the values after the colon fill these, in order
    required: int  # how many values must be given
    aliases: tuple[str, ...] = ()  # the prefill's --mode names for the same pattern
    rule: str | None = None  # the adaptive kinds' selection rule ("r" kinds: relative)
    summary: str = ""  # what the pattern keeps, for help texts
    fixed: tuple[tuple[str, object], ...] = ()  # other fields this kind sets, e.g. capacities

    def usage(self, name: str) -> str:
        shown = [f.upper() for f in self.fields]
        values = ",".join(shown[: self.required])
        if self.required < len(shown):
            values += "".join(f"[,{f}]" for f in shown[self.required :])
        return f"{'|'.join((name, *self.aliases))}:{values}"


SPEC_KINDS = {
    "vs": SpecKind(
        P.VerticalSlash,
        ("n_vertical", "n_slash"),
        2,
        ("minference", "vertical-slash"),
        summary="the key columns and diagonals with the most estimated attention",
    ),
    "ashape": SpecKind(
        P.AShape, ("n_init", "n_local"), 2, ("a-shape",), summary="first keys + a local window"
    ),
    "block": SpecKind(
        P.BlockSparse,
        ("top_k",),
        1,
        ("block-sparse",),
        summary="the top_k 64-token key blocks of each query block",
    ),
    "adb": SpecKind(
        P.AntiDiagonalBlockSparse,
        ("threshold", "stride"),
        1,
        ("anti-diagonal",),
        summary="key blocks holding THRESHOLD of the mass (anti-diagonal scores)",
    ),
    "adbr": SpecKind(
        P.AntiDiagonalBlockSparse,
        ("threshold", "stride"),
        1,
        rule="relative",
        summary="key blocks scoring >= THRESHOLD x the row's maximum",
    ),
    "avs": SpecKind(
        P.AdaptiveVerticalSlash,
        ("threshold", "query_aware"),
        1,
        ("adaptive-vs",),
        summary="the fewest columns and diagonals holding THRESHOLD of the mass",
    ),
    "avsr": SpecKind(
        P.AdaptiveVerticalSlash,
        ("threshold", "query_aware"),
        1,
        rule="relative",
        summary="columns and diagonals scoring >= THRESHOLD x the row's maximum",
    ),
    "avsa": SpecKind(
        P.AdaptiveVerticalSlash,
        ("threshold", "query_aware"),
        1,
        rule="absolute",
        fixed=(("max_vertical", None), ("max_slash", None)),
        summary="every column and diagonal holding >= THRESHOLD of the mass (as many as pass)",
    ),
    "sbs": SpecKind(
        P.SampledBlockSparse,
        ("threshold", "rows"),
        1,
        ("sampled-blocks",),
        summary="key blocks holding >= THRESHOLD of the exact mass of ROWS sampled queries",
    ),
}
_CANONICAL = {alias: name for name, kind in SPEC_KINDS.items() for alias in (name, *kind.aliases)}
SPEC_USAGE = "  ".join(kind.usage(name) for name, kind in SPEC_KINDS.items())


def spec_help() -> str:
    """Every kind and what it keeps, for a command's --help."""
    return "\n".join(
        f"  {kind.usage(name)}\n      {kind.summary}" for name, kind in SPEC_KINDS.items()
    )


def parse_values(text: str) -> tuple[int | float, ...]:
    """'1000,6096' -> (1000, 6096), '0.9,8' -> (0.9, 8): integers in [0, 2**31) or finite
    non-negative fractions. Raises ValueError."""
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            try:
                value = float(item)
            except ValueError:
                raise ValueError(
                    f"expected comma-separated numbers (sizes or fractions), got {text!r}"
                ) from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"budget values must be finite numbers >= 0, got {item!r} in {text!r}"
                ) from None
        else:
            if not 0 <= value <= INT32_MAX:
                raise ValueError(f"sizes must be in [0, {INT32_MAX}], got {value} in {text!r}")
        values.append(value)
    return tuple(values)


def parse_pattern_spec(text: str) -> P.Pattern:
    """'KIND:VALUES' -> a pattern; ValueError naming every kind when `text` is not one."""
    name, colon, values_text = text.partition(":")
    name = _CANONICAL.get(name.strip().lower())
    if name is None or not colon:
        raise ValueError(f"bad pattern {text!r}: use {SPEC_USAGE}")
    kind = SPEC_KINDS[name]
    try:
        values = parse_values(values_text)
    except ValueError as err:
        raise ValueError(f"bad pattern {text!r}: {err}") from None
    if not kind.required <= len(values) <= len(kind.fields):
        raise ValueError(f"bad pattern {text!r}: use {kind.usage(name)}")
    fields = dict(zip(kind.fields, values, strict=False))
    if kind.rule is not None:
        fields["rule"] = kind.rule
    fields.update(kind.fixed)
    try:
        return kind.pattern(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad pattern {text!r}: {err}") from None


def format_pattern_spec(pattern: P.Pattern) -> str:
    """The spec of a pattern ('vs:1000,6096'), or its repr when no spec writes it exactly."""
    for name, kind in SPEC_KINDS.items():
        if type(pattern) is kind.pattern:
            text = f"{name}:{','.join(str(getattr(pattern, f)) for f in kind.fields)}"
            if parse_pattern_spec(text) == pattern:  # the rule and unwritten fields agree
                return text
    return repr(pattern)
