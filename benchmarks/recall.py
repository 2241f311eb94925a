"""Recall vs computed tiles: fixed budgets against budgets that follow the attention.

    python -m benchmarks.recall                                  # CPU, 8K, synthetic q/k
    python -m benchmarks.recall --seq-lens 32768 131072 --inputs synthetic e2e   # GPU

For each input and length, every pattern below estimates its index on the same q/k (batch 1,
all heads one pattern), and two numbers are kept per index:
- computed tiles: `SparseIndex.computed_fraction()` (key tiles computed / dense causal tiles);
- recall: the share of the dense softmax mass the index keeps (`minference_jax.recall`), exact
  per row, over `--rows` query rows spread evenly over the whole sequence; reported as the mean
  over rows and heads, its 10th percentile, and the worst head's mean.
Patterns: VerticalSlash at several budgets (the first, VerticalSlash(1000, 6096), is the
reference), AShape, BlockSparse top-k, and each adaptive mode (AntiDiagonalBlockSparse,
AdaptiveVerticalSlash, with and without the query-aware switch; cumulative and relative rules)
at several thresholds. Inputs: `synthetic` (benchmarks.synthetic.structured_qk: sinks, local
decay, heavy tokens; 32 q / 8 kv heads, d 128) and `e2e` (layer 0 q/k of the e2e benchmark's
structured random Llama-3-8B shape, benchmarks.e2e_prefill). Writes recall_<device>.{json,md,png}
under --out and prints where; the table ends with, for each VerticalSlash budget, the adaptive
point with the fewest tiles at a mean recall at least the budget's, as a fraction of the
budget's tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.synthetic import structured_qk
from benchmarks.timing import device_name
from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index
from minference_jax.recall import row_recall, sample_rows

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
REFERENCE = P.VerticalSlash(1000, 6096)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
# Max-relative thresholds: block scores are flatter than column / diagonal scores.
RELATIVE_BLOCKS = (0.6, 0.45, 0.3, 0.2, 0.1)
RELATIVE_VS = (0.3, 0.1, 0.03, 0.01, 0.003)
# Jensen-Shannon distance below which a head switches to blocks: 1.0 always switches, so the
# family shows the query-aware block pattern itself (on the synthetic inputs the distances are
# 0.5-0.6 and FlexPrefill's 0.1 would never switch).
QUERY_AWARE = 1.0


def cases() -> list[tuple[str, float | str, P.Pattern]]:
    """(family, parameter, pattern) for every index the benchmark measures."""
    out = [
        ("VerticalSlash", f"{v},{s}", P.VerticalSlash(v, s))
        for v, s in ((1000, 6096), (500, 3000), (250, 1500), (100, 800), (30, 300))
    ]
    out += [("AShape", f"{i},{w}", P.AShape(i, w)) for i, w in ((128, 4096), (64, 1024), (64, 256))]
    out += [("BlockSparse", str(t), P.BlockSparse(t)) for t in (100, 40, 16, 6)]
    for rule, block_values, vs_values in (
        ("cumulative", THRESHOLDS, THRESHOLDS),
        ("relative", RELATIVE_BLOCKS, RELATIVE_VS),
    ):
        out += [
            (f"AntiDiagonal {rule}", t, P.AntiDiagonalBlockSparse(t, rule=rule))
            for t in block_values
        ]
        out += [(f"AdaptiveVS {rule}", t, P.AdaptiveVerticalSlash(t, rule=rule)) for t in vs_values]
    out += [
        ("AdaptiveVS query-aware blocks", t, P.AdaptiveVerticalSlash(t, query_aware=QUERY_AWARE))
        for t in THRESHOLDS
    ]
    return out


def inputs(name: str, n: int, dtype):
    """(q, k) of one input kind at length n."""
    if name == "synthetic":
        return structured_qk(jax.random.PRNGKey(n), 1, n, HEADS, KV_HEADS, HEAD_DIM, dtype)
    from benchmarks import e2e_prefill

    config = dataclasses.replace(e2e_prefill.LLAMA3_8B, num_layers=1, attention_bias=True)
    model = e2e_prefill.build_model(config, dtype, structured=True)
    ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 1, config.vocab_size)
    q, k, _ = e2e_prefill.layer0_qkv(model, ids.at[0, 0].set(0))  # the sink token first
    return q, k


def measure(q, k, pattern, rows) -> dict:
    index = build_sparse_index(q, k, pattern)
    recall = np.asarray(row_recall(q, k, index, rows), np.float64)  # [1, H, R]
    return dict(
        computed_fraction=round(float(index.computed_fraction()), 4),
        recall_mean=round(float(recall.mean()), 4),
        recall_p10=round(float(np.percentile(recall, 10)), 4),
        recall_worst_head=round(float(recall.mean(axis=(0, 2)).min()), 4),
    )


def tile_savings(rows: list[dict]) -> list[str]:
    """Per (input, N) and VerticalSlash budget: the adaptive point with the fewest tiles at a
    mean recall at least the budget's, as a fraction of the budget's tiles."""
    lines = []
    for key in sorted({(r["input"], r["seq_len"]) for r in rows}):
        group = [r for r in rows if (r["input"], r["seq_len"]) == key]
        lines.append(f"- {key[0]}, N={key[1]}:")
        for ref in (r for r in group if r["family"] == "VerticalSlash"):
            reaching = [
                r for r in group if r["adaptive"] and r["recall_mean"] >= ref["recall_mean"]
            ]
            head = (
                f"  - VerticalSlash({ref['param']}) recall {ref['recall_mean']}, tiles "
                f"{ref['computed_fraction']}: "
            )
            if not reaching:
                lines.append(head + "no adaptive point reaches its recall")
                continue
            best = min(reaching, key=lambda r: r["computed_fraction"])
            lines.append(
                head + f"{best['family']} {best['param']} needs "
                f"{best['computed_fraction'] / ref['computed_fraction']:.2f} of its tiles "
                f"(recall {best['recall_mean']}, tiles {best['computed_fraction']})"
            )
    return lines


def write_report(rows: list[dict], stem: pathlib.Path, num_rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        f"Recall vs computed tiles on {rows[0]['device']}: batch 1, {HEADS} q / {KV_HEADS} kv "
        f"heads, d {HEAD_DIM}, {rows[0]['dtype']}, 64x64 tiles; recall = share of the dense "
        f"softmax mass kept, exact, on {num_rows} query rows spread over the sequence "
        "(mean over rows and heads; p10 over rows x heads; worst head's mean).",
        "",
        "| input | N | family | parameter | tiles computed | recall mean | recall p10 "
        "| worst head |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['input']} | {r['seq_len']} | {r['family']} | {r['param']} | "
        f"{r['computed_fraction']} | {r['recall_mean']} | {r['recall_p10']} | "
        f"{r['recall_worst_head']} |"
        for r in rows
    ]
    lines += ["", "Fewest adaptive tiles at each VerticalSlash budget's recall (measured points):"]
    lines += tile_savings(rows)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    keys = sorted({(r["input"], r["seq_len"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        group = [r for r in rows if (r["input"], r["seq_len"]) == key]
        for i, family in enumerate(dict.fromkeys(r["family"] for r in group)):
            pts = sorted(
                (r["computed_fraction"], r["recall_mean"]) for r in group if r["family"] == family
            )
            style = "--" if not any(r["adaptive"] for r in group if r["family"] == family) else "-"
            ax.plot(*zip(*pts, strict=True), style, marker="o", color=f"C{i}", label=family)
        ref = next(r for r in group if r["pattern"] == repr(REFERENCE))
        ax.plot(ref["computed_fraction"], ref["recall_mean"], "k*", ms=14, label=str(REFERENCE))
        ax.set_xscale("log")
        ax.set_xlabel("computed tiles / dense causal tiles")
        ax.set_ylabel("recall (dense softmax mass kept)")
        ax.set_title(f"{key[0]}, N={key[1]}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    parser.add_argument("--inputs", nargs="+", default=["synthetic"], choices=["synthetic", "e2e"])
    parser.add_argument("--rows", type=int, default=64, help="sampled query rows per input")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on GPU, float32 elsewhere",
    )
    parser.add_argument(
        "--families", nargs="+", default=None, help="only these families (default: all)"
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent / "results" / "local",
        help="output folder (default benchmarks/results/local/, not tracked)",
    )
    args = parser.parse_args(argv)
    dtype_name = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    dtype = getattr(jnp, dtype_name)
    device = device_name()
    selected = [c for c in cases() if args.families is None or c[0] in args.families]
    if args.families is not None and REFERENCE not in {c[2] for c in selected}:
        selected.insert(0, ("VerticalSlash", "1000,6096", REFERENCE))
    rows = []
    for name in args.inputs:
        for n in args.seq_lens:
            q, k = inputs(name, n, dtype)
            sampled = sample_rows(n, args.rows)
            for family, param, pattern in selected:
                start = time.perf_counter()
                row = dict(
                    device=device,
                    input=name,
                    seq_len=n,
                    dtype=dtype_name,
                    family=family,
                    param=param,
                    pattern=repr(pattern),
                    adaptive=isinstance(pattern, P.ADAPTIVE_TYPES),
                    **measure(q, k, pattern, sampled),
                )
                rows.append(row)
                print(
                    f"{name:9s} N={n:<7d} {family:24s} {param!s:10s} tiles "
                    f"{row['computed_fraction']:.4f}  recall {row['recall_mean']:.4f} "
                    f"(p10 {row['recall_p10']:.4f}, worst head {row['recall_worst_head']:.4f})  "
                    f"{time.perf_counter() - start:.1f} s",
                    flush=True,
                )
            del q, k
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recall_{device.replace(':', '_').replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write_report(rows, stem, args.rows)
    print("\n".join(tile_savings(rows)))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return rows


if __name__ == "__main__":
    main()
