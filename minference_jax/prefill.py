"""python -m minference_jax.prefill (or minference-prefill): prefill a long prompt; print
latency, which attention ran and a continuation.

    python -m minference_jax.prefill                                   # embedded default
    python -m minference_jax.prefill --compare-dense --repeats 5       # vs dense, median of 5
    python -m minference_jax.prefill --pattern-config pytext_12m_searched  # a shipped config
    python -m minference_jax.prefill --model converted/ --prompt-file book.txt \\
        --mode minference --pattern-config my_searched_config.json
    python -m minference_jax.prefill --model hf_folder/ --synthetic-tokens 131072 --json

--model and --pattern-config take a path or the name of a shipped model (pytext-12m,
passkey-tiny) or pattern config (a file stem in minference_jax/configs/); a path that exists
wins. Without --pattern-config, --mode minference runs the shipped config made for the model
(matched by the model name its checkpoint records, layers x heads checked) or, when none is,
VerticalSlash(1000, 6096) on every head, with a warning.

The first prefill of a prompt length compiles (untimed); then `--repeats` timed prefills, the
last of which also decodes the continuation. Bad input exits with code 2 and one line on stderr;
NaN or inf logits (broken weights or config) exit with code 3 and one line, never a result.
Thin: argument parsing and reporting; the work is minference_jax.models.generation.
"""

from __future__ import annotations

import json
import pathlib
import re
import resource
import statistics
import sys

import jax
import numpy as np

from minference_jax import patterns as P
from minference_jax.cli import (
    ArgumentParser,
    CliError,
    check_at_least,
    check_not_empty,
    check_text,
    fail,
    parse_budget,
    read_prompt_file,
    warn,
)
from minference_jax.config_io import PatternConfigError
from minference_jax.loading import AttentionChoice, choose_attention
from minference_jax.models import AttentionSpec
from minference_jax.models.generation import generate, prefill
from minference_jax.models.memory import DoesNotFitError, check_fits
from minference_jax.passkey import needle
from minference_jax.shipped import resolve_pattern_config

MODES = ("dense", *P.MODE_PATTERNS)
FAMILY_NAMES = {
    "vs": "vertical-slash",
    "ashape": "a-shape",
    "bs": "block-sparse",
    "adb": "anti-diagonal",
    "avs": "adaptive-vs",
    "sbs": "sampled-blocks",
    "dense": "dense",
}
# "The pass key is 71432. Remember it. 71432 is the pass key." -> 71432
PASSKEY_NEEDLE = re.compile(
    re.escape(needle("@").strip()).replace("@", r"(\d+)", 1).replace("@", r"\1")
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m minference_jax.prefill", description=__doc__)
    parser.add_argument(
        "--model",
        help="converted or HF checkpoint folder, or a shipped model's name: pytext-12m, "
        "passkey-tiny (default: the embedded pytext-12m)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt",
        help="prompt text (default: 2048 tokens of held-out Python text hiding a pass key)",
    )
    source.add_argument(
        "--prompt-file",
        help="UTF-8 file with the prompt, '-' for stdin (default: none, see --prompt)",
    )
    source.add_argument(
        "--synthetic-tokens",
        type=int,
        metavar="N",
        help="a random prompt of N token ids (default: none, see --prompt)",
    )
    parser.add_argument(
        "--mode",
        default="minference",
        choices=MODES,
        help="attention for the prefill; decoding is always dense",
    )
    parser.add_argument(
        "--pattern-config",
        help="per-head JSON pattern config, a path or a shipped config's name such as "
        "pytext_12m_searched; with --mode minference (default: the shipped config made for "
        "the model, matched by its name; without one, VerticalSlash(1000, 6096) on every head "
        "and a warning)",
    )
    parser.add_argument(
        "--budget",
        type=parse_budget,
        help="the same budget for every head; minference: 'n_vertical,n_slash' (default "
        "1000,6096); a-shape: 'n_init,n_local' (default 1024,4096); block-sparse: 'top_k' "
        "(default 100; 64-token key blocks); anti-diagonal: 'threshold,stride' (default 0.9,8); "
        "adaptive-vs: 'threshold,query_aware' (default 0.9,0.0)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=8, help="greedy tokens to decode after the prompt"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=8192,
        help="tokens per slice of the projections and MLP (bounds activation memory)",
    )
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split heads and MLP over N local devices (0: all of them)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default: the checkpoint's; float32 for the embedded model)",
    )
    parser.add_argument(
        "--allow-long",
        action="store_true",
        help="run prompts longer than the model's max_position_embeddings",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="timed prefills after the untimed compiling run; the median is reported (0: one "
        "run whose time includes compilation)",
    )
    parser.add_argument(
        "--compare-dense",
        action="store_true",
        help="also run the same prompt with dense attention and report both side by side",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _check_args(args) -> None:
    """Every user error that the arguments alone reveal, before anything is loaded."""
    check_at_least("--max-new-tokens", args.max_new_tokens, 0)
    check_at_least("--chunk-size", args.chunk_size, 1)
    check_at_least("--tensor-parallel", args.tensor_parallel, 0)
    check_at_least("--repeats", args.repeats, 0)
    check_at_least("--synthetic-tokens", args.synthetic_tokens, 1)
    if args.pattern_config is not None and args.mode != "minference":
        raise CliError(f"--pattern-config goes with --mode minference, not --mode {args.mode}")
    if args.budget is not None:
        _check_budget(args)
    if args.pattern_config is not None:
        try:  # a missing config or unknown name fails before the model loads
            resolve_pattern_config(args.pattern_config)
        except PatternConfigError as err:
            raise CliError(str(err)) from err


def _check_budget(args) -> None:
    if args.mode == "dense":
        raise CliError("--budget does not apply to --mode dense")
    if args.pattern_config is not None:
        raise CliError("pass --budget or --pattern-config, not both: the config sets every budget")
    _, fields, _ = P.MODE_PATTERNS[args.mode]
    if len(args.budget) != len(fields):
        raise CliError(
            f"bad --budget for --mode {args.mode}: expected {','.join(fields)}, "
            f"got {','.join(map(str, args.budget))}"
        )


def _patterns(args, folder, config) -> AttentionChoice:
    """The attention to run (`loading.choose_attention`, as `minference_jax.load` chooses it)."""
    attention = args.mode
    if args.budget is not None:
        try:
            attention = P.pattern_for_mode(args.mode, args.budget)
        except (TypeError, ValueError) as err:
            raise CliError(f"bad --budget for {args.mode}: {err}") from err
    try:
        choice = choose_attention(folder, config, attention, pattern_config=args.pattern_config)
    except ValueError as err:  # PatternConfigError included
        raise CliError(str(err)) from err
    if choice.warning:
        warn(choice.warning)
    return choice


def _covers_prompt(pattern: P.Pattern, n: int) -> bool:
    """Whether a sparse pattern's budget reaches every key of an n-token prompt."""
    if isinstance(pattern, P.VerticalSlash):
        return max(pattern.budgets(n)) >= n
    if isinstance(pattern, P.AShape):
        return pattern.n_init + pattern.n_local >= n
    if isinstance(pattern, P.BlockSparse):
        return pattern.top_k >= -(-n // pattern.block_size)
    return False  # Dense is dense on purpose


def _warn_dense_in_disguise(table: P.HeadPatterns | None, n: int) -> None:
    if table is None:
        return
    heads = [p for layer in table.layers for p in layer if not isinstance(p, P.Dense)]
    covering = sum(_covers_prompt(p, n) for p in heads)
    if covering:
        warn(
            f"{covering} of {len(heads)} sparse heads have a budget covering the whole "
            f"{n}-token prompt: they compute every tile (dense in disguise); use a smaller "
            "budget or a longer prompt"
        )


def _load(args):
    """(folder, model, config, tokenizer, the model's name for the report)."""
    from minference_jax.loading import load_checkpoint
    from minference_jax.models.checkpoint import CheckpointError
    from minference_jax.models.config import ModelConfigError
    from minference_jax.models.defaults import DESCRIPTION
    from minference_jax.tokenization import TokenizerError, load_tokenizer

    try:
        folder, model, config = load_checkpoint(args.model, args.dtype)
        tokenizer = load_tokenizer(folder, config.vocab_size)
    except (CheckpointError, ModelConfigError, TokenizerError) as err:
        raise CliError(str(err)) from err
    if args.model is None:
        name = DESCRIPTION
    elif pathlib.Path(args.model).exists():
        name = args.model
    else:
        name = f"{args.model} (shipped: {folder})"
    return folder, model, config, tokenizer, name


def _check_length(n: int, args, config, dtype) -> None:
    limit = config.max_position_embeddings
    if n > limit and not args.allow_long:
        raise CliError(
            f"prompt has {n} tokens, the model's max_position_embeddings is {limit}; pass "
            "--allow-long to run anyway"
        )
    try:  # before a synthetic prompt or any cache is allocated
        check_fits(config, n + args.max_new_tokens, dtype, what="prompt + --max-new-tokens")
    except DoesNotFitError as err:
        raise CliError(str(err)) from err
    if n + args.max_new_tokens > limit and not args.allow_long:
        warn(
            f"prompt ({n}) + new tokens ({args.max_new_tokens}) run past the model's "
            f"max_position_embeddings ({limit}): the last tokens may be unreliable"
        )


def _prompt(args, config, tokenizer, dtype) -> tuple[np.ndarray, str | None]:
    """(token ids, prompt text or None for a synthetic prompt), its length checked."""
    if args.synthetic_tokens is not None:
        _check_length(args.synthetic_tokens, args, config, dtype)
        rng = np.random.default_rng(0)
        return rng.integers(0, config.vocab_size, args.synthetic_tokens), None
    if args.prompt_file:
        text = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        text = check_text(args.prompt, "--prompt")
    else:
        from minference_jax.models.defaults import default_prompt

        text = default_prompt()
    check_not_empty(text)
    if tokenizer is None:
        raise CliError("this checkpoint has no tokenizer.json: pass --synthetic-tokens N")
    ids = np.asarray(tokenizer.encode(text))
    if len(ids) == 0:
        raise CliError("empty prompt (no tokens)")
    _check_length(len(ids), args, config, dtype)
    return ids, text


class _Progress:
    """Per-layer progress on stderr: each layer's own time, under a title per run."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.previous = 0.0

    def start(self, title: str) -> None:
        self.previous = 0.0
        if not self.quiet:
            print(title, file=sys.stderr, flush=True)

    def __call__(self, layer: int, total: int, seconds_so_far: float) -> None:
        if not self.quiet:
            took = seconds_so_far - self.previous
            print(f"  layer {layer + 1}/{total}  {took:7.2f} s", file=sys.stderr, flush=True)
        self.previous = seconds_so_far


def _timed_runs(model, ids, spec, args, mesh, label: str) -> dict:
    """An untimed compiling run, then `args.repeats` timed ones (the last also decodes)."""
    progress = _Progress(args.quiet)
    first_seconds = None
    if args.repeats:
        progress.start(f"{label}: compiling for {ids.shape[1]} tokens (first run, not timed)")
        first = prefill(model, ids, spec, chunk_size=args.chunk_size, progress=progress, mesh=mesh)
        first_seconds = first.seconds
    runs = max(args.repeats, 1)
    seconds, tokens = [], []
    for run in range(runs):
        title = f"timed run {run + 1}/{runs}" if args.repeats else "run (includes compiling)"
        progress.start(f"{label}: {title}")
        kwargs = dict(chunk_size=args.chunk_size, progress=progress, mesh=mesh)
        if run == runs - 1 and args.max_new_tokens:
            new_tokens, result = generate(model, ids, args.max_new_tokens, spec, **kwargs)
            tokens = [int(t) for t in np.asarray(new_tokens)[0]]
        else:
            result = prefill(model, ids, spec, **kwargs)
        seconds.append(result.seconds)
    median = statistics.median(seconds)
    compile_seconds = None if first_seconds is None else max(first_seconds - median, 0.0)
    return {
        "prefill_seconds": round(median, 4),
        "compile_seconds": None if compile_seconds is None else round(compile_seconds, 4),
        "includes_compile": not args.repeats,
        "tokens_per_second": round(ids.shape[1] / median, 1),
        "layers": [
            {
                "families": [FAMILY_NAMES[f] for f in layer.families],
                "computed_fraction": round(layer.computed_fraction, 4),
                "backend": layer.backend,
            }
            for layer in result.layers
        ],
        "continuation_tokens": tokens,
        "last_logits": np.asarray(result.last_logits[0]),
    }


def peak_host_memory_bytes() -> int:
    """The largest resident set this process has had, in bytes (getrusage)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB, macOS bytes


class NonFiniteLogitsError(Exception):
    """The model computed NaN or inf logits: its weights or config are broken (exit code 3)."""


EXIT_NON_FINITE = 3


def _check_finite(logits: np.ndarray, label: str) -> None:
    bad = int(np.size(logits) - np.count_nonzero(np.isfinite(logits)))
    if bad:
        raise NonFiniteLogitsError(
            f"{label}: {bad} of the last token's {np.size(logits)} logits are NaN or inf: the "
            "checkpoint's weights or config.json produce non-finite values, so no result is "
            "reported"
        )


def _passkey(text: str | None, continuation: str | None, max_new_tokens: int) -> dict | None:
    """The pass key hidden in the prompt, and whether the continuation starts with it."""
    match = None if text is None else PASSKEY_NEEDLE.search(text)
    if match is None:
        return None
    key = match.group(1)
    if continuation is None or max_new_tokens < len(key):
        return {"expected": key, "retrieved": None}
    return {"expected": key, "retrieved": continuation.lstrip().startswith(key)}


def run(args) -> dict:
    _check_args(args)
    folder, model, config, tokenizer, model_name = _load(args)
    ids, text = _prompt(args, config, tokenizer, model.dtype)
    n = len(ids)
    choice = _patterns(args, folder, config)
    table = choice.patterns
    _warn_dense_in_disguise(table, n)
    mesh = None
    if args.tensor_parallel != 1:
        from minference_jax.models.sharding import TensorParallel, make_mesh

        try:  # weights placed once for every run below
            mesh = TensorParallel(model, make_mesh(args.tensor_parallel or None))
        except ValueError as err:
            raise CliError(str(err)) from err

    def decode(tokens):
        return None if tokenizer is None else tokenizer.decode(tokens)

    sparse = _timed_runs(model, ids[None], AttentionSpec(table), args, mesh, args.mode)
    _check_finite(sparse["last_logits"], args.mode)
    dense = None
    if args.compare_dense:
        dense = _timed_runs(model, ids[None], AttentionSpec(), args, mesh, "dense")
        _check_finite(dense["last_logits"], "dense")
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    continuation = decode(sparse["continuation_tokens"])
    report = {
        "model": model_name,
        "device": f"{device.platform}:{device.device_kind}",
        "mode": args.mode,
        "devices": 1 if mesh is None else mesh.size,
        "patterns": choice.name,
        "attention": choice.description,
        "prompt_tokens": n,
        "repeats": args.repeats,
        **{key: value for key, value in sparse.items() if key != "last_logits"},
        "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
        "peak_host_memory_bytes": peak_host_memory_bytes(),
        "continuation": continuation,
        "passkey": _passkey(text, continuation, args.max_new_tokens),
    }
    if dense is not None:
        dense_continuation = decode(dense["continuation_tokens"])
        report["dense"] = {
            "prefill_seconds": dense["prefill_seconds"],
            "tokens_per_second": dense["tokens_per_second"],
            "speedup": round(dense["prefill_seconds"] / sparse["prefill_seconds"], 3),
            "continuation_tokens": dense["continuation_tokens"],
            "continuation": dense_continuation,
            "passkey": _passkey(text, dense_continuation, args.max_new_tokens),
            "last_logits_max_abs_diff": float(
                np.max(np.abs(sparse["last_logits"] - dense["last_logits"]))
            ),
        }
    return report


def _seconds(report: dict, repeats: int) -> str:
    timed = f"median of {repeats} timed runs" if repeats > 1 else "one timed run"
    if not repeats:
        timed = "one run, compilation included"
    return (
        f"{report['prefill_seconds']:.4g} s ({timed}), {report['tokens_per_second']:,.0f} tokens/s"
    )


def _answer(continuation: str | None, passkey: dict | None) -> str:
    text = "(no tokenizer)" if continuation is None else repr(continuation)
    if passkey is None:
        return text
    if passkey["retrieved"] is None:
        return f"{text}; too few new tokens to check the pass key {passkey['expected']}"
    verdict = "retrieved" if passkey["retrieved"] else "NOT retrieved"
    return f"{text} -> pass key {passkey['expected']} {verdict}"


def describe(report: dict) -> str:
    """The report in words, one fact per line."""
    prompt = f"{report['prompt_tokens']} tokens"
    if report["passkey"] is not None:
        prompt += f", hiding the pass key {report['passkey']['expected']}"
    devices = f" x {report['devices']}" if report["devices"] > 1 else ""
    lines = [
        f"model:     {report['model']}",
        f"device:    {report['device']}{devices}",
        f"prompt:    {prompt}",
        f"attention: {report['mode']}: {report['attention']}",
    ]
    for i, layer in enumerate(report["layers"]):
        families = "+".join(layer["families"])
        lines.append(
            f"  layer {i + 1}: {families}, computed {100 * layer['computed_fraction']:.1f}% "
            f"of the causal key tiles, on {layer['backend']}"
        )
    if report["compile_seconds"] is not None:
        lines.append(f"compile:   {report['compile_seconds']:.3g} s (first run, not timed)")
    lines.append(f"prefill:   {_seconds(report, report['repeats'])}")
    lines.append(f"answer:    {_answer(report['continuation'], report['passkey'])}")
    dense = report.get("dense")
    if dense is not None:
        speedup = dense["speedup"]
        verdict = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
        lines.append(f"dense:     {_seconds(dense, report['repeats'])}")
        lines.append(f"  {report['mode']} prefill is {verdict} than dense")
        lines.append(f"  answer:  {_answer(dense['continuation'], dense['passkey'])}")
        diff = dense["last_logits_max_abs_diff"]
        lines.append(f"  last-token logits differ from dense by up to {diff:.3g}")
    memory = report["peak_device_memory_bytes"]
    if memory is not None:
        lines.append(f"peak device memory: {memory / 2**30:.2f} GiB")
    host = report["peak_host_memory_bytes"]
    lines.append(f"peak host memory: {host / 2**30:.2f} GiB (this process's largest resident set)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except CliError as err:
        return fail(err)
    except NonFiniteLogitsError as err:
        fail(err)
        return EXIT_NON_FINITE
    print(json.dumps(report, allow_nan=False) if args.json else describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
