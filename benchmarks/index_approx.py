"""Time the jitted index approximator alone: one layer, all heads, Llama-3-8B attention shapes.

    python -m benchmarks.index_approx                       # CPU-sized default
    python -m benchmarks.index_approx --seq-lens 32768 131072 524288   # on a GPU

Patterns: layer 0 of the shipped Llama-3-8B-262k config (mixed vertical-slash budgets), or one
uniform pattern with --pattern in the search's candidate syntax (vs:1000,6096 | block:100 |
ashape:1024,4096 | avs:0.95 | avsr:0.01 | adb:0.9 ...). Data: i.i.d. normal
q/k (the estimator's cost does not depend on the values; its output density does).
Writes index_approx_<device>.{md,json} to --out (default benchmarks/results/local/, git-ignored).
"""

from __future__ import annotations

import argparse
import pathlib

import jax

from benchmarks.device_guard import declare
from benchmarks.timing import DEFAULT_OUT, device_name, time_fn, write_table
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
        choices=["auto", "pallas", "xla"],
        default="auto",
        help="vertical-slash scores: auto = the Pallas kernel on GPU, XLA elsewhere",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "index_approx")
    args = parser.parse_args(argv)

    try:
        patterns, pattern_name = parse_pattern(args.pattern, args.heads)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    estimator = None if args.estimator == "auto" else args.estimator
    build = jax.jit(lambda q, k: build_sparse_index(q, k, patterns, estimator=estimator))
    device = device_name()
    rows = []
    for n in args.seq_lens:
        key_q, key_k = jax.random.split(jax.random.PRNGKey(n))
        q = jax.random.normal(key_q, (args.batch, n, args.heads, args.head_dim), args.dtype)
        k = jax.random.normal(key_k, (args.batch, n, args.kv_heads, args.head_dim), args.dtype)
        ms = time_fn(build, q, k, repeats=args.repeats)
        index = build(q, k)
        rows.append(
            dict(
                device=device,
                seq_len=n,
                batch=args.batch,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                dtype=args.dtype,
                patterns=pattern_name,
                estimator=args.estimator,
                ms=round(ms, 3),
                index_mib=round(index_footprint_bytes(index) / 2**20, 2),
                computed_fraction=round(float(index.computed_fraction()), 4),
            )
        )
        print(
            f"N={n:>8}  {ms:9.3f} ms  index {rows[-1]['index_mib']} MiB  "
            f"tiles/causal {rows[-1]['computed_fraction']}",
            flush=True,
        )
        del q, k, index

    stem = args.out / f"index_approx_{device.replace(':', '_').replace(' ', '_')}"
    if args.estimator != "auto":
        stem = stem.with_name(f"{stem.name}_{args.estimator}")
    lines = [
        f"Index approximation, one layer ({args.heads} q / {args.kv_heads} kv heads, d="
        f"{args.head_dim}, {args.dtype}, batch {args.batch}), patterns {pattern_name}, "
        f"estimator {args.estimator}, "
        f"i.i.d. normal q/k, device {device}. Median of {args.repeats} after warm-up.",
        "",
        "| N | ms / layer | index MiB | computed tiles / causal tiles |",
        "|---|---|---|---|",
    ] + [
        f"| {r['seq_len']} | {r['ms']} | {r['index_mib']} | {r['computed_fraction']} |"
        for r in rows
    ]
    write_table(stem, rows, lines)
    return rows


if __name__ == "__main__":
    main()
