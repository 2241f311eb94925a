"""What each attention head does, shown: its searched pattern and where its attention goes.

    python -m benchmarks.pytext_heads                     # pytext-12m, 8K tokens, CPU ~1 min
    python -m benchmarks.pytext_heads --tokens 32768 --out DIR                      # GPU

Panel 1: per layer and query head, the pattern of the searched config and the share of the
dense attention mass it kept in the search (the config's score). Panels 2-4: on a held-out
passkey prompt (needle at 40% depth, question at the end), where the dense attention goes: the
share of the last 64 queries' mass on the 256 tokens before each query (local), on their 30
most attended keys outside that window and the first 64 tokens (vertical: a few far keys), and
the share of the last query's mass (it predicts the key's first digit) on the needle sentence
(retrieval). A head is named retrieval (>= 20% on the needle), else by its largest share of
sink (first 64 tokens), local and vertical when it is >= 50%, else diffuse.
Writes heads.png and heads.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import heldout
from benchmarks.device_guard import declare
from benchmarks.niah import searched_config
from benchmarks.timing import DEFAULT_OUT, report_written
from minference_jax import passkey
from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config, parse_pattern_config
from minference_jax.models.checkpoint import load_model
from minference_jax.models.modeling import layer_body
from minference_jax.models.rope import rope_tables

CHECKPOINT = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "pytext-12m"
QUERIES = 64  # last queries scored, as the search scores them
SINK, LOCAL = 64, 256
RETRIEVAL_SHARE = 0.2
TOP_FAR = 30  # the fewest vertical columns the search offers


def short_name(pattern: P.Pattern) -> str:
    if isinstance(pattern, P.VerticalSlash):
        return f"VS {pattern.n_vertical}/{pattern.n_slash}"
    if isinstance(pattern, P.AShape):
        return f"A {pattern.n_init}/{pattern.n_local}"
    if isinstance(pattern, P.BlockSparse):
        return f"block {pattern.top_k}"
    return "dense"


def layer_qk(model, ids: np.ndarray) -> list[tuple[jax.Array, jax.Array]]:
    """(q, k) of every layer of the dense prefill of ids [N], f32, RoPE applied."""
    config = model.config
    n = len(ids)
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = model.embed[...][jnp.asarray(ids)[None]]
    out = []
    for layer in model.layers:
        q, k, _ = layer.attn.qkv(layer.input_norm(x), cos, sin)
        out.append((q.astype(jnp.float32), k.astype(jnp.float32)))
        x, _, _ = layer_body(layer, x, cos, sin, None, plan=None, implementation=None, chunk=n)
    return out


def needle_span(ids: np.ndarray, key: str) -> tuple[int, int]:
    """[start, end) token positions of the passkey needle sentence in a byte-level prompt."""
    start = bytes(np.asarray(ids).astype(np.uint8)).find(passkey.needle(key).encode())
    return start, start + len(passkey.needle(key))


def attention_shares(model, ids: np.ndarray, needle: tuple[int, int]) -> np.ndarray:
    """[layers, heads, 4] dense attention shares: of the last QUERIES queries on the sink, on
    the local window, on their TOP_FAR most attended keys outside both; and of the last query
    (the one that predicts the key's first digit) on the needle sentence."""
    config = model.config
    n = len(ids)
    keys = jnp.arange(n)
    rows = jnp.arange(n - QUERIES, n)
    causal = keys[None, :] <= rows[:, None]
    sink = jnp.broadcast_to(keys < SINK, causal.shape)
    local = causal & (rows[:, None] - keys[None, :] < LOCAL)
    on_needle = (keys >= needle[0]) & (keys < needle[1])
    group = config.num_heads // config.num_kv_heads
    shares = []
    for q, k in layer_qk(model, ids):
        logits = jnp.einsum("qhd,nhd->hqn", q[0, n - QUERIES :], jnp.repeat(k[0], group, axis=1))
        logits = jnp.where(causal, logits * config.head_dim**-0.5, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)  # [H, Q, N]
        far = jnp.where(sink | local, 0.0, probs)
        top_far = jax.lax.top_k(far, TOP_FAR)[0].sum(-1).mean(-1)
        shares.append(
            np.stack(
                [
                    np.asarray((probs * sink).sum(-1).mean(-1)),
                    np.asarray((probs * local).sum(-1).mean(-1)),
                    np.asarray(top_far),
                    np.asarray((probs[:, -1] * on_needle).sum(-1)),
                ],
                axis=-1,
            )
        )
    return np.stack(shares)


KINDS = ("sink", "local", "vertical", "retrieval", "diffuse")


def head_kind(share: np.ndarray) -> str:
    sink, local, far, needle = share
    if needle >= RETRIEVAL_SHARE:
        return "retrieval"
    if max(sink, local, far) < 0.5:
        return "diffuse"
    return ("sink", "local", "vertical")[int(np.argmax([sink, local, far]))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path, default=CHECKPOINT, help="HF folder")
    parser.add_argument(
        "--config", type=pathlib.Path, default=None, help="default: the shipped searched config"
    )
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length")
    parser.add_argument("--seed", type=int, default=1, help="prompt seed")
    parser.add_argument(
        "--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"folder (default {DEFAULT_OUT})"
    )
    declare(parser, "pytext_heads")
    args = parser.parse_args(argv)
    model, config = load_model(args.model, jnp.float32)
    config_path = args.config or searched_config(args.model)
    table = load_pattern_config(
        config_path, num_layers=config.num_layers, num_heads=config.num_heads
    )
    _, recall = parse_pattern_config(json.loads(config_path.read_text()))
    rng = np.random.default_rng(args.seed)
    ids, key = heldout.passkey_prompt(rng, args.tokens, 0.4)
    shares = attention_shares(model, ids, needle_span(ids, key))
    kinds = [[head_kind(s) for s in layer] for layer in shares]
    result = dict(
        model=args.model.name,
        config=config_path.name,
        tokens=args.tokens,
        patterns=[[short_name(p) for p in layer] for layer in table.layers],
        recall=[list(r) for r in recall],
        shares_sink_local_far_needle=np.round(shares, 4).tolist(),
        kinds=kinds,
        kind_counts={k: sum(row.count(k) for row in kinds) for k in KINDS},
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
        (f"local: the {LOCAL} tokens before each query", shares[..., 1], 0, None),
        (f"vertical: its top {TOP_FAR} keys outside sink and local", shares[..., 2], 0, None),
        ("retrieval: the needle, from the answer position", shares[..., 3], 0, result["kinds"]),
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
        f"(dense attention of the last {QUERIES} queries; on the first {SINK} tokens (sink) at "
        f"most {shares[..., 0].max():.2f}); head kinds: {counts}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
