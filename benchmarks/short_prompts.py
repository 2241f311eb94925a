"""One attention layer at short lengths: dense cuDNN vs the default dispatch vs the sparse kernel.

    python -m benchmarks.short_prompts --seq-lens 16384 32768          # on a GPU
    python -m benchmarks.short_prompts --seq-lens 512 --repeats 1      # CPU smoke run

Where a prompt is short, the index estimate weighs against the quadratic part, and the dispatch
(`minference_jax.attention`, implementation=None) runs the sparse kernel only when the estimated
index computes at most `dense_fallback_fraction(seq_len, kernel)` of the causal tiles, else
cuDNN. This times, per pattern and input, one layer (batch 1, 32 q / 8 kv heads, d 128, bf16 on
GPU, f32 on CPU) through: dense attention; the default dispatch (estimate + sparse kernel or
cuDNN, decided on device); the sparse kernel forced (`default_sparse_kernel`: Mosaic on sm_90,
else Triton; XLA on CPU); and the index estimate alone. Inputs: i.i.d. normal q/k (near-uniform
attention: indices come out dense) and `benchmarks.synthetic.structured_qk` (sinks, local decay,
heavy tokens). Blocks: `attention.default_blocks`. Median of --repeats after a warm-up call.
Writes short_prompts_<device>.{json,md} under --out and prints where.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

from benchmarks.device_guard import declare
from benchmarks.synthetic import structured_qk
from benchmarks.timing import DEFAULT_OUT, device_name, time_fn, write_table
from minference_jax import attention
from minference_jax.index_approx import build_sparse_index
from minference_jax.search import parse_candidate

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DEFAULT_PATTERNS = ["vs:1000,6096", "avs:0.95", "avsr:0.01"]


def layer_inputs(kind: str, n: int, dtype):
    key_q, key_k, key_v = jax.random.split(jax.random.PRNGKey(n), 3)
    if kind == "structured":
        q, k = structured_qk(key_q, 1, n, HEADS, KV_HEADS, HEAD_DIM, dtype)
    else:
        q = jax.random.normal(key_q, (1, n, HEADS, HEAD_DIM), dtype)
        k = jax.random.normal(key_k, (1, n, KV_HEADS, HEAD_DIM), dtype)
    return q, k, jax.random.normal(key_v, (1, n, KV_HEADS, HEAD_DIM), dtype)


def measure(pattern_text: str, q, k, v, dense_ms: float, repeats: int) -> dict:
    pattern = parse_candidate(pattern_text)  # checked in main
    n = q.shape[1]
    block_q, block_kv = attention.default_blocks((pattern,), None, q.dtype, HEAD_DIM)
    index = jax.jit(
        lambda q, k: build_sparse_index(q, k, pattern, block_q=block_q, block_kv=block_kv)
    )
    built = index(q, k)
    fraction = float(built.computed_fraction())
    forced = "xla"  # the sparse path off GPU
    if jax.default_backend() == "gpu":
        forced = attention.default_sparse_kernel(q.dtype, HEAD_DIM, built)
    plan, budgets = attention.layer_plan(
        pattern, n, HEADS, None, block_q=block_q, block_kv=block_kv
    )
    # The default dispatch, with the tile share it reports (1.0 where it ran cuDNN): the same
    # program `sparse_attention(implementation=None)` runs, plus that scalar.
    dispatch = jax.jit(
        lambda q, k, v: attention.planned_attention_with_fraction(
            q, k, v, budgets, plan=plan, scale=HEAD_DIM**-0.5, implementation=None
        )
    )
    forced_layer = jax.jit(
        lambda q, k, v: attention.sparse_attention(
            q, k, v, patterns=pattern, block_q=block_q, block_kv=block_kv, implementation=forced
        )
    )
    dispatch_ms = time_fn(dispatch, q, k, v, warmup=1, repeats=repeats)
    kernel_ms = time_fn(forced_layer, q, k, v, warmup=1, repeats=repeats)
    reported = float(dispatch(q, k, v)[1])
    ran = attention.layer_backend(plan, None, q.dtype, HEAD_DIM, n, reported)
    return dict(
        pattern=pattern_text,
        block_q=block_q,
        block_kv=block_kv,
        computed_fraction=round(fraction, 4),
        # the largest tile share the dispatch runs sparse (GPU only: CPU always runs "xla")
        dispatch_limit=attention.dense_fallback_fraction(n, forced) if forced != "xla" else None,
        dispatch_runs=ran,
        index_ms=round(time_fn(index, q, k, warmup=1, repeats=repeats), 3),
        dispatch_ms=round(dispatch_ms, 3),
        dispatch_speedup=round(dense_ms / dispatch_ms, 2),
        kernel=forced,
        kernel_ms=round(kernel_ms, 3),
        kernel_speedup=round(dense_ms / kernel_ms, 2),
    )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=DEFAULT_PATTERNS,
        help="every head one pattern, in the search's candidate syntax (vs:V,S, avs:MASS, ...)",
    )
    parser.add_argument(
        "--inputs", nargs="+", choices=["normal", "structured"], default=["normal", "structured"]
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median)")
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "short_prompts")
    args = parser.parse_args(argv)
    for text in args.patterns:
        try:
            parse_candidate(text)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn" if on_gpu else None
        )
    )
    device, rows = device_name(), []
    for n in args.seq_lens:
        for kind in args.inputs:
            q, k, v = layer_inputs(kind, n, dtype)
            dense_ms = time_fn(dense, q, k, v, warmup=1, repeats=args.repeats)
            for pattern_text in args.patterns:
                row = dict(device=device, seq_len=n, inputs=kind, dense_ms=round(dense_ms, 3))
                row.update(measure(pattern_text, q, k, v, dense_ms, args.repeats))
                rows.append(row)
                print(
                    f"N={n} {kind:10s} {pattern_text:12s} tiles {row['computed_fraction']:.3f} "
                    f"dense {dense_ms:8.3f} ms  dispatch {row['dispatch_ms']:8.3f} ms "
                    f"({row['dispatch_runs']}, x{row['dispatch_speedup']})  "
                    f"{row['kernel']} {row['kernel_ms']:8.3f} ms  index {row['index_ms']} ms",
                    flush=True,
                )
    stem = args.out / f"short_prompts_{device.replace(':', '_').replace(' ', '_')}"
    lines = [
        f"One attention layer on {device}: batch 1, {HEADS} q / {KV_HEADS} kv heads, "
        f"d={HEAD_DIM}, {jnp.dtype(dtype).name}, causal. Median of {args.repeats} calls after a "
        "warm-up. dispatch = implementation=None (index estimate, then the sparse kernel if the "
        "index computes at most the limit's share of the tiles, else cuDNN); kernel = the sparse "
        "kernel forced; index = the estimate alone. Speedups vs dense in the same run.",
        "",
        "| N | inputs | pattern | tiles | limit | dispatch runs | dense ms | dispatch ms "
        "| vs dense | kernel | kernel ms | vs dense | index ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['seq_len']} | {r['inputs']} | {r['pattern']} | {r['computed_fraction']} "
        f"| {r['dispatch_limit'] or '-'} | {r['dispatch_runs']} | {r['dense_ms']} "
        f"| {r['dispatch_ms']} "
        f"| {r['dispatch_speedup']}x | {r['kernel']} | {r['kernel_ms']} | {r['kernel_speedup']}x "
        f"| {r['index_ms']} |"
        for r in rows
    ]
    write_table(stem, rows, lines)
    return rows


if __name__ == "__main__":
    main()
