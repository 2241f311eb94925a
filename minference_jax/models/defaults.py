"""The embedded default of the prefill CLI: the shipped tiny passkey checkpoint.

`minference_jax/checkpoints/passkey-tiny` is a 2-layer Llama over UTF-8 bytes, trained by
`benchmarks/train_tiny_longctx.py` (documents of 128 to 8K tokens) to answer a passkey hidden in
a haystack; it answers up to 16K tokens (benchmarks/RESULTS.md).
It ships with the package (no download), so `python -m minference_jax.prefill` works on a fresh
machine and its answer can be checked: the default prompt hides the key 71432.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from minference_jax.models.checkpoint import load_model
from minference_jax.models.config import ModelConfig
from minference_jax.models.modeling import CausalLM
from minference_jax.passkey import passkey_prompt
from minference_jax.tokenization import ByteTokenizer

CHECKPOINT = pathlib.Path(__file__).parents[1] / "checkpoints" / "passkey-tiny"
SEARCHED_CONFIG = "passkey_tiny_searched"  # in minference_jax/configs/
DEFAULT_KEY = "71432"
# The pattern search space of the passkey model, reference (per-head cost bound) first: budgets
# sized for its 2K-16K-token documents, where VerticalSlash(1000, 6096) would be dense. The
# reference, A-shape with 64 sink + 256 local tokens, computes ~1/3 of the causal tiles at 2K.
SEARCH_CANDIDATES = (
    P.AShape(64, 256),
    P.VerticalSlash(400, 100),
    P.VerticalSlash(300, 100),
    P.VerticalSlash(200, 100),
    P.VerticalSlash(30, 100),
    P.BlockSparse(6),
)


def default_model(dtype=jnp.float32) -> tuple[CausalLM, ModelConfig, ByteTokenizer]:
    model, config = load_model(CHECKPOINT, dtype)
    return model, config, ByteTokenizer()


def default_prompt() -> str:
    """A 2048-token passkey prompt (key 71432 at 40% depth) ending with the question."""
    prompt, _ = passkey_prompt(np.random.default_rng(0), 2048, 0.4, key=DEFAULT_KEY)
    return prompt
