"""Sparse attention patterns as data.

Each attention head is assigned one pattern offline. Patterns are frozen, hashable dataclasses so
that a layer's tuple of per-head patterns can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# Constants of the reference implementation's vertical-slash estimator.
LAST_Q = 64  # queries at the end of the prompt used to estimate the index
N_SINK_COLUMNS = 30  # first columns that are always kept (attention sinks)
N_LOCAL_SLASHES = 100  # most local diagonals that are always kept
MIN_VERTICAL = 30
MIN_SLASH = 50


def _check_non_negative(name: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}.{key} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}.{key} must be >= 0, got {value}")


@dataclasses.dataclass(frozen=True)
class Dense:
    """Full causal attention."""


@dataclasses.dataclass(frozen=True)
class AShape:
    """The first `n_init` keys (attention sinks) plus a local window of `n_local` diagonals.

    The sinks are token-exact. The local window is computed in whole key blocks, as the slashes
    of VerticalSlash are: a query in query block i (rows i * block_q to (i + 1) * block_q - 1)
    attends every causal key of its own query block's rows plus the
    ceil((n_local - 1) / block_kv) whole key blocks just before them, i.e. keys
    j >= i * block_q - ceil((n_local - 1) / block_kv) * block_kv (j <= the query row). This is
    a superset of the token-exact window q - n_local < j <= q: with 64-token blocks,
    AShape(16, 40) at N = 256 computes 22,656 query-key pairs where the token-exact mask has
    12,796. With n_local <= 1 a query still attends its whole query block (causally).
    """

    n_init: int
    n_local: int

    def __post_init__(self):
        _check_non_negative("AShape", n_init=self.n_init, n_local=self.n_local)


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
    """`n_vertical` whole key columns plus `n_slash` diagonals, both estimated from the prompt."""

    n_vertical: int
    n_slash: int

    def __post_init__(self):
        _check_non_negative("VerticalSlash", n_vertical=self.n_vertical, n_slash=self.n_slash)

    def budgets(self, seq_len: int) -> tuple[int, int]:
        """(n_vertical, n_slash) clamped as the reference implementation does."""
        return (
            min(seq_len, max(self.n_vertical, MIN_VERTICAL)),
            min(seq_len, max(self.n_slash, MIN_SLASH)),
        )


@dataclasses.dataclass(frozen=True)
class BlockSparse:
    """For each query block, the `top_k` key blocks with the largest pooled scores.

    `top_k` counts every key tile the query block computes, the always-kept diagonal included.
    """

    top_k: int
    block_size: int = 64

    def __post_init__(self):
        _check_non_negative("BlockSparse", top_k=self.top_k, block_size=self.block_size)
        if self.top_k < 1:
            raise ValueError(f"BlockSparse.top_k must be >= 1, got {self.top_k}")
        if self.block_size < 1:
            raise ValueError(f"BlockSparse.block_size must be >= 1, got {self.block_size}")


Pattern = Dense | AShape | VerticalSlash | BlockSparse
PATTERN_TYPES = (Dense, AShape, VerticalSlash, BlockSparse)


def normalize_layer_patterns(patterns: Pattern | Sequence[Pattern], num_heads: int) -> tuple:
    """One pattern for all heads, or one per query head -> a tuple of `num_heads` patterns."""
    if isinstance(patterns, PATTERN_TYPES):
        return (patterns,) * num_heads
    patterns = tuple(patterns)
    if len(patterns) != num_heads:
        raise ValueError(f"got {len(patterns)} per-head patterns for {num_heads} query heads")
    for head, pattern in enumerate(patterns):
        if not isinstance(pattern, PATTERN_TYPES):
            raise TypeError(f"head {head}: expected a pattern, got {type(pattern).__name__}")
    return patterns


@dataclasses.dataclass(frozen=True)
class HeadPatterns:
    """Per-model pattern table: `layers[l][h]` is the pattern of query head h in layer l."""

    layers: tuple[tuple[Pattern, ...], ...]

    def __post_init__(self):
        if not self.layers:
            raise ValueError("HeadPatterns needs at least one layer")
        widths = {len(layer) for layer in self.layers}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(f"every layer needs the same, non-zero head count; got {widths}")
        for layer in self.layers:
            normalize_layer_patterns(layer, len(layer))

    @classmethod
    def uniform(cls, pattern: Pattern, num_layers: int, num_heads: int) -> HeadPatterns:
        return cls(tuple((pattern,) * num_heads for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.layers[0])

    def __getitem__(self, layer: int) -> tuple[Pattern, ...]:
        return self.layers[layer]

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """Raise if this table does not fit a model with the given layer and query-head counts."""
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"pattern config has {self.num_layers} layers x {self.num_heads} heads, "
                f"the model has {num_layers} layers x {num_heads} query heads"
            )
