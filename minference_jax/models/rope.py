"""Rotary position embeddings with the scalings HF checkpoints use (f32 angle arithmetic)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax.models.config import ModelConfig, RopeConfig, longrope_attention_factor


def inverse_frequencies(config: ModelConfig, seq_len: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] float64, cos/sin scale) for a prompt of `seq_len` tokens.

    `seq_len` matters for "dynamic" (NTK base grows past the original context) and "longrope"
    (long factors past the original context), as in transformers; "yarn" ignores it.
    """
    rope, dim = config.rope, config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    base = rope.theta
    scale = 1.0
    if rope.rope_type == "dynamic":
        original = rope.original_max_position_embeddings or config.max_position_embeddings
        if seq_len > original:
            base = base * ((rope.factor * seq_len / original) - (rope.factor - 1)) ** (
                dim / (dim - 2)
            )
    inv_freq = 1.0 / base**exponents
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        original = rope.original_max_position_embeddings
        low_wavelen = original / rope.low_freq_factor
        high_wavelen = original / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (original / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope.rope_type == "longrope":
        use_long = seq_len > (rope.original_max_position_embeddings or 0)
        factors = np.asarray(rope.long_factor if use_long else rope.short_factor, np.float64)
        inv_freq = 1.0 / (factors * rope.theta**exponents)
        scale = longrope_attention_factor(rope)
    elif rope.rope_type == "yarn":
        inv_freq, scale = _yarn(rope, dim, inv_freq)
    return inv_freq, scale


def _yarn(rope: RopeConfig, dim: int, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071) as transformers' _compute_yarn_parameters; static in seq_len.

    Bands that turn more than beta_fast times over the original context keep their frequency
    (extrapolation), those turning fewer than beta_slow times are divided by `factor`
    (interpolation), and a linear ramp over dimension indices blends the ones in between.
    """
    original = rope.original_max_position_embeddings

    def correction_dim(rotations):  # the dimension whose band turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)  # dim - 1, not dim/2 - 1: as transformers
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv_freq = inv_freq / rope.factor * (1.0 - extrapolation) + inv_freq * extrapolation

    def mscale(scale):  # paper eq. 21: 0.1 * scale * ln(factor) + 1
        return 1.0 if rope.factor <= 1 else 0.1 * scale * math.log(rope.factor) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:  # DeepSeek-style ratio
        attention_factor = mscale(rope.mscale) / mscale(rope.mscale_all_dim)
    else:
        attention_factor = mscale(1.0)
    return inv_freq, attention_factor


def rope_tables(config: ModelConfig, positions: jax.Array, seq_len: int):
    """cos, sin [T, head_dim] in f32 for integer positions [T] (exact up to 2^24 positions)."""
    inv_freq, scale = inverse_frequencies(config, seq_len)
    return _tables(positions, inv_freq[None, :], np.full((1, 1), scale))


def decode_rope_tables(config: ModelConfig, positions) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim] for tokens decoded one at a time at `positions` [T].

    Each row uses the scaling in force when that token is the last of the sequence
    (seq_len = position + 1), as transformers does at every cached decoding step: dynamic NTK
    grows its base step by step, longrope switches to the long factors once past the original
    context. Keys already in the cache keep the rotation they were computed with.
    """
    positions = np.asarray(positions, np.int64).reshape(-1)
    inv_freq = np.zeros((len(positions), config.head_dim // 2))
    scale = np.ones((len(positions), 1))
    for row, position in enumerate(positions):
        inv_freq[row], scale[row] = inverse_frequencies(config, int(position) + 1)
    return _tables(jnp.asarray(positions, jnp.int32), inv_freq, scale)


def _tables(positions: jax.Array, inv_freq: np.ndarray, scale: np.ndarray):
    """positions [T]; inv_freq [1 or T, head_dim/2]; scale [1 or T, 1] -> cos, sin [T, head_dim]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    scale = jnp.asarray(scale, jnp.float32)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, D] rotated (HF rotate-half convention); math in f32, result in x.dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
