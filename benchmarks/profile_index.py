"""Stage-by-stage timing of the vertical-slash estimator (one layer, Llama-3-8B shapes).

    python -m benchmarks.profile_index --seq-len 131072

Prints the median ms of each stage alone (XLA and Pallas estimators side by side): where the
index time goes. Writes the same table to profile_index_<device>.{json,md} under --out (default
benchmarks/results/local/, git-ignored). Earlier variants (bf16 logits, skewed logits, a grouped
conv) and their numbers are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

from benchmarks.device_guard import declare
from benchmarks.timing import DEFAULT_OUT, device_name, time_fn, write_table
from minference_jax import patterns as P
from minference_jax.index_approx import (
    _grouped,
    _map_over_kv_heads,
    _top_per_head,
    _vertical_slash_scores,
    build_sparse_index,
    estimate_vertical_slash,
)
from pallas_kernels import vs_estimate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "profile_index")
    args = parser.parse_args(argv)
    n, h, hkv, d = args.seq_len, args.heads, args.kv_heads, 128
    interpret = jax.default_backend() != "gpu"
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = jax.random.normal(kq, (1, n, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (1, n, hkv, d), jnp.bfloat16)
    scale = d**-0.5
    budgets = [(1000, 6096)] * h
    top_v, top_s = min(1000, n), min(6096, n)
    budget_v, budget_s = jnp.full((h,), top_v), jnp.full((h,), top_s)

    def xla_scores(q, k):
        q_last = _grouped(q[:, -64:], hkv)
        return _map_over_kv_heads(
            lambda a, b: _vertical_slash_scores(a, b, scale=scale), q_last, k, one_at_a_time=False
        )

    stages = {
        "logits (einsum only, f32 out)": lambda q, k: jnp.einsum(
            "brkgd,bnkd->bkgrn", _grouped(q[:, -64:], hkv), k, preferred_element_type=jnp.float32
        ),
        "scores, xla": xla_scores,
        "scores, pallas": lambda q, k: vs_estimate.vertical_slash_scores(
            q[:, -64:], k, scale=scale, interpret=interpret
        ),
        "top_k 1000 + 6096 (lax.top_k)": lambda x: (
            jax.lax.top_k(x, top_v)[1],
            jax.lax.top_k(x, top_s)[1],
        ),
        "top 1000 + 6096 (radix select)": lambda x: (
            _top_per_head(x, budget_v, top_v),
            _top_per_head(x, budget_s, top_s),
        ),
        "estimate_vertical_slash, xla": lambda q, k: estimate_vertical_slash(
            q, k, budgets, scale=scale, estimator="xla"
        ),
        "estimate_vertical_slash, pallas": lambda q, k: estimate_vertical_slash(
            q, k, budgets, scale=scale, estimator="pallas"
        ),
        "build_sparse_index VS(1000,6096), xla": lambda q, k: build_sparse_index(
            q, k, P.VerticalSlash(1000, 6096), estimator="xla"
        ),
        "build_sparse_index VS(1000,6096), pallas": lambda q, k: build_sparse_index(
            q, k, P.VerticalSlash(1000, 6096), estimator="pallas"
        ),
    }
    scores = jax.random.uniform(kq, (1, h, n), jnp.float32)
    device = device_name()
    print(f"device {device}, N={n}, {h} q / {hkv} kv heads, d={d}, bf16")
    rows = []
    for name, fn in stages.items():
        inputs = (scores,) if name.startswith("top") else (q, k)
        ms = time_fn(jax.jit(fn), *inputs, repeats=args.repeats)
        rows.append(dict(device=device, seq_len=n, heads=h, kv_heads=hkv, stage=name, ms=ms))
        print(f"{name:42s} {ms:8.3f} ms", flush=True)
    lines = [
        f"Vertical-slash estimator stages, N={n}, {h} q / {hkv} kv heads, d={d}, bf16, "
        f"{device}; median of {args.repeats} after warm-up.",
        "",
        "| stage | ms |",
        "|---|---|",
    ] + [f"| {r['stage']} | {r['ms']:.3f} |" for r in rows]
    write_table(
        args.out / f"profile_index_{device.replace(':', '_').replace(' ', '_')}", rows, lines
    )
    return rows


if __name__ == "__main__":
    main()
