"""Recall vs computed tiles: fixed budgets against budgets that follow the attention.

    python -m benchmarks.recall                                  # CPU, 8K, synthetic q/k
    python -m benchmarks.recall --seq-lens 32768 131072 --inputs synthetic e2e   # GPU
    python -m benchmarks.recall --seq-lens 16384 --inputs pytext   # trained heads, CPU ~10 min
    python -m benchmarks.recall --seq-lens 16384 --inputs dump --dumps DIR \\
        --dump-config qwen2_5_coder_1_5b_instruct_searched        # a real model's heads

For each input and length, every pattern below estimates its index on the same q/k (batch 1,
all heads one pattern, or the config's per-head patterns), and two numbers are kept per index:
- computed tiles: `SparseIndex.computed_fraction()` (key tiles computed / dense causal tiles);
- recall: the share of the dense softmax mass the index keeps (`minference_jax.recall`), exact
  per row, over every row of `--query-blocks` 64-row query blocks spread evenly over the whole
  sequence; reported as the mean over rows and heads, its 10th percentile, and the worst head's
  mean.
Patterns: VerticalSlash at several budgets (the first, VerticalSlash(1000, 6096), is the
reference), the per-head config of the input ("Config": layer 0 of the shipped
Llama-3-8B-262k config; for pytext the shipped searched config), AShape, BlockSparse top-k,
and each adaptive mode (AntiDiagonalBlockSparse, AdaptiveVerticalSlash, with and without the
query-aware switch; cumulative, relative and absolute rules; SampledBlockSparse) at several
thresholds. Two oracle curves bound them all: knowing the exact dense attention of the measured
query blocks, the most mass a block-sparse index ("Oracle blocks") or any index ("Oracle keys":
the heaviest keys, gathered 64 per tile) keeps per tile budget.
Inputs: `synthetic` (benchmarks.synthetic.structured_qk: sinks, local decay, heavy tokens; 32 q
/ 8 kv heads, d 128), `e2e` (layer 0 q/k of the e2e benchmark's structured random Llama-3-8B
shape, benchmarks.e2e_prefill) and `pytext` (the trained heads of the shipped pytext-12m, all 8
layers stacked as 48 q / 16 kv heads, d 64, on a held-out passkey prompt; f32) and `dump` (a
real model's layers dumped by `benchmarks.dump_qkv` into `--dumps DIR`, stacked the same way,
f32; `--dump-config` names its per-head config, e.g. qwen2_5_coder_1_5b_instruct_searched).
Writes recall_<device>.{json,md,png} under --out and prints where (`--replot JSON` redraws the
.png from the JSON alone, on any machine); the table ends with, for
each VerticalSlash budget and the config, the adaptive point with the fewest tiles at a mean
recall at least the reference's, as a fraction of its tiles, and the fraction each oracle
needs: no index gets below the "Oracle keys" one.
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

from benchmarks.device_guard import declare
from benchmarks.e2e_prefill import CONFIG
from benchmarks.synthetic import structured_qk
from benchmarks.timing import card_name, device_name, report_written, tokens_label
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.index_approx import build_sparse_index
from minference_jax.recall import oracle_curves, row_recall, sample_block_rows

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
REFERENCE = P.VerticalSlash(1000, 6096)
CONFIG_FAMILY = "Config"
# The fixed budgets every adaptive mode and oracle is compared with.
REFERENCE_FAMILIES = ("VerticalSlash", CONFIG_FAMILY)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
# Max-relative thresholds: block scores are flatter than column / diagonal scores.
RELATIVE_BLOCKS = (0.6, 0.45, 0.3, 0.2, 0.1)
RELATIVE_VS = (0.3, 0.1, 0.03, 0.01, 0.003)
# Absolute thresholds (share of the row's estimated mass an entry must hold): the oracle's rule.
ABSOLUTE_BLOCKS = (0.03, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002)
ABSOLUTE_VS = (0.003, 0.001, 3e-4, 1e-4, 3e-5)
SAMPLED_ROWS_FEWER = (4, 2)  # SampledBlockSparse.rows besides its default 8
# Jensen-Shannon distance below which a head switches to blocks: 1.0 always switches, so the
# family shows the query-aware block pattern itself (on the synthetic inputs the distances are
# 0.5-0.6 and FlexPrefill's 0.1 would never switch).
QUERY_AWARE = 1.0
ORACLES = {"blocks": "Oracle blocks", "keys": "Oracle keys"}
# Tile fractions at which the oracle curves are reported (besides each reference's recall).
ORACLE_TILES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


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
        ("absolute", ABSOLUTE_BLOCKS, ABSOLUTE_VS),
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
    out += [("SampledBlocks absolute", t, P.SampledBlockSparse(t)) for t in ABSOLUTE_BLOCKS]
    # Fewer sampled rows cost proportionally less to estimate (its GPU cost is ~rows / 64 of
    # dense attention's softmax work): what each halving loses.
    for rows in SAMPLED_ROWS_FEWER:
        out += [
            (f"SampledBlocks absolute, {rows} rows", t, P.SampledBlockSparse(t, rows=rows))
            for t in ABSOLUTE_BLOCKS
        ]
    return out


def inputs(name: str, n: int, dtype, dumps: pathlib.Path | None = None, dump_config=None):
    """(q, k, (config label, its per-head patterns)) of one input kind at length n."""
    if name == "pytext":
        return pytext_inputs(n)
    if name == "dump":
        return dump_inputs(dumps, n, dump_config)
    shipped = ("Llama-3-8B-262k layer 0", load_pattern_config(shipped_configs()[CONFIG])[0])
    if name == "synthetic":
        q, k = structured_qk(jax.random.PRNGKey(n), 1, n, HEADS, KV_HEADS, HEAD_DIM, dtype)
        return q, k, shipped
    from benchmarks import e2e_prefill

    config = dataclasses.replace(e2e_prefill.LLAMA3_8B, num_layers=1, attention_bias=True)
    model = e2e_prefill.build_model(config, dtype, structured=True)
    ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 1, config.vocab_size)
    q, k, _ = e2e_prefill.layer0_qkv(model, ids.at[0, 0].set(0))  # the sink token first
    return q, k, shipped


def pytext_inputs(n: int):
    """Every layer of pytext-12m on a held-out passkey prompt of n tokens (real text, needle at
    40% depth), f32, layers stacked as heads: q [1, N, 8 x 6, 64], k [1, N, 8 x 2, 64] keep
    each layer's query-head groups on its own kv heads. Reference: the shipped searched config,
    all layers, in the same order."""
    from benchmarks import heldout
    from benchmarks.niah import searched_config
    from benchmarks.pytext_heads import CHECKPOINT, layer_qk
    from minference_jax.models.checkpoint import load_model

    model, config = load_model(CHECKPOINT, jnp.float32)
    ids, _ = heldout.passkey_prompt(np.random.default_rng(n), n, 0.4)
    per_layer = layer_qk(model, ids)
    q = jnp.concatenate([q for q, _ in per_layer], axis=2)
    k = jnp.concatenate([k for _, k in per_layer], axis=2)
    table = load_pattern_config(
        searched_config(CHECKPOINT), num_layers=config.num_layers, num_heads=config.num_heads
    )
    return q, k, ("pytext-12m searched, all layers", sum(table.layers, ()))


def dump_inputs(folder: pathlib.Path, n: int, config_name=None):
    """The layers a `benchmarks.dump_qkv` run wrote under `folder` (layerLL.npz), their first n
    tokens, f32, stacked as heads like pytext's (a causal model's q/k of a prompt's first n
    tokens are those of the n-token prompt). Reference: `config_name`'s patterns of the same
    layers, or VerticalSlash(1000, 6096) on every head without one."""
    from benchmarks.dump_qkv import load_qkv
    from minference_jax.shipped import resolve_pattern_config

    files = sorted(pathlib.Path(folder).glob("layer*.npz"))
    if not files:
        raise ValueError(f"no layerLL.npz files of benchmarks.dump_qkv under {folder}")
    qs, ks, layers = [], [], []
    for path in files:
        q, k, _ = load_qkv(path)
        if q.shape[1] < n:
            raise ValueError(f"{path} holds {q.shape[1]} tokens, fewer than {n}")
        with np.load(path) as f:
            layers.append(int(f["layer"]))
        qs.append(q[:, :n].astype(jnp.float32))
        ks.append(k[:, :n].astype(jnp.float32))
    q, k = jnp.concatenate(qs, axis=2), jnp.concatenate(ks, axis=2)
    heads = qs[0].shape[2]
    label = f"layers {','.join(map(str, layers))}"
    if config_name is None:
        return q, k, (f"{REFERENCE}, {label}", (REFERENCE,) * q.shape[2])
    path = resolve_pattern_config(config_name)
    table = load_pattern_config(path, num_heads=heads)
    patterns = sum((tuple(table[layer]) for layer in layers), ())
    return q, k, (f"{path.stem}, {label}", patterns)


def measure(q, k, pattern, rows) -> dict:
    index = build_sparse_index(q, k, pattern)
    recall = np.asarray(row_recall(q, k, index, rows), np.float64)  # [1, H, R]
    blocks = np.unique(rows // index.block_q)
    heads = q.shape[0] * q.shape[2]
    measured_tiles = np.asarray(index.num_tiles())[:, :, blocks].sum(dtype=np.float64)
    return dict(
        computed_fraction=round(float(index.computed_fraction()), 4),
        # Over the measured query blocks only: what the oracle curves are counted on.
        measured_blocks_fraction=round(measured_tiles / (heads * (blocks + 1).sum()), 4),
        recall_mean=round(float(recall.mean()), 4),
        recall_p10=round(float(np.percentile(recall, 10)), 4),
        recall_worst_head=round(float(recall.mean(axis=(0, 2)).min()), 4),
    )


def oracle_rows(q, k, rows, references: list[dict], kinds) -> list[dict]:
    """Points of the oracle curves (`kinds` of "blocks", "keys"): at ORACLE_TILES and at the
    fewest tiles reaching each reference row's mean recall."""
    out = []
    for kind, curve in oracle_curves(q, k, rows).items():
        if kind not in kinds:
            continue
        points = [(f"tiles {t}", t) for t in ORACLE_TILES]
        points += [
            (f"at {r['family']}({r['param']})", curve.tiles_for(r["recall_mean"]))
            for r in references
        ]
        out += [
            dict(
                family=ORACLES[kind],
                param=param,
                pattern=f"oracle:{kind}",
                adaptive=False,
                computed_fraction=round(tiles, 4),
                measured_blocks_fraction=round(tiles, 4),
                recall_mean=round(curve.recall_at(tiles), 4),
                recall_p10=None,
                recall_worst_head=None,
            )
            for param, tiles in points
        ]
    return out


def tile_savings(rows: list[dict]) -> list[str]:
    """Per (input, N) and fixed reference (REFERENCE_FAMILIES): the adaptive point with the
    fewest tiles at a mean recall at least the reference's, as a fraction of its tiles; then
    the same for each oracle curve (the least a block-sparse index / any index could need)."""

    def fewest(members, recall):
        reaching = [r for r in members if r["recall_mean"] >= recall]
        return min(reaching, key=lambda r: r["computed_fraction"], default=None)

    lines = []
    for key in sorted({(r["input"], r["seq_len"]) for r in rows}):
        group = [r for r in rows if (r["input"], r["seq_len"]) == key]
        lines.append(f"- {key[0]}, N={key[1]}:")
        for ref in (r for r in group if r["family"] in REFERENCE_FAMILIES):
            line = (
                f"  - {ref['family']}({ref['param']}) recall {ref['recall_mean']}, tiles "
                f"{ref['computed_fraction']}: "
            )
            adaptive = [r for r in group if r["adaptive"]]
            best = fewest(adaptive, ref["recall_mean"])
            if best is None:
                line += (
                    "no adaptive point reaches its recall" if adaptive else "no adaptive mode run"
                )
            else:
                line += (
                    f"{best['family']} {best['param']} needs "
                    f"{best['computed_fraction'] / ref['computed_fraction']:.2f} of its tiles "
                    f"(recall {best['recall_mean']}, tiles {best['computed_fraction']})"
                )
            for name in ORACLES.values():
                bound = fewest([r for r in group if r["family"] == name], ref["recall_mean"])
                if bound is not None:
                    ratio = bound["measured_blocks_fraction"] / ref["measured_blocks_fraction"]
                    line += f"; {name} {ratio:.2f}"
            lines.append(line)
    return lines


def _cell(value) -> str:
    return "-" if value is None else str(value)


def write_report(rows: list[dict], stem: pathlib.Path, num_rows: int, num_blocks: int) -> None:
    lines = [
        f"Recall vs computed tiles on {rows[0]['device']}: batch 1 (synthetic, e2e: {HEADS} q "
        f"/ {KV_HEADS} kv heads, d {HEAD_DIM}, {rows[0]['dtype']}; pytext: pytext-12m's 8 "
        "layers x 6 q / 2 kv heads, d 64, f32; dump: a real model's dumped layers stacked, "
        "f32), 64x64 tiles; recall = share of the dense "
        f"softmax mass kept, exact, on the {num_rows} rows of {num_blocks} query blocks "
        "spread over the sequence (mean over rows and heads; p10 over rows x heads; worst "
        "head's mean). Oracle rows: the most recall any block-sparse index (blocks) or any "
        "index (keys) keeps with that share of the tiles, knowing the dense attention.",
        "",
        "| input | N | family | parameter | tiles computed | tiles, measured blocks "
        "| recall mean | recall p10 | worst head |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['input']} | {r['seq_len']} | {r['family']} | {r['param']} | "
        f"{r['computed_fraction']} | {r['measured_blocks_fraction']} | {r['recall_mean']} | "
        f"{_cell(r['recall_p10'])} | {_cell(r['recall_worst_head'])} |"
        for r in rows
    ]
    lines += [
        "",
        "Fewest adaptive tiles at each fixed reference's recall (measured points), and the "
        "fewest each oracle needs (over the measured query blocks):",
    ]
    lines += tile_savings(rows)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"))


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Recall vs computed tiles, one panel per (input, N), one legend below them all (beside or
    inside the panels it covers curves). Reads the rows alone, so `--replot` redraws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["input"], r["seq_len"]) for r in rows})
    cols = min(3, len(keys))
    rows_of_plots = -(-len(keys) // cols)
    fig, axes = plt.subplots(
        rows_of_plots, cols, figsize=(6 * cols, 4.5 * rows_of_plots), squeeze=False
    )
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys, strict=False):
        group = [r for r in rows if (r["input"], r["seq_len"]) == key]
        for i, family in enumerate(dict.fromkeys(r["family"] for r in group)):
            pts = sorted(
                (r["computed_fraction"], r["recall_mean"]) for r in group if r["family"] == family
            )
            if family in ORACLES.values():
                style = dict(linestyle=":", color="k" if family == ORACLES["keys"] else "0.5")
            else:
                adaptive = any(r["adaptive"] for r in group if r["family"] == family)
                style = dict(linestyle="-" if adaptive else "--", marker="o", color=f"C{i}")
            ax.plot(*zip(*pts, strict=True), label=family, **style)
        ref = next(r for r in group if r["pattern"] == repr(REFERENCE))
        ax.plot(ref["computed_fraction"], ref["recall_mean"], "k*", ms=14, label=str(REFERENCE))
        ax.set_xscale("log")
        ax.set_xlabel("computed tiles / dense causal tiles")
        ax.set_ylabel("recall (dense softmax mass kept)")
        ax.set_title(f"{key[0]} inputs, {tokens_label(key[1])} tokens")
        ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    fig.suptitle(f"Recall vs computed tiles, {card_name(rows[0]['device'])}", fontsize=11)
    fig.tight_layout()
    # Hung below the figure; bbox_inches="tight" grows the image to hold it.
    fig.legend(
        legend.values(),
        legend.keys(),
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=1 + cols,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def replot(path: pathlib.Path, stem: pathlib.Path) -> pathlib.Path:
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot(json.loads(path.read_text()), stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    parser.add_argument(
        "--inputs",
        nargs="+",
        default=["synthetic"],
        choices=["synthetic", "e2e", "pytext", "dump"],
        help="dump: the layers under --dumps",
    )
    parser.add_argument(
        "--dumps",
        type=pathlib.Path,
        metavar="DIR",
        help="a folder of benchmarks.dump_qkv layer files (--inputs dump): a real model's heads",
    )
    parser.add_argument(
        "--dump-config",
        metavar="CONFIG",
        help="the dumped model's per-head pattern config (a shipped name or a path), the "
        "reference on --inputs dump (default: VerticalSlash(1000, 6096) on every head)",
    )
    parser.add_argument(
        "--query-blocks",
        type=int,
        default=8,
        help="64-row query blocks whose rows are measured, spread over the sequence (default 8)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="default: bfloat16 on GPU, float32 elsewhere",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        help="only these families (default: all, oracles included)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).parent / "results" / "local",
        help="output folder (default benchmarks/results/local/, not tracked)",
    )
    parser.add_argument(
        "--replot",
        type=pathlib.Path,
        metavar="JSON",
        help="run nothing: redraw the plot of this recall JSON file into --out",
    )
    declare(parser, "recall")
    args = parser.parse_args(argv)
    if args.replot:
        report_written(replot(args.replot, args.out / args.replot.stem))
        return []
    if ("dump" in args.inputs) != (args.dumps is not None):
        parser.error("--inputs dump and --dumps DIR go together")
    dtype_name = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    dtype = getattr(jnp, dtype_name)
    device = device_name()
    selected = [c for c in cases() if args.families is None or c[0] in args.families]
    if args.families is not None and REFERENCE not in {c[2] for c in selected}:
        selected.insert(0, ("VerticalSlash", "1000,6096", REFERENCE))
    rows = []
    for name in args.inputs:
        for n in args.seq_lens:
            q, k, (config_label, config_patterns) = inputs(
                name, n, dtype, args.dumps, args.dump_config
            )
            measured = list(selected)
            if args.families is None or CONFIG_FAMILY in args.families:
                after_budgets = sum(family == "VerticalSlash" for family, _, _ in selected)
                measured.insert(after_budgets, (CONFIG_FAMILY, config_label, config_patterns))
            sampled = sample_block_rows(n, args.query_blocks)
            for family, param, pattern in measured:
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
            kinds = [
                kind
                for kind, family in ORACLES.items()
                if args.families is None or family in args.families
            ]
            if kinds:
                start = time.perf_counter()
                references = [
                    r for r in rows[-len(measured) :] if r["family"] in REFERENCE_FAMILIES
                ]
                for row in oracle_rows(q, k, sampled, references, kinds):
                    rows.append(dict(device=device, input=name, seq_len=n, dtype=dtype_name, **row))
                print(f"oracle curves {time.perf_counter() - start:.1f} s", flush=True)
            del q, k
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"recall_{device.replace(':', '_').replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    write_report(rows, stem, sampled.size, np.unique(sampled // 64).size)
    print("\n".join(tile_savings(rows)))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return rows


if __name__ == "__main__":
    main()
