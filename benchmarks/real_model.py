"""A real pretrained model, end to end: accuracy and prefill speed of every mode in one run.

    python -m benchmarks.real_model --model CONVERTED_QWEN --pattern-config searched.json \\
        --lengths 4096 8192 16384 32768 65536 131072 --speed-lengths 32768 65536 131072  # GPU

Written for Qwen2.5-Coder-1.5B-Instruct converted from its GGUF (`python -m convert`, see
RESULTS.md), and works for any converted chat model with a tokenizer.json. Prompts are built
from the held-out real text of `benchmarks/data/pytext_heldout.jsonl.gz` (Python sources and
documentation), tokenised with the model's own tokenizer, wrapped in the Qwen chat format:

- pass key: a 5-digit key hidden at a depth of the text, then "What is the pass key?"; correct
  when the greedy answer (8 tokens) contains the key. `--depths` x `--samples` per length;
- code: Python files concatenated, one function defined once among them returning a unique
  string; "Which function returns the string ...?"; correct when the answer names it;
- perplexity: mean next-token loss over held-out windows of each length (`--ppl-docs`).

Prompts longer than the native context (`--yarn-above`, default 32768 tokens) run with the YaRN
RoPE Qwen2.5 documents (`--yarn-factor` 4: 128K positions), shorter ones with the native RoPE.
Accuracy runs force the sparse path at every length (as `benchmarks.niah`: the library's
default would run short prompts densely and hide their accuracy). Speed: whole-model prefill
time (every layer, batch 1, median of `--repeats` after a warm-up) with the library's default
dispatch, dense cuDNN in the same process; and layer 0 on the same prompt, its parts timed alone
as `benchmarks.e2e_prefill` does (the share its index estimation takes). Writes
real_model_<device>.{json,md} and one heat map per mode (accuracy by length and depth) to --out,
after every length; `--replot JSON` redraws the heat maps from the JSON alone, on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import heldout
from benchmarks.device_guard import declare
from benchmarks.e2e_prefill import layer0_breakdown
from benchmarks.niah import Mode, build_modes, resolve_model_arg
from benchmarks.timing import DEFAULT_OUT, card_name, device_name, report_written, tokens_label
from minference_jax.attention import plan_layers
from minference_jax.models import AttentionSpec
from minference_jax.models.checkpoint import load_model
from minference_jax.models.config import RopeConfig
from minference_jax.models.generation import generate, layer_step, prefill
from minference_jax.models.rope import rope_tables
from minference_jax.tokenization import load_tokenizer

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHUNK = 8192  # prefill chunk of the projections / MLP (the library default)
LOGITS_CHUNK = 2048  # positions per logits block in the perplexity (vocab 152K: 1.2 GB in f32)
WORDS = (
    "amber cobalt falcon harbor lantern meadow nickel orchid pepper quartz raven saffron timber "
    "velvet walnut zephyr basalt cinder dune ember fjord glacier hollow island juniper kelp"
).split()
INTRO = "Read the text below and answer the question after it.\n\n"
VERBS = ("compute", "resolve", "gather", "render", "merge", "encode", "sample", "collect")


def chat(tokenizer, user_before: list[int], user_after: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat turns around a user message: (prefix, suffix); the message is
    the caller's ids between them, then `user_after`."""
    prefix = tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    suffix = tokenizer.encode(f"{user_after}<|im_end|>\n<|im_start|>assistant\n")
    return prefix + user_before, suffix


class Corpus:
    """The held-out documents as one token stream (all of them, or only the Python files)."""

    def __init__(self, tokenizer, python_only: bool = False):
        docs = [
            f"# {path}\n{text}" if python_only else f"{path}\n{text}"
            for path, text in heldout.heldout_docs()
            if not python_only or path.endswith(".py")
        ]
        ids = []
        for doc in docs:
            ids += tokenizer.encode(doc + "\n\n")
        self.ids = np.asarray(ids, np.int32)

    def window(self, rng: np.random.Generator, length: int) -> np.ndarray:
        if length > len(self.ids):
            raise ValueError(f"held-out text has {len(self.ids)} tokens, fewer than {length}")
        start = int(rng.integers(0, len(self.ids) - length + 1))
        return self.ids[start : start + length]


def needle_prompt(tokenizer, corpus, rng, length: int, depth: float, needle: str, question: str):
    """Exactly `length` token ids: chat prefix, text with `needle` at `depth`, question."""
    intro = tokenizer.encode(INTRO)
    prefix, suffix = chat(tokenizer, intro, f"\n\n{question}")
    needle_ids = tokenizer.encode(f"\n{needle}\n")
    room = length - len(prefix) - len(suffix) - len(needle_ids)
    if room < 1:
        raise ValueError(f"a prompt of {length} tokens leaves no room for text")
    text = corpus.window(rng, room)
    cut = int(round(depth * room))
    ids = np.concatenate([prefix, text[:cut], needle_ids, text[cut:], suffix]).astype(np.int32)
    assert len(ids) == length
    return ids


def passkey_batch(tokenizer, corpus, length: int, depths, samples: int, seed: int):
    rows, answers, cells = [], [], []
    for depth in depths:
        rng = np.random.default_rng([seed, length, int(depth * 1000)])
        for _ in range(samples):
            key = str(rng.integers(10_000, 100_000))
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            question = "What is the pass key? Answer with the number only."
            rows.append(needle_prompt(tokenizer, corpus, rng, length, depth, needle, question))
            answers.append(key)
            cells.append(depth)
    return np.stack(rows), answers, cells


def code_batch(tokenizer, corpus, length: int, count: int, seed: int):
    """Python files with one function defined once; the question asks for its name."""
    rows, answers = [], []
    rng = np.random.default_rng([seed, length, 99])
    for depth in np.linspace(0.1, 0.9, count):
        w = rng.choice(WORDS, 4, replace=False)
        name = f"{rng.choice(VERBS)}_{w[0]}_{w[1]}"
        marker = f"{w[2]}-{w[3]}-{rng.integers(100, 1000)}"
        function = f'def {name}(items):\n    """Return the marker of this module."""\n'
        function += f'    return "{marker}"\n'
        question = (
            f'Which function defined in the code above returns the string "{marker}"? '
            "Answer with the function name only."
        )
        rows.append(needle_prompt(tokenizer, corpus, rng, length, depth, function, question))
        answers.append(name)
    return np.stack(rows), answers


def yarn_config(config, factor: float, native: int):
    """The model config with static YaRN RoPE over `factor` x `native` positions."""
    rope = RopeConfig(
        theta=config.rope.theta,
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=native,
    )
    return dataclasses.replace(config, rope=rope, max_position_embeddings=int(factor * native))


@nnx.jit
def _embed(model, ids):
    return model.embed[...][ids]


@nnx.jit
def _chunk_nll_sum(model, x, targets):
    logp = jax.nn.log_softmax(model.logits(x).astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].sum(-1)


def sequence_nll(model, ids: np.ndarray, spec: AttentionSpec) -> np.ndarray:
    """Mean next-token loss (nats) per row of ids [B, N + 1], through the prefill's layer step;
    logits are taken LOGITS_CHUNK positions at a time (a 152K vocabulary at 128K tokens would
    need 80 GB at once)."""
    config = model.config
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    n = inputs.shape[1]
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = _embed(model, inputs)
    planned = plan_layers(
        spec, n, config.num_layers, config.num_heads, dtype=x.dtype, head_dim=config.head_dim
    )
    for layer, (plan, budgets) in zip(model.layers, planned, strict=True):
        x, _, _ = layer_step(
            layer, x, cos, sin, budgets, plan=plan, implementation=spec.implementation, chunk=CHUNK
        )
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for start in range(0, n, LOGITS_CHUNK):
        stop = min(start + LOGITS_CHUNK, n)
        total += _chunk_nll_sum(model, x[:, start:stop], targets[:, start:stop])
    return np.asarray(total) / n


def answers_of(tokenizer, tokens: np.ndarray) -> list[str]:
    return [tokenizer.decode(row).strip() for row in tokens]


def batch_rows(length: int, budget_tokens: int) -> int:
    return max(1, budget_tokens // length)


def run_generate(model, ids: np.ndarray, new_tokens: int, spec, rows_per_batch: int):
    """Greedy answers of every row, `rows_per_batch` prompts at a time; mean computed share."""
    tokens, fractions = [], []
    for start in range(0, len(ids), rows_per_batch):
        out, result = generate(
            model,
            jnp.asarray(ids[start : start + rows_per_batch]),
            new_tokens,
            spec,
            chunk_size=CHUNK,
        )
        tokens.append(out)
        fractions += [layer.computed_fraction for layer in result.layers]
    return np.concatenate(tokens), float(np.mean(fractions))


def accuracy_rows(model, tokenizer, corpora, modes, args, length: int) -> list[dict]:
    plain, code = corpora
    ids, keys, depths = passkey_batch(
        tokenizer, plain, length, args.depths, args.samples, args.seed
    )
    code_ids, names = code_batch(tokenizer, code, length, args.code_prompts, args.seed)
    rng = np.random.default_rng([args.seed, length, 7])
    docs = np.stack([plain.window(rng, length + 1) for _ in range(args.ppl_docs)])
    per_batch = batch_rows(length, args.batch_tokens)
    rows = []
    for mode in modes:
        start = time.perf_counter()
        tokens, fraction = run_generate(model, ids, 8, mode.spec, per_batch)
        said = answers_of(tokenizer, tokens)
        for depth in args.depths:
            picked = [i for i, d in enumerate(depths) if d == depth]
            rows.append(
                dict(
                    kind="passkey",
                    mode=mode.name,
                    length=length,
                    depth=depth,
                    correct=sum(keys[i] in said[i] for i in picked),
                    samples=len(picked),
                    answers=[said[i] for i in picked],
                    keys=[keys[i] for i in picked],
                )
            )
        code_tokens, _ = run_generate(model, code_ids, 16, mode.spec, per_batch)
        code_said = answers_of(tokenizer, code_tokens)
        rows.append(
            dict(
                kind="code",
                mode=mode.name,
                length=length,
                correct=sum(n in s for n, s in zip(names, code_said, strict=True)),
                samples=len(names),
                answers=code_said,
                names=names,
            )
        )
        nll = np.concatenate(
            [
                sequence_nll(model, docs[i : i + per_batch], mode.spec)
                for i in range(0, len(docs), per_batch)
            ]
        )
        rows.append(
            dict(
                kind="ppl",
                mode=mode.name,
                length=length,
                docs=len(docs),
                nll=float(nll.mean()),
                ppl=math.exp(min(float(nll.mean()), 700.0)),
                computed_fraction=fraction,
                seconds=round(time.perf_counter() - start, 1),
            )
        )
        passkey_acc = np.mean([k in s for k, s in zip(keys, said, strict=True)])
        print(
            f"{length:>7} {mode.name:<26} passkey {passkey_acc:6.1%}  code "
            f"{rows[-2]['correct']}/{rows[-2]['samples']}  loss {rows[-1]['nll']:.4f}  "
            f"computed {fraction:.1%}  ({rows[-1]['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def speed_rows(model, tokenizer, corpus, modes, args, length: int) -> list[dict]:
    """Whole-model prefill of one held-out prompt, every mode on the default dispatch."""
    ids, _, _ = passkey_batch(tokenizer, corpus, length, [0.5], 1, args.seed)
    rows = []
    for mode in modes:
        spec = AttentionSpec(mode.spec.patterns, None)  # the library's own dispatch
        times = []
        for _ in range(args.repeats + 1):  # the first run compiles
            result = prefill(model, jnp.asarray(ids), spec, chunk_size=CHUNK)
            times.append(result.seconds)
        layers = result.layers
        rows.append(
            dict(
                kind="speed",
                mode=mode.name,
                length=length,
                seconds=statistics.median(times[1:]),
                first_seconds=times[0],
                computed_fraction=float(np.mean([x.computed_fraction for x in layers])),
                backends=sorted({x.backend for x in layers}),
                # Layer 0 on the real prompt: its time and the shares of index estimation,
                # attention kernel and the rest, each part timed alone.
                **layer0_breakdown(model, jnp.asarray(ids), spec, CHUNK, args.repeats),
            )
        )
        r = rows[-1]
        print(
            f"{length:>7} {mode.name:<26} prefill {r['seconds']:8.3f} s  computed "
            f"{r['computed_fraction']:.1%}  {','.join(r['backends'])}  layer 0: "
            f"{r['layer0_ms']:.1f} ms, index {r['share_index']:.1%}",
            flush=True,
        )
    dense = next((r["seconds"] for r in rows if r["mode"] == "dense"), None)
    for row in rows:
        row["speedup"] = dense / row["seconds"] if dense else None
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=pathlib.Path, help="converted folder (required)")
    parser.add_argument("--pattern-config", type=pathlib.Path, help="config of `minference`")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["dense", "minference", "vs:1000,6096", "avs:0.95", "adb:0.9"],
        help="as benchmarks.niah reads them (default: %(default)s)",
    )
    parser.add_argument("--lengths", type=int, nargs="*", default=[], help="accuracy lengths")
    parser.add_argument("--speed-lengths", type=int, nargs="*", default=[], help="speed lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--samples", type=int, default=4, help="pass-key prompts per depth")
    parser.add_argument("--code-prompts", type=int, default=4, help="code prompts per length")
    parser.add_argument("--ppl-docs", type=int, default=2, help="perplexity windows per length")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=1 << 19,
        help="prompt tokens per batch (default: %(default)s)",
    )
    parser.add_argument(
        "--yarn-above",
        type=int,
        default=32768,
        help="native context: longer prompts run with YaRN (default: %(default)s)",
    )
    parser.add_argument(
        "--yarn-factor",
        type=float,
        default=4.0,
        help="YaRN factor past the native context (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills per speed cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--replot",
        type=pathlib.Path,
        metavar="JSON",
        help="run nothing: redraw the heat maps of this real_model JSON file into --out",
    )
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    declare(parser, "real_model")
    args = parser.parse_args(argv)
    if args.replot:
        report_written(replot(args.replot, args.out / args.replot.stem))
        return []
    if args.model is None:
        parser.error("--model is required (except with --replot)")
    if not args.lengths and not args.speed_lengths:
        parser.error("give --lengths (accuracy) and/or --speed-lengths (prefill time)")
    args.model = resolve_model_arg(args.model)
    model, native_config = load_model(args.model, getattr(jnp, args.dtype))
    tokenizer = load_tokenizer(args.model, native_config.vocab_size)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json")
    args.budget = (1000, 6096)  # what build_modes reads for the bare "vs" mode
    modes: list[Mode] = build_modes(args, native_config)
    start = time.perf_counter()
    corpora = (Corpus(tokenizer), Corpus(tokenizer, python_only=True))
    print(
        f"held-out text: {len(corpora[0].ids)} tokens, Python files {len(corpora[1].ids)} "
        f"({time.perf_counter() - start:.0f} s to tokenise)",
        flush=True,
    )
    stem = args.out / f"real_model_{device_name().split(':')[-1].replace(' ', '_')}"
    rows = []
    for length in sorted(set(args.lengths) | set(args.speed_lengths)):
        model.config = (
            yarn_config(native_config, args.yarn_factor, args.yarn_above)
            if length > args.yarn_above
            else native_config
        )
        if length in args.lengths:
            rows += accuracy_rows(model, tokenizer, corpora, modes, args, length)
        if length in args.speed_lengths:
            rows += speed_rows(model, tokenizer, corpora[0], modes, args, length)
        write_report(rows, stem, modes, args)
    return rows


def write_report(rows: list[dict], stem: pathlib.Path, modes: list[Mode], args) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device_name(),
        model=str(args.model),
        dtype=args.dtype,
        modes={m.name: m.title for m in modes},
        yarn_above=args.yarn_above,
        depths=args.depths,
        samples=args.samples,
        code_prompts=args.code_prompts,
        ppl_docs=args.ppl_docs,
        yarn_factor=args.yarn_factor,
        repeats=args.repeats,
        seed=args.seed,
    )
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = accuracy_table(rows, modes) + [""] + speed_table(rows, modes)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if any(r["kind"] == "passkey" for r in rows):
        paths.append(heat_maps(rows, meta, stem.with_suffix(".png")))
    report_written(*paths)


def accuracy_table(rows: list[dict], modes: list[Mode]) -> list[str]:
    lengths = sorted({r["length"] for r in rows if r["kind"] == "ppl"})
    if not lengths:
        return []
    dense_nll = {r["length"]: r["nll"] for r in rows if r["kind"] == "ppl" and r["mode"] == "dense"}
    head = " / ".join(tokens_label(n) for n in lengths)
    lines = [
        f"| mode | pass key {head} | code {head} | perplexity change vs dense "
        f"{head} | tiles computed {head} |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode.name]
        keys, code, ppl, tiles = [], [], [], []
        for n in lengths:
            cells = [r for r in mine if r["kind"] == "passkey" and r["length"] == n]
            if not cells:  # this mode was not run at this length (merged reports)
                for column in (keys, code, ppl, tiles):
                    column.append("-")
                continue
            keys.append(
                f"{100 * sum(c['correct'] for c in cells) / sum(c['samples'] for c in cells):.0f}%"
            )
            c = next(r for r in mine if r["kind"] == "code" and r["length"] == n)
            code.append(f"{c['correct']}/{c['samples']}")
            p = next(r for r in mine if r["kind"] == "ppl" and r["length"] == n)
            base = dense_nll.get(n)  # perplexity ratio = exp(loss difference)
            change = math.expm1(p["nll"] - base) if base is not None else None
            ppl.append(f"{100 * change:+.2f}%" if change is not None else f"{p['ppl']:.3f}")
            tiles.append(f"{100 * p['computed_fraction']:.0f}%")
        lines.append(
            f"| {mode.title} | {' / '.join(keys)} | {' / '.join(code)} | "
            f"{' / '.join(ppl)} | {' / '.join(tiles)} |"
        )
    return lines


def _cell(value, fmt: str) -> str:
    """A table cell; "-" for a figure a run's JSON does not hold (runs before it was timed)."""
    return "-" if value is None else fmt.format(value)


def speed_table(rows: list[dict], modes: list[Mode]) -> list[str]:
    speed = [r for r in rows if r["kind"] == "speed"]
    if not speed:
        return []
    lines = [
        "| prompt tokens | mode | prefill s (all layers) | speedup vs dense | tiles computed "
        "| ran on | layer 0 ms | index share of layer 0 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        title = next(m.title for m in modes if m.name == r["mode"])
        gain = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(
            f"| {tokens_label(r['length'])} | {title} | {r['seconds']:.3f} | {gain} | "
            f"{100 * r['computed_fraction']:.1f}% | {', '.join(r['backends'])} | "
            f"{_cell(r.get('layer0_ms'), '{:.1f}')} | {_cell(r.get('share_index'), '{:.1%}')} |"
        )
    return lines


def heat_maps(rows: list[dict], meta: dict, path: pathlib.Path) -> pathlib.Path:
    """Pass-key accuracy by length and depth, one panel per mode titled by the mode's name (the
    pattern reprs overlap at this width). Reads the JSON's rows and meta alone, so `--replot`
    redraws it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["kind"] == "passkey"]
    modes = [m for m in meta["modes"] if any(r["mode"] == m for r in cells)]
    lengths = sorted({r["length"] for r in cells})
    depths = sorted({r["depth"] for r in cells})
    fig, axes = plt.subplots(
        1,
        len(modes),
        figsize=(1.0 + 2.6 * len(modes), 3.6),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    image = None
    for ax, mode in zip(axes[0], modes, strict=True):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in cells:
            if r["mode"] == mode:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = (
                    r["correct"] / r["samples"]
                )
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            text = "not run" if np.isnan(value) else f"{value:.0%}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes[0].tolist(), label="pass keys retrieved", shrink=0.9)
    model = pathlib.Path(meta["model"].split(" (")[0]).name
    fig.suptitle(
        f"Pass keys in held-out text, {model} ({card_name(meta['device'])}, {meta['dtype']})",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(path: pathlib.Path, stem: pathlib.Path) -> pathlib.Path:
    report = json.loads(path.read_text())
    stem.parent.mkdir(parents=True, exist_ok=True)
    return heat_maps(report["rows"], report["meta"], stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
