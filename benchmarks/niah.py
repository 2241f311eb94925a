"""Needle-in-a-haystack (passkey) accuracy and perplexity: dense vs sparse prefill.

    python -m benchmarks.niah --model minference_jax/checkpoints/passkey-tiny \\
        --lengths 2048 4096 8192 16384 32768 --samples 4          # GPU
    python -m benchmarks.niah --lengths 1024 --depths 0 1 --samples 1 --ppl-docs 1  # CPU smoke

For each prompt length x needle depth, `--samples` passkey prompts (fresh haystack, random
5-digit key; `minference_jax.passkey`) are prefilled in each mode and 5 tokens decoded greedily
(dense decoding over the prefilled cache); a sample is correct when they are the key. Modes:
  dense       dense causal attention (cuDNN on GPU);
  minference  the per-head pattern config (--pattern-config; default: the checkpoint's
              searched config, minference_jax/configs/passkey_tiny_searched.json);
  vs          every head VerticalSlash(--budget, default 1000,6096).
Sparse modes force the sparse path (Pallas on GPU, XLA on CPU) at every length: the library's
default sends prompts of <= 32K tokens to dense cuDNN on GPU, which would hide their accuracy.
Perplexity: mean next-token loss over --ppl-docs held-out passkey documents per length.
Writes niah_<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import device_name
from minference_jax import passkey
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, shipped_configs
from minference_jax.models import AttentionSpec
from minference_jax.models.checkpoint import load_model
from minference_jax.models.generation import generate

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "passkey-tiny"
SEARCHED = "passkey_tiny_searched"


def mode_specs(args, config) -> dict[str, AttentionSpec]:
    impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    specs = {}
    for mode in args.modes:
        if mode == "dense":
            specs[mode] = AttentionSpec()
        elif mode == "minference":
            path = args.pattern_config or shipped_configs().get(SEARCHED)
            if path is None:
                raise SystemExit("minference mode needs --pattern-config (no searched config)")
            table = load_pattern_config(
                path, num_layers=config.num_layers, num_heads=config.num_heads
            )
            specs[mode] = AttentionSpec(table, implementation=impl)
        elif mode == "vs":
            pattern = P.VerticalSlash(*args.budget)
            table = P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads)
            specs[mode] = AttentionSpec(table, implementation=impl)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    return specs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=CHECKPOINT)
    parser.add_argument("--pattern-config", type=pathlib.Path, default=None)
    parser.add_argument("--modes", nargs="+", default=["dense", "minference", "vs"])
    parser.add_argument("--budget", type=int, nargs=2, default=[1000, 6096])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--ppl-docs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="float32 (default) isolates the sparse approximation from rounding; on GPU its "
        "dense mode is XLA attention with [B, H, N, N] scores, fine for the tiny model to 16K",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results"
    )
    args = parser.parse_args(argv)

    model, config = load_model(args.model, getattr(jnp, args.dtype))
    specs = mode_specs(args, config)
    device = device_name()
    rows = []
    for length in args.lengths:
        for depth in args.depths:
            rng = np.random.default_rng([args.seed, length, int(depth * 1000)])
            prompts = [passkey.passkey_prompt(rng, length, depth) for _ in range(args.samples)]
            ids = jnp.asarray(np.stack([passkey.encode(p) for p, _ in prompts]))
            for mode, spec in specs.items():
                new_tokens, _ = generate(model, ids, passkey.KEY_DIGITS, spec)
                answers = [bytes(t.astype(np.uint8)).decode("ascii", "replace") for t in new_tokens]
                correct = sum(a == key for a, (_, key) in zip(answers, prompts, strict=True))
                rows.append(
                    dict(
                        kind="niah",
                        mode=mode,
                        length=length,
                        depth=depth,
                        correct=correct,
                        samples=args.samples,
                        answers=answers,
                        keys=[k for _, k in prompts],
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
        rng = np.random.default_rng([args.seed, length, 7])
        docs = [passkey.training_batch(rng, 1, length)[0] for _ in range(args.ppl_docs)]
        for mode, spec in specs.items():
            forward = nnx.jit(lambda m, x, spec=spec: m(x, spec))
            nll = []
            for doc in docs:
                ids = jnp.asarray(doc)
                logits = forward(model, ids[:, :-1])
                logp = jax.nn.log_softmax(logits, -1)
                nll.append(-np.asarray(jnp.take_along_axis(logp, ids[:, 1:, None], -1)).mean())
            rows.append(dict(kind="ppl", mode=mode, length=length, ppl=math.exp(np.mean(nll))))
            print(json.dumps(rows[-1]), flush=True)
        # after every length: a run cut short still leaves its finished lengths on disk
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"niah_{device.replace(':', '_').replace(' ', '_')}"
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        write_report(
            rows, stem, device, args, lengths=args.lengths[: args.lengths.index(length) + 1]
        )
    return rows


def write_report(rows, stem: pathlib.Path, device: str, args, lengths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, depths = args.modes, args.depths
    acc = {
        (r["mode"], r["length"], r["depth"]): r["correct"] / r["samples"]
        for r in rows
        if r["kind"] == "niah"
    }
    ppl = {(r["mode"], r["length"]): r["ppl"] for r in rows if r["kind"] == "ppl"}
    lines = [
        f"Passkey retrieval (NIAH) and perplexity, {args.model.name}, {device}; "
        f"{args.samples} samples per cell, {args.dtype}; sparse modes forced at every length.",
        "",
        "| mode | " + " | ".join(f"{n} tokens" for n in lengths) + " | overall |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    for mode in modes:
        per_length = [np.mean([acc[mode, n, d] for d in depths]) for n in lengths]
        overall = np.mean([acc[mode, n, d] for n in lengths for d in depths])
        lines.append(
            f"| {mode} accuracy | "
            + " | ".join(f"{a:.1%}" for a in per_length)
            + f" | {overall:.1%} |"
        )
    for mode in modes:
        lines.append(
            f"| {mode} PPL | " + " | ".join(f"{ppl[mode, n]:.4f}" for n in lengths) + " | |"
        )
    lines += ["", "Accuracy by depth (rows) and length (columns):", ""]
    for mode in modes:
        lines += [f"**{mode}**", "", "| depth | " + " | ".join(map(str, lengths)) + " |"]
        lines.append("|---|" + "---|" * len(lengths))
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(f"{acc[mode, n, d]:.2f}" for n in lengths) + " |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = np.array([[acc[mode, n, d] for n in lengths] for d in depths])
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{mode}: {grid.mean():.0%}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
