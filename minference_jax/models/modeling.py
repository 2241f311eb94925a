"""Decoder-only transformer (Llama 2/3/3.1, Mistral, Yi, Qwen2/2.5, Phi-3) in Flax NNX.

One module tree for every family: Phi-3's fused qkv / gate_up weights are split at conversion,
Qwen2's q/k/v biases are optional Params. Attention goes through `sparse_attention` with each
layer's per-head patterns, so the model does not know which kernel runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from minference_jax import patterns as P
from minference_jax.attention import layer_plan, planned_attention_with_fraction
from minference_jax.models.config import ModelConfig
from minference_jax.models.rope import apply_rope, rope_tables
from minference_jax.models.sequence_parallel import pipelined, sequence_layout, steps_to_tokens


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How every layer attends: dense, or one pattern per (layer, query head)."""

    patterns: P.HeadPatterns | None = None  # None: dense
    implementation: str | None = None  # passed to sparse_attention

    def layer(self, layer_id: int, num_heads: int):
        if self.patterns is None:
            return P.Dense()
        return self.patterns[layer_id]

    def check(self, config: ModelConfig) -> None:
        if self.patterns is not None:
            self.patterns.check_model(config.num_layers, config.num_heads)


DENSE_ATTENTION = AttentionSpec()


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF stores [out, in])."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (n_in, n_out), dtype) * 0.02)
        self.bias = nnx.Param(jnp.zeros((n_out,), dtype)) if bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf.astype(x.dtype) * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        bias = c.attention_bias
        self.q_proj = Linear(
            c.hidden_size, c.num_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs
        )
        self.k_proj = Linear(
            c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs
        )
        self.v_proj = Linear(
            c.hidden_size, c.num_kv_heads * c.head_dim, bias=bias, dtype=dtype, rngs=rngs
        )
        self.o_proj = Linear(
            c.num_heads * c.head_dim, c.hidden_size, bias=False, dtype=dtype, rngs=rngs
        )
        self.config = config

    def qkv(self, x, cos, sin):
        """x [B, T, hidden] -> q [B, T, H, D], k, v [B, T, Hkv, D] with RoPE applied."""
        b, t, _ = x.shape
        d = self.config.head_dim  # head counts from the weights: a tensor-parallel shard works too
        q = self.q_proj(x).reshape(b, t, -1, d)
        k = self.k_proj(x).reshape(b, t, -1, d)
        v = self.v_proj(x).reshape(b, t, -1, d)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(
            c.hidden_size, c.intermediate_size, bias=False, dtype=dtype, rngs=rngs
        )
        self.up_proj = Linear(
            c.hidden_size, c.intermediate_size, bias=False, dtype=dtype, rngs=rngs
        )
        self.down_proj = Linear(
            c.intermediate_size, c.hidden_size, bias=False, dtype=dtype, rngs=rngs
        )

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype) * 0.02
        )
        self.layers = nnx.List(
            [DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)]
        )
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def logits(self, hidden):
        hidden = self.final_norm(hidden)
        if self.lm_head is None:
            return jnp.einsum("...h,vh->...v", hidden, self.embed[...])
        return self.lm_head(hidden)

    def __call__(self, input_ids, attention: AttentionSpec = DENSE_ATTENTION):
        """input_ids [B, T] -> logits [B, T, V] (float32). Whole-sequence forward (tests, short)."""
        attention.check(self.config)
        seq_len = input_ids.shape[1]
        cos, sin = rope_tables(self.config, jnp.arange(seq_len), seq_len)
        x = self.embed[...][input_ids]
        for layer_id, layer in enumerate(self.layers):
            plan, budgets = layer_plan(
                attention.layer(layer_id, self.config.num_heads),
                seq_len,
                self.config.num_heads,
                attention.implementation,
                dtype=x.dtype,
                head_dim=self.config.head_dim,
            )
            x, _, _ = layer_body(
                layer,
                x,
                cos,
                sin,
                budgets,
                plan=plan,
                implementation=attention.implementation,
                chunk=seq_len,
            )
        return self.logits(x).astype(jnp.float32)


def _chunked(fn, x, chunk: int):
    """Apply fn over [B, T, ...] in T-chunks (T padded at the end, then trimmed)."""
    b, t = x.shape[:2]
    if t <= chunk:
        return fn(x)
    n_chunks = -(-t // chunk)
    pad = [(0, 0), (0, n_chunks * chunk - t)] + [(0, 0)] * (x.ndim - 2)
    xs = jnp.pad(x, pad).reshape(b, n_chunks, chunk, *x.shape[2:])
    ys = jax.lax.map(fn, jnp.moveaxis(xs, 1, 0))  # pytree of [n_chunks, B, chunk, ...]
    return jax.tree.map(
        lambda y: jnp.moveaxis(y, 0, 1).reshape(b, n_chunks * chunk, *y.shape[3:])[:, :t], ys
    )


def layer_body(
    layer,
    x,
    cos,
    sin,
    budgets,
    *,
    plan,
    implementation,
    chunk,
    axis_name=None,
    sequence_parallel=False,
    with_fraction=False,
):
    """One decoder layer over the whole prompt: x [B, T, hidden] -> (x, k, v).

    With `axis_name`, `layer` holds this device's slice of the heads and MLP columns (tensor
    parallel under shard_map) and the attention / MLP outputs are summed across devices. With
    `sequence_parallel` as well, x holds this device's rows of `sequence_layout` (cos / sin have
    the true length T): norms and residuals run on them, an all-gather per prompt slice feeds
    the q/k/v and gate/up projections and a reduce-scatter per slice sums and re-splits the
    o_proj and down_proj outputs, pipelined so that the collectives can overlap the matmuls.
    Padding rows are cut before attention, so they never reach a real token.
    With `with_fraction`, also the share of the causal key tiles the attention computed
    -> (x, k, v, fraction), from the index the layer estimated (1.0 where it ran dense).
    """
    b, t = x.shape[0], cos.shape[0] if sequence_parallel else x.shape[1]
    d = layer.attn.config.head_dim

    def project(h):
        return layer.attn.q_proj(h), layer.attn.k_proj(h), layer.attn.v_proj(h)

    if sequence_parallel:
        rows, steps = sequence_layout(t, jax.lax.axis_size(axis_name), chunk)

        def gather_normed(norm, tokens):
            by_step = tokens.reshape(b, steps, rows, -1)

            def fetch(i):  # step i's prompt slice, normed, from every device
                own = jax.lax.dynamic_index_in_dim(by_step, i, axis=1, keepdims=False)
                return jax.lax.all_gather(norm(own), axis_name, axis=1, tiled=True)

            return fetch

        def scatter(y):
            return jax.lax.psum_scatter(y, axis_name, scatter_dimension=1, tiled=True)

        qkv = pipelined(gather_normed(layer.input_norm, x), project, lambda y: y, steps)
        q, k, v = (steps_to_tokens(y)[:, :t] for y in qkv)
    else:
        q, k, v = _chunked(lambda xc: project(layer.input_norm(xc)), x, chunk)
    q = apply_rope(q.reshape(b, t, -1, d), cos, sin)
    k = apply_rope(k.reshape(b, t, -1, d), cos, sin)
    v = v.reshape(b, t, -1, d)
    o, fraction = planned_attention_with_fraction(
        q, k, v, budgets, plan=plan, scale=d**-0.5, implementation=implementation
    )
    o = o.reshape(b, t, -1)
    if axis_name is not None:
        fraction = jax.lax.pmean(fraction, axis_name)  # every device holds as many heads
    if sequence_parallel:
        o = jnp.pad(o, ((0, 0), (0, x.shape[1] * jax.lax.axis_size(axis_name) - t), (0, 0)))
        o = o.reshape(b, steps, -1, o.shape[-1])

        def slice_of_o(i):
            return jax.lax.dynamic_index_in_dim(o, i, axis=1, keepdims=False)

        x = x + steps_to_tokens(pipelined(slice_of_o, layer.attn.o_proj, scatter, steps))
        mlp_in = gather_normed(layer.post_attn_norm, x)
        out = x + steps_to_tokens(pipelined(mlp_in, layer.mlp, scatter, steps))
    else:
        attn_out = _chunked(layer.attn.o_proj, o, chunk)
        if axis_name is not None:
            attn_out = jax.lax.psum(attn_out, axis_name)
        x = x + attn_out
        mlp_out = _chunked(lambda xc: layer.mlp(layer.post_attn_norm(xc)), x, chunk)
        if axis_name is not None:
            mlp_out = jax.lax.psum(mlp_out, axis_name)
        out = x + mlp_out
    return (out, k, v, fraction) if with_fraction else (out, k, v)
