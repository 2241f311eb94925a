"""Up-front memory estimates: refuse a prompt that cannot fit before anything is allocated.

The estimate is a lower bound (weights, the KV cache of every token, one layer's q/k/v and
output), so a refusal is certain to be right; a run that passes can still run out of memory
in the parts not counted (MLP activations, compiler scratch).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from minference_jax.models.config import ModelConfig

INT32_MAX = 2**31 - 1  # positions and index entries are int32


class DoesNotFitError(ValueError):
    """The requested tokens cannot fit in the device's memory (or overflow int32 positions)."""


def parameter_count(config: ModelConfig) -> int:
    c = config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * (attention + mlp) + embeddings


def minimum_bytes(config: ModelConfig, tokens: int, itemsize: int, batch: int = 1) -> int:
    """A lower bound on the memory a prefill of `tokens` tokens (cache kept) needs."""
    c = config
    kv_cache = 2 * c.num_layers * c.num_kv_heads * c.head_dim * tokens * batch
    one_layer = (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim * tokens * batch
    return (parameter_count(c) + kv_cache + one_layer) * itemsize


def device_bytes(device: jax.Device | None = None) -> int | None:
    """Memory the device can allocate: the accelerator's limit, or the host's physical memory."""
    device = device or jax.devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
        return int(limit)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform reports it
        return None


def check_fits(config: ModelConfig, tokens: int, dtype, *, what: str, batch: int = 1) -> None:
    """Raise DoesNotFitError when `tokens` tokens certainly cannot be prefilled here."""
    if tokens > INT32_MAX:
        raise DoesNotFitError(f"{what}: {tokens} tokens exceed the int32 position range")
    needed = minimum_bytes(config, tokens, np.dtype(dtype).itemsize, batch)
    available = device_bytes()
    if available is not None and needed > available:
        raise DoesNotFitError(
            f"{what}: {tokens} tokens need at least {needed / 2**30:,.1f} GiB (weights and KV "
            f"cache), the device has {available / 2**30:,.1f} GiB"
        )
