"""Sparse attention kernels vs dense cuDNN, same run, same shapes.

    python -m benchmarks.kernels --seq-lens 8192 32768 131072 524288 1048576
    python -m benchmarks.kernels --backend mosaic --block-q 128 --block-kv 128 --seq-lens 131072

Shapes: batch 1, 32 q / 8 kv heads, head_dim 128, bf16, causal. Cases (budgets as in the
PyTorch original's published measurements):
  vs_fixed     Vertical-Slash, fixed structured index: 30 sink + 970 random verticals per head,
               slash offsets 0..6095 (a 6096-wide local band).
  vs_spread    Vertical-Slash, fixed index whose slashes spread over many block diagonals, as
               estimated indices of real heads do: the same verticals, offsets 0..1023 plus 317
               runs of 16 consecutive offsets at random places (6096 slashes in all).
  vs_spread_shared  the same with head 0's offsets for every head (their K/V tiles shared).
  full         every causal tile as one index (slashes 0..N-1): the kernel's own dense rate.
  vs_estimated Vertical-Slash(1000, 6096) estimated from structured synthetic q/k
               (benchmarks/synthetic.py: sinks, local decay, heavy tokens).
  block_sparse BlockSparse(top_k=100) estimated from the same synthetic q/k.
  a_shape      A-shape, 1024 sink tokens + 4096 local window.
  Adaptive cases, NAME or NAME:THRESHOLD (default 0.9 unless said), estimated from the same
  synthetic q/k:
  anti_diagonal[_relative]  AntiDiagonalBlockSparse (stride 8; cumulative / max-relative rule)
  adaptive_vs[_relative]    AdaptiveVerticalSlash (cumulative / max-relative rule)
  adaptive_vs_query_aware   AdaptiveVerticalSlash with the query-aware switch (JS distance 0.3)
  sampled_blocks            SampledBlockSparse (8 exact rows per query block; absolute rule,
                            default threshold 0.005)
For each: kernel time (index given; index time is benchmarks/index_approx.py), computed tiles,
achieved TFLOP/s on computed tiles, the "ideal" time = computed-tile FLOPs at the dense
kernel's measured rate, and the rate = ideal / kernel time (1.0: the sparse kernel computes its
tiles as fast as cuDNN computes dense ones; a regression shows here first). Dense cuDNN
beyond --dense-max tokens is extrapolated as t * (N/N0)^2
from the longest measured length, and marked so. A spot check of the kernel against the XLA
sparse path (f32 math) on a few query blocks runs at every length. Estimated cases also report
the index estimation time, the speedup with it included, and the error vs dense attention on the
same query blocks (the accuracy to match when comparing patterns).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_guard import declare
from benchmarks.synthetic import structured_qk
from benchmarks.timing import DEFAULT_OUT, device_name, time_fn, write_table
from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index
from minference_jax.reference import sparse_attention_xla
from minference_jax.sparse_index import SENTINEL, vertical_slash_index
from pallas_kernels.sparse_flash import sparse_flash_attention
from pallas_kernels.sparse_flash_mgpu import Q_INNERMOST as MGPU_Q_INNERMOST
from pallas_kernels.sparse_flash_mgpu import sparse_flash_attention_mgpu

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LAUNCH_ORDERS = ("q-innermost", "heads-innermost")
ADAPTIVE_CASES = {
    "anti_diagonal": lambda t, bk: P.AntiDiagonalBlockSparse(t, block_size=bk),
    "anti_diagonal_relative": lambda t, bk: P.AntiDiagonalBlockSparse(
        t, rule="relative", block_size=bk
    ),
    "adaptive_vs": lambda t, bk: P.AdaptiveVerticalSlash(t, block_size=bk),
    "adaptive_vs_relative": lambda t, bk: P.AdaptiveVerticalSlash(
        t, rule="relative", block_size=bk
    ),
    "adaptive_vs_query_aware": lambda t, bk: P.AdaptiveVerticalSlash(
        t, query_aware=0.3, block_size=bk
    ),
    "sampled_blocks": lambda t, bk: P.SampledBlockSparse(t, block_size=bk),
}


def case_pattern(case: str, block_kv: int) -> P.Pattern:
    """The pattern of an estimated case: vs_estimated, block_sparse, a_shape or an adaptive
    NAME[:THRESHOLD]."""
    name, _, threshold = case.partition(":")
    if name in ADAPTIVE_CASES:
        default = 0.005 if name == "sampled_blocks" else 0.9  # an absolute share, not a mass
        return ADAPTIVE_CASES[name](float(threshold or default), block_kv)
    return {
        "vs_estimated": P.VerticalSlash(1000, 6096),
        "block_sparse": P.BlockSparse(100, block_kv),
        "a_shape": P.AShape(1024, 4096),
    }[case]


def causal_flops(n: int) -> float:
    return 4.0 * n * n * HEADS * HEAD_DIM / 2


def tile_flops(index) -> float:
    return (
        float(np.asarray(index.num_tiles(), np.float64).sum())
        * 4
        * index.block_q
        * index.block_kv
        * HEAD_DIM
    )


FIXED_CASES = ("vs_fixed", "vs_spread", "vs_spread_shared", "full")
SPREAD_BAND, SPREAD_RUNS, SPREAD_RUN = 1024, 317, 16  # 1024 + 317 x 16 = 6096 offsets


def spread_slashes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Offsets 0..1023 and 317 runs of 16 at random starts: [HEADS, <= 6096], SENTINEL-padded."""
    rows = []
    for _ in range(HEADS):
        starts = rng.integers(SPREAD_BAND, max(n - SPREAD_RUN, SPREAD_BAND + 1), SPREAD_RUNS)
        runs = (starts[:, None] + np.arange(SPREAD_RUN)).reshape(-1)
        rows.append(np.unique(np.concatenate([np.arange(SPREAD_BAND), runs])))
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r)), constant_values=SENTINEL) for r in rows])


def fixed_vs_index(case: str, n: int, seed: int, block_q: int, block_kv: int):
    """The index of a fixed case (FIXED_CASES): 30 sinks + 970 random verticals per head (none
    for `full`) and the case's slash offsets."""
    rng = np.random.default_rng(seed)
    if case == "full":
        verticals = np.zeros((1, HEADS, 0), np.int64)
    else:
        n_random = min(970, max(n - 30, 0))
        randoms = [rng.choice(np.arange(30, n), n_random, replace=False) for _ in range(HEADS)]
        sinks = np.broadcast_to(np.arange(min(30, n)), (HEADS, min(30, n)))
        verticals = np.concatenate([sinks, np.stack(randoms)], axis=-1)[None]
    if case == "vs_spread":
        slashes = spread_slashes(n, rng)[None]
    elif case == "vs_spread_shared":  # head 0's offsets for every head: K/V tiles shared in L2
        first = spread_slashes(n, rng)[:1]
        slashes = np.broadcast_to(first, (HEADS, first.shape[1]))[None]
    else:
        width = n if case == "full" else min(6096, n)
        slashes = np.broadcast_to(np.arange(width), (1, HEADS, width))
    return vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=block_q,
        block_kv=block_kv,
    )


def spot_check(q, k, v, index, out) -> float:
    """Rel. error of `out` on 3 query blocks of the first kv group's heads (f32 XLA path).

    One kv group only: f32 copies of all heads at 1M tokens would not fit next to the inputs."""
    group = HEADS // KV_HEADS
    blocks = np.unique([0, index.num_q_blocks // 3, index.num_q_blocks - 1])
    ref = sparse_attention_xla(
        q[:, :, :group].astype(jnp.float32),
        k[:, :, :1].astype(jnp.float32),
        v[:, :, :1].astype(jnp.float32),
        jax.tree.map(lambda a: a[:, :group], index),
        query_blocks=blocks,
    )
    rows = (blocks[:, None] * index.block_q + np.arange(index.block_q)).reshape(-1)
    keep = rows < q.shape[1]
    got = np.asarray(out[:, rows[keep], :group], np.float64)
    want = np.asarray(ref[:, keep], np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def dense_error(q, k, v, index, out) -> float:
    """Rel. error of `out` vs dense causal attention (f32) on the spot-check query blocks of the
    first kv group's heads: what the index's sparsity costs in accuracy."""
    group = HEADS // KV_HEADS
    blocks = np.unique([0, index.num_q_blocks // 3, index.num_q_blocks - 1])
    rows = (blocks[:, None] * index.block_q + np.arange(index.block_q)).reshape(-1)
    rows = rows[rows < q.shape[1]]
    q_rows = q[:, rows, :group].astype(jnp.float32)
    logits = (
        jnp.einsum("brhd,bnd->bhrn", q_rows, k[:, :, 0].astype(jnp.float32), precision="highest")
        * HEAD_DIM**-0.5
    )
    causal = jnp.arange(q.shape[1])[None, :] <= jnp.asarray(rows)[:, None]
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    want = jnp.einsum("bhrn,bnd->brhd", probs, v[:, :, 0].astype(jnp.float32), precision="highest")
    got = np.asarray(out[:, rows, :group], np.float64)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--dense-max", type=int, default=524288)
    parser.add_argument("--block-q", type=int, default=64)
    parser.add_argument("--block-kv", type=int, default=64)
    parser.add_argument("--num-warps", type=int, default=None)
    parser.add_argument("--num-stages", type=int, default=None)
    parser.add_argument(
        "--backend",
        choices=["pallas", "pallas-pregathered", "mosaic"],
        default="pallas",
        help="sparse kernel: pallas (Triton, any GPU), pallas-pregathered (the same with each "
        "head's columns gathered into contiguous K/V first), or mosaic (Mosaic GPU, sm_90+, "
        "bf16; --num-stages is its ring depth, default 2; try --block-q 128 --block-kv 128)",
    )
    parser.add_argument(
        "--cases", nargs="+", default=["vs_fixed", "vs_estimated", "block_sparse", "a_shape"]
    )
    parser.add_argument(
        "--launch",
        nargs="+",
        choices=LAUNCH_ORDERS,
        default=None,
        help="mosaic: grid launch orders to time, each case under each (default: the kernel's "
        "own). q-innermost launches a head's query blocks one after another, heads-innermost "
        "the heads of a query block; they differ in which K/V tiles are shared through L2",
    )
    parser.add_argument(
        "--estimator",
        choices=["pallas", "xla"],
        default=None,
        help="index estimation for the estimated cases (default: build_sparse_index's)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke run (interpret mode)")
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "kernels")
    args = parser.parse_args(argv)
    device = device_name()
    if args.backend == "mosaic":
        launches = args.launch or [LAUNCH_ORDERS[0] if MGPU_Q_INNERMOST else LAUNCH_ORDERS[1]]
        kernels = {
            launch: jax.jit(
                functools.partial(
                    sparse_flash_attention_mgpu,
                    stages=args.num_stages or 2,
                    interpret=args.interpret,
                    q_innermost=launch == "q-innermost",
                )
            )
            for launch in launches
        }
    else:
        if args.launch:
            parser.error("--launch applies to --backend mosaic only")
        kernels = {
            "-": jax.jit(
                lambda q, k, v, index: sparse_flash_attention(
                    q,
                    k,
                    v,
                    index,
                    num_warps=args.num_warps,
                    num_stages=args.num_stages,
                    interpret=args.interpret,
                    pregather_columns=args.backend == "pallas-pregathered",
                )
            )
        }
    dense_impl = None if args.interpret else "cudnn"
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=dense_impl
        )
    )
    build = {
        case: jax.jit(
            functools.partial(
                build_sparse_index,
                patterns=case_pattern(case, args.block_kv),
                block_q=args.block_q,
                block_kv=args.block_kv,
                estimator=args.estimator,
            )
        )
        for case in args.cases
        if case not in FIXED_CASES
    }
    rows, dense_ref = [], None
    for n in args.seq_lens:
        key = jax.random.PRNGKey(n)
        kq, kk, kv = jax.random.split(key, 3)
        q, k = structured_qk(kq, 1, n, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
        v = jax.random.normal(kv, (1, n, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        if n <= args.dense_max or dense_ref is None:  # nothing shorter to extrapolate from
            dense_ms = time_fn(dense, q, k, v, warmup=1, repeats=args.repeats if n <= 131072 else 2)
            dense_ref, dense_note = (n, dense_ms), "measured"
        else:
            dense_ms = dense_ref[1] * (n / dense_ref[0]) ** 2
            dense_note = f"extrapolated from {dense_ref[0]}"
        dense_rate = causal_flops(n) / (dense_ms * 1e-3)
        print(
            f"N={n}: dense cuDNN {dense_ms:.2f} ms ({dense_note}), {dense_rate / 1e12:.0f} TFLOP/s",
            flush=True,
        )
        for case in args.cases:
            index = (
                fixed_vs_index(case, n, n, args.block_q, args.block_kv)
                if case in FIXED_CASES
                else build[case](q, k)
            )
            warmup = 0 if args.interpret else 1
            index_ms = None
            if case in build:
                index_ms = time_fn(build[case], q, k, warmup=warmup, repeats=args.repeats)
            for launch, kernel in kernels.items():
                if args.interpret:  # a smoke run: one interpreted call, whose time means nothing
                    start = time.perf_counter()
                    out = jax.block_until_ready(kernel(q, k, v, index))
                    ms = (time.perf_counter() - start) * 1e3
                else:
                    ms = time_fn(kernel, q, k, v, index, warmup=warmup, repeats=args.repeats)
                    out = kernel(q, k, v, index)
                err = spot_check(q, k, v, index, out)
                err_dense = dense_error(q, k, v, index, out)
                flops = tile_flops(index)
                row = dict(
                    device=device,
                    seq_len=n,
                    case=case,
                    backend=args.backend,
                    dtype="bfloat16",
                    heads=HEADS,
                    kv_heads=KV_HEADS,
                    head_dim=HEAD_DIM,
                    block_q=args.block_q,
                    block_kv=args.block_kv,
                    num_warps=args.num_warps,
                    num_stages=args.num_stages,
                    launch=launch,
                    estimator=args.estimator,
                    kernel_ms=round(ms, 3),
                    dense_ms=round(dense_ms, 3),
                    dense=dense_note,
                    speedup=round(dense_ms / ms, 2),
                    computed_fraction=round(flops / causal_flops(n), 4),
                    ideal_ms=round(flops / dense_rate * 1e3, 3),
                    tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                    rate=float(f"{flops / dense_rate * 1e3 / ms:.4g}"),  # tiny in interpret runs
                    spot_rel_err=float(f"{err:.2e}"),
                    index_ms=None if index_ms is None else round(index_ms, 3),
                    speedup_with_index=None
                    if index_ms is None
                    else round(dense_ms / (ms + index_ms), 2),
                    err_vs_dense=float(f"{err_dense:.2e}"),
                )
                rows.append(row)
                print(
                    f"  {case:13s} {args.backend:6s} {launch:15s} {ms:9.2f} ms  "
                    f"x{row['speedup']:<6} "
                    f"ideal {row['ideal_ms']:8.2f} ms  rate {row['rate']:.3f}  "
                    f"{row['tflops']:6.1f} TFLOP/s  "
                    f"computed {row['computed_fraction']:.4f}  err {err:.1e}  "
                    f"index {row['index_ms']} ms  x{row['speedup_with_index']} with index  "
                    f"err vs dense {err_dense:.1e}",
                    flush=True,
                )
                del out
            del index
        del q, k, v

    stem = args.out / (
        f"kernels_{device.replace(':', '_').replace(' ', '_')}"
        f"{'' if args.backend == 'pallas' else '_' + args.backend}"
        f"_{args.block_q}x{args.block_kv}_w{args.num_warps}_s{args.num_stages}"
        f"{'_' + '_'.join(args.launch) if args.launch else ''}"
        f"{'_est-' + args.estimator if args.estimator else ''}"
    )
    lines = (
        [
            f"Sparse kernels vs dense cuDNN on {device}: batch 1, {HEADS} q / {KV_HEADS} kv heads, "
            f"d={HEAD_DIM}, bf16, causal, tiles {args.block_q}x{args.block_kv}, "
            f"num_warps {args.num_warps or 'default'}, num_stages {args.num_stages or 'default'}, "
            f"median of {args.repeats}.",
            "",
            "| N | case | backend | launch | kernel ms | dense ms | speedup | ideal ms | rate "
            "| TFLOP/s (computed tiles) | computed / causal | spot rel err | index ms "
            "| speedup with index | err vs dense |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        + [
            f"| {r['seq_len']} | {r['case']} | {r['backend']} | {r['launch']} | {r['kernel_ms']} "
            f"| {r['dense_ms']}"
            f"{'*' if r['dense'] != 'measured' else ''} | {r['speedup']} | {r['ideal_ms']} | "
            f"{r['rate']} | "
            f"{r['tflops']} | {r['computed_fraction']} | {r['spot_rel_err']} | "
            f"{'-' if r['index_ms'] is None else r['index_ms']} | "
            f"{'-' if r['speedup_with_index'] is None else r['speedup_with_index']} | "
            f"{r['err_vs_dense']} |"
            for r in rows
        ]
        + ["", "\\* dense time extrapolated as t(N0) * (N/N0)^2 from the longest measured length."]
    )
    write_table(stem, rows, lines)


if __name__ == "__main__":
    main()
