"""Mosaic GPU sparse kernel on one GPU: probes, correctness, and a tile/stage sweep vs cuDNN.

    python -m benchmarks.mgpu_sweep --seq-lens 131072 --out /tmp/sweep

1. The smallest kernel that reads an int32 scalar from an index array in global memory and uses
   it as a TMA row offset (the two pieces the sparse kernel's producer needs).
2. The kernel against the f32 oracle (`sparse_attention_reference`) on fresh random inputs:
   every pattern, GQA, batch 2, N not a multiple of the tile, bf16 and f16, both PV forms.
3. Per length and case (benchmarks/kernels.py's cases): cuDNN dense, the Triton kernel (64x64),
   and each Mosaic variant (block_q x block_kv, stages); "rate" is the ideal time (computed-tile
   FLOPs at cuDNN's measured rate) over the kernel time; >= 0.9 was the target.
4. Block-sparse index selection: the radix selection vs `lax.top_k` on the same scores.
Writes mgpu_sweep.json and mgpu_sweep.log (everything printed) under --out (default
benchmarks/results/local/, git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.device_guard import declare
from benchmarks.kernels import HEAD_DIM, HEADS, KV_HEADS, causal_flops, fixed_vs_index
from benchmarks.synthetic import structured_qk
from benchmarks.timing import DEFAULT_OUT, device_name, report_written, time_fn
from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index, estimate_block_sparse
from minference_jax.reference import sparse_attention_reference, sparse_attention_xla
from pallas_kernels.sparse_flash import sparse_flash_attention
from pallas_kernels.sparse_flash_mgpu import sparse_flash_attention_mgpu

MIXED = (P.VerticalSlash(40, 120), P.AShape(70, 100), P.BlockSparse(3), P.Dense())


def probe_scalar_offset_tma(interpret=False) -> str:
    """out[j] = table rows [offsets[j], offsets[j] + 64): scalar GMEM read -> TMA offset."""
    table = jnp.arange(1024 * 64, dtype=jnp.float32).reshape(1024, 64).astype(jnp.bfloat16)
    offsets = jnp.array([5, 0, 900, 321], jnp.int32)

    def body(offsets_ref, table_ref, out_ref, smem, barrier):
        j = jax.lax.axis_index("j")
        start = offsets_ref[j]  # scalar load from global memory
        plgpu.copy_gmem_to_smem(table_ref.at[pl.ds(start, 64)], smem, barrier)
        plgpu.barrier_wait(barrier)
        plgpu.copy_smem_to_gmem(smem, out_ref.at[j])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((4, 64, 64), jnp.bfloat16),
        grid=(4,),
        grid_names=("j",),
        scratch_types=(plgpu.SMEM((64, 64), jnp.bfloat16), plgpu.Barrier()),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(offsets, table)
    want = np.stack([np.asarray(table)[o : o + 64] for o in np.asarray(offsets)])
    ok = np.array_equal(np.asarray(out), want)
    return f"scalar GMEM read -> TMA offset: {'OK' if ok else 'WRONG'}"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CHECKS = [
    # batch, n, heads, kv_heads, dim, patterns, block_q, block_kv
    (2, 1000, 32, 8, 128, MIXED * 8, 128, 64),
    (1, 4096 + 17, 8, 2, 64, (P.VerticalSlash(100, 300), P.AShape(128, 512)) * 4, 128, 64),
    (1, 1000, 4, 4, 128, (P.VerticalSlash(5000, 5000), P.BlockSparse(1000)) * 2, 64, 64),
    (2, 2000 + 5, 8, 2, 128, (*MIXED[:2], P.BlockSparse(3, 128), P.Dense()) * 2, 128, 128),
]


def correctness(log) -> bool:
    ok = True
    for dtype in (jnp.bfloat16, jnp.float16):
        for case in CHECKS:
            batch, n, heads, kv_heads, dim, patterns, block_q, block_kv = case
            keys = jax.random.split(jax.random.PRNGKey(n + dim + block_kv), 3)
            q = jax.random.normal(keys[0], (batch, n, heads, dim)).astype(dtype)
            k = jax.random.normal(keys[1], (batch, n, kv_heads, dim)).astype(dtype)
            v = jax.random.normal(keys[2], (batch, n, kv_heads, dim)).astype(dtype)
            index = build_sparse_index(q, k, patterns, block_q=block_q, block_kv=block_kv)
            ref = sparse_attention_reference(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), index
            )
            # The shared-memory P form (the interpreter's) once: it is what the CPU tests run.
            in_place_forms = (
                (True, False) if case is CHECKS[0] and dtype == jnp.bfloat16 else (True,)
            )
            for in_place in in_place_forms:
                try:
                    out = sparse_flash_attention_mgpu(q, k, v, index, in_place=in_place)
                    err = rel_err(out.astype(jnp.float32), ref)
                    nan = bool(np.isnan(np.asarray(out, np.float32)).any())
                    good = err < 1e-2 and not nan
                    msg = f"err {err:.2e} nan {nan}"
                except Exception as e:  # report and go on: one run must report every result
                    good, msg = False, f"FAILED {type(e).__name__}: {str(e)[-300:]}"
                    log(traceback.format_exc())
                ok &= good
                log(
                    f"check {jnp.dtype(dtype).name} B{batch} N{n} H{heads}/{kv_heads} d{dim} "
                    f"{block_q}x{block_kv} in_place={in_place}: {msg}"
                )
    return ok


def tiles_flops(index) -> float:
    tiles = float(np.asarray(index.num_tiles(), np.float64).sum())
    return tiles * 4 * index.block_q * index.block_kv * HEAD_DIM


def sweep(seq_lens, variants, cases, log):
    rows = []
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    )
    triton = jax.jit(sparse_flash_attention)
    for n in seq_lens:
        kq, kv = jax.random.split(jax.random.PRNGKey(n))
        q, k = structured_qk(kq, 1, n, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
        v = jax.random.normal(kv, (1, n, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        dense_ms = time_fn(dense, q, k, v, warmup=1, repeats=5)
        dense_rate = causal_flops(n) / (dense_ms * 1e-3)
        log(f"N={n} cuDNN {dense_ms:.2f} ms {dense_rate / 1e12:.0f} TFLOP/s")
        for case in cases:
            backends = [("triton", 64, 64, None)] + [("mosaic", *var) for var in variants]
            for name, block_q, block_kv, stages in backends:
                if case == "vs_fixed":
                    index = fixed_vs_index("vs_fixed", n, n, block_q, block_kv)
                else:
                    pattern = {
                        "block_sparse": P.BlockSparse(100, block_kv),
                        "a_shape": P.AShape(1024, 4096),
                    }[case]
                    index = jax.jit(
                        functools.partial(
                            build_sparse_index, patterns=pattern, block_q=block_q, block_kv=block_kv
                        )
                    )(q, k)
                if name == "triton":
                    fn = functools.partial(triton, index=index)
                else:
                    fn = jax.jit(functools.partial(sparse_flash_attention_mgpu, stages=stages))
                    fn = functools.partial(fn, index=index)
                try:
                    ms = time_fn(fn, q, k, v, warmup=1, repeats=5)
                except Exception as e:
                    log(f"  {case} {name} {block_q}x{block_kv} s{stages}: FAILED {e!s:.300}")
                    log(traceback.format_exc())
                    continue
                ideal = tiles_flops(index) / dense_rate * 1e3
                row = dict(
                    seq_len=n,
                    case=case,
                    backend=name,
                    block_q=block_q,
                    block_kv=block_kv,
                    stages=stages,
                    kernel_ms=round(ms, 3),
                    dense_ms=round(dense_ms, 3),
                    ideal_ms=round(ideal, 3),
                    rate=round(ideal / ms, 3),
                    tflops=round(tiles_flops(index) / ms * 1e-9, 1),
                )
                rows.append(row)
                log(
                    f"  {case:12s} {name:6s} {block_q}x{block_kv} s{stages}: {ms:8.2f} ms "
                    f"ideal {ideal:8.2f} rate {row['rate']:.2f} {row['tflops']} TFLOP/s"
                )
        del q, k, v
    return rows


def top_k_blocks(q, k, top_k, *, scale, block_q, block_kv):
    """The previous selection (lax.top_k over [B, Hq, n_q_blocks, n_kv_blocks]) for timing."""
    b, n, hq, d = q.shape
    hkv = k.shape[2]
    pq = q.astype(jnp.float32).reshape(b, n // block_q, block_q, hkv, hq // hkv, d).mean(2)
    pk = k.astype(jnp.float32).reshape(b, n // block_kv, block_kv, hkv, d).mean(2)
    chunk = max(1, min(n // block_q, (1 << 30) // (b * hq * (n // block_kv) * 4)))
    outs = []
    for first in range(0, n // block_q, chunk):
        s = jnp.einsum("bckgd,bmkd->bkgcm", pq[:, first : first + chunk], pk) * scale
        rows = first + jnp.arange(s.shape[3])
        allowed = jnp.arange(n // block_kv)[None, :] < (rows * (block_q // block_kv))[:, None]
        s = jnp.where(allowed, s, -jnp.inf).reshape(b, hq, -1, n // block_kv)
        outs.append(jax.lax.top_k(s, top_k)[1])
    return jnp.concatenate(outs, axis=2)


def index_timing(seq_lens, log):
    rows = []
    for n in seq_lens:
        kq, _ = jax.random.split(jax.random.PRNGKey(n))
        q, k = structured_qk(kq, 1, n, HEADS, KV_HEADS, HEAD_DIM, jnp.bfloat16)
        radix = jax.jit(
            lambda q, k: estimate_block_sparse(
                q, k, [100] * HEADS, scale=HEAD_DIM**-0.5, block_q=64, block_kv=64
            )
        )
        old = jax.jit(
            lambda q, k: top_k_blocks(q, k, 99, scale=HEAD_DIM**-0.5, block_q=64, block_kv=64)
        )
        for name, fn in (("radix", radix), ("lax.top_k", old)):
            try:
                ms = time_fn(fn, q, k, warmup=1, repeats=3)
                log(f"block-sparse index N={n} {name}: {ms:.1f} ms")
                rows.append(dict(seq_len=n, selection=name, ms=round(ms, 2)))
            except Exception as e:
                log(f"block-sparse index N={n} {name}: FAILED {e!s:.300}")
    return rows


def one_million_check(log, block_q=128, block_kv=64):
    """64-bit addressing: 1M tokens x 32 heads in one launch, spot-checked query blocks of the
    first kv group (f32 copies of every head would not fit beside the inputs)."""
    n = 1 << 20
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (1, n, HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, n, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, n, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    index = fixed_vs_index("vs_fixed", n, 0, block_q, block_kv)
    fn = jax.jit(sparse_flash_attention_mgpu)
    ms = time_fn(fn, q, k, v, index, warmup=1, repeats=3)
    log(f"1M x 32 heads vs_fixed {block_q}x{block_kv}: {ms:.1f} ms")
    out = fn(q, k, v, index)
    group = HEADS // KV_HEADS
    blocks = np.array([0, 1, 777, index.num_q_blocks // 2, index.num_q_blocks - 1])
    ref = sparse_attention_xla(
        q[:, :, :group].astype(jnp.float32),
        k[:, :, :1].astype(jnp.float32),
        v[:, :, :1].astype(jnp.float32),
        jax.tree.map(lambda a: a[:, :group], index),
        query_blocks=blocks,
    )
    rows = (blocks[:, None] * block_q + np.arange(block_q)).reshape(-1)
    got = out[:, rows, :group]
    nan = bool(np.isnan(np.asarray(out[:, rows], np.float32)).any())
    log(f"1M spot err {rel_err(got.astype(jnp.float32), ref):.2e}, nan {nan}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[131072])
    parser.add_argument("--index-lens", type=int, nargs="*", default=[131072, 524288])
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["128x64s2", "128x64s3", "128x128s2"],
        help="block_q x block_kv and stages of the Mosaic kernel",
    )
    parser.add_argument("--cases", nargs="+", default=["vs_fixed", "block_sparse", "a_shape"])
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--one-million", action="store_true", help="1M x 32 heads spot check")
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "mgpu_sweep")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "mgpu_sweep.log", "w")  # noqa: SIM115

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"{device_name()} jax {jax.__version__}")
    try:
        log(probe_scalar_offset_tma())
    except Exception:
        log("probe FAILED\n" + traceback.format_exc())
    if not args.skip_checks:
        log(f"all checks pass: {correctness(log)}")
    variants = []
    for text in args.variants:
        blocks, stages = text.split("s")
        block_q, block_kv = blocks.split("x")
        variants.append((int(block_q), int(block_kv), int(stages)))
    rows = sweep(args.seq_lens, variants, args.cases, log)
    index_rows = index_timing(args.index_lens, log)
    if args.one_million:
        try:
            one_million_check(log)
        except Exception:
            log("1M check FAILED\n" + traceback.format_exc())
    (args.out / "mgpu_sweep.json").write_text(
        json.dumps(dict(kernels=rows, index=index_rows), indent=1)
    )
    log("\n| N | case | backend | tile | stages | ms | ideal ms | rate | TFLOP/s |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        log(
            f"| {r['seq_len']} | {r['case']} | {r['backend']} | {r['block_q']}x{r['block_kv']} "
            f"| {r['stages']} | {r['kernel_ms']} | {r['ideal_ms']} | {r['rate']} | {r['tflops']} |"
        )
    log_file.close()
    report_written(args.out / "mgpu_sweep.json", args.out / "mgpu_sweep.log")


if __name__ == "__main__":
    main()
