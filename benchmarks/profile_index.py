"""Stage-by-stage timing of the vertical-slash estimator (one layer, Llama-3-8B shapes).

    python -m benchmarks.profile_index --seq-len 131072

Prints the median ms of each stage alone, so the notes can say where the index time goes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.timing import device_name, time_fn
from minference_jax import patterns as P
from minference_jax.index_approx import (
    _grouped,
    _map_over_kv_heads,
    _vertical_slash_scores,
    build_sparse_index,
    estimate_vertical_slash,
)


def _scores_bf16_logits(q_last, k, *, scale):
    """Variant: logits kept in the input dtype (as the PyTorch original), softmax in f32."""
    from minference_jax.index_approx import _skew_diagonal_sums

    rows, n = q_last.shape[1], k.shape[1]
    logits = jnp.einsum("brgd,bnd->bgrn", (q_last * scale).astype(q_last.dtype), k)
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]
    probs = jax.nn.softmax(jnp.where(causal, logits.astype(jnp.float32), -jnp.inf), axis=-1)
    return probs.sum(axis=-2), _skew_diagonal_sums(probs)


def _scores_skew_logits(q_last, k, *, scale):
    """Variant: bf16 logits; both reductions read logits (skewed for diagonals) + row stats."""
    rows, n = q_last.shape[1], k.shape[1]
    logits = jnp.einsum("brgd,bnd->bgrn", (q_last * scale).astype(q_last.dtype), k)
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]
    masked = jnp.where(causal, logits.astype(jnp.float32), -jnp.inf)
    row_max = masked.max(-1, keepdims=True)
    row_sum = jnp.exp(masked - row_max).sum(-1, keepdims=True)
    columns = (jnp.exp(masked - row_max) / row_sum).sum(-2)
    *lead, _, _ = logits.shape
    width = n + rows
    padded = jnp.pad(masked, [(0, 0)] * len(lead) + [(0, 0), (rows, 0)], constant_values=-jnp.inf)
    flat = jnp.pad(
        padded.reshape(*lead, rows * width),
        [(0, 0)] * len(lead) + [(0, rows + 1)],
        constant_values=-jnp.inf,
    )
    skewed = flat[..., 1 : 1 + rows * (width + 1)].reshape(*lead, rows, width + 1)[..., :n]
    diagonals = (jnp.exp(skewed - row_max) / row_sum).sum(-2)[..., ::-1]
    return columns, diagonals


def _scores_conv(q_last, k, *, scale):
    """Variant: bf16 logits, f32 row stats, then ONE grouped conv gives column and diagonal sums.

    With e = exp(s - m_r) (input dtype) padded by R-1 on both sides, a conv whose taps are
    one-hot at R-1 (columns) or at r (diagonals), weighted by 1/l_r, sums each skewed row.
    """
    b, rows, g, _ = q_last.shape
    n = k.shape[1]
    logits = jnp.einsum("bnd,brgd->bgrn", k, (q_last * scale).astype(q_last.dtype))
    causal = jnp.arange(n)[None, :] <= (n - rows + jnp.arange(rows))[:, None]
    masked = jnp.where(causal, logits.astype(jnp.float32), -jnp.inf)
    row_max = masked.max(-1, keepdims=True)
    e = jnp.exp(masked - row_max)
    inv_sum = 1.0 / e.sum(-1)  # [B, G, R]
    x = jnp.pad(
        e.astype(q_last.dtype).reshape(1, b * g * rows, n), ((0, 0), (0, 0), (rows - 1, rows - 1))
    )
    taps = jnp.stack([jnp.zeros((rows, rows)).at[:, rows - 1].set(1.0), jnp.eye(rows)])  # [2, r, t]
    w = (taps[None, None] * inv_sum[:, :, None, :, None]).reshape(b * g * 2, rows, rows)
    y = jax.lax.conv_general_dilated(
        x,
        w.astype(q_last.dtype),
        window_strides=(1,),
        padding="VALID",
        feature_group_count=b * g,
        dimension_numbers=("NCH", "OIH", "NCH"),
        preferred_element_type=jnp.float32,
    ).reshape(b, g, 2, -1)
    return y[:, :, 0, :n], y[:, :, 1, :n][..., ::-1]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    args = parser.parse_args(argv)
    n, h, hkv, d = args.seq_len, args.heads, args.kv_heads, 128
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (1, n, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (1, n, hkv, d), jnp.bfloat16)
    q_last = _grouped(q[:, -64:], hkv)
    scale = d**-0.5
    budgets = [(1000, 6096)] * h

    stages = {
        "logits (einsum only)": jax.jit(
            lambda q, k: jnp.einsum("brkgd,bnkd->bkgrn", q, k, preferred_element_type=jnp.float32)
        ),
        "column + diagonal scores": jax.jit(
            lambda q, k: _map_over_kv_heads(
                lambda a, b: _vertical_slash_scores(a, b, scale=scale), q, k, 0
            )
        ),
        "scores, bf16 logits": jax.jit(
            lambda q, k: _map_over_kv_heads(
                lambda a, b: _scores_bf16_logits(a, b, scale=scale), q, k, 0
            )
        ),
        "scores, bf16 logits, skewed logits": jax.jit(
            lambda q, k: _map_over_kv_heads(
                lambda a, b: _scores_skew_logits(a, b, scale=scale), q, k, 0
            )
        ),
        "scores, conv": jax.jit(
            lambda q, k: _map_over_kv_heads(lambda a, b: _scores_conv(a, b, scale=scale), q, k, 0)
        ),
        "sort [1, 32, N] (for comparison)": jax.jit(lambda x: jnp.sort(x, axis=-1)),
        "top_k 1000 + 6096 on [1, 32, N]": jax.jit(
            lambda x: (jax.lax.top_k(x, 1000)[1], jax.lax.top_k(x, 6096)[1])
        ),
        "estimate_vertical_slash": jax.jit(
            lambda q, k: estimate_vertical_slash(q, k, budgets, scale=scale)
        ),
        "build_sparse_index VS(1000,6096)": jax.jit(
            lambda q, k: build_sparse_index(q, k, P.VerticalSlash(1000, 6096))
        ),
    }
    scores = jax.random.normal(kq, (1, h, n), jnp.float32)
    print(f"device {device_name()}, N={n}, {h} q / {hkv} kv heads, d={d}, bf16")
    for name, fn in stages.items():
        inputs = (
            (scores,)
            if name.startswith(("top_k", "sort"))
            else (q_last, k)
            if "scores" in name or "logits" in name
            else (q, k)
        )
        print(f"{name:40s} {time_fn(fn, *inputs):8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
