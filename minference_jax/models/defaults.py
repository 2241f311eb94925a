"""The embedded default of the prefill CLI, and the smaller shipped model.

`minference_jax/checkpoints/pytext-12m` (the default) is a 12.8M-parameter, 8-layer Llama over
UTF-8 bytes trained on Python sources and documentation up to 32K tokens, with pass-key rows
(`benchmarks/train_longctx.py`; benchmarks/RESULTS.md). The default prompt is 2048 tokens of
held-out Python text (files it never trained on) hiding the pass key 71432 at 40% depth,
shipped beside the weights (`default_prompt.txt`, written by `default_prompt_text`). Both ship
with the package (no download), so `python -m minference_jax.prefill` works on a fresh machine
and its answer can be checked.

`minference_jax/checkpoints/passkey-tiny` is a 2-layer Llama over bytes trained on a synthetic
haystack (`benchmarks/train_tiny_longctx.py`): small enough for the tests' quick runs.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp

from minference_jax import patterns as P
from minference_jax.models.checkpoint import load_model
from minference_jax.models.config import ModelConfig
from minference_jax.models.modeling import CausalLM
from minference_jax.tokenization import load_tokenizer

CHECKPOINTS = pathlib.Path(__file__).parents[1] / "checkpoints"
CHECKPOINT = CHECKPOINTS / "pytext-12m"
SEARCHED_CONFIG = "pytext_12m_searched"  # in minference_jax/configs/
PROMPT_FILE = CHECKPOINT / "default_prompt.txt"
DEFAULT_KEY = "71432"
DESCRIPTION = "embedded pytext-12m (8-layer Llama over bytes, trained on Python text)"

PASSKEY_TINY = CHECKPOINTS / "passkey-tiny"
# The pattern search space of the passkey-tiny model, reference (per-head cost bound) first:
# budgets sized for its 2K-16K-token documents, where VerticalSlash(1000, 6096) would be dense.
# The reference, A-shape with 64 sink + 256 local tokens, computes ~1/3 of the causal tiles at 2K.
PASSKEY_TINY_SEARCH_CANDIDATES = (
    P.AShape(64, 256),
    P.VerticalSlash(400, 100),
    P.VerticalSlash(300, 100),
    P.VerticalSlash(200, 100),
    P.VerticalSlash(30, 100),
    P.BlockSparse(6),
)


def default_model(dtype=jnp.float32) -> tuple[CausalLM, ModelConfig, object]:
    """(model, config, tokenizer) of the embedded default checkpoint."""
    model, config = load_model(CHECKPOINT, dtype)
    return model, config, load_tokenizer(CHECKPOINT, config.vocab_size)


def default_prompt() -> str:
    """The default prompt: 2048 tokens of held-out text hiding the key 71432, then the question."""
    return PROMPT_FILE.read_text(encoding="utf-8")
