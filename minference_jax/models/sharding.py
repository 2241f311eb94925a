"""Tensor-parallel prefill over a 1-D device mesh (axis "tp"), the Megatron split.

Attention heads and MLP columns are split across devices: q/k/v projections and gate/up by
output columns, o_proj and down_proj by input rows (their outputs are summed with `psum`).
Query heads and kv heads are split contiguously, so device i's query heads read exactly its kv
heads (GQA groups never straddle devices). The sparse attention — index estimation and kernel —
runs per device on its local heads inside `shard_map`; which pattern and budget each head has is
traced data, so every device runs the same program on its slice of the per-head budgets.
Embedding, norms and the LM head are replicated.

Multi-host: call `jax.distributed.initialize()` (coordinator address, process count and id from
the cluster environment or arguments) before building the mesh; `make_mesh()` then spans every
process's devices, and the same code runs on every host.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from minference_jax.models.config import ModelConfig
from minference_jax.models.modeling import layer_body

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


def _place(tree, sharding_tree):
    """Put process-local values (the same on every process) onto a possibly multi-host mesh."""

    def place(value, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value  # already there (a previous layer's output)
        if sharding.is_fully_addressable:
            return jax.device_put(value, sharding)
        host = np.asarray(value)  # multi-host: each process fills its own shards
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(place, tree, sharding_tree)


def _spec(path) -> P:
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    keys = tuple(k for k in keys if k != "value")  # nnx Variables add a trailing .value
    return _SPLITS.get(keys[-3:], P())


class TensorParallel:
    """Per-layer sharded parameters and one shard_map'd layer step shared by every layer."""

    def __init__(self, model, mesh: Mesh):
        self.mesh = mesh
        self.size = mesh.shape[AXIS]
        check_divisible(model.config, self.size)
        self.graphdef, first = nnx.split(model.layers[0])
        self.specs = jax.tree_util.tree_map_with_path(lambda path, _: _spec(path), first)
        self.states = []
        for layer in model.layers:
            shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.specs)
            self.states.append(_place(nnx.state(layer), shardings))
        self._steps = {}

    def _compiled(self, plan, implementation, chunk):
        key = (plan, implementation, chunk)
        if key not in self._steps:
            local_plan = (
                None
                if plan is None
                else dataclasses.replace(plan, num_heads=plan.num_heads // self.size)
            )

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
                    with_fraction=True,
                )

            heads = P(None, None, AXIS, None)
            self._steps[key] = jax.jit(
                jax.shard_map(
                    body,
                    mesh=self.mesh,
                    in_specs=(self.specs, P(), P(), P(), P(AXIS)),
                    out_specs=(P(), heads, heads, P()),
                    check_vma=False,
                )
            )
        return self._steps[key]

    def step(self, layer_id: int):
        """A callable with `layer_step`'s signature that runs layer `layer_id` sharded."""

        def run(_layer, x, cos, sin, budgets, *, plan, implementation, chunk, with_fraction=False):
            # Inputs are committed to this process's device: place them on the (possibly
            # multi-host) mesh; every process holds the same values.
            replicated = NamedSharding(self.mesh, P())
            x, cos, sin = _place((x, cos, sin), (replicated,) * 3)
            if budgets is not None:
                by_head = NamedSharding(self.mesh, P(AXIS))
                budgets = _place(budgets, jax.tree.map(lambda _: by_head, budgets))
            out = self._compiled(plan, implementation, chunk)(
                self.states[layer_id], x, cos, sin, budgets
            )  # x stays replicated on the mesh: the next layer's placement of it is a no-op
            return out if with_fraction else out[:3]

        return run

    @staticmethod
    def local(x: jax.Array) -> jax.Array:
        """This process's replica of a replicated mesh array (for single-device code after)."""
        return x.addressable_shards[0].data
