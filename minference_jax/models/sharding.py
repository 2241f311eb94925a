"""Tensor-parallel prefill over a 1-D device mesh (axis "tp"), the Megatron split.

Attention heads and MLP columns are split across devices: q/k/v projections and gate/up by
output columns, o_proj and down_proj by input rows. Each device holds whole GQA groups (a kv
head and the query heads that read it), so its query heads read only its own kv heads. The
sparse attention — index estimation and kernel — runs per device on its local heads inside
`shard_map`; which pattern and budget each head has is traced data, so every device runs the
same program on its slice of the per-head budgets. Embedding, final norm and LM head are
replicated.

Head placement: heads of unequal pattern cost split contiguously leave one device computing
more tiles than the others while they wait. Given the per-head patterns (the offline config),
`balanced_kv_order` picks, per layer, which kv-head groups go to which device so that the
estimated tile counts (`head_tiles`) are as even as possible; the q/k/v/o weights and the
per-head budgets are permuted the same way at placement time, so outputs equal the
unpermuted model's (up to float summation order) and the KV cache comes back in model order.

Sequence parallel (default): between the attention and the MLP the activations stay split
along the tokens (`sequence_parallel.sequence_layout`: the prompt cut into slices of up to `chunk`
tokens, each device holding its rows of every slice; padded at the end, and the padding never
enters attention). Norms and residuals run on N / devices tokens; per slice, an all-gather
brings the normed tokens to every device before the column-parallel projections and a
reduce-scatter after the row-parallel ones (o_proj, down_proj) sums and re-splits them, the
next slice's gather and the previous slice's scatter issued beside the current slice's matmuls.
`sequence_parallel=False`: activations replicated, one all-reduce after each row-parallel
projection.

Multi-host: call `jax.distributed.initialize()` (coordinator address, process count and id from
the cluster environment or arguments) before building the mesh; `make_mesh()` then spans every
process's devices, and the same code runs on every host.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minference_jax import patterns as pat
from minference_jax.models.config import ModelConfig
from minference_jax.models.modeling import layer_body
from minference_jax.models.sequence_parallel import sequence_layout

AXIS = "tp"
# Parameter path suffix inside a decoder layer -> how it is split.
_SPLITS = {
    ("attn", "q_proj", "kernel"): P(None, AXIS),
    ("attn", "k_proj", "kernel"): P(None, AXIS),
    ("attn", "v_proj", "kernel"): P(None, AXIS),
    ("attn", "q_proj", "bias"): P(AXIS),
    ("attn", "k_proj", "bias"): P(AXIS),
    ("attn", "v_proj", "bias"): P(AXIS),
    ("attn", "o_proj", "kernel"): P(AXIS, None),
    ("mlp", "gate_proj", "kernel"): P(None, AXIS),
    ("mlp", "up_proj", "kernel"): P(None, AXIS),
    ("mlp", "down_proj", "kernel"): P(AXIS, None),
}
# Parameter path suffix -> (axis laid out by head, query or kv heads): permuted by placement.
_HEAD_AXES = {
    ("attn", "q_proj", "kernel"): (1, "q"),
    ("attn", "q_proj", "bias"): (0, "q"),
    ("attn", "k_proj", "kernel"): (1, "kv"),
    ("attn", "k_proj", "bias"): (0, "kv"),
    ("attn", "v_proj", "kernel"): (1, "kv"),
    ("attn", "v_proj", "bias"): (0, "kv"),
    ("attn", "o_proj", "kernel"): (0, "q"),
}
COST_BLOCK = 64  # tile edge of the cost model (the kernels' default block_q = block_kv)
BALANCE_SEQ_LEN = 131072  # prompt length the placement is balanced for, unless told


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all, every process's)."""
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if num_devices > len(devices):
        raise ValueError(f"asked for {num_devices} devices, {len(devices)} are visible")
    return Mesh(np.array(devices[:num_devices]), (AXIS,))


def check_divisible(config: ModelConfig, num_devices: int) -> None:
    if config.num_kv_heads % num_devices or config.intermediate_size % num_devices:
        raise ValueError(
            f"tensor parallelism over {num_devices} devices needs them to divide the kv heads "
            f"({config.num_kv_heads}) and the MLP width ({config.intermediate_size})"
        )


# --- head placement by estimated cost -------------------------------------------------------


def head_tiles(pattern: pat.Pattern, seq_len: int, block: int = COST_BLOCK) -> int:
    """Estimated key tiles (block x block) one head computes over a causal prompt of seq_len.

    Per query block: Dense all causal tiles; VerticalSlash (v + s) / block (columns gathered
    in tiles, slashes as diagonal blocks); A-shape (n_init + n_local) / block; BlockSparse
    top_k. At least the diagonal tile, never more than the causal ones (query block i has i + 1).
    """
    num_q = -(-seq_len // block)
    if isinstance(pattern, pat.Dense):
        per_block = num_q
    elif isinstance(pattern, pat.VerticalSlash):
        vertical, slash = pattern.budgets(seq_len)
        per_block = -(-vertical // block) + -(-slash // block)
    elif isinstance(pattern, pat.AShape):
        n_init, n_local = min(pattern.n_init, seq_len), min(pattern.n_local, seq_len)
        per_block = -(-n_init // block) + -(-n_local // block)
    elif isinstance(pattern, pat.BlockSparse):
        per_block = pattern.top_k
    else:
        raise TypeError(f"no cost model for {type(pattern).__name__}")
    per_block = min(max(per_block, 1), num_q)
    # sum over query blocks i of min(i + 1, per_block)
    return per_block * (per_block + 1) // 2 + (num_q - per_block) * per_block


def kv_group_costs(layer: Sequence[pat.Pattern], num_kv_heads: int, seq_len: int) -> list[int]:
    """Estimated tiles of each kv-head group (the query heads that read kv head g)."""
    group = len(layer) // num_kv_heads
    tiles = [head_tiles(p, seq_len) for p in layer]
    return [sum(tiles[g * group : (g + 1) * group]) for g in range(num_kv_heads)]


def device_costs(costs: Sequence[int], kv_order: Sequence[int], num_devices: int) -> list[int]:
    """Summed cost per device when device d holds kv groups kv_order[d*k:(d+1)*k]."""
    per = len(costs) // num_devices
    return [sum(costs[g] for g in kv_order[d * per : (d + 1) * per]) for d in range(num_devices)]


def balanced_kv_order(
    costs: Sequence[int], num_devices: int, *, max_nodes: int = 20_000
) -> tuple[int, ...]:
    """kv-group order (device-major, len(costs) / num_devices groups per device) that
    minimises the largest device cost.

    Branch and bound over assignments of the groups (costliest first) to devices, starting
    from the contiguous split, which is kept unless strictly beaten; exact unless `max_nodes`
    search steps run out (then the best found, never worse than contiguous). Llama's 8 kv
    heads over 2 or 4 devices take a few hundred steps.
    """
    n = len(costs)
    if n % num_devices:
        raise ValueError(f"{num_devices} devices do not divide {n} kv heads")
    per = n // num_devices
    best_order = tuple(range(n))
    best_max = max(device_costs(costs, best_order, num_devices))
    lower_bound = -(-sum(costs) // num_devices)
    by_cost = sorted(range(n), key=lambda g: -costs[g])
    loads, bins, nodes = [0] * num_devices, [[] for _ in range(num_devices)], 0

    def visit(i: int, current_max: int) -> None:
        nonlocal best_max, best_order, nodes
        nodes += 1
        if i == n:
            best_max = current_max
            ordered = sorted(sorted(b) for b in bins)  # canonical: devices by first group
            best_order = tuple(g for b in ordered for g in b)
            return
        group, tried = by_cost[i], set()
        for d in sorted(range(num_devices), key=loads.__getitem__):
            state = (loads[d], len(bins[d]))
            if len(bins[d]) == per or state in tried:
                continue  # full, or the same as a device already tried (symmetry)
            tried.add(state)
            new_max = max(current_max, loads[d] + costs[group])
            if new_max >= best_max or nodes >= max_nodes or best_max <= lower_bound:
                continue
            loads[d] += costs[group]
            bins[d].append(group)
            visit(i + 1, new_max)
            bins[d].pop()
            loads[d] -= costs[group]

    visit(0, 0)
    return best_order


def balanced_placement(
    patterns: pat.HeadPatterns, num_kv_heads: int, num_devices: int, seq_len: int
) -> tuple[tuple[int, ...], ...]:
    """Per layer, the kv-group order that balances the devices' estimated tiles."""
    return tuple(
        balanced_kv_order(kv_group_costs(layer, num_kv_heads, seq_len), num_devices)
        for layer in patterns.layers
    )


def placement_imbalance(
    patterns: pat.HeadPatterns,
    num_kv_heads: int,
    num_devices: int,
    seq_len: int,
    kv_orders: Sequence[Sequence[int]] | None = None,
) -> float:
    """Estimated attention slowdown from uneven devices: sum over layers of the largest device
    cost / sum of the mean device cost (devices wait for each other at every layer).
    kv_orders None: the contiguous split."""
    worst = mean = 0
    for layer_id, layer in enumerate(patterns.layers):
        costs = kv_group_costs(layer, num_kv_heads, seq_len)
        order = range(num_kv_heads) if kv_orders is None else kv_orders[layer_id]
        per_device = device_costs(costs, tuple(order), num_devices)
        worst += max(per_device)
        mean += sum(per_device) / num_devices
    return worst / mean


def query_order(kv_order: Sequence[int], group_size: int) -> np.ndarray:
    """Query-head order that moves whole GQA groups with their kv heads."""
    return np.array([g * group_size + j for g in kv_order for j in range(group_size)])


# --- placement and the sharded layer step ---------------------------------------------------


def _place(tree, sharding_tree):
    """Put process-local values (the same on every process) onto a possibly multi-host mesh."""

    def place(value, sharding):
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            return value  # already there (a previous layer's output)
        if sharding.is_fully_addressable:
            return jax.device_put(value, sharding)
        host = np.asarray(value)  # multi-host: each process fills its own shards
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree, sharding_tree)


def _suffix(path) -> tuple[str, ...]:
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    keys = tuple(k for k in keys if k != "value")  # nnx Variables add a trailing .value
    return keys[-3:]


def _permute_heads(state, kv_order, config: ModelConfig):
    """The layer's attention weights with heads in placement order (columns / rows by head)."""
    orders = {"kv": np.asarray(kv_order), "q": query_order(kv_order, config.group_size)}
    d = config.head_dim

    def permute(path, value):
        if _suffix(path) not in _HEAD_AXES:
            return value
        axis, which = _HEAD_AXES[_suffix(path)]
        index = (orders[which][:, None] * d + np.arange(d)).ravel()
        return jnp.take(value, index, axis=axis)

    return jax.tree_util.tree_map_with_path(permute, state)


class TensorParallel:
    """Per-layer sharded parameters and one shard_map'd layer step shared by every layer.

    patterns: the per-head pattern table; given, each layer's kv-head groups are placed so the
      devices' estimated tiles balance (at prompt length `seq_len`). None: contiguous split.
    sequence_parallel: activations split along the tokens between attention and MLP
      (reduce-scatter / all-gather); False: replicated (all-reduce).
    """

    def __init__(
        self,
        model,
        mesh: Mesh,
        patterns: pat.HeadPatterns | None = None,
        *,
        seq_len: int = BALANCE_SEQ_LEN,
        sequence_parallel: bool = True,
    ):
        config = model.config
        self.mesh = mesh
        self.size = mesh.shape[AXIS]
        self.sequence_parallel = sequence_parallel
        check_divisible(config, self.size)
        self.kv_orders = None
        if patterns is not None and self.size > 1:
            patterns.check_model(config.num_layers, config.num_heads)
            self.kv_orders = balanced_placement(patterns, config.num_kv_heads, self.size, seq_len)
        self.q_orders = (
            None
            if self.kv_orders is None
            else [query_order(o, config.group_size) for o in self.kv_orders]
        )
        self.graphdef, first = nnx.split(model.layers[0])
        self.specs = jax.tree_util.tree_map_with_path(
            lambda path, _: _SPLITS.get(_suffix(path), P()), first
        )
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.specs)
        self.states = []
        for layer_id, layer in enumerate(model.layers):
            state = nnx.state(layer)
            if self.kv_orders is not None:
                state = _permute_heads(state, self.kv_orders[layer_id], config)
            self.states.append(_place(state, shardings))
        self._steps = {}
        self._tables = (None, None, None)  # the last RoPE tables given, and their mesh copies
        self._take_row = jax.jit(  # [B, 1, hidden] on every device: one program for all rows
            lambda x, row: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=1),
            out_shardings=NamedSharding(mesh, P()),
        )

    def with_sequence_parallel(self, enabled: bool) -> TensorParallel:
        """The same placed weights with the other activation layout (for A/B runs)."""
        other = copy.copy(self)
        other.sequence_parallel = enabled
        other._steps = {}
        return other

    def _compiled(self, plan, implementation, chunk):
        key = (plan, implementation, chunk)
        if key not in self._steps:
            local_plan = (
                None
                if plan is None
                else dataclasses.replace(plan, num_heads=plan.num_heads // self.size)
            )
            sequence_parallel = self.sequence_parallel

            def body(state, x, cos, sin, budgets):
                layer = nnx.merge(self.graphdef, state)
                return layer_body(
                    layer,
                    x,
                    cos,
                    sin,
                    budgets,
                    plan=local_plan,
                    implementation=implementation,
                    chunk=chunk,
                    axis_name=AXIS,
                    sequence_parallel=sequence_parallel,
                    with_fraction=True,
                )

            heads = P(None, None, AXIS, None)
            tokens = P(None, AXIS, None) if sequence_parallel else P()
            self._steps[key] = jax.jit(
                jax.shard_map(
                    body,
                    mesh=self.mesh,
                    in_specs=(self.specs, tokens, P(), P(), P(AXIS)),
                    out_specs=(tokens, heads, heads, P()),
                    check_vma=False,
                )
            )
        return self._steps[key]

    def padded_len(self, seq_len: int, chunk: int) -> int:
        """Tokens the activations carry: seq_len, padded to the sequence layout when split."""
        if not self.sequence_parallel:
            return seq_len
        rows, steps = sequence_layout(seq_len, self.size, chunk)
        return rows * steps * self.size

    def to_layout(self, x: jax.Array, chunk: int) -> jax.Array:
        """Process-local [B, N, hidden] embeddings -> the rows of the sequence layout, device
        after device (the global array that NamedSharding P(None, "tp") splits)."""
        b, seq_len, hidden = x.shape
        rows, steps = sequence_layout(seq_len, self.size, chunk)
        x = jnp.pad(x, ((0, 0), (0, rows * steps * self.size - seq_len), (0, 0)))
        x = x.reshape(b, steps, self.size, rows, hidden).transpose(0, 2, 1, 3, 4)
        return x.reshape(b, -1, hidden)

    def layout_row(self, position: int, seq_len: int, chunk: int) -> int:
        """Row of the token at `position` in the layout's global array (`to_layout`)."""
        if not self.sequence_parallel:
            return position
        rows, steps = sequence_layout(seq_len, self.size, chunk)
        step, within = divmod(position, rows * self.size)
        device, row = divmod(within, rows)
        return (device * steps + step) * rows + row

    def step(self, layer_id: int):
        """A callable with `layer_step`'s signature that runs layer `layer_id` sharded.

        Takes the embeddings (process-local, [B, N, hidden]) or the previous layer's output;
        returns x in the mesh layout and k, v [B, N, Hkv, D] split by kv head in placement
        order (`model_order` puts them back)."""

        def run(_layer, x, cos, sin, budgets, *, plan, implementation, chunk, with_fraction=False):
            tokens = NamedSharding(
                self.mesh, P(None, AXIS, None) if self.sequence_parallel else P()
            )
            replicated = NamedSharding(self.mesh, P())
            laid_out = x.shape[1] == self.padded_len(cos.shape[0], chunk) and (
                x.sharding.is_equivalent_to(tokens, x.ndim)
            )
            if self.sequence_parallel and not laid_out:  # the embeddings
                x = self.to_layout(x, chunk)
            # Inputs are committed to this process's device: place them on the (possibly
            # multi-host) mesh; every process holds the same values. A previous layer's x is
            # already in place (a no-op).
            x = _place(x, tokens)
            if self._tables[0] is not cos or self._tables[1] is not sin:  # a new prompt
                self._tables = (cos, sin, _place((cos, sin), (replicated,) * 2))
            cos, sin = self._tables[2]  # placed once per prompt, not once per layer
            if budgets is not None:
                if self.q_orders is not None:
                    order = self.q_orders[layer_id]
                    budgets = {name: np.asarray(b)[order] for name, b in budgets.items()}
                by_head = NamedSharding(self.mesh, P(AXIS))
                budgets = _place(budgets, jax.tree.map(lambda _: by_head, budgets))
            out = self._compiled(plan, implementation, chunk)(
                self.states[layer_id], x, cos, sin, budgets
            )
            return out if with_fraction else out[:3]

        return run

    def model_order(self, layer_id: int, k: jax.Array, v: jax.Array):
        """A layer's k, v with kv heads back in the model's order (for the KV cache)."""
        if self.kv_orders is None:
            return k, v
        inverse = np.argsort(self.kv_orders[layer_id])
        return jnp.take(k, inverse, axis=2), jnp.take(v, inverse, axis=2)

    def last_token(self, x: jax.Array, seq_len: int, chunk: int) -> jax.Array:
        """This process's copy of the last token's activations, [B, 1, hidden]."""
        self._tables = (None, None, None)  # the prompt is done: free its RoPE tables
        row = self.layout_row(seq_len - 1, seq_len, chunk)
        return self._take_row(x, row).addressable_shards[0].data
