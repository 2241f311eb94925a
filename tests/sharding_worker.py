"""Run by tests/test_sharding.py in fresh processes (device count / distributed set up first).

    python tests/sharding_worker.py local N            # one process, N forced CPU devices
    python tests/sharding_worker.py host PID PORT      # one of 2 processes (gloo collectives)
Prints one JSON line with, per device count ("2", "4" locally with 4 devices; "2" for the two
hosts), the max relative logits error of sharded vs single-device prefill (heads placed by
cost, sequence-parallel activations, a prompt length the device count does not divide), and
in local mode the KV cache error (over 2 devices also the replicated, contiguous layout's).
"""

import json
import os
import sys

mode = sys.argv[1]
if mode == "local":
    devices = f"--xla_force_host_platform_device_count={sys.argv[2]}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if mode == "host":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from minference_jax import AShape, BlockSparse, Dense, HeadPatterns, VerticalSlash  # noqa: E402
from minference_jax.models import AttentionSpec, CausalLM, ModelConfig  # noqa: E402
from minference_jax.models.generation import prefill  # noqa: E402
from minference_jax.models.sharding import TensorParallel, make_mesh  # noqa: E402

config = ModelConfig.from_hf_dict(
    dict(
        model_type="qwen2",  # q/k/v biases: permuted with the heads too
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
)
model = CausalLM(config, rngs=nnx.Rngs(3))
ids = jax.random.randint(jax.random.PRNGKey(0), (2, 301), 0, 64)  # 301: no device count divides
# Dense groups first: the contiguous split would give them all to the first device(s).
sparse = (VerticalSlash(30, 50), AShape(4, 64), BlockSparse(2), VerticalSlash(8, 60))
layer0 = (Dense(),) * 4 + sparse * 3
layer1 = sparse + (Dense(),) * 2 + sparse * 2 + (Dense(),) * 2
mixed = HeadPatterns((layer0, layer1))
specs = {"dense": AttentionSpec(), "minference": AttentionSpec(mixed)}
report = {"devices": len(jax.devices())}


def rel(a, b):
    err = float(jnp.linalg.norm(jnp.asarray(a) - b) / jnp.linalg.norm(b))
    assert np.isfinite(err)
    return err


single = {
    name: prefill(model, ids, spec, return_cache=mode == "local") for name, spec in specs.items()
}
# Local: every device count that divides the kv heads up to the devices there (2 and 4 with
# 4 forced devices), one report each. Multi-host: one mesh over both processes' devices.
counts = [n for n in (2, 4, 8) if n <= len(jax.devices())] if mode == "local" else [None]
for count in counts:
    mesh = make_mesh(count)
    # Heads placed for the mixed table in both specs: dense layers run with permuted weights.
    balanced = TensorParallel(model, mesh, mixed, seq_len=ids.shape[1])
    part = {"permuted_layers": sum(o != tuple(range(8)) for o in balanced.kv_orders)}
    # Multi-host: a plain mesh, so prefill places the heads for each spec's own table itself.
    target = balanced if mode == "local" else mesh
    for name, spec in specs.items():
        cache = mode == "local"
        sharded = prefill(model, ids, spec, mesh=target, chunk_size=64, return_cache=cache)
        part[name] = rel(sharded.last_logits, single[name].last_logits)
        if mode == "local":
            part[f"{name}_cache"] = max(
                rel(jax.device_get(kv_sharded[i]), kv_single[i])
                for kv_sharded, kv_single in zip(sharded.cache, single[name].cache, strict=True)
                for i in (0, 1)
            )
    if count == 2:
        replicated = TensorParallel(model, mesh, sequence_parallel=False)  # contiguous, all-reduce
        logits = prefill(model, ids, specs["minference"], mesh=replicated, chunk_size=64)
        part["replicated"] = rel(logits.last_logits, single["minference"].last_logits)
    report[str(count or len(jax.devices()))] = part
if mode == "local":
    try:
        prefill(model, ids, mesh=make_mesh(8) if len(jax.devices()) >= 8 else None)
    except ValueError as err:
        report["error"] = str(err)
print(json.dumps(report), flush=True)
