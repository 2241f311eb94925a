"""End-to-end prefill of a Llama-3-8B-shaped model with random weights (built in JAX, no download).

    python -m benchmarks.e2e_prefill --seq-lens 32768 131072 --modes dense vs config
    python -m benchmarks.e2e_prefill --layers 4 --seq-lens 524288 1048576 --modes dense config
    python -m benchmarks.e2e_prefill --dense-layers 2 --seq-lens 131072 524288 --modes dense config
    python -m benchmarks.e2e_prefill --tiny --seq-lens 256        # CPU smoke run
    python -m benchmarks.e2e_prefill --layers 2 --seq-lens 131072 524288 --tensor-parallel 1 2 4

Shape: 32 layers, hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP 14336, vocab 128256, llama3 RoPE
(theta 500000), bf16. Modes: dense (cuDNN via jax.nn.dot_product_attention), vs (every head
VerticalSlash(1000, 6096)), config (the shipped Llama-3-8B-262k per-head config) and the
adaptive anti-diagonal[:THRESHOLD] / adaptive-vs[:THRESHOLD] (every head
AntiDiagonalBlockSparse / AdaptiveVerticalSlash, threshold default 0.9). Reports prefill
latency (median of --repeats calls after a compiling warm-up call), tokens/s, peak device memory
(the process's high-water mark so far: exact for the first mode run at each length, an upper bound
for later ones) and, for sparse modes, the fraction of causal tiles that layer 0's estimated index
computes. With `--layers K` only K layers run and the 32-layer time is extrapolated as
(embedding/logits excluded) t_K * 32 / K, marked as such. `--dense-layers K` truncates only the
dense baseline (its layers all cost the same, so t_K * 32 / K is exact up to noise) and runs the
sparse modes on the whole stack, whose layers differ in budgets and density (the shipped config
gives layer 0 25 heads of VerticalSlash(1000, 6096), the average layer 15). Plain random weights
give near-uniform attention, so estimated indices come out dense and the density guard runs
cuDNN: by default the model gets q/k biases that shape attention like a trained long-context
model's (local band + an attention sink on the first token,
`benchmarks.synthetic.structure_attention`); `--plain-random` turns that off.
`--tensor-parallel 1 2 4` runs every length and mode on 1 device and tensor-parallel over 2 and 4
(heads and MLP columns split, `minference_jax.models.sharding`; weights placed once, outside the
timing): kv-head groups placed per layer to balance the config's estimated tiles, activations
sequence-parallel. `--no-balance` / `--no-seq-parallel` add rows with the contiguous head split
(modes whose heads differ) / replicated activations (all-reduce): an A/B in one run.
Tensor-parallel rows report the scaling vs 1 device, the per-device tile spread (max / mean,
estimated from the layers' indices and from the config's cost model: `benchmarks.tp_stats`)
and the communication share (the layer's collectives timed alone at the same sizes / the layer
time).
Writes e2e_prefill_<device>.{json,md,png} (latency and speedup vs length) to --out (default
benchmarks/results/local/, git-ignored); `--replot A.json [B.json ...] --name NAME` redraws the
plot from JSON files alone (merged), on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import tp_stats
from benchmarks.device_guard import declare
from benchmarks.synthetic import structure_attention
from benchmarks.timing import (
    DEFAULT_OUT,
    add_replot_arguments,
    card_name,
    device_name,
    report_written,
    time_fn,
    tokens_label,
)
from minference_jax import patterns as P
from minference_jax.attention import default_blocks, layer_plan, planned_attention
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.index_approx import build_planned_index
from minference_jax.models import AttentionSpec, CausalLM, ModelConfig, RopeConfig
from minference_jax.models.generation import layer_step, prefill
from minference_jax.models.rope import rope_tables
from minference_jax.models.sharding import TensorParallel, make_mesh

CONFIG = "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern"
LLAMA3_8B = ModelConfig(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=1 << 20,
    rms_norm_eps=1e-5,
    rope=RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)
TINY = ModelConfig(
    family="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=1 << 20,
)


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**30, 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["dense", "config"],
        type=parse_mode,
        help="dense, vs, config, or an adaptive mode anti-diagonal[:THRESHOLD], "
        "adaptive-vs[:THRESHOLD] (every head that pattern; default threshold 0.9)",
    )
    parser.add_argument("--layers", type=int, default=None, help="truncate the stack to K layers")
    parser.add_argument(
        "--dense-layers",
        type=int,
        default=None,
        help="run the dense mode on a K-layer stack (extrapolated), sparse modes on all layers",
    )
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
    parser.add_argument(
        "--tensor-parallel", type=int, nargs="+", default=[1], help="device counts to compare"
    )
    parser.add_argument(
        "--no-balance",
        action="store_true",
        help="also run each multi-device case with the contiguous head split (A/B in one run)",
    )
    parser.add_argument(
        "--no-seq-parallel",
        action="store_true",
        help="also run each multi-device case with replicated activations and all-reduces",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--plain-random", action="store_true", help="no attention structure")
    parser.add_argument(
        "--single-call",
        action="store_true",
        help="time only the first call (compile included): an upper bound, for very long runs",
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="skip timing layer 0's index / attention / projections+MLP shares",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    add_replot_arguments(parser, "the plot")
    declare(parser, "e2e_prefill")
    args = parser.parse_args(argv)
    if args.replot:
        report_written(replot(args.replot, args.out / (args.name or args.replot[0].stem)))
        return []
    config = TINY if args.tiny else LLAMA3_8B
    full_layers = config.num_layers
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    if not args.plain_random:
        config = dataclasses.replace(config, attention_bias=True)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = build_model(config, dtype, structured=not args.plain_random)
    dense_model = model
    if args.dense_layers and "dense" in args.modes and args.dense_layers < config.num_layers:
        dense_config = dataclasses.replace(config, num_layers=args.dense_layers)
        dense_model = build_model(dense_config, dtype, structured=not args.plain_random)
    device, rows = device_name(), []
    meshes = {}  # (model id, device count, balance, seq-parallel) -> a TensorParallel
    index_tiles = {}  # (model id, N, mode) -> every layer's index tiles per head

    def mesh_for(m, count, balance, sequence_parallel):
        if count == 1:
            return None
        if (id(m), count, balance, True) not in meshes:  # weights placed once per placement
            patterns = attention_spec("config", m.config).patterns if balance else None
            meshes[id(m), count, balance, True] = TensorParallel(
                m, make_mesh(count), patterns, seq_len=max(args.seq_lens)
            )
        key = (id(m), count, balance, sequence_parallel)
        if key not in meshes:
            meshes[key] = meshes[id(m), count, balance, True].with_sequence_parallel(False)
        return meshes[key]

    cases = [
        (devices, *layout)
        for devices in args.tensor_parallel
        for layout in tp_stats.layouts(
            devices, contiguous_too=args.no_balance, replicated_too=args.no_seq_parallel
        )
    ]
    for n in args.seq_lens:
        ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 1, config.vocab_size)
        ids = ids.at[0, 0].set(0)  # the attention-sink token first
        for (devices, balance, sequence_parallel), mode in itertools.product(cases, args.modes):
            run_model = dense_model if mode == "dense" else model
            layers = run_model.config.num_layers
            spec = attention_spec(mode, run_model.config)
            if balance is False and tp_stats.uniform_heads(spec):
                continue  # every head costs the same: the contiguous split changes nothing
            tp = mesh_for(run_model, devices, balance, sequence_parallel)

            run = functools.partial(
                lambda *a, **kw: prefill(*a, **kw).seconds,
                run_model,
                ids,
                spec,
                chunk_size=args.chunk,
                mesh=tp,
            )
            compile_start = time.perf_counter()
            seconds = [run()]  # compile + warm-up
            first = time.perf_counter() - compile_start
            if not args.single_call:
                seconds = [run() for _ in range(args.repeats)]
            seconds = statistics.median(seconds)
            row = dict(
                device=device,
                devices=devices,
                seq_len=n,
                mode=mode,
                layers=layers,
                prefill_s=round(seconds, 3),
                full_model_s=round(seconds * full_layers / layers, 3),
                extrapolated=layers != full_layers,
                attention="plain random" if args.plain_random else "structured",
                first_call_s=round(first, 1),
                includes_compile=args.single_call,
                tokens_per_s=round(n * layers / (seconds * full_layers)),
                peak_gib=peak_gib(),
                layer0_computed_fraction=layer0_density(run_model, ids, spec),
            )
            if devices == 1 and not (args.no_breakdown or args.single_call):
                row.update(layer0_breakdown(run_model, ids, spec, args.chunk, args.repeats))
            if tp is not None:
                key = (id(run_model), n, mode)
                if key not in index_tiles:
                    index_tiles[key] = tp_stats.index_tiles_by_layer(
                        run_model, ids, spec, args.chunk
                    )
                comm_ms = tp_stats.collectives_ms(
                    tp, 1, n, run_model.config.hidden_size, dtype, args.chunk, args.repeats
                )
                row.update(
                    layout=tp_stats.layout_label(balance, sequence_parallel),
                    index_tile_spread_est=tp_stats.index_tile_spread(index_tiles[key], tp),
                    cost_model_spread=tp_stats.cost_model_spread(spec, run_model.config, tp, n),
                    collectives_ms_per_layer=round(comm_ms, 2),
                    comm_share=round(comm_ms * layers / (1e3 * seconds), 3),
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"e2e_prefill_{device.replace(':', '_').replace(' ', '_')}{'_tiny' if args.tiny else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, args.out / name, full_layers)
    report_written(*(args.out / f"{name}.{ext}" for ext in ("json", "md", "png")))
    return rows


def build_model(config: ModelConfig, dtype, *, structured: bool) -> CausalLM:
    start = time.perf_counter()
    # Eager, not nnx.jit: the same values (a test checks), but one small program per parameter
    # shape instead of one for the whole stack (the jitted 32-layer build took 131 s on an H200).
    model = CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    if structured:
        structure_attention(model, sink_token=0)
    print(
        f"built {config.num_layers}-layer model in {time.perf_counter() - start:.1f} s, "
        f"peak {peak_gib()} GiB",
        flush=True,
    )
    return model


def layer0_density(model, ids, spec: AttentionSpec) -> float | None:
    """Fraction of the causal tiles layer 0's estimated index computes (None: every head dense).

    Computed even where the prefill runs dense cuDNN (short prompts, or indices over the density
    guard), to show why."""
    config = model.config
    n = ids.shape[1]
    patterns = spec.layer(0, config.num_heads)
    block_q, block_kv = default_blocks(
        patterns, spec.implementation, model.embed[...].dtype, config.head_dim
    )  # the blocks the prefill's index uses on this device
    plan, budgets = layer_plan(
        patterns, n, config.num_heads, "pallas", block_q=block_q, block_kv=block_kv
    )
    if plan is None:
        return None
    q, k, _ = layer0_qkv(model, ids)
    index = build_planned_index(q, k, budgets, plan=plan, scale=config.head_dim**-0.5)
    return round(float(index.computed_fraction()), 4)


@nnx.jit
def layer0_qkv(model, ids):
    """Layer 0's q, k, v for the prompt (RoPE applied)."""
    n = ids.shape[1]
    cos, sin = rope_tables(model.config, jnp.arange(n), n)
    layer = model.layers[0]
    return layer.attn.qkv(layer.input_norm(model.embed[...][ids]), cos, sin)


def layer0_breakdown(model, ids, spec: AttentionSpec, chunk: int, repeats: int) -> dict:
    """Where layer 0's time goes (the MInference paper's breakdown), each part timed alone:
    the whole layer step, its attention (index + kernel, or cuDNN) and the index estimation.
    Projections/MLP (with norms and RoPE) = layer - attention."""
    config = model.config
    n = ids.shape[1]
    layer = model.layers[0]
    implementation = spec.implementation
    plan, budgets = layer_plan(
        spec.layer(0, config.num_heads),
        n,
        config.num_heads,
        implementation,
        dtype=model.embed[...].dtype,
        head_dim=config.head_dim,
    )
    scale = config.head_dim**-0.5
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = model.embed[...][ids]
    q, k, v = layer0_qkv(model, ids)
    step = functools.partial(layer_step, plan=plan, implementation=implementation, chunk=chunk)
    layer_ms = time_fn(lambda: step(layer, x, cos, sin, budgets), warmup=1, repeats=repeats)
    attend = jax.jit(
        functools.partial(planned_attention, plan=plan, scale=scale, implementation=implementation)
    )
    attention_ms = time_fn(attend, q, k, v, budgets, warmup=1, repeats=repeats)
    index_ms = 0.0
    if plan is not None:  # the layer estimates an index (else it runs dense attention)
        index = functools.partial(build_planned_index, plan=plan, scale=scale)
        index_ms = time_fn(index, q, k, budgets, warmup=1, repeats=repeats)
    return dict(layer0_ms=round(layer_ms, 2), **part_shares(layer_ms, attention_ms, index_ms))


def part_shares(layer_ms: float, attention_ms: float, index_ms: float) -> dict:
    """Shares of the layer's three parts, from separately timed runs.

    Separate timings need not add up: on a busy host the attention timed alone can take longer
    than the whole layer did. A part whose difference comes out negative counts as zero (with a
    warning) and the shares are normalised to sum to 1, so no share is ever negative.
    """
    parts = {
        "share_index": index_ms,
        "share_attention_kernel": attention_ms - index_ms,
        "share_projections_mlp": layer_ms - attention_ms,
    }
    negative = [name for name, ms in parts.items() if ms < 0]
    if negative:
        print(
            f"warning: timings inconsistent (layer {layer_ms:.2f} ms, attention "
            f"{attention_ms:.2f} ms, index {index_ms:.2f} ms); {', '.join(negative)} set to 0",
            file=sys.stderr,
        )
    parts = {name: max(ms, 0.0) for name, ms in parts.items()}
    total = sum(parts.values()) or 1.0
    return {name: round(ms / total, 3) for name, ms in parts.items()}


ADAPTIVE_MODES = ("anti-diagonal", "adaptive-vs")


def parse_mode(text: str) -> str:
    """argparse type of --modes: a fixed mode, or an adaptive one with an optional threshold."""
    name, colon, threshold = text.partition(":")
    try:
        if name in ADAPTIVE_MODES:
            P.pattern_for_mode(name, (float(threshold),) if colon else None)
            return text
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"bad mode {text!r}: {err}") from err
    if text in ("dense", "vs", "config"):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown mode {text!r}: dense, vs, config, {', '.join(ADAPTIVE_MODES)}[:THRESHOLD]"
    )


def attention_spec(mode: str, config: ModelConfig) -> AttentionSpec:
    if mode == "dense":
        return AttentionSpec()
    name, colon, threshold = mode.partition(":")
    if name in ADAPTIVE_MODES:
        pattern = P.pattern_for_mode(name, (float(threshold),) if colon else None)
        return AttentionSpec(P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads))
    if mode == "vs":
        pattern = P.VerticalSlash(1000, 6096)
        return AttentionSpec(P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads))
    table = load_pattern_config(shipped_configs()[CONFIG])
    if table.num_heads != config.num_heads:  # tiny smoke model: cycle the config's heads
        layers = tuple(
            tuple(table[i % table.num_layers][h % table.num_heads] for h in range(config.num_heads))
            for i in range(config.num_layers)
        )
    else:
        layers = table.layers[: config.num_layers]
    return AttentionSpec(P.HeadPatterns(layers))


def shares(row: dict) -> str:
    keys = ("share_index", "share_attention_kernel", "share_projections_mlp")
    if not all(key in row for key in keys):
        return "-"
    return " / ".join(f"{100 * row[key]:.0f}%" for key in keys)


def speedup_ceiling(sparse: dict, dense: dict) -> float | None:
    """Layer-0 speedup if the sparse kernel computed its tiles at cuDNN's dense rate.

    sparse layer = index + projections/MLP (both measured) + tile fraction x dense attention
    time (measured in the dense row of the same length). What a kernel as fast per tile as cuDNN
    would give on this index: the bound that the index density and the linear layers set.
    """
    needed = ("layer0_ms", "share_index", "share_projections_mlp", "layer0_computed_fraction")
    if not all(sparse.get(key) is not None for key in needed) or "layer0_ms" not in dense:
        return None
    dense_attention_ms = dense["layer0_ms"] * dense["share_attention_kernel"]
    fixed_ms = sparse["layer0_ms"] * (sparse["share_index"] + sparse["share_projections_mlp"])
    return dense["layer0_ms"] / (fixed_ms + sparse["layer0_computed_fraction"] * dense_attention_ms)


def tp_columns(row: dict) -> str:
    if "layout" not in row:
        return "- | - | -"
    spread = f"{row['index_tile_spread_est']} / {row['cost_model_spread']}"
    return f"{row['layout']} | {spread} | {100 * row['comm_share']:.1f}%"


def write_report(rows: list[dict], stem: pathlib.Path, full_layers: int) -> None:
    """Markdown table (speedup vs dense of the same length) and a latency/speedup plot."""
    dense_rows = {r["seq_len"]: r for r in rows if r["mode"] == "dense" and r["devices"] == 1}
    dense = {n: r["full_model_s"] for n, r in dense_rows.items()}
    single = {(r["seq_len"], r["mode"]): r["full_model_s"] for r in rows if r["devices"] == 1}
    lines = [
        f"End-to-end prefill, Llama-3-8B shape, random weights, {rows[0]['device']}. "
        f"Times for {full_layers} layers; * = extrapolated as t_K x {full_layers} / K from the "
        "K layers run.",
        "",
        "Speedup vs dense: against 1-device dense of the same length. Peak GiB: device 0.",
        "",
        "Layer-0 time shares (each part timed alone): index estimation / attention kernel "
        "(or cuDNN) / projections + MLP. Ceiling: layer 0's speedup if the sparse kernel "
        "computed its tiles at cuDNN's dense rate (index + projections/MLP measured, kernel = "
        "tile fraction x the dense row's cuDNN time).",
        "",
        "Tensor parallel (devices > 1): vs 1 device = scaling against the same mode on one "
        "device; tile spread = largest / mean device tiles summed over the layers run "
        "(estimated: the layers' indices built on one device, and the config's cost model); "
        "comm share = one layer's collectives timed "
        "alone at the same sizes / the mean layer time.",
        "",
        "| N | mode | devices | layers run | prefill s | tokens/s | speedup vs dense | vs 1 device "
        "| peak GiB | layer-0 tiles computed | layer-0 ms | index / kernel / proj+MLP "
        "| ceiling | TP layout | tile spread est. (index / cost model) | comm share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = dense.get(r["seq_len"], float("nan")) / r["full_model_s"]
        star = "*" if r["extrapolated"] else ""
        scaling = single.get((r["seq_len"], r["mode"]), float("nan")) / r["full_model_s"]
        ceiling = None
        if r["mode"] != "dense" and r["devices"] == 1 and r["seq_len"] in dense_rows:
            ceiling = speedup_ceiling(r, dense_rows[r["seq_len"]])
        lines.append(
            f"| {r['seq_len']} | {r['mode']} | {r['devices']} | {r['layers']} | "
            f"{r['full_model_s']}{star} | "
            f"{r['tokens_per_s']} | {speedup:.2f} | {scaling:.2f} | {r['peak_gib']} | "
            f"{r.get('layer0_computed_fraction') or '-'} | {r.get('layer0_ms', '-')} | "
            f"{shares(r)} | {'-' if ceiling is None else f'{ceiling:.2f}'} | "
            f"{tp_columns(r)} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, stem.with_suffix(".png"), full_layers)


MODE_LABELS = {
    "dense": "dense (cuDNN)",
    "vs": "vs: every head VerticalSlash(1000, 6096)",
    "config": "config (minference): the shipped Llama-3-8B-262k per-head config",
}


def mode_label(mode: str) -> str:
    """A plot line's label: the mode's name, and what it runs."""
    name, _, threshold = mode.partition(":")
    if name in ADAPTIVE_MODES:
        pattern = P.pattern_for_mode(name, (float(threshold),) if threshold else None)
        return f"{mode}: every head {type(pattern).__name__}, threshold {pattern.threshold}"
    return MODE_LABELS.get(mode, mode)


def plot(rows: list[dict], path: pathlib.Path, full_layers: int) -> None:
    """Prefill seconds and speedup vs prompt length, one line per mode (and device count), the
    card and how many layers each time was extrapolated from in the title. Reads the rows alone,
    so `--replot` redraws it from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dict(r, devices=r.get("devices", 1)) for r in rows]  # older files: one device
    dense = {
        r["seq_len"]: r["full_model_s"] for r in rows if r["mode"] == "dense" and r["devices"] == 1
    }
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = list(dict.fromkeys((r["mode"], r["devices"], r.get("layout", "-")) for r in rows))
    several_layouts = len({r.get("layout", "-") for r in rows if r["devices"] > 1}) > 1
    for i, (mode, devices, layout) in enumerate(series):
        label = mode_label(mode) if devices == 1 else f"{mode_label(mode)}, {devices} GPUs"
        if several_layouts and layout != "-":
            label += f" ({layout})"
        style = dict(marker="o", label=label, color=f"C{i}")  # one colour per series, both panels
        pts = sorted(
            (r["seq_len"], r["full_model_s"])
            for r in rows
            if (r["mode"], r["devices"], r.get("layout", "-")) == (mode, devices, layout)
        )
        ax_t.plot(*zip(*pts, strict=True), **style)
        if (mode, devices) != ("dense", 1):
            sp = [(n, dense[n] / t) for n, t in pts if n in dense]
            if sp:
                ax_s.plot(*zip(*sp, strict=True), **style)
    lengths = sorted({r["seq_len"] for r in rows})
    for ax, label in ((ax_t, f"prefill seconds, {full_layers} layers"), (ax_s, "speedup vs dense")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [tokens_label(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    cards = sorted({card_name(r["device"]) for r in rows})
    gpus = max(r["devices"] for r in rows)
    card = " / ".join(cards) if gpus == 1 else f"{' / '.join(cards)}, 1 and {gpus} GPUs"
    fig.suptitle(
        f"Prefill, Llama-3-8B shape, random weights, {card}" + extrapolation(rows, full_layers),
        fontsize=10,
    )
    fig.tight_layout()
    # Hung below the axes (inside, it covers the curves' ends); bbox_inches="tight" makes room.
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def extrapolation(rows: list[dict], full_layers: int) -> str:
    """'' when every time ran all layers; else which layer counts the times are scaled from."""
    run = sorted({r["layers"] for r in rows if r["extrapolated"]}, reverse=True)
    if not run:
        return ""
    by_count = []
    for layers in run:
        lengths = sorted(
            {r["seq_len"] for r in rows if r["extrapolated"] and r["layers"] == layers}
        )
        where = "" if len(run) == 1 else f" at {', '.join(tokens_label(n) for n in lengths)}"
        by_count.append(f"{layers} layer{'s' if layers > 1 else ''}{where}")
    return f"\n{full_layers}-layer times extrapolated from {' and '.join(by_count)} run"


def replot(paths: list[pathlib.Path], stem: pathlib.Path) -> pathlib.Path:
    """Redraw the plot of one or more e2e JSON files (merged, e.g. runs at different lengths)."""
    rows = [row for path in paths for row in json.loads(path.read_text())]
    stem.parent.mkdir(parents=True, exist_ok=True)
    first = rows[0]  # full_model_s = prefill_s x full layers / layers run
    full_layers = round(first["full_model_s"] / first["prefill_s"] * first["layers"])
    plot(rows, stem.with_suffix(".png"), full_layers)
    return stem.with_suffix(".png")


if __name__ == "__main__":
    main()
