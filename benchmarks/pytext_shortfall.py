"""Which heads cost a sparse mode its accuracy, measured: per head, the needle mass it drops,
then NIAH and bits/byte with those heads given back dense attention.

    python -m benchmarks.pytext_shortfall                        # pytext-12m, 4K, CPU ~10 min
    python -m benchmarks.pytext_shortfall --tokens 16384 --out DIR                      # GPU

For each mode (every head one pattern, as `benchmarks.niah` reads it) and each held-out
passkey prompt, the dense prefill's q/k of every layer give, per query head:
- needle share: the last query's dense softmax mass on the needle sentence (that query
  predicts the key's first digit);
- needle kept: the share of that mass on keys the mode's index (estimated on the same q/k,
  with the blocks the sparse path uses on this device) computes;
- needle loss = share x (1 - kept): the needle mass the head loses, averaged over prompts;
- recall: the share of the dense mass the index keeps over 64 query rows of the prompt
  (`minference_jax.recall.row_recall`), the number the perplexity depends on.
The --restore heads with the largest needle loss (>= 1%; then the lowest recall) are the mode's
suspects; NIAH accuracy and held-out bits/byte are then measured for dense, the mode, and the
mode with only those heads dense (`benchmarks.niah.run_length`, same prompts). Writes
shortfall.{json,md,png} to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import niah
from benchmarks.device_guard import declare
from benchmarks.pytext_heads import layer_qk, needle_span
from benchmarks.timing import DEFAULT_OUT, device_name, report_written
from minference_jax import patterns as P
from minference_jax.attention import default_blocks, forced_sparse_implementation
from minference_jax.index_approx import build_sparse_index
from minference_jax.models import AttentionSpec
from minference_jax.models.checkpoint import load_model
from minference_jax.recall import index_row_mask, row_recall, sample_rows
from minference_jax.search import parse_candidate

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "pytext-12m"
MODES = ("ashape:64,1024", "adb:0.9", "adbr:0.1", "avsr:0.01")
RECALL_ROWS = 64


def needle_mass(q, k, keep_last: jax.Array, needle: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(share, kept) per query head: the last query's dense softmax mass on keys
    [needle[0], needle[1]) and the part of it on keys `keep_last` [Hq, N] marks.
    q [1, N, Hq, D], k [1, N, Hkv, D] (f32)."""
    group = q.shape[2] // k.shape[2]
    logits = jnp.einsum("hd,nhd->hn", q[0, -1], jnp.repeat(k[0], group, axis=1))
    probs = jax.nn.softmax(logits * q.shape[-1] ** -0.5, axis=-1)  # the last row sees every key
    on_needle = (jnp.arange(k.shape[1]) >= needle[0]) & (jnp.arange(k.shape[1]) < needle[1])
    share = (probs * on_needle).sum(-1)
    kept = (probs * (on_needle & keep_last)).sum(-1) / jnp.maximum(share, 1e-30)
    return np.asarray(share), np.asarray(kept)


def head_losses(model, prompts, pattern: P.Pattern, impl: str) -> dict:
    """[layers, heads] means over prompts: needle share, needle kept, needle loss, recall."""
    config = model.config
    block_q, block_kv = default_blocks(pattern, impl, jnp.bfloat16, config.head_dim)
    share, kept, recall = [], [], []
    for ids, needle in prompts:
        rows = sample_rows(len(ids), RECALL_ROWS)
        per_layer = []
        for q, k in layer_qk(model, ids):
            index = build_sparse_index(q, k, pattern, block_q=block_q, block_kv=block_kv)
            keep_last = index_row_mask(index, jnp.asarray([len(ids) - 1]))[0, :, 0]
            s, kp = needle_mass(q, k, keep_last, needle)
            r = np.asarray(row_recall(q, k, index, rows))[0].mean(-1)
            per_layer.append((s, kp, r))
        share.append([p[0] for p in per_layer])
        kept.append([p[1] for p in per_layer])
        recall.append([p[2] for p in per_layer])
    share, kept, recall = (np.asarray(a, np.float64) for a in (share, kept, recall))
    return dict(
        needle_share=share.mean(0),
        needle_kept=kept.mean(0),
        needle_loss=(share * (1 - kept)).mean(0),
        recall=recall.mean(0),
    )


NEEDLE_LOSS_FLOOR = 0.01  # needle mass below which a head's loss cannot cost the answer


def suspects(loss: np.ndarray, recall: np.ndarray, count: int) -> list[tuple[int, int]]:
    """The `count` (layer, head) pairs with the largest needle loss, largest first; losses
    under NEEDLE_LOSS_FLOOR count as none, and equal losses go by the lowest recall (so a mode
    that keeps every needle is judged by the mass it drops elsewhere)."""
    material = np.where(loss >= NEEDLE_LOSS_FLOOR, loss, 0.0)
    order = np.lexsort((recall.ravel(), -material.ravel()))[:count]
    return [tuple(int(i) for i in np.unravel_index(j, loss.shape)) for j in order]


def with_dense_heads(pattern: P.Pattern, heads: list[tuple[int, int]], layers: int, per: int):
    """Every head `pattern`, except `heads` (layer, head) dense."""
    table = [[pattern] * per for _ in range(layers)]
    for layer, head in heads:
        table[layer][head] = P.Dense()
    return P.HeadPatterns(tuple(tuple(row) for row in table))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=CHECKPOINT, help="HF folder")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="KIND:SIZES specs")
    parser.add_argument(
        "--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="needle depths"
    )
    parser.add_argument("--samples", type=int, default=2, help="prompts per depth")
    parser.add_argument("--restore", type=int, default=3, help="suspect heads made dense")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "pytext_shortfall")
    args = parser.parse_args(argv)
    if args.restore < 1 or args.tokens < 256 or args.samples < 1:
        parser.error("need --restore >= 1, --tokens >= 256 and --samples >= 1")
    modes = {name: parse_candidate(name) for name in args.modes}
    model, config = load_model(args.model, jnp.float32)
    niah_args = niah.build_parser().parse_args(
        ["--model", str(args.model), "--dtype", args.dtype, "--samples", str(args.samples)]
        + ["--depths", *map(str, args.depths), "--haystack", "heldout"]
    )
    ids, keys, _ = niah.niah_batch(niah_args, args.tokens)
    prompts = [(row, needle_span(row, key)) for row, key in zip(ids, keys, strict=True)]
    impl = forced_sparse_implementation(getattr(jnp, args.dtype), config.head_dim)
    run_model = model if args.dtype == "float32" else load_model(args.model, jnp.bfloat16)[0]

    result = dict(
        model=args.model.name, device=device_name(), tokens=args.tokens, dtype=args.dtype,
        prompts=len(prompts), restore=args.restore, modes={},
    )  # fmt: skip
    dense_mode = niah.Mode("dense", "dense", AttentionSpec())
    runs = [dense_mode]
    for name, pattern in modes.items():
        losses = head_losses(model, prompts, pattern, impl)
        culprits = suspects(losses["needle_loss"], losses["recall"], args.restore)
        table = with_dense_heads(pattern, culprits, config.num_layers, config.num_heads)
        uniform = P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads)
        runs += [
            niah.Mode(name, name, AttentionSpec(uniform, impl)),
            niah.Mode(f"{name} +dense", f"{name}, {culprits} dense", AttentionSpec(table, impl)),
        ]
        result["modes"][name] = dict(
            suspects=culprits, **{k: np.round(v, 4).tolist() for k, v in losses.items()}
        )
        print(f"{name}: suspects (layer, head) {culprits}", flush=True)
    rows = niah.run_length(run_model, runs, niah_args, args.tokens)
    result["runs"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "shortfall"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_report(result, stem)
    report_written(stem.with_suffix(".md"), stem.with_suffix(".png"), stem.with_suffix(".json"))
    return result


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per run: NIAH accuracy, bits/byte and computed fraction."""
    out = {}
    for row in rows:
        entry = out.setdefault(row["mode"], dict(correct=0, samples=0))
        if row["kind"] == "niah":
            entry["correct"] += row["correct"]
            entry["samples"] += row["samples"]
        else:
            entry["bits_per_byte"] = row["bits_per_byte"]
            entry["computed_fraction"] = row["computed_fraction"]
    return out


def write_report(result: dict, stem: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summarise(result["runs"])
    dense_bpb = runs["dense"]["bits_per_byte"]
    lines = [
        f"Sparse-mode shortfall by head: {result['model']}, {result['tokens']} tokens, "
        f"{result['prompts']} held-out passkey prompts, {result['device']}, {result['dtype']}. "
        f"Suspects: the {result['restore']} heads with the largest needle loss (the last "
        "query's dense mass on the needle sentence that the index drops, counted from 1%; "
        "equal losses: the lowest recall), made dense.",
        "",
        "| run | NIAH | bits/byte (vs dense) | tiles computed |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        change = 100 * (r["bits_per_byte"] / dense_bpb - 1)
        lines.append(
            f"| {name} | {r['correct']}/{r['samples']} | {r['bits_per_byte']:.4f} "
            f"({change:+.2f}%) | {100 * r['computed_fraction']:.1f}% |"
        )
    lines += ["", "| mode | suspect (layer, head) | needle share | kept | loss | recall |"]
    lines.append("|---|---|---|---|---|---|")
    for name, m in result["modes"].items():
        for layer, head in m["suspects"]:
            lines.append(
                f"| {name} | ({layer}, {head}) | {m['needle_share'][layer][head]:.3f} | "
                f"{m['needle_kept'][layer][head]:.3f} | {m['needle_loss'][layer][head]:.3f} | "
                f"{m['recall'][layer][head]:.3f} |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    names = list(result["modes"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6), squeeze=False)
    for col, name in enumerate(names):
        m = result["modes"][name]
        for row, (key, title, cmap) in enumerate(
            (("needle_loss", "needle mass lost", "Reds"), ("recall", "recall (64 rows)", "viridis"))
        ):
            ax = axes[row, col]
            values = np.asarray(m[key])
            top = 1.0 if key == "recall" else max(float(values.max()), NEEDLE_LOSS_FLOOR)
            image = ax.imshow(values, cmap=cmap, vmin=0, vmax=top)
            for layer, head in m["suspects"]:
                ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2))
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(
        f"{result['model']}, {result['tokens']} tokens: where each mode loses the needle "
        "(boxes: the heads made dense)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
