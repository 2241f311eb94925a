"""The embedded default model of the prefill CLI: a tiny Llama built from a fixed seed.

It needs no file and no network, so `python -m minference_jax.prefill` works on a fresh machine.
Its weights are random (its continuations are noise); the trained checkpoint of the evaluation
work replaces it later.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from minference_jax.models.config import ModelConfig, RopeConfig
from minference_jax.models.modeling import CausalLM
from minference_jax.tokenization import ByteTokenizer

DEFAULT_CONFIG = ModelConfig(
    family="llama",
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=128,
    intermediate_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1 << 20,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=500000.0),
)


def default_model(dtype=jnp.float32) -> tuple[CausalLM, ModelConfig, ByteTokenizer]:
    model = CausalLM(DEFAULT_CONFIG, dtype=dtype, rngs=nnx.Rngs(0))
    return model, DEFAULT_CONFIG, ByteTokenizer()
