"""python -m minference_jax.prefill: prefill a long prompt and print latency and a continuation.

    python -m minference_jax.prefill                                   # embedded default
    python -m minference_jax.prefill --model converted/ --prompt-file book.txt \\
        --mode minference --pattern-config my_searched_config.json
    python -m minference_jax.prefill --model hf_folder/ --synthetic-tokens 131072 --json

Thin: argument parsing and reporting; the work is minference_jax.models.generation.
"""

from __future__ import annotations

import argparse
import json
import sys

MODES = ("dense", "minference", "a-shape", "block-sparse", "anti-diagonal", "adaptive-vs")


class CliError(Exception):
    """A user error: printed as one line, exit code 2, no traceback."""


def _parse_budget(text: str) -> tuple[int | float, ...]:
    try:
        return tuple(float(x) if "." in x else int(x) for x in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minference_jax.prefill", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", help="converted or HF folder (default: embedded passkey-tiny)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file with the prompt ('-' reads stdin)")
    source.add_argument("--synthetic-tokens", type=int, help="random prompt of N token ids")
    parser.add_argument("--mode", default="minference", choices=MODES)
    parser.add_argument("--pattern-config", help="per-head JSON config (minference mode)")
    parser.add_argument(
        "--budget",
        type=_parse_budget,
        help="minference: 'n_vertical,n_slash' (default 1000,6096); a-shape: 'n_init,n_local' "
        "(default 1024,4096); block-sparse: 'top_k' (default 100); anti-diagonal: "
        "'threshold,stride' (default 0.9,8); adaptive-vs: 'threshold,query_aware' "
        "(default 0.9,0.0)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=8192)
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split heads and MLP over N local devices (0: all of them)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument(
        "--allow-long",
        action="store_true",
        help="accept prompts longer than the model's max_position_embeddings",
    )
    parser.add_argument(
        "--warmup",
        action="store_true",
        help="run the prefill once before timing it (otherwise the time includes compilation)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no per-layer progress")
    return parser


def _patterns(args, config):
    from minference_jax import patterns as P
    from minference_jax.config_io import PatternConfigError, load_pattern_config

    if args.mode == "dense":
        return None, "dense"
    if args.pattern_config:
        if args.mode != "minference":
            raise CliError("--pattern-config goes with --mode minference")
        try:
            table = load_pattern_config(
                args.pattern_config, num_layers=config.num_layers, num_heads=config.num_heads
            )
        except PatternConfigError as err:
            raise CliError(str(err)) from err
        return table, args.pattern_config
    if args.model is None and args.mode == "minference" and args.budget is None:
        from minference_jax.config_io import shipped_configs
        from minference_jax.models.defaults import SEARCHED_CONFIG

        path = shipped_configs()[SEARCHED_CONFIG]  # the embedded model's searched config
        return load_pattern_config(path, num_layers=config.num_layers), SEARCHED_CONFIG
    try:
        pattern = P.pattern_for_mode(args.mode, args.budget)
    except (TypeError, ValueError) as err:
        raise CliError(f"bad --budget for {args.mode}: {err}") from err
    return P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads), repr(pattern)


def _load(args):
    import jax.numpy as jnp

    dtype = None if args.dtype is None else getattr(jnp, args.dtype)
    if args.model is None:
        from minference_jax.models.defaults import default_model

        model, config, tokenizer = default_model(dtype or jnp.float32)
        return model, config, tokenizer, "embedded passkey-tiny (trained 2-layer Llama, bytes)"
    import pathlib

    from convert.checkpoint import CheckpointError, load_model
    from minference_jax.models.config import ModelConfigError
    from minference_jax.tokenization import load_tokenizer

    if not pathlib.Path(args.model).is_dir():
        raise CliError(f"checkpoint folder not found: {args.model}")
    try:
        model, config = load_model(args.model, dtype)
    except (CheckpointError, ModelConfigError) as err:
        raise CliError(str(err)) from err
    return model, config, load_tokenizer(args.model), args.model


def _prompt_ids(args, config, tokenizer):
    import numpy as np

    if args.synthetic_tokens is not None:
        if args.synthetic_tokens < 1:
            raise CliError("--synthetic-tokens must be >= 1")
        return np.random.default_rng(0).integers(0, config.vocab_size, args.synthetic_tokens)
    if args.prompt_file:
        try:
            text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file).read()
        except OSError as err:
            raise CliError(f"cannot read prompt file: {err}") from err
    else:
        from minference_jax.models.defaults import default_prompt

        text = default_prompt() if args.prompt is None else args.prompt
    if not text.strip():
        raise CliError("empty prompt")
    if tokenizer is None:
        raise CliError("this checkpoint has no tokenizer.json: pass --synthetic-tokens N")
    return np.asarray(tokenizer.encode(text))


def run(args) -> dict:
    import jax
    import numpy as np

    from minference_jax.models import AttentionSpec
    from minference_jax.models.generation import generate, prefill

    model, config, tokenizer, model_name = _load(args)
    ids = _prompt_ids(args, config, tokenizer)
    if len(ids) == 0:
        raise CliError("empty prompt (no tokens)")
    if len(ids) > config.max_position_embeddings and not args.allow_long:
        raise CliError(
            f"prompt has {len(ids)} tokens, the model's max_position_embeddings is "
            f"{config.max_position_embeddings}; pass --allow-long to run anyway"
        )
    table, pattern_name = _patterns(args, config)

    def progress(layer, total, seconds):
        if not args.quiet:
            print(f"  layer {layer + 1}/{total}  {seconds:7.2f} s", file=sys.stderr, flush=True)

    spec = AttentionSpec(table)
    mesh = None
    if args.tensor_parallel != 1:
        from minference_jax.models.sharding import check_divisible, make_mesh

        try:
            mesh = make_mesh(args.tensor_parallel or None)
            check_divisible(config, mesh.size)
        except ValueError as err:
            raise CliError(str(err)) from err
    if args.warmup:
        prefill(model, ids[None], spec, chunk_size=args.chunk_size, mesh=mesh)
    new_tokens, result = generate(
        model,
        ids[None],
        args.max_new_tokens,
        spec,
        chunk_size=args.chunk_size,
        progress=progress,
        mesh=mesh,
    )
    stats = jax.devices()[0].memory_stats() or {}
    tokens = [int(t) for t in np.asarray(new_tokens)[0]]
    return {
        "model": model_name,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "mode": args.mode,
        "devices": 1 if mesh is None else mesh.size,
        "patterns": pattern_name,
        "prompt_tokens": len(ids),
        "prefill_seconds": round(result.seconds, 4),
        "includes_compile": not args.warmup,
        "tokens_per_second": round(len(ids) / result.seconds, 1),
        "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
        "continuation_tokens": tokens,
        "continuation": tokenizer.decode(tokens) if tokenizer is not None else None,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>26}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
