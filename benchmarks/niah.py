"""Needle-in-a-haystack (passkey) accuracy, perplexity and computed tiles: dense vs sparse prefill.

    python -m benchmarks.niah --model minference_jax/checkpoints/pytext-12m --dtype bfloat16 \\
        --lengths 2048 4096 8192 16384 32768 --samples 4 \\
        --modes dense minference vs:1000,6096 ashape:64,1024                       # GPU
    python -m benchmarks.niah --lengths 1024 --depths 0 1 --samples 1 --ppl-docs 1  # CPU smoke

For each prompt length, `--samples` passkey prompts per needle depth (random 5-digit key) are
prefilled in each mode, in one batch, and 5 tokens decoded greedily (dense decoding over the
prefilled cache); a sample is correct when they are the key. Haystacks (--haystack): `heldout`
cuts windows of real held-out text (`benchmarks.heldout`: files pytext-12m never trained on);
`synthetic` is the passkey filler of `minference_jax.passkey` (what passkey-tiny knows); `auto`
takes synthetic for passkey-tiny and held-out text for any other checkpoint.

Modes (--modes, any mix):
  dense         dense causal attention (cuDNN on GPU for 16-bit dtypes);
  minference    the per-head pattern config --pattern-config (default: the checkpoint's shipped
                searched config, minference_jax/configs/<name>_searched.json);
  PATH.json     another pattern config file;
  vs            every head VerticalSlash(--budget), kept for old command lines;
  KIND:SIZES    every head one pattern, as `python -m minference_jax.search --candidates` reads
                it (minference_jax.search.parse_candidate): vs:1000,6096  ashape:64,1024  block:8.
Sparse modes force the sparse path at every length (`forced_sparse_implementation`: the Mosaic
kernel on sm_90, Triton on other GPUs, XLA on CPU): the library's default sends short prompts
to dense cuDNN on GPU, which would hide their accuracy.
Perplexity: mean next-token loss over --ppl-docs documents of each length (held-out windows, or
synthetic passkey documents), reported as bits per byte (byte-level models) and its change vs
dense. Computed fraction: key tiles the sparse attention computed over a dense causal kernel's
(`SparseIndex.computed_fraction`), mean over layers, as the prefill reports it.
Writes niah_<device>.{json,md,png} to --out after every length and prints their paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import heldout
from benchmarks.device_guard import declare
from benchmarks.timing import (
    DEFAULT_OUT,
    add_replot_arguments,
    card_name,
    device_name,
    report_written,
    tokens_label,
)
from minference_jax import passkey
from minference_jax import patterns as P
from minference_jax.attention import forced_sparse_implementation, plan_layers
from minference_jax.config_io import PatternConfigError, load_pattern_config, shipped_configs
from minference_jax.models import AttentionSpec
from minference_jax.models.checkpoint import CheckpointError, load_model
from minference_jax.models.generation import generate, layer_step
from minference_jax.models.rope import rope_tables
from minference_jax.search import parse_candidate
from minference_jax.shipped import resolve_checkpoint, resolve_pattern_config

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "passkey-tiny"
SYNTHETIC_MODELS = ("passkey-tiny",)  # trained on the synthetic haystack only
CHUNK = 8192  # prefill chunk of the projections / MLP (the library default)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str  # as given on the command line
    title: str  # what it runs, budgets included
    spec: AttentionSpec


def _pattern_title(pattern: P.Pattern) -> str:
    fields = ", ".join(str(getattr(pattern, f.name)) for f in dataclasses.fields(pattern))
    return f"{type(pattern).__name__}({fields})"


def searched_config(model_path: pathlib.Path) -> pathlib.Path | None:
    """The shipped searched config of a checkpoint folder (passkey-tiny -> passkey_tiny_...)."""
    name = model_path.resolve().name.replace("-", "_").replace(".", "_")
    return shipped_configs().get(f"{name}_searched")


def resolve_model_arg(model: pathlib.Path) -> pathlib.Path:
    """--model: a checkpoint folder, or a shipped model's name from any folder (one-line exit)."""
    try:
        return resolve_checkpoint(model)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None


def build_modes(args, config) -> list[Mode]:
    impl = forced_sparse_implementation(getattr(jnp, args.dtype), config.head_dim)
    layers, heads = config.num_layers, config.num_heads
    modes = []
    for name in args.modes:
        if name == "dense":
            modes.append(Mode(name, "dense", AttentionSpec()))
            continue
        if name == "minference" or name.endswith(".json"):
            path = pathlib.Path(name) if name != "minference" else args.pattern_config
            path = path or searched_config(args.model)
            if path is None:
                raise SystemExit(f"{name}: no searched config for {args.model.name}; give one")
            try:  # a path, or a shipped config's name from any folder
                path = resolve_pattern_config(path)
                table = load_pattern_config(path, num_layers=layers, num_heads=heads)
            except PatternConfigError as err:
                raise SystemExit(f"error: {err}") from None
            modes.append(Mode(name, f"config {path.stem}", AttentionSpec(table, impl)))
            continue
        try:
            pattern = P.VerticalSlash(*args.budget) if name == "vs" else parse_candidate(name)
        except argparse.ArgumentTypeError as err:
            raise SystemExit(
                f"unknown mode {name!r}: dense, minference, PATH.json, vs, {err}"
            ) from None
        table = P.HeadPatterns.uniform(pattern, layers, heads)
        modes.append(Mode(name, _pattern_title(pattern), AttentionSpec(table, impl)))
    if len({m.name for m in modes}) != len(modes):
        raise SystemExit(f"a mode is given twice: {args.modes}")
    return modes


def use_heldout(args) -> bool:
    if args.haystack == "auto":
        return args.model.resolve().name not in SYNTHETIC_MODELS
    return args.haystack == "heldout"


def niah_batch(args, length: int) -> tuple[np.ndarray, list[str], list[float]]:
    """Token ids [depths * samples, length], the keys, and each row's depth."""
    rows, keys, depths = [], [], []
    for depth in args.depths:
        rng = np.random.default_rng([args.seed, length, int(depth * 1000)])
        for _ in range(args.samples):
            if use_heldout(args):
                ids, key = heldout.passkey_prompt(rng, length, depth)
            else:
                prompt, key = passkey.passkey_prompt(rng, length, depth)
                ids = passkey.encode(prompt)
            rows.append(ids)
            keys.append(key)
            depths.append(depth)
    return np.stack(rows), keys, depths


def ppl_batch(args, length: int) -> np.ndarray:
    """--ppl-docs documents of length + 1 tokens (inputs and next-token targets)."""
    rng = np.random.default_rng([args.seed, length, 7])
    count = args.ppl_docs or len(args.depths) * args.samples
    if use_heldout(args):
        return np.stack([heldout.window(rng, length + 1) for _ in range(count)])
    return np.concatenate([passkey.training_batch(rng, 1, length + 1)[0] for _ in range(count)])


@nnx.jit
def _embed(model, ids):
    return model.embed[...][ids]


@nnx.jit
def _token_nll(model, x, targets):
    """Mean next-token loss (nats) per row: x [B, N, hidden], targets [B, N]."""
    logp = jax.nn.log_softmax(model.logits(x).astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0].mean(-1)


def sequence_nll(model, ids: np.ndarray, spec: AttentionSpec) -> tuple[np.ndarray, list[float]]:
    """(loss per row [B], computed fraction per layer) of the next-token predictions of ids
    [B, N + 1], through the same per-layer step as the prefill (its compiled programs are
    shared with the NIAH prefill of the same shape)."""
    config = model.config
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    n = inputs.shape[1]
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = _embed(model, inputs)
    fractions = []
    planned = plan_layers(
        spec, n, config.num_layers, config.num_heads, dtype=x.dtype, head_dim=config.head_dim
    )
    for layer, (plan, budgets) in zip(model.layers, planned, strict=True):
        x, _, _, fraction = layer_step(
            layer,
            x,
            cos,
            sin,
            budgets,
            plan=plan,
            implementation=spec.implementation,
            chunk=CHUNK,
            with_fraction=True,
        )
        fractions.append(fraction)
    return np.asarray(_token_nll(model, x, targets)), [float(f) for f in fractions]


def run_length(model, modes: list[Mode], args, length: int) -> list[dict]:
    ids, keys, depths = niah_batch(args, length)
    docs = ppl_batch(args, length)
    rows = []
    for mode in modes:
        start = time.perf_counter()
        new_tokens, result = generate(
            model, jnp.asarray(ids), passkey.KEY_DIGITS, mode.spec, chunk_size=CHUNK
        )
        answers = [bytes(t.astype(np.uint8)).decode("latin-1") for t in new_tokens]
        fractions = [layer.computed_fraction for layer in result.layers]
        for depth in args.depths:
            picked = [i for i, d in enumerate(depths) if d == depth]
            rows.append(
                dict(
                    kind="niah",
                    mode=mode.name,
                    length=length,
                    depth=depth,
                    correct=sum(answers[i] == keys[i] for i in picked),
                    samples=len(picked),
                    answers=[answers[i] for i in picked],
                    keys=[keys[i] for i in picked],
                )
            )
        nll, ppl_fractions = sequence_nll(model, docs, mode.spec)
        rows.append(
            dict(
                kind="ppl",
                mode=mode.name,
                length=length,
                docs=len(docs),
                nll=float(nll.mean()),
                ppl=math.exp(float(nll.mean())),
                bits_per_byte=float(nll.mean()) / math.log(2),
                computed_fraction=float(np.mean(fractions)),
                layer_fractions=[round(f, 4) for f in fractions],
                ppl_computed_fraction=float(np.mean(ppl_fractions)),
                seconds=round(time.perf_counter() - start, 2),
            )
        )
        acc = np.mean([a == k for a, k in zip(answers, keys, strict=True)])
        print(
            f"{length:>6} {mode.name:<24} niah {acc:6.1%}  bits/byte "
            f"{rows[-1]['bits_per_byte']:.4f}  computed {rows[-1]['computed_fraction']:.1%}  "
            f"({rows[-1]['seconds']:.1f} s)",
            flush=True,
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=pathlib.Path, default=CHECKPOINT, help="HF folder")
    parser.add_argument(
        "--pattern-config",
        type=pathlib.Path,
        default=None,
        help="config of the minference mode (default: the checkpoint's shipped searched one)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["dense", "minference", "vs"],
        help="dense, minference, PATH.json, vs, or KIND:SIZES (vs:V,S ashape:INIT,LOCAL "
        "block:TOP_K, ...) (default: dense minference vs)",
    )
    parser.add_argument(
        "--budget", type=int, nargs=2, default=[1000, 6096], help="VerticalSlash of mode vs"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="tokens")
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="in [0, 1]"
    )
    parser.add_argument("--samples", type=int, default=4, help="prompts per length and depth")
    parser.add_argument(
        "--ppl-docs",
        type=int,
        default=None,
        help="perplexity documents per length (default: depths x samples, the NIAH batch, "
        "so both share compiled programs)",
    )
    parser.add_argument(
        "--haystack",
        choices=("auto", "heldout", "synthetic"),
        default="auto",
        help="needle haystack and perplexity text (default auto: synthetic for passkey-tiny, "
        "held-out real text otherwise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt seed")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="float32 (default) isolates the sparse approximation from rounding; on GPU its "
        "dense mode is XLA attention with [B, H, N, N] scores: use bfloat16 (cuDNN) past 8K",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: start no new length after this (the finished ones are written)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    add_replot_arguments(parser, "the heat maps")
    return parser


def main(argv=None):
    start = time.perf_counter()
    parser = build_parser()
    declare(parser, "niah")
    args = parser.parse_args(argv)
    if args.replot:
        report_written(replot(args.replot, args.out / (args.name or args.replot[0].stem)))
        return []
    args.model = resolve_model_arg(args.model)
    model, config = load_model(args.model, getattr(jnp, args.dtype))
    modes = build_modes(args, config)
    device = device_name()
    stem = args.out / f"niah_{device.replace(':', '_').replace(' ', '_')}"
    rows, done = [], []
    for length in args.lengths:
        if args.deadline is not None and time.perf_counter() - start > args.deadline:
            print(f"deadline: skipping {length} tokens and longer", flush=True)
            break
        rows += run_length(model, modes, args, length)
        done.append(length)
        # after every length: a run cut short still leaves its finished lengths on disk
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        write_report(rows, stem, device, args, modes, sorted(done))
    report_written(*(stem.with_suffix(s) for s in (".json", ".md", ".png")))
    return rows


def summary(rows, modes: list[Mode], lengths) -> dict:
    """Per mode: accuracy per (length, depth), bits/byte and computed fraction per length."""
    acc, ppl = {}, {}
    for r in rows:
        if r["kind"] == "niah":
            acc[r["mode"], r["length"], r["depth"]] = r["correct"] / r["samples"]
        else:
            ppl[r["mode"], r["length"]] = r
    out = {}
    for mode in modes:
        grid = {(n, d): v for (m, n, d), v in acc.items() if m == mode.name and n in lengths}
        out[mode.name] = dict(
            grid=grid,
            per_length=[np.mean([v for (n, _), v in grid.items() if n == ln]) for ln in lengths],
            overall=float(np.mean(list(grid.values()))),
            bpb=[ppl[mode.name, n]["bits_per_byte"] for n in lengths],
            nll=[ppl[mode.name, n]["nll"] for n in lengths],
            fraction=[ppl[mode.name, n]["computed_fraction"] for n in lengths],
        )
    return out


def write_report(rows, stem: pathlib.Path, device: str, args, modes: list[Mode], lengths) -> None:
    stats = summary(rows, modes, lengths)
    dense = stats.get("dense")
    haystack = "held-out real text" if use_heldout(args) else "synthetic filler"
    head = " | ".join(tokens_label(n) for n in lengths)
    lines = [
        f"Passkey retrieval (NIAH), perplexity and computed tiles: {args.model.name}, {device}, "
        f"{args.dtype}; haystack: {haystack}; {len(args.depths)} depths x {args.samples} samples "
        "per length; sparse modes forced at every length.",
        "",
        "Modes: " + "; ".join(f"`{m.name}` = {m.title}" for m in modes) + ".",
        "",
        f"| NIAH accuracy | {head} | overall | vs dense (points) |",
        "|---|" + "---|" * (len(lengths) + 2),
    ]
    for mode in modes:
        s = stats[mode.name]
        delta = "" if dense is None else f"{100 * (s['overall'] - dense['overall']):+.1f}"
        cells = " | ".join(f"{a:.1%}" for a in s["per_length"])
        lines.append(f"| {mode.name} | {cells} | {s['overall']:.1%} | {delta} |")
    lines += ["", f"| bits/byte (PPL change vs dense) | {head} |", "|---|" + "---|" * len(lengths)]
    for mode in modes:
        s = stats[mode.name]
        cells = []
        for i, bpb in enumerate(s["bpb"]):
            change = (
                "" if dense is None else f" ({math.exp(s['nll'][i] - dense['nll'][i]) - 1:+.2%})"
            )
            cells.append(f"{bpb:.4f}{change}")
        lines.append(f"| {mode.name} | " + " | ".join(cells) + " |")
    lines += ["", f"| computed tiles (mean over layers) | {head} |"]
    lines.append("|---|" + "---|" * len(lengths))
    for mode in modes:
        cells = " | ".join(f"{f:.1%}" for f in stats[mode.name]["fraction"])
        lines.append(f"| {mode.name} | {cells} |")
    lines += ["", "Accuracy by depth (rows) and length (columns):", ""]
    for mode in modes:
        lines += [f"**{mode.name}** ({mode.title})", "", f"| depth | {head} |"]
        lines.append("|---|" + "---|" * len(lengths))
        for d in args.depths:
            grid = stats[mode.name]["grid"]
            lines.append(f"| {d:.0%} | " + " | ".join(f"{grid[n, d]:.2f}" for n in lengths) + " |")
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    title = f"NIAH, {args.model.name} ({card_name(device)}, {haystack}, {args.dtype})"
    heat_maps(rows, stem.with_suffix(".png"), title)


def heat_maps(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Accuracy by length and depth, one panel per mode, titled by the mode's name (the pattern
    reprs of the .md overlap at this width), at most 4 panels a row. Reads the rows alone, so
    `--replot` redraws it from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["kind"] == "niah"]
    modes = list(dict.fromkeys(r["mode"] for r in cells))
    lengths = sorted({r["length"] for r in cells})
    depths = sorted({r["depth"] for r in cells})
    grid_rows = -(-len(modes) // 4)
    cols = -(-len(modes) // grid_rows)  # rows as full as they can be evenly
    width = min(3.4, 1.6 + 0.4 * len(lengths))  # per panel: wide enough for its columns
    fig, axes = plt.subplots(
        grid_rows,
        cols,
        figsize=(1.0 + width * cols, 0.6 + 3.2 * grid_rows),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax in axes.flat[len(modes) :]:
        ax.axis("off")
    image = None
    for ax, mode in zip(axes.flat, modes, strict=False):
        correct = {
            (r["length"], r["depth"]): r["correct"] / r["samples"]
            for r in cells
            if r["mode"] == mode
        }
        grid = np.array([[correct.get((n, d), np.nan) for n in lengths] for d in depths])
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [tokens_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        fractions = [
            r["computed_fraction"]
            for r in rows
            if r["kind"] == "ppl" and r["mode"] == mode and "computed_fraction" in r
        ]
        computed = f", {np.mean(fractions):.0%} of tiles" if fractions and mode != "dense" else ""
        ax.set_title(f"{mode}\n{np.nanmean(grid):.0%} correct{computed}", fontsize=9)
    for row in axes:
        row[0].set_ylabel("needle depth")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(paths: list[pathlib.Path], stem: pathlib.Path) -> pathlib.Path:
    """Redraw the heat maps of one or more niah JSON files (merged: e.g. two runs over different
    lengths) into stem.png. The title's model, haystack, card and dtype come from the first
    file's .md report, whose first line names them."""
    rows = [row for path in paths for row in json.loads(path.read_text())]
    report = paths[0].with_suffix(".md")
    first = report.read_text().splitlines()[0] if report.is_file() else ""
    found = re.search(r"(?:tiles:|perplexity,) ([^,]+), ((?:gpu|cpu):[^,;]+)", first)
    model, device = found.groups() if found else ("?", "?")
    haystack = re.search(r"haystack: ([^;]+);", first)
    dtype = re.search(r"\b(float32|bfloat16)\b", first)
    details = [card_name(device), *(m.group(1) for m in (haystack, dtype) if m)]
    stem.parent.mkdir(parents=True, exist_ok=True)
    heat_maps(rows, stem.with_suffix(".png"), f"NIAH, {model} ({', '.join(details)})")
    return stem.with_suffix(".png")


if __name__ == "__main__":
    main()
