"""Flax NNX decoder models (Llama family, Qwen2, Phi-3) that attend through minference_jax."""

from minference_jax.models.config import ModelConfig, ModelConfigError, RopeConfig
from minference_jax.models.modeling import AttentionSpec, CausalLM

__all__ = ["AttentionSpec", "CausalLM", "ModelConfig", "ModelConfigError", "RopeConfig"]
