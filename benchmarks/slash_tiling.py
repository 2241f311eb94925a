"""How many diagonal tiles the e2e model's slashes cost, aligned (today) vs unaligned windows.

    python -m benchmarks.slash_tiling --seq-len 131072      # ~6 min on a 2-core CPU
    python -m benchmarks.slash_tiling --tiny --seq-len 512  # smoke run

Estimates layer 0's Vertical-Slash slashes of the e2e benchmark's model and prompt
(`benchmarks.e2e_prefill`: Llama-3-8B shape, structured random weights, the shipped
Llama-3-8B-262k config; f32 here, bf16 there) and counts, per head, the 64x64 diagonal tiles
they need, as a fraction of the causal tiles:
- aligned: the index's set D of whole key blocks (`sparse_index.diag_mask_from_slashes`);
- unaligned: the same slash windows covered greedily by block_kv-wide tiles starting anywhere
  (how the PyTorch original places its ranges).
Slash o covers, for each query block, the keys at distances [o, o + block_q - 1] from the block's
last row; the causal window (o = 0) is always in. Columns are not counted (the same in both).
Prints one line per head kind and the layer mean, and writes the per-head table to
slash_tiling_<N>.{json,md} under --out (default benchmarks/results/local/, git-ignored). Measured
numbers: benchmarks/NOTES.md, "Where the e2e goals stand with the Triton kernel".
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_guard import declare
from benchmarks.e2e_prefill import LLAMA3_8B, TINY, attention_spec, build_model, layer0_qkv
from benchmarks.timing import DEFAULT_OUT, write_table
from minference_jax.attention import layer_plan
from minference_jax.index_approx import estimate_vertical_slash
from minference_jax.sparse_index import SENTINEL, diag_mask_from_slashes, num_blocks


def diagonal_tile_fractions(offsets: np.ndarray, seq_len: int, block: int) -> tuple[float, float]:
    """(aligned, unaligned) diagonal tiles / causal tiles for one head's slash offsets.

    block_q = block_kv = block. A tile is counted for query block i when any of its keys is >= 0.
    """
    n_q_blocks = num_blocks(seq_len, block)
    offsets = np.unique(np.append(offsets[offsets < min(seq_len, SENTINEL)], 0))
    last_rows = (np.arange(n_q_blocks) + 1) * block - 1  # distance budget of each query block
    causal = n_q_blocks * (n_q_blocks + 1) / 2

    mask = diag_mask_from_slashes(jnp.asarray(offsets, jnp.int32), n_q_blocks, block, 1)
    aligned_starts = np.flatnonzero(np.asarray(mask)) * block
    aligned = np.searchsorted(aligned_starts, last_rows, side="right").sum()

    covered = np.zeros(n_q_blocks * block + block, bool)
    for o in offsets:
        covered[o : o + block] = True
    selected = np.flatnonzero(covered[: n_q_blocks * block])
    starts, position = [], 0
    while position < len(selected):  # greedy: a tile at the nearest uncovered distance
        starts.append(selected[position])
        position = np.searchsorted(selected, selected[position] + block)
    unaligned = np.searchsorted(np.array(starts), last_rows, side="right").sum()
    return aligned / causal, unaligned / causal


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "slash_tiling")
    args = parser.parse_args(argv)
    base = TINY if args.tiny else LLAMA3_8B
    config = dataclasses.replace(base, num_layers=1, attention_bias=True)
    model = build_model(config, jnp.float32, structured=True)
    n = args.seq_len
    ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 1, config.vocab_size)
    q, k, _ = layer0_qkv(model, ids.at[0, 0].set(0))  # the e2e benchmark's prompt
    spec = attention_spec("config", dataclasses.replace(base, attention_bias=True))
    patterns = spec.layer(0, config.num_heads)
    plan, budgets = layer_plan(patterns, n, config.num_heads, "xla")
    if plan is None or not budgets["is_vs"].any():
        raise SystemExit("layer 0 has no Vertical-Slash head at this length")
    _, slashes = estimate_vertical_slash(
        q,
        k,
        np.stack([budgets["n_vertical"], budgets["n_slash"]], axis=-1),
        scale=config.head_dim**-0.5,
        max_budgets=(plan.max_vertical, plan.max_slash),
    )
    rows = []
    for h, pattern in enumerate(patterns):
        if not budgets["is_vs"][h]:
            continue
        aligned, unaligned = diagonal_tile_fractions(np.asarray(slashes[0, h]), n, args.block)
        rows.append(dict(head=h, pattern=repr(pattern), aligned=aligned, unaligned=unaligned))
    for pattern in sorted({r["pattern"] for r in rows}):
        group = [r for r in rows if r["pattern"] == pattern]
        print(
            f"{pattern} x{len(group)}: aligned {np.mean([r['aligned'] for r in group]):.4f}, "
            f"unaligned {np.mean([r['unaligned'] for r in group]):.4f} of the causal tiles"
        )
    aligned = np.mean([r["aligned"] for r in rows])
    unaligned = np.mean([r["unaligned"] for r in rows])
    summary = (
        f"N={n}, {len(rows)} VS heads: aligned {aligned:.4f}, unaligned {unaligned:.4f} "
        f"({100 * (1 - unaligned / aligned):.1f}% fewer diagonal tiles)"
    )
    print(summary)
    lines = [
        f"Diagonal tiles of layer 0's estimated slashes ({'tiny' if args.tiny else 'Llama-3-8B'} "
        f"e2e model, {args.block}x{args.block} tiles), as a fraction of the causal tiles. "
        + summary,
        "",
        "| head | pattern | aligned | unaligned |",
        "|---|---|---|---|",
    ] + [
        f"| {r['head']} | {r['pattern']} | {r['aligned']:.4f} | {r['unaligned']:.4f} |"
        for r in rows
    ]
    name = f"slash_tiling_{n}{'_tiny' if args.tiny else ''}"
    write_table(args.out / name, [dict(r, seq_len=n, block=args.block) for r in rows], lines)
    return rows


if __name__ == "__main__":
    main()
