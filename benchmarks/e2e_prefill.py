"""End-to-end prefill of a Llama-3-8B-shaped model with random weights (built in JAX, no download).

    python -m benchmarks.e2e_prefill --seq-lens 32768 131072 --modes dense vs
    python -m benchmarks.e2e_prefill --tiny --seq-lens 256        # CPU smoke run

Shape: 32 layers, hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP 14336, vocab 128256, llama3
RoPE (theta 500000), bf16. Modes: dense (cuDNN via jax.nn.dot_product_attention) and vs (every
head VerticalSlash(1000, 6096)). Reports prefill latency, tokens/s and peak device memory; the
first call per length compiles and is not timed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import device_name
from minference_jax import patterns as P
from minference_jax.models import AttentionSpec, CausalLM, ModelConfig, RopeConfig
from minference_jax.models.generation import prefill

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
    parser.add_argument("--modes", nargs="+", default=["dense"], choices=["dense", "vs"])
    parser.add_argument("--layers", type=int, default=None, help="truncate the stack to K layers")
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--tiny", action="store_true")
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
    if args.layers:
        config = ModelConfig(**{**config.__dict__, "num_layers": args.layers})
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    start = time.perf_counter()
    model = nnx.jit(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))()
    print(
        f"built {config.num_layers}-layer model in {time.perf_counter() - start:.1f} s, "
        f"peak {peak_gib()} GiB",
        flush=True,
    )
    device, rows = device_name(), []
    for n in args.seq_lens:
        ids = jax.random.randint(jax.random.PRNGKey(n), (1, n), 0, config.vocab_size)
        for mode in args.modes:
            spec = (
                AttentionSpec()
                if mode == "dense"
                else AttentionSpec(
                    P.HeadPatterns.uniform(
                        P.VerticalSlash(1000, 6096), config.num_layers, config.num_heads
                    )
                )
            )
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
    return rows


if __name__ == "__main__":
    main()
