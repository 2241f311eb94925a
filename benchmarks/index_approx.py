"""Time the jitted index approximator alone: one layer, all heads, Llama-3-8B attention shapes.

    python -m benchmarks.index_approx                       # CPU-sized default
    python -m benchmarks.index_approx --seq-lens 32768 131072 524288   # on a GPU

Patterns: layer 0 of the shipped Llama-3-8B-262k config (mixed vertical-slash budgets), or one
uniform pattern with --pattern in the search's candidate syntax (vs:1000,6096 | block:100 |
ashape:1024,4096 | avs:0.95 | avsr:0.01 | adb:0.9 | sbs:0.0003 ...). Data (--inputs): i.i.d.
normal q/k, or structured ones whose estimated indices are sparse like real heads' (the scores'
cost does not depend on the values; the selection's can, and the output density does). The index
is built for the blocks of the library's default dispatch on the device (128-row query blocks on
Hopper); on a GPU dense cuDNN attention of the same layer is timed in the same run, and the
index's share of it reported. Several --estimator values are timed on the same inputs.
Writes index_approx_<device>.{md,json} to --out (default benchmarks/results/local/, git-ignored).
"""

from __future__ import annotations

import argparse
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_guard import declare
from benchmarks.dump_qkv import load_qkv
from benchmarks.synthetic import structured_qk
from benchmarks.timing import DEFAULT_OUT, device_name, time_fn, write_table
from minference_jax.attention import default_blocks
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.index_approx import build_sparse_index, index_footprint_bytes
from minference_jax.search import parse_candidate

DEFAULT_CONFIG = "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern"


def parse_pattern(text: str | None, num_heads: int):
    if text is None:
        layer = load_pattern_config(shipped_configs()[DEFAULT_CONFIG])[0]
        if len(layer) != num_heads:
            raise SystemExit(
                f"the default config has {len(layer)} heads; pass --pattern for --heads {num_heads}"
            )
        return layer, f"{DEFAULT_CONFIG}[0]"
    pattern = parse_candidate(text)
    return (pattern,) * num_heads, repr(pattern)


ESTIMATORS = ("auto", "pallas", "xla")


def layer_inputs(kind: str, n: int, args):
    """(q, k, v) of one layer: i.i.d. normal, or `benchmarks.synthetic`'s structured q/k (sinks,
    local decay, heavy tokens), whose estimated indices are sparse as real heads' are."""
    key_q, key_k, key_v = jax.random.split(jax.random.PRNGKey(n), 3)
    if kind == "structured":
        q, k = structured_qk(
            key_q, args.batch, n, args.heads, args.kv_heads, args.head_dim, args.dtype
        )
    else:
        q = jax.random.normal(key_q, (args.batch, n, args.heads, args.head_dim), args.dtype)
        k = jax.random.normal(key_k, (args.batch, n, args.kv_heads, args.head_dim), args.dtype)
    v = jax.random.normal(key_v, (args.batch, n, args.kv_heads, args.head_dim), args.dtype)
    return q, k, v


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--pattern", default=None, help="one pattern for every head, e.g. vs:1000,6096 or avs:0.95"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        nargs="+",
        default=["auto"],
        help="scorers, each timed in the same run: auto = the Pallas kernels on GPU (vertical-"
        "slash and sampled-rows scores), XLA elsewhere; pallas; xla",
    )
    parser.add_argument(
        "--inputs",
        choices=["random", "structured"],
        default="random",
        help="q/k: i.i.d. normal, or structured like real heads (benchmarks.synthetic)",
    )
    parser.add_argument(
        "--dump",
        type=pathlib.Path,
        default=None,
        help="one layer's q, k, v from `benchmarks.dump_qkv` (.npz) instead of --inputs: its "
        "length, heads, head_dim and dtype replace --seq-lens, --heads, --kv-heads, --head-dim, "
        "--dtype",
    )
    parser.add_argument(
        "--block-q",
        type=int,
        default=None,
        help="query block of the index (default: the library's default dispatch on this device)",
    )
    parser.add_argument("--block-kv", type=int, default=None, help="key block (as --block-q)")
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "index_approx")
    args = parser.parse_args(argv)

    dumped = None
    if args.dump is not None:
        dumped = load_qkv(args.dump)
        q = dumped[0]
        args.batch, n, args.heads, args.head_dim = q.shape
        args.seq_lens, args.kv_heads, args.dtype = [n], dumped[1].shape[2], q.dtype.name
        args.inputs = f"dumped ({args.dump.name})"
    try:
        patterns, pattern_name = parse_pattern(args.pattern, args.heads)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    dtype = jnp.dtype(args.dtype)
    on_gpu = jax.default_backend() == "gpu"
    # Unless given, the blocks the library's default dispatch builds its index for on this device.
    default_q, default_kv = default_blocks(patterns, None, dtype, args.head_dim)
    block_q, block_kv = args.block_q or default_q, args.block_kv or default_kv
    builds = {
        name: jax.jit(
            functools.partial(
                build_sparse_index,
                patterns=patterns,
                block_q=block_q,
                block_kv=block_kv,
                estimator=None if name == "auto" else name,
            )
        )
        for name in args.estimator
    }
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    )
    device = device_name()
    rows = []
    for n in args.seq_lens:
        q, k, v = dumped if dumped is not None else layer_inputs(args.inputs, n, args)
        # Dense cuDNN attention of the same layer, on a GPU: what the index's share is of.
        dense_ms = time_fn(dense, q, k, v, repeats=args.repeats) if on_gpu else None
        first_tiles = None
        for name, build in builds.items():
            ms = time_fn(build, q, k, repeats=args.repeats)
            index = build(q, k)
            tiles = np.asarray(index.num_tiles())
            first_tiles = tiles if first_tiles is None else first_tiles
            rows.append(
                dict(
                    device=device,
                    seq_len=n,
                    batch=args.batch,
                    heads=args.heads,
                    kv_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    dtype=args.dtype,
                    inputs=args.inputs,
                    patterns=pattern_name,
                    blocks=f"{block_q}x{block_kv}",
                    estimator=name,
                    ms=round(ms, 3),
                    dense_ms=None if dense_ms is None else round(dense_ms, 3),
                    share_of_dense=None if dense_ms is None else round(ms / dense_ms, 4),
                    # Query blocks whose tile count equals the first estimator's.
                    same_tiles=round(float(np.mean(tiles == first_tiles)), 4),
                    index_mib=round(index_footprint_bytes(index) / 2**20, 2),
                    computed_fraction=round(float(index.computed_fraction()), 4),
                )
            )
            r = rows[-1]
            dense_text = "" if dense_ms is None else f"  {r['share_of_dense']} of dense cuDNN"
            print(
                f"N={n:>8}  {name:6}  {ms:9.3f} ms{dense_text}  index {r['index_mib']} MiB  "
                f"tiles/causal {r['computed_fraction']}  same tiles {r['same_tiles']}",
                flush=True,
            )
            del index
        del q, k, v

    stem = args.out / f"index_approx_{device.replace(':', '_').replace(' ', '_')}"
    if args.estimator != ["auto"]:
        stem = stem.with_name(f"{stem.name}_{'_'.join(args.estimator)}")
    lines = [
        f"Index approximation, one layer ({args.heads} q / {args.kv_heads} kv heads, d="
        f"{args.head_dim}, {args.dtype}, batch {args.batch}), patterns {pattern_name}, "
        f"{block_q}x{block_kv} blocks, {args.inputs} "
        f"q/k, device {device}. Median of {args.repeats} after warm-up; dense = cuDNN causal "
        "attention of the same layer (GPU only); same tiles = share of query blocks whose "
        "computed tiles equal the first estimator's.",
        "",
        "| N | estimator | ms / layer | dense cuDNN ms | index / dense | index MiB | computed "
        "tiles / causal tiles | same tiles |",
        "|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['seq_len']} | {r['estimator']} | {r['ms']} | {r['dense_ms'] or '-'} | "
        f"{r['share_of_dense'] or '-'} | {r['index_mib']} | {r['computed_fraction']} | "
        f"{r['same_tiles']} |"
        for r in rows
    ]
    write_table(stem, rows, lines)
    return rows


if __name__ == "__main__":
    main()
