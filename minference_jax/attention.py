"""Public attention API: `sparse_attention(query, key, value, *, patterns=..., implementation=...)`,
shaped like `jax.nn.dot_product_attention`.

Dispatch lives here and only here: which backend runs, and when a layer is plain dense.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from minference_jax.index_approx import IndexPlan, build_planned_index, plan_index
from minference_jax.reference import sparse_attention_reference, sparse_attention_xla
from minference_jax.sparse_index import (
    SeqLengths,
    SparseIndex,
    check_attention_inputs,
    check_block_sizes,
    check_causal_mask,
    check_index_matches_inputs,
    check_patterns,
    check_seq_lengths,
    resolve_softmax_scale,
    seq_lengths,
)
from pallas_kernels import sparse_flash_mgpu
from pallas_kernels.sparse_flash import sparse_flash_attention

# GPU dispatch (implementation=None), decided from the estimated index, not the prompt length:
# - up to DENSE_CROSSOVER_TOKENS a layer runs dense cuDNN without estimating an index (the
#   estimate would cost more than any sparse gain could return);
# - longer, the index is estimated on device and the layer runs the sparse kernel only if it
#   computes at most `dense_fallback_fraction(seq_len)` of the causal tiles, else cuDNN (per
#   layer, no host round trip). The Triton kernel computes a tile at ~60-80% of cuDNN's dense
#   rate, and up to SHORT_PROMPT_TOKENS the estimate weighs more against the quadratic part, so
#   short prompts need a sparser index. Tune all three from an e2e GPU run at 8K-32K: a layer
#   that estimates and then falls back costs the estimate (<= ~3% of the layer is the goal).
DENSE_CROSSOVER_TOKENS = 8192
SHORT_PROMPT_TOKENS = 32768
SHORT_PROMPT_FALLBACK_FRACTION = 0.3
DENSE_FALLBACK_FRACTION = 0.5
# The Mosaic kernel computes 128x128 tiles at about cuDNN's rate (128x64 tiles, for heads that
# pick 64-key blocks, at ~0.85 of it): sparse pays off until the index is nearly dense (the
# estimate and the per-tile index reads cost the rest). At 16K-32K the estimate costs ~1 ms of a
# 4-15 ms layer (H200): the forced kernel breaks even near 0.78 of the tiles at 16K (128x128;
# ~0.65 with 128x64) and past 0.9 at 32K, so 0.7 up to SHORT_PROMPT_TOKENS.
MOSAIC_DENSE_FALLBACK_FRACTION = 0.85
MOSAIC_SHORT_PROMPT_FALLBACK_FRACTION = 0.7


def dense_fallback_fraction(seq_len: int, kernel: str = "pallas") -> float:
    """Largest computed-tile fraction at which a GPU layer of `seq_len` tokens runs `kernel`."""
    short = seq_len <= SHORT_PROMPT_TOKENS
    if kernel == "mosaic":
        return MOSAIC_SHORT_PROMPT_FALLBACK_FRACTION if short else MOSAIC_DENSE_FALLBACK_FRACTION
    return SHORT_PROMPT_FALLBACK_FRACTION if short else DENSE_FALLBACK_FRACTION


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _short_gpu_prompt(seq_len: int) -> bool:
    return _on_gpu() and seq_len <= DENSE_CROSSOVER_TOKENS


IMPLEMENTATIONS = ("pallas", "mosaic", "xla", "reference")


def sparse_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    patterns: P.Pattern | Sequence[P.Pattern] | None = None,
    scale: float | None = None,
    is_causal: bool = True,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    implementation: str | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    index: SparseIndex | None = None,
    softmax_scale: float | None = None,
) -> jax.Array:
    """Causal prefill attention where each query head follows its sparse pattern.

    Shaped like `jax.nn.dot_product_attention(query, key, value, bias, mask, *, scale,
    is_causal, query_seq_lengths, key_value_seq_lengths, implementation)`; with patterns that
    cover every causal key (`Dense()`) it computes what that computes with `is_causal=True`.

    Args:
      query: [batch, seq, q_heads, head_dim]; key, value: [batch, seq, kv_heads, head_dim] with
        kv_heads dividing q_heads (query head h reads kv head h // (q_heads // kv_heads)).
        Causal with q_len == kv_len: query i attends keys j <= i that its pattern selects.
      bias: must be None (no additive bias).
      mask: None, or a bool mask broadcastable to [batch, q_heads, seq, seq] that leaves the
        attention causal: True where key <= query (and, with is_causal=False, False elsewhere).
        It is checked, so it must be concrete (a mask traced under jit is refused).
      patterns: one pattern for all heads, or one per query head (static). Required.
      scale: defaults to head_dim ** -0.5; else a concrete number, finite and > 0 in float32
        and at most float32_max / (head_dim * log2(e)) (`resolve_softmax_scale`).
      is_causal: must be True (or a causal `mask` given): causal prefill is all this computes.
      query_seq_lengths, key_value_seq_lengths: int32 [batch] of a right-padded batch, as in
        jax.nn: rows at or past a sequence's query length are zero, and no key at or past its
        key-value length is attended (a row left with no key is zero, where jax.nn averages
        every value). Concrete lengths must lie in [0, seq]; traced ones are clipped to it.
        The index is estimated from each sequence's own rows and keys.
      implementation: "pallas" (the Pallas-Triton kernel; GPU, or CPU in interpret mode),
        "mosaic" (the Pallas Mosaic GPU kernel: sm_90, bf16/f16, head_dim 64 or 128,
        block_q 64 or 128, block_kv 64 or 128; CPU runs its interpreter), "xla" (gathered
        sparse in plain XLA, any backend), "reference" (masked dense, O(N^2) memory, the
        oracle) or None: layers whose heads are all Dense, and on GPU prompts of at most
        DENSE_CROSSOVER_TOKENS, go to `jax.nn.dot_product_attention` (cuDNN); on GPU the rest
        run `default_sparse_kernel` unless the estimated index computes more than
        `dense_fallback_fraction(seq_len, kernel)` of the causal tiles (then cuDNN);
        elsewhere "xla".
      block_q, block_kv: the index's query / key block sizes; by default `default_blocks`:
        128 x 128 (128 x 64 when a head is block-sparse) where the Mosaic kernel runs, else
        64 x 64.
      index: a precomputed SparseIndex (otherwise estimated from query and key here); it must
        have been built for these inputs' batch, query heads and seq length (checked,
        ValueError).
      softmax_scale: deprecated name of `scale` (DeprecationWarning).
    Returns:
      [batch, seq, q_heads, head_dim] in query.dtype (float16 dense layers on CPU run in
      float32 inside, as XLA:CPU has no float16 matmul with float32 accumulation).

    The former call `sparse_attention(q, k, v, patterns)` still works, with a
    DeprecationWarning: a pattern, or a list or tuple of patterns, in the `bias` slot is taken
    as `patterns` (no array is a pattern, so it cannot be mistaken for a bias).

    Inputs must be finite, as in flash attention: a NaN or Inf in one row of v can reach other
    queries computed in the same tile (0 * inf = NaN), even queries whose pattern masks that key.
    """
    if _holds_patterns(bias):
        if patterns is not None:
            raise TypeError("patterns given twice: in the bias slot and as patterns=")
        warnings.warn(
            "passing patterns positionally is deprecated: the 4th argument of sparse_attention "
            "is bias, as in jax.nn.dot_product_attention; pass patterns=... instead",
            DeprecationWarning,
            stacklevel=2,
        )
        patterns, bias = bias, None
    if softmax_scale is not None:
        if scale is not None:
            raise TypeError("give scale only (softmax_scale is its deprecated name)")
        warnings.warn(
            "softmax_scale is deprecated: pass scale=... (as in jax.nn.dot_product_attention)",
            DeprecationWarning,
            stacklevel=2,
        )
        scale = softmax_scale
    check_attention_inputs(query, key, value)
    batch, seq_len, num_heads, head_dim = query.shape
    _check_causal(bias, mask, is_causal, batch, num_heads, seq_len)
    check_patterns(patterns)
    patterns = P.normalize_layer_patterns(patterns, num_heads)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS}"
        )
    scale = resolve_softmax_scale(scale, head_dim, name="scale")
    lengths = _padding(query_seq_lengths, key_value_seq_lengths, batch, seq_len)
    if index is not None:
        check_index_matches_inputs(index, query)  # the one check, whatever the implementation
        return _attend_jit(
            query, key, value, index, scale=scale, implementation=implementation, lengths=lengths
        )
    plan, budgets = layer_plan(
        patterns,
        seq_len,
        num_heads,
        implementation,
        block_q=block_q,
        block_kv=block_kv,
        dtype=query.dtype,
        head_dim=head_dim,
    )
    return _planned_jit(
        query,
        key,
        value,
        budgets,
        plan=plan,
        scale=scale,
        implementation=implementation,
        lengths=lengths,
    )


def _holds_patterns(x) -> bool:
    """Whether x is a pattern or a non-empty list / tuple of them (never true of an array)."""
    if isinstance(x, P.PATTERN_TYPES):
        return True
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(p, P.PATTERN_TYPES) for p in x)
    )


def _check_causal(bias, mask, is_causal, batch: int, num_heads: int, seq_len: int) -> None:
    """Refuse what would make the attention other than causal: a bias, a mask that is not the
    causal mask, or is_causal=False without a causal mask."""
    if bias is not None:
        raise ValueError(
            "sparse attention adds no bias: bias must be None (causality and the patterns "
            f"decide which keys count); got {type(bias).__name__}"
        )
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if mask is not None:
        check_causal_mask(mask, batch, num_heads, seq_len, is_causal)
    elif not is_causal:
        raise ValueError(
            "sparse attention is causal prefill only: pass is_causal=True (or the causal mask)"
        )


def _padding(query_seq_lengths, key_value_seq_lengths, batch: int, seq_len: int):
    """SeqLengths of the checked lengths, or None where concrete lengths pad nothing (then the
    unpadded program runs). Key lengths at or above the query lengths change nothing: a valid
    causal row sees no key at or past its own query length anyway."""
    query_lengths = check_seq_lengths(query_seq_lengths, "query_seq_lengths", batch, seq_len)
    kv_lengths = check_seq_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch, seq_len)
    if _concrete(query_lengths) and bool((query_lengths == seq_len).all()):
        query_lengths = None
    limit = seq_len if query_lengths is None else query_lengths
    if _concrete(kv_lengths) and _concrete(limit) and bool((kv_lengths >= limit).all()):
        kv_lengths = None
    return seq_lengths(query_lengths, kv_lengths, batch, seq_len)


def _concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def layer_plan(
    patterns,
    seq_len,
    num_heads,
    implementation,
    *,
    block_q=None,
    block_kv=None,
    dtype=None,
    head_dim=None,
):
    """(IndexPlan, budgets) of a layer, or (None, None) when it simply runs dense attention.

    Block sizes left None follow `default_blocks` for the layer's dtype and head_dim.
    """
    check_patterns(patterns)
    patterns = P.normalize_layer_patterns(patterns, num_heads)
    default_q, default_kv = default_blocks(patterns, implementation, dtype, head_dim)
    block_q = default_q if block_q is None else block_q
    block_kv = default_kv if block_kv is None else block_kv
    check_block_sizes(block_q, block_kv)  # also where the layer runs dense and ignores them
    if implementation is None and (
        all(isinstance(p, P.Dense) for p in patterns) or _short_gpu_prompt(seq_len)
    ):
        return None, None
    return plan_index(patterns, seq_len, num_heads, block_q=block_q, block_kv=block_kv)


# Up to this many tokens a prefill's compile time outweighs its run time: layers whose plans
# differ only in their widths (capacities) share the widest, so a per-head config compiles one
# layer program per mix of pattern families instead of one per layer (pytext-12m's searched
# config at 2K: 3 programs instead of 7).
SHARED_WIDTHS_MAX_TOKENS = 32768
_WIDTHS = (
    "max_vertical", "max_slash", "max_top_k", "max_sink_blocks", "max_sink_columns", "max_diag",
)  # fmt: skip


def share_plan_widths(plans: Sequence[IndexPlan | None]) -> list[IndexPlan | None]:
    """The plans, those equal in all but their widths replaced by one plan holding the widest
    of each. Widths bound what an index can hold, never what it selects (budgets are data), so
    every layer's index is unchanged; only the padding grows."""

    def key(plan):
        return dataclasses.replace(plan, **{name: 0 for name in _WIDTHS})

    widest: dict[IndexPlan, IndexPlan] = {}
    for plan in plans:
        if plan is not None:
            other = widest.setdefault(key(plan), plan)
            widths = {name: max(getattr(plan, name), getattr(other, name)) for name in _WIDTHS}
            widest[key(plan)] = dataclasses.replace(plan, **widths)
    return [None if plan is None else widest[key(plan)] for plan in plans]


def plan_layers(spec, seq_len: int, num_layers: int, num_heads: int, *, dtype, head_dim: int):
    """[(IndexPlan or None, budgets)] of every layer of a model running `spec` (an
    AttentionSpec) on `seq_len` tokens; widths shared up to SHARED_WIDTHS_MAX_TOKENS."""
    plans = [
        layer_plan(
            spec.layer(layer_id, num_heads),
            seq_len,
            num_heads,
            spec.implementation,
            dtype=dtype,
            head_dim=head_dim,
        )
        for layer_id in range(num_layers)
    ]
    if seq_len > SHARED_WIDTHS_MAX_TOKENS:
        return plans
    shared = share_plan_widths([plan for plan, _ in plans])
    return [(plan, budgets) for plan, (_, budgets) in zip(shared, plans, strict=True)]


def default_blocks(patterns, implementation, dtype, head_dim) -> tuple[int, int]:
    """(block_q, block_kv) of the index a layer builds.

    The Mosaic kernel (sm_90, bf16/f16, head_dim 64/128) computes 128-row query blocks with two
    consumer warpgroups at cuDNN's tile rate (128 x 128 on an H200 at 128K: 1.01-1.05), while
    64-row blocks run no faster than the Triton kernel (0.63 vs 0.64): so where it runs, the
    index is built for 128-row query blocks: 128 x 128 tiles, or 128 x `block_size` when heads
    pick key blocks (`patterns.key_block_size`: block-sparse, anti-diagonal and query-aware
    adaptive heads; 64 by default, as in the original). Elsewhere 64 x 64 (Triton, XLA, CPU).
    """
    mosaic_here = implementation == "mosaic" or (implementation is None and _hopper())
    if not (mosaic_here and dtype is not None and head_dim is not None):
        return 64, 64
    if not isinstance(patterns, (tuple, list)):
        patterns = (patterns,)  # one pattern for every head
    block_sizes = {P.key_block_size(p) for p in patterns} - {None}
    if len(block_sizes) > 1:
        return 64, 64  # no one block_kv fits them all: plan_index names the mismatch
    block_kv = block_sizes.pop() if block_sizes else 128
    if not sparse_flash_mgpu.supports(dtype, head_dim, 128, block_kv):
        return 64, 64
    return 128, block_kv


def planned_attention(
    q,
    k,
    v,
    budgets,
    *,
    plan: IndexPlan | None,
    scale: float,
    implementation,
    lengths: SeqLengths | None = None,
):
    """Jit-friendly core: static plan (None: every head dense), traced per-head budgets.

    Models call this inside their jitted layer step, so layers whose patterns differ only in
    budgets share one compiled program. `lengths`: a right-padded batch (`SeqLengths`) or None.
    """
    out, _ = planned_attention_with_fraction(
        q, k, v, budgets, plan=plan, scale=scale, implementation=implementation, lengths=lengths
    )
    return out


def _runs_dense(plan: IndexPlan | None, implementation, seq_len: int) -> bool:
    """No index at all: every head dense, or a short GPU prompt on the default path."""
    return plan is None or (implementation is None and _short_gpu_prompt(seq_len))


def planned_attention_with_fraction(
    q, k, v, budgets, *, plan, scale: float, implementation, lengths: SeqLengths | None = None
):
    """`planned_attention` and the share of the causal key tiles it computed (f32 scalar):
    the estimated index's `computed_fraction()`, or 1.0 where dense attention ran instead."""
    if _runs_dense(plan, implementation, q.shape[1]):
        return _dense_causal(q, k, v, scale, lengths), jnp.float32(1.0)
    index = build_planned_index(q, k, budgets, plan=plan, scale=scale, lengths=lengths)
    out = attend_with_index(
        q, k, v, index, scale=scale, implementation=implementation, lengths=lengths
    )
    fraction = index.computed_fraction()
    if implementation is None and _on_gpu():
        kernel = default_sparse_kernel(q.dtype, q.shape[-1], index)
        fraction = jnp.where(_too_dense_for_kernel(index, kernel), jnp.float32(1.0), fraction)
    return out, fraction


def attend_with_index(
    q, k, v, index: SparseIndex, *, scale: float, implementation, lengths: SeqLengths | None = None
):
    """Attention under a given index with the chosen backend (None: sparse kernel or cuDNN on
    GPU, xla elsewhere). `lengths`: a right-padded batch (`SeqLengths`) or None."""
    if implementation is None:
        if not _on_gpu():
            return sparse_attention_xla(q, k, v, index, softmax_scale=scale, lengths=lengths)
        return _sparse_or_dense(q, k, v, index, scale, lengths=lengths)
    if implementation == "reference":
        return sparse_attention_reference(q, k, v, index, softmax_scale=scale, lengths=lengths)
    if implementation in ("pallas", "mosaic"):
        return _sparse_kernel(
            q, k, v, index, scale, implementation, interpret=not _on_gpu(), lengths=lengths
        )
    return sparse_attention_xla(q, k, v, index, softmax_scale=scale, lengths=lengths)


def _hopper() -> bool:
    """sm_90 (H100, H200): the Mosaic kernel's wgmma exists there only (Blackwell has tcgen05)."""
    if not _on_gpu():
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and int(float(capability)) == 9


def forced_sparse_implementation(dtype, head_dim: int) -> str:
    """The backend long prompts' sparse layers use here, for runs that force the sparse path at
    every length (benchmarks): "mosaic" on sm_90 for the shapes it takes, "pallas" (Triton) on
    other GPUs, "xla" elsewhere."""
    if not _on_gpu():
        return "xla"
    if _hopper() and sparse_flash_mgpu.supports(dtype, head_dim, 128, 128):
        return "mosaic"
    return "pallas"


def default_sparse_kernel(dtype, head_dim: int, index: SparseIndex) -> str:
    """The GPU kernel the default path runs: "mosaic" on sm_90 for bf16/f16 indices of 128-row
    query blocks (two consumer warpgroups: 0.84-1.05 of cuDNN's tile rate on an H200, against
    0.64 for the Triton kernel; NOTES.md), else "pallas" (Triton: A100, f32, other shapes; with
    64-row blocks the Mosaic kernel measured no faster)."""
    return _kernel_for_blocks(dtype, head_dim, index.block_q, index.block_kv)


def _kernel_for_blocks(dtype, head_dim: int, block_q: int, block_kv: int) -> str:
    mosaic = (
        _hopper()
        and block_q == 128
        and sparse_flash_mgpu.supports(dtype, head_dim, block_q, block_kv)
    )
    return "mosaic" if mosaic else "pallas"


BACKEND_NAMES = {"mosaic": "mosaic", "pallas": "triton", "xla": "xla", "reference": "reference"}


def layer_backend(plan, implementation, dtype, head_dim: int, seq_len: int, fraction: float):
    """What ran one layer's attention, in words: "mosaic" (Mosaic GPU kernel), "triton" (Pallas
    Triton kernel), "xla" (the XLA sparse path), "reference", or dense: "cudnn" on GPU for
    16-bit inputs, else "xla-dense". `fraction` is the layer's reported computed fraction
    (1.0 where the default GPU path fell back to cuDNN on device)."""
    dense = "cudnn" if _uses_cudnn(dtype) else "xla-dense"
    if _runs_dense(plan, implementation, seq_len):
        return dense
    if implementation is not None:
        return BACKEND_NAMES[implementation]
    if not _on_gpu():
        return "xla"
    kernel = _kernel_for_blocks(dtype, head_dim, plan.block_q, plan.block_kv)
    return dense if fraction >= 1.0 else BACKEND_NAMES[kernel]


def _sparse_kernel(q, k, v, index, scale, implementation, interpret, lengths=None):
    if implementation == "mosaic":
        return sparse_flash_mgpu.sparse_flash_attention_mgpu(
            q, k, v, index, softmax_scale=scale, interpret=interpret, lengths=lengths
        )
    return sparse_flash_attention(
        q, k, v, index, softmax_scale=scale, interpret=interpret, lengths=lengths
    )


def _sparse_or_dense(q, k, v, index, scale, interpret=False, lengths=None):
    """The sparse kernel, or cuDNN when the index is too dense to pay off (decided on device,
    `dense_fallback_fraction`)."""
    kernel = default_sparse_kernel(q.dtype, q.shape[-1], index)
    return jax.lax.cond(
        _too_dense_for_kernel(index, kernel),
        lambda: _dense_causal(q, k, v, scale, lengths),
        lambda: _sparse_kernel(q, k, v, index, scale, kernel, interpret, lengths),
    )


def _too_dense_for_kernel(index: SparseIndex, kernel: str = "pallas") -> jax.Array:
    return index.computed_fraction() > dense_fallback_fraction(index.seq_len, kernel)


def _dense_causal(q, k, v, scale, lengths: SeqLengths | None = None):
    """Dense causal attention: cuDNN flash attention on GPU for 16-bit inputs.

    `jax.nn.dot_product_attention` with implementation=None picks XLA, which materialises the
    [B, H, N, N] scores (128 GiB at 32K tokens x 32 heads): never let a GPU prefill go there.
    """
    if q.dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA:CPU has no f16 x f16 -> f32 dot: compute in f32, hand back f16.
        up = (x.astype(jnp.float32) for x in (q, k, v))
        return _dense_causal(*up, scale, lengths).astype(jnp.float16)
    rows = dense_query_rows(q.shape)
    if _uses_cudnn(q.dtype) or rows >= q.shape[1]:
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=True,
            query_seq_lengths=None if lengths is None else lengths.queries,
            key_value_seq_lengths=None if lengths is None else lengths.keys,
            implementation="cudnn" if _uses_cudnn(q.dtype) else None,
        )
    else:
        out = _dense_causal_by_query_rows(q, k, v, scale, lengths, rows)
    if lengths is None:
        return out
    # Padding rows, and rows without a key (a sequence of key length 0): zero, as on the
    # sparse paths (jax.nn averages every value there).
    n = q.shape[1]
    kept = (jnp.arange(n) < lengths.queries[:, None]) & (lengths.keys[:, None] > 0)  # [B, N]
    return jnp.where(kept[:, :, None, None], out, 0).astype(out.dtype)


# XLA's dense attention holds [B, H, rows, keys] f32 scores: past this many bytes, the
# non-cuDNN path takes the queries in slices (a 16K-token, 12-head prompt would need 13 GiB).
DENSE_SCORES_BYTES = 1 << 30


# The slices are unrolled in the program: at most this many, whatever the memory bound says.
MAX_DENSE_SLICES = 64


def dense_query_rows(shape) -> int:
    """Query rows per slice so that one slice's f32 scores stay within DENSE_SCORES_BYTES, and
    the prompt takes at most MAX_DENSE_SLICES slices (a bounded program at any length)."""
    batch, n, heads, _ = shape
    within_memory = DENSE_SCORES_BYTES // (4 * batch * heads * max(n, 1)) // 128 * 128
    within_slices = -(-n // (MAX_DENSE_SLICES * 128)) * 128
    return max(128, within_memory, within_slices)


def _dense_causal_by_query_rows(q, k, v, scale, lengths: SeqLengths | None, rows: int):
    """Dense causal attention one slice of `rows` queries at a time, each against the keys up
    to its last row only (a causal slice never sees later keys): the scores stay bounded and
    about half the dense work is skipped."""
    n = q.shape[1]
    pieces = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        query_lengths = None
        if lengths is not None:
            query_lengths = jnp.clip(lengths.queries - start, 0, stop - start)
        pieces.append(
            jax.nn.dot_product_attention(
                q[:, start:stop],
                k[:, :stop],
                v[:, :stop],
                scale=scale,
                mask=causal[None, None],
                query_seq_lengths=query_lengths,
                key_value_seq_lengths=None if lengths is None else lengths.keys,
            )
        )
    return jnp.concatenate(pieces, axis=1)


def _uses_cudnn(dtype) -> bool:
    return _on_gpu() and dtype in (jnp.bfloat16, jnp.float16)


_planned_jit = jax.jit(planned_attention, static_argnames=("plan", "scale", "implementation"))
_attend_jit = jax.jit(attend_with_index, static_argnames=("scale", "implementation"))
