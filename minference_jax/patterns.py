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

MAX_SIZE = 2**31 - 1  # every size field: sizes become int32 budgets and offsets of the index


def _check_sizes(name: str, minimum: int, **sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}.{key} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name}.{key} must be >= {minimum}, got {value}")
        if value > MAX_SIZE:
            raise ValueError(f"{name}.{key} must be <= {MAX_SIZE}, got {value}")


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
        _check_sizes("AShape", 0, n_init=self.n_init, n_local=self.n_local)


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
    """`n_vertical` whole key columns plus `n_slash` diagonals, both estimated from the prompt."""

    n_vertical: int
    n_slash: int

    def __post_init__(self):
        _check_sizes("VerticalSlash", 0, n_vertical=self.n_vertical, n_slash=self.n_slash)

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
        _check_sizes("BlockSparse", 1, top_k=self.top_k, block_size=self.block_size)


SELECTION_RULES = ("cumulative", "relative", "absolute")


def _check_threshold(name: str, threshold, rule: str) -> None:
    if rule not in SELECTION_RULES:
        raise ValueError(f"{name}.rule must be one of {SELECTION_RULES}, got {rule!r}")
    if not isinstance(threshold, int | float) or isinstance(threshold, bool):
        raise TypeError(f"{name}.threshold must be a number, got {type(threshold).__name__}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name}.threshold must be in [0, 1], got {threshold}")


def _check_capacities(name: str, rule: str, **capacities) -> dict:
    """`_check_sizes` arguments for static capacities (`max_blocks`, `max_vertical`, ...): None
    (derived from the threshold, see `threshold_capacity`) is for the absolute rule only, the
    one rule that bounds how many entries pass."""
    for field, value in capacities.items():
        if value is None and rule != "absolute":
            raise ValueError(
                f"{name}.{field}=None (a capacity from the threshold) needs rule='absolute', "
                f"got rule={rule!r}: give {field}"
            )
    return {field: value for field, value in capacities.items() if value is not None}


def threshold_capacity(pattern, capacity: int | None, limit: int) -> int:
    """How many entries (key blocks of a query block, key columns, diagonals) an adaptive head
    may keep besides the always-kept ones: `capacity`, or with None as many as its threshold
    lets pass. Under the absolute rule a kept entry holds >= threshold of its row's estimated
    mass, which sums to the total, so at most floor(1 / threshold) pass (one more for f32
    rounding): a capacity the threshold, not the prompt length, decides. Never more than
    `limit` (the entries there are)."""
    if capacity is not None:
        return min(capacity, limit)
    if pattern.threshold <= 0:
        return limit
    return min(int(1.0 / pattern.threshold) + 1, limit)


def block_capacity(pattern, n_kv_blocks: int) -> int:
    """Key blocks an adaptive block-selecting head may keep per query block (`max_blocks`,
    `threshold_capacity`)."""
    return threshold_capacity(pattern, pattern.max_blocks, n_kv_blocks)


def vertical_slash_capacities(pattern, seq_len: int) -> tuple[int, int]:
    """(columns, diagonals) an `AdaptiveVerticalSlash` head may keep besides the always-kept
    ones (`max_vertical`, `max_slash`, `threshold_capacity`)."""
    return (
        threshold_capacity(pattern, pattern.max_vertical, seq_len),
        threshold_capacity(pattern, pattern.max_slash, seq_len),
    )


@dataclasses.dataclass(frozen=True)
class AntiDiagonalBlockSparse:
    """Per query block, the key blocks that hold `threshold` of its estimated attention.

    Block importance comes from strided anti-diagonal sums of Q K^T (XAttention): in every
    `stride` x `stride` sub-block, the anti-diagonal's mean logit, softmaxed per strided query
    row and summed per (query block, key block). How many key blocks each query block keeps
    follows from the scores, per head and per input (`rule`: see `AdaptiveVerticalSlash`), at
    most `max_blocks` (a static capacity; None with the absolute rule: from the threshold, see
    `block_capacity`). The first key block (attention sink) and the causal diagonal blocks are
    always kept.
    """

    threshold: float = 0.9
    stride: int = 8
    max_blocks: int | None = 512
    rule: str = "cumulative"
    block_size: int = 64

    def __post_init__(self):
        _check_threshold("AntiDiagonalBlockSparse", self.threshold, self.rule)
        _check_sizes(
            "AntiDiagonalBlockSparse",
            1,
            **_check_capacities("AntiDiagonalBlockSparse", self.rule, max_blocks=self.max_blocks),
            stride=self.stride,
            block_size=self.block_size,
        )
        if self.block_size % self.stride:
            raise ValueError(
                f"AntiDiagonalBlockSparse.stride ({self.stride}) must divide block_size "
                f"({self.block_size})"
            )


@dataclasses.dataclass(frozen=True)
class AdaptiveVerticalSlash:
    """Vertical-Slash whose counts follow the attention (FlexPrefill), per head and per input.

    From the last `LAST_Q` queries' softmax (the Vertical-Slash estimator's), the fewest key
    columns and the fewest diagonals whose estimated mass reaches `threshold` of the total; the
    first 30 columns and the 100 most local diagonals are always kept, and at most `max_vertical`
    / `max_slash` others (their largest; static capacities; None with the absolute rule: from
    the threshold, `vertical_slash_capacities`, so the threshold sets the budget at any length).
    Selection `rule`:
    - "cumulative": the fewest entries whose summed score reaches `threshold` of the row's total
      (top-p; a sort-free radix search over the f32 bit patterns, 16 masked-sum passes);
    - "relative": every entry >= `threshold` x the row's maximum (one max, one count: cheaper,
      but its count follows the peak, not the mass);
    - "absolute": every entry holding >= `threshold` of the row's total (e.g. 0.005): the exact
      oracle's rule, which spends entries where each adds the most mass, so a head with spread
      attention keeps fewer of them than under the cumulative rule.
    Query-aware switch: with `query_aware > 0`, a head whose last queries' key-block
    distribution is within `query_aware` (Jensen-Shannon distance, sqrt of the divergence, in
    [0, 1]) of the distribution estimated from mean-pooled q and k uses a block pattern instead:
    per query block, the key blocks (from pooled q . k softmax) selected by the same rule and
    threshold, at most `max_blocks`, plus the sink block and the causal diagonal.
    """

    threshold: float = 0.9
    max_vertical: int | None = 4096
    max_slash: int | None = 8192
    query_aware: float = 0.0
    max_blocks: int | None = 512
    rule: str = "cumulative"
    block_size: int = 64

    def __post_init__(self):
        _check_threshold("AdaptiveVerticalSlash", self.threshold, self.rule)
        _check_sizes(
            "AdaptiveVerticalSlash",
            1,
            **_check_capacities(
                "AdaptiveVerticalSlash",
                self.rule,
                max_vertical=self.max_vertical,
                max_slash=self.max_slash,
                max_blocks=self.max_blocks,
            ),
            block_size=self.block_size,
        )
        q = self.query_aware
        if not isinstance(q, int | float) or isinstance(q, bool) or not 0.0 <= q <= 1.0:
            raise ValueError(f"AdaptiveVerticalSlash.query_aware must be in [0, 1], got {q!r}")


@dataclasses.dataclass(frozen=True)
class SampledBlockSparse:
    """Per query block, the key blocks holding at least `threshold` of its estimated attention.

    Block importance comes from the exact causal softmax of `rows` query rows spread evenly over
    each query block (their mean mass per key block): as many multiply-adds as anti-diagonal
    scoring at stride 64 / rows, but a key that dominates some query is seen as it is, not
    averaged into a strided sum. Selection `rule` as in `AdaptiveVerticalSlash` (default
    "absolute": every key block holding >= `threshold` of the estimated mass), at most
    `max_blocks` (a static capacity; None: from the threshold, `block_capacity`, so that the
    threshold sets the budget at any length). The first key block (attention sink), the causal
    diagonal blocks and the query block before them (the local window, where most of the mass
    that unsampled rows alone hold lies) are always kept.
    """

    threshold: float = 0.005
    rows: int = 8
    max_blocks: int | None = 512
    rule: str = "absolute"
    block_size: int = 64

    def __post_init__(self):
        _check_threshold("SampledBlockSparse", self.threshold, self.rule)
        _check_sizes(
            "SampledBlockSparse",
            1,
            **_check_capacities("SampledBlockSparse", self.rule, max_blocks=self.max_blocks),
            rows=self.rows,
            block_size=self.block_size,
        )


Pattern = (
    Dense
    | AShape
    | VerticalSlash
    | BlockSparse
    | AntiDiagonalBlockSparse
    | AdaptiveVerticalSlash
    | SampledBlockSparse
)
PATTERN_TYPES = (
    Dense,
    AShape,
    VerticalSlash,
    BlockSparse,
    AntiDiagonalBlockSparse,
    AdaptiveVerticalSlash,
    SampledBlockSparse,
)
ADAPTIVE_TYPES = (AntiDiagonalBlockSparse, AdaptiveVerticalSlash, SampledBlockSparse)


def key_block_size(pattern: Pattern) -> int | None:
    """The size of the key blocks a pattern selects (its index's `block_kv` must equal it), or
    None when it selects none: token-level columns and diagonals fit any key tile, so an
    AdaptiveVerticalSlash without the query-aware switch is as free as a VerticalSlash."""
    if isinstance(pattern, BlockSparse | AntiDiagonalBlockSparse | SampledBlockSparse):
        return pattern.block_size
    if isinstance(pattern, AdaptiveVerticalSlash) and pattern.query_aware > 0:
        return pattern.block_size
    return None


# The key-block sizes of the index plans `attention.default_blocks` picks: 64 everywhere, 128
# where the Mosaic kernel runs. Pattern configs and the command lines leave block_kv to it.
DEFAULT_KEY_BLOCK_SIZES = (64, 128)


def check_layer_patterns(
    patterns: Pattern | Sequence[Pattern], *, block_kv: int | None = None
) -> None:
    """Raise ValueError unless one layer's per-head patterns can share one index plan.

    The heads that select key blocks (`key_block_size`) must all use the index's `block_kv`
    (None: one of DEFAULT_KEY_BLOCK_SIZES, the same for every such head); the adaptive heads
    must share one selection rule and the anti-diagonal ones one stride (which divides their
    block_size, checked when the pattern was made, so it divides block_kv too). These are the
    rules `index_approx.plan_index` enforces, with its messages. TypeError on a non-pattern.
    """
    layer = (patterns,) if isinstance(patterns, PATTERN_TYPES) else tuple(patterns)
    normalize_layer_patterns(layer, len(layer))
    first = None  # (head, size) of the first head that selects key blocks
    for h, p in enumerate(layer):
        size = key_block_size(p)
        if size is None:
            continue
        if block_kv is not None and size != block_kv:
            raise ValueError(
                f"head {h}: {type(p).__name__}.block_size={size} must equal block_kv={block_kv}"
            )
        if block_kv is None and size not in DEFAULT_KEY_BLOCK_SIZES:
            raise ValueError(
                f"head {h}: {type(p).__name__}.block_size={size} must be one of "
                f"{DEFAULT_KEY_BLOCK_SIZES}, the key-block sizes of the default index plans"
            )
        if first is None:
            first = (h, size)
        elif size != first[1]:
            raise ValueError(
                f"heads {first[0]} and {h} select key blocks of different sizes ({first[1]} and "
                f"{size}); one layer's index has one key-block size"
            )
    rules = {p.rule for p in layer if isinstance(p, ADAPTIVE_TYPES)}
    strides = {p.stride for p in layer if isinstance(p, AntiDiagonalBlockSparse)}
    if len(rules) > 1 or len(strides) > 1:
        raise ValueError(
            f"adaptive heads of one layer must share the rule and the stride; got rules "
            f"{sorted(rules)}, strides {sorted(strides)}"
        )
    rows = {p.rows for p in layer if isinstance(p, SampledBlockSparse)}
    if len(rows) > 1:
        raise ValueError(
            f"SampledBlockSparse heads of one layer must share rows; got {sorted(rows)}"
        )


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


# Command-line modes (python -m minference_jax.prefill --mode): pattern type, budget fields, and
# the default budget.
MODE_PATTERNS = {
    "minference": (VerticalSlash, ("n_vertical", "n_slash"), (1000, 6096)),
    "a-shape": (AShape, ("n_init", "n_local"), (1024, 4096)),
    "block-sparse": (BlockSparse, ("top_k",), (100,)),
    "anti-diagonal": (AntiDiagonalBlockSparse, ("threshold", "stride"), (0.9, 8)),
    "adaptive-vs": (AdaptiveVerticalSlash, ("threshold", "query_aware"), (0.9, 0.0)),
    "sampled-blocks": (SampledBlockSparse, ("threshold", "rows"), (0.005, 8)),
}


def pattern_for_mode(mode: str, budget: Sequence[float] | None = None) -> Pattern:
    """The pattern of a command-line mode; `budget` overrides the leading fields (see
    MODE_PATTERNS). Raises ValueError / TypeError on a bad mode or budget."""
    if mode not in MODE_PATTERNS:
        raise ValueError(f"unknown mode {mode!r}; choose from {tuple(MODE_PATTERNS)}")
    kind, fields, default = MODE_PATTERNS[mode]
    values = default if budget is None else tuple(budget)
    if not 1 <= len(values) <= len(fields):
        raise ValueError(f"{mode} takes 1 to {len(fields)} values ({', '.join(fields)})")
    return kind(**dict(zip(fields, values, strict=False)))
