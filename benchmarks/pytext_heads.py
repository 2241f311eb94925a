"""What each attention head does, shown: its searched pattern and where its attention goes.

    python -m benchmarks.pytext_heads                     # pytext-12m, 8K tokens, CPU ~1 min
    python -m benchmarks.pytext_heads --tokens 32768 --out DIR                      # GPU

Panel 1: per layer and query head, the pattern of the searched config and the share of the
dense attention mass it kept in the search (the config's score). Panels 2-4: on a held-out
passkey prompt (needle at 40% depth, question at the end), the dense attention of the last 64
queries (the question), split by key: the first 64 tokens (sink), the 256 tokens before each
query (local), and the needle sentence (retrieval; a uniform head would put ~0.3% there at
8K). Each head is named by its largest share: sink, local, retrieval (>= 20% on the needle) or
diffuse (most of its mass elsewhere). Writes heads.png and heads.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import heldout
from benchmarks.niah import searched_config
from benchmarks.timing import report_written
from convert.checkpoint import load_model
from minference_jax import passkey
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, parse_pattern_config
from minference_jax.models.modeling import layer_body
from minference_jax.models.rope import rope_tables

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "pytext-12m"
OUT = pathlib.Path(__file__).parent / "results" / "pytext_12m"
QUERIES = 64  # last queries scored, as the search scores them
SINK, LOCAL = 64, 256
RETRIEVAL_SHARE = 0.2


def short_name(pattern: P.Pattern) -> str:
    if isinstance(pattern, P.VerticalSlash):
        return f"VS {pattern.n_vertical}/{pattern.n_slash}"
    if isinstance(pattern, P.AShape):
        return f"A {pattern.n_init}/{pattern.n_local}"
    if isinstance(pattern, P.BlockSparse):
        return f"block {pattern.top_k}"
    return "dense"


def attention_shares(model, ids: np.ndarray, needle: tuple[int, int]) -> np.ndarray:
    """[layers, heads, 3]: attention mass of the last QUERIES queries on sink, local, needle."""
    config = model.config
    n = len(ids)
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = model.embed[...][jnp.asarray(ids)[None]]
    keys = jnp.arange(n)
    rows = jnp.arange(n - QUERIES, n)
    causal = keys[None, :] <= rows[:, None]
    masks = jnp.stack(
        [
            jnp.broadcast_to(keys < SINK, causal.shape),
            causal & (rows[:, None] - keys[None, :] < LOCAL),
            jnp.broadcast_to((keys >= needle[0]) & (keys < needle[1]), causal.shape),
        ]
    )  # [3, Q, N]
    shares = []
    for layer in model.layers:
        q, k, _ = layer.attn.qkv(layer.input_norm(x), cos, sin)
        group = config.num_heads // config.num_kv_heads
        k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
        logits = jnp.einsum("qhd,nhd->hqn", q[0, n - QUERIES :].astype(jnp.float32), k[0])
        logits = jnp.where(causal, logits * config.head_dim**-0.5, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)  # [H, Q, N]
        shares.append(np.asarray(jnp.einsum("hqn,cqn->hc", probs, masks) / QUERIES))
        x, _, _ = layer_body(layer, x, cos, sin, None, plan=None, implementation=None, chunk=n)
    return np.stack(shares)


def head_kind(share: np.ndarray) -> str:
    sink, local, needle = share
    if needle >= RETRIEVAL_SHARE:
        return "retrieval"
    rest = 1.0 - sink - local - needle
    return ("sink", "local", "diffuse")[int(np.argmax([sink, local, rest]))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=CHECKPOINT, help="HF folder")
    parser.add_argument(
        "--config", type=pathlib.Path, default=None, help="default: the shipped searched config"
    )
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length")
    parser.add_argument("--seed", type=int, default=1, help="prompt seed")
    parser.add_argument("--out", type=pathlib.Path, default=OUT, help=f"folder (default {OUT})")
    args = parser.parse_args(argv)
    model, config = load_model(args.model, jnp.float32)
    config_path = args.config or searched_config(args.model)
    table = load_pattern_config(
        config_path, num_layers=config.num_layers, num_heads=config.num_heads
    )
    _, recall = parse_pattern_config(json.loads(config_path.read_text()))
    rng = np.random.default_rng(args.seed)
    ids, key = heldout.passkey_prompt(rng, args.tokens, 0.4)
    start = bytes(ids.astype(np.uint8)).find(passkey.needle(key).encode())
    needle = (start, start + len(passkey.needle(key)))
    shares = attention_shares(model, ids, needle)
    kinds = [[head_kind(s) for s in layer] for layer in shares]
    result = dict(
        model=args.model.name,
        config=config_path.name,
        tokens=args.tokens,
        patterns=[[short_name(p) for p in layer] for layer in table.layers],
        recall=[list(r) for r in recall],
        shares_sink_local_needle=np.round(shares, 4).tolist(),
        kinds=kinds,
        kind_counts={
            k: sum(row.count(k) for row in kinds) for k in ("sink", "local", "retrieval", "diffuse")
        },
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heads.json").write_text(json.dumps(result, indent=1))
    plot(result, np.asarray(recall), shares, args.out / "heads.png")
    print(f"head kinds: {result['kind_counts']}")
    report_written(args.out / "heads.png", args.out / "heads.json")
    return result


def plot(result: dict, recall: np.ndarray, shares: np.ndarray, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = recall.shape
    panels = [
        ("searched pattern (colour: recall of the attention mass)", recall, 0.8, None),
        (f"sink: first {SINK} tokens", shares[..., 0], 0, None),
        (f"local: last {LOCAL} tokens", shares[..., 1], 0, None),
        ("retrieval: the needle sentence", shares[..., 2], 0, result["kinds"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.6), gridspec_kw=dict(width_ratios=[1.6, 1, 1, 1]))
    for ax, (title, grid, vmin, kinds) in zip(axes, panels, strict=True):
        image = ax.imshow(grid, vmin=vmin, vmax=1, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            text = f"{value:.2f}"
            if ax is axes[0]:
                text = f"{result['patterns'][i][j]}\n{value:.3f}"
            elif kinds is not None:
                text = f"{value:.2f}\n{kinds[i][j]}"
            colour = "white" if value < vmin + 0.5 * (1 - vmin) else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=colour)
        ax.set_xticks(range(heads), [str(h) for h in range(heads)])
        ax.set_yticks(range(layers), [str(layer) for layer in range(layers)])
        ax.set_xlabel("query head")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    axes[0].set_ylabel("layer")
    counts = ", ".join(f"{n} {k}" for k, n in result["kind_counts"].items())
    fig.suptitle(
        f"{result['model']}: heads on a {result['tokens']}-token held-out passkey prompt "
        f"(attention of the last {QUERIES} queries); {counts}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
