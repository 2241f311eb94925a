"""Offline, kernel-aware per-head pattern search; writes the original JSON config format.

The model runs densely over sample prompts, layer by layer. For every (layer, query head), every
candidate pattern is scored on the last `score_queries` queries of each prompt:
- recall: the share of the dense attention mass (softmax probabilities) its index keeps;
- cost: the key tiles the kernel would compute for the whole prompt, over a dense causal
  kernel's tiles (the same `SparseIndex.num_tiles` the kernel walks).
Each head takes the candidate with the highest recall among those costing no more than the
reference candidate (by default the uniform VerticalSlash(1000, 6096)); the reference is itself
a candidate, so the searched config keeps at least its recall at no more cost, head by head.
With `--recall-target R` there is no per-head bound: the heads share one budget, the fewest
tiles whose mean recall over all heads reaches R (`allocate_for_recall`); with one adaptive
estimator at several thresholds as candidates this gives each head its own threshold.
`--score-rows spread` scores recall on query blocks spread over each prompt instead of its last
queries (for estimators, like sampled blocks, that read the whole prompt).

    python -m minference_jax.search --out pytext_2k.json \\
        --candidates vs:300,100 vs:100,100 vs:30,128 a-shape:64,256 block:8 --min-recall 0.95
    python -m minference_jax.search --model converted/ --out my_config.json --synthetic-tokens 8192

(`minference-search` is the same command.) Without --model the embedded pytext-12m is searched
on its sample prompt. Candidates are pattern specs (minference_jax.pattern_spec): the short
kinds or the prefill's mode names, `a-shape:64,256` = `ashape:64,256`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from minference_jax import patterns as P
from minference_jax.cli import (
    ArgumentParser,
    CliError,
    check_at_least,
    fail,
    read_prompt_file,
    warn,
)
from minference_jax.config_io import PatternConfigError, save_pattern_config
from minference_jax.index_approx import build_sparse_index
from minference_jax.models.memory import DoesNotFitError, check_fits
from minference_jax.models.modeling import CausalLM, layer_body
from minference_jax.models.rope import rope_tables
from minference_jax.pattern_spec import format_pattern_spec, parse_pattern_spec, spec_help
from minference_jax.recall import row_recall, sample_block_rows
from minference_jax.shipped import resolve_checkpoint
from minference_jax.tokenization import TokenizerError, load_tokenizer

# Budgets of the original tool's search space (tokens), the reference (default) first.
DEFAULT_CANDIDATES = (
    P.VerticalSlash(1000, 6096),
    P.VerticalSlash(3500, 100),
    P.VerticalSlash(100, 800),
    P.VerticalSlash(30, 800),
    P.VerticalSlash(500, 700),
    P.AShape(128, 4096),
    P.BlockSparse(100),
)
SYNTHETIC_TOKENS = 4096  # each synthetic prompt's length, unless --synthetic-tokens says


@dataclasses.dataclass
class SearchResult:
    patterns: P.HeadPatterns
    recall: np.ndarray  # [layers, heads] of the chosen pattern
    cost: np.ndarray  # [layers, heads] of the chosen pattern
    reference_recall: np.ndarray  # [layers, heads] of the reference candidate
    reference_cost: np.ndarray


SCORE_ROWS = ("last", "spread")


def scored_rows(n: int, score_queries: int, how: str, block: int = 64) -> np.ndarray:
    """Query positions whose recall a candidate is scored on: the last `score_queries` rows, or
    ("spread") whole `block`-row query blocks spread evenly over the prompt, about as many rows
    (an estimate that reads only the last queries is then judged on the whole prompt)."""
    if how == "last":
        return np.arange(n - score_queries, n, dtype=np.int32)
    if how == "spread":
        return sample_block_rows(n, -(-score_queries // block), block)
    raise ValueError(f"score rows must be one of {SCORE_ROWS}, got {how!r}")


def _score(q, k, candidate, rows, block: int):
    """(recall [H], cost [H]) of one candidate for every head, averaged over the batch: the dense
    attention mass its index keeps on query rows `rows`, and the key tiles it computes for the
    whole prompt over a dense causal kernel's."""
    index = build_sparse_index(q, k, candidate, block_q=block, block_kv=block)
    recall = row_recall(q, k, index, rows).mean(axis=(0, 2))
    cost = index.num_tiles().sum(-1).mean(0) / index.causal_tiles
    return np.asarray(recall), np.asarray(cost)


def allocate_for_recall(recall: np.ndarray, cost: np.ndarray, target: float) -> np.ndarray:
    """[...] candidate per head (recall, cost [C, ...]): about the fewest mean tiles whose mean
    recall over all heads reaches `target`, heads trading recall for tiles with each other.

    Each head starts at its cheapest candidate and climbs its (cost, recall) upper hull; the
    steps of all heads are taken in order of recall gained per tile until the mean recall reaches
    `target` (every head at its best recall when it cannot); then each head moves to a cheaper
    candidate where the target still holds. Within one head's step of the best any choice
    reaching `target` could cost (it is an integral knapsack)."""
    c, *shape = recall.shape
    flat_r, flat_c = recall.reshape(c, -1).T, cost.reshape(c, -1).T  # [heads, C]
    choice = np.zeros(flat_r.shape[0], np.int64)
    steps = []  # (recall per tile, head, step, candidate)
    for h, (r, t) in enumerate(zip(flat_r, flat_c, strict=True)):
        order = np.lexsort((-r, t))  # cheapest first; at equal cost the best recall
        hull = [order[0]]
        for i in order[1:]:
            if r[i] <= r[hull[-1]] + 1e-12:
                continue  # dominated: costs no less, keeps no more
            while len(hull) >= 2:  # keep the slopes decreasing (upper hull)
                a, b = hull[-2], hull[-1]
                if (r[b] - r[a]) * (t[i] - t[a]) <= (r[i] - r[a]) * (t[b] - t[a]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        choice[h] = hull[0]
        for step, (a, b) in enumerate(zip(hull[:-1], hull[1:], strict=True)):
            gain = (r[b] - r[a]) / max(t[b] - t[a], 1e-12)
            steps.append((-gain, h, step, b))
    total = flat_r[np.arange(flat_r.shape[0]), choice].sum()
    need = target * flat_r.shape[0] - 1e-9
    for _, h, _, b in sorted(steps):
        if total >= need:
            break
        total += flat_r[h, b] - flat_r[h, choice[h]]
        choice[h] = b
    if total >= need:  # the last step may overshoot: any head that can, moves to a cheaper pick
        for h in range(flat_r.shape[0]):
            fits = total - flat_r[h, choice[h]] + flat_r[h] >= need
            cheaper = np.where(fits, flat_c[h], np.inf)
            if cheaper.min() < flat_c[h, choice[h]]:
                total += flat_r[h, cheaper.argmin()] - flat_r[h, choice[h]]
                choice[h] = cheaper.argmin()
    return choice.reshape(shape)


def search_patterns(
    model: CausalLM,
    prompts: Sequence[np.ndarray],
    *,
    candidates: Sequence[P.Pattern] = DEFAULT_CANDIDATES,
    reference: int = 0,
    score_queries: int = 64,
    block: int = 64,
    min_recall: float | None = None,
    recall_target: float | None = None,
    score_rows: str = "last",
    progress=None,
) -> SearchResult:
    """Pick one pattern per (layer, head); `candidates[reference]` bounds every head's cost.

    min_recall: a head whose best pick under the cost bound keeps less attention mass than this
    takes instead the cheapest candidate that reaches it, or Dense() when none does (recall and
    cost 1) — diffuse heads then cost more than the reference, on purpose.
    recall_target: instead of the per-head cost bound, the fewest tiles whose mean recall over
    all heads and layers reaches it (`allocate_for_recall`): e.g. one estimator at several
    thresholds as candidates, each head getting the threshold where its tiles buy the most.
    score_rows: `scored_rows` ("last": the last `score_queries` queries; "spread": about as
    many rows in query blocks spread over each prompt).
    progress: None, or a callable(prompt_id, num_prompts, layer_id, num_layers) called after
    each layer of each prompt.
    """
    config = model.config
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("no candidate patterns")
    if not prompts:
        raise ValueError("no prompts")
    if score_queries < 1:
        raise ValueError(f"score_queries must be >= 1, got {score_queries}")
    if min_recall is not None and not 0.0 <= min_recall <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall}")
    if recall_target is not None and not 0.0 <= recall_target <= 1.0:
        raise ValueError(f"recall_target must be in [0, 1], got {recall_target}")
    if recall_target is not None and min_recall is not None:
        raise ValueError("give min_recall (per-head cost bound) or recall_target, not both")
    _check_candidates(candidates, block)
    num_layers, num_heads = config.num_layers, config.num_heads
    recall = np.zeros((len(candidates), num_layers, num_heads))
    cost = np.zeros_like(recall)
    for prompt_id, prompt in enumerate(prompts):
        ids = jnp.asarray(prompt, jnp.int32)[None]
        n = ids.shape[1]
        if n < score_queries:
            raise ValueError(f"prompt of {n} tokens is shorter than score_queries={score_queries}")
        cos, sin = rope_tables(config, jnp.arange(n), n)
        x = model.embed[...][ids]
        for layer_id, layer in enumerate(model.layers):
            q, k, _ = layer.attn.qkv(layer.input_norm(x), cos, sin)
            rows = scored_rows(n, score_queries, score_rows, block)
            for c, candidate in enumerate(candidates):
                r, s = _score(q, k, candidate, rows, block)
                recall[c, layer_id] += r / len(prompts)
                cost[c, layer_id] += s / len(prompts)
            x, _, _ = layer_body(layer, x, cos, sin, None, plan=None, implementation=None, chunk=n)
            if progress is not None:
                progress(prompt_id, len(prompts), layer_id, num_layers)
    allowed = cost <= cost[reference][None] + 1e-9  # [C, L, H]
    best = np.argmax(np.where(allowed, recall - 1e-6 * cost, -np.inf), axis=0)  # ties: cheaper
    if recall_target is not None:
        best = allocate_for_recall(recall, cost, recall_target)
    if min_recall is not None:
        # Dense as an extra last candidate: keeps all the mass at the full causal cost.
        candidates += (P.Dense(),)
        recall = np.concatenate([recall, np.ones_like(recall[:1])])
        cost = np.concatenate([cost, np.ones_like(cost[:1])])
        reaching = np.argmin(np.where(recall >= min_recall - 1e-9, cost, np.inf), axis=0)
        too_low = np.take_along_axis(recall, best[None], axis=0)[0] < min_recall
        best = np.where(too_low, reaching, best)
    layers = tuple(
        tuple(candidates[best[layer, h]] for h in range(num_heads)) for layer in range(num_layers)
    )
    pick = np.take_along_axis
    return SearchResult(
        patterns=P.HeadPatterns(layers),
        recall=pick(recall, best[None], axis=0)[0],
        cost=pick(cost, best[None], axis=0)[0],
        reference_recall=recall[reference],
        reference_cost=cost[reference],
    )


def _check_candidates(candidates: Sequence[P.Pattern], block: int = 64) -> None:
    """Raise ValueError unless the candidates can share a layer: any head may pick any of them,
    so a searched layer holds any mix, and its index has `block`-token key blocks."""
    try:
        P.check_layer_patterns(candidates, block_kv=block)
    except ValueError as err:
        raise ValueError(f"the candidates cannot share one layer: {err}") from err


def parse_candidate(text: str) -> P.Pattern:
    """A pattern spec ('vs:1000,6096', 'a-shape:64,256', 'avsr:0.01', ...; see
    minference_jax.pattern_spec) -> a pattern (argparse type)."""
    try:
        return parse_pattern_spec(text)
    except ValueError as err:
        message = str(err).replace("bad pattern", "bad candidate", 1)
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m minference_jax.search",
        description=__doc__,
        epilog="candidate kinds, KIND:VALUES (a prefill --mode name works as KIND too):\n"
        + spec_help(),
    )
    parser.add_argument(
        "--model",
        help="converted or HF checkpoint folder, or a shipped model's name: pytext-12m, "
        "passkey-tiny (default: the embedded pytext-12m)",
    )
    parser.add_argument("--out", required=True, help="JSON pattern config to write")
    parser.add_argument(
        "--prompt-file",
        action="append",
        help="UTF-8 sample prompt text, repeatable (default: the embedded model's sample "
        "prompt, 2048 tokens of held-out Python text; for --model, synthetic prompts)",
    )
    parser.add_argument(
        "--synthetic-tokens",
        type=int,
        help=f"search on --num-prompts random prompts of this many tokens (default: "
        f"{SYNTHETIC_TOKENS} when --model is given without --prompt-file)",
    )
    parser.add_argument("--num-prompts", type=int, default=2, help="synthetic prompts")
    parser.add_argument(
        "--score-queries",
        type=int,
        default=64,
        help="queries of each prompt on which recall is measured (default: %(default)s)",
    )
    parser.add_argument(
        "--score-rows",
        choices=SCORE_ROWS,
        default="last",
        help="which: the last --score-queries, or as many in 64-row query blocks spread over "
        "the prompt (for estimators that read the whole prompt, e.g. sbs) (default: last)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=parse_candidate,
        default=None,
        metavar="KIND:VALUES",
        help="candidate patterns (kinds below), the reference (every head's cost bound) "
        "first (default: the original's, reference vs:1000,6096, then "
        + " ".join(map(format_pattern_spec, DEFAULT_CANDIDATES[1:]))
        + ")",
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=None,
        help="in [0, 1]: heads below this recall under the cost bound take the cheapest "
        "candidate reaching it, or dense (default: none)",
    )
    parser.add_argument(
        "--recall-target",
        type=float,
        default=None,
        help="in [0, 1]: no per-head cost bound; the fewest tiles whose mean recall over all "
        "heads reaches this, heads trading recall for tiles with each other (candidates: e.g. "
        "one estimator at several thresholds, sbs:0.01 sbs:0.003 sbs:0.001 sbs:0.0003)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default: the checkpoint's; float32 for the embedded model)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _check_args(args) -> None:
    """Every user error the arguments alone reveal, before the model is loaded; fills in
    args.synthetic_tokens when the prompts are synthetic."""
    check_at_least("--synthetic-tokens", args.synthetic_tokens, 1)
    check_at_least("--num-prompts", args.num_prompts, 1)
    check_at_least("--score-queries", args.score_queries, 1)
    check_at_least("--seed", args.seed, 0)
    if args.min_recall is not None and not 0.0 <= args.min_recall <= 1.0:  # NaN fails too
        raise CliError(f"--min-recall must be in [0, 1], got {args.min_recall}")
    if args.recall_target is not None and not 0.0 <= args.recall_target <= 1.0:
        raise CliError(f"--recall-target must be in [0, 1], got {args.recall_target}")
    if args.recall_target is not None and args.min_recall is not None:
        raise CliError("pass --min-recall or --recall-target, not both")
    if args.prompt_file and args.synthetic_tokens is not None:
        raise CliError("pass --prompt-file or --synthetic-tokens, not both")
    if args.synthetic_tokens is None and args.model is not None and not args.prompt_file:
        args.synthetic_tokens = SYNTHETIC_TOKENS
    if args.synthetic_tokens is not None and args.score_queries > args.synthetic_tokens:
        raise CliError(
            f"--score-queries ({args.score_queries}) exceeds the prompt length "
            f"(--synthetic-tokens {args.synthetic_tokens})"
        )
    if args.candidates:
        try:
            _check_candidates(args.candidates)
        except ValueError as err:
            raise CliError(f"--candidates: {err}") from err
    _check_out_reads_nothing(args, _model_folder(args, strict=False))
    _check_writable(pathlib.Path(args.out))


def _model_folder(args, strict: bool = True) -> pathlib.Path:
    """The checkpoint folder --model means; strict=False: the path as given when it is none."""
    from minference_jax.models.checkpoint import CheckpointError
    from minference_jax.models.defaults import CHECKPOINT

    if args.model is None:
        return CHECKPOINT
    try:
        return resolve_checkpoint(args.model)
    except CheckpointError as err:
        if strict:
            raise CliError(str(err)) from err
        return pathlib.Path(args.model)


def _check_out_reads_nothing(args, folder: pathlib.Path) -> None:
    """Refuse an --out that names a file the run reads: saving would replace it (through a
    symbolic link too, as the config is written to the link's target)."""
    out = os.path.realpath(args.out)
    for prompt in args.prompt_file or ():
        if prompt != "-" and (out == os.path.realpath(prompt) or _same_file(out, prompt)):
            raise CliError(f"--out {args.out} is the prompt file {prompt}: it would be overwritten")
    model = os.path.realpath(folder)
    if out == model or out.startswith(model.rstrip(os.sep) + os.sep):
        raise CliError(
            f"--out {args.out} is inside the checkpoint folder {args.model or folder}: write the "
            "config elsewhere"
        )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def _check_writable(out: pathlib.Path) -> None:
    """Fail now, not after the search, when the config could not be written."""
    if out.is_dir():
        raise CliError(f"--out {out} is a directory; give a file name")
    folder = out.parent
    if not folder.exists():
        raise CliError(f"--out {out}: folder {folder} does not exist")
    if not folder.is_dir():
        raise CliError(f"--out {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: folder {folder} is not writable")


def _read_prompt_files(args) -> list[tuple[str, str]]:
    """(name, text) of every sample prompt given as text; none for synthetic prompts."""
    if args.synthetic_tokens is not None:
        return []
    if not args.prompt_file:  # the embedded model, searched on the prompt prefill runs
        from minference_jax.models.defaults import default_prompt

        return [("the embedded model's sample prompt", default_prompt())]
    texts = [(path, read_prompt_file(path)) for path in args.prompt_file]
    for path, text in texts:
        if not text.strip():
            raise CliError(f"prompt file {path} is empty")
    return texts


def _check_fits(config, tokens: int, dtype, what: str) -> None:
    try:
        check_fits(config, tokens, dtype, what=what)
    except DoesNotFitError as err:
        raise CliError(str(err)) from err


def _prompts(args, folder, config, dtype, texts: list[tuple[str, str]]) -> list[np.ndarray]:
    if not texts:  # checked before any synthetic prompt is allocated
        _check_fits(config, args.synthetic_tokens, dtype, "--synthetic-tokens")
        rng = np.random.default_rng(args.seed)
        return [
            rng.integers(0, config.vocab_size, args.synthetic_tokens)
            for _ in range(args.num_prompts)
        ]
    try:
        tokenizer = load_tokenizer(folder, config.vocab_size)
    except TokenizerError as err:
        raise CliError(str(err)) from err
    if tokenizer is None:
        raise CliError("no tokenizer.json in the checkpoint: use --synthetic-tokens")
    prompts = []
    for path, text in texts:
        ids = np.asarray(tokenizer.encode(text))
        if len(ids) < args.score_queries:
            raise CliError(
                f"{_prompt_name(path)} has {len(ids)} tokens, fewer than --score-queries "
                f"({args.score_queries})"
            )
        _check_fits(config, len(ids), dtype, _prompt_name(path))
        prompts.append(ids)
    return prompts


def _prompt_name(path: str) -> str:
    return path if path.startswith("the ") else f"prompt file {path}"


class _Progress:
    """Per-layer progress on stderr, under a title per prompt saying what is being done."""

    def __init__(self, prompts: list[np.ndarray], candidates: int, quiet: bool):
        self.lengths = [len(p) for p in prompts]
        self.candidates = candidates
        self.quiet = quiet
        self.last = time.perf_counter()

    def __call__(self, prompt_id: int, num_prompts: int, layer_id: int, num_layers: int) -> None:
        now = time.perf_counter()
        took, self.last = now - self.last, now
        if self.quiet:
            return
        if layer_id == 0:
            print(
                f"prompt {prompt_id + 1}/{num_prompts} ({self.lengths[prompt_id]} tokens): "
                f"dense forward, scoring {self.candidates} candidates per head",
                file=sys.stderr,
                flush=True,
            )
        print(f"  layer {layer_id + 1}/{num_layers}  {took:7.2f} s", file=sys.stderr, flush=True)


# A searched config computing more of the causal tiles than this is sparse in name only.
NEARLY_DENSE = 0.9


def run(args) -> SearchResult:
    from minference_jax.loading import load_checkpoint
    from minference_jax.models.checkpoint import CheckpointError
    from minference_jax.models.config import ModelConfigError

    _check_args(args)
    texts = _read_prompt_files(args)
    folder = _model_folder(args)
    try:
        _, model, config = load_checkpoint(folder, args.dtype)
    except (CheckpointError, ModelConfigError) as err:
        raise CliError(str(err)) from err
    prompts = _prompts(args, folder, config, model.dtype, texts)
    longest = max(len(p) for p in prompts)
    if longest > config.max_position_embeddings:
        warn(
            f"prompts of up to {longest} tokens run past the model's max_position_embeddings "
            f"({config.max_position_embeddings}): the searched patterns may not carry over"
        )
    candidates = args.candidates or DEFAULT_CANDIDATES
    result = search_patterns(
        model,
        prompts,
        candidates=candidates,
        score_queries=args.score_queries,
        min_recall=args.min_recall,
        recall_target=args.recall_target,
        score_rows=args.score_rows,
        progress=_Progress(prompts, len(candidates), args.quiet),
    )
    try:
        save_pattern_config(result.patterns, args.out, result.recall.tolist())
    except (PatternConfigError, OSError) as err:
        raise CliError(f"cannot write {args.out}: {err}") from err
    if result.cost.mean() > NEARLY_DENSE:
        warn(
            f"the searched config computes {100 * result.cost.mean():.0f}% of the causal key "
            f"tiles of these {longest}-token prompts: nearly dense. Budgets sized for longer "
            "prompts cover these whole; pass smaller --candidates (at 2K, e.g. vs:300,100 "
            "vs:100,100 vs:30,128 a-shape:64,256 block:8) or longer prompts"
        )
    return result


def summary(result: SearchResult, out: str) -> str:
    """What the search wrote, in words: recall and cost against the reference, patterns used."""
    counts = collections.Counter(p for layer in result.patterns.layers for p in layer)
    heads = ", ".join(
        f"{n} x {format_pattern_spec(p) if not isinstance(p, P.Dense) else 'dense'}"
        for p, n in counts.most_common()
    )
    return (
        f"wrote {out}: mean recall {result.recall.mean():.4f} "
        f"(reference {result.reference_recall.mean():.4f}), mean cost {result.cost.mean():.4f} "
        f"(reference {result.reference_cost.mean():.4f}) of the causal key tiles\n"
        f"heads: {heads}"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except CliError as err:
        return fail(err)
    print(summary(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
