"""Tensor-parallel figures for the e2e benchmark: layouts to compare, how evenly the devices'
attention work splits, and what the layer's collectives cost timed alone.

Per-device kernel time is not observable inside one `shard_map` program, so the spread is
estimated from tile counts: every layer's estimated index (per head, from a one-device prefill)
summed over each device's heads (`index_tile_spread`), and the config's cost model
(`cost_model_spread`, `minference_jax.models.sharding.placement_imbalance`). Both are the sum
over layers of the largest device's tiles / the sum of the mean device's: 1.0 is even.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.timing import time_fn
from minference_jax.attention import layer_plan
from minference_jax.index_approx import build_planned_index
from minference_jax.models.generation import layer_step
from minference_jax.models.rope import rope_tables
from minference_jax.models.sharding import AXIS, TensorParallel, placement_imbalance


def layouts(devices: int, *, contiguous_too: bool, replicated_too: bool):
    """(balance, sequence_parallel) pairs to run: the new layout first, then the A/B ones."""
    if devices == 1:
        return [(None, None)]
    balances = [True, False] if contiguous_too else [True]
    sequence = [True, False] if replicated_too else [True]
    return [(b, s) for b in balances for s in sequence]


def uniform_heads(spec) -> bool:
    """Every head of every layer has the same pattern (dense, or one pattern for all)."""
    return spec.patterns is None or len({p for layer in spec.patterns.layers for p in layer}) == 1


def layout_label(balance, sequence_parallel) -> str:
    if balance is None:
        return "-"
    heads = "balanced" if balance else "contiguous"
    return f"{heads} + {'seq-parallel' if sequence_parallel else 'all-reduce'}"


@nnx.jit
def _normed_qkv(layer, x, cos, sin):
    return layer.attn.qkv(layer.input_norm(x), cos, sin)


def index_tiles_by_layer(model, ids, spec, chunk: int) -> list[np.ndarray | None]:
    """Key tiles per query head of every layer's estimated index ([H] each; None: a layer that
    runs dense), from a one-device prefill of the prompt."""
    config, n = model.config, ids.shape[1]
    if spec.patterns is None:
        return [None] * config.num_layers
    heads = config.num_heads
    cos, sin = rope_tables(config, jnp.arange(n), n)
    x = model.embed[...][ids]
    tiles = []
    for layer_id, layer in enumerate(model.layers):
        patterns = spec.layer(layer_id, heads)
        plan, budgets = layer_plan(patterns, n, heads, "pallas")
        if plan is None:
            tiles.append(None)
        else:
            q, k, _ = _normed_qkv(layer, x, cos, sin)
            index = build_planned_index(q, k, budgets, plan=plan, scale=config.head_dim**-0.5)
            tiles.append(np.asarray(index.num_tiles().sum(axis=(0, 2), dtype=jnp.float32)))
        if layer_id + 1 < config.num_layers:
            plan, budgets = layer_plan(patterns, n, heads, spec.implementation)
            x, _, _ = layer_step(
                layer,
                x,
                cos,
                sin,
                budgets,
                plan=plan,
                implementation=spec.implementation,
                chunk=chunk,
            )
    return tiles


def index_tile_spread(tiles_by_layer: list[np.ndarray | None], tp: TensorParallel) -> float:
    """Sum over layers of the largest device's index tiles / sum of the mean device's, under
    tp's head placement (devices wait for each other at every layer)."""
    worst = mean = 0.0
    for layer_id, tiles in enumerate(tiles_by_layer):
        if tiles is None:
            continue  # every head dense: even
        order = np.arange(len(tiles)) if tp.q_orders is None else tp.q_orders[layer_id]
        per_device = tiles[order].reshape(tp.size, -1).sum(axis=1)
        worst += float(per_device.max())
        mean += float(per_device.mean())
    return 1.0 if mean == 0 else round(worst / mean, 3)


def cost_model_spread(spec, config, tp: TensorParallel, seq_len: int) -> float:
    """Config cost model over every layer run: sum of largest / sum of mean device tiles."""
    if spec.patterns is None:
        return 1.0
    return round(
        placement_imbalance(spec.patterns, config.num_kv_heads, tp.size, seq_len, tp.kv_orders), 3
    )


@functools.cache
def _collectives(mesh, sequence_parallel: bool):
    """One layer's collectives: attention and MLP each an all-gather + reduce-scatter of the
    [B, N, hidden] activations (sequence parallel) or an all-reduce (replicated)."""
    if sequence_parallel:
        tokens = P(None, AXIS, None)

        def body(x):
            for _ in range(2):
                full = jax.lax.all_gather(x, AXIS, axis=1, tiled=True)
                x = jax.lax.psum_scatter(full, AXIS, scatter_dimension=1, tiled=True)
            return x

    else:
        tokens = P()

        def body(x):
            for _ in range(2):
                x = jax.lax.psum(x, AXIS)
            return x

    step = jax.shard_map(body, mesh=mesh, in_specs=tokens, out_specs=tokens, check_vma=False)
    return jax.jit(step), NamedSharding(mesh, tokens)


def collectives_ms(tp: TensorParallel, batch, seq_len, hidden, dtype, chunk, repeats):
    """Wall ms of one layer's collectives at this size, timed alone (in one piece each; the
    sequence-parallel MLP moves them in chunk-sized pieces)."""
    step, sharding = _collectives(tp.mesh, tp.sequence_parallel)
    x = jax.device_put(jnp.ones((batch, tp.padded_len(seq_len, chunk), hidden), dtype), sharding)
    return time_fn(step, x, warmup=1, repeats=repeats)
