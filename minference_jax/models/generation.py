"""Long-prompt prefill (per-layer loop, sequence-chunked projections/MLP) and greedy decoding.

Per-layer loop, one jitted step per layer: every layer has the same shapes and the patterns'
budgets are traced data, so the step compiles once per prompt length and IndexPlan (pattern
families + bucketed widths), and the Python loop can print progress and move each layer's KV
cache to the host. Projections and the MLP run over `chunk_size`-token slices (a `lax.map`), so
a 1M-token Llama-3-8B prefill never holds a [N, intermediate] activation.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minference_jax.attention import layer_backend, plan_layers
from minference_jax.models.modeling import DENSE_ATTENTION, AttentionSpec, CausalLM, layer_body
from minference_jax.models.rope import decode_rope_tables, rope_tables
from minference_jax.models.sharding import TensorParallel


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention ran, read from the index it built."""

    families: tuple[str, ...]  # pattern families of its index ("dense": no index, dense ran)
    computed_fraction: float  # key tiles computed / a dense causal kernel's (1.0: dense ran)
    backend: str = ""  # what ran it: mosaic, triton, xla, reference, cudnn or xla-dense


@dataclasses.dataclass
class PrefillResult:
    last_logits: jax.Array  # [B, V] float32, logits of the last prompt token
    cache: list[tuple[jax.Array, jax.Array]] | None  # per layer (k, v) [B, N, Hkv, D], rope'd
    seconds: float
    layers: tuple[LayerAttention, ...] = ()  # per layer


layer_step = nnx.jit(
    layer_body, static_argnames=("plan", "implementation", "chunk", "axis_name", "with_fraction")
)


@nnx.jit
def _embed(model, input_ids):
    return model.embed[...][input_ids]


@nnx.jit
def _last_logits(model, x):
    return model.logits(x[:, -1]).astype(jnp.float32)


def prefill(
    model: CausalLM,
    input_ids,
    attention: AttentionSpec = DENSE_ATTENTION,
    *,
    chunk_size: int = 8192,
    return_cache: bool = False,
    cache_on_host: bool = False,
    progress=None,
    mesh=None,
) -> PrefillResult:
    """Run the prompt through the model; last-token logits and optionally the KV cache.

    progress: None, or a callable(layer_id, num_layers, seconds_so_far) called after each layer.
    The result's `layers` says per layer which pattern families its index held and the share
    of the causal key tiles its attention computed.
    mesh: a 1-D `jax.sharding.Mesh` (axis "tp") to run tensor-parallel over its devices
      (see `minference_jax.models.sharding`; heads placed to balance `attention`'s patterns,
      activations sequence-parallel), or a `TensorParallel` already built for this model (its
      weights placed once, for repeated prefills); the KV cache then comes back sharded by kv
      head.
    """
    config = model.config
    attention.check(config)
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got {input_ids.shape}")
    start = time.perf_counter()
    seq_len = input_ids.shape[1]
    cos, sin = rope_tables(config, jnp.arange(seq_len), seq_len)
    x = _embed(model, input_ids)
    cache = [] if return_cache else None
    fractions = []
    sharded = mesh
    if mesh is not None and not isinstance(mesh, TensorParallel):
        sharded = TensorParallel(model, mesh, attention.patterns, seq_len=seq_len)
    planned = plan_layers(
        attention,
        seq_len,
        config.num_layers,
        config.num_heads,
        dtype=x.dtype,
        head_dim=config.head_dim,
    )
    for layer_id, (layer, (plan, budgets)) in enumerate(zip(model.layers, planned, strict=True)):
        step = layer_step if sharded is None else sharded.step(layer_id)
        x, k, v, fraction = step(
            layer,
            x,
            cos,
            sin,
            budgets,
            plan=plan,
            implementation=attention.implementation,
            chunk=chunk_size,
            with_fraction=True,
        )
        fractions.append(fraction if sharded is None else fraction.addressable_shards[0].data)
        if cache is not None:
            if sharded is not None:
                k, v = sharded.model_order(layer_id, k, v)
            cache.append(jax.device_get((k, v)) if cache_on_host else (k, v))
        if progress is not None:
            jax.block_until_ready(x)
            progress(layer_id, config.num_layers, time.perf_counter() - start)
    if sharded is not None:
        x = sharded.last_token(x, seq_len, chunk_size)
    logits = jax.block_until_ready(_last_logits(model, x))
    seconds = time.perf_counter() - start
    layers = tuple(
        LayerAttention(
            ("dense",) if plan is None else plan.families,
            float(fraction),
            layer_backend(
                plan, attention.implementation, x.dtype, config.head_dim, seq_len, float(fraction)
            ),
        )
        for (plan, _), fraction in zip(planned, fractions, strict=True)
    )
    return PrefillResult(logits, cache, seconds, layers)


@nnx.jit
def _decode_step(model, token, position, caches, cos, sin):
    """One greedy step: token [B] at `position` attends the cache [B, S, Hkv, D] (dense).

    cos, sin [1, head_dim]: the token's RoPE rows (traced, so the step compiles once even when
    the scaling changes with the length).
    """
    config = model.config
    x = model.embed[...][token][:, None]  # [B, 1, hidden]
    new_caches = []
    for layer, (k_cache, v_cache) in zip(model.layers, caches, strict=True):
        q, k, v = layer.attn.qkv(layer.input_norm(x), cos, sin)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), position, 1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), position, 1)
        b = q.shape[0]
        qg = q.reshape(b, config.num_kv_heads, config.group_size, config.head_dim)
        scores = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache, preferred_element_type=jnp.float32)
        scores = scores * config.head_dim**-0.5
        visible = jnp.arange(k_cache.shape[1]) <= position
        probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
        o = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v_cache.dtype), v_cache)
        x = x + layer.attn.o_proj(o.reshape(b, 1, -1))
        x = x + layer.mlp(layer.post_attn_norm(x))
        new_caches.append((k_cache, v_cache))
    logits = model.logits(x[:, 0]).astype(jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), new_caches


def _recompute_position(config, prompt_len: int, max_new_tokens: int) -> int | None:
    """Where Phi-3 LongRoPE decoding re-runs the whole sequence, as transformers does.

    A prompt within the original context runs with the short factors; the first token past it
    switches to the long factors, and transformers' Phi-3 then drops the KV cache and recomputes
    every position with them. Returns that token's position, or None when no step crosses.
    """
    rope = config.rope
    original = rope.original_max_position_embeddings
    if config.family != "phi3" or rope.rope_type != "longrope" or original is None:
        return None
    return original if prompt_len <= original < prompt_len + max_new_tokens - 1 else None


def _prefill_cache(model, input_ids, attention, total: int, *, chunk_size, progress, mesh):
    """Prefill `input_ids`: (its result, its KV cache padded to `total` positions, one device)."""
    result = prefill(
        model,
        input_ids,
        attention,
        chunk_size=chunk_size,
        return_cache=True,
        progress=progress,
        mesh=mesh,
    )
    if mesh is not None:  # decoding runs on one device: gather the head-sharded cache
        device = model.embed[...].devices().pop()
        result.cache = [jax.device_put(kv, device) for kv in result.cache]
    pad = total - input_ids.shape[1]
    caches = [
        tuple(jnp.pad(c, ((0, 0), (0, pad), (0, 0), (0, 0))) for c in kv) for kv in result.cache
    ]
    result.cache = None
    return result, caches


def generate(
    model: CausalLM,
    input_ids,
    max_new_tokens: int,
    attention: AttentionSpec = DENSE_ATTENTION,
    *,
    chunk_size: int = 8192,
    progress=None,
    mesh=None,
) -> tuple[np.ndarray, PrefillResult]:
    """Greedy continuation: sparse (or dense) prefill, then dense decoding over the KV cache.

    RoPE scalings that depend on the length (dynamic NTK, LongRoPE) follow transformers: each
    decoded token is rotated for the length it ends; a Phi-3 LongRoPE prompt within the original
    context is prefilled again with the long factors when decoding first passes that context.
    Returns (new tokens [B, max_new_tokens], the prefill result).
    """
    input_ids = np.asarray(input_ids)
    seq_len = input_ids.shape[1]
    total = seq_len + max_new_tokens
    run_prefill = functools.partial(
        _prefill_cache, model, attention=attention, total=total, chunk_size=chunk_size, mesh=mesh
    )
    result, caches = run_prefill(input_ids, progress=progress)
    token = jnp.argmax(result.last_logits, axis=-1).astype(jnp.int32)
    tokens = [token]
    first = seq_len  # position of the first decoded token
    cos, sin = decode_rope_tables(model.config, np.arange(first, total - 1))
    recompute = _recompute_position(model.config, seq_len, max_new_tokens)
    for step in range(max_new_tokens - 1):
        position = first + step
        if position == recompute:
            so_far = np.concatenate([input_ids, np.stack(tokens, axis=1)], axis=1)
            again, caches = run_prefill(so_far, progress=None)
            token = jnp.argmax(again.last_logits, axis=-1).astype(jnp.int32)
        else:
            row = jnp.int32(step)
            token, caches = _decode_step(
                model,
                token,
                jnp.int32(position),
                caches,
                jax.lax.dynamic_slice_in_dim(cos, row, 1),
                jax.lax.dynamic_slice_in_dim(sin, row, 1),
            )
        tokens.append(token)
    return np.stack([np.asarray(t) for t in tokens], axis=1), result
