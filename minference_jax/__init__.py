"""minference_jax: training-free dynamic sparse attention for long-context prefill, in JAX."""

__version__ = "0.1.0"  # pyproject.toml reads it from here

from minference_jax.attention import sparse_attention
from minference_jax.config_io import PatternConfigError, load_pattern_config, save_pattern_config
from minference_jax.index_approx import build_sparse_index
from minference_jax.nnx_attention import nnx_attention_fn
from minference_jax.pattern_spec import parse_pattern_spec
from minference_jax.patterns import (
    AdaptiveVerticalSlash,
    AntiDiagonalBlockSparse,
    AShape,
    BlockSparse,
    Dense,
    HeadPatterns,
    SampledBlockSparse,
    VerticalSlash,
)
from minference_jax.reference import (
    dense_attention_reference,
    sparse_attention_reference,
    sparse_attention_xla,
)
from minference_jax.sparse_index import SparseIndex, dense_mask_from_index

__all__ = [
    "AShape",
    "AdaptiveVerticalSlash",
    "AntiDiagonalBlockSparse",
    "BlockSparse",
    "Dense",
    "HeadPatterns",
    "SampledBlockSparse",
    "LoadedModel",
    "PatternConfigError",
    "SparseIndex",
    "VerticalSlash",
    "__version__",
    "build_sparse_index",
    "dense_attention_reference",
    "dense_mask_from_index",
    "load",
    "load_pattern_config",
    "nnx_attention_fn",
    "parse_pattern_spec",
    "save_pattern_config",
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_attention_xla",
]


def __getattr__(name: str):
    # load() brings in the model code (Flax models, checkpoints, tokenizers): imported on first
    # use, so that code calling only sparse_attention does not pay for it.
    if name in ("load", "LoadedModel"):
        from minference_jax import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'minference_jax' has no attribute {name!r}")
