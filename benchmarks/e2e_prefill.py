"""End-to-end prefill of a Llama-3-8B-shaped model with random weights (built in JAX, no download).

    python -m benchmarks.e2e_prefill --seq-lens 32768 131072 --modes dense vs config
    python -m benchmarks.e2e_prefill --layers 4 --seq-lens 524288 1048576 --modes dense config
    python -m benchmarks.e2e_prefill --tiny --seq-lens 256        # CPU smoke run

Shape: 32 layers, hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP 14336, vocab 128256, llama3
RoPE (theta 500000), bf16. Modes: dense (cuDNN via jax.nn.dot_product_attention), vs (every
head VerticalSlash(1000, 6096)) and config (the shipped Llama-3-8B-262k per-head config).
Reports prefill latency, tokens/s and peak device memory; the first call per length compiles
and is not timed. With `--layers K` only K layers run and the 32-layer time is extrapolated as
(embedding/logits excluded) t_K * 32 / K, marked as such. Plain random weights give near-uniform
attention, so estimated indices come out dense and the density guard runs cuDNN: by default the
model gets q/k biases that shape attention like a trained long-context model's (local band +
an attention sink on the first token, `benchmarks.synthetic.structure_attention`);
`--plain-random` turns that off.
Writes e2e_prefill_<device>.{json,md,png} (latency and speedup vs length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.synthetic import structure_attention
from benchmarks.timing import device_name
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.models import AttentionSpec, CausalLM, ModelConfig, RopeConfig
from minference_jax.models.generation import prefill

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
        "--modes", nargs="+", default=["dense", "config"], choices=["dense", "vs", "config"]
    )
    parser.add_argument("--layers", type=int, default=None, help="truncate the stack to K layers")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--plain-random", action="store_true", help="no attention structure")
    parser.add_argument(
        "--single-call",
        action="store_true",
        help="time only the first call (compile included): an upper bound, for very long runs",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    args = parser.parse_args(argv)
    config = TINY if args.tiny else LLAMA3_8B
    full_layers = config.num_layers
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    if not args.plain_random:
        config = dataclasses.replace(config, attention_bias=True)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    start = time.perf_counter()
    model = nnx.jit(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))()
    if not args.plain_random:
        structure_attention(model, sink_token=0)
    print(
        f"built {config.num_layers}-layer model in {time.perf_counter() - start:.1f} s, "
        f"peak {peak_gib()} GiB",
        flush=True,
    )
    device, rows = device_name(), []
    for n in args.seq_lens:
        ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 1, config.vocab_size)
        ids = ids.at[0, 0].set(0)  # the attention-sink token first
        for mode in args.modes:
            spec = attention_spec(mode, config)
            compile_start = time.perf_counter()
            result = prefill(model, ids, spec, chunk_size=args.chunk)  # compile + warm-up
            first = time.perf_counter() - compile_start
            if not args.single_call:
                result = prefill(model, ids, spec, chunk_size=args.chunk)
            row = dict(
                device=device,
                seq_len=n,
                mode=mode,
                layers=config.num_layers,
                prefill_s=round(result.seconds, 3),
                full_model_s=round(result.seconds * full_layers / config.num_layers, 3),
                extrapolated=config.num_layers != full_layers,
                attention="plain random" if args.plain_random else "structured",
                first_call_s=round(first, 1),
                includes_compile=args.single_call,
                tokens_per_s=round(n / result.seconds),
                peak_gib=peak_gib(),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"e2e_prefill_{device.replace(':', '_').replace(' ', '_')}{'_tiny' if args.tiny else ''}"
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, args.out / name, full_layers)
    return rows


def attention_spec(mode: str, config: ModelConfig) -> AttentionSpec:
    if mode == "dense":
        return AttentionSpec()
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


def write_report(rows: list[dict], stem: pathlib.Path, full_layers: int) -> None:
    """Markdown table (speedup vs dense of the same length) and a latency/speedup plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = {r["seq_len"]: r["full_model_s"] for r in rows if r["mode"] == "dense"}
    lines = [
        f"End-to-end prefill, Llama-3-8B shape, random weights, {rows[0]['device']}. "
        f"Times for {full_layers} layers; * = extrapolated from {rows[0]['layers']} layers.",
        "",
        "| N | mode | prefill s | tokens/s | speedup vs dense | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = dense.get(r["seq_len"], float("nan")) / r["full_model_s"]
        star = "*" if r["extrapolated"] else ""
        lines.append(
            f"| {r['seq_len']} | {r['mode']} | {r['full_model_s']}{star} | "
            f"{r['tokens_per_s']} | {speedup:.2f} | {r['peak_gib']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(sorted({r["mode"] for r in rows})):
        style = dict(marker="o", label=mode, color=f"C{i}")  # one colour per mode in both panels
        pts = sorted((r["seq_len"], r["full_model_s"]) for r in rows if r["mode"] == mode)
        ax_t.plot(*zip(*pts, strict=True), **style)
        if mode != "dense":
            sp = [(n, dense[n] / t) for n, t in pts if n in dense]
            if sp:
                ax_s.plot(*zip(*sp, strict=True), **style)
    for ax, label in ((ax_t, "prefill seconds"), (ax_s, "speedup vs dense")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.legend()
    ax_t.set_yscale("log")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
