"""Dump one layer's q, k, v of a converted model on N tokens of held-out real text.

Kernel and index benchmarks can then run on real heads instead of random ones:

    python -m benchmarks.dump_qkv --model CONVERTED_DIR --layer L --tokens N --out FILE.npz \\
        [--dtype bfloat16] [--seed 0] [--chunk 8192]
    python -m benchmarks.dump_qkv --model CONVERTED_DIR --layer 0 9 18 27 --tokens N --out DIR

Prompt: the documents of `benchmarks.heldout.heldout_docs()` as "path\\ntext", joined by blank
lines, tokenized with the checkpoint's tokenizer.json; a window of N tokens whose start the seed
picks. Layers 0..L-1 run densely with the prefill's own step (`generation.layer_step`,
projections and MLP over `--chunk`-token slices), then layer L's q [1, N, Hq, D] and k, v
[1, N, Hkv, D] are taken after RoPE (v has none), in the model's dtype. Several layers come
from one pass, one file each (DIR/layerLL.npz). `--yarn-above 32768` runs a longer prompt with
YaRN RoPE (`--yarn-factor`), as `benchmarks.real_model` does.

The .npz holds q, k, v (bfloat16 stored as uint16 bit patterns, numpy having no bfloat16), `dtype`,
`layer`, `tokens`, `seed`, `model` (the folder's name), `rope_type` and the prompt's token `ids`.
`load_qkv(path)` gives back q, k, v as jax arrays of the stored dtype.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.device_guard import declare
from benchmarks.heldout import heldout_docs
from benchmarks.real_model import yarn_config
from minference_jax.models.checkpoint import DTYPES, CheckpointError, load_model
from minference_jax.models.generation import layer_step
from minference_jax.models.rope import rope_tables
from minference_jax.shipped import resolve_checkpoint
from minference_jax.tokenization import TokenizerError, load_tokenizer

CHUNK = 8192  # the prefill's default chunk_size
DOC_SEPARATOR = "\n\n"


def prompt_ids(
    tokenizer, tokens: int, seed: int = 0, docs: Sequence[tuple[str, str]] | None = None
) -> np.ndarray:
    """`tokens` consecutive token ids (int32) of the held-out documents, the start picked by seed.

    docs: (path, text) pairs, default `heldout_docs()`; joined as "path\\ntext" by blank lines
    and tokenized whole. ValueError when they hold fewer than `tokens` tokens.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    docs = heldout_docs() if docs is None else docs
    text = DOC_SEPARATOR.join(f"{path}\n{body}" for path, body in docs)
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if len(ids) < tokens:
        raise ValueError(f"the held-out text has {len(ids):,} tokens, fewer than {tokens:,}")
    start = int(np.random.default_rng(seed).integers(0, len(ids) - tokens + 1))
    return ids[start : start + tokens]


@nnx.jit
def _embed(model, ids):
    return model.embed[...][ids]


@nnx.jit
def _qkv(layer, x, cos, sin):
    return layer.attn.qkv(layer.input_norm(x), cos, sin)


def layer_qkv(model, config, ids, layer: int, *, chunk: int = CHUNK):
    """Layer `layer`'s q [1, N, Hq, D], k, v [1, N, Hkv, D] (after RoPE) on token ids [N].

    The layers before it run densely, as the prefill runs them (`layer_step`, `chunk`-token
    projection slices); layer `layer`'s projections go over the same slices.
    """
    ((_, qkv),) = layers_qkv(model, config, ids, (layer,), chunk=chunk)
    return qkv


def layers_qkv(model, config, ids, layers, *, chunk: int = CHUNK):
    """(layer, (q, k, v)) for each of `layers` in ascending order, from one dense pass over the
    layers up to the last of them (a generator: each layer's arrays can be written and dropped
    before the next)."""
    layers = sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"layer must be in [0, {config.num_layers}), got {layer}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _layers_qkv(model, config, ids, layers, chunk)


def _layers_qkv(model, config, ids, layers, chunk):
    ids = jnp.asarray(ids, jnp.int32).reshape(1, -1)
    n = ids.shape[1]
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = _embed(model, ids)
    for layer_id, layer in enumerate(model.layers[: layers[-1] + 1]):
        if layer_id in layers:
            pieces = [
                _qkv(layer, x[:, s : s + chunk], cos[s : s + chunk], sin[s : s + chunk])
                for s in range(0, n, chunk)
            ]
            if len(pieces) == 1:
                yield layer_id, pieces[0]
            else:
                yield (
                    layer_id,
                    tuple(jnp.concatenate(parts, axis=1) for parts in zip(*pieces, strict=True)),
                )
        if layer_id < layers[-1]:
            x, _, _ = layer_step(
                layer, x, cos, sin, None, plan=None, implementation=None, chunk=chunk
            )


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def save_qkv(path, q, k, v, **meta) -> None:
    """Write q, k, v (bf16 as uint16 bit patterns) with a `dtype` entry and `meta` to an .npz."""
    name = _dtype_name(q.dtype)
    arrays = {}
    for key, value in (("q", q), ("k", k), ("v", v)):
        if _dtype_name(value.dtype) != name:
            raise ValueError(f"q is {name} but {key} is {_dtype_name(value.dtype)}")
        value = np.asarray(jax.device_get(value))
        arrays[key] = value.view(np.uint16) if name == "bfloat16" else value
    extra = {key: np.asarray(value) for key, value in meta.items()}
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez then keeps the name as given
        np.savez(f, dtype=np.asarray(name), **arrays, **extra)


def load_qkv(path) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v) from a `dump_qkv` .npz, as jax arrays of the dtype they were dumped in."""
    with np.load(path) as f:
        name = str(f["dtype"])
        if name not in DTYPES:
            raise ValueError(f"{path}: unknown dtype {name!r}")
        dtype = DTYPES[name]
        out = []
        for key in ("q", "k", "v"):
            value = f[key]
            value = value.view(dtype) if name == "bfloat16" else value.astype(dtype, copy=False)
            out.append(jnp.asarray(value))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dump_qkv",
        description="Dump one layer's q, k, v (after RoPE) on N tokens of held-out text.",
    )
    parser.add_argument("--model", required=True, type=pathlib.Path, help="converted folder")
    parser.add_argument(
        "--layer",
        required=True,
        type=int,
        nargs="+",
        help="layer index (0-based); several: one dense pass, one file per layer under --out",
    )
    parser.add_argument("--tokens", required=True, type=int, help="prompt length N")
    parser.add_argument(
        "--out",
        required=True,
        type=pathlib.Path,
        help="output .npz; with several layers a folder, written as layerLL.npz",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0, help="picks the window's start")
    parser.add_argument(
        "--chunk", type=int, default=CHUNK, help="projection slice length (the prefill's)"
    )
    parser.add_argument(
        "--yarn-above",
        type=int,
        default=None,
        help="native context: a longer --tokens runs with YaRN RoPE, as benchmarks.real_model "
        "runs it (default: the folder's own RoPE at any length)",
    )
    parser.add_argument(
        "--yarn-factor", type=float, default=4.0, help="YaRN factor (default: %(default)s)"
    )
    return parser


def layer_file(out: pathlib.Path, layer: int, several: bool) -> pathlib.Path:
    return out / f"layer{layer:02d}.npz" if several else out


def run(args):
    """Dump each --layer; yields one dict per layer (its arrays, meta and file)."""
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    args.model = resolve_checkpoint(args.model)  # a folder, or a shipped model's name
    tokenizer = load_tokenizer(args.model) if args.model.is_dir() else None
    model, config = load_model(args.model, DTYPES[args.dtype])  # checks the folder exists
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json")
    tokenizer.check_vocab_size(config.vocab_size)
    if args.yarn_above is not None and args.tokens > args.yarn_above:
        config = yarn_config(config, args.yarn_factor, args.yarn_above)
    for layer in args.layer:
        if not 0 <= layer < config.num_layers:
            raise ValueError(f"--layer must be in [0, {config.num_layers}), got {layer}")
    several = len(set(args.layer)) > 1
    if several and args.out.suffix == ".npz":
        raise ValueError(f"with several layers --out is a folder, got {args.out}")
    ids = prompt_ids(tokenizer, args.tokens, args.seed)
    for layer, qkv in layers_qkv(model, config, ids, args.layer, chunk=args.chunk):
        q, k, v = jax.block_until_ready(qkv)
        meta = {
            "layer": layer,
            "tokens": args.tokens,
            "seed": args.seed,
            "model": args.model.resolve().name,
            "rope_type": config.rope.rope_type,
            "ids": ids,
        }
        path = layer_file(args.out, layer, several)
        save_qkv(path, q, k, v, **meta)
        yield {"q": q, "k": k, "v": v, **meta, "path": path}


def main(argv=None) -> int:
    parser = build_parser()
    declare(parser, "dump_qkv")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        for result in run(args):
            for key in ("q", "k", "v"):
                value = result[key]
                print(f"{key} {list(value.shape)} {_dtype_name(value.dtype)}")
            print(
                f"{result['model']} layer {result['layer']} at {result['tokens']:,} tokens "
                f"(seed {result['seed']}, rope {result['rope_type']}): wrote {result['path']} "
                f"in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    except (ValueError, CheckpointError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
