"""What device each benchmark needs, said in its --help and checked before any work starts.

Most benchmarks are sized for one GPU (the shipped results ran on an NVIDIA H100 or H200). On a
CPU they run the Pallas kernels in interpret mode, or XLA's dense attention, which materialises
f32 [batch, heads, N, N] scores: a size that takes a second on the GPU can run for hours there,
or ask for more memory than the host has after minutes of work. `LIMITS` says per benchmark
what a CPU can finish; each benchmark's main calls `declare(parser, NAME)` before parsing its
arguments, and a CPU run past its limit stops at once with one line and exit code 2, unless
`--allow-cpu` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import textwrap
from collections.abc import Callable

ALLOW_CPU = "--allow-cpu"
ROOT = pathlib.Path(__file__).parents[1]
CHECKPOINTS = ROOT / "minference_jax" / "checkpoints"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_attention_bytes(batch: int, heads: int, tokens: int, *, sliced: bool = True) -> int:
    """Dense causal attention on a CPU holds two f32 [batch, heads, rows, N] arrays (scores,
    probabilities). The library's dense path takes the queries in slices of
    `attention.dense_query_rows` rows (about 2 GB in all); XLA called directly (`sliced=False`)
    holds every row: 43 GB for 20 prompts x 4 heads at 8K tokens, as measured."""
    from minference_jax.attention import dense_query_rows

    rows = min(tokens, dense_query_rows((batch, tokens, heads, 1))) if sliced else tokens
    return 2 * batch * heads * rows * tokens * 4


def model_heads(folder) -> int | None:
    """num_attention_heads of an HF-style folder's config.json; None if unreadable (the
    benchmark's own loading then says what is wrong with the folder)."""
    try:
        config = json.loads((pathlib.Path(folder) / "config.json").read_text())
        return int(config["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dense_fits(batch: int, heads: int | None, tokens: int, *, sliced: bool = True) -> str | None:
    """None if dense attention of that size fits in host memory, else why not."""
    if heads is None:
        return None
    need = dense_attention_bytes(batch, heads, tokens, sliced=sliced)
    have = host_memory_bytes()
    if need <= have:
        return None
    return (
        f"dense attention at {tokens} tokens ({batch} prompts x {heads} heads) needs about "
        f"{need / 1e9:.0f} GB, this host has {have / 1e9:.0f} GB"
    )


def at_most(flag: str, value: int, limit: int) -> str | None:
    return None if value <= limit else f"{flag} {value} is over the CPU limit of {limit}"


def only_with(flag: str, given: bool) -> str | None:
    return None if given else f"it runs there only with {flag}"


def _niah_dense_fits(a: argparse.Namespace) -> str | None:
    prompts = max(len(a.depths) * a.samples, a.ppl_docs or 0)  # the NIAH or perplexity batch
    return dense_fits(prompts, model_heads(a.model), max(a.lengths))


@dataclasses.dataclass(frozen=True)
class Limits:
    gpu: bool  # sized for a GPU (True), or meant for a CPU as well
    cpu: str  # what a CPU can finish, in words naming the flags
    check: Callable[[argparse.Namespace], str | None]  # None, or why these arguments cannot


NEEDS_NO_GPU = {"fetch_qwen_gguf", "heldout", "train_tiny_longctx"}
LIMITS = {
    "dump_qkv": Limits(
        True,
        "the dense attention of one layer, taken in query slices, must fit in host memory; "
        "the time grows as --tokens squared",
        lambda a: dense_fits(1, model_heads(a.model), a.tokens),
    ),
    "e2e_prefill": Limits(
        True,
        "only the --tiny model runs, as long as its dense attention fits in host memory "
        "(the Llama-3-8B shape has 16 GB of weights)",
        lambda a: only_with("--tiny", a.tiny) or dense_fits(1, 4, max(a.seq_lens)),
    ),
    "eval_pytext": Limits(
        True,
        "the dense mode's attention over 5 depths x --samples prompts must fit in host memory "
        "(taken in query slices: about 2 GB at any length)",
        lambda a: dense_fits(
            5 * a.samples, model_heads(CHECKPOINTS / "pytext-12m"), max(a.lengths)
        ),
    ),
    "index_approx": Limits(
        True,
        "at most 32768 tokens (--seq-lens): 0.8 s a call at 32K, and 128K or more runs past 10 "
        "minutes",
        lambda a: at_most("--seq-lens", max(a.seq_lens), 32768),
    ),
    "kernels": Limits(
        True,
        "only with --interpret and at most 4096 tokens (--seq-lens): the interpreted kernel "
        "takes ~4 s a call at 1K and grows with the tiles",
        lambda a: (
            only_with("--interpret", a.interpret) or at_most("--seq-lens", max(a.seq_lens), 4096)
        ),
    ),
    "mgpu_sweep": Limits(
        True,
        "nothing: the Mosaic GPU kernel needs an NVIDIA H100 or H200",
        lambda a: "it needs an NVIDIA H100 or H200",
    ),
    "niah": Limits(
        True,
        "the dense mode's attention over --depths x --samples prompts (or --ppl-docs) must fit "
        "in host memory (taken in query slices: about 2 GB for 20 prompts of 8K on passkey-tiny)",
        lambda a: _niah_dense_fits(a) if "dense" in a.modes else None,
    ),
    "profile_index": Limits(
        True,
        "at most 8192 tokens (--seq-len): a few minutes, the Pallas estimator interpreted",
        lambda a: at_most("--seq-len", a.seq_len, 8192),
    ),
    "pytext_heads": Limits(
        False,
        "the dense prefill's attention must fit in host memory (--tokens: 8K takes ~1 minute)",
        lambda a: dense_fits(1, model_heads(a.model), a.tokens),
    ),
    "pytext_shortfall": Limits(
        False,
        "the dense mode's attention over --depths x --samples prompts must fit in host memory "
        "(4K takes ~10 minutes)",
        lambda a: dense_fits(len(a.depths) * a.samples, model_heads(a.model), a.tokens),
    ),
    "real_model": Limits(
        True,
        "at most 2048 tokens (--lengths, --speed-lengths): every length prefills a 1.5B model "
        "for 5 modes x 20 prompts",
        lambda a: at_most("the longest length", max([*a.lengths, *a.speed_lengths, 0]), 2048),
    ),
    "recall": Limits(
        False,
        "at most 16384 tokens (--seq-lens): 8K takes ~3 minutes, 16K with --inputs pytext ~16",
        lambda a: at_most("--seq-lens", max(a.seq_lens), 16384),
    ),
    "short_prompts": Limits(
        True,
        "the dense attention of one layer (32 heads) must fit in host memory (--seq-lens: 8K "
        "needs 17 GB)",
        lambda a: dense_fits(1, 32, max(a.seq_lens), sliced=False),
    ),
    "slash_tiling": Limits(
        False,
        "at most 131072 tokens (--seq-len) without --tiny: ~6 minutes at 128K",
        lambda a: None if a.tiny else at_most("--seq-len", a.seq_len, 131072),
    ),
    "train_longctx": Limits(
        True,
        "only the --tiny configuration (a smoke run)",
        lambda a: only_with("--tiny", a.tiny),
    ),
}


def _append(parser: argparse.ArgumentParser, text: str) -> None:
    paragraph = textwrap.fill(text, 95)
    parser.description = f"{parser.description}\n\n{paragraph}" if parser.description else paragraph


def declare(parser: argparse.ArgumentParser, name: str) -> None:
    """Say in --help what benchmarks.NAME needs (NEEDS_NO_GPU, or its LIMITS entry); for a LIMITS
    entry also add --allow-cpu and make parsing stop a CPU run the entry refuses. Call before
    parsing."""
    if name in NEEDS_NO_GPU:
        _append(parser, "Device: needs no GPU.")
        return
    limits = LIMITS[name]
    kind = "sized for a GPU" if limits.gpu else "runs on a CPU (a GPU is faster)"
    _append(
        parser,
        f"Device: {kind}. On a CPU {limits.cpu}; a larger run there stops at once (exit code 2) "
        f"unless {ALLOW_CPU} is given.",
    )
    parser.add_argument(
        ALLOW_CPU, action="store_true", help="run on a CPU even past what it can finish there"
    )
    parse_known_args = parser.parse_known_args

    def parse_and_check(args=None, namespace=None):
        import jax  # here: the benchmarks that need no GPU (a download) never import it

        parsed, rest = parse_known_args(args, namespace)
        redraw = getattr(parsed, "replot", None)  # --replot draws from JSON files: any device
        if not (parsed.allow_cpu or redraw) and jax.default_backend() == "cpu":
            reason = limits.check(parsed)
            if reason is not None:
                sys.stderr.write(
                    f"benchmarks.{name}: cannot finish on a CPU: {reason}. Run it on a GPU, ask "
                    f"for less, or add {ALLOW_CPU}.\n"
                )
                raise SystemExit(2)
        return parsed, rest

    # argparse's parse_args calls parse_known_args, so the check covers both.
    parser.parse_known_args = parse_and_check
